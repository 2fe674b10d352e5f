"""The emulator's seeded random faults, as a plain httpx client sees them.

What each kind looks like to httpx (see mistralfs/emulator/faults.py):
status -> that status and body; reset and lost -> httpx.ReadError (ECONNRESET);
cut -> httpx.RemoteProtocolError after half the body; stall -> a late, normal
answer; badjson -> 200 with a body that json cannot parse.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import trio
from conftest import API_KEY, LISTENING, RunningEmulator, emulator_config, start_emulator

from mistralfs.emulator.faults import FaultSpecError, Kind, parse_plan, route_of

JSONL = b'{"a": 1}\n{"b": 2}\n'
REPO = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture
async def client(emulator: RunningEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=emulator.url, headers={"Authorization": f"Bearer {emulator.api_key}"}, timeout=20
    ) as c:
        yield c


async def set_random(client: httpx.AsyncClient, spec: Any) -> dict[str, Any]:
    r = await client.post("/v1/_emulator/faults", json={"random": spec})
    assert r.status_code == 200, r.text
    return r.json()


async def upload(
    client: httpx.AsyncClient, name: str, content: bytes = JSONL, purpose: str = "batch"
) -> httpx.Response:
    return await client.post(
        "/v1/files", files={"file": (name, content)}, data={"purpose": purpose}
    )


async def stored(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    """Every file, read with random faults switched off (the faults are restored after)."""
    saved = (await client.get("/v1/_emulator/faults")).json().get("random")
    await set_random(client, None)
    r = await client.get("/v1/files", params={"page_size": 1000})
    assert r.status_code == 200
    if saved:
        await set_random(client, {"seed": saved["seed"], "rules": saved["rules"]})
    return r.json()["data"]


async def request_log(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    await trio.sleep(0.05)  # entries land just after the answer (or the reset)
    return (await client.get("/v1/_emulator/requests")).json()["requests"]


# --- each kind ------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_status_kinds_answer_without_processing(
    client: httpx.AsyncClient, status: int
) -> None:
    await set_random(client, f"seed=1;route=upload,list;rate=1;kinds={status}")
    r = await upload(client, "a.jsonl")
    assert r.status_code == status
    assert r.json() == {"detail": httpx.codes.get_reason_phrase(status)}
    assert "retry-after" not in r.headers
    r = await client.get("/v1/files")
    assert r.status_code == status
    assert await stored(client) == []  # the upload was refused, not stored


async def test_429_carries_retry_after(client: httpx.AsyncClient) -> None:
    await set_random(
        client, "seed=1;route=list;rate=1;kinds=429:2.5;route=retrieve;rate=1;kinds=429"
    )
    r = await client.get("/v1/files")
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2.5"
    assert r.json()["type"] == "rate_limited" and r.json()["code"] == "1300"
    r = await client.get(f"/v1/files/{'0' * 32}")
    assert r.status_code == 429
    assert r.headers["retry-after"] == "1"


async def test_status_on_storage_is_azure_xml(client: httpx.AsyncClient) -> None:
    f = (await upload(client, "a.jsonl")).json()
    url = (await client.get(f"/v1/files/{f['id']}/url")).json()["url"]
    await set_random(client, "seed=1;route=storage;rate=1;kinds=503")
    async with httpx.AsyncClient() as anon:
        r = await anon.get(url)
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/xml")
    assert "<Code>ServerBusy</Code>" in r.text


async def test_reset_drops_the_connection_unanswered(client: httpx.AsyncClient) -> None:
    await set_random(client, "seed=1;route=upload,list;rate=1;kinds=reset")
    with pytest.raises(httpx.ReadError) as info:
        await upload(client, "a.jsonl", os.urandom(300_000))
    assert os.strerror(errno.ECONNRESET) in str(info.value)  # an RST, not a clean close
    with pytest.raises(httpx.ReadError):
        await client.get("/v1/files")
    assert await stored(client) == []  # a reset comes before processing
    log = await request_log(client)
    assert [(e["method"], e["status"], e["fault"]) for e in log[:2]] == [
        ("POST", 0, "reset"),
        ("GET", 0, "reset"),
    ]
    # The client's pool recovers: the next request on a fresh connection is answered.
    await set_random(client, None)
    assert (await client.get("/v1/files")).status_code == 200


async def test_lost_upload_is_stored_but_unanswered(client: httpx.AsyncClient) -> None:
    await set_random(client, "seed=1;route=upload;rate=1;kinds=lost")
    content = os.urandom(50_000)
    with pytest.raises(httpx.ReadError):
        await upload(client, "lost.bin", content)
    files = await stored(client)
    assert [(f["filename"], f["bytes"]) for f in files] == [("lost.bin", len(content))]
    assert files[0]["signature"] == hashlib.md5(content).hexdigest()
    (entry,) = [e for e in await request_log(client) if e["method"] == "POST"]
    assert (entry["status"], entry["fault"]) == (0, "lost")


async def test_lost_delete_is_done(client: httpx.AsyncClient) -> None:
    f = (await upload(client, "a.jsonl")).json()
    await set_random(client, "seed=1;route=delete;rate=1;kinds=lost")
    with pytest.raises(httpx.ReadError):
        await client.delete(f"/v1/files/{f['id']}")
    assert await stored(client) == []


async def test_cut_sends_half_the_body_then_closes(client: httpx.AsyncClient) -> None:
    content = os.urandom(400_000)
    f = (await upload(client, "big.bin", content)).json()
    await set_random(client, "seed=1;route=content,list;rate=1;kinds=cut")
    received = bytearray()
    with pytest.raises(httpx.RemoteProtocolError) as info:
        async with client.stream("GET", f"/v1/files/{f['id']}/content") as r:
            assert r.status_code == 200
            assert r.headers["content-length"] == str(len(content))
            async for chunk in r.aiter_raw():
                received += chunk
    assert bytes(received) == content[: len(content) // 2]
    assert f"expected {len(content)}" in str(info.value)
    with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
        await client.get("/v1/files")


async def test_cut_upload_is_stored(client: httpx.AsyncClient) -> None:
    await set_random(client, "seed=1;route=upload;rate=1;kinds=cut")
    with pytest.raises(httpx.RemoteProtocolError):
        await upload(client, "cut.jsonl")
    assert [f["filename"] for f in await stored(client)] == ["cut.jsonl"]


async def test_cut_without_body_bytes_resets(client: httpx.AsyncClient) -> None:
    f = (await upload(client, "a.jsonl")).json()
    url = (await client.get(f"/v1/files/{f['id']}/url")).json()["url"]
    await set_random(client, "seed=1;route=storage;rate=1;kinds=cut")
    async with httpx.AsyncClient() as anon:
        with pytest.raises(httpx.ReadError):
            await anon.head(url)


async def test_stall_delays_then_answers_normally(client: httpx.AsyncClient) -> None:
    f = (await upload(client, "a.jsonl", JSONL)).json()
    await set_random(client, "seed=1;route=content;rate=1;kinds=stall:0.6")
    start = time.monotonic()
    r = await client.get(f"/v1/files/{f['id']}/content")
    elapsed = time.monotonic() - start
    assert r.status_code == 200 and r.content == JSONL
    assert 0.6 <= elapsed < 3, elapsed
    start = time.monotonic()
    assert (await client.get("/v1/files")).status_code == 200  # other routes: no stall
    assert time.monotonic() - start < 0.5


async def test_badjson_is_a_200_that_is_not_json(client: httpx.AsyncClient) -> None:
    await set_random(client, "seed=1;route=upload,list;rate=1;kinds=badjson")
    r = await upload(client, "bad.jsonl")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    with pytest.raises(json.JSONDecodeError):
        r.json()
    r = await client.get("/v1/files")
    assert r.status_code == 200
    with pytest.raises(json.JSONDecodeError):
        r.json()
    assert [f["filename"] for f in await stored(client)] == ["bad.jsonl"]  # processed


async def test_badjson_never_touches_binary_routes(client: httpx.AsyncClient) -> None:
    f = (await upload(client, "a.jsonl")).json()
    state = await set_random(client, "seed=1;route=content;rate=1;kinds=badjson")
    assert state["random"]["rules"][0]["kinds"] == ["badjson"]
    for _ in range(3):
        r = await client.get(f"/v1/files/{f['id']}/content")
        assert r.status_code == 200 and r.content == JSONL
    state = (await client.get("/v1/_emulator/faults")).json()["random"]
    assert (state["requests"], state["injected"], state["history"]) == (3, 0, [])


async def test_rate_zero_and_unlisted_routes_are_untouched(client: httpx.AsyncClient) -> None:
    await set_random(client, "seed=1;route=upload;rate=0;kinds=503;route=delete;rate=1;kinds=500")
    for i in range(20):
        assert (await upload(client, f"f{i}")).status_code == 200
    assert (await client.get("/v1/files")).status_code == 200  # list: no rule
    state = (await client.get("/v1/_emulator/faults")).json()["random"]
    assert (state["requests"], state["injected"]) == (20, 0)


async def test_admin_routes_are_never_faulted(client: httpx.AsyncClient) -> None:
    await set_random(client, "seed=1;route=*;rate=1;kinds=reset")
    for _ in range(3):
        assert (await client.get("/v1/_emulator/faults")).status_code == 200
        assert (await client.get("/v1/_emulator/requests")).status_code == 200
    r = await client.post("/v1/_emulator/batch-outputs", files={"file": ("o.jsonl", JSONL)})
    assert r.status_code == 200
    with pytest.raises(httpx.ReadError):
        await client.get("/v1/files")


async def test_deterministic_rules_win_and_delete_clears_both(client: httpx.AsyncClient) -> None:
    await set_random(client, "seed=1;route=list;rate=1;kinds=500")
    await client.post("/v1/_emulator/faults", json={"path_prefix": "/v1/files", "status": 418})
    assert (await client.get("/v1/files")).status_code == 418  # the rule, no draw
    assert (await client.get("/v1/files")).status_code == 500  # then the random fault
    r = await client.delete("/v1/_emulator/faults")
    assert r.json() == {"faults": []}
    assert (await client.get("/v1/files")).status_code == 200


# --- repeatability --------------------------------------------------------------------------


SEQUENCE_SPEC = (
    "seed=42;route=upload;rate=0.5;kinds=503,429,reset,lost,badjson,cut;"
    "route=*;rate=0.3;kinds=500,502,reset,cut"
)


async def _outcome(call: Any) -> str:
    try:
        r = await call
    except httpx.ReadError:
        return "ReadError"
    except httpx.RemoteProtocolError:
        return "RemoteProtocolError"
    try:
        r.json()
    except json.JSONDecodeError:
        return f"{r.status_code} not-json"
    return str(r.status_code)


async def _run_sequence(tmp: pathlib.Path, spec: str, extra_lists: bool = False) -> Any:
    """A fixed request sequence against a fresh emulator; what the client saw, and the log."""
    config = emulator_config(tmp, faults=spec)
    async with trio.open_nursery() as nursery:
        emu = await start_emulator(nursery, config)
        headers = {"Authorization": f"Bearer {emu.api_key}"}
        async with httpx.AsyncClient(base_url=emu.url, headers=headers, timeout=10) as c:
            seen = []
            for i in range(30):
                seen.append(("upload", await _outcome(upload(c, f"f{i}.jsonl"))))
                if extra_lists:
                    await _outcome(c.get("/v1/files"))
                seen.append(("retrieve", await _outcome(c.get(f"/v1/files/{'1' * 32}"))))
            state = (await c.get("/v1/_emulator/faults")).json()["random"]
        nursery.cancel_scope.cancel()
    uploads = [(h["n"], h["kind"]) for h in state["history"] if h["route"] == "upload"]
    return seen, state["history"], uploads


async def test_same_seed_same_requests_same_faults(tmp_path: pathlib.Path) -> None:
    first = await _run_sequence(tmp_path / "a", SEQUENCE_SPEC)
    second = await _run_sequence(tmp_path / "b", SEQUENCE_SPEC)
    assert first == second
    seen, history, _ = first
    outcomes = {o for _, o in seen}
    # The sequence really mixes faults and successes.
    assert "200" in outcomes and "404" in outcomes and len(outcomes) >= 5, outcomes
    assert 10 <= len(history) <= 45

    other = await _run_sequence(tmp_path / "c", SEQUENCE_SPEC.replace("seed=42", "seed=43"))
    assert other[0] != seen  # another seed, another sequence


async def test_routes_draw_from_their_own_streams(tmp_path: pathlib.Path) -> None:
    """Listings in between do not change which uploads get which fault."""
    plain = await _run_sequence(tmp_path / "a", SEQUENCE_SPEC)
    with_lists = await _run_sequence(tmp_path / "b", SEQUENCE_SPEC, extra_lists=True)
    upload_kinds = [[kind for _, kind in run[2]] for run in (plain, with_lists)]
    assert upload_kinds[0] == upload_kinds[1] and upload_kinds[0]
    assert [o for r, o in plain[0] if r == "upload"] == [
        o for r, o in with_lists[0] if r == "upload"
    ]


async def test_setting_the_spec_again_restarts_the_sequence(client: httpx.AsyncClient) -> None:
    spec = "seed=9;route=retrieve;rate=0.5;kinds=500,503"

    async def statuses() -> list[int]:
        await set_random(client, spec)
        return [(await client.get(f"/v1/files/{'2' * 32}")).status_code for _ in range(16)]

    first = await statuses()
    assert first == await statuses()
    assert 404 in first and {500, 503} & set(first)


# --- the spec -------------------------------------------------------------------------------


def test_compact_and_json_forms_agree(tmp_path: pathlib.Path) -> None:
    compact = parse_plan(
        " seed=7 ; route=upload ; rate=0.5 ; kinds=lost,503 ; route=list,retrieve;rate=0.1;"
        "kinds=429:3,stall:2,reset"
    )
    as_json = parse_plan(
        {
            "seed": 7,
            "rules": [
                {"route": "upload", "rate": 0.5, "kinds": ["lost", 503]},
                {"route": ["list", "retrieve"], "rate": 0.1, "kinds": "429:3,stall:2,reset"},
            ],
        }
    )
    assert compact == as_json
    assert parse_plan(json.dumps(compact.describe())) == compact
    path = tmp_path / "faults.json"
    path.write_text(json.dumps(compact.describe()))
    assert parse_plan(f"@{path}") == compact
    assert compact.rules[1].kinds == (
        Kind("status", status=429, seconds=3.0),
        Kind("stall", seconds=2.0),
        Kind("reset"),
    )
    star = parse_plan("rate=0.2;kinds=cut")  # no route= : a rule for every route, seed 0
    assert star.seed == 0 and set(star.rules[0].routes) == {
        "list", "upload", "retrieve", "delete", "content", "url", "storage", "jobs"
    }  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "route"),
    [
        ("GET", "/v1/files", "list"),
        ("POST", "/v1/files", "upload"),
        ("GET", "/v1/files/abc", "retrieve"),
        ("DELETE", "/v1/files/abc", "delete"),
        ("GET", "/v1/files/abc/content", "content"),
        ("GET", "/v1/files/abc/url", "url"),
        ("HEAD", "/storage/abc", "storage"),
        ("GET", "/storage/abc", "storage"),
        ("GET", "/v1/batch/jobs", "jobs"),
        ("GET", "/v1/batch/jobs/abc", "jobs"),
        ("POST", "/v1/batch/jobs", None),
        ("POST", "/v1/batch/jobs/abc/cancel", None),
        ("PUT", "/v1/files", None),
        ("GET", "/v1/_emulator/faults", None),
        ("GET", "/v1/files/abc/other", None),
    ],
)
def test_route_names(method: str, path: str, route: str | None) -> None:
    assert route_of(method, path) == route


BAD_SPECS = [
    ("seed=1;route=uploads;rate=1;kinds=503", "unknown route 'uploads'"),
    ("seed=1;route=list;rate=1.5;kinds=503", "rate must be"),
    ("seed=1;route=list;rate=often;kinds=503", "not a number"),
    ("seed=1;route=list;rate=1;kinds=boom", "unknown fault kind 'boom'"),
    ("seed=1;route=list;rate=1;kinds=stall", "stall needs its seconds"),
    ("seed=1;route=list;rate=1;kinds=stall:-1", "seconds must be between"),
    ("seed=1;route=list;rate=1;kinds=503:2", "only 429 takes seconds"),
    ("seed=1;route=list;rate=1;kinds=200", "not an error"),
    ("seed=1;route=list;rate=1;kinds=reset:3", "takes no argument"),
    ("seed=x;route=list;rate=1;kinds=503", "seed 'x' is not an integer"),
    ("seed=1", "no rules"),
    ("seed=1;route=list;kinds=503", "needs rate="),
    ("seed=1;route=list;rate=1", "needs kinds="),
    ("seed=1;route=list;rate=1;rate=0.5;kinds=503", "rate= given twice"),
    ("seed=1;color=red", "unknown key 'color'"),
    ("seed=1;route=list;rate=1;kinds=", "fault kind must be a non-empty"),
    ("seed=1;list", "is not key=value"),
    ('{"seed": 1, "rules": [', "invalid JSON"),
    ('{"seed": 1, "rules": [{"route": "list", "rate": 1, "kinds": ["503"], "x": 1}]}', "x"),
    ("@/nonexistent/faults.txt", "cannot read /nonexistent/faults.txt"),
]


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS)
def test_bad_specs_are_refused_clearly(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError, match=None) as info:
        parse_plan(spec)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "body",
    [
        {"random": "seed=1;route=nowhere;rate=1;kinds=503"},
        {"random": 5},
        {"random": "seed=1;route=list;rate=1;kinds=503", "status": 500},
    ],
)
async def test_admin_route_refuses_bad_random_specs(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    r = await client.post("/v1/_emulator/faults", json=body)
    assert r.status_code == 422
    assert r.json()["detail"].startswith("Invalid fault: ")
    assert (await client.get("/v1/_emulator/faults")).json() == {"faults": []}


# --- the CLI --------------------------------------------------------------------------------


@contextlib.contextmanager
def cli_emulator(tmp_path: pathlib.Path, *args: str) -> Iterator[str]:
    """``python -m mistralfs emulator --port 0 ARGS``; yields its base URL."""
    log = (tmp_path / "emulator.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mistralfs", "emulator", "--port", "0",
         "--data", str(tmp_path / "emu"), "--api-key", API_KEY, *args],
        stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(LISTENING), (tmp_path / "emulator.log").read_text()
        yield line[len(LISTENING) :].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()
        log.close()


def test_cli_faults_option(tmp_path: pathlib.Path) -> None:
    spec = "seed=5;route=upload;rate=1;kinds=lost;route=list;rate=1;kinds=429:4"
    with (
        cli_emulator(tmp_path, "--faults", spec) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as c,
    ):
        r = c.get("/v1/_emulator/faults")
        assert r.json()["random"]["seed"] == 5
        assert r.json()["random"]["rules"][1] == {
            "route": ["list"],
            "rate": 1.0,
            "kinds": ["429:4"],
        }
        r = c.get("/v1/files")
        assert (r.status_code, r.headers["retry-after"]) == (429, "4")
        with pytest.raises(httpx.ReadError):
            c.post("/v1/files", files={"file": ("x.jsonl", JSONL)}, data={"purpose": "batch"})
        c.post("/v1/_emulator/faults", json={"random": None}).raise_for_status()
        files = c.get("/v1/files").json()["data"]
        assert [f["filename"] for f in files] == ["x.jsonl"]
    assert "random faults: " in (tmp_path / "emulator.log").read_text()


def test_cli_faults_json_form(tmp_path: pathlib.Path) -> None:
    spec = json.dumps({"seed": 2, "rules": [{"route": "list", "rate": 1, "kinds": ["502"]}]})
    with cli_emulator(tmp_path, "--faults", spec) as url:
        r = httpx.get(f"{url}/v1/files", headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 502


@pytest.mark.parametrize(("spec", "message"), BAD_SPECS[:4])
def test_cli_refuses_bad_specs(tmp_path: pathlib.Path, spec: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mistralfs", "emulator", "--port", "0",
         "--data", str(tmp_path / "emu"), "--faults", spec],
        capture_output=True, text=True, cwd=REPO, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stdout == ""  # never started listening
    assert "argument --faults: " in result.stderr and message in result.stderr
    assert "Traceback" not in result.stderr


# --- lies: the request is carried out, its answer falsified (see lies.py) --------------------


async def test_lies_falsify_answers_and_nothing_else(client: httpx.AsyncClient) -> None:
    fields = {"method": "POST", "path_prefix": "/v1/files", "lie": {"fields": {"bytes": 7}}}
    records = {"method": "GET", "path_prefix": "/v1/files",
               "lie": {"records": [{"id": "x", "bytes": -5}]}}  # fmt: skip
    r = await client.post("/v1/_emulator/faults", json=[fields, records])
    assert r.status_code == 200, r.text
    answered = (await upload(client, "a.jsonl")).json()
    assert answered["bytes"] == 7  # the lie
    listing = (await client.get("/v1/files")).json()
    assert [f["id"] for f in listing["data"]] == ["x", answered["id"]]
    assert listing["total"] == 2 and listing["data"][1]["bytes"] == len(JSONL)  # stored as sent
    # A retrieve is no listing: it goes through untouched.
    assert (await client.get(f"/v1/files/{answered['id']}")).json()["bytes"] == len(JSONL)


async def test_an_endless_listing_and_a_body_longer_than_its_range(
    client: httpx.AsyncClient,
) -> None:
    stored = (await upload(client, "a.jsonl")).json()
    url = (await client.get(f"/v1/files/{stored['id']}/url")).json()["url"]
    rules = [
        {"method": "GET", "path_prefix": "/v1/files", "lie": {"endless": True}, "times": None},
        {"method": "GET", "path_prefix": "/storage/", "lie": {"extra_bytes": 1000}},
    ]
    assert (await client.post("/v1/_emulator/faults", json=rules)).status_code == 200
    for page in (0, 5):
        got = (await client.get("/v1/files", params={"page": page, "page_size": 3})).json()
        assert len(got["data"]) == 3 and got["total"] == (page + 2) * 3
    async with httpx.AsyncClient() as storage:  # a signed URL is read without the key
        r = await storage.get(url, headers={"Range": "bytes=0-3"})
    assert r.status_code == 206 and r.headers["content-range"].startswith("bytes 0-3/")
    assert "content-length" not in r.headers and len(r.content) == 4 + 1000


@pytest.mark.parametrize(
    "rule",
    [
        {"lie": {"fields": {"id": "x"}}, "status": 200},
        {"lie": {"endless": True, "extra_bytes": 3}},
        {"lie": {"extra_bytes": -1}},
        {"lie": {"records": "x"}},
        {"lie": {"sizes": 3}},
    ],
)
async def test_malformed_lies_are_refused(client: httpx.AsyncClient, rule: dict[str, Any]) -> None:
    r = await client.post("/v1/_emulator/faults", json=rule)
    assert r.status_code == 422 and "Invalid fault" in r.text
