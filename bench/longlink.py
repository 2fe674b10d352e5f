"""The benchmark over a long link: ``bench/run.py --link rtt=30ms,rate=60MB/s``.

Issue 15's rows, measured with the API and the storage route both behind a shaping
proxy (link.py: half the RTT each way, pipelined; a rate cap per connection), one
proxy process in front of the emulator and one in front of nginx. The emulator's
``--storage-url`` names the storage proxy, so signed URLs cross the link, and rclone's
``--http-url`` does too: every byte any side reads or writes crosses the same link.
The files are seeded once, straight to the emulator; each ``--link`` then gets its own
pair of proxies on the same two ports, a calibration (a ping-pong and one curl stream),
and the same rows, side by side:

- mistralfs (the mount under test);
- rclone mount as its docs advise for high-latency links (``--vfs-read-chunk-streams
  16 --vfs-read-chunk-size 4M``), over nginx's ``/peer/`` (the same blobs);
- one ``curl`` process, one stream (one connection, requests one after another);
- a loop over the official SDK (``mistralai``), as a user's script would do it.

A row's ratio is mistralfs against the peer its target names. With ``--tls`` the
emulator and nginx serve HTTPS with one self-signed certificate for 127.0.0.1, which
every side is told to trust; TLS passes through the proxies end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
from link import Link
from mistralai.client import Mistral
from run import (
    KEY,
    Bench,
    Case,
    MiB,
    Sizes,
    case_record,
    catch_signals,
    check_same_bytes,
    cleaned_up,
    cpu_seconds,
    end_process,
    fmt,
    free_port,
    head_commit,
    load_line,
    log,
    parse_mib,
    peak_rss,
    start_announced,
    timed,
    write_results,
)

LINK_PY = Path(__file__).resolve().parent / "link.py"
LINK_LISTENING = "link listening on "
# rclone's docs for high-latency links: many streams of large chunks per file.
RCLONE_TUNED = ["--vfs-read-chunk-streams", "16", "--vfs-read-chunk-size", "4M"]
SIDES = ("mfs", "rclone", "curl", "sdk")
DD = ["dd", "bs=1M", "of=/dev/null", "status=none"]
# R3 is bimodal for rclone: its GET reuses the connection of the listing's HEADs, or it
# does not and pays the TCP and TLS handshakes (58 ms or 214 ms at 30 ms RTT, in one run).
# A median of 3 flips between the two; each sample is a mount and ~1 s.
R3_MIN_REPS = 7


def sizes(quick: bool, reps: int | None) -> Sizes:
    """The issue's sizes (256 MiB, 300 small files, 50 uploads); smaller with --quick."""
    s = Sizes(big=256 * MiB, small_count=300, many_count=0, w2_count=50, m1=0, reps=3)
    if quick:
        s = Sizes(big=64 * MiB, small_count=100, many_count=0, w2_count=20, m1=0, reps=1)
    if reps:
        s.reps = max(1, reps)
    return s


class LinkBench(Bench):
    """The loopback world of run.py, with both routes behind shaping proxies."""

    def __init__(self, work: Path, s: Sizes, cache_size: str, tls: bool) -> None:
        super().__init__(work, s, cache_size)
        self.api_port = free_port()  # the proxies' ports stay the same from link to link
        self.storage_port = free_port()
        self.tls = tls
        self.ca = work / "tls" / "cert.pem"
        self.tls_key = work / "tls" / "key.pem"
        self.scheme = "https" if tls else "http"
        self.link_procs: list[subprocess.Popen] = []

    def make_cert(self) -> None:
        """One self-signed certificate for 127.0.0.1, for the emulator and nginx alike."""
        self.ca.parent.mkdir()
        cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
        cmd += ["-nodes", "-days", "2", "-subj", "/CN=mistralfs bench"]
        cmd += ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(self.tls_key)]
        subprocess.run(
            [*cmd, "-out", str(self.ca)],
            check=True,
            capture_output=True,
        )

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
            for proc in self.link_procs:
                end_process(proc.pid, proc)
            self.link_procs.clear()

    def close(self) -> None:
        for proc in self.link_procs:
            end_process(proc.pid, proc)
        self.link_procs.clear()
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
        return Mistral(api_key=KEY, server_url=self.client_url, client=client)

    def signed_url(self, file_id: str) -> str:
        with self.api() as api:
            r = api.get(f"/v1/files/{file_id}/url", params={"expiry": 24})
            r.raise_for_status()
            return r.json()["url"]


def calibrate(b: LinkBench, link: Link) -> dict[str, float]:
    """What the link really does: a ping-pong (one small HTTP request on a kept-alive
    connection through the storage proxy), a first request on a new connection (the
    handshakes too), and one curl stream of 64 MiB."""
    host, port = "127.0.0.1", b.storage_port
    small = b.ids["small"][0]
    conn: http.client.HTTPConnection
    if b.tls:
        conn = http.client.HTTPSConnection(host, port, context=b.verify())  # type: ignore[arg-type]
    else:
        conn = http.client.HTTPConnection(host, port)
    times = []
    try:
        for _ in range(11):
            t0 = time.perf_counter()
            conn.request("GET", f"/peer/small/{small}")
            conn.getresponse().read()
            times.append(time.perf_counter() - t0)
    finally:
        conn.close()
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


def measure(
    case: Case, sides: dict[str, Callable[[], float]], reps: int, once: frozenset[str] = frozenset()
) -> None:
    """Run every side ``reps`` times (those in ``once``: once), rotating who goes first;
    mistralfs's samples go to ``case.mfs``, each peer's to ``case.extra[side]``."""
    names = list(sides)
    for rep in range(reps):
        for side in names[rep % len(names) :] + names[: rep % len(names)]:
            if side in once and rep > 0:
                continue
            value = sides[side]()
            (case.mfs if side == "mfs" else case.extra.setdefault(side, [])).append(value)
    target_peer = case.peer_name.split()[0]
    case.peer = case.extra.get(target_peer, [])


def run_link_cases(b: LinkBench, link: Link) -> list[Case]:
    """The issue's rows over ``link``; slow one-request-at-a-time loops run once."""
    s = b.sizes
    reps = s.reps
    big_id = b.ids["big"][0]
    big_mib = s.big / MiB
    small_ids, small_names = b.ids["small"], b.names["small"]
    signed = b.signed_url(big_id)
    auth = ["-H", f"Authorization: Bearer {KEY}"]
    loops = frozenset({"rclone", "curl", "sdk"})  # one request after another: seconds each
    cases: list[Case] = []

    # Cold sequential read, and the daemon's peak RSS meanwhile.
    r1 = Case("R1", f"cold sequential read {big_mib:.0f} MiB", "MiB/s", "rclone tuned", ">= 1.0x")
    limit = parse_mib(b.cache_size) + 80
    m1 = Case("M1", "peak RSS during R1", "MiB", "rclone", f"<= {limit:.0f} MiB", limit=limit)
    m1.extra["rclone"] = []

    def read_mount(mfs: bool) -> float:
        ctx = b.mistralfs() if mfs else b.rclone("off", *RCLONE_TUNED)
        with ctx as (mnt, pid):
            path = mnt / ("bench-big/big.bin" if mfs else f"big/{big_id}")
            os.stat(path)  # the read alone, not the first listing
            with b.proxy_load(r1, "mfs" if mfs else "rclone", daemon=pid):
                t = timed([*DD, f"if={path}"])
            (m1.mfs if mfs else m1.extra["rclone"]).append(peak_rss(pid))
        return big_mib / t

    def sdk_download() -> float:
        t0 = time.perf_counter()
        with b.proxy_load(r1, "sdk"), b.sdk() as sdk:
            answer = sdk.files.download(file_id=big_id)
            try:
                for _ in answer.iter_bytes(MiB):
                    pass
            finally:
                answer.close()
        return big_mib / (time.perf_counter() - t0)

    def curl_read() -> float:
        with b.proxy_load(r1, "curl"):
            return timed([*b.curl(), "-o", "/dev/null", signed])

    measure(
        r1,
        {
            "mfs": lambda: read_mount(True),
            "rclone": lambda: read_mount(False),
            "curl": lambda: big_mib / curl_read(),
            "sdk": sdk_download,
        },
        reps,
    )
    m1.peer = m1.extra["rclone"]
    cases += [r1, m1]
    log(f"R1: {summary(r1)}; M1 {m1.median('mfs'):.0f} MiB; {proxy_note(r1)}")

    # First 4 KiB of the big file, on a fresh mount, after an ls -l of its folder.
    r3 = Case("R3", "first 4 KiB after ls -l", "s", "rclone tuned", "<= 1.0x")

    def head_mount(mfs: bool) -> float:
        ctx = b.mistralfs() if mfs else b.rclone("off", *RCLONE_TUNED)
        with ctx as (mnt, _):
            folder = mnt / ("bench-big" if mfs else "big")
            subprocess.run(["ls", "-l", str(folder)], check=True, stdout=subprocess.DEVNULL)
            return timed(["head", "-c", "4096", str(folder / ("big.bin" if mfs else big_id))])

    measure(
        r3,
        {
            "mfs": lambda: head_mount(True),
            "rclone": lambda: head_mount(False),
            "curl": lambda: timed([*b.curl(), "-o", "/dev/null", "-r", "0-4095", signed]),
        },
        max(reps, R3_MIN_REPS),
    )
    cases.append(r3)
    log(f"R3: {summary(r3)}")

    # cat of the small files, cold: against the SDK loop and against rclone.
    n = len(small_ids)
    r4 = Case("R4", f"cat {n} small files, cold", "s", "sdk loop", "<= 0.1x")
    content_urls = [f"{b.client_url}/v1/files/{i}/content" for i in small_ids]

    def cat_mount(mfs: bool) -> float:
        ctx = b.mistralfs() if mfs else b.rclone("off", *RCLONE_TUNED)
        with ctx as (mnt, _):
            folder = mnt / ("bench-small" if mfs else "small")
            return timed(["cat", *(str(folder / x) for x in (small_names if mfs else small_ids))])

    def sdk_cat() -> float:
        t0 = time.perf_counter()
        with b.sdk() as sdk:
            listed = sdk.files.list(purpose="bench-small", page_size=1000).data
            for record in listed:
                answer = sdk.files.download(file_id=record.id)
                answer.read()
                answer.close()
        if len(listed) != n:
            raise RuntimeError(f"the SDK listed {len(listed)} small files, not {n}")
        return time.perf_counter() - t0

    measure(
        r4,
        {
            "mfs": lambda: cat_mount(True),
            "rclone": lambda: cat_mount(False),
            "curl": lambda: timed([*b.curl(), *auth, *content_urls]),
            "sdk": sdk_cat,
        },
        reps,
        once=loops,
    )
    r4_rclone = Case(r4.key + "r", r4.title, "s", "rclone tuned", "<= 0.2x")
    r4_rclone.mfs, r4_rclone.extra = r4.mfs, r4.extra
    r4_rclone.peer = r4.extra["rclone"]
    cases += [r4, r4_rclone]
    log(f"R4: {summary(r4)}")

    # ls -l of the small files' folder, cold.
    l1 = Case("L1", f"ls -l {n} files, cold", "s", "rclone tuned", "<= 0.5x")

    def ls_mount(mfs: bool) -> float:
        ctx = b.mistralfs() if mfs else b.rclone("off", *RCLONE_TUNED)
        with ctx as (mnt, _):
            return timed(["ls", "-l", str(mnt / ("bench-small" if mfs else "small"))])

    def sdk_list() -> float:
        t0 = time.perf_counter()
        with b.sdk() as sdk:
            sdk.files.list(purpose="bench-small", page_size=1000)
        return time.perf_counter() - t0

    list_url = f"{b.client_url}/v1/files?purpose=bench-small&page_size=1000"
    measure(
        l1,
        {
            "mfs": lambda: ls_mount(True),
            "rclone": lambda: ls_mount(False),
            "curl": lambda: timed([*b.curl(), *auth, "-o", "/dev/null", list_url]),
            "sdk": sdk_list,
        },
        reps,
    )
    cases.append(l1)
    log(f"L1: {summary(l1)}")

    # cp of the big file into the mount, against curl -F and the SDK's upload.
    w1 = Case("W1", f"cp {big_mib:.0f} MiB", "s", "curl -F", "<= 1.05x")

    def cp_big() -> float:
        with b.mistralfs() as (mnt, pid), b.proxy_load(w1, "mfs", daemon=pid):
            return timed(["cp", str(b.src_big), str(mnt / "batch" / "w1.bin")])

    def sdk_upload(paths: list[Path]) -> float:
        t0 = time.perf_counter()
        with b.sdk() as sdk:
            for path in paths:
                with open(path, "rb") as f:
                    sdk.files.upload(file={"file_name": path.name, "content": f}, purpose="batch")
        return time.perf_counter() - t0

    upload = [*b.curl(), *auth, "-o", "/dev/null", "-F", "purpose=batch"]

    def curl_upload() -> float:
        with b.proxy_load(w1, "curl"):
            return timed([*upload, "-F", f"file=@{b.src_big}", f"{b.client_url}/v1/files"])

    def sdk_upload_big() -> float:
        with b.proxy_load(w1, "sdk"):
            return sdk_upload([b.src_big])

    w1_sides: dict[str, Callable[[], float]] = {
        "mfs": cp_big,
        "curl": curl_upload,
        "sdk": sdk_upload_big,
    }
    measure(w1, then_clean(b, w1_sides), reps)
    cases.append(w1)
    log(f"W1: {summary(w1)}; {proxy_note(w1)}")

    # cp of many 64 KiB files, against an SDK upload loop and one curl chaining them.
    src = b.work / "src" / "w2"
    if not src.exists():
        src.mkdir()
        for i in range(s.w2_count):
            (src / f"w2-{i:04d}.bin").write_bytes(os.urandom(64 * 1024))
    files = sorted(src.iterdir())
    w2 = Case("W2", f"cp {len(files)} x 64 KiB", "s", "sdk loop", "<= 1.0x")

    def cp_many() -> float:
        with b.mistralfs() as (mnt, _):
            os.listdir(mnt / "batch")  # the folder is listed before, as by a shell
            return timed(["cp", *map(str, files), str(mnt / "batch")])

    chained: list[str] = []
    for path in files:  # one curl, one connection: --next per upload
        chained += [*(["--next"] if chained else []), *upload, "-F", f"file=@{path}"]
        chained.append(f"{b.client_url}/v1/files")
    w2_sides: dict[str, Callable[[], float]] = {
        "mfs": cp_many,
        "curl": lambda: timed(chained),
        "sdk": lambda: sdk_upload(files),
    }
    measure(w2, then_clean(b, w2_sides), reps, once=loops)
    cases.append(w2)
    log(f"W2: {summary(w2)}")
    return cases


def then_clean(b: Bench, sides: dict[str, Callable[[], float]]) -> dict[str, Callable[[], float]]:
    """Each side's uploads are deleted after it, so that every upload is to a batch/
    that holds what it held before."""

    def cleaned(f: Callable[[], float]) -> Callable[[], float]:
        def run() -> float:
            try:
                return f()
            finally:
                b.delete_purpose("batch")

        return run

    return {side: cleaned(f) for side, f in sides.items()}


def summary(c: Case) -> str:
    return ", ".join(
        f"{side} {fmt(c.median('mfs') if side == 'mfs' else _median(c.extra.get(side)), c.unit)}"
        for side in SIDES
        if side == "mfs" or c.extra.get(side)
    )


def proxy_note(c: Case) -> str:
    """Cores used by the busiest proxy, the emulator and the mount's daemon (medians)."""

    def shares(what: str) -> str:
        return ", ".join(
            f"{side} {_median(c.extra[f'{what}_{side}']):.2f}"
            for side in SIDES
            if c.extra.get(f"{what}_{side}")
        )

    return (
        f"cores used by the busiest proxy: {shares('proxy_cpu')}; "
        f"by the emulator: {shares('emulator_cpu')}; by the daemon: {shares('daemon_cpu')}"
    )


def _median(values: list[float] | None) -> float | None:
    return statistics.median(values) if values else None


def link_table(link: Link, cases: list[Case], calibration: dict[str, float]) -> str:
    """One link's rows: every side's median, and mistralfs against its target's peer."""
    rows = [("case", "what", "mistralfs", "rclone", "curl", "SDK", "ratio", "target", "met")]
    for c in cases:
        r, met = c.ratio(), c.met()
        values = [c.median("mfs"), *(_median(c.extra.get(side)) for side in SIDES[1:])]
        rows.append(
            (
                c.key,
                c.title,
                *(fmt(v, c.unit) for v in values),
                "-" if r is None or c.limit is not None else f"{r:.2f}x {c.peer_name.split()[0]}",
                c.target,
                "-" if met is None else ("met" if met else "NOT MET"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"link: {link}"]
    lines += [f"  calibration: {k}: {v:.1f}" for k, v in calibration.items()]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(len(calibration) + 2, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def set_up(b: LinkBench, tls: bool) -> None:
    """nginx, the emulator (signed URLs on the storage proxy's port) and the seeded files;
    with ``tls``, HTTPS on both and every side told to trust the bench's certificate."""
    if tls:
        b.make_cert()
    b.start_nginx(tls=(b.ca, b.tls_key) if tls else None)
    tls_flags = ["--tls-cert", str(b.ca), "--tls-key", str(b.tls_key)] if tls else []
    b.start_emulator(f"{b.scheme}://127.0.0.1:{b.storage_port}", *tls_flags)
    b.tls_verify = b.verify()
    b.seed(small=True, many=False)
    if tls:
        b.mount_flags = ["--ca-file", str(b.ca)]
        b.rclone_flags = ["--ca-cert", str(b.ca)]
    # nginx's page cache warmed for everyone, straight, not over the link
    direct = f"{b.scheme}://127.0.0.1:{b.nginx_port}/blobs/{b.ids['big'][0]}"
    subprocess.run([*b.curl(), "-o", "/dev/null", direct], check=True)


def main(args: argparse.Namespace) -> int:
    """``run.py --link SPEC [--link SPEC]``: seed once, then every link's rows."""
    links = [Link.parse(spec) for spec in args.link]
    s = sizes(args.quick, args.reps)
    catch_signals()
    load_before, commit = os.getloadavg(), head_commit()
    work = Path(tempfile.mkdtemp(prefix="mistralfs-bench-link-"))
    b = LinkBench(work, s, args.cache_size, args.tls)
    started = time.time()
    results: list[dict[str, object]] = []
    texts: list[str] = []
    try:
        with cleaned_up(b, args.keep):
            set_up(b, args.tls)
            for link in links:
                with b.over(link):
                    log(f"over {link}: mounts at {b.client_url}, storage at {b.storage_url}")
                    check_same_bytes(b)
                    calibration = calibrate(b, link)
                    cases = run_link_cases(b, link)
                texts.append(link_table(link, cases, calibration))
                results.append(
                    {
                        "link": {"rtt_s": link.rtt, "rate_bytes_s": link.rate},
                        "calibration": calibration,
                        "cases": [case_record(c) for c in cases],
                    }
                )
                print("\n" + texts[-1], flush=True)
    except KeyboardInterrupt:
        log("interrupted: cleaned up")
        return 130
    text = "\n\n".join(texts)
    text += "\n(medians; ratio is mistralfs/peer named; MiB/s rows want >=, time rows <=)"
    text += f"\n{load_line(load_before)}; {'TLS' if args.tls else 'plain HTTP'}"
    print()
    print(text)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-link"
    result = {
        "quick": args.quick,
        "commit": commit,
        "tls": args.tls,
        "sizes": s.__dict__,
        "cache_size": args.cache_size,
        "seconds": round(time.time() - started, 1),
        "links": results,
        "table": text,
    }
    log(f"wrote {write_results(stamp + ('-quick' if args.quick else ''), result, load_before)}")
    return 0
