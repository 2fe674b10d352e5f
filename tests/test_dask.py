"""`dask.bag.read_text("mistral://batch/*.jsonl")` on a local cluster of worker processes.

Each worker unpickles the filesystem from its storage_options and opens its own client
(its own trio thread and connections); every line is read once.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from conftest import RunningEmulator, emulator_process_with
from emulator_admin import add_batch_output

FILES = 8
LINES = 250


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningEmulator]:
    with emulator_process_with(tmp_path_factory.mktemp("dask")) as running:
        yield running


def where_read(lines: Iterable[str]) -> list[dict[str, Any]]:
    """One partition (one file): its records, and which process read them with which
    client thread."""
    records = [json.loads(line) for line in lines]
    threads = [t.name for t in threading.enumerate() if t.name == "mistralfs-trio"]
    return [{"pid": os.getpid(), "records": records, "client_threads": len(threads)}]


def test_a_cluster_of_processes_reads_every_line_once(server: RunningEmulator) -> None:
    import dask.bag as db
    from distributed import Client, LocalCluster

    for i in range(FILES):
        lines = b"".join(b'{"file": %d, "line": %d}\n' % (i, j) for j in range(LINES))
        add_batch_output(server.url, server.api_key, lines, f"results-{i}.jsonl")
    add_batch_output(server.url, server.api_key, b'{"not": "matched"}\n', "errors.txt")
    options = {"api_key": server.api_key, "server_url": server.url}

    with (
        LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        bag = db.read_text("mistral://batch/*.jsonl", storage_options=options)
        assert bag.npartitions == FILES
        parts = bag.map_partitions(where_read).compute()

    seen = [(r["file"], r["line"]) for part in parts for r in part["records"]]
    assert len(seen) == FILES * LINES
    assert sorted(seen) == [(i, j) for i in range(FILES) for j in range(LINES)]  # each once
    pids = {part["pid"] for part in parts}
    assert len(pids) == 2 and os.getpid() not in pids  # in parallel, in both workers
    assert all(part["client_threads"] >= 1 for part in parts)  # each worker's own client
