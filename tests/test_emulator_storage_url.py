"""The emulator's --storage-url: signed URLs on another host, as the service uses Azure Blob.

With ``storage_url`` set, ``/v1/files/{id}/url`` answers ``BASE/<id>?se=..&sp=r&sig=..``.
The query is the one the emulator's own ``/storage/<id>`` route accepts, and the blob a
static server at BASE would serve is ``DATA/blobs/<id>``, byte for byte.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import httpx
import pytest
import trio
from conftest import RunningEmulator, emulator_config, start_emulator

from mistralfs.cli import build_parser

BASE = "http://blobs.example.invalid:8081/blobs"
CONTENT = b'{"a": 1}\n' * 1000


@pytest.fixture
async def emulator(tmp_path: pathlib.Path) -> AsyncIterator[RunningEmulator]:
    """The in-process emulator, with signed URLs pointing at BASE."""
    async with trio.open_nursery() as nursery:
        yield await start_emulator(nursery, emulator_config(tmp_path, storage_url=BASE + "/"))
        nursery.cancel_scope.cancel()


async def test_signed_url_points_at_storage_base_and_still_verifies(
    emulator: RunningEmulator,
) -> None:
    headers = {"Authorization": f"Bearer {emulator.api_key}"}
    async with httpx.AsyncClient(base_url=emulator.url, headers=headers) as client:
        r = await client.post(
            "/v1/files", files={"file": ("a.jsonl", CONTENT)}, data={"purpose": "batch"}
        )
        assert r.status_code == 200, r.text
        file_id = r.json()["id"]
        r = await client.get(f"/v1/files/{file_id}/url", params={"expiry": 2})
        assert r.status_code == 200, r.text
    url = httpx.URL(r.json()["url"])

    # BASE/<id> (one slash, whatever BASE ends with) and the usual SAS-like query.
    assert str(url).startswith(f"{BASE}/{file_id}?")
    assert url.path == f"/blobs/{file_id}"
    assert set(url.params) == {"se", "sp", "sig"} and url.params["sp"] == "r"

    # What a static server over DATA/blobs would serve for that path.
    assert (emulator.data_dir / "blobs" / file_id).read_bytes() == CONTENT

    # The same query on the emulator's own route is accepted (and ranges still work) ...
    own = httpx.URL(emulator.url).copy_with(path=f"/storage/{file_id}", query=url.query)
    async with httpx.AsyncClient() as anon:
        r = await anon.get(own)
        assert r.status_code == 200 and r.content == CONTENT
        r = await anon.get(own, headers={"Range": "bytes=9-17"})
        assert r.status_code == 206 and r.content == CONTENT[9:18]
        # ... and a tampered signature is still refused there.
        sig = url.params["sig"]
        bad = own.copy_set_param("sig", ("0" if sig[0] != "0" else "1") + sig[1:])
        r = await anon.get(bad)
        assert r.status_code == 403 and b"AuthenticationFailed" in r.content


def test_cli_passes_storage_url() -> None:
    args = build_parser().parse_args(["emulator", "--storage-url", BASE])
    assert args.storage_url == BASE
    assert build_parser().parse_args(["emulator"]).storage_url is None
