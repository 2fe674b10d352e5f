"""The loopback environment: nginx, the emulator, the seeded file sets, and the mounts
(mistralfs and rclone), each started fresh and always stopped by its pid."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import trio

from .common import KEY, RCLONE, MiB, Sizes, log
from .procs import end_process, free_port, is_mounted, start_announced

LISTENING = "mistralfs emulator listening on "
# A mount: its folder, the daemon's pid (once known) and the process when we started it.
Mount = tuple[Path, int | None, "subprocess.Popen[Any] | None"]


def nginx_conf(
    conf_dir: Path, port: int, blobs: Path, peer: Path, tls: tuple[Path, Path] | None
) -> str:
    """nginx in the foreground on 127.0.0.1:``port``, serving ``blobs`` and ``peer``;
    HTTPS with ``tls`` (certificate, key)."""
    # TLS 1.3, as the emulator serves it: nginx 1.22's default stops at 1.2, whose
    # handshake costs every new connection one more round trip than the API's
    ssl_conf = (
        f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]}; ssl_protocols TLSv1.2 TLSv1.3;"
        if tls
        else ""
    )
    temp = {k: conf_dir / k for k in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    return f"""
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
        listen 127.0.0.1:{port}{" ssl" if tls else ""};
        {ssl_conf}
        # Signed URLs from the emulator: BASE/<id>?se=..&sp=r&sig=..; the query is
        # ignored (static files), Range is served by default.
        location /blobs/ {{ alias {blobs}/; autoindex on; }}
        # rclone's http backend lists autoindex HTML; one folder per file set.
        location /peer/ {{ alias {peer}/; autoindex on; }}
    }}
}}
"""


def write_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(os.urandom(n))
            left -= n


def wait_listening(port: int, proc: subprocess.Popen[Any], what: str, log_file: Path) -> None:
    """Until ``port`` takes connections (10 s), or ``proc`` died."""
    deadline = time.monotonic() + 10
    while True:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.2),
        ):
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start: {log_file.read_text()}")
        time.sleep(0.05)


class Bench:
    """The temporary world: nginx, the emulator, the seeded files, and mount helpers."""

    def __init__(self, work: Path, sizes: Sizes, cache_size: str) -> None:
        self.work = work
        self.sizes = sizes
        self.cache_size = cache_size
        self.data = work / "emu"
        self.peer_dir = work / "peer"
        self.procs: list[subprocess.Popen[Any]] = []
        self.mounts: list[Mount] = []
        self.nginx_port = 0
        self.emu_url = ""
        self.emu_pid = 0
        # What mounts and peers reach: the emulator and nginx themselves on loopback, the
        # shaping proxies in front of them with --link (see linkenv.py).
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
        conf_dir = self.work / "nginx"
        conf_dir.mkdir()
        (self.data / "blobs").mkdir(parents=True)
        self.peer_dir.mkdir()
        conf = conf_dir / "nginx.conf"
        conf.write_text(
            nginx_conf(conf_dir, self.nginx_port, self.data / "blobs", self.peer_dir, tls)
        )
        proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-e", str(conf_dir / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=(conf_dir / "stderr.log").open("w"),
            start_new_session=True,
        )
        self.procs.append(proc)
        wait_listening(self.nginx_port, proc, "nginx", conf_dir / "stderr.log")
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
        for set_name, src in big_sets:
            self.upload_big(set_name, src)
        t0 = time.perf_counter()
        small_files = [(f"s{i:05d}.txt", os.urandom(1024).hex().encode())
                       for i in range(s.small_count if small else 0)]  # fmt: skip
        many_files = [(f"m{i:05d}.txt", b"%d\n" % i) for i in range(s.many_count if many else 0)]
        if small_files:
            trio.run(self._upload_many, "small", small_files)
        if many_files:
            trio.run(self._upload_many, "many", many_files)
        seeded = len(small_files) + len(many_files)
        log(f"seeded {seeded} small files in {time.perf_counter() - t0:.1f}s")
        # rclone's view: /peer/<set>/<id>, hard links to the emulator's blobs (same inodes).
        for set_name, ids in self.ids.items():
            folder = self.peer_dir / set_name
            folder.mkdir()
            for file_id in ids:
                os.link(self.data / "blobs" / file_id, folder / file_id)

    def upload_big(self, set_name: str, src: Path) -> None:
        """One file, ``SET.bin``, under the purpose ``bench-SET``."""
        with self.api() as api, open(src, "rb") as f:
            r = api.post(
                "/v1/files",
                files={"file": (f"{set_name}.bin", f)},
                data={"purpose": f"bench-{set_name}"},
            )
        r.raise_for_status()
        self.ids[set_name] = [r.json()["id"]]
        self.names[set_name] = [f"{set_name}.bin"]

    async def _upload_many(self, set_name: str, files: list[tuple[str, bytes]]) -> None:
        """Upload ``files`` under ``bench-SET``, 16 at a time."""
        ids: list[str] = [""] * len(files)
        limit = trio.CapacityLimiter(16)
        async with httpx.AsyncClient(
            base_url=self.emu_url,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=120,
            verify=self.tls_verify,
        ) as client:

            async def one(i: int, name: str, content: bytes) -> None:
                async with limit:
                    r = await client.post(
                        "/v1/files",
                        files={"file": (name, content)},
                        data={"purpose": f"bench-{set_name}"},
                    )
                    r.raise_for_status()
                    ids[i] = r.json()["id"]

            async with trio.open_nursery() as nursery:
                for i, (name, content) in enumerate(files):
                    nursery.start_soon(one, i, name, content)
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

    def mount(
        self, side: str, cache_mode: str = "off", *extra: str
    ) -> contextlib.AbstractContextManager[tuple[Path, int]]:
        """A fresh mount of ``side``: "mfs" is mistralfs, any other rclone."""
        return self.mistralfs() if side == "mfs" else self.rclone(cache_mode, *extra)

    @staticmethod
    def folder(mnt: Path, side: str, set_name: str) -> Path:
        """A file set's folder: ``bench-SET`` in mistralfs (its purpose), ``SET`` in rclone."""
        return mnt / (f"bench-{set_name}" if side == "mfs" else set_name)

    def files(self, mnt: Path, side: str, set_name: str) -> list[Path]:
        """A file set's files: by name in mistralfs, by id in rclone."""
        names = self.names[set_name] if side == "mfs" else self.ids[set_name]
        return [self.folder(mnt, side, set_name) / name for name in names]

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
        entry: Mount = (mnt, None, None)
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
        entry: Mount = (mnt, proc.pid, proc)
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
        proc: subprocess.Popen[Any] | None,
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
        """Every mount unmounted, every process stopped (by its pid)."""
        for mnt, pid, proc in reversed(self.mounts):
            with contextlib.suppress(Exception):
                self._unmount(mnt, pid, proc)
        self.mounts.clear()
        for p in reversed(self.procs):
            end_process(p.pid, p)
        self.procs.clear()


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


def check_same_bytes(b: Bench) -> None:
    """Both mounts list the same files, sizes and bytes (a sample), before timing anything."""
    with b.mistralfs() as (mfs, _), b.rclone("off") as (rcl, _):
        for set_name, ids in b.ids.items():
            listed_mfs = sorted(os.listdir(b.folder(mfs, "mfs", set_name)))
            listed_rcl = sorted(os.listdir(b.folder(rcl, "rclone", set_name)))
            if listed_mfs != sorted(b.names[set_name]) or listed_rcl != sorted(ids):
                raise RuntimeError(
                    f"{set_name}: mistralfs lists {len(listed_mfs)}, rclone {len(listed_rcl)}, "
                    f"seeded {len(ids)}"
                )
            pairs = zip(
                b.files(mfs, "mfs", set_name), b.files(rcl, "rclone", set_name), strict=True
            )
            for a, z in list(pairs)[:5]:
                if a.stat().st_size != z.stat().st_size:
                    raise RuntimeError(f"{set_name}/{a.name}: sizes differ")
                if not same_bytes(a, z):
                    raise RuntimeError(f"{set_name}/{a.name}: content differs")
    log("both mounts list the same files with the same sizes and bytes")


def same_bytes(a: Path, z: Path) -> bool:
    """The same content: whole, or the first and last MiB of files over 2 MiB."""

    def ends(path: Path) -> bytes:
        with open(path, "rb") as f:
            head = f.read(MiB)
            f.seek(-MiB, os.SEEK_END)
            return head + f.read(MiB)

    if a.stat().st_size > 2 * MiB:
        return ends(a) == ends(z)
    return a.read_bytes() == z.read_bytes()
