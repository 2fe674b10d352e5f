"""The Files API client against the real in-process emulator (no mocks).

Each test talks HTTP to the emulator started by the ``emulator`` fixture in
its own nursery; admin routes (faults, request log, batch outputs) are used
to provoke the service behaviours the client must survive.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import pathlib
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import trio
from conftest import answer, answer_range, serve_asgi

from mistralfs.api import (
    ApiError,
    AuthError,
    FilesClient,
    GrowingFile,
    NotFound,
    ProtocolError,
    RateLimited,
    Rejected,
    RemoteFile,
    RetryPolicy,
    ServerError,
    StreamAbandoned,
    TooLarge,
    Unavailable,
    UrlExpired,
)
from mistralfs.api.errors import extract_message
from mistralfs.api.retry import parse_retry_after

FAST = RetryPolicy(max_attempts=4, base_delay=0.01, max_delay=0.05, total_budget=5.0)


# --------------------------------------------------------------------------- helpers


class Admin:
    """Raw access to the emulator's admin routes (same bearer auth)."""

    def __init__(self, url: str, api_key: str) -> None:
        self.http = httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
        )

    async def fault(self, **spec: Any) -> None:
        r = await self.http.post("/v1/_emulator/faults", json=spec)
        assert r.status_code < 300, r.text

    async def clear_faults(self) -> None:
        await self.http.delete("/v1/_emulator/faults")

    async def clear_requests(self) -> None:
        # The emulator records a request just after answering it: let earlier ones land.
        await trio.sleep(0.05)
        await self.http.delete("/v1/_emulator/requests")

    async def requests(self) -> list[dict[str, Any]]:
        await trio.sleep(0.05)
        r = await self.http.get("/v1/_emulator/requests")
        assert r.status_code == 200, r.text
        return r.json()["requests"]

    async def batch_output(self, content: bytes, sample_type: str) -> dict[str, Any]:
        r = await self.http.post(
            "/v1/_emulator/batch-outputs",
            files={"file": ("out.jsonl", content)},
            data={"sample_type": sample_type},
        )
        assert r.status_code < 300, r.text
        return r.json()


@pytest.fixture
async def admin(emulator: Any) -> AsyncIterator[Admin]:
    a = Admin(emulator.url, emulator.api_key)
    try:
        yield a
    finally:
        await a.http.aclose()


@pytest.fixture
async def client(emulator: Any) -> AsyncIterator[FilesClient]:
    async with FilesClient(emulator.url, emulator.api_key, retry=FAST) as c:
        yield c


def write(tmp_path: pathlib.Path, name: str, data: bytes) -> pathlib.Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


JSONL = b'{"custom_id": "0", "body": {"messages": []}}\n{"custom_id": "1", "body": {}}\n'


# ----------------------------------------------------------------- basic operations


async def test_upload_retrieve_and_every_field(client: FilesClient, tmp_path: pathlib.Path) -> None:
    before = int(time.time())
    src = write(tmp_path, "req.jsonl", JSONL)
    up = await client.upload(src, filename="requests.jsonl", purpose="batch")
    assert isinstance(up, RemoteFile)
    assert up.id
    assert up.bytes == len(JSONL)
    assert before - 2 <= up.created_at <= time.time() + 2
    assert up.filename == "requests.jsonl"
    assert up.purpose == "batch"
    assert up.sample_type == "batch_request"
    assert up.source == "upload"
    assert up.num_lines == 2
    assert up.mimetype == "application/jsonl"
    assert up.signature == hashlib.md5(JSONL).hexdigest()
    assert up.deleted is False
    assert up.extra.get("object") == "file"
    assert (up.expires_at, up.visibility) == (None, "workspace")

    got = await client.retrieve(up.id)
    assert got == up  # compare ignores ``extra`` (retrieve adds fields like deleted)
    assert got.deleted is False


async def test_filename_with_quotes_backslash_and_unicode_round_trips(
    client: FilesClient, tmp_path: pathlib.Path
) -> None:
    name = 'we"ird \\ näme ✓.jsonl'
    up = await client.upload(write(tmp_path, "x", JSONL), filename=name, purpose="batch")
    assert up.filename == name
    assert (await client.retrieve(up.id)).filename == name


async def test_download_and_delete(client: FilesClient, tmp_path: pathlib.Path) -> None:
    data = os.urandom(300_000)
    up = await client.upload(write(tmp_path, "blob.bin", data), filename="b.bin", purpose="batch")
    dest = tmp_path / "out.bin"
    n = await client.download(up.id, dest)
    assert n == len(data)
    assert dest.read_bytes() == data

    await client.delete(up.id)
    with pytest.raises(NotFound):
        await client.retrieve(up.id)
    assert up.id not in {f.id for f in await client.list_all(purpose="batch")}
    with pytest.raises(NotFound):
        await client.delete(up.id)


@pytest.mark.logs_expected
async def test_small_content_is_one_request_checked_against_the_listed_size(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    data = os.urandom(2048)
    up = await client.upload(write(tmp_path, "s.bin", data), filename="s.bin", purpose="batch")
    await admin.clear_requests()
    assert await client.content(up.id, 2048) == data
    assert await client.content(up.id, 2048) == data  # on the connection kept open
    assert client.idle_connections() == 1
    with pytest.raises(ProtocolError, match="expected 2000 bytes of content, got 2001 or more"):
        await client.content(up.id, 2000)  # never reads past what it expects
    with pytest.raises(ProtocolError, match="expected 3000 bytes of content, got 2048"):
        await client.content(up.id, 3000)
    await admin.fault(method="GET", path_prefix=f"/v1/files/{up.id}/content", status=503, times=1)
    assert await client.content(up.id, 2048) == data  # retried
    assert [r["status"] for r in await admin.requests()] == [200] * 4 + [503, 200]
    await client.delete(up.id)
    with pytest.raises(NotFound) as info:
        await client.content(up.id, 2048)
    assert up.id in info.value.url and "not found" in info.value.message.lower()


async def test_connections_the_server_closed_while_idle_are_not_used(
    nursery: trio.Nursery, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Servers close kept-alive connections that stay idle; a request sent on one would
    fail and then wait for the retry backoff (a quarter second) before going again."""
    import hypercorn.trio

    from mistralfs.emulator.app import create_app
    from mistralfs.emulator.server import EmulatorConfig, _hypercorn_config
    from mistralfs.emulator.storage import Storage

    config = EmulatorConfig(data_dir=tmp_path / "emu", api_key="k", port=0)
    storage = Storage(config.data_dir)
    hc = _hypercorn_config(config)
    hc.keep_alive_timeout = 0.2
    url = (await nursery.start(hypercorn.trio.serve, create_app(config, storage), hc))[0]
    data = os.urandom(5000)
    path = write(tmp_path, "idle.bin", data)
    try:
        async with FilesClient(url, "k", retry=FAST) as c:
            for _ in range(2):
                up = await c.upload(path, filename="idle.bin", purpose="batch")
                assert await c.content(up.id, len(data)) == data
                signed = await c.signed_url(up.id)
                assert await c.read_range_pieces(signed.url, 10, 100, 100) == [data[10:110]]
                await trio.sleep(0.5)  # the server closes every connection meanwhile
            assert dict(c.stats.requests) == {
                "POST /v1/files": 2, "GET /v1/files/{id}/content": 2,
                "GET /v1/files/{id}/url": 2, "storage": 2,
            }  # fmt: skip
    finally:
        storage.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_compressed_answers_are_decoded_and_ranges_ask_for_identity(
    nursery: trio.Nursery,
) -> None:
    """The API may compress its answers (a listing shrinks several times, which counts
    on a long link): they are decoded, and checked against sizes once decoded. A byte
    range of an encoded body would mean nothing, so range reads ask for identity."""
    import gzip

    asked = []
    content = b"hello" * 100

    async def compressing(scope: dict[str, Any], receive: Any, send: Any) -> None:
        wanted = dict(scope["headers"]).get(b"accept-encoding", b"")
        asked.append((scope["path"], wanted))
        body = (
            content
            if "/blob" in scope["path"] or scope["path"].endswith("/content")
            else (b'{"data": [], "total": 0}')
        )
        headers = [(b"content-type", b"application/octet-stream")]
        if b"gzip" in wanted:
            body = gzip.compress(body)
            headers.append((b"content-encoding", b"gzip"))
        elif "/blob" in scope["path"]:
            await answer_range(send, dict(scope["headers"])[b"range"].decode(), body)
            return
        await answer(send, 200, headers, body)

    url = await serve_asgi(nursery, compressing)
    async with FilesClient(url, "k", retry=FAST) as c:
        assert await c.content("f1", len(content)) == content
        assert (await c.list_files()).total == 0
        assert await c.read_range(f"{url}/blob?sig=1", 5, 10) == content[5:15]
    assert [wanted for _, wanted in asked] == [b"gzip, deflate", b"gzip, deflate", b"identity"]


async def test_content_handed_off_by_a_redirect_is_fetched_without_the_key(
    nursery: trio.Nursery,
) -> None:
    """The service may answer /content with a redirect to storage, on another origin."""
    seen: list[tuple[str, str | None]] = []

    async def storage(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["path"], dict(scope["headers"]).get(b"authorization")))
        await answer(send, 200, [(b"content-length", b"5")], b"hello")

    storage_url = await serve_asgi(nursery, storage)

    async def api(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["path"], dict(scope["headers"]).get(b"authorization")))
        if scope["path"] == "/v1/files":
            listing = b'{"object": "list", "data": [], "total": 0}'
            await answer(send, 200, [(b"content-type", b"application/json")], listing)
            return
        location = f"{storage_url}/blob/f1".encode()
        await answer(send, 302, [(b"location", location), (b"content-length", b"0")], b"")

    api_url = await serve_asgi(nursery, api)
    api_hit, storage_hit = ("/v1/files/f1/content", b"Bearer secret-key"), ("/blob/f1", None)
    async with FilesClient(api_url, "secret-key", retry=FAST) as c:
        assert await c.content("f1", 5) == b"hello"
        assert seen == [api_hit, storage_hit]
        assert await c.content("f1", 5) == b"hello"
        assert (await c.list_files()).total == 0
    assert seen == [api_hit, storage_hit, api_hit, storage_hit,
                    ("/v1/files", b"Bearer secret-key")]  # fmt: skip


async def test_not_found_everywhere(client: FilesClient, tmp_path: pathlib.Path) -> None:
    missing = "00000000-0000-4000-8000-000000000000"
    for call in (
        client.retrieve(missing),
        client.delete(missing),
        client.download(missing, tmp_path / "d"),
        client.signed_url(missing),
    ):
        with pytest.raises(NotFound) as info:
            await call
        assert info.value.status == 404
        assert missing in info.value.url


async def test_upload_streams_20mb_from_disk_with_md5_signature(
    client: FilesClient, tmp_path: pathlib.Path
) -> None:
    size = 20 * 1024 * 1024 + 123
    src = tmp_path / "big.bin"
    digest = hashlib.md5()
    with src.open("wb") as f:
        for _ in range(20):
            block = os.urandom(1024 * 1024)
            digest.update(block)
            f.write(block)
        tail = os.urandom(123)
        digest.update(tail)
        f.write(tail)

    tracemalloc.start()
    try:
        up = await client.upload(src, filename="big.bin", purpose="batch")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert up.bytes == size
    assert up.signature == digest.hexdigest()
    # Client and emulator together stay far below the file size: nothing read whole.
    assert peak < 10 * 1024 * 1024, peak


async def test_list_files_filters_and_repeated_keys(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    src = write(tmp_path, "a.jsonl", JSONL)
    a = await client.upload(src, filename="alpha.jsonl", purpose="batch")
    b = await client.upload(src, filename="beta.jsonl", purpose="fine-tune")
    out = await admin.batch_output(b'{"id": 1}\n', "batch_result")

    page = await client.list_files(purpose="batch")
    assert page.total == 2
    assert {f.id for f in page.files} == {a.id, out["id"]}

    page = await client.list_files(search="BET")
    assert [f.id for f in page.files] == [b.id]

    await admin.clear_requests()
    page = await client.list_files(
        sample_types=["batch_result", "instruct"], sources=["mistral", "upload"]
    )
    assert {f.id for f in page.files} == {b.id, out["id"]}
    (entry,) = [r for r in await admin.requests() if "sample_type" in r["query"]]
    query = parse_qs(entry["query"])
    assert query["sample_type"] == ["batch_result", "instruct"]
    assert query["source"] == ["mistral", "upload"]

    page = await client.list_files(mimetypes=["application/jsonl"], page_size=1)
    assert len(page.files) == 1 and page.total == 3

    page = await client.list_files(include_total=False, page_size=2, page=1)
    assert len(page.files) == 1


async def test_batch_output_and_unknown_purpose_tolerated(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    out = await admin.batch_output(b'{"custom_id": "0"}\n', "batch_result")
    f = await client.retrieve(out["id"])
    assert f.source == "mistral"
    assert f.sample_type == "batch_result"
    assert f.purpose == "batch"
    assert f.signature is None

    audio = await client.upload(
        write(tmp_path, "a.mp3", b"ID3" + os.urandom(100)), filename="a.mp3", purpose="audio"
    )
    assert audio.purpose == "audio"
    assert audio.id in {x.id for x in await client.list_all(purpose="audio")}


async def test_a_repository_file_is_listed_and_its_delete_refused_with_the_reason(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    r = await admin.http.post(
        "/v1/_emulator/files", files={"file": ("base.jsonl", JSONL)}, data={"purpose": "batch"}
    )
    repo_id = r.json()["id"]
    (listed,) = await client.list_all(purpose="batch")
    assert (listed.id, listed.source) == (repo_id, "repository")
    with pytest.raises(AuthError) as excinfo:  # a 403: EACCES in a mount
        await client.delete(repo_id)
    assert excinfo.value.status == 403
    assert "cannot be deleted" in str(excinfo.value)
    assert (await client.retrieve(repo_id)).id == repo_id
    safety = await client.upload(
        write(tmp_path, "s.jsonl", JSONL), filename="s.jsonl", purpose="agentic_safety"
    )
    assert [f.id for f in await client.list_all(purpose="agentic_safety")] == [safety.id]


def test_from_json_keeps_extra_fields_and_unknown_values() -> None:
    data = {
        "id": "f1",
        "object": "file",
        "bytes": 5,
        "created_at": 1749577090,
        "filename": "x",
        "purpose": "agentic_safety",
        "sample_type": "something_new",
        "source": "some_future_source",
        "num_lines": None,
        "mimetype": None,
        "signature": None,
        "visibility": "user",
        "expires_at": 123,
    }
    f = RemoteFile.from_json(data)
    assert f.purpose == "agentic_safety"
    assert f.sample_type == "something_new"
    assert f.source == "some_future_source"
    assert f.extra == {"object": "file"}
    assert (f.expires_at, f.visibility) == (123, "user")
    # Missing optional fields are fine.
    g = RemoteFile.from_json(
        {"id": "g", "bytes": 0, "created_at": 0, "filename": "", "purpose": "p"}
    )
    assert g.sample_type is None and g.num_lines is None
    for bad in (
        [],
        "x",
        {"id": "f1", "bytes": 5, "created_at": 1, "filename": "x"},
        {**data, "bytes": "5"},
        {**data, "bytes": True},
        {**data, "id": 7},
    ):
        with pytest.raises(ProtocolError):
            RemoteFile.from_json(bad)


# --------------------------------------------------------------------- refusals


async def test_rejected_carries_jsonl_error_with_line_number(
    client: FilesClient, tmp_path: pathlib.Path
) -> None:
    src = write(tmp_path, "bad.jsonl", b'{"messages": []}\nnot json at all\n')
    with pytest.raises(Rejected) as info:
        await client.upload(src, filename="bad.jsonl", purpose="fine-tune")
    err = info.value
    assert err.status in (400, 422)
    assert "Invalid file format" in err.message
    assert "line 2" in err.message
    assert str(err).startswith(f"POST /v1/files: {err.status} Invalid file format.")


async def test_ocr_rejects_unsupported_type_with_message(
    client: FilesClient, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(Rejected) as info:
        await client.upload(write(tmp_path, "a.txt", b"hello"), filename="a.txt", purpose="ocr")
    assert "mimetype" in info.value.message


async def test_too_large_from_emulator_with_small_limit(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    from mistralfs.emulator.server import EmulatorConfig, serve

    config = EmulatorConfig(
        data_dir=tmp_path / "small", api_key="small-key", port=0, max_file_size=64 * 1024
    )
    url = await nursery.start(serve, config)
    async with FilesClient(url, "small-key", retry=FAST) as c:
        ok = await c.upload(write(tmp_path, "ok", b"x" * 1000), filename="ok", purpose="batch")
        assert ok.bytes == 1000
        # Just over the limit: the unread rest of the body fits in socket buffers.
        big = write(tmp_path, "big", os.urandom(160 * 1024))
        with pytest.raises(TooLarge) as info:
            await c.upload(big, filename="big", purpose="batch")
        assert info.value.status == 413
        assert "too large" in info.value.message.lower()
        assert [f.id for f in await c.list_all()] == [ok.id]


async def test_a_refusal_sent_before_the_body_was_read_is_what_the_caller_hears(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    """A server that answers at once and closes, as a proxy with a size limit does,
    breaks the pipe under the body still being sent; its answer is still heard."""
    seen = []

    async def refuse_unread(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["method"])
        await answer(send, 413, [], b'{"detail": "Request Entity Too Large at the edge"}')

    url = await serve_asgi(nursery, refuse_unread)
    big = write(tmp_path, "big", os.urandom(16 * 1024 * 1024))
    async with FilesClient(url, "k", retry=FAST) as c:
        for _ in range(3):
            with pytest.raises(TooLarge, match="at the edge"):
                await c.upload(big, filename="big", purpose="batch")
    assert seen == ["POST"] * 3  # a refusal is final: never sent again


async def test_too_large_refused_locally_before_sending(
    emulator: Any, admin: Admin, tmp_path: pathlib.Path
) -> None:
    await admin.clear_requests()
    async with FilesClient(emulator.url, emulator.api_key, retry=FAST, max_upload_bytes=1000) as c:
        with pytest.raises(TooLarge) as info:
            await c.upload(write(tmp_path, "b", b"x" * 1001), filename="b", purpose="batch")
    assert info.value.status is None
    assert not [r for r in await admin.requests() if r["method"] == "POST"]


async def test_auth_error_with_wrong_key(emulator: Any) -> None:
    async with FilesClient(emulator.url, "wrong-key", retry=FAST) as c:
        with pytest.raises(AuthError) as info:
            await c.check_auth()
        assert info.value.status == 401
        assert "wrong-key" not in str(info.value) + repr(info.value)
        with pytest.raises(AuthError):
            await c.retrieve("whatever")
    async with FilesClient(emulator.url, emulator.api_key, retry=FAST) as c:
        await c.check_auth()  # the right key passes


# ------------------------------------------------------------- signed URLs & ranges


async def test_signed_url_ranged_reads_exact_slices(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    data = os.urandom(200_000)
    up = await client.upload(write(tmp_path, "d", data), filename="d.bin", purpose="batch")
    t0 = time.time()
    signed = await client.signed_url(up.id, expiry_hours=2)
    assert t0 + 2 * 3600 - 5 <= signed.expires_at <= time.time() + 2 * 3600
    assert "sig=" not in repr(signed)

    await admin.clear_requests()
    cases = [(0, 1), (0, 4096), (12345, 777), (199_990, 10), (199_990, 100), (0, 200_000)]
    for start, length in cases:
        got = await client.read_range(signed.url, start, length)
        assert got == data[start : start + length], (start, length)
    assert await client.read_range(signed.url, 200_000, 10) == b""
    assert await client.read_range(signed.url, 5, 0) == b""

    storage = [r for r in await admin.requests() if r["path"] == urlsplit(signed.url).path]
    assert len(storage) == len(cases) + 1
    assert all(r["range"] and r["range"].startswith("bytes=") for r in storage)
    assert {r["status"] for r in storage[: len(cases)]} == {206}


async def test_tampered_signed_url_is_url_expired_and_redacted(
    client: FilesClient, tmp_path: pathlib.Path
) -> None:
    up = await client.upload(write(tmp_path, "d", b"abc" * 100), filename="d", purpose="batch")
    signed = await client.signed_url(up.id)
    tampered = signed.url.replace("sig=", "sig=00", 1)
    with pytest.raises(UrlExpired) as info:
        await client.read_range(tampered, 0, 10)
    err = info.value
    assert err.status == 403
    assert "?" not in err.url and "sig=" not in str(err) + repr(err)
    assert err.message  # the XML <Message> (or code) was extracted

    await client.delete(up.id)
    with pytest.raises(NotFound):
        await client.read_range(signed.url, 0, 10)


async def test_range_read_never_sends_api_key(client: FilesClient, emulator: Any) -> None:
    """Even a signed URL on the API's own origin gets no Authorization header."""
    seen: list[dict[str, str]] = []
    body = b"0123456789" * 10

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        seen.append({"path": scope["path"], **headers})
        if scope["path"].startswith("/v1/files"):
            await answer(send, 200, [], b'{"data": [], "total": 0}')
        else:
            await answer_range(send, headers["range"], body)

    async with trio.open_nursery() as nursery:
        url = await serve_asgi(nursery, app)
        async with FilesClient(url, emulator.api_key, retry=FAST) as c:
            assert await c.read_range(f"{url}/storage/x?sig=s3cret", 10, 5) == body[10:15]
            await c.check_auth()
            # a "foreign" host: same server reached by another name is another origin
            foreign = url.replace("127.0.0.1", "localhost")
            assert await c.read_range(f"{foreign}/blob?sig=s", 0, 3) == body[:3]
        nursery.cancel_scope.cancel()

    storage = [h for h in seen if not h["path"].startswith("/v1/")]
    api = [h for h in seen if h["path"].startswith("/v1/")]
    assert len(storage) == 2 and len(api) == 1
    assert all("authorization" not in h for h in storage)
    assert api[0]["authorization"] == f"Bearer {emulator.api_key}"


def test_the_key_goes_to_the_api_origin_only() -> None:
    from mistralfs.api.calls import _ServerOnlyBearerAuth

    auth = _ServerOnlyBearerAuth("sk", ("https", "api.example", 443))

    def sent(url: str) -> str | None:
        request = httpx.Request("GET", url)
        [signed] = list(auth.auth_flow(request))
        return signed.headers.get("authorization")

    for url in (
        "https://api.example/v1/files/1/content",
        "https://API.example:443/v1/files?page=2",
        "https://api.example?x=1",
    ):
        assert sent(url) == "Bearer sk", url
    for elsewhere in (
        "http://api.example/v1/files",  # not over TLS
        "https://api.example:8443/v1/files",
        "https://api.example.evil/v1/files",
        "https://blob.example/api.example/v1/files",
    ):
        assert sent(elsewhere) is None, elsewhere
    assert "sk" not in repr(auth)


async def test_signed_url_never_logged_with_query(
    client: FilesClient, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    up = await client.upload(write(tmp_path, "d", b"abc" * 10), filename="d", purpose="batch")
    signed = await client.signed_url(up.id)
    caplog.set_level(logging.DEBUG)
    await client.read_range(signed.url, 0, 5)
    with pytest.raises(UrlExpired):
        await client.read_range(signed.url + "0", 0, 5)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "/storage/" in text  # the request was logged ...
    assert "sig=" not in text  # ... without its signature


# ----------------------------------------------------------------------- retries


@pytest.mark.logs_expected
async def test_503_twice_then_success(client: FilesClient, admin: Admin) -> None:
    await admin.clear_requests()
    await admin.fault(method="GET", path_prefix="/v1/files", status=503, times=2)
    page = await client.list_files()
    assert page.total == 0
    hits = [r for r in await admin.requests() if r["path"] == "/v1/files"]
    assert [r["status"] for r in hits] == [503, 503, 200]


@pytest.mark.logs_expected
async def test_429_retry_after_is_honoured(client: FilesClient, admin: Admin) -> None:
    await admin.fault(method="GET", path_prefix="/v1/files", status=429, times=1, retry_after=0.6)
    t0 = trio.current_time()
    await client.list_files()
    assert trio.current_time() - t0 >= 0.6


@pytest.mark.logs_expected
async def test_retries_exhausted_raise_unavailable_within_budget(
    emulator: Any, admin: Admin, tmp_path: pathlib.Path
) -> None:
    policy = RetryPolicy(max_attempts=50, base_delay=0.05, max_delay=0.2, total_budget=1.0)
    await admin.fault(method=None, path_prefix="/v1/files", status=503, times=None)
    async with FilesClient(emulator.url, emulator.api_key, retry=policy) as c:
        t0 = trio.current_time()
        with pytest.raises(ServerError) as info:
            await c.list_files()
        assert trio.current_time() - t0 < 2.0
        assert isinstance(info.value, Unavailable)
        assert info.value.status == 503

        # An upload is retried from the file on disk each time, and gives up too.
        src = write(tmp_path, "u", JSONL)
        with pytest.raises(Unavailable):
            await c.upload(src, filename="u", purpose="batch")
    await admin.clear_faults()

    await admin.fault(method="GET", path_prefix="/v1/files", status=429, times=None)
    small = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.01, total_budget=5.0)
    async with FilesClient(emulator.url, emulator.api_key, retry=small) as c:
        with pytest.raises(RateLimited) as rinfo:
            await c.list_files()
    assert "Rate limit exceeded" in rinfo.value.message
    await admin.clear_faults()


@pytest.mark.logs_expected
async def test_upload_retry_reopens_file_and_succeeds(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    await admin.fault(method="POST", path_prefix="/v1/files", status=502, times=2)
    data = os.urandom(100_000)
    up = await client.upload(write(tmp_path, "r", data), filename="r.bin", purpose="batch")
    assert up.bytes == len(data)
    assert up.signature == hashlib.md5(data).hexdigest()
    assert len(await client.list_all()) == 1  # one file, not three


@pytest.mark.logs_expected
async def test_connect_error_to_closed_port_is_unavailable_quickly() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens on ``port`` now.
    policy = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02, total_budget=2.0)
    async with FilesClient(f"http://127.0.0.1:{port}", "k", retry=policy) as c:
        t0 = trio.current_time()
        with pytest.raises(Unavailable) as info:
            await c.check_auth()
        assert trio.current_time() - t0 < 2.0
    assert info.value.status is None
    assert "Connect" in info.value.message


@pytest.mark.logs_expected
async def test_read_timeout_is_retried_then_unavailable(emulator: Any, admin: Admin) -> None:
    await admin.fault(method="GET", path_prefix="/v1/files", status=200, delay=2.0, times=None)
    policy = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.01, total_budget=5.0)
    async with FilesClient(emulator.url, emulator.api_key, retry=policy, timeout=0.2) as c:
        with pytest.raises(Unavailable) as info:
            await c.list_files()
    assert "Timeout" in info.value.message
    await admin.clear_faults()


@pytest.mark.logs_expected
async def test_non_json_200_is_retried_then_unavailable(client: FilesClient, admin: Admin) -> None:
    """A proxy's error page on a read is asked again; only if it persists is it an error."""
    await admin.fault(method="GET", path_prefix="/v1/files", status=200, body="<html>1</html>")
    assert (await client.list_files()).files == []  # the second attempt got real JSON
    await admin.fault(
        method="GET", path_prefix="/v1/files", status=200, body="<html>oops</html>", times=None
    )
    with pytest.raises(Unavailable) as info:
        await client.list_files()
    assert "expected JSON" in info.value.message
    await admin.clear_faults()
    # JSON of the wrong shape is a ProtocolError, not retried.
    await admin.fault(method="GET", path_prefix="/v1/files", status=200, body="[1, 2]", times=1)
    with pytest.raises(ProtocolError):
        await client.list_files()


# --------------------------------------------------------------------- list_all


async def test_list_all_fetches_pages_concurrently_once_each(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    n = 250
    for i in range(n):
        await admin.batch_output(f'{{"i": {i}}}\n'.encode(), "batch_result")
    expected: list[str] = []
    for page in range(13):
        expected += [f.id for f in (await client.list_files(page=page, page_size=20)).files]
    assert len(expected) == n

    await admin.clear_requests()
    # Every listing request takes 0.3 s: 13 pages one by one would take 3.9 s.
    await admin.fault(method="GET", path_prefix="/v1/files", status=None, delay=0.3, times=None)
    t0 = trio.current_time()
    files = await client.list_all(page_size=20, max_parallel=8)
    elapsed = trio.current_time() - t0
    await admin.clear_faults()

    assert [f.id for f in files] == expected
    pages = [
        int(parse_qs(r["query"])["page"][0])
        for r in await admin.requests()
        if r["path"] == "/v1/files"
    ]
    assert sorted(pages) == list(range(13))  # each page exactly once
    assert pages[0] == 0
    assert elapsed < 1.6, elapsed  # page 0, then 12 pages in two waves of <= 8


async def test_list_all_of_one_full_page_is_one_request(client: FilesClient, admin: Admin) -> None:
    for i in range(5):
        await admin.batch_output(f'{{"i": {i}}}\n'.encode(), "batch_result")
    await admin.clear_requests()
    assert len(await client.list_all(page_size=5)) == 5
    assert len([r for r in await admin.requests() if r["path"] == "/v1/files"]) == 1


async def test_list_all_without_total_walks_until_short_page(
    client: FilesClient, admin: Admin
) -> None:
    for i in range(7):
        await admin.batch_output(f'{{"i": {i}}}\n'.encode(), "batch_error")
    everything = await client.list_all(page_size=3)
    assert len(everything) == 7 and len({f.id for f in everything}) == 7
    assert all(f.sample_type == "batch_error" for f in everything)
    assert await client.list_all(purpose="ocr") == []


async def test_a_listing_without_total_is_read_page_by_page_to_a_short_page(
    client: FilesClient, admin: Admin
) -> None:
    """A service that leaves `total` out: pages are read one by one until a short one;
    only page 0 asks for the total, the others say include_total=false."""
    for i in range(7):
        await admin.batch_output(f'{{"i": {i}}}\n'.encode(), "batch_result")
    # The emulator answers include_total=false with a null total, which the client keeps.
    page = await client.list_files(page_size=3, include_total=False)
    assert page.total is None and len(page.files) == 3
    lie = {"records": [], "total": False}  # the real listing, without its total
    await admin.fault(method="GET", path_prefix="/v1/files", status=None, lie=lie, times=None)
    assert (await client.list_files(page_size=3)).total is None
    await admin.clear_requests()
    everything = await client.list_all(page_size=3)
    assert len({f.id for f in everything}) == 7
    queries = [parse_qs(r["query"]) for r in await admin.requests() if r["path"] == "/v1/files"]
    assert [q["page"] for q in queries] == [["0"], ["1"], ["2"]]
    assert [q["include_total"] for q in queries] == [["true"], ["false"], ["false"]]


async def test_expiry_and_visibility_are_sent_only_when_given(
    client: FilesClient, tmp_path: pathlib.Path
) -> None:
    src = write(tmp_path, "req.jsonl", JSONL)
    before = int(time.time())
    short = await client.upload(src, filename="a.jsonl", purpose="batch", expiry=2,
                                visibility="user")  # fmt: skip
    assert short.visibility == "user"
    assert short.expires_at is not None
    assert before + 2 * 3600 <= short.expires_at <= time.time() + 2 * 3600 + 2
    plain = await client.upload(src, filename="b.jsonl", purpose="batch")
    assert (plain.expires_at, plain.visibility) == (None, "workspace")
    listed = {f.id: f for f in await client.list_all()}
    assert (listed[short.id].expires_at, listed[short.id].visibility) == (
        short.expires_at,
        "user",
    )
    assert (await client.retrieve(short.id)).expires_at == short.expires_at

    fields: list[dict[str, str]] = []

    async def form_fields(scope: Any, receive: Any, send: Any) -> None:
        """Records the text parts of each upload (the emulator's own parser reads them)."""
        from starlette.requests import Request

        from mistralfs.emulator.upload import receive_upload

        form = await receive_upload(Request(scope, receive), tmp_path / "got", 1 << 20)
        fields.append(form.fields)
        answer_fields = {"id": f"f{len(fields)}", "object": "file", "bytes": len(JSONL)}
        answer_fields |= {"created_at": before, "filename": "c.jsonl", "purpose": "batch"}
        body = json.dumps(answer_fields)
        await answer(send, 200, [(b"content-type", b"application/json")], body.encode())

    async with trio.open_nursery() as nursery:
        url = await serve_asgi(nursery, form_fields)
        async with FilesClient(url, "k", retry=FAST) as other:
            await other.upload(src, filename="c.jsonl", purpose="batch")
            await other.upload(src, filename="c.jsonl", purpose="batch", expiry=5)
            await other.upload(src, filename="c.jsonl", purpose="batch", visibility="user")
        nursery.cancel_scope.cancel()
    assert fields == [
        {"purpose": "batch"},
        {"purpose": "batch", "expiry": "5"},
        {"purpose": "batch", "visibility": "user"},
    ]


async def test_a_growing_upload_sends_expiry_and_visibility(
    client: FilesClient, tmp_path: pathlib.Path
) -> None:
    path = write(tmp_path, "grow.bin", b"")
    growing = GrowingFile()
    upload = client.growing_upload(
        path, growing, filename="grow.bin", purpose="batch", expiry=1, visibility="user"
    )
    async with trio.open_nursery() as nursery:
        result: list[RemoteFile] = []
        nursery.start_soon(lambda: _collect(upload.run(), result))
        await feed(path, growing, [b"x" * 1000])
        growing.finish(path.stat().st_size)
    (stored,) = result
    assert stored.visibility == "user" and stored.expires_at is not None


# ------------------------------------------------------------------ error bodies


def test_extract_message_shapes() -> None:
    assert extract_message(b'{"detail": "Unauthorized"}') == "Unauthorized"
    assert extract_message(b'{"message": "Unauthorized", "request_id": "r"}') == "Unauthorized"
    validation = {
        "detail": [
            {"type": "missing", "loc": ["body", "purpose"], "msg": "Field required"},
            {"type": "x", "loc": ["query", "page"], "msg": "bad int"},
        ]
    }
    assert (
        extract_message(json.dumps(validation).encode())
        == "body.purpose: Field required; query.page: bad int"
    )
    jsonl = {
        "detail": "Invalid file format.",
        "description": "Some lines are invalid.",
        "errors": [
            {"message": "line contains invalid json: x", "line_number": 1},
            {"message": "missing messages", "line_number": 4},
        ],
    }
    assert extract_message(json.dumps(jsonl).encode()) == (
        "Invalid file format. Some lines are invalid. "
        "line 1: line contains invalid json: x line 4: missing messages"
    )
    ocr = {"detail": "Invalid file format.", "message": "Received file with mimetype x"}
    assert extract_message(json.dumps(ocr).encode()) == (
        "Invalid file format. Received file with mimetype x"
    )
    xml = (
        b'<?xml version="1.0"?><Error><Code>AuthenticationFailed</Code>'
        b"<Message>Signature did not match.\nRequestId:1</Message></Error>"
    )
    assert extract_message(xml) == "AuthenticationFailed: Signature did not match. RequestId:1"
    raw = extract_message(b"x" * 5000)
    assert 400 <= len(raw) <= 500
    assert extract_message(b"", reason="Bad Gateway") == "Bad Gateway"
    assert extract_message(b"\xff\xfe not utf8").endswith("not utf8")


def test_error_str_and_url_have_no_query() -> None:
    err = Rejected(
        "Invalid file format. line 1: bad",
        status=400,
        method="POST",
        url="https://api.mistral.ai/v1/files?x=1",
    )
    assert str(err) == "POST /v1/files: 400 Invalid file format. line 1: bad"
    assert err.url == "https://api.mistral.ai/v1/files"
    exp = UrlExpired("nope", status=403, method="GET", url="https://b.example/c/d?sig=SECRET")
    assert "SECRET" not in str(exp) + repr(exp) + exp.url
    assert isinstance(exp, ApiError) and not isinstance(exp, AuthError)


def test_retry_after_parsing_and_backoff_bounds() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    now = 1_700_000_000.0
    date = "Tue, 14 Nov 2023 22:13:30 GMT"  # now + 10 s
    assert parse_retry_after(date, now=now) == pytest.approx(10.0)
    policy = RetryPolicy(base_delay=0.25, max_delay=8.0)
    for attempt in range(1, 12):
        delays = [policy.backoff(attempt) for _ in range(50)]
        assert all(0 <= d <= min(8.0, 0.25 * 2 ** (attempt - 1)) for d in delays)


async def test_bad_server_url_refused() -> None:
    with pytest.raises(ValueError):
        FilesClient("ftp://example.com", "k")
    async with FilesClient("https://api.mistral.ai/v1/", "k") as c:
        assert c.server_url == "https://api.mistral.ai"


# ------------------------------------------------- retried uploads store one file


class SpoilUploadAnswers:
    """The real emulator app, with the answers to the first ``times`` uploads spoiled.

    The upload itself runs to completion in the real app (the file is stored);
    only what reaches the client changes: ``cut`` sends half the body and then
    drops the connection, ``502`` answers a gateway error, ``garbage`` a 200
    that is not JSON, ``stall`` never answers.
    """

    def __init__(self, app: Any, mode: str, times: int = 1) -> None:
        self.app = app
        self.mode = mode
        self.times = times
        self.posts = 0
        self.stored: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) != ("POST", "/v1/files"):
            await self.app(scope, receive, send)
            return
        self.posts += 1
        if self.times <= 0:
            await self.app(scope, receive, send)
            return
        self.times -= 1
        messages: list[dict[str, Any]] = []

        async def capture(message: dict[str, Any]) -> None:
            messages.append(message)

        await self.app(scope, receive, capture)
        start = messages[0]
        body = b"".join(m.get("body", b"") for m in messages[1:])
        assert start["status"] == 200, body
        self.stored.append(json.loads(body)["id"])
        if self.mode == "cut":
            await send(start)
            await send(
                {"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True}
            )
            raise RuntimeError("connection lost mid-answer (test)")
        if self.mode == "502":
            await send({"type": "http.response.start", "status": 502, "headers": []})
            await send({"type": "http.response.body", "body": b"<html>Bad Gateway</html>"})
        elif self.mode == "garbage":
            headers = [(b"content-type", b"text/html")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": b"<html>upstream</html>"})
        elif self.mode == "stall":
            await trio.sleep_forever()
        else:
            raise AssertionError(self.mode)


async def serve_spoiled(
    nursery: trio.Nursery, tmp_path: pathlib.Path, mode: str, times: int = 1
) -> tuple[str, SpoilUploadAnswers]:
    """Serve the real emulator app (fresh data dir) behind SpoilUploadAnswers."""
    import hypercorn.trio

    from mistralfs.emulator.app import create_app
    from mistralfs.emulator.server import EmulatorConfig, _hypercorn_config
    from mistralfs.emulator.storage import Storage

    config = EmulatorConfig(data_dir=tmp_path / f"emu-{mode}", api_key="k", port=0)
    storage = Storage(config.data_dir)
    wrapper = SpoilUploadAnswers(create_app(config, storage), mode, times)

    async def run(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as inner:
                binds = await inner.start(hypercorn.trio.serve, wrapper, _hypercorn_config(config))
                task_status.started(binds[0])
        finally:
            storage.close()

    url = await nursery.start(run)
    return url, wrapper


@pytest.mark.logs_expected
@pytest.mark.parametrize("mode", ["cut", "502", "garbage", "stall"])
async def test_upload_whose_answer_was_lost_is_not_stored_twice(
    nursery: trio.Nursery, tmp_path: pathlib.Path, mode: str
) -> None:
    url, server = await serve_spoiled(nursery, tmp_path, mode)
    data = os.urandom(50_000)
    async with FilesClient(url, "k", retry=FAST, timeout=0.5) as c:
        t0 = time.time()
        up = await c.upload(write(tmp_path, "lost", data), filename="lost.bin", purpose="batch")
        files = await c.list_all()
    assert server.posts == 1  # found, not sent again
    assert [f.id for f in files] == server.stored == [up.id]
    assert up.bytes == len(data)
    assert up.signature == hashlib.md5(data).hexdigest()
    assert up.filename == "lost.bin" and up.purpose == "batch"
    assert up.created_at >= int(t0) - 1


@pytest.mark.logs_expected
async def test_bytes_changed_after_a_lost_attempt_are_not_vouched_for(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    """The MD5 is taken from the file only if it is still the version the attempt sent."""
    url, server = await serve_spoiled(nursery, tmp_path, "cut")
    src = write(tmp_path, "f", b"a" * 1000)

    def rewrite_once_sent(sent: int) -> None:
        if sent == 1000 and not rewritten:  # attempt 1 is out: change the file's bytes
            rewritten.append(True)
            src.write_bytes(b"b" * 1000)
            os.utime(src, ns=(0, 0))

    rewritten: list[bool] = []

    async with FilesClient(url, "k", retry=FAST) as c:
        up = await c.upload(src, filename="f.bin", purpose="batch", progress=rewrite_once_sent)
        files = await c.list_all()
    assert server.posts == 2  # not taken for the stored copy of the old bytes
    assert up.signature == hashlib.md5(b"b" * 1000).hexdigest()
    assert sorted(f.id for f in files) == sorted([*server.stored, up.id])


@pytest.mark.logs_expected
async def test_upload_lost_twice_then_answered_keeps_the_first_copy(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    # The look-up after the first loss finds the file at once; nothing is sent twice.
    url, server = await serve_spoiled(nursery, tmp_path, "cut", times=2)
    async with FilesClient(url, "k", retry=FAST) as c:
        up = await c.upload(write(tmp_path, "x", JSONL), filename="x.jsonl", purpose="batch")
        assert [f.id for f in await c.list_all()] == [up.id]
    assert server.posts == 1 and server.stored == [up.id]


@pytest.mark.logs_expected
async def test_upload_503_before_storing_is_sent_again_once(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    await admin.clear_requests()
    await admin.fault(method="POST", path_prefix="/v1/files", status=503, times=1)
    up = await client.upload(write(tmp_path, "a", JSONL), filename="a.jsonl", purpose="batch")
    assert [f.id for f in await client.list_all()] == [up.id]
    calls = [(r["method"], r["status"]) for r in await admin.requests() if r["path"] == "/v1/files"]
    # the refused attempt, look-up (nothing new), the real upload, our list_all
    assert calls == [("POST", 503), ("GET", 200), ("POST", 200), ("GET", 200)]


async def test_an_answered_upload_makes_one_request(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    """Dedupe costs nothing until an attempt fails: no listing before, no second call."""
    await admin.clear_requests()
    big = os.urandom(3 * 1024 * 1024 + 5)  # several chunks, read in a worker thread
    for name, data in (("small.jsonl", JSONL), ("big.bin", big)):
        up = await client.upload(write(tmp_path, name, data), filename=name, purpose="batch")
        assert up.bytes == len(data) and up.signature == hashlib.md5(data).hexdigest()
    assert [(r["method"], r["path"]) for r in await admin.requests()] == [
        ("POST", "/v1/files"),
        ("POST", "/v1/files"),
    ]


@pytest.mark.logs_expected
async def test_identical_earlier_file_is_not_taken_for_ours(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    """Same name, purpose, size and MD5, created within the clock-skew window: still not ours."""
    src = write(tmp_path, "same", JSONL)
    earlier = await client.upload(src, filename="same.jsonl", purpose="batch")
    await admin.fault(method="POST", path_prefix="/v1/files", status=503, times=1)
    ours = await client.upload(src, filename="same.jsonl", purpose="batch")
    assert ours.id != earlier.id
    assert ours.signature == earlier.signature and ours.bytes == earlier.bytes
    assert abs(ours.created_at - earlier.created_at) <= 5  # only having seen it tells them apart
    assert {f.id for f in await client.list_all()} == {earlier.id, ours.id}


@pytest.mark.logs_expected
async def test_identical_file_from_elsewhere_seen_in_a_listing_is_not_taken_for_ours(
    emulator: Any, admin: Admin, tmp_path: pathlib.Path
) -> None:
    """Another program stored the same bytes under the same name; we listed it before."""
    src = write(tmp_path, "same", JSONL)
    async with FilesClient(emulator.url, emulator.api_key, retry=FAST) as other:
        theirs = await other.upload(src, filename="same.jsonl", purpose="batch")
    async with FilesClient(emulator.url, emulator.api_key, retry=FAST) as c:
        assert theirs.id in {f.id for f in await c.list_all(purpose="batch")}
        await admin.fault(method="POST", path_prefix="/v1/files", status=503, times=1)
        ours = await c.upload(src, filename="same.jsonl", purpose="batch")
        assert ours.id != theirs.id
        assert {f.id for f in await c.list_all()} == {theirs.id, ours.id}


@pytest.mark.logs_expected
async def test_identical_earlier_file_and_lost_answer_picks_the_new_one(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    url, server = await serve_spoiled(nursery, tmp_path, "cut", times=0)
    src = write(tmp_path, "same", JSONL)
    async with FilesClient(url, "k", retry=FAST) as c:
        earlier = await c.upload(src, filename="same.jsonl", purpose="batch")
        other = await c.upload(src, filename="other.jsonl", purpose="batch")  # other name
        elsewhere = await c.upload(src, filename="same.jsonl", purpose="fine-tune")  # other purpose
        server.times = 1
        ours = await c.upload(src, filename="same.jsonl", purpose="batch")
        ids = {f.id for f in await c.list_all()}
    assert ours.id == server.stored[-1]
    assert ours.id not in {earlier.id, other.id, elsewhere.id}
    assert ids == {earlier.id, other.id, elsewhere.id, ours.id}
    assert server.posts == 4


async def test_upload_without_dedupe_makes_no_listing_call(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    await admin.clear_requests()
    await client.upload(
        write(tmp_path, "n", JSONL), filename="n.jsonl", purpose="batch", dedupe=False
    )
    assert [r["method"] for r in await admin.requests()] == ["POST"]


# ------------------------------------------------------------- bounded by the budget


async def stalling_server(nursery: trio.Nursery) -> str:
    """A TCP server that accepts connections and reads them, but never answers."""
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, host="127.0.0.1"), _swallow, 0
    )
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def _swallow(stream: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await stream.receive_some(65536):
            pass


async def test_stalled_server_gives_up_within_budget(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    url = await stalling_server(nursery)
    policy = RetryPolicy(max_attempts=50, base_delay=0.01, max_delay=0.05, total_budget=1.0)
    # The configured read timeout (30 s) is far longer than the budget.
    async with FilesClient(url, "k", retry=policy, timeout=30.0) as c:
        for call in (
            c.list_files(),
            c.retrieve("f"),
            c.upload(write(tmp_path, "s", JSONL), filename="s", purpose="batch"),
            c.upload(write(tmp_path, "s", JSONL), filename="s", purpose="batch", dedupe=False),
            c.download("f", tmp_path / "d"),
        ):
            t0 = trio.current_time()
            with pytest.raises(Unavailable) as info:
                await call
            elapsed = trio.current_time() - t0
            assert 0.9 <= elapsed < 1.5, (info.value, elapsed)
            assert "Timeout" in info.value.message


async def test_retry_after_beyond_budget_gives_up_at_once(emulator: Any, admin: Admin) -> None:
    await admin.fault(method="GET", path_prefix="/v1/files", status=429, retry_after=30, times=None)
    policy = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05, total_budget=2.0)
    async with FilesClient(emulator.url, emulator.api_key, retry=policy) as c:
        t0 = trio.current_time()
        with pytest.raises(RateLimited) as info:
            await c.list_files()
        assert trio.current_time() - t0 < 0.5
    assert "1 attempt" in info.value.message
    await admin.clear_faults()


@pytest.mark.logs_expected
@pytest.mark.parametrize("kind", ["lost", "badjson", "cut"])
async def test_emulator_fault_after_storing_gives_one_file(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path, kind: str
) -> None:
    """The emulator's own after-store faults, on every upload: found, never sent twice."""
    r = await admin.http.post(
        "/v1/_emulator/faults", json={"random": f"seed=1;route=upload;rate=1;kinds={kind}"}
    )
    assert r.status_code < 300, r.text
    await admin.clear_requests()
    data = os.urandom(10_000)
    up = await client.upload(write(tmp_path, "f", data), filename="f.bin", purpose="batch")
    await admin.clear_faults()
    assert [f.id for f in await client.list_all()] == [up.id]
    assert up.signature == hashlib.md5(data).hexdigest()
    posts = [r for r in await admin.requests() if r["method"] == "POST"]
    assert len(posts) == 1


@pytest.mark.logs_expected
async def test_seeded_upload_faults_leave_exactly_one_file_each(
    emulator: Any, admin: Admin, tmp_path: pathlib.Path
) -> None:
    spec = "seed=3;route=upload;rate=0.5;kinds=lost,reset,503,cut,badjson,stall:0.3"
    r = await admin.http.post("/v1/_emulator/faults", json={"random": spec})
    assert r.status_code < 300, r.text
    policy = RetryPolicy(max_attempts=10, base_delay=0.01, max_delay=0.05, total_budget=20.0)
    uploaded: dict[str, bytes] = {}
    async with FilesClient(emulator.url, emulator.api_key, retry=policy, timeout=5.0) as c:
        for i in range(16):
            data = os.urandom(1000 + i)
            up = await c.upload(write(tmp_path, f"s{i}", data), filename=f"s{i}", purpose="batch")
            assert up.filename == f"s{i}" and up.signature == hashlib.md5(data).hexdigest()
            uploaded[up.id] = data
        history = (await admin.http.get("/v1/_emulator/faults")).json()["random"]["history"]
        await admin.clear_faults()
        remote = await c.list_all()
    assert len(uploaded) == 16
    assert sorted(f.id for f in remote) == sorted(uploaded)  # no duplicates, none missing
    # The seed really did lose stored uploads (and refuse others) along the way.
    kinds = {h["kind"] for h in history}
    assert {"lost", "badjson", "cut"} & kinds and {"reset", "503"} & kinds, kinds


# ------------------------------------------------- uploads while the file is written


async def feed(path: pathlib.Path, growing: GrowingFile, pieces: list[bytes]) -> None:
    """Append `pieces` to `path` one by one, reporting each as a writer does."""
    with open(path, "ab") as f:  # noqa: ASYNC230 (a few small local writes)
        for piece in pieces:
            f.write(piece)
            f.flush()
            growing.grew(f.tell())
            await trio.sleep(0.02)


async def test_a_growing_upload_sends_while_the_file_is_written_and_stores_it_once(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    pieces = [os.urandom(300_000) for _ in range(4)]
    path = write(tmp_path, "grow.bin", b"")
    growing = GrowingFile()
    sent: list[int] = []
    upload = client.growing_upload(
        path, growing, filename="grow.bin", purpose="batch", progress=sent.append
    )
    await admin.clear_requests()
    async with trio.open_nursery() as nursery:
        result: list[RemoteFile] = []
        nursery.start_soon(lambda: _collect(upload.run(), result))
        await feed(path, growing, pieces)
        sent_before_the_end = max(sent)
        growing.finish(path.stat().st_size)
    data = b"".join(pieces)
    assert sent_before_the_end == len(data)  # every byte went out before the close
    (stored,) = result
    assert stored.bytes == len(data) and stored.signature == hashlib.md5(data).hexdigest()
    assert upload.complete
    assert [r["method"] for r in await admin.requests()] == ["POST"]
    await client.download(stored.id, tmp_path / "back")
    assert (tmp_path / "back").read_bytes() == data


async def _collect(call: Any, into: list[Any]) -> None:
    into.append(await call)


@pytest.mark.parametrize("how", ["abandoned", "idle"])
async def test_a_growing_upload_that_is_stopped_stores_nothing(
    client: FilesClient, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    monkeypatch.setattr("mistralfs.api.uploads.GROWING_IDLE_LIMIT", 0.3)
    path = write(tmp_path, "stop.bin", b"")
    growing = GrowingFile()
    upload = client.growing_upload(path, growing, filename="stop.bin", purpose="batch")
    stopped: list[StreamAbandoned] = []

    async def run() -> None:
        with pytest.raises(StreamAbandoned) as info:
            await upload.run()
        stopped.append(info.value)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await feed(path, growing, [b"x" * 100_000, b"y" * 100_000])
        if how == "abandoned":
            growing.abandon("the file was deleted")
    (reason,) = stopped
    assert str(reason) == (
        "the file was deleted" if how == "abandoned" else "nothing was written for 0.3 s"
    )
    assert not upload.complete
    assert await client.list_all() == []


@pytest.mark.logs_expected
@pytest.mark.parametrize("status", [411, 422])
async def test_a_service_refusing_unknown_lengths_gets_whole_files_from_then_on(
    nursery: trio.Nursery, tmp_path: pathlib.Path, status: int
) -> None:
    """A server that wants a Content-Length answers 411 (as some proxies do) to chunked
    bodies, or reads no body from them and refuses the form (422)."""
    from conftest import emulator_config

    from mistralfs.emulator.server import create_app

    config = emulator_config(tmp_path / "emu")
    app = create_app(config)
    chunked_refused = []

    async def wants_length(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["method"] == "POST" and b"transfer-encoding" in dict(scope["headers"]):
            chunked_refused.append(True)
            await answer(send, status, [], b'{"detail": "Length Required"}')
            return
        await app(scope, receive, send)

    url = await serve_asgi(nursery, wants_length)
    path = write(tmp_path, "len.bin", b"")
    async with FilesClient(url, config.api_key, retry=FAST) as c:
        growing = GrowingFile()
        upload = c.growing_upload(path, growing, filename="len.bin", purpose="batch")
        await feed(path, growing, [b"z" * 50_000])
        growing.finish(50_000)
        with pytest.raises(Rejected, match="Length Required"):
            await upload.run()
        assert c.sends_growing_uploads == (status != 411)  # a 411 says so at once
        stored = await c.upload(path, filename="len.bin", purpose="batch", after=upload)
        assert not c.sends_growing_uploads
        assert [f.id for f in await c.list_all()] == [stored.id]
    assert chunked_refused == [True]
    assert stored.bytes == 50_000


async def test_a_lost_answer_to_a_growing_upload_is_found_not_sent_again(
    nursery: trio.Nursery, tmp_path: pathlib.Path
) -> None:
    url, server = await serve_spoiled(nursery, tmp_path, "cut")
    data = os.urandom(200_000)
    path = write(tmp_path, "cut.bin", b"")
    async with FilesClient(url, "k", retry=FAST, timeout=0.5) as c:
        growing = GrowingFile()
        upload = c.growing_upload(path, growing, filename="cut.bin", purpose="batch")
        async with trio.open_nursery() as inner:
            failed: list[BaseException] = []

            async def run() -> None:
                try:
                    await upload.run()
                except ApiError as exc:
                    failed.append(exc)

            inner.start_soon(run)
            await feed(path, growing, [data[:100_000], data[100_000:]])
            growing.finish(len(data))
        assert failed and upload.complete  # the whole body went out, the answer did not
        stored = await c.upload(path, filename="cut.bin", purpose="batch", after=upload)
        files = await c.list_all()
    assert server.posts == 1  # found, not sent again
    assert [f.id for f in files] == server.stored == [stored.id]
    assert stored.signature == hashlib.md5(data).hexdigest()


@pytest.mark.logs_expected
async def test_uploads_go_through_the_proxy_named_for_the_api_host(
    emulator: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """http.client reads no proxy settings: a request a proxy applies to goes by httpx's."""
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    path = write(tmp_path, "p.bin", b"through the proxy")
    quick = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.02, total_budget=2.0)
    async with FilesClient(emulator.url, emulator.api_key, retry=quick) as c:
        with pytest.raises(Unavailable, match="ConnectError"):
            await c.upload(path, filename="p.bin", purpose="batch")
        assert not c.sends_growing_uploads  # whole files only, through the proxy
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    async with FilesClient(emulator.url, emulator.api_key, retry=quick) as c:
        stored = await c.upload(path, filename="p.bin", purpose="batch")
        assert [f.id for f in await c.list_all()] == [stored.id]


# ------------------------------------------------------------------ batch jobs


async def test_batch_jobs_are_listed_page_by_page_and_read_one_by_one(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    source = await client.upload(write(tmp_path, "in.jsonl", JSONL), filename="in.jsonl",
                                 purpose="batch")  # fmt: skip
    made = []
    for i in range(5):
        r = await admin.http.post(
            "/v1/batch/jobs",
            json={"input_files": [source.id], "endpoint": "/v1/chat/completions",
                  "model": "m", "metadata": {"name": f"job-{i}"}},
        )  # fmt: skip
        made.append(r.json()["id"])
    await admin.clear_requests()
    jobs = await client.list_batch_jobs(page_size=2)
    assert [j.id for j in jobs] == made[::-1]  # newest first, each once
    pages = [parse_qs(r["query"])["page"] for r in await admin.requests()]
    assert pages == [["0"], ["1"], ["2"]]
    first = jobs[-1]
    assert (first.name, first.input_files, first.endpoint) == (
        "job-0",
        (source.id,),
        "/v1/chat/completions",
    )
    assert first.total_requests == 2 and first.created_at > 0

    await admin.http.post("/v1/_emulator/clock", json={"advance": 3})  # past the default delay
    done = await client.get_batch_job(first.id)
    assert done.done and done.status == "SUCCESS"
    assert (done.succeeded_requests, done.failed_requests) == (2, 0)
    assert done.output_file is not None and done.error_file is None
    assert done.started_at is not None and done.completed_at is not None
    output = await client.retrieve(done.output_file)
    assert (output.source, output.sample_type) == ("mistral", "batch_result")
    assert {j.id for j in await client.list_batch_jobs(statuses=["SUCCESS"])} == set(made)
    assert await client.list_batch_jobs(statuses=["QUEUED", "RUNNING"]) == []
    with pytest.raises(NotFound):
        await client.get_batch_job("0b7c9b61-3f6c-4b0e-9d6a-2f7a4d1c8e11")


def test_batch_job_from_json_is_tolerant() -> None:
    from mistralfs.api import BatchJob

    job = BatchJob.from_json(
        {"id": "j", "status": "SOMETHING_NEW", "input_files": ["a", 3], "total_requests": "x",
         "errors": [{"message": "m", "count": 2}, {"message": "m"}, "odd"], "metadata": None,
         "outputs": [], "object": "batch"}
    )  # fmt: skip
    assert (job.status, job.done, job.input_files, job.total_requests) == (
        "SOMETHING_NEW",
        False,
        ("a",),
        0,
    )
    assert (job.errors, job.name, job.created_at, dict(job.extra)) == (
        ("m",),
        None,
        0,
        {"outputs": []},
    )
    for bad in [{"status": "QUEUED"}, {"id": "j"}, {"id": 5, "status": "QUEUED"}, []]:
        with pytest.raises(ProtocolError):
            BatchJob.from_json(bad)


@pytest.mark.logs_expected
async def test_a_bad_batch_job_record_is_skipped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = {"id": "j1", "status": "RUNNING", "object": "batch"}
    listing = {"data": [{"id": None, "status": "QUEUED"}, good], "object": "list", "total": 2}

    async def jobs(scope: Any, receive: Any, send: Any) -> None:
        body = json.dumps(listing).encode()
        await answer(send, 200, [(b"content-type", b"application/json")], body)

    async with trio.open_nursery() as nursery:
        url = await serve_asgi(nursery, jobs)
        async with FilesClient(url, "k", retry=FAST) as other:
            listed = await other.list_batch_jobs()
        nursery.cancel_scope.cancel()
    assert [j.id for j in listed] == ["j1"]
    assert "batch job record skipped" in caplog.text


@pytest.mark.logs_expected
async def test_batch_job_reads_survive_seeded_faults(client: FilesClient, admin: Admin) -> None:
    body = {"requests": [{"body": {}}], "endpoint": "/v1/embeddings", "model": "m"}
    made = [(await admin.http.post("/v1/batch/jobs", json=body)).json()["id"] for _ in range(3)]
    r = await admin.http.post(
        "/v1/_emulator/faults",
        json={"random": "seed=5;route=jobs;rate=0.3;kinds=503,reset,badjson"},
    )
    assert r.status_code == 200, r.text
    await admin.clear_requests()
    for _ in range(3):
        assert [j.id for j in await client.list_batch_jobs(page_size=2)] == made[::-1]
        assert (await client.get_batch_job(made[0])).id == made[0]
    faulted = [r for r in await admin.requests() if r["fault"]]
    assert faulted and all(r["path"].startswith("/v1/batch/jobs") for r in faulted)


async def test_the_fake_account_answers_jobs_and_expiry_as_the_client_does(
    client: FilesClient, admin: Admin, tmp_path: pathlib.Path
) -> None:
    """tests/fake_api.py stands in for FilesClient in the fast tier: the same answers."""
    from fake_api import FakeFilesApi

    fake = FakeFilesApi()
    src = write(tmp_path, "in.jsonl", JSONL)
    for api in (client, fake):
        kept = await api.upload(src, filename="kept.jsonl", purpose="batch")
        short = await api.upload(src, filename="s.jsonl", purpose="batch", expiry=1,
                                 visibility="user")  # fmt: skip
        assert (kept.expires_at, kept.visibility) == (None, "workspace")
        assert short.visibility == "user" and short.expires_at is not None
        assert short.expires_at - time.time() == pytest.approx(3600, abs=5)
        assert {f.id for f in await api.list_all(purpose="batch")} == {kept.id, short.id}
        with pytest.raises(NotFound):
            await api.get_batch_job("0b7c9b61-3f6c-4b0e-9d6a-2f7a4d1c8e11")
        assert await api.list_batch_jobs() == []
    first, second = fake.add_job(metadata={"name": "a"}), fake.add_job(status="RUNNING")
    assert [j.id for j in await fake.list_batch_jobs()] == [second.id, first.id]
    assert [j.id for j in await fake.list_batch_jobs(statuses=["RUNNING"])] == [second.id]
    assert (await fake.get_batch_job(first.id)).name == "a"
    gone = fake.add("old.jsonl", "batch", b"x", expires_at=int(time.time()) - 1)
    assert gone.id not in {f.id for f in await fake.list_all()}
    with pytest.raises(NotFound):
        await fake.content(gone.id, 1)
