"""The Files API emulator over HTTP, in process: routes, fields, errors, storage, admin."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pathlib
import resource
import signal
import time
import uuid
import zipfile
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import trio
from conftest import API_KEY as API_KEY_FOR_TESTS
from conftest import RunningEmulator, emulator_config, start_emulator

from mistralfs.emulator import signing
from mistralfs.emulator import upload as upload_module
from mistralfs.emulator.storage import ListQuery, Storage

PDF = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 32
JSONL = b'{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": []}\n\n{"a": 1}\n'


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


DOCX = _zip({"[Content_Types].xml": b"<x/>", "word/document.xml": b"<w/>"})
PLAIN_ZIP = _zip({"a.txt": b"hello"})
DOCX_MIME = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


@pytest.fixture
async def client(emulator: RunningEmulator) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=emulator.url, headers={"Authorization": f"Bearer {emulator.api_key}"}
    ) as c:
        yield c


@pytest.fixture
async def anon() -> AsyncIterator[httpx.AsyncClient]:
    """A client that sends no Authorization header (for signed URLs)."""
    async with httpx.AsyncClient() as c:
        yield c


async def upload(
    client: httpx.AsyncClient, filename: str, content: bytes, purpose: str = "batch"
) -> httpx.Response:
    return await client.post(
        "/v1/files", files={"file": (filename, content)}, data={"purpose": purpose}
    )


async def uploaded(
    client: httpx.AsyncClient, filename: str, content: bytes, purpose: str = "batch"
) -> dict[str, Any]:
    r = await upload(client, filename, content, purpose)
    assert r.status_code == 200, r.text
    return r.json()


# sample_type values of the spec (SDK 3.7's SampleType), and ocr_input seen in practice.
SPEC_SAMPLE_TYPES = {"pretrain", "instruct", "batch_request", "batch_result", "batch_error"}
SPEC_SAMPLE_TYPES |= {"ocr_input"}

FILE_FIELDS = {
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
    "expires_at",
    "visibility",
}


# --- upload and the File object ------------------------------------------------------------


async def test_upload_fine_tune_returns_every_field(client: httpx.AsyncClient) -> None:
    before = int(time.time())
    f = await uploaded(client, "train.jsonl", JSONL, "fine-tune")
    assert set(f) == FILE_FIELDS
    assert uuid.UUID(f["id"]).version == 4 and str(uuid.UUID(f["id"])) == f["id"]
    assert f["object"] == "file"
    assert f["bytes"] == len(JSONL)
    assert isinstance(f["created_at"], int) and before <= f["created_at"] <= time.time() + 1
    assert f["filename"] == "train.jsonl"
    assert f["purpose"] == "fine-tune"
    assert f["sample_type"] == "instruct"
    assert f["source"] == "upload"
    assert f["num_lines"] == 3  # the blank line is not counted
    assert f["mimetype"] == "application/jsonl"
    assert f["signature"] == hashlib.md5(JSONL).hexdigest()
    assert f["expires_at"] is None
    assert f["visibility"] == "workspace"


@pytest.mark.parametrize(
    ("filename", "content", "purpose", "sample_type", "num_lines", "mimetype"),
    [
        ("reqs.jsonl", b'{"a":1}\n{"b":2}\n', "batch", "batch_request", 2, "application/jsonl"),
        ("notes.txt", b"hello\nworld\n", "batch", "batch_request", None, "text/plain"),
        ("invoice.pdf", PDF, "ocr", "ocr_input", 0, "application/pdf"),
        ("scan.png", PNG, "ocr", "ocr_input", 0, "image/png"),
        ("photo", JPEG, "ocr", "ocr_input", 0, "image/jpeg"),
        ("letter.docx", DOCX, "ocr", "ocr_input", 0, DOCX_MIME),
        ("talk.mp3", b"ID3\x03\x00rest", "audio", "pretrain", None, "audio/mpeg"),
        ("blob", b"\x00\x01\x02", "audio", "pretrain", None, "application/octet-stream"),
    ],
)
async def test_derived_metadata_per_purpose(
    client: httpx.AsyncClient,
    filename: str,
    content: bytes,
    purpose: str,
    sample_type: str,
    num_lines: int | None,
    mimetype: str,
) -> None:
    f = await uploaded(client, filename, content, purpose)
    assert (f["purpose"], f["sample_type"], f["num_lines"], f["mimetype"]) == (
        purpose,
        sample_type,
        num_lines,
        mimetype,
    )


async def test_mimetype_comes_from_content_before_extension(client: httpx.AsyncClient) -> None:
    f = await uploaded(client, "report.txt", PDF, "ocr")
    assert f["mimetype"] == "application/pdf"
    assert f["filename"] == "report.txt"


async def test_unicode_filename_is_kept(client: httpx.AsyncClient) -> None:
    f = await uploaded(client, "données été.jsonl", JSONL, "fine-tune")
    assert f["filename"] == "données été.jsonl"


async def test_missing_parts_give_fastapi_422(client: httpx.AsyncClient) -> None:
    r = await client.post("/v1/files", data={"purpose": "batch"})
    assert r.status_code == 422
    assert r.json() == {
        "detail": [
            {"type": "missing", "loc": ["body", "file"], "msg": "Field required", "input": None}
        ]
    }
    r = await client.post("/v1/files", content=b"not multipart")
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "file"]]


async def test_expiry_and_visibility_are_kept_and_returned(
    client: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    before = int(time.time())
    r = await client.post(
        "/v1/files",
        files={"file": ("a.jsonl", JSONL)},
        data={"purpose": "fine-tune", "expiry": "3", "visibility": "user"},
    )
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["visibility"] == "user"
    assert before + 3 * 3600 <= f["expires_at"] <= time.time() + 3 * 3600 + 1  # hours
    assert (await client.get(f"/v1/files/{f['id']}")).json()["expires_at"] == f["expires_at"]
    listed = (await client.get("/v1/files")).json()["data"]
    assert [(g["id"], g["expires_at"], g["visibility"]) for g in listed] == [
        (f["id"], f["expires_at"], "user")
    ]
    # Empty values are missing ones (as FastAPI reads forms): the defaults apply.
    r = await client.post(
        "/v1/files",
        files={"file": ("b.jsonl", JSONL)},
        data={"purpose": "fine-tune", "expiry": "", "visibility": ""},
    )
    assert (r.json()["expires_at"], r.json()["visibility"]) == (None, "workspace")


@pytest.mark.parametrize(
    ("data", "loc", "error_type"),
    [
        ({"visibility": "public"}, ["body", "visibility"], "enum"),
        ({"visibility": "User"}, ["body", "visibility"], "enum"),
        ({"expiry": "soon"}, ["body", "expiry"], "int_parsing"),
        ({"expiry": "1.5"}, ["body", "expiry"], "int_parsing"),
        ({"expiry": "0"}, ["body", "expiry"], "greater_than_equal"),
        ({"expiry": "-3"}, ["body", "expiry"], "greater_than_equal"),
        ({"expiry": "9" * 30}, ["body", "expiry"], "less_than_equal"),
    ],
)
async def test_bad_expiry_or_visibility_is_fastapi_422(
    client: httpx.AsyncClient, data: dict[str, str], loc: list[str], error_type: str
) -> None:
    r = await client.post(
        "/v1/files", files={"file": ("a.jsonl", JSONL)}, data={"purpose": "fine-tune", **data}
    )
    assert r.status_code == 422, r.text
    (problem,) = r.json()["detail"]
    assert (problem["type"], problem["loc"], problem["input"]) == (error_type, loc, data[loc[1]])
    assert (await client.get("/v1/files")).json()["data"] == []


async def test_an_expired_file_is_gone(client: httpx.AsyncClient) -> None:
    """Past its `expires_at` (here: the emulator's clock moved 1 h on), a file is neither
    listed nor served: retrieve, content, url and delete answer 404, its URL too."""
    short = (
        await client.post(
            "/v1/files",
            files={"file": ("short.jsonl", JSONL)},
            data={"purpose": "batch", "expiry": "1"},
        )
    ).json()
    lasting = await uploaded(client, "lasting.jsonl", JSONL)
    url = await _signed(client, short["id"])
    assert (await client.get(f"/v1/files/{short['id']}/content")).status_code == 200
    r = await client.post("/v1/_emulator/clock", json={"advance": 3600 - 5})
    assert r.status_code == 200 and r.json()["offset"] == 3595
    assert (await client.get(f"/v1/files/{short['id']}")).status_code == 200  # not yet
    await client.post("/v1/_emulator/clock", json={"advance": 10})
    listing = (await client.get("/v1/files")).json()
    assert [f["id"] for f in listing["data"]] == [lasting["id"]]
    assert listing["total"] == 1
    for method, path in [
        ("GET", ""),
        ("GET", "/content"),
        ("GET", "/url"),
        ("DELETE", ""),
    ]:
        r = await client.request(method, f"/v1/files/{short['id']}{path}")
        assert r.status_code == 404, (method, path, r.text)
        assert r.json() == {"detail": "File not found"}
    async with httpx.AsyncClient() as storage_client:
        assert (await storage_client.get(url)).status_code == 404
    assert (await client.get(f"/v1/files/{lasting['id']}")).status_code == 200


@pytest.mark.parametrize(
    "spec", [{"advance": -1}, {"advance": "1"}, {"back": 3}, [], {"advance": 1e300}]
)
async def test_clock_moves_only_forward(client: httpx.AsyncClient, spec: Any) -> None:
    r = await client.post("/v1/_emulator/clock", json=spec)
    assert r.status_code == 422
    assert "Invalid clock change" in r.json()["detail"]
    assert (await client.get("/v1/_emulator/clock")).json()["offset"] == 0


def test_expired_files_are_purged_and_old_data_folders_gain_the_new_columns(
    tmp_path: pathlib.Path,
) -> None:
    import sqlite3

    from mistralfs.emulator.storage import Storage

    db = sqlite3.connect(tmp_path / "files.sqlite3")
    db.execute(
        "CREATE TABLE files (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
        "bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, filename TEXT NOT NULL, "
        "purpose TEXT NOT NULL, sample_type TEXT NOT NULL, source TEXT NOT NULL, "
        "num_lines INTEGER, mimetype TEXT, signature TEXT)"
    )
    old_id = str(uuid.uuid4())
    db.execute(
        "INSERT INTO files (id, bytes, created_at, filename, purpose, sample_type, source) "
        "VALUES (?, 0, 1, 'old.txt', 'batch', 'batch_request', 'upload')",
        (old_id,),
    )
    db.commit()
    db.close()
    storage = Storage(tmp_path)
    try:
        old = storage.get(old_id)
        assert old is not None and (old.expires_at, old.visibility) == (None, None)
        now = storage.clock.now()
        gone = storage.add_file(b"x", filename="a", purpose="batch", sample_type="x",
                                expires_at=now + 10)  # fmt: skip
        assert storage.blob_path(gone.id).exists()
        storage.clock.advance(10)
        assert storage.purge_expired() == 1
        assert not storage.blob_path(gone.id).exists()
        assert storage.get(gone.id) is None
    finally:
        storage.close()


# --- content validation ---------------------------------------------------------------------


async def test_fine_tune_invalid_json_lines_are_reported(client: httpx.AsyncClient) -> None:
    content = b'{"ok": 1}\nnot json\n\n[1, 2]\n{"ok": 2}\n{"broken": \n'
    r = await upload(client, "bad.jsonl", content, "fine-tune")
    assert r.status_code == 400
    body = r.json()
    assert body["detail"] == "Invalid file format."
    assert body["description"] == "Some lines are not valid JSON"
    assert [e["line_number"] for e in body["errors"]] == [2, 4, 6]
    assert all(e["message"].startswith("line contains invalid json: ") for e in body["errors"])
    assert "Expecting value" in body["errors"][0]["message"]
    assert (await client.get("/v1/files")).json()["total"] == 0


async def test_fine_tune_errors_are_capped(client: httpx.AsyncClient) -> None:
    r = await upload(client, "bad.jsonl", b"x\n" * 50, "fine-tune")
    assert r.status_code == 400
    assert [e["line_number"] for e in r.json()["errors"]] == list(range(1, 11))


async def test_fine_tune_invalid_utf8_is_reported_with_its_line(client: httpx.AsyncClient) -> None:
    r = await upload(client, "bad.jsonl", b'{"a": 1}\n{"b": "\xff\xfe"}\n', "fine-tune")
    assert r.status_code == 400
    (error,) = r.json()["errors"]
    assert error["line_number"] == 2
    assert "UTF-8" in error["message"]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
async def test_fine_tune_empty_file_is_refused(client: httpx.AsyncClient, content: bytes) -> None:
    r = await upload(client, "empty.jsonl", content, "fine-tune")
    assert r.status_code == 400
    assert r.json()["detail"] == "Invalid file format."


@pytest.mark.parametrize(
    ("filename", "content", "mimetype"),
    [("archive.zip", PLAIN_ZIP, "application/zip"), ("data.jsonl", JSONL, "application/jsonl")],
)
async def test_ocr_refuses_other_types(
    client: httpx.AsyncClient, filename: str, content: bytes, mimetype: str
) -> None:
    r = await upload(client, filename, content, "ocr")
    assert r.status_code == 422
    body = r.json()
    assert body["detail"] == "Invalid file format."
    assert body["message"].startswith(f"Received file with mimetype {mimetype}, only ")
    assert "application/pdf" in body["message"] and "image/png" in body["message"]
    assert body["message"].endswith(" are currently supported")
    assert (await client.get("/v1/files")).json()["total"] == 0


# --- retrieve, delete, content --------------------------------------------------------------


async def test_retrieve_adds_deleted_false(client: httpx.AsyncClient) -> None:
    f = await uploaded(client, "a.jsonl", JSONL, "fine-tune")
    r = await client.get(f"/v1/files/{f['id']}")
    assert r.status_code == 200
    assert r.json() == {**f, "deleted": False}
    # Any spelling of the UUID finds the file.
    r = await client.get(f"/v1/files/{f['id'].upper()}")
    assert r.json()["id"] == f["id"]


async def test_delete_then_everything_is_404(client: httpx.AsyncClient) -> None:
    f = await uploaded(client, "a.jsonl", JSONL, "fine-tune")
    r = await client.delete(f"/v1/files/{f['id']}")
    assert r.status_code == 200
    assert r.json() == {"id": f["id"], "object": "file", "deleted": True}
    for method, suffix in [
        ("GET", ""),
        ("DELETE", ""),
        ("GET", "/content"),
        ("GET", "/url"),
    ]:
        r = await client.request(method, f"/v1/files/{f['id']}{suffix}")
        assert r.status_code == 404, (method, suffix)
        assert r.json() == {"detail": "File not found"}
    assert (await client.get("/v1/files")).json()["total"] == 0


async def test_unknown_id_is_404(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/v1/files/{uuid.uuid4()}")
    assert r.status_code == 404
    assert r.json() == {"detail": "File not found"}


@pytest.mark.parametrize("suffix", ["", "/content", "/url"])
async def test_non_uuid_id_is_422(client: httpx.AsyncClient, suffix: str) -> None:
    r = await client.get(f"/v1/files/not-a-uuid{suffix}")
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert error["type"] == "uuid_parsing"
    assert error["loc"] == ["path", "file_id"]
    assert error["msg"].startswith("Input should be a valid UUID, ")
    assert error["input"] == "not-a-uuid"
    r = await client.delete("/v1/files/zz" + "0" * 30)
    assert r.status_code == 422
    assert r.json()["detail"][0]["type"] == "uuid_parsing"


@pytest.mark.parametrize("size", [0, 2048, 256 * 1024, 700_000])  # read at once, or streamed
async def test_download_streams_octet_stream(client: httpx.AsyncClient, size: int) -> None:
    content = os.urandom(size)
    f = await uploaded(client, "noise.bin", content, "batch")
    r = await client.get(f"/v1/files/{f['id']}/content")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-length"] == str(len(content))
    assert r.content == content


# --- auth -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key"}, {"Authorization": ""}],
)
async def test_unauthorized(emulator: RunningEmulator, headers: dict[str, str]) -> None:
    fid = uuid.uuid4()
    async with httpx.AsyncClient(base_url=emulator.url, headers=headers) as c:
        for method, path in [
            ("GET", "/v1/files"),
            ("POST", "/v1/files"),
            ("GET", f"/v1/files/{fid}"),
            ("DELETE", f"/v1/files/{fid}"),
            ("GET", f"/v1/files/{fid}/content"),
            ("GET", f"/v1/files/{fid}/url"),
            ("GET", "/v1/_emulator/requests"),
            ("POST", "/v1/_emulator/faults"),
        ]:
            r = await c.request(method, path)
            assert r.status_code == 401, (method, path)
            assert r.json() == {"detail": "Unauthorized"}


async def test_unauthorized_upload_is_answered_not_stalled(emulator: RunningEmulator) -> None:
    async with httpx.AsyncClient(base_url=emulator.url, timeout=10) as c:
        r = await upload(c, "big.bin", b"x" * 4_000_000)
    assert r.status_code == 401


async def test_bearer_scheme_is_case_insensitive(emulator: RunningEmulator) -> None:
    async with httpx.AsyncClient(
        base_url=emulator.url, headers={"Authorization": f"bearer {emulator.api_key}"}
    ) as c:
        assert (await c.get("/v1/files")).status_code == 200


# --- listing --------------------------------------------------------------------------------


async def test_pagination_from_zero_newest_first(client: httpx.AsyncClient) -> None:
    ids = [(await uploaded(client, f"f{i}.jsonl", JSONL, "fine-tune"))["id"] for i in range(5)]
    newest_first = list(reversed(ids))
    pages = []
    for page in range(4):
        r = await client.get("/v1/files", params={"page": page, "page_size": 2})
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "list"
        assert body["total"] == 5
        pages.append([f["id"] for f in body["data"]])
    assert pages == [newest_first[0:2], newest_first[2:4], newest_first[4:5], []]
    r = await client.get("/v1/files")
    assert [f["id"] for f in r.json()["data"]] == newest_first
    assert set(r.json()["data"][0]) == FILE_FIELDS


async def test_include_total_false_leaves_the_total_null(client: httpx.AsyncClient) -> None:
    await uploaded(client, "a.jsonl", JSONL, "fine-tune")
    r = await client.get("/v1/files", params={"include_total": "false"})
    assert r.json()["total"] is None
    assert len(r.json()["data"]) == 1
    assert (await client.get("/v1/files", params={"include_total": "true"})).json()["total"] == 1


@pytest.mark.parametrize(
    ("params", "loc", "error_type"),
    [
        ({"page_size": "0"}, ["query", "page_size"], "greater_than_equal"),
        ({"page": "-1"}, ["query", "page"], "greater_than_equal"),
        ({"page": "abc"}, ["query", "page"], "int_parsing"),
        ({"include_total": "maybe"}, ["query", "include_total"], "bool_parsing"),
        ({"page_size": "-5"}, ["query", "page_size"], "greater_than_equal"),
        ({"page_size": "1.5"}, ["query", "page_size"], "int_parsing"),
        ({"page_size": "ten"}, ["query", "page_size"], "int_parsing"),
        ({"page_size": ""}, ["query", "page_size"], "int_parsing"),
        ({"page_size": "9" * 5000}, ["query", "page_size"], "int_parsing"),
        ({"page": "-100"}, ["query", "page"], "greater_than_equal"),
        ({"page": "1e3"}, ["query", "page"], "int_parsing"),
        ({"page": "\x00"}, ["query", "page"], "int_parsing"),
    ],
)
async def test_list_bad_query_is_422(
    client: httpx.AsyncClient, params: dict[str, str], loc: list[str], error_type: str
) -> None:
    r = await client.get("/v1/files", params=params)
    assert r.status_code == 422
    (error,) = r.json()["detail"]
    assert (error["loc"], error["type"]) == (loc, error_type)
    assert error["input"] == next(iter(params.values()))


async def test_list_filters(client: httpx.AsyncClient, emulator: RunningEmulator) -> None:
    ft = await uploaded(client, "Train-Set.jsonl", JSONL, "fine-tune")
    req = await uploaded(client, "requests.jsonl", b'{"a":1}\n', "batch")
    pdf = await uploaded(client, "invoice.pdf", PDF, "ocr")
    png = await uploaded(client, "scan.png", PNG, "ocr")
    out = await trio.to_thread.run_sync(_admin_batch_output, emulator, "batch_result")
    err = await trio.to_thread.run_sync(_admin_batch_output, emulator, "batch_error")

    async def ids(params: Any) -> set[str]:
        r = await client.get("/v1/files", params=params)
        assert r.status_code == 200
        body = r.json()
        assert body["total"] == len(body["data"])
        return {f["id"] for f in body["data"]}

    assert await ids({"purpose": "ocr"}) == {pdf["id"], png["id"]}
    assert await ids({"purpose": "batch"}) == {req["id"], out["id"], err["id"]}
    assert await ids({"search": "train-SET"}) == {ft["id"]}
    assert await ids({"search": "nothing"}) == set()
    assert await ids([("source", "mistral")]) == {out["id"], err["id"]}
    assert await ids([("source", "mistral"), ("source", "upload")]) == {
        ft["id"],
        req["id"],
        pdf["id"],
        png["id"],
        out["id"],
        err["id"],
    }
    assert await ids([("sample_type", "batch_result"), ("sample_type", "instruct")]) == {
        out["id"],
        ft["id"],
    }
    assert await ids([("mimetypes", "application/pdf"), ("mimetypes", "image/png")]) == {
        pdf["id"],
        png["id"],
    }
    assert await ids([("purpose", "batch"), ("source", "upload")]) == {req["id"]}
    assert await ids([("purpose", "batch"), ("mimetypes", "application/jsonl")]) == {
        req["id"],
        out["id"],
        err["id"],
    }


def _admin_batch_output(emulator: RunningEmulator, sample_type: str) -> dict[str, Any]:
    from emulator_admin import add_batch_output

    return add_batch_output(
        emulator.url, emulator.api_key, b'{"id": 1}\n{"id": 2}\n', "out.jsonl", sample_type
    )


# --- signed URLs and the storage route ------------------------------------------------------


async def _signed(client: httpx.AsyncClient, file_id: str, **params: Any) -> str:
    r = await client.get(f"/v1/files/{file_id}/url", params=params)
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"url"}
    return r.json()["url"]


async def test_signed_url_shape_and_expiry(
    client: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    f = await uploaded(client, "a.jsonl", JSONL, "fine-tune")
    url = httpx.URL(await _signed(client, f["id"]))
    assert str(url).startswith(f"{emulator.url}/storage/{f['id']}?")
    se = int(url.params["se"])
    assert abs(se - (time.time() + 24 * 3600)) < 5
    assert url.params["sp"] == "r"
    url = httpx.URL(await _signed(client, f["id"], expiry=1))
    assert abs(int(url.params["se"]) - (time.time() + 3600)) < 5
    url = httpx.URL(await _signed(client, f["id"], expiry=168))
    assert abs(int(url.params["se"]) - (time.time() + 168 * 3600)) < 5
    for bad, error_type in [("0", "greater_than_equal"), ("169", "less_than_equal")]:
        r = await client.get(f"/v1/files/{f['id']}/url", params={"expiry": bad})
        assert r.status_code == 422
        assert r.json()["detail"][0]["type"] == error_type
        assert r.json()["detail"][0]["loc"] == ["query", "expiry"]
    r = await client.get(f"/v1/files/{f['id']}/url", params={"expiry": "x"})
    assert r.json()["detail"][0]["type"] == "int_parsing"


async def test_signed_url_needs_no_key_and_serves_ranges(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    content = bytes(range(256)) * 40  # 10240 bytes
    f = await uploaded(client, "bytes.bin", content, "batch")
    url = await _signed(client, f["id"])

    r = await anon.get(url)
    assert r.status_code == 200
    assert r.content == content
    assert r.headers["content-length"] == str(len(content))
    assert r.headers["etag"] == f'"{hashlib.md5(content).hexdigest()}"'
    assert r.headers["accept-ranges"] == "bytes"

    cases = [
        ("bytes=0-99", 0, 99),
        ("bytes=100-199", 100, 199),
        ("bytes=10000-", 10000, 10239),
        ("bytes=-40", 10200, 10239),
        ("bytes=10200-99999", 10200, 10239),
    ]
    for header, start, end in cases:
        r = await anon.get(url, headers={"Range": header})
        assert r.status_code == 206, header
        assert r.content == content[start : end + 1], header
        assert r.headers["content-range"] == f"bytes {start}-{end}/{len(content)}"
        assert r.headers["content-length"] == str(end - start + 1)
        assert r.headers["etag"] == f'"{hashlib.md5(content).hexdigest()}"'

    r = await anon.head(url, headers={"Range": "bytes=5-9"})
    assert r.status_code == 206
    assert r.headers["content-length"] == "5"
    assert r.content == b""

    for header in ["bytes=10240-", "bytes=20000-30000", "bytes=-0"]:
        r = await anon.get(url, headers={"Range": header})
        assert r.status_code == 416, header
        assert r.headers["content-range"] == f"bytes */{len(content)}"


def _assert_azure_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status
    assert r.headers["content-type"].startswith("application/xml")
    assert r.text.startswith('<?xml version="1.0" encoding="utf-8"?><Error><Code>')
    assert f"<Code>{code}</Code>" in r.text
    assert "<Message>" in r.text


async def test_signed_url_tampered_or_expired_is_403_xml(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    f = await uploaded(client, "a.jsonl", JSONL, "fine-tune")
    g = await uploaded(client, "b.jsonl", JSONL, "fine-tune")
    url = httpx.URL(await _signed(client, f["id"]))
    sig = url.params["sig"]

    tampered_sig = url.copy_set_param("sig", ("0" if sig[0] != "0" else "1") + sig[1:])
    _assert_azure_error(await anon.get(tampered_sig), 403, "AuthenticationFailed")
    later = url.copy_set_param("se", str(int(url.params["se"]) + 3600))
    _assert_azure_error(await anon.get(later), 403, "AuthenticationFailed")
    other_file = url.copy_with(path=f"/storage/{g['id']}")
    _assert_azure_error(await anon.get(other_file), 403, "AuthenticationFailed")
    _assert_azure_error(await anon.get(url.copy_with(query=b"")), 403, "AuthenticationFailed")

    secret = (emulator.data_dir / "secret.key").read_text()
    expired = signing.signed_url(emulator.url, bytes.fromhex(secret), f["id"], int(time.time()) - 5)
    _assert_azure_error(await anon.get(expired), 403, "AuthenticationFailed")
    # The same signing code with a future expiry is accepted: the 403 above is the expiry.
    fresh = signing.signed_url(emulator.url, bytes.fromhex(secret), f["id"], int(time.time()) + 60)
    assert (await anon.get(fresh)).content == JSONL


async def test_signed_url_of_deleted_file_is_refused(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    f = await uploaded(client, "a.jsonl", JSONL, "fine-tune")
    url = await _signed(client, f["id"])
    assert (await client.delete(f"/v1/files/{f['id']}")).status_code == 200
    r = await anon.get(url)
    _assert_azure_error(r, 404, "BlobNotFound")


@pytest.mark.parametrize(
    "authorization", [f"Bearer {API_KEY_FOR_TESTS}", "Bearer nonsense", "Basic eDp5", ""]
)
async def test_storage_refuses_any_authorization_header(
    client: httpx.AsyncClient,
    emulator: RunningEmulator,
    caplog: pytest.LogCaptureFixture,
    authorization: str,
) -> None:
    """The API key must never reach the storage host: a request carrying one is refused."""
    caplog.set_level(logging.WARNING, logger="mistralfs.emulator")
    f = await uploaded(client, "a.jsonl", JSONL, "fine-tune")
    url = await _signed(client, f["id"])
    async with httpx.AsyncClient(headers={"Authorization": authorization}) as c:
        r = await c.get(url)
        _assert_azure_error(r, 403, "InvalidAuthenticationInfo")
        assert r.headers["x-ms-error-code"] == "InvalidAuthenticationInfo"
        assert "JSONL" not in r.text and b'"messages"' not in r.content
        r = await c.head(url)
        assert r.status_code == 403
    refused = [rec.getMessage() for rec in caplog.records if "Authorization" in rec.getMessage()]
    assert len(refused) == 2 and all(f"/storage/{f['id']}" in m for m in refused)
    assert all(emulator.api_key not in m for m in refused)
    async with httpx.AsyncClient() as c:  # the same URL without the header works
        assert (await c.get(url)).content == JSONL


# --- size limit -----------------------------------------------------------------------------


async def test_oversize_upload_is_refused_while_streaming(tmp_path: pathlib.Path) -> None:
    limit = 1024 * 1024
    config = emulator_config(tmp_path, max_file_size=limit)
    async with trio.open_nursery() as nursery:
        emu = await start_emulator(nursery, config)
        async with httpx.AsyncClient(
            base_url=emu.url, headers={"Authorization": f"Bearer {emu.api_key}"}, timeout=30
        ) as c:
            r = await upload(c, "big.bin", b"x" * (limit + 1))
            assert r.status_code == 413
            assert r.json() == {"detail": f"File too large: maximum size is {limit} bytes"}
            r = await upload(c, "huge.bin", b"x" * (8 * limit))
            assert r.status_code == 413
            assert list((emu.data_dir / "tmp").iterdir()) == []
            assert list((emu.data_dir / "blobs").iterdir()) == []
            assert (await c.get("/v1/files")).json()["total"] == 0
            # Exactly the limit is fine, and the connection is still usable afterwards.
            f = (await upload(c, "edge.bin", b"y" * limit)).json()
            assert f["bytes"] == limit
            assert (await c.get("/v1/files")).json()["total"] == 1
        nursery.cancel_scope.cancel()


async def test_upload_arriving_in_small_pieces_is_written_in_large_ones(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over TLS a body reaches the app one record (8 or 16 KiB) at a time; a write,
    which goes through a worker thread, per piece made the emulator slower than a
    60 MB/s link. The pieces are gathered, and the bytes stored are the same."""
    content = os.urandom(2 * upload_module.WRITE_SIZE + 12345)
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.bin"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body += content + f"\r\n--{boundary}--\r\n".encode()

    class Request:
        headers = {"content-type": f"multipart/form-data; boundary={boundary}"}

        async def stream(self) -> AsyncIterator[bytes]:
            for i in range(0, len(body), 8192 - 29):  # pieces that split the boundaries
                yield body[i : i + 8192 - 29]

    writes: list[int] = []
    open_file = trio.open_file

    async def counting_open_file(*args: Any, **kwargs: Any) -> Any:
        out = await open_file(*args, **kwargs)
        write = out.write

        async def counted(data: bytes) -> int:
            writes.append(len(data))
            return await write(data)

        out.write = counted
        return out

    monkeypatch.setattr(upload_module.trio, "open_file", counting_open_file)
    form = await upload_module.receive_upload(
        Request(),  # type: ignore[arg-type]
        tmp_path / "upload.tmp",
        max_file_size=len(content),
    )
    assert form.fields == {"purpose": "batch"}
    assert form.filename == "x.bin" and form.file_size == len(content)
    assert form.file_path is not None and form.file_path.read_bytes() == content
    assert sum(writes) == len(content)
    assert len(writes) <= 3, f"{len(writes)} writes for {len(content)} bytes"


def _sparse_file(path: pathlib.Path, size: int) -> pathlib.Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


async def test_large_upload_keeps_memory_flat(
    client: httpx.AsyncClient, tmp_path: pathlib.Path
) -> None:
    size = 200 * 1024 * 1024
    source = _sparse_file(tmp_path / "zeros.bin", size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with source.open("rb") as fh:
        r = await client.post(
            "/v1/files",
            files={"file": ("zeros.bin", fh)},
            data={"purpose": "batch"},
            timeout=120,
        )
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["bytes"] == size
    digest = hashlib.md5()
    zeros = bytes(1024 * 1024)
    for _ in range(200):
        digest.update(zeros)
    assert f["signature"] == digest.hexdigest()
    growth_mib = (after - before) / 1024
    assert growth_mib < 64, f"peak RSS grew by {growth_mib:.0f} MiB for a 200 MiB upload"


# --- persistence ----------------------------------------------------------------------------


async def test_files_and_signed_urls_survive_restart(
    tmp_path: pathlib.Path, anon: httpx.AsyncClient
) -> None:
    config = emulator_config(tmp_path)
    headers = {"Authorization": f"Bearer {config.api_key}"}
    async with trio.open_nursery() as nursery:
        emu = await start_emulator(nursery, config)
        async with httpx.AsyncClient(base_url=emu.url, headers=headers) as c:
            f = await uploaded(c, "keep.jsonl", JSONL, "fine-tune")
            url = httpx.URL(await _signed(c, f["id"]))
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        emu = await start_emulator(nursery, config)
        async with httpx.AsyncClient(base_url=emu.url, headers=headers) as c:
            r = await c.get("/v1/files")
            assert r.json()["total"] == 1
            assert r.json()["data"][0] == f
            assert (await c.get(f"/v1/files/{f['id']}/content")).content == JSONL
        # A URL signed before the restart still verifies (the port may have changed).
        moved = url.copy_with(port=httpx.URL(emu.url).port)
        assert (await anon.get(moved)).content == JSONL
        nursery.cancel_scope.cancel()


async def test_blobs_are_stored_by_id_not_filename(
    client: httpx.AsyncClient, emulator: RunningEmulator
) -> None:
    f = await uploaded(client, "../../escape.jsonl", JSONL, "fine-tune")
    assert f["filename"] == "../../escape.jsonl"
    blob = emulator.data_dir / "blobs" / f["id"]
    assert blob.read_bytes() == JSONL
    names = {p.name for p in emulator.data_dir.rglob("*")}
    assert not any("escape" in n for n in names)
    assert not (emulator.data_dir.parent / "escape.jsonl").exists()
    assert (emulator.data_dir / "files.sqlite3").exists()


# --- batch outputs --------------------------------------------------------------------------


async def test_batch_output_admin_route(client: httpx.AsyncClient, anon: httpx.AsyncClient) -> None:
    content = b'{"custom_id": "1"}\n{"custom_id": "2"}\n{"custom_id": "3"}\n'
    r = await client.post(
        "/v1/_emulator/batch-outputs",
        files={"file": ("job_out.jsonl", content)},
        data={"sample_type": "batch_error"},
    )
    assert r.status_code == 200, r.text
    f = r.json()
    assert set(f) == FILE_FIELDS
    assert (f["purpose"], f["source"], f["sample_type"]) == ("batch", "mistral", "batch_error")
    assert (f["mimetype"], f["signature"], f["num_lines"]) == ("application/jsonl", None, 3)
    assert f["bytes"] == len(content) and f["filename"] == "job_out.jsonl"
    assert (await client.get(f"/v1/files/{f['id']}")).json()["signature"] is None

    url = await _signed(client, f["id"])
    r = await anon.get(url, headers={"Range": "bytes=0-4"})
    assert r.status_code == 206 and r.content == content[:5]
    etag = r.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 2
    assert (await anon.get(url)).headers["etag"] == etag  # stable

    r = await client.post("/v1/_emulator/batch-outputs", files={"file": ("x.jsonl", content)})
    assert r.json()["sample_type"] == "batch_result"
    r = await client.post(
        "/v1/_emulator/batch-outputs",
        files={"file": ("x.jsonl", content)},
        data={"sample_type": "instruct"},
    )
    assert r.status_code == 422


async def test_batch_output_python_api(tmp_path: pathlib.Path) -> None:
    config = emulator_config(tmp_path)
    storage = Storage(config.data_dir)
    record = storage.add_batch_output(b'{"a": 1}\n{"a": 2}\n', filename="results.jsonl")
    storage.close()
    assert (record.source, record.signature, record.num_lines) == ("mistral", None, 2)
    async with trio.open_nursery() as nursery:
        emu = await start_emulator(nursery, config)
        async with httpx.AsyncClient(
            base_url=emu.url, headers={"Authorization": f"Bearer {emu.api_key}"}
        ) as c:
            r = await c.get("/v1/files", params={"source": "mistral"})
            assert r.json()["data"] == [record.to_api()]
            assert r.json()["data"][0]["sample_type"] == "batch_result"
        nursery.cancel_scope.cancel()


def test_purpose_pages_are_newest_first_each_file_once(tmp_path: pathlib.Path) -> None:
    """A listing filtered by purpose (its own index) pages in the unfiltered order."""
    storage = Storage(tmp_path / "emu")
    for i, created in enumerate([5, 3, 5, 1, 3, 5, 2, 4]):
        purpose = "a" if i % 3 else "b"
        storage.add_file(
            b"x", filename=f"{i}", purpose=purpose, sample_type="x", created_at=created
        )
    everything, _ = storage.list(ListQuery(page_size=100))
    expected = [r.id for r in everything if r.purpose == "a"]
    pages = [storage.list(ListQuery(page=page, page_size=2, purpose="a")) for page in range(4)]
    storage.close()
    assert [r.id for records, _ in pages for r in records] == expected
    assert {total for _, total in pages} == {len(expected)}


# --- faults ---------------------------------------------------------------------------------


async def test_fault_status_times_and_retry_after(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/v1/_emulator/faults",
        json={"method": "GET", "path_prefix": "/v1/files", "status": 503, "times": 2,
              "retry_after": 0.5},
    )  # fmt: skip
    assert r.status_code == 200
    assert r.json()["faults"][0]["times"] == 2
    # Other methods are not affected.
    assert (await upload(client, "a.jsonl", JSONL, "fine-tune")).status_code == 200
    for _ in range(2):
        r = await client.get("/v1/files")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "0.5"
    r = await client.get("/v1/files")
    assert r.status_code == 200
    assert (await client.get("/v1/_emulator/faults")).json() == {"faults": []}


async def test_fault_429_body_and_raw_body(client: httpx.AsyncClient) -> None:
    await client.post(
        "/v1/_emulator/faults",
        json=[
            {"status": 429, "retry_after": 2},
            {"status": 502, "body": "<html>bad gateway</html>"},
        ],
    )
    r = await client.get("/v1/files")
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"
    assert r.json() == {
        "object": "error",
        "message": "Rate limit exceeded",
        "type": "rate_limited",
        "param": None,
        "code": "1300",
    }
    r = await client.get("/v1/files")
    assert r.status_code == 502
    assert r.text == "<html>bad gateway</html>"
    assert (await client.get("/v1/files")).status_code == 200


async def test_fault_on_storage_and_delay_and_clear(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    f = await uploaded(client, "a.jsonl", JSONL, "fine-tune")
    url = await _signed(client, f["id"])
    await client.post(
        "/v1/_emulator/faults", json={"path_prefix": "/storage/", "status": 500, "times": None}
    )
    assert (await anon.get(url)).status_code == 500
    assert (await anon.get(url)).status_code == 500
    assert (await client.get("/v1/files")).status_code == 200  # other paths untouched
    r = await client.delete("/v1/_emulator/faults")
    assert r.json() == {"faults": []}
    assert (await anon.get(url)).status_code == 200

    await client.post("/v1/_emulator/faults", json={"path_prefix": "/storage/", "delay": 0.3,
                                                   "status": None})  # fmt: skip
    start = time.monotonic()
    r = await anon.get(url)
    assert r.status_code == 200 and r.content == JSONL
    assert time.monotonic() - start >= 0.3


async def test_admin_routes_are_never_faulted(client: httpx.AsyncClient) -> None:
    await client.post("/v1/_emulator/faults", json={"path_prefix": "/v1", "status": 500})
    assert (await client.get("/v1/_emulator/faults")).status_code == 200
    assert (await client.get("/v1/_emulator/requests")).status_code == 200
    assert (await client.get("/v1/files")).status_code == 500


async def test_fault_on_upload_is_answered_not_stalled(client: httpx.AsyncClient) -> None:
    await client.post("/v1/_emulator/faults", json={"method": "POST", "status": 503})
    r = await upload(client, "big.bin", b"z" * 5_000_000)
    assert r.status_code == 503
    assert (await client.get("/v1/files")).json()["total"] == 0


@pytest.mark.parametrize(
    "spec",
    [{"status": "x"}, {"times": 0}, {"status": None}, {"bogus": 1}, [1], {"delay": -1}],
)
async def test_bad_fault_spec_is_422(client: httpx.AsyncClient, spec: Any) -> None:
    r = await client.post("/v1/_emulator/faults", json=spec)
    assert r.status_code == 422
    assert (await client.get("/v1/_emulator/faults")).json() == {"faults": []}


# --- request log ----------------------------------------------------------------------------


async def test_request_log_counts_api_calls(
    client: httpx.AsyncClient, anon: httpx.AsyncClient
) -> None:
    f = await uploaded(client, "a.jsonl", JSONL, "fine-tune")
    url = await _signed(client, f["id"])
    r = await client.delete("/v1/_emulator/requests")
    assert r.json() == {"count": 0, "requests": []}

    await client.get("/v1/files", params={"purpose": "ocr"})
    await client.get(f"/v1/files/{uuid.uuid4()}")
    await anon.get(url, headers={"Range": "bytes=0-3"})
    await client.get("/v1/_emulator/faults")  # admin: not logged

    log = (await client.get("/v1/_emulator/requests")).json()
    assert log["count"] == 3
    summary = [
        (e["method"], e["path"], e["query"], e["status"], e["range"]) for e in log["requests"]
    ]
    assert summary == [
        ("GET", "/v1/files", "purpose=ocr", 200, None),
        ("GET", summary[1][1], "", 404, None),
        ("GET", f"/storage/{f['id']}", "", 206, "bytes=0-3"),
    ]
    assert all(isinstance(e["time"], float) for e in log["requests"])


async def test_request_log_via_sync_helpers(emulator: RunningEmulator) -> None:
    import emulator_admin

    def scenario() -> list[dict[str, Any]]:
        emulator_admin.clear_requests(emulator.url, emulator.api_key)
        emulator_admin.set_faults(emulator.url, emulator.api_key, {"status": 503, "times": 1})
        with httpx.Client(
            base_url=emulator.url, headers={"Authorization": f"Bearer {emulator.api_key}"}
        ) as c:
            assert c.get("/v1/files").status_code == 503
            assert c.get("/v1/files").status_code == 200
        return emulator_admin.requests(emulator.url, emulator.api_key)

    entries = await trio.to_thread.run_sync(scenario)
    assert [(e["path"], e["status"]) for e in entries] == [("/v1/files", 503), ("/v1/files", 200)]


def test_parse_range_edges() -> None:
    from mistralfs.emulator.app import parse_range

    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-0", 10) == (0, 0)
    assert parse_range("bytes=0-1,3-4", 10) is None  # multi-range: serve everything
    assert parse_range("items=0-1", 10) is None
    assert parse_range("bytes=5-2", 10) is None
    assert parse_range("bytes=-100", 10) == (0, 9)
    assert parse_range("bytes=0-", 0) == "unsatisfiable"
    assert parse_range("bytes=abc", 10) is None


def test_json_dumps_of_records_is_stable() -> None:
    """to_api() is plain JSON (what the SDK and the fs client parse)."""
    from mistralfs.emulator.storage import FileRecord

    rec = FileRecord(
        str(uuid.uuid4()), 3, 1, "a", "batch", "batch_result", "mistral", 1, None, None
    )
    data = json.loads(json.dumps(rec.to_api()))
    assert list(data)[:2] == ["id", "object"]
    assert set(data) == FILE_FIELDS


async def test_huge_page_is_empty_not_an_error(client: httpx.AsyncClient) -> None:
    await uploaded(client, "a.jsonl", JSONL, "fine-tune")
    r = await client.get("/v1/files", params={"page": 10**30, "page_size": 10**30})
    assert r.status_code == 200
    assert r.json()["data"] == [] and r.json()["total"] == 1


async def test_logs_name_requests_but_never_secrets(
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    emulator: RunningEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mistralfs.emulator")
    f = await uploaded(client, "a.jsonl", JSONL, "fine-tune")
    url = httpx.URL(await _signed(client, f["id"]))
    await anon.get(url)
    messages = [r.getMessage() for r in caplog.records]
    assert f"GET /storage/{f['id']} 200" in messages
    assert "POST /v1/files 200" in messages
    text = "\n".join(messages)
    assert url.params["sig"] not in text
    assert emulator.api_key not in text


def test_process_prints_one_line_and_stops_cleanly(emulator_process: RunningEmulator) -> None:
    proc = emulator_process.process
    assert proc is not None and proc.stdout is not None
    r = httpx.get(
        f"{emulator_process.url}/v1/files",
        headers={"Authorization": f"Bearer {emulator_process.api_key}"},
    )
    assert r.json()["total"] == 0
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 0
    assert proc.stdout.read() == ""  # nothing after the "listening on" line


def test_process_stops_on_sigterm(emulator_process: RunningEmulator) -> None:
    proc = emulator_process.process
    assert proc is not None
    proc.terminate()
    assert proc.wait(timeout=10) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{emulator_process.url}/v1/files")


# --- bad input is a 4xx, never a 5xx --------------------------------------------------------

BOUNDARY = "mistralfsTestBoundary"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def _part(disposition: bytes, body: bytes) -> bytes:
    return b"--" + BOUNDARY.encode() + b"\r\n" + disposition + b"\r\n\r\n" + body + b"\r\n"


def _multipart(*parts: bytes, close: bool = True) -> bytes:
    return b"".join(parts) + (b"--" + BOUNDARY.encode() + b"--\r\n" if close else b"")


PURPOSE_PART = _part(b'Content-Disposition: form-data; name="purpose"', b"batch")


def _file_part(filename: bytes, body: bytes = b"x") -> bytes:
    return _part(b'Content-Disposition: form-data; name="file"; filename="' + filename + b'"', body)


@pytest.mark.parametrize(
    ("headers", "body", "status", "error_locs"),
    [
        (MULTIPART, b"not multipart at all", 400, None),
        (MULTIPART, _multipart(PURPOSE_PART, _file_part(b"a"), close=False), 400, None),
        (MULTIPART, b"--" + BOUNDARY.encode() + b"\r\nno header here\r\n\r\nx\r\n", 400, None),
        (
            {"Content-Type": "multipart/form-data; boundary=" + "b" * 300},
            b"--" + b"b" * 300 + b"--\r\n",
            400,
            None,
        ),
        (
            {"Content-Type": "multipart/form-data"},
            b"x",
            422,
            [["body", "file"]],
        ),
        (MULTIPART, _multipart(PURPOSE_PART), 422, [["body", "file"]]),
        (
            MULTIPART,
            _multipart(PURPOSE_PART, _part(b'Content-Disposition: form-data; name="file"', b"x")),
            422,
            [["body", "file"]],
        ),
        (
            MULTIPART,
            _multipart(
                PURPOSE_PART,
                _part(b'Content-Disposition: form-data; name="visibility"', b"everyone"),
                _file_part(b"a"),
            ),
            422,
            [["body", "visibility"]],
        ),
        (
            MULTIPART,
            _multipart(
                _part(b'Content-Disposition: form-data; name="expiry"', b"soon"), _file_part(b"a")
            ),
            422,
            [["body", "expiry"]],
        ),
        ({"Content-Type": "application/json"}, b'{"purpose": "batch"}', 422, None),
    ],
    ids=[
        "garbage",
        "unterminated",
        "broken-part-header",
        "boundary-too-long",
        "no-boundary",
        "no-file",
        "file-without-filename",
        "bad-visibility",
        "bad-expiry",
        "json-body",
    ],
)
async def test_malformed_uploads_are_refused_not_500(
    client: httpx.AsyncClient,
    emulator: RunningEmulator,
    headers: dict[str, str],
    body: bytes,
    status: int,
    error_locs: list[list[str]] | None,
) -> None:
    r = await client.post("/v1/files", headers=headers, content=body)
    assert r.status_code == status, r.text
    if status == 400:
        assert r.json() == {"detail": "There was an error parsing the body"}
    else:
        problems = r.json()["detail"]
        assert all({"type", "loc", "msg", "input"} <= set(p) for p in problems)
        if error_locs is not None:
            assert [p["loc"] for p in problems] == error_locs
    assert (await client.get("/v1/files")).json()["total"] == 0
    assert list((emulator.data_dir / "tmp").iterdir()) == []
    assert list((emulator.data_dir / "blobs").iterdir()) == []


@pytest.mark.parametrize("data", [{}, {"purpose": ""}], ids=["missing", "empty"])
async def test_a_missing_purpose_is_fine_tune(
    client: httpx.AsyncClient, data: dict[str, str]
) -> None:
    """`purpose` is optional; the emulator's default is fine-tune (docs/EMULATOR.md), whose
    content rules then apply."""
    r = await client.post("/v1/files", files={"file": ("a.jsonl", JSONL)}, data=data)
    assert r.status_code == 200, r.text
    assert (r.json()["purpose"], r.json()["sample_type"]) == ("fine-tune", "instruct")
    r = await client.post("/v1/files", files={"file": ("a.pdf", PDF)}, data=data)
    assert r.status_code == 400
    assert r.json()["detail"] == "Invalid file format."


async def test_unknown_purpose_is_accepted_like_the_service(client: httpx.AsyncClient) -> None:
    """The service takes purposes beyond the spec's three (audio, ...); so does the emulator."""
    f = await uploaded(client, "x.bin", b"data", "made-up-purpose")
    assert (f["purpose"], f["sample_type"]) == ("made-up-purpose", "pretrain")


@pytest.mark.parametrize(
    ("purpose", "filename", "content"),
    [("audio", "talk.mp3", b"ID3\x03\x00rest"), ("agentic_safety", "cases.jsonl", JSONL)],
)
async def test_audio_and_agentic_safety_are_purposes_like_the_others(
    client: httpx.AsyncClient, purpose: str, filename: str, content: bytes
) -> None:
    f = await uploaded(client, filename, content, purpose)
    assert f["purpose"] == purpose
    assert f["sample_type"] in SPEC_SAMPLE_TYPES
    listed = (await client.get("/v1/files", params={"purpose": purpose})).json()
    assert [g["id"] for g in listed["data"]] == [f["id"]]


async def test_repository_files_are_listed_and_served_but_not_deleted(
    client: httpx.AsyncClient,
) -> None:
    r = await client.post(
        "/v1/_emulator/files",
        files={"file": ("base.jsonl", JSONL)},
        data={"purpose": "fine-tune", "sample_type": "pretrain"},
    )
    assert r.status_code == 200, r.text
    f = r.json()
    assert (f["source"], f["purpose"], f["sample_type"]) == ("repository", "fine-tune", "pretrain")
    assert (f["num_lines"], f["mimetype"]) == (3, "application/jsonl")
    assert f["signature"] == hashlib.md5(JSONL).hexdigest()
    r = await client.delete(f"/v1/files/{f['id']}")
    assert r.status_code == 403
    assert r.json() == {"detail": "Files from a repository cannot be deleted"}
    assert (await client.get(f"/v1/files/{f['id']}/content")).content == JSONL
    listed = (await client.get("/v1/files", params={"source": "repository"})).json()["data"]
    assert [g["id"] for g in listed] == [f["id"]]


@pytest.mark.parametrize(
    ("data", "loc"),
    [({"source": "elsewhere"}, ["body", "source"]), ({"expiry": "x"}, ["body", "expiry"])],
)
async def test_admin_file_route_checks_its_fields(
    client: httpx.AsyncClient, data: dict[str, str], loc: list[str]
) -> None:
    r = await client.post("/v1/_emulator/files", files={"file": ("a", b"x")}, data=data)
    assert r.status_code == 422
    assert [p["loc"] for p in r.json()["detail"]] == [loc]
    r = await client.post("/v1/_emulator/files", data={"source": "upload"})
    assert [p["loc"] for p in r.json()["detail"]] == [["body", "file"]]


JOB_ID = "6547352e-c7eb-414c-a275-e522865732aa"  # fixed: test ids must not change between runs


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("GET", f"/v1/fine_tuning/jobs/{JOB_ID}"),
        ("POST", f"/v1/fine_tuning/jobs/{JOB_ID}/cancel"),
    ],
)
async def test_the_fine_tuning_jobs_api_is_gone(
    client: httpx.AsyncClient,
    anon: httpx.AsyncClient,
    emulator: RunningEmulator,
    method: str,
    path: str,
) -> None:
    ft = await uploaded(client, "train.jsonl", JSONL, "fine-tune")
    r = await client.request(method, path, json={"training_files": [ft["id"]]})
    assert r.status_code == 410
    assert "retired" in r.json()["detail"]
    assert (await anon.request(method, emulator.url + path)).status_code == 401  # key first
    assert (await client.get(f"/v1/files/{ft['id']}/content")).content == JSONL


async def test_huge_page_size_is_fine(client: httpx.AsyncClient) -> None:
    f = await uploaded(client, "a.jsonl", JSONL, "fine-tune")
    r = await client.get("/v1/files", params={"page_size": str(10**40), "page": "0"})
    assert r.status_code == 200
    assert [g["id"] for g in r.json()["data"]] == [f["id"]]


@pytest.mark.parametrize(
    "file_id", ["%00", "x" * 5000, "%ff%fe", "%20", "12345678-1234-5678-1234-56781234567g", "..%5c"]
)
async def test_non_uuid_ids_never_500(
    client: httpx.AsyncClient, anon: httpx.AsyncClient, emulator: RunningEmulator, file_id: str
) -> None:
    for method, suffix in [("GET", ""), ("DELETE", ""), ("GET", "/content"), ("GET", "/url")]:
        r = await client.request(method, f"{emulator.url}/v1/files/{file_id}{suffix}")
        assert r.status_code in (404, 422), (method, suffix, r.text)
        if r.status_code == 422:
            assert r.json()["detail"][0]["type"] == "uuid_parsing"
    r = await anon.get(f"{emulator.url}/storage/{file_id}?se=1&sig=00")
    _assert_azure_error(r, 403, "AuthenticationFailed")


def _tree(root: pathlib.Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.mark.parametrize(
    ("filename", "kept"),
    [
        (b"../../etc/passwd", "../../etc/passwd"),
        (b"/etc/passwd", "/etc/passwd"),
        (b"../../../../tmp/escaped-by-upload", "../../../../tmp/escaped-by-upload"),
        (b"a\x00b", "a\x00b"),
        (b"..", ".."),
        (b"dir/sub/name.jsonl", "dir/sub/name.jsonl"),
        # python-multipart (so Starlette, so the real FastAPI service too) keeps only
        # what follows the last backslash, as old IE sent whole Windows paths.
        (b"C:\\Windows\\x.ini", "x.ini"),
    ],
)
async def test_filenames_are_metadata_only(
    client: httpx.AsyncClient,
    emulator: RunningEmulator,
    tmp_path: pathlib.Path,
    filename: bytes,
    kept: str,
) -> None:
    passwd = os.stat("/etc/passwd")
    before = _tree(tmp_path)
    content = os.urandom(64)
    r = await client.post(
        "/v1/files",
        headers=MULTIPART,
        content=_multipart(PURPOSE_PART, _file_part(filename, content)),
    )
    assert r.status_code == 200, r.text
    f = r.json()
    assert f["filename"] == kept
    assert (await client.get(f"/v1/files/{f['id']}")).json()["filename"] == kept
    new = _tree(tmp_path) - before
    assert new == {f"emu/blobs/{f['id']}"}, new
    assert (emulator.data_dir / "blobs" / f["id"]).read_bytes() == content
    assert not await trio.Path("/tmp/escaped-by-upload").exists()
    after = os.stat("/etc/passwd")
    assert (after.st_mtime_ns, after.st_size) == (passwd.st_mtime_ns, passwd.st_size)
