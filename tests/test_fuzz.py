"""Hypothesis fuzzing of what parses untrusted input: API answers, error bodies, display names.

Whatever the service (or something pretending to be it) sends, the client must
end with a result or an ApiError, never another exception; whatever a file is
called, its display name must be a valid Linux file name.
"""

from __future__ import annotations

import http.server
import json
import math
import pathlib
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mistralfs.api import ApiError, FilePage, FilesClient, ProtocolError, RemoteFile, RetryPolicy
from mistralfs.api.errors import extract_message
from mistralfs.api.models import MAX_SECONDS
from mistralfs.fs.names import NAME_MAX, folder_name, plain_name, with_id

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ONE_TRY = RetryPolicy(max_attempts=1, base_delay=0.0, max_delay=0.0, total_budget=5.0)

# ------------------------------------------------------------------------ strategies

huge_ints = st.one_of(
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 10**400, -(10**400), 0, -1]),
)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    huge_ints,
    st.floats(allow_nan=True, allow_infinity=True),  # json.loads accepts NaN/Infinity
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=10), children, max_size=4),
    ),
    max_leaves=20,
)
FIELDS = (
    "id",
    "object",
    "bytes",
    "created_at",
    "filename",
    "purpose",
    "sample_type",
    "source",
    "num_lines",
    "mimetype",
    "signature",
    "deleted",
    "expires_at",
    "visibility",
)
GOOD = {
    "id": st.uuids().map(str),
    "object": st.just("file"),
    "bytes": st.integers(0, 2**40),
    "created_at": st.integers(0, 2**32),
    "filename": st.text(max_size=30),
    "purpose": st.sampled_from(["batch", "fine-tune", "ocr", "audio", "agentic_safety", ""]),
    "sample_type": st.sampled_from(["batch_result", "ocr_input", "new_kind"]),
    "source": st.sampled_from(["upload", "mistral", "repository", "later"]),
    "num_lines": st.one_of(st.none(), st.integers(0, 10**6)),
    "mimetype": st.one_of(st.none(), st.just("application/jsonl")),
    "signature": st.one_of(st.none(), st.text("0123456789abcdef", min_size=32, max_size=32)),
    "deleted": st.booleans(),
    "expires_at": st.one_of(st.none(), st.integers()),
    "visibility": st.sampled_from(["workspace", "user"]),
}


@st.composite
def file_objects(draw: st.DrawFn) -> object:
    """Mostly file-shaped dicts: each field good, junk, or missing; plus unknown fields."""
    obj: dict[str, object] = {}
    for name in FIELDS:
        choice = draw(st.sampled_from(["good", "good", "good", "junk", "missing"]))
        if choice == "good":
            obj[name] = draw(GOOD[name])
        elif choice == "junk":
            obj[name] = draw(json_values)
    obj.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    return obj


anything_file = st.one_of(file_objects(), json_values)


def check_remote_file(f: RemoteFile) -> None:
    """What every caller relies on once it holds a RemoteFile."""
    assert isinstance(f.id, str) and f.id
    assert type(f.bytes) is int and f.bytes >= 0
    assert type(f.created_at) is int
    assert isinstance(f.filename, str) and isinstance(f.purpose, str)
    for value in (f.sample_type, f.source, f.mimetype, f.signature):
        assert value is None or isinstance(value, str)
    assert f.num_lines is None or type(f.num_lines) is int
    assert f.deleted in (True, False)
    hash(f)  # frozen and usable as a key
    repr(f)


def dumps(value: object) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


# ----------------------------------------------------------------- RemoteFile.from_json


@FUZZ
@given(anything_file)
def test_from_json_gives_a_file_or_protocol_error(data: object) -> None:
    try:
        f = RemoteFile.from_json(data)
    except ProtocolError as exc:
        assert isinstance(exc.message, str) and exc.message
        return
    check_remote_file(f)
    assert isinstance(data, dict)
    assert f.id == data["id"] and f.filename == data["filename"]


@FUZZ
@given(st.fixed_dictionaries({k: GOOD[k] for k in FIELDS}))
def test_well_formed_file_objects_always_parse(data: dict[str, object]) -> None:
    f = RemoteFile.from_json(data)
    check_remote_file(f)
    assert (f.id, f.bytes, f.created_at, f.signature, f.expires_at, f.visibility) == (
        data["id"],
        data["bytes"],
        data["created_at"],
        data["signature"],
        data["expires_at"],
        data["visibility"],
    )
    assert f.extra == {"object": "file"}  # the fields the model keeps are not repeated


@FUZZ
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_float_created_at_never_escapes_as_value_error(created: float) -> None:
    data = {"id": "x", "bytes": 1, "created_at": created, "filename": "f", "purpose": "p"}
    try:
        f = RemoteFile.from_json(data)
    except ProtocolError:
        assert not math.isfinite(created)
        return
    assert f.created_at == min(max(int(created), 0), MAX_SECONDS)  # what a stat can carry


# ------------------------------------------------------------------------- error bodies


content_types = st.one_of(
    st.none(),
    st.sampled_from(["application/json", "text/html", "application/xml", "text/plain; charset=x"]),
    st.text(max_size=30),
)
error_bodies = st.one_of(
    st.binary(max_size=2000),
    json_values.map(dumps),
    file_objects().map(dumps),
    st.builds(
        lambda d, e: dumps({"detail": d, "errors": e, "message": d}),
        json_values,
        json_values,
    ),
    st.builds(
        lambda code, msg: f"<Error><Code>{code}</Code><Message>{msg}</Message></Error>".encode(
            "utf-8", "surrogatepass"
        ),
        st.text(max_size=20),
        st.text(max_size=200),
    ),
    st.integers(1, 200_000).map(lambda n: b"[" * n),  # nesting deeper than json can take
    st.integers(1, 5000).map(lambda n: b'{"detail": ' * n + b'"x"' + b"}" * n),
)


@FUZZ
@given(error_bodies, content_types, st.text(max_size=20))
def test_extract_message_is_always_a_bounded_str(
    body: bytes, content_type: str | None, reason: str
) -> None:
    message = extract_message(body, content_type, reason)
    assert isinstance(message, str)
    assert message  # a reason or a placeholder when the body says nothing
    assert len(message) <= 4 * 500


def test_extract_message_of_deep_nesting_is_the_raw_text() -> None:
    assert extract_message(b"[" * 100_000).startswith("[[[")
    nested = b'{"detail": ' * 3000 + b'"deep"' + b"}" * 3000
    assert isinstance(extract_message(nested), str)


# ------------------------------------------------- the client parsing whole answers


@st.composite
def answers(draw: st.DrawFn) -> tuple[int, dict[str, str], bytes]:
    """A status, headers and body, biased to the shapes the routes almost accept."""
    status = draw(st.one_of(st.just(200), st.integers(200, 599)))
    body = draw(
        st.one_of(
            st.binary(max_size=300),
            json_values.map(dumps),
            anything_file.map(dumps),
            st.builds(
                lambda items, total: dumps({"data": items, "object": "list", "total": total}),
                st.lists(anything_file, max_size=4),
                json_values,
            ),
            st.builds(lambda u: dumps({"url": u}), json_values),
            st.integers(1, 100_000).map(lambda n: b"[" * n),
        )
    )
    ctype = draw(st.sampled_from(["application/json", "text/html", "application/octet-stream"]))
    headers = {"content-type": ctype}
    if draw(st.booleans()):
        headers["retry-after"] = draw(st.sampled_from(["1", "soon", "-5", "1e999", "nan"]))
    return status, headers, body


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("fuzz")


async def call_everything(client: FilesClient, tmp_path: pathlib.Path) -> None:
    """Each parsing call once: a typed result or an ApiError, nothing else."""
    src = tmp_path / "up.bin"
    src.write_bytes(b"x" * 10)
    calls: list[tuple[Any, type | tuple[type, ...]]] = [
        (client.list_files(), FilePage),
        (client.list_all(page_size=2), list),
        (client.retrieve("some-id"), RemoteFile),
        (client.upload(src, filename="up.bin", purpose="batch"), RemoteFile),
        (client.delete("some-id"), type(None)),
        (client.signed_url("some-id"), object),
    ]
    for coro, expected in calls:
        try:
            result = await coro
        except ApiError as exc:
            assert isinstance(str(exc), str)
            continue
        assert isinstance(result, expected)
        if isinstance(result, RemoteFile):
            check_remote_file(result)
        if isinstance(result, FilePage):
            for f in result.files:
                check_remote_file(f)
            assert result.total is None or (type(result.total) is int and result.total >= 0)


@pytest.mark.logs_expected
@FUZZ
@given(answer=answers())
def test_client_over_mock_transport_gives_result_or_api_error(
    answer: tuple[int, dict[str, str], bytes], fuzz_dir: pathlib.Path
) -> None:
    status, headers, body = answer

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers, content=body)

    async def main() -> None:
        transport = httpx.MockTransport(handler)
        async with FilesClient("http://api.test", "k", retry=ONE_TRY, transport=transport) as c:
            await call_everything(c, fuzz_dir)

    trio.run(main)


class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers every request with the server's current canned answer."""

    server: _CannedServer

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        status, headers, body = self.server.answer
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:
        pass


class _CannedServer(http.server.ThreadingHTTPServer):
    answer: tuple[int, dict[str, str], bytes] = (200, {}, b"")
    daemon_threads = True


@pytest.fixture(scope="module")
def canned_server() -> Iterator[_CannedServer]:
    server = _CannedServer(("127.0.0.1", 0), _Canned)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@pytest.mark.logs_expected
@given(answer=answers())
def test_client_over_a_real_server_gives_result_or_api_error(
    answer: tuple[int, dict[str, str], bytes],
    canned_server: _CannedServer,
    fuzz_dir: pathlib.Path,
) -> None:
    status, _, _ = answer
    assume(status not in (204, 304) and not 100 <= status < 200)  # no body allowed there
    canned_server.answer = answer
    host, port = canned_server.server_address[:2]

    async def main() -> None:
        async with FilesClient(f"http://{host}:{port}", "k", retry=ONE_TRY, timeout=5.0) as c:
            await call_everything(c, fuzz_dir)

    trio.run(main)


# ------------------------------------------------------------------------ display names

any_text = st.one_of(
    st.text(),  # includes lone surrogates, NUL, controls
    st.text(alphabet=st.sampled_from(["/", "\x00", ".", "é", "\U0001f600", "\udcff", "a", " "])),
    st.text(min_size=200, max_size=2000),
    st.sampled_from(["", ".", "..", "/", "...", "./", "\x00", "." * 300, "/" * 300]),
)
ids = st.uuids().map(str)


def check_name(name: str) -> None:
    assert isinstance(name, str) and name
    encoded = name.encode("utf-8")  # raises on a lone surrogate
    assert len(encoded) <= NAME_MAX
    assert "/" not in name and "\x00" not in name
    assert name not in (".", "..")


@FUZZ
@given(any_text, ids)
def test_plain_name_is_always_a_valid_file_name(filename: str, file_id: str) -> None:
    name, must_tag = plain_name(filename, file_id)
    check_name(name)
    if must_tag:
        assert f" ({file_id[:8]})" in name
    if name == filename:
        assert not must_tag


@FUZZ
@given(any_text, ids, ids)
def test_with_id_keeps_the_tag_fits_and_tells_ids_apart(filename: str, id1: str, id2: str) -> None:
    name, _ = plain_name(filename, id1)
    tagged = with_id(name, id1)
    check_name(tagged)
    assert f" ({id1[:8]})" in tagged
    assume(id1[:8] != id2[:8])
    assert with_id(name, id2) != tagged
    # Tagging is stable: the same file always gets the same name.
    assert with_id(name, id1) == tagged


@FUZZ
@given(any_text)
def test_folder_name_is_always_a_valid_file_name(purpose: str) -> None:
    check_name(folder_name(purpose))


@FUZZ
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_", min_size=1, max_size=40))
def test_ordinary_purposes_are_their_own_folder_name(purpose: str) -> None:
    assume(purpose not in (".", ".."))
    assert folder_name(purpose) == purpose


def test_uuid_ids_give_distinct_tags() -> None:
    a, b = str(uuid.UUID(int=1 << 100)), str(uuid.UUID(int=2 << 100))
    assert a[:8] != b[:8]
    assert with_id("x.jsonl", a) != with_id("x.jsonl", b)
