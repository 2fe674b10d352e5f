"""The Prometheus endpoint (`--metrics-address`), scraped on a real mount of the emulator.

Every value checked is one the test caused: bytes read, a re-read from memory, an upload,
a refusal, a retried answer. Scrapes are parsed with prometheus_client's own parsers.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import RunningEmulator
from emulator_admin import set_faults
from mistralai.client import Mistral
from mounting import Mounted, force_unmount, is_mounted, mount, mount_command, wait_for
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from mistralfs.config import ConfigError, parse_address
from mistralfs.daemon.metrics import route_labels

OPENMETRICS = "application/openmetrics-text; version=1.0.0"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples_of(text: str, *, openmetrics: bool = True) -> Samples:
    parse = parse_om if openmetrics else parse_text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in parse(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def status_of(mounted: Mounted) -> dict:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(mounted.run_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "mistralfs", "status", str(mounted.path), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(result.stdout)


class Scraper:
    def __init__(self, url: str) -> None:
        self.url = url
        self.texts: list[str] = []

    def __call__(self) -> Samples:
        answer = httpx.get(self.url, headers={"Accept": OPENMETRICS}, timeout=10)
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("application/openmetrics-text")
        self.texts.append(answer.text)
        return samples_of(answer.text)


@pytest.fixture
def metered(emulator_process: RunningEmulator, tmp_path: Path) -> Iterator[Mounted]:
    with mount(emulator_process, tmp_path, "--metrics-address", "127.0.0.1:0") as mounted:
        yield mounted


def test_scrape_counts_what_the_mount_did(
    metered: Mounted, emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    data = os.urandom(100_000)  # one block: read whole from /content
    remote = sdk.files.upload(file={"file_name": "data.bin", "content": data}, purpose="batch")
    url = status_of(metered)["metrics"]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url)
    shown = subprocess.run(  # the port the system chose, also where people read status
        [sys.executable, "-m", "mistralfs", "status", str(metered.path)],
        env={**os.environ, "XDG_RUNTIME_DIR": str(metered.run_dir)},
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert f" metrics: {url}" in shown.stdout.splitlines()
    scrape = Scraper(url)
    before = scrape()
    assert value(before, "mistralfs_uploads_in_flight") == 0

    # A read: its bytes come from the network, once.
    assert (metered / "batch" / "data.bin").read_bytes() == data
    read = scrape()
    tier = "mistralfs_read_bytes_total"
    assert value(read, tier, source="network") - value(before, tier, source="network") == len(data)
    content = {"method": "GET", "route": "/v1/files/{id}/content", "status": "200"}
    assert value(read, "mistralfs_responses_total", **content) == 1
    assert value(read, "mistralfs_read_seconds_count", outcome="ok") >= 1
    content.pop("status")
    assert value(read, "mistralfs_request_seconds_count", **content) == 1

    # A re-read, the kernel's pages dropped: from memory, not the network.
    with open(metered / "batch" / "data.bin", "rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    with open(metered / "batch" / "data.bin", "rb") as f:
        assert f.read() == data
    again = scrape()
    assert value(again, tier, source="memory") - value(read, tier, source="memory") == len(data)
    assert value(again, tier, source="network") == value(read, tier, source="network")
    assert value(again, "mistralfs_cache_hits_total") > value(read, "mistralfs_cache_hits_total")
    assert 0 < value(again, "mistralfs_cache_hit_ratio") <= 1

    # An upload: counted, its bytes and its time.
    (metered / "batch" / "up.bin").write_bytes(b"u" * 5000)
    wait_for(lambda: value(scrape(), "mistralfs_uploads_total") == 1)
    uploaded = scrape()
    assert value(uploaded, "mistralfs_uploaded_bytes_total") == 5000
    assert value(uploaded, "mistralfs_upload_seconds_count", outcome="ok") == 1
    upload = {"method": "POST", "route": "/v1/files", "status": "200"}
    assert value(uploaded, "mistralfs_responses_total", **upload) == 1
    upload.pop("status")
    assert value(uploaded, "mistralfs_request_seconds_count", **upload) == 1

    # A refusal: the service's 4xx by route and status, a failed upload kept for recovery.
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b'{"ok": 1}\nthis is not json\n')
    copied = subprocess.run(["cp", str(broken), str(metered / "fine-tune")], capture_output=True)
    assert copied.returncode != 0
    refused = scrape()
    statuses = {
        labels["status"]: count
        for (name, frozen), count in refused.items()
        if name == "mistralfs_responses_total"
        and (labels := dict(frozen))["route"] == "/v1/files"
        and labels["method"] == "POST"
    }
    assert set(statuses) == {"200", "400"}, statuses
    assert statuses["400"] == 1
    assert value(refused, "mistralfs_errors_total", kind="Rejected") == 1
    assert value(refused, "mistralfs_upload_failures_total") == 1
    assert value(refused, "mistralfs_upload_seconds_count", outcome="failed") == 1
    assert value(refused, "mistralfs_recovery_files") == 1

    # A 503 answered once, then the retry succeeds: one retry, both answers counted.
    set_faults(
        emulator_process.url,
        emulator_process.api_key,
        {"method": "GET", "path_prefix": "/v1/files", "status": 503, "times": 1},
    )
    assert os.listdir(metered / "ocr") == []  # its first listing, answered 503 then 200
    retried = scrape()
    listing = {"method": "GET", "route": "/v1/files"}
    assert (
        value(retried, "mistralfs_retries_total", **listing)
        == value(refused, "mistralfs_retries_total", **listing) + 1
    )
    assert value(retried, "mistralfs_responses_total", **listing, status="503") == 1

    # Nothing secret, nothing unbounded: no key, no signed URL, no id, no name.
    for text in scrape.texts:
        assert emulator_process.api_key not in text
        assert "sig=" not in text and "/storage" not in text and emulator_process.url not in text
        assert remote.id not in text
        assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-", text)
        assert "data.bin" not in text and "broken" not in text
        assert text.endswith("# EOF\n")


def test_uploads_in_flight_show_bytes_sent_of_their_total_in_either_format(
    metered: Mounted, emulator_process: RunningEmulator
) -> None:
    set_faults(  # the service takes two seconds to answer this upload
        emulator_process.url,
        emulator_process.api_key,
        {"method": "POST", "path_prefix": "/v1/files", "status": None, "delay": 2.0},
    )
    scrape = Scraper(status_of(metered)["metrics"])
    size = 3 * 1024 * 1024
    writer = threading.Thread(
        target=(metered / "batch" / "slow.bin").write_bytes, args=(b"s" * size,)
    )
    writer.start()
    try:
        during = wait_for(lambda: (s := scrape()) and value(s, "mistralfs_uploads_in_flight") and s)
        assert value(during, "mistralfs_uploads_in_flight") == 1
        assert value(during, "mistralfs_uploads_in_flight_total_bytes") == size
        assert 0 <= value(during, "mistralfs_uploads_in_flight_sent_bytes") <= size
        assert value(during, "mistralfs_uploads_total") == 0
    finally:
        writer.join(timeout=30)
    after = scrape()
    assert value(after, "mistralfs_uploads_in_flight") == 0
    assert value(after, "mistralfs_uploads_in_flight_total_bytes") == 0
    assert value(after, "mistralfs_uploaded_bytes_total") == size
    assert value(after, "mistralfs_upload_seconds_sum", outcome="ok") >= 2.0

    # Without an Accept header: Prometheus' classic text format, the same values.
    answer = httpx.get(scrape.url, timeout=10)
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert value(samples_of(answer.text, openmetrics=False), "mistralfs_uploads_total") == 1
    assert httpx.get(scrape.url.replace("/metrics", "/"), timeout=10).status_code == 404


def test_blocks_evicted_from_memory_are_read_from_the_disk_tier(
    emulator_process: RunningEmulator, sdk: Mistral, tmp_path: Path
) -> None:
    small, large = os.urandom(200_000), os.urandom(1024 * 1024)
    sdk.files.upload(file={"file_name": "a.bin", "content": small}, purpose="batch")
    sdk.files.upload(file={"file_name": "b.bin", "content": large}, purpose="batch")
    options = ["--disk-cache", str(tmp_path / "blocks"), "--cache-size", "1M"]
    with mount(emulator_process, tmp_path, *options, "--metrics-address", ":0") as mounted:
        scrape = Scraper(status_of(mounted)["metrics"])
        assert (mounted / "batch" / "a.bin").read_bytes() == small
        assert (mounted / "batch" / "b.bin").read_bytes() == large  # a.bin leaves memory
        both = len(small) + len(large)
        wait_for(lambda: value(scrape(), "mistralfs_disk_cache_bytes") >= both)  # with headers
        before = scrape()
        with open(mounted / "batch" / "a.bin", "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            assert f.read() == small
        after = scrape()
    tier = "mistralfs_read_bytes_total"
    assert value(before, tier, source="network") == both
    assert value(before, tier, source="disk") == 0
    assert value(after, tier, source="disk") == len(small)
    assert value(after, tier, source="network") == both
    assert value(after, "mistralfs_disk_cache_hits_total") == 1


def test_port_in_use_refuses_the_mount(emulator_process: RunningEmulator, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command, env, mounted = mount_command(
            emulator_process, tmp_path, "-o", f"metrics_address=127.0.0.1:{port}"
        )
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
            assert result.returncode == 1
            assert f"cannot serve metrics at 127.0.0.1:{port}: Address already in use" in (
                result.stderr
            )
            assert not is_mounted(mounted.path)
        finally:
            force_unmount(mounted, env)


@pytest.mark.parametrize("option", ["--metrics-address=nowhere:port", "-o metrics_address=::1:80"])
def test_a_bad_address_is_refused_with_its_reason(option: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mistralfs", "mount", str(tmp_path), *option.split(" ")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "invalid metrics address" in result.stderr and "HOST:PORT" in result.stderr


def test_addresses_and_route_labels() -> None:
    assert parse_address(":9464") == parse_address("9464") == ("127.0.0.1", 9464)
    assert parse_address("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    for bad in ("host:", "host:65536", "::1:80", ""):
        with pytest.raises(ConfigError):
            parse_address(bad)
    assert route_labels("storage") == ("GET", "storage")
    assert route_labels("GET /v1/files/{id}/content") == ("GET", "/v1/files/{id}/content")
    # An id that route() did not know for one still never becomes a label.
    assert route_labels("GET /v1/batch/jobs/job_8f3a2c") == ("GET", "/v1/batch/jobs/{id}")
