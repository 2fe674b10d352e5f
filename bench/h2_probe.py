"""Would HTTP/2 to the API host beat the client's HTTP/1.1 transport? A measurement.

    .venv/bin/python bench/h2_probe.py [--rtt 30,100] [--ks 8,16,32] [--reps 3]

The emulator serves HTTPS (``--tls``, hypercorn, which offers h2 by ALPN) with N small
files (2 KiB, purpose batch), behind the shaping proxy bench/mfsbench/link.py (one RTT, a rate
cap per connection). Three clients, each cold (a new client per sample, so that the
handshakes count), fetch ``GET /v1/files/{id}/content`` of all N with K requests at once:

- ``threaded``: httpx.AsyncClient over the client's ThreadedTransport (HTTP/1.1 by
  http.client in worker threads, up to 32 connections per host), as mistralfs does;
- ``h2``: httpx.AsyncClient(http2=True): one TLS connection, K streams on it (the
  negotiated version is checked on every answer);
- ``h1``: httpx's own HTTP/1.1 transport (h11 on the trio thread), K connections.

Beside the wall time, each sample records the client's CPU (this process's time: all
its threads, the worker threads' too), the emulator's and the proxy's (whether either,
not the link, set the pace) and the load average (other benchmarks share the machine).
Also: a listing ``GET /v1/files?page_size=100`` 10 times in a row on one new client,
and a 64 MiB upload (hypercorn's h2 flow-control window is 64 KiB: an h2 upload is
expected to move 64 KiB per round trip). An h2 upload slower than ``--slow-upload``
seconds is not repeated: its time is the window's, not noise.

Samples rotate which client goes first; the table shows medians. Everything runs in a
temporary folder and every process started here is stopped by its pid.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio
from mfsbench.procs import cpu_seconds, end_process, start_announced

from mistralfs.api.tls import client_context
from mistralfs.api.transport import MAX_CONNECTIONS_PER_HOST, ThreadedTransport

KEY = "probe-key"
KiB, MiB = 1024, 1024 * 1024
LINK_PY = Path(__file__).resolve().parent / "mfsbench" / "link.py"
CLIENTS = ["threaded", "h2", "h1"]  # --clients may add threaded64 (64 per host)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load() -> float:
    return os.getloadavg()[0]


@dataclass
class Sample:
    wall: float
    cpu: float  # this process (the client), seconds
    emu_cpu: float  # share of one core
    link_cpu: float  # share of one core
    load: float
    versions: set[str] = field(default_factory=set)
    connections: int = 0  # kept open at the end (h2: should be 1)


class World:
    """The emulator over TLS, its seeded files, and a link proxy in front of it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen] = []
        self.link: subprocess.Popen | None = None
        self.emu_url = ""
        self.url = ""  # through the link
        self.ids: list[str] = []

    def start_emulator(self) -> None:
        data = self.work / "emu"
        cmd = [sys.executable, "-m", "mistralfs", "emulator", "--tls", "--port", "0"]
        cmd += ["--data", str(data), "--api-key", KEY, "--max-file-size", "1G"]
        cmd += ["--log-level", "warning"]
        announce = "mistralfs emulator listening on "
        self.emu_url = start_announced(cmd, self.work / "emulator.log", announce, self.procs)
        self.emu = self.procs[-1]
        ca = data / "tls" / "cert.pem"
        # One context per client kind: httpcore sets ALPN on the context it is given
        # (h2 and http/1.1 with http2=True), and http.client sends whatever ALPN its
        # context holds, so a shared context would lead hypercorn to answer the
        # threaded transport's HTTP/1.1 with h2 frames (BadStatusLine).
        self.ctx = client_context(ca)  # the product's, for ThreadedTransport only
        self.httpx_ctx = {kind: ssl.create_default_context(cafile=ca) for kind in ("h2", "h1")}
        self.seed_ctx = ssl.create_default_context(cafile=ca)
        log(f"emulator at {self.emu_url} (pid {self.emu.pid})")

    def seed(self, n: int, size: int) -> None:
        t0 = time.perf_counter()
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=self.emu_url, headers=headers, verify=self.seed_ctx) as api:
            for i in range(n):
                body = os.urandom(size)
                r = api.post(
                    "/v1/files", files={"file": (f"s{i:05d}.bin", body)}, data={"purpose": "batch"}
                )
                r.raise_for_status()
                self.ids.append(r.json()["id"])
        log(f"seeded {n} files of {size} bytes in {time.perf_counter() - t0:.1f}s")

    @contextlib.contextmanager
    def over(self, rtt_ms: float, rate: str) -> Iterator[None]:
        port = self.emu_url.rsplit(":", 1)[1]
        cmd = [sys.executable, str(LINK_PY), "--link", f"rtt={rtt_ms:g}ms,rate={rate}"]
        cmd += ["--upstream", f"127.0.0.1:{port}"]
        procs: list[subprocess.Popen] = []
        try:
            address = start_announced(cmd, self.work / "link.log", "link listening on ", procs)
            self.link = procs[0]
            self.url = f"https://{address.split()[0]}"
            log(f"link rtt={rtt_ms:g}ms rate={rate} at {self.url} (pid {self.link.pid})")
            yield
        finally:
            for proc in procs:
                end_process(proc.pid, proc)
            self.link = None

    def close(self) -> None:
        for proc in self.procs:
            end_process(proc.pid, proc)

    def client(self, kind: str, k: int, timeout: float = 600) -> httpx.AsyncClient:
        common: dict = {
            "base_url": self.url,
            "headers": {"Authorization": f"Bearer {KEY}"},
            "timeout": timeout,
        }
        if kind.startswith("threaded"):
            per_host = int(kind.removeprefix("threaded") or MAX_CONNECTIONS_PER_HOST)
            transport = ThreadedTransport(self.ctx, max_per_host=per_host)
            return httpx.AsyncClient(transport=transport, **common)
        limits = httpx.Limits(max_connections=k, max_keepalive_connections=k)
        return httpx.AsyncClient(
            http2=(kind == "h2"), verify=self.httpx_ctx[kind], limits=limits, **common
        )

    def measure(self, work: Callable[[], Awaitable[Sample]]) -> Sample:
        """Run ``work`` under trio, with the CPU of every side around it."""
        assert self.link is not None
        pids = [self.emu.pid, self.link.pid]
        before = [cpu_seconds(pid) for pid in pids]
        ld = load()
        c0, t0 = time.process_time(), time.perf_counter()
        sample = trio.run(work)
        wall = time.perf_counter() - t0
        sample.wall = wall
        sample.cpu = time.process_time() - c0
        used = [(cpu_seconds(p) - b) / wall for p, b in zip(pids, before, strict=True)]
        sample.emu_cpu, sample.link_cpu = used
        sample.load = max(ld, load())
        return sample


def connections(client: httpx.AsyncClient) -> int:
    transport = client._transport  # a probe looks inside
    if isinstance(transport, ThreadedTransport):
        return transport.idle_connections()
    pool = transport._pool  # type: ignore[attr-defined]
    return len(pool.connections)


def version(response: httpx.Response) -> str:
    return response.http_version


async def fetch_all(w: World, kind: str, k: int, size: int) -> Sample:
    sample = Sample(0, 0, 0, 0, 0)
    limit = trio.Semaphore(k)
    async with w.client(kind, k) as client:

        async def one(file_id: str) -> None:
            async with limit:
                r = await client.get(f"/v1/files/{file_id}/content")
                r.raise_for_status()
                if len(r.content) != size:
                    raise RuntimeError(f"{file_id}: {len(r.content)} bytes, want {size}")
                sample.versions.add(version(r))

        async with trio.open_nursery() as nursery:
            for file_id in w.ids:
                nursery.start_soon(one, file_id)
        sample.connections = connections(client)
    return sample


async def listing(w: World, kind: str, times: int, firsts: list[float]) -> Sample:
    sample = Sample(0, 0, 0, 0, 0)
    async with w.client(kind, 1) as client:
        for i in range(times):
            t0 = time.perf_counter()
            r = await client.get("/v1/files", params={"page_size": 100})
            r.raise_for_status()
            if i == 0:
                firsts.append(time.perf_counter() - t0)
            sample.versions.add(version(r))
        sample.connections = connections(client)
    return sample


async def upload(w: World, kind: str, body: bytes) -> Sample:
    sample = Sample(0, 0, 0, 0, 0)
    async with w.client(kind, 1, timeout=900) as client:
        r = await client.post(
            "/v1/files", files={"file": ("big.bin", body)}, data={"purpose": "batch"}
        )
        r.raise_for_status()
        sample.versions.add(version(r))
        file_id = r.json()["id"]
        if r.json()["bytes"] != len(body):
            raise RuntimeError(f"upload: {r.json()['bytes']} bytes stored, want {len(body)}")
        sample.connections = connections(client)
        (await client.delete(f"/v1/files/{file_id}")).raise_for_status()
    return sample


def med(samples: list[Sample], attr: str) -> float:
    return statistics.median(getattr(s, attr) for s in samples)


def spread(samples: list[Sample]) -> str:
    walls = [s.wall for s in samples]
    return f"{min(walls):.2f}-{max(walls):.2f}"


def rotated(rep: int) -> list[str]:
    r = rep % len(CLIENTS)
    return CLIENTS[r:] + CLIENTS[:r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rtt", default="30,100", help="ms, comma-separated")
    p.add_argument("--rate", default="60MB/s")
    p.add_argument("--ks", default="8,16,32")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--size", type=int, default=2 * KiB)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--clients", default=",".join(CLIENTS), help="also: threaded64")
    p.add_argument("--list-times", type=int, default=10, help="0: no listing rows")
    p.add_argument("--upload-mib", type=int, default=64, help="0: no upload rows")
    p.add_argument("--slow-upload", type=float, default=20.0)
    args = p.parse_args()
    rtts = [float(x) for x in args.rtt.split(",")]
    ks = [int(x) for x in args.ks.split(",")]
    CLIENTS[:] = args.clients.split(",")

    rows: list[str] = []
    with tempfile.TemporaryDirectory(prefix="h2probe-") as tmp:
        w = World(Path(tmp))
        try:
            w.start_emulator()
            w.seed(args.n, args.size)
            big = os.urandom(args.upload_mib * MiB)
            for rtt in rtts:
                with w.over(rtt, args.rate):
                    rows += run_link(w, rtt, ks, args, big)
        finally:
            w.close()
    print()
    print(f"load average at the end: {os.getloadavg()}; cores: {os.cpu_count()}")
    print("medians of each cell; wall range = min-max of the samples")
    print("cpu = client process time (all threads); emu/link = share of one core")
    print("\n".join(rows))


def run_link(
    w: World, rtt: float, ks: list[int], args: argparse.Namespace, big: bytes
) -> list[str]:
    head = (
        f"{'rtt':>5} {'case':<14} {'client':<9} {'wall s':>7} {'range':>11} {'cpu ms':>7} "
        f"{'emu':>5} {'link':>5} {'load':>5} {'conns':>5} version"
    )
    rows = ["", head]

    def row(case: str, kind: str, ss: list[Sample], extra: str = "") -> str:
        versions = ",".join(sorted(set().union(*(s.versions for s in ss))))
        return (
            f"{rtt:>3g}ms {case:<14} {kind:<9} {med(ss, 'wall'):7.3f} {spread(ss):>11} "
            f"{med(ss, 'cpu') * 1000:7.0f} {med(ss, 'emu_cpu'):5.2f} {med(ss, 'link_cpu'):5.2f} "
            f"{max(s.load for s in ss):5.2f} {max(s.connections for s in ss):5d} {versions}{extra}"
        )

    # many small /content requests
    for k in ks:
        cell: dict[str, list[Sample]] = {c: [] for c in CLIENTS}
        for rep in range(args.reps):
            for kind in rotated(rep):
                s = w.measure(functools.partial(fetch_all, w, kind, k, args.size))
                cell[kind].append(s)
                log(
                    f"rtt {rtt:g}ms K={k} {kind}: {s.wall:.3f}s cpu {s.cpu * 1000:.0f}ms "
                    f"emu {s.emu_cpu:.2f} link {s.link_cpu:.2f} load {s.load:.2f} "
                    f"{sorted(s.versions)} conns {s.connections}"
                )
        if "h2" in cell and "HTTP/2" not in cell["h2"][0].versions:
            log("WARNING: the h2 client did not negotiate HTTP/2")
        for kind in CLIENTS:
            rows.append(row(f"{args.n}x{args.size // KiB}KiB K={k}", kind, cell[kind]))

    # a listing, 10 times in a row on one new client
    if not args.list_times:
        print("\n".join(rows), flush=True)
        return rows
    firsts: dict[str, list[float]] = {c: [] for c in CLIENTS}
    cell = {c: [] for c in CLIENTS}
    for rep in range(args.reps):
        for kind in rotated(rep):
            s = w.measure(functools.partial(listing, w, kind, args.list_times, firsts[kind]))
            cell[kind].append(s)
    for kind in CLIENTS:
        first = statistics.median(firsts[kind]) * 1000
        rows.append(row(f"list x{args.list_times}", kind, cell[kind], f"  first {first:.0f}ms"))

    # one big upload
    if big:
        cell = {c: [] for c in CLIENTS}
        for rep in range(args.reps):
            for kind in rotated(rep):
                if kind == "h2" and cell[kind] and cell[kind][0].wall > args.slow_upload:
                    continue
                s = w.measure(functools.partial(upload, w, kind, big))
                cell[kind].append(s)
                log(
                    f"rtt {rtt:g}ms upload {kind}: {s.wall:.2f}s {len(big) / s.wall / 1e6:.1f} MB/s"
                )
        for kind in CLIENTS:
            ss = cell[kind]
            rate = len(big) / med(ss, "wall") / 1e6
            extra = f"  {rate:.1f} MB/s, n={len(ss)}"
            rows.append(row(f"upload {len(big) // MiB}MiB", kind, ss, extra))
    print("\n".join(rows), flush=True)
    return rows


if __name__ == "__main__":
    main()
