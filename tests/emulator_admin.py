"""Small synchronous helpers around the emulator's admin routes, for any test.

They talk HTTP (httpx), so they work with the in-process ``emulator`` fixture
and with ``emulator_process`` alike. Sync httpx does blocking I/O: call them
from sync tests, or from trio tests via ``trio.to_thread.run_sync``, never
directly inside an async test that serves the in-process emulator.
"""

from __future__ import annotations

from typing import Any

import httpx


def _client(url: str, api_key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30)


def add_batch_output(
    url: str,
    api_key: str,
    content: bytes,
    filename: str = "output.jsonl",
    sample_type: str = "batch_result",
) -> dict[str, Any]:
    """Create a batch job output file (purpose batch, source mistral); returns its File object."""
    with _client(url, api_key) as client:
        r = client.post(
            "/v1/_emulator/batch-outputs",
            files={"file": (filename, content)},
            data={"sample_type": sample_type},
        )
        r.raise_for_status()
        return r.json()


def set_faults(url: str, api_key: str, *faults: dict[str, Any]) -> list[dict[str, Any]]:
    """Add fault rules (see mistralfs.emulator.faults); returns the active rules."""
    with _client(url, api_key) as client:
        r = client.post("/v1/_emulator/faults", json=list(faults))
        r.raise_for_status()
        return r.json()["faults"]


def clear_faults(url: str, api_key: str) -> None:
    """Remove every fault rule."""
    with _client(url, api_key) as client:
        client.delete("/v1/_emulator/faults").raise_for_status()


def requests(url: str, api_key: str) -> list[dict[str, Any]]:
    """Requests answered since the last clear: [{method, path, query, status, range, time}]."""
    with _client(url, api_key) as client:
        r = client.get("/v1/_emulator/requests")
        r.raise_for_status()
        return r.json()["requests"]


def clear_requests(url: str, api_key: str) -> None:
    """Empty the request log, e.g. before the part of a test that must make no API call."""
    with _client(url, api_key) as client:
        client.delete("/v1/_emulator/requests").raise_for_status()


def advance_clock(url: str, api_key: str, seconds: float) -> float:
    """Move the emulator's clock on (files expire by it); returns its offset now."""
    with _client(url, api_key) as client:
        r = client.post("/v1/_emulator/clock", json={"advance": seconds})
        r.raise_for_status()
        return r.json()["offset"]


def add_file(
    url: str,
    api_key: str,
    content: bytes,
    filename: str = "file.jsonl",
    **fields: str,
) -> dict[str, Any]:
    """Create any file, content unchecked (`source` defaults to repository; also `purpose`,
    `sample_type`, `expiry`, `visibility`); returns its File object."""
    with _client(url, api_key) as client:
        r = client.post("/v1/_emulator/files", files={"file": (filename, content)}, data=fields)
        r.raise_for_status()
        return r.json()


def empty_account(url: str, api_key: str) -> None:
    """Delete every file of the account (through the Files API), for tests that share
    one emulator and must each start from nothing."""
    with _client(url, api_key) as client:
        for f in client.get("/v1/files", params={"page_size": 1000}).json()["data"]:
            client.delete(f"/v1/files/{f['id']}").raise_for_status()
