"""`mistralfs mount | unmount | emulator`: argument parsing and process management only."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from mistralfs import __version__
from mistralfs.config import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_DIR_CACHE_TIME,
    DEFAULT_DISK_CACHE_SIZE,
    DEFAULT_RETRY_TIME,
    DEFAULT_SERVER_URL,
    DEFAULT_STOP_TIMEOUT,
    ConfigError,
    options_to_args,
    parse_address,
    parse_local_names,
    parse_size,
)
from mistralfs.files_api import VISIBILITIES
from mistralfs.fs.upload_settings import parse_expiry, parse_visibility

LOG_LEVELS = ("debug", "info", "warning", "error")
T = TypeVar("T")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError("seconds must not be negative")
    return value


def _local_names(text: str) -> tuple[str, ...]:
    try:
        return parse_local_names(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type: `parse`, whose ValueError says what is wrong with the value."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    return convert


_visibility = _argument(parse_visibility)
_expiry = _argument(parse_expiry)


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistralfs",
        description="Mount a Mistral AI account's files as a drive, or run a local Files API.",
    )
    parser.add_argument("--version", action="version", version=f"mistralfs {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    mount = sub.add_parser(
        "mount",
        help="mount the account at MOUNTPOINT",
        description="Mount the account's files at MOUNTPOINT. The API key comes from "
        "MISTRAL_API_KEY, --api-key-file, or the systemd credential 'mistral-api-key'.",
    )
    mount.add_argument("mountpoint", type=Path)
    mount.add_argument(
        "--server-url",
        default=os.environ.get("MISTRAL_SERVER_URL", DEFAULT_SERVER_URL),
        help="API server, without /v1 (env MISTRAL_SERVER_URL; default %(default)s)",
    )
    mount.add_argument("--api-key-file", type=Path, help="read the API key from this file")
    mount.add_argument(
        "--ca-file",
        type=Path,
        metavar="FILE",
        help="trust only the certificate authorities in this PEM file for TLS (default: "
        "SSL_CERT_FILE or SSL_CERT_DIR if set, else the system's)",
    )
    mount.add_argument(
        "--cache-size",
        type=_size,
        default=DEFAULT_CACHE_SIZE,
        help="bytes of file content kept in memory, e.g. 256M (default 256M)",
    )
    mount.add_argument(
        "--max-throughput",
        type=_size,
        metavar="RATE",
        help="bytes per second one sequential reader needs, e.g. 500M: its read-ahead stops "
        "growing there (default: it opens at its bound for a whole-file read, and grows "
        "while reads get faster, up to 128 MiB in flight and half of --cache-size)",
    )
    mount.add_argument(
        "--dir-cache-time",
        type=_seconds,
        default=DEFAULT_DIR_CACHE_TIME,
        help="seconds a folder listing is trusted before it is fetched again "
        f"(default {DEFAULT_DIR_CACHE_TIME:g})",
    )
    mount.add_argument(
        "--cache-dir",
        type=Path,
        help="where uploads are spooled and logs kept (default $XDG_CACHE_HOME/mistralfs)",
    )
    mount.add_argument(
        "--disk-cache",
        type=Path,
        metavar="DIR",
        help="also keep read blocks on disk in DIR (created 0700), so that a re-read after "
        "a remount needs no download; one mount at a time per DIR",
    )
    mount.add_argument(
        "--disk-cache-size",
        type=_size,
        metavar="SIZE",
        help="bytes of blocks kept in --disk-cache, least recently used evicted first "
        f"(default {DEFAULT_DISK_CACHE_SIZE // 1024**3}G)",
    )
    mount.add_argument(
        "--retry-time",
        type=_seconds,
        default=DEFAULT_RETRY_TIME,
        help="how long a failing request is retried before the operation fails with EIO "
        f"(default {DEFAULT_RETRY_TIME:g})",
    )
    mount.add_argument(
        "--stop-timeout",
        type=_seconds,
        default=DEFAULT_STOP_TIMEOUT,
        help="how long SIGTERM waits for uploads in flight; what is cut off is uploaded "
        f"at the next mount (default {DEFAULT_STOP_TIMEOUT:g})",
    )
    mount.add_argument(
        "--local-names",
        type=_local_names,
        metavar="PATTERNS",
        help="names of scratch files (swap, temp, lock, backup files) kept in the local "
        "spool only, never uploaded: globs separated by /, replacing the default list "
        "('default' stands for it, '' means none); see docs/SEMANTICS.md",
    )
    mount.add_argument(
        "--visibility",
        type=_visibility,
        metavar="|".join(VISIBILITIES),
        help="who may see the files this mount uploads (default: the service's, workspace); "
        "a file's own xattr user.mistral.visibility wins",
    )
    mount.add_argument(
        "--expiry",
        type=_expiry,
        metavar="HOURS",
        help="uploads expire after this many hours, or 'none' (default: the service's, never); "
        "a file's own xattr user.mistral.expiry wins",
    )
    mount.add_argument(
        "--metrics-address",
        type=_address,
        metavar="HOST:PORT",
        help="serve Prometheus metrics (OpenMetrics) at http://HOST:PORT/metrics; HOST "
        "defaults to 127.0.0.1 (e.g. :9464); off by default; see docs/METRICS.md",
    )
    mount.add_argument("--read-only", action="store_true", help="refuse every change")
    mount.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    mount.add_argument("--foreground", action="store_true", help="stay attached and log to stderr")
    mount.add_argument("--log-file", type=Path, help="log here (default CACHE_DIR/mistralfs.log)")
    mount.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    mount.add_argument(
        "-o",
        dest="options",
        action="append",
        default=[],
        metavar="OPTIONS",
        help="mount options as mount(8) passes them: server_url=URL, api_key_file=F, "
        "ca_file=F, cache_size=SIZE, max_throughput=RATE, dir_cache_time=S, cache_dir=DIR, "
        "disk_cache=DIR, disk_cache_size=SIZE, local_names=PATTERNS, log_file=F, log_level=L, "
        "visibility=V, expiry=HOURS, "
        "metrics_address=HOST:PORT, "
        "read_only (or ro), "
        "allow_other; fstab's _netdev, nofail, noauto, x-* are ignored",
    )
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.add_argument("--api-key-fd", type=int, help=argparse.SUPPRESS)  # the daemon's key

    status = sub.add_parser(
        "status",
        help="show what running mounts are doing",
        description="Show each upload in flight with its progress, failed and kept uploads, "
        "cache use and hit rate, prefetches, and requests and errors by kind.",
    )
    status.add_argument("mountpoint", type=Path, nargs="?", help="default: every mount of yours")
    status.add_argument("--json", action="store_true", help="print one JSON snapshot")
    status.add_argument("--watch", action="store_true", help="refresh every second until ^C")

    _add_recovery_parser(sub)

    unmount = sub.add_parser(
        "unmount",
        help="unmount MOUNTPOINT after uploads in flight finish",
        description="Wait for uploads in flight, unmount, and return once the daemon exited.",
    )
    unmount.add_argument("mountpoint", type=Path)
    unmount.add_argument(
        "--timeout",
        type=_seconds,
        default=600.0,
        help="give up after this many seconds of the mount staying busy (default 600)",
    )

    demo = sub.add_parser(
        "demo",
        help="mount the account, or a local emulator with example files if no key is set",
        description="With MISTRAL_API_KEY set, mount the account at MOUNTPOINT. Otherwise start "
        "a local emulator in the background with its data under --state, add example files "
        "(batch job outputs included) and mount it. --stop unmounts and stops the emulator.",
    )
    demo.add_argument("mountpoint", type=Path, nargs="?", default=Path("mnt"))
    demo.add_argument(
        "--state", type=Path, default=Path(".demo"), help="demo data folder (default .demo)"
    )
    demo.add_argument("--stop", action="store_true", help="unmount and stop the emulator")

    emulator = sub.add_parser(
        "emulator",
        help="run a local Files API server that behaves like the real one",
        description="Serve the Files API at http://HOST:PORT/v1 (https:// with --tls or "
        "--tls-cert) with files kept in --data. "
        "The key clients must send comes from --api-key, else MISTRAL_API_KEY, "
        "else 'emulator-key'.",
    )
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8080)
    emulator.add_argument(
        "--data", type=Path, default=Path(".mistralfs-emulator"), help="data folder"
    )
    emulator.add_argument("--api-key", help="the key clients must send")
    emulator.add_argument(
        "--max-file-size", type=_size, default="512M", help="largest upload accepted"
    )
    emulator.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    emulator.add_argument(
        "--faults",
        type=_fault_plan,
        metavar="SPEC",
        help="seeded random faults, the same on every run with the same requests: "
        "';'-separated seed=N, then per rule route=R[,R] (list, upload, retrieve, delete, "
        "content, url, storage or *), rate=P (0..1) and kinds=K[,K] (a status 400-599, "
        "429:S for Retry-After S, reset, cut, stall:S, badjson, lost), e.g. "
        "'seed=7;route=upload;rate=0.3;kinds=lost,503;route=*;rate=0.1;kinds=500,reset'. "
        'Also JSON ({"seed": 7, "rules": [...]}) or @FILE. '
        "See mistralfs/emulator/faults.py",
    )
    emulator.add_argument(
        "--storage-url",
        metavar="BASE",
        help="signed URLs point at BASE/<id>?se=..&sp=r&sig=.. instead of this server's "
        "/storage/ route, as the service points at Azure Blob Storage; a static server "
        "over DATA/blobs (e.g. nginx, ignoring the query) then serves content",
    )
    https = emulator.add_mutually_exclusive_group()
    https.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS with a self-signed certificate, made once in DATA/tls/cert.pem: "
        "clients trust it with --ca-file DATA/tls/cert.pem or SSL_CERT_FILE",
    )
    https.add_argument(
        "--tls-cert", type=Path, metavar="FILE", help="serve HTTPS with this PEM certificate"
    )
    emulator.add_argument(
        "--tls-key",
        type=Path,
        metavar="FILE",
        help="the --tls-cert certificate's PEM key (default: in the --tls-cert file)",
    )
    emulator.add_argument(
        "--batch-delay",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how long a batch job takes from QUEUED to done (default 2)",
    )
    return parser


def _add_recovery_parser(sub: argparse._SubParsersAction) -> None:
    recovery = sub.add_parser(
        "recovery",
        help="list, retry, save or discard what failed uploads left in the cache folder",
        description="Content whose upload was refused or failed is kept in CACHE_DIR/recovery/ "
        "with the reason. List it, upload it again (into another purpose with --purpose), "
        "save it elsewhere, or discard it. Works with or without a running mount.",
    )
    actions = recovery.add_subparsers(dest="action", required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir", type=Path, help="the mount's cache folder (default as for mount)"
    )
    listing = actions.add_parser("list", parents=[common], help="each entry with its reason")
    listing.add_argument("--json", action="store_true", help="print the entries as JSON")
    again = actions.add_parser("retry", parents=[common], help="upload an entry again")
    again.add_argument("id", help="the entry's id, or a unique start of it")
    again.add_argument("--purpose", help="upload into this purpose instead (e.g. batch)")
    again.add_argument("--name", help="upload under this file name instead")
    again.add_argument(
        "--server-url", help="default: the running mount's of this cache folder, else as mount"
    )
    again.add_argument("--api-key-file", type=Path, help="read the API key from this file")
    again.add_argument("--ca-file", type=Path, metavar="FILE", help="as for mount")
    keep = actions.add_parser("save", parents=[common], help="move an entry's content to DEST")
    keep.add_argument("id", help="the entry's id, or a unique start of it")
    keep.add_argument("dest", type=Path, help="a file to create, or a folder to put it in")
    drop = actions.add_parser("discard", parents=[common], help="delete an entry")
    drop.add_argument("id", help="the entry's id, or a unique start of it")


def _fault_plan(text: str) -> object:
    from mistralfs.emulator.faults import FaultSpecError, parse_plan

    try:
        return parse_plan(text)
    except FaultSpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _run_emulator(args: argparse.Namespace) -> int:
    from mistralfs.emulator.server import EmulatorConfig, run
    from mistralfs.emulator.tls import TlsSetupError
    from mistralfs.logs import setup_logging

    setup_logging(None, args.log_level)
    if args.tls_key is not None and args.tls_cert is None:
        print("mistralfs emulator: --tls-key needs --tls-cert", file=sys.stderr)
        return 2
    api_key = args.api_key or os.environ.get("MISTRAL_API_KEY") or "emulator-key"
    config = EmulatorConfig(
        data_dir=args.data,
        api_key=api_key,
        host=args.host,
        port=args.port,
        max_file_size=args.max_file_size,
        faults=args.faults,
        storage_url=args.storage_url,
        tls=args.tls,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        batch_delay=args.batch_delay,
    )
    try:
        config.tls_files()  # a certificate that cannot serve: one line, before binding
    except TlsSetupError as exc:
        print(f"mistralfs emulator: {exc}", file=sys.stderr)
        return 2
    run(config)
    return 0


COMMANDS = ("mount", "unmount", "status", "demo", "emulator", "recovery")


def _from_mount_helper(argv: list[str]) -> list[str]:
    """mount(8) via mount.fuse3 runs `mistralfs SOURCE MOUNTPOINT -o OPTIONS`."""
    if len(argv) >= 2 and argv[0] not in COMMANDS and not argv[0].startswith("-"):
        return ["mount", *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = _from_mount_helper(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "mount" and args.options:
        try:
            extra = [arg for spec in args.options for arg in options_to_args(spec)]
        except ConfigError as exc:
            print(f"mistralfs: {exc}", file=sys.stderr)
            return 2
        # -o options come first, so that the same option given as a flag wins.
        args = parser.parse_args([argv[0], *extra, *argv[1:]])
    if args.command == "emulator":
        return _run_emulator(args)
    from mistralfs.daemon import commands as daemon

    try:
        if args.command == "status":
            from mistralfs.daemon.status import status_command

            return status_command(args.mountpoint, as_json=args.json, watch=args.watch)
        if args.command == "recovery":
            from mistralfs.daemon.recovery_cmd import recovery_command

            return recovery_command(args.action, args)
        if args.command == "demo":
            from mistralfs.demo import demo_command

            return demo_command(args.mountpoint, args.state, args.stop)
        if args.command == "mount":
            return daemon.mount_command(args)
        return daemon.unmount_command(args.mountpoint, timeout=args.timeout)
    except ConfigError as exc:
        print(f"mistralfs: {exc}", file=sys.stderr)
        return 2
