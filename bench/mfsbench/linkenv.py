"""The long-link environment: the loopback one (env.py) with both routes behind shaping
proxies (link.py), HTTPS with one self-signed certificate on request, the tools every
side uses (curl, the SDK), and each link's calibration."""

from __future__ import annotations

import contextlib
import http.client
import ssl
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from mistralai.client import Mistral

from .case import Case
from .common import KEY, MiB, Sizes, log
from .env import Bench
from .link import Link
from .procs import cpu_seconds, end_process, free_port, start_announced

LINK_PY = Path(__file__).resolve().parent / "link.py"
LINK_LISTENING = "link listening on "


class LinkBench(Bench):
    """The loopback world, with both routes behind shaping proxies."""

    def __init__(self, work: Path, s: Sizes, cache_size: str, tls: bool) -> None:
        super().__init__(work, s, cache_size)
        self.api_port = free_port()  # the proxies' ports stay the same from link to link
        self.storage_port = free_port()
        self.tls = tls
        self.ca = work / "tls" / "cert.pem"
        self.tls_key = work / "tls" / "key.pem"
        self.scheme = "https" if tls else "http"
        self.link_procs: list[subprocess.Popen[Any]] = []

    def set_up(self) -> None:
        """nginx, the emulator (signed URLs on the storage proxy's port) and the seeded
        files; with TLS, HTTPS on both and every side told to trust the certificate."""
        if self.tls:
            self.make_cert()
        self.start_nginx(tls=(self.ca, self.tls_key) if self.tls else None)
        tls_flags = ["--tls-cert", str(self.ca), "--tls-key", str(self.tls_key)]
        storage = f"{self.scheme}://127.0.0.1:{self.storage_port}"
        self.start_emulator(storage, *(tls_flags if self.tls else []))
        self.tls_verify = self.verify()
        self.seed(small=True, many=False)
        if self.tls:
            self.mount_flags = ["--ca-file", str(self.ca)]
            self.rclone_flags = ["--ca-cert", str(self.ca)]
        # nginx's page cache warmed for everyone, straight, not over the link
        direct = f"{self.scheme}://127.0.0.1:{self.nginx_port}/blobs/{self.ids['big'][0]}"
        subprocess.run([*self.curl(), "-o", "/dev/null", direct], check=True)

    def make_cert(self) -> None:
        """One self-signed certificate for 127.0.0.1, for the emulator and nginx alike."""
        self.ca.parent.mkdir()
        cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        cmd += ["-nodes", "-days", "2", "-subj", "/CN=mistralfs bench"]
        cmd += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(self.tls_key)]
        subprocess.run([*cmd, "-out", str(self.ca)], check=True, capture_output=True)

    @contextlib.contextmanager
    def over(self, link: Link) -> Iterator[None]:
        """Both proxies up with ``link`` while inside; mounts and peers go through them."""
        upstreams = {
            self.api_port: self.emu_url.rsplit(":", 1)[1],
            self.storage_port: str(self.nginx_port),
        }
        spec = f"rtt={link.rtt * 1000:g}ms,rate={f'{link.rate:.0f}B/s' if link.rate else 0}"
        try:
            for port, upstream in upstreams.items():
                cmd = [sys.executable, str(LINK_PY), "--link", spec, "--port", str(port)]
                cmd += ["--upstream", f"127.0.0.1:{upstream}"]
                stderr = self.work / f"link-{port}.log"
                start_announced(cmd, stderr, LINK_LISTENING, self.link_procs)
            self.client_url = f"{self.scheme}://127.0.0.1:{self.api_port}"
            self.storage_url = f"{self.scheme}://127.0.0.1:{self.storage_port}"
            yield
        finally:
            self.stop_links()

    def stop_links(self) -> None:
        for proc in self.link_procs:
            end_process(proc.pid, proc)
        self.link_procs.clear()

    def close(self) -> None:
        self.stop_links()
        super().close()

    @contextlib.contextmanager
    def proxy_load(self, case: Case, side: str, daemon: int | None = None) -> Iterator[None]:
        """Add to ``case.extra["proxy_cpu_<side>"]`` the busiest proxy's share of one core
        while inside: near 1.0, that proxy (one Python thread), not the link, set the pace.
        The emulator's cores go to ``emulator_cpu_<side>`` (it too is one Python thread
        for the requests, near 1.0 it set the pace); with a ``daemon`` pid, its cores (all
        threads) go to ``daemon_cpu_<side>``."""
        pids = [p.pid for p in self.link_procs] + [self.emu_pid] + ([daemon] if daemon else [])
        before, t0 = [cpu_seconds(pid) for pid in pids], time.perf_counter()
        yield
        wall = time.perf_counter() - t0
        used = [(cpu_seconds(pid) - c) / wall for pid, c in zip(pids, before, strict=True)]
        n = len(self.link_procs)
        case.extra.setdefault(f"proxy_cpu_{side}", []).append(max(used[:n]))
        case.extra.setdefault(f"emulator_cpu_{side}", []).append(used[n])
        if daemon:
            case.extra.setdefault(f"daemon_cpu_{side}", []).append(used[n + 1])

    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=self.ca) if self.tls else True

    def curl(self) -> list[str]:
        """curl on HTTP/1.1, as the mount and the SDK speak: over TLS curl would pick
        HTTP/2, which the emulator (hypercorn) offers with a 64 KiB flow-control window,
        so an upload would crawl at 64 KiB per round trip (34 s for 64 MiB at 30 ms)."""
        return ["curl", "-sf", "--http1.1", *(["--cacert", str(self.ca)] if self.tls else [])]

    def sdk(self) -> Mistral:
        """The SDK as a user makes it (with TLS, given an httpx client that trusts the
        bench's certificate)."""
        if not self.tls:
            return Mistral(api_key=KEY, server_url=self.client_url)
        client = httpx.Client(verify=self.verify(), timeout=600, follow_redirects=True)
        # mypy finds httpx.Client's signatures unlike the SDK's HttpClient, though equal
        return Mistral(api_key=KEY, server_url=self.client_url, client=client)  # type: ignore[arg-type]

    def signed_url(self, file_id: str) -> str:
        with self.api() as api:
            r = api.get(f"/v1/files/{file_id}/url", params={"expiry": 24})
            r.raise_for_status()
            url: str = r.json()["url"]
            return url


def ping_times(b: LinkBench, count: int = 11) -> list[float]:
    """Seconds for ``count`` small requests on one connection through the storage proxy
    (the first one opens it)."""
    host, port = "127.0.0.1", b.storage_port
    small = b.ids["small"][0]
    conn: http.client.HTTPConnection
    if b.tls:
        conn = http.client.HTTPSConnection(host, port, context=b.verify())  # type: ignore[arg-type]
    else:
        conn = http.client.HTTPConnection(host, port)
    times = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            conn.request("GET", f"/peer/small/{small}")
            conn.getresponse().read()
            times.append(time.perf_counter() - t0)
    finally:
        conn.close()
    return times


def calibrate(b: LinkBench, link: Link) -> dict[str, float]:
    """What the link really does: a ping-pong (one small HTTP request on a kept-alive
    connection through the storage proxy), a first request on a new connection (the
    handshakes too), and one curl stream of 64 MiB."""
    times = ping_times(b)
    stream = min(64 * MiB, b.sizes.big)
    url = f"{b.storage_url}/blobs/{b.ids['big'][0]}"
    # curl's own clock: the whole stream, and from its first byte on (the rate alone)
    clock = ["-w", "%{time_starttransfer} %{time_total}"]
    out = subprocess.run(
        [*b.curl(), "-o", "/dev/null", "-r", f"0-{stream - 1}", *clock, url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    first, total = float(out[0]), float(out[1])
    info = {
        "ping-pong ms (kept-alive request)": statistics.median(times[1:]) * 1000,
        "first request ms (new connection)": times[0] * 1000,
        f"one curl stream of {stream // MiB} MiB, MB/s": stream / total / 1e6,
        "the same from its first byte on, MB/s": stream / (total - first) / 1e6,
    }
    log(
        f"link {link}: ping-pong {info['ping-pong ms (kept-alive request)']:.1f} ms, first "
        f"request on a new connection {times[0] * 1000:.1f} ms, one curl stream "
        f"{stream / total / 1e6:.1f} MB/s ({stream / (total - first) / 1e6:.1f} MB/s from "
        "its first byte)"
    )
    return info
