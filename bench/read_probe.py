"""R1 alone, measured for CPU: the daemon's user and system CPU-seconds per GiB of a
cold sequential read, on loopback or over a long link, several fresh mounts in a row.

    PYTHONPATH=. .venv/bin/python bench/read_probe.py [--link rtt=30ms,rate=60MB/s --tls]
        [--size 256] [--reps 5] [--rclone] [--py-spy OUT.svg]

The machine is shared, so wall-clock rates are noisy; CPU-seconds of the daemon
(utime+stime from /proc) are the signal to compare builds by. The load average is printed
with each line. With ``--py-spy`` the first mistralfs read is recorded by py-spy (which
must be installed) into a flame graph.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mfsbench.common import GiB, MiB, Sizes, log
from mfsbench.env import Bench, cleaned_up
from mfsbench.link import Link
from mfsbench.linkenv import LinkBench
from mfsbench.longlink import RCLONE_TUNED
from mfsbench.procs import catch_signals, check_tools, peak_rss, settle_memory

DD = ["dd", "bs=1M", "of=/dev/null", "status=none"]


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of ``pid``, all threads, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU-seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / tick, sum(ticks) / tick


def context_switches(pid: int) -> int:
    """Voluntary and involuntary context switches of every thread of ``pid`` so far."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches" in line:
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def read_once(b: Bench, side: str, spy: Path | None, settle: bool) -> dict[str, float]:
    extra = RCLONE_TUNED if side == "rclone" and isinstance(b, LinkBench) else []
    with b.mount(side, "off", *extra) as (mnt, pid):
        path = b.files(mnt, side, "big")[0]
        os.stat(path)
        if settle:
            settle_memory(b.data / "blobs" / b.ids["big"][0])
        u0, s0 = cpu_split(pid)
        cs0 = context_switches(pid)
        recorder = None
        if spy is not None and spy.suffix in (".svg", ".txt"):  # .txt: collapsed stacks
            fmt = "flamegraph" if spy.suffix == ".svg" else "raw"
            cmd = [str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(pid)]
            cmd += ["-o", str(spy), "-r", "200", "-f", fmt, "--threads", "--nonblocking"]
            quiet = subprocess.DEVNULL
            recorder = subprocess.Popen(cmd, stdout=quiet, stderr=quiet)
            time.sleep(1)
        elif spy is not None:  # perf(1): where the kernel's share goes
            cmd = ["perf", "record", "-g", "-p", str(pid), "-o", str(spy)]
            recorder = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            time.sleep(1)
        m0 = machine_busy()
        t0 = time.perf_counter()
        subprocess.run([*DD, f"if={path}"], check=True)
        wall = time.perf_counter() - t0
        m1 = machine_busy()
        u1, s1 = cpu_split(pid)
        cs = context_switches(pid) - cs0
        if recorder is not None:
            recorder.send_signal(2)
            recorder.wait(30)
        gib = b.sizes.big / GiB
        return {
            "mib_s": b.sizes.big / MiB / wall,
            "user": (u1 - u0) / gib,
            "sys": (s1 - s0) / gib,
            "cpu": (u1 - u0 + s1 - s0) / gib,
            "ctxsw_per_mib": cs / (b.sizes.big / MiB),
            "rss": peak_rss(pid),
            # cores the whole machine kept busy during the read (of os.cpu_count())
            "machine": (m1[0] - m0[0]) / wall,
            "daemon_cores": (u1 - u0 + s1 - s0) / wall,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--link", help="e.g. rtt=30ms,rate=60MB/s (default: loopback)")
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--size", type=int, default=256, help="MiB (256)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cache-size", default="256M")
    parser.add_argument("--rclone", action="store_true", help="rclone's side too")
    parser.add_argument(
        "--settle",
        action="store_true",
        help="drop the page cache before each read, nginx's copy of the file read back "
        "(procs.settle_memory): every read starts in memory just freed",
    )
    parser.add_argument(
        "--ab", metavar="VAR", help="A/B: every other mistralfs mount with VAR=1 in its environment"
    )
    parser.add_argument(
        "--ab-path",
        metavar="DIR",
        help="A/B: every other mistralfs mount runs the code of another checkout (its "
        "PYTHONPATH is DIR), e.g. a `git archive` of the commit before a change",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        help="the last mistralfs read profiled: py-spy's flame graph for *.svg, its "
        "collapsed stacks for *.txt, else perf record's data",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (the daemons' logs) after"
    )
    args = parser.parse_args()
    check_tools()
    catch_signals()
    sizes = Sizes(big=args.size * MiB, small_count=0, many_count=0, w2_count=0, m1=0)
    work = Path(tempfile.mkdtemp(prefix="mistralfs-probe-"))
    results: dict[str, list[dict[str, float]]] = {"mfs": [], "rclone": []}
    b = (
        LinkBench(work, sizes, args.cache_size, args.tls)
        if args.link
        else Bench(work, sizes, args.cache_size)
    )
    with cleaned_up(b, keep=args.keep):
        ctx: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if isinstance(b, LinkBench):
            b.set_up()
            ctx = b.over(Link.parse(args.link))
        else:
            b.start_nginx()
            b.start_emulator()
            b.seed(small=False, many=False)
            warm = ["curl", "-sf", "-o", "/dev/null", f"{b.storage_url}/blobs/{b.ids['big'][0]}"]
            subprocess.run(warm, check=True)
        with ctx:
            sides = ["mfs", "rclone"] if args.rclone else ["mfs"]
            if args.ab or args.ab_path:
                other = f"mfs+{args.ab}" if args.ab else "mfs@other"
                sides = [other, "mfs"] + (["rclone"] if args.rclone else [])
                results = {side: [] for side in sides}
            own_path = os.environ.get("PYTHONPATH", "")
            for rep in range(args.reps):
                for side in sides if rep % 2 == 0 else sides[::-1]:
                    spy = args.py_spy if side == "mfs" and rep == args.reps - 1 else None
                    os.environ.pop(args.ab or "-", None)
                    if "+" in side:
                        os.environ[side.split("+")[1]] = "1"
                    os.environ["PYTHONPATH"] = args.ab_path if "@" in side else own_path
                    r = read_once(b, side.split("+")[0].split("@")[0], spy, args.settle)
                    results[side].append(r)
                    load = os.getloadavg()[0]
                    log(
                        f"{side:10} {r['mib_s']:6.0f} MiB/s  CPU s/GiB {r['cpu']:.2f} "
                        f"(user {r['user']:.2f} sys {r['sys']:.2f})  ctxsw/MiB "
                        f"{r['ctxsw_per_mib']:.0f}  rss {r['rss']:.0f} MiB  cores: daemon "
                        f"{r['daemon_cores']:.2f} machine {r['machine']:.2f}  load {load:.1f}"
                    )
    for side, rs in results.items():
        if rs:
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
            print(
                f"median {side}: {med['mib_s']:.0f} MiB/s, CPU s/GiB {med['cpu']:.2f} "
                f"(user {med['user']:.2f}, sys {med['sys']:.2f}), ctxsw/MiB "
                f"{med['ctxsw_per_mib']:.0f}, rss {med['rss']:.0f} MiB, cores: daemon "
                f"{med['daemon_cores']:.2f} machine {med['machine']:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
