"""The loopback cases (R1-R5, L1, L2, W1, W2, M1): mistralfs against rclone mount, curl
and httpx on the same bytes from the same nginx, each case ``--reps`` times, alternating
which side goes first, on fresh mounts where the case is cold."""

from __future__ import annotations

import http.client
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from .case import Case, alternate, timed
from .common import KEY, GiB, MiB, log, parse_mib
from .env import Bench
from .procs import cpu_seconds, peak_rss, settle_memory

R3_MIN_REPS = 9  # R3 runs at least this many times (see r3)
DD = ["dd", "bs=1M", "of=/dev/null", "status=none"]
Info = dict[str, float]  # the lines under the table: ceilings, floors, CPU per GiB


def curl_ceiling(b: Bench, info: Info) -> None:
    """curl's ceiling for R1; it warms nginx's page cache for both sides, M1's file too."""
    url = f"http://127.0.0.1:{b.nginx_port}/blobs/"
    big_id, m1_id = b.ids["big"][0], b.ids["m1"][0]
    curl = [timed(["curl", "-sf", "-o", "/dev/null", url + big_id]) for _ in range(b.sizes.reps)]
    info["R1 curl ceiling MiB/s"] = b.sizes.big / MiB / statistics.median(curl)
    timed(["curl", "-sf", "-o", "/dev/null", url + m1_id])
    log(f"curl ceiling {info['R1 curl ceiling MiB/s']:.0f} MiB/s")


def r1_r2(b: Bench, info: Info) -> list[Case]:
    """R1 cold read against rclone cache-off; R2 the re-read, against rclone's full cache."""
    s, big_mib = b.sizes, b.sizes.big / MiB
    r1 = Case("R1", f"cold read {big_mib:.0f} MiB, dd bs=1M", "MiB/s", "rclone off", ">= 1.0x")
    r2 = Case("R2", "re-read on the same mount", "MiB/s", "rclone full", ">= 3.0x")
    r1.extra = {"rss_mfs": [], "rss_peer": []}
    cpu_read: dict[str, list[float]] = {"mfs": [], "peer": []}
    for rep in range(s.reps):
        for side in alternate(rep):
            for mode in ("off", "full") if side == "peer" else ("off",):
                with b.mount(side, mode) as (mnt, pid):
                    path = b.files(mnt, side, "big")[0]
                    c0 = cpu_seconds(pid)
                    t = timed([*DD, f"if={path}"])
                    cpu = cpu_seconds(pid) - c0
                    reread = side == "mfs" or mode == "full"
                    t2 = timed([*DD, f"if={path}"]) if reread else 0.0
                    if mode == "off":
                        r1.side(side).append(big_mib / t)
                        r1.extra[f"rss_{side}"].append(peak_rss(pid))
                        cpu_read[side].append(cpu / (s.big / GiB))
                    if reread:
                        r2.side(side).append(big_mib / t2)
        log(
            f"R1/R2 rep {rep + 1}: mfs {r1.mfs[-1]:.0f}/{r2.mfs[-1]:.0f} MiB/s, "
            f"rclone {r1.peer[-1]:.0f}/{r2.peer[-1]:.0f} MiB/s"
        )
    info["CPU s/GiB read, mistralfs"] = statistics.median(cpu_read["mfs"])
    info["CPU s/GiB read, rclone"] = statistics.median(cpu_read["peer"])
    return [r1, r2]


def r5(b: Bench, info: Info) -> list[Case]:
    """R5: a re-read after a remount with the same --disk-cache, against a cold read."""
    s, big_mib = b.sizes, b.sizes.big / MiB
    title = f"re-read {big_mib:.0f} MiB after remount, --disk-cache"
    case = Case("R5", title, "MiB/s", "mistralfs cold", ">= 2.0x")
    case.extra = {"cold_filling_disk_cache": []}
    disk_size = f"{2 * s.big // MiB}M"

    def read_big(mnt: Path) -> float:
        """MiB/s of one dd of the big file; stat first, so the time is the read alone
        (listing the account at the first lookup is the same cost whatever tier)."""
        path = b.files(mnt, "mfs", "big")[0]
        os.stat(path)
        return big_mib / timed([*DD, f"if={path}"])

    for rep in range(s.reps):
        for side in alternate(rep):
            if side == "peer":  # R1's cold read: a fresh mount, no disk cache
                with b.mistralfs() as (mnt, _):
                    case.peer.append(read_big(mnt))
                continue
            disk = ["--disk-cache", str(b.fresh_dir("disk")), "--disk-cache-size", disk_size]
            with b.mistralfs(*disk) as (mnt, _):  # the cold read fills the disk cache
                case.extra["cold_filling_disk_cache"].append(read_big(mnt))
            with b.mistralfs(*disk) as (mnt, _):  # unmounted and mounted again
                case.mfs.append(read_big(mnt))
    log(
        f"R5: re-read after remount {case.median('mfs'):.0f} MiB/s, cold "
        f"{case.median('peer'):.0f} MiB/s (cold filling the disk cache "
        f"{statistics.median(case.extra['cold_filling_disk_cache']):.0f} MiB/s)"
    )
    return [case]


def r3(b: Bench, info: Info) -> list[Case]:
    """R3: the first 4 KiB of the big file on a fresh mount, after a stat."""
    case = Case(
        "R3", f"first 4 KiB of cold {b.sizes.big / MiB:.0f} MiB", "s", "rclone off", "<= 1.0x"
    )
    # A few milliseconds, measured once per fresh mount: both sides swing by 2x and
    # more from run to run (rclone from 4.7 to 18.7 ms), so more runs than the other
    # cases, for medians that say something. Each costs a mount or two, about a second.
    for rep in range(max(b.sizes.reps, R3_MIN_REPS)):
        for side in alternate(rep):
            with b.mount(side) as (mnt, _):
                path = b.files(mnt, side, "big")[0]
                # stat first, so that the time is the read, not the lookup of the folder
                os.stat(path)
                case.side(side).append(timed(["head", "-c", "4096", str(path)]))
    log(f"R3: mfs {case.median('mfs'):.4f}s rclone {case.median('peer'):.4f}s")
    return [case]


def r4_l1(b: Bench, info: Info) -> list[Case]:
    """R4 cat of the small files, cold; L1 ls -l of their folder, cold then warm."""
    n = b.sizes.small_count
    # R4's peer is the emulator's own floor (issue 15): rclone reads nginx, while
    # mistralfs must ask the emulator for each file; rclone's time is shown beside it.
    r4 = Case("R4", f"cat {n} files of 2 KiB, cold", "s", "emulator floor", "<= 1.5x")
    r4_rclone = Case("R4", "", "s", "rclone off", "<= 1.0x")
    l1c = Case("L1c", f"ls -l {n} files, cold", "s", "rclone off", "<= 1.0x")
    l1w = Case("L1w", f"ls -l {n} files, warm", "s", "rclone off", "<= 1.5x")
    for rep in range(b.sizes.reps):
        for side in alternate(rep):
            with b.mount(side) as (mnt, _):
                folder = b.folder(mnt, side, "small")
                l1c.side(side).append(timed(["ls", "-l", str(folder)]))
                l1w.side(side).append(timed(["ls", "-l", str(folder)]))
            with b.mount(side) as (mnt, _):
                paths = [str(path) for path in b.files(mnt, side, "small")]
                seconds = timed(["cat", *paths])
                (r4.mfs if side == "mfs" else r4_rclone.peer).append(seconds)
    # Each cold small file costs mistralfs one /content request to the emulator, a
    # Python server; rclone reads nginx. The emulator's own time for those requests:
    floor = [content_floor(b.emu_url, b.ids["small"]) for _ in range(b.sizes.reps)]
    info["R4 emulator floor s (bare http.client, /content of each file)"] = statistics.median(floor)
    r4.peer = floor
    r4_rclone.mfs = r4.mfs
    info["R4 rclone off s (ratio: mfs / rclone)"] = r4_rclone.median("peer") or 0.0
    info["R4 against rclone (was its target, <= 1.0x)"] = r4_rclone.ratio() or 0.0
    log(
        f"R4: mfs {r4.median('mfs'):.3f}s rclone {r4_rclone.median('peer'):.3f}s "
        f"(emulator floor {statistics.median(floor):.3f}s); "
        f"L1 cold {l1c.median('mfs'):.3f}/{l1c.median('peer'):.3f}s "
        f"warm {l1w.median('mfs'):.3f}/{l1w.median('peer'):.3f}s"
    )
    return [r4, l1c, l1w]


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


def l2(b: Bench, info: Info) -> list[Case]:
    """L2: ls -l of the tiny files, cold."""
    case = Case("L2", f"ls -l {b.sizes.many_count} files, cold", "s", "rclone off", "<= 1.5x")
    for rep in range(b.sizes.reps):
        for side in alternate(rep):
            with b.mount(side) as (mnt, _):
                case.side(side).append(timed(["ls", "-l", str(b.folder(mnt, side, "many"))]))
    log(f"L2: mfs {case.median('mfs'):.3f}s rclone {case.median('peer'):.3f}s")
    return [case]


def w1(b: Bench, info: Info) -> list[Case]:
    """W1: cp of the big file into batch/, against curl -F to the emulator."""
    s = b.sizes
    case = Case("W1", f"cp {s.big / MiB:.0f} MiB into the mount", "s", "curl -F", "<= 1.2x")
    cpu_write = []
    for rep in range(s.reps):
        for side in alternate(rep):
            if side == "mfs":
                with b.mistralfs() as (mnt, pid):
                    settle_memory(b.src_big)
                    c0 = cpu_seconds(pid)
                    dest = mnt / "batch" / f"w1-{rep}.bin"
                    case.mfs.append(timed(["cp", str(b.src_big), str(dest)]))
                    cpu_write.append((cpu_seconds(pid) - c0) / (s.big / GiB))
            else:
                cmd = ["curl", "-sf", "-o", "/dev/null", "-H", f"Authorization: Bearer {KEY}"]
                cmd += ["-F", f"file=@{b.src_big};filename=w1-curl-{rep}.bin"]
                cmd += ["-F", "purpose=batch", f"{b.emu_url}/v1/files"]
                settle_memory(b.src_big)
                case.peer.append(timed(cmd))
        b.delete_purpose("batch")
    info["CPU s/GiB written, mistralfs"] = statistics.median(cpu_write)
    log(f"W1: mfs {case.median('mfs'):.2f}s curl {case.median('peer'):.2f}s")
    return [case]


def w2(b: Bench, info: Info) -> list[Case]:
    """W2: cp of many 64 KiB files into batch/, against sequential httpx uploads."""
    files = w2_sources(b)
    case = Case("W2", f"cp {len(files)} files of 64 KiB", "s", "httpx", "<= 1.3x")
    for rep in range(b.sizes.reps):
        for side in alternate(rep):
            if side == "mfs":
                with b.mistralfs() as (mnt, _):
                    dest = mnt / "batch"
                    os.listdir(dest)  # the folder is listed before, as by a shell
                    case.mfs.append(timed(["cp", *map(str, files), str(dest)]))
            else:
                with b.api() as api:
                    case.peer.append(timed(upload_each(api, files)))
            b.delete_purpose("batch")
    log(f"W2: mfs {case.median('mfs'):.2f}s httpx {case.median('peer'):.2f}s")
    return [case]


def w2_sources(b: Bench) -> list[Path]:
    """``sizes.w2_count`` files of 64 KiB of random bytes (made once), in name order."""
    src = b.work / "src" / "w2"
    if not src.exists():
        src.mkdir()
        for i in range(b.sizes.w2_count):
            (src / f"w2-{i:04d}.bin").write_bytes(os.urandom(64 * 1024))
    return sorted(src.iterdir())


def upload_each(api: httpx.Client, files: list[Path]) -> Callable[[], None]:
    """Upload every file to batch/, one after another (a function to time)."""

    def upload_all() -> None:
        for path in files:
            r = api.post(
                "/v1/files",
                files={"file": (path.name, path.read_bytes())},
                data={"purpose": "batch"},
            )
            r.raise_for_status()

    return upload_all


def m1(b: Bench, info: Info) -> list[Case]:
    """M1: the daemon's peak RSS after a copy-in, and after a cold read (rclone's shown)."""
    s, m1_mib = b.sizes, b.sizes.m1 / MiB
    limit = parse_mib(b.cache_size) + 80
    target = f"<= {limit:.0f} MiB"
    m1w = Case("M1w", f"peak RSS, {m1_mib:.0f} MiB copy-in", "MiB", "-", target, limit=limit)
    m1r = Case(
        "M1r", f"peak RSS, {m1_mib:.0f} MiB cold read", "MiB", "rclone off", target, limit=limit
    )
    cpu_write_m1 = []
    for rep in range(s.reps):
        with b.mistralfs() as (mnt, pid):
            c0 = cpu_seconds(pid)
            subprocess.run(["cp", str(b.src_m1), str(mnt / "batch" / f"m1-{rep}.bin")], check=True)
            cpu_write_m1.append((cpu_seconds(pid) - c0) / (s.m1 / GiB))
            m1w.mfs.append(peak_rss(pid))
        b.delete_purpose("batch")
        for side in alternate(rep):
            with b.mount(side) as (mnt, pid):
                subprocess.run([*DD, f"if={b.files(mnt, side, 'm1')[0]}"], check=True)
                m1r.side(side).append(peak_rss(pid))
    info[f"CPU s/GiB written ({m1_mib:.0f} MiB), mistralfs"] = statistics.median(cpu_write_m1)
    log(
        f"M1: copy-in {m1w.median('mfs'):.0f} MiB, read {m1r.median('mfs'):.0f} MiB "
        f"(rclone {m1r.median('peer'):.0f} MiB), limit {limit:.0f} MiB"
    )
    return [m1w, m1r]


# Each group of rows: the --only keys that select it, and what measures it, in order.
GROUPS: list[tuple[set[str], Callable[[Bench, Info], list[Case]]]] = [
    ({"R1", "R2"}, r1_r2),
    ({"R5"}, r5),
    ({"R3"}, r3),
    ({"R4", "L1"}, r4_l1),
    ({"L2"}, l2),
    ({"W1"}, w1),
    ({"W2"}, w2),
    ({"M1"}, m1),
]


def run_cases(b: Bench, only: set[str] | None) -> tuple[list[Case], Info]:
    """Every case ``only`` names (all without it), in the table's order, and the lines
    under the table."""
    cases: list[Case] = []
    info: Info = {}
    curl_ceiling(b, info)
    for keys, measure_group in GROUPS:
        if only is None or keys & only:
            cases += measure_group(b, info)
    return cases, info
