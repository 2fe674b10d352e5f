"""Starting and stopping the mount daemon as a process.

`mistralfs mount` without `--foreground` starts itself again in a new session with
`--foreground --ready-fd N` and waits on that pipe: the child writes `ready` once the
mount is live, or `error <message>` if it could not mount. The parent returns only
then, so scripts can use the mount on the next line. A pid file per mountpoint lets
`mistralfs unmount` wait for the daemon to exit.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import TypeVar

import trio

from mistralfs.config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DISK_CACHE_SIZE,
    ConfigError,
    MountConfig,
    default_cache_dir,
    format_address,
    format_local_names,
    read_api_key,
)
from mistralfs.daemon.state import mount_state_file, read_pid, wait_for_exit
from mistralfs.fs.upload_settings import UploadSettings
from mistralfs.logs import setup_logging
from mistralfs.private import open_private_append, private_folder, write_private_file

log = logging.getLogger(__name__)

READY_TIMEOUT = 30.0
EXIT_WAIT = 30.0
UNMOUNT_PROGRESS_EVERY = 2.0


def _config_from(args: argparse.Namespace) -> MountConfig:
    mountpoint = args.mountpoint.expanduser().absolute()
    _clear_stale_mount(mountpoint)
    mountpoint = mountpoint.resolve()
    if not mountpoint.exists():
        raise ConfigError(f"mountpoint {mountpoint} does not exist (create it with mkdir)")
    if not mountpoint.is_dir():
        raise ConfigError(f"mountpoint {mountpoint} is not a folder")
    if os.path.ismount(mountpoint):
        raise ConfigError(f"{mountpoint} is already a mountpoint (mistralfs unmount it first)")
    if any(mountpoint.iterdir()):
        raise ConfigError(f"mountpoint {mountpoint} is not empty: mounting would hide its files")
    cache_dir = (args.cache_dir or default_cache_dir()).expanduser().resolve()
    disk_cache = _disk_cache_dir(args.disk_cache, args.disk_cache_size, mountpoint)
    config = MountConfig(
        mountpoint=mountpoint,
        server_url=args.server_url.rstrip("/"),
        api_key=_api_key(args),
        cache_dir=cache_dir,
        cache_size=args.cache_size,
        max_throughput=args.max_throughput,
        dir_cache_time=args.dir_cache_time,
        read_only=args.read_only,
        allow_other=args.allow_other,
        retry_time=args.retry_time,
        stop_timeout=args.stop_timeout,
        disk_cache=disk_cache,
        disk_cache_size=args.disk_cache_size or DEFAULT_DISK_CACHE_SIZE,
        ca_file=_ca_file(args.ca_file),
        metrics_address=args.metrics_address,
    )
    if args.local_names is not None:
        config.local_names = args.local_names
    config.upload_defaults = UploadSettings(args.visibility, args.expiry)
    _ = config.pid_file, config.control_socket  # an unsafe runtime folder refuses the mount now
    return config


def _api_key(args: argparse.Namespace) -> str:
    """The key, from the pipe `mistralfs mount` handed to its daemon, else as configured.

    The daemon then drops MISTRAL_API_KEY from its environment, so that what it starts
    (fusermount3) does not get the key either.
    """
    if args.api_key_fd is None:
        return read_api_key(args.api_key_file)
    with os.fdopen(args.api_key_fd, encoding="utf-8") as pipe:
        key = pipe.read().strip()
    if not key:
        raise ConfigError("no API key came through the pipe from `mistralfs mount`")
    return key


def _ca_file(path: Path | None) -> Path | None:
    """--ca-file as an absolute path (the daemon runs in /), and the trust it or
    SSL_CERT_FILE gives loaded now: a file that is missing or holds no certificate is
    one line and exit 2, not a mount that fails at its first request."""
    from mistralfs.api.tls import TrustError, client_context

    path = path.expanduser().absolute() if path is not None else None
    try:
        client_context(path)
    except TrustError as exc:
        raise ConfigError(str(exc)) from None
    return path


def _drop_from_environment(name: str) -> None:
    """Remove `name` from the environment, and wipe its value where /proc/PID/environ
    shows it: unsetenv alone leaves the bytes the process was started with in place.

    For a daemon started with the key in its environment (by hand, or through a unit's
    EnvironmentFile=); the processes it starts (fusermount3) do not get it either.
    """
    libc = ctypes.CDLL(None)
    libc.getenv.restype = ctypes.c_void_p
    libc.getenv.argtypes = [ctypes.c_char_p]
    value = libc.getenv(name.encode())
    if value:
        ctypes.memset(value, 0, len(ctypes.string_at(value)))
    os.environ.pop(name, None)


MIN_DISK_CACHE_BLOCKS = 2


def _disk_cache_dir(folder: Path | None, size: int | None, mountpoint: Path) -> Path | None:
    """Check --disk-cache and its size before mounting, so mistakes get one clear line."""
    if folder is None:
        if size is not None:
            raise ConfigError("--disk-cache-size needs --disk-cache DIR")
        return None
    folder = folder.expanduser().resolve()
    if folder == mountpoint or mountpoint in folder.parents:
        raise ConfigError(f"--disk-cache {folder} is inside the mountpoint {mountpoint}")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--disk-cache {folder} exists and is not a folder")
    smallest = MIN_DISK_CACHE_BLOCKS * DEFAULT_BLOCK_SIZE
    if size is not None and size < smallest:
        raise ConfigError(f"--disk-cache-size must be at least {smallest // 1024**2}M")
    return folder


def _clear_stale_mount(mountpoint: Path) -> None:
    """A daemon that died leaves a mount that answers ENOTCONN: unmount it before reuse."""
    try:
        os.stat(mountpoint)
        os.listdir(mountpoint)  # stat alone may be answered from the kernel's cache
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return
        log.warning("clearing the stale mount left at %s by a daemon that died", mountpoint)
        print(f"mistralfs: clearing the stale mount at {mountpoint}", file=sys.stderr)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=False)


def mount_command(args: argparse.Namespace) -> int:
    config = _config_from(args)
    if args.cache_size < config.block_size:
        raise ConfigError(f"--cache-size must be at least {config.block_size} bytes")
    private_folder(config.cache_dir, "cache folder")  # spooled content, recovery, the log
    if args.foreground:
        return _run_foreground(config, args)
    return _start_background(config, args)


E = TypeVar("E", bound=BaseException)


def mount_error_in(raised: BaseException, kind: type[E]) -> E | None:
    """The `kind` error that stopped the mount, also when a nursery wrapped it in an
    ExceptionGroup; None if anything else is in there too."""
    if isinstance(raised, kind):
        return raised
    if isinstance(raised, BaseExceptionGroup):
        found, rest = raised.split(kind)
        if found is not None and rest is None:
            leaf: BaseException = found
            while isinstance(leaf, BaseExceptionGroup):
                leaf = leaf.exceptions[0]
            return leaf if isinstance(leaf, kind) else None
    return None


def _run_foreground(config: MountConfig, args: argparse.Namespace) -> int:
    from mistralfs.daemon.serve import MountError, serve

    setup_logging(args.log_file, args.log_level)
    _drop_from_environment("MISTRAL_API_KEY")  # read already
    ready_pipe = os.fdopen(args.ready_fd, "w") if args.ready_fd is not None else None
    pids = config.pid_file

    def on_ready() -> None:
        write_private_file(pids, f"{os.getpid()}\n{config.mountpoint}\n")
        if ready_pipe is not None:
            ready_pipe.write("ready\n")
            ready_pipe.close()
        elif not os.environ.get("JOURNAL_STREAM"):  # the journal has the log line already
            print(f"mistralfs: mounted at {config.mountpoint}", file=sys.stderr, flush=True)

    try:
        trio.run(serve, config, on_ready)
    except (MountError, ExceptionGroup) as raised:
        exc = mount_error_in(raised, MountError)
        if exc is None:
            raise
        log.error("%s", exc)
        if ready_pipe is not None and not ready_pipe.closed:
            ready_pipe.write(f"error {exc}\n")
            ready_pipe.close()
        else:
            print(f"mistralfs: {exc}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(OSError):
            if pids.read_text(encoding="utf-8").split()[0] == str(os.getpid()):
                pids.unlink()
    return 0


def _start_background(config: MountConfig, args: argparse.Namespace) -> int:
    """Start the daemon and wait for its word; the key goes to it through a pipe.

    Neither its command line nor its environment (`/proc/PID/environ`) holds the key,
    whether it came from MISTRAL_API_KEY, --api-key-file or a systemd credential.
    """
    log_file = (args.log_file or config.cache_dir / "mistralfs.log").expanduser().resolve()
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    read_fd, write_fd = os.pipe()
    key_read, key_write = os.pipe()
    command = [
        sys.executable, "-m", "mistralfs", "mount", str(config.mountpoint),
        "--foreground", "--ready-fd", str(write_fd), "--api-key-fd", str(key_read),
        "--log-file", str(log_file),
        "--log-level", args.log_level, "--server-url", config.server_url,
        "--cache-dir", str(config.cache_dir), "--cache-size", str(config.cache_size),
        "--dir-cache-time", str(config.dir_cache_time),
        "--retry-time", str(config.retry_time), "--stop-timeout", str(config.stop_timeout),
    ]  # fmt: skip
    if config.read_only:
        command.append("--read-only")
    if config.allow_other:
        command.append("--allow-other")
    if config.ca_file is not None:
        command += ["--ca-file", str(config.ca_file)]
    if config.max_throughput is not None:
        command += ["--max-throughput", str(config.max_throughput)]
    if config.upload_defaults.visibility is not None:
        command += ["--visibility", config.upload_defaults.visibility]
    if config.upload_defaults.expiry is not None:
        command += ["--expiry", str(config.upload_defaults.expiry or "none")]
    if config.disk_cache is not None:
        command += ["--disk-cache", str(config.disk_cache)]
        command += ["--disk-cache-size", str(config.disk_cache_size)]
    if config.metrics_address is not None:
        command += ["--metrics-address", format_address(config.metrics_address)]
    command += ["--local-names", format_local_names(config.local_names)]
    env = {name: value for name, value in os.environ.items() if name != "MISTRAL_API_KEY"}
    stderr = open_private_append(log_file)
    try:
        child = subprocess.Popen(
            command,
            pass_fds=(write_fd, key_read),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            cwd="/",
            env=env,
            start_new_session=True,
        )
    finally:
        os.close(stderr)
        os.close(write_fd)
        os.close(key_read)
    # If it died before reading, its log says why; the key is not for anyone else.
    with contextlib.suppress(BrokenPipeError), os.fdopen(key_write, "w") as key_pipe:
        key_pipe.write(config.api_key)
    with os.fdopen(read_fd) as pipe:
        ready, _, _ = select.select([pipe], [], [], READY_TIMEOUT)
        answer = pipe.readline().strip() if ready else ""
    if answer == "ready":
        print(f"mistralfs: mounted at {config.mountpoint} (log: {log_file})")
        return 0
    if answer.startswith("error "):
        print(f"mistralfs: {answer[len('error ') :]}", file=sys.stderr)
    elif not answer and child.poll() is None:
        print(f"mistralfs: the mount did not become ready; see {log_file}", file=sys.stderr)
        child.terminate()
    else:
        print(f"mistralfs: the daemon exited before mounting; see {log_file}", file=sys.stderr)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=EXIT_WAIT)
    return 1


def unmount_command(mountpoint: Path, *, timeout: float) -> int:
    """Unmount once nothing is in flight (the kernel says busy until then), then wait."""
    target = mountpoint.expanduser().absolute()
    _clear_stale_mount(target)
    target = target.resolve()
    pid = read_pid(mount_state_file(target, "pid"))
    if not os.path.ismount(target):
        print(f"mistralfs: {target} is not mounted", file=sys.stderr)
        return 1
    deadline = time.monotonic() + timeout
    told = False
    shown = 0.0
    while True:
        result = subprocess.run(
            ["fusermount3", "-u", str(target)], capture_output=True, text=True, check=False
        )
        if result.returncode == 0:
            break
        busy = "busy" in result.stderr.lower()
        if not busy or time.monotonic() > deadline:
            print(f"mistralfs: cannot unmount {target}: {result.stderr.strip()}", file=sys.stderr)
            return 1
        if not told:
            print(f"mistralfs: {target} is busy (uploads in flight or files open); waiting")
            told = True
        shown = _show_uploads(target, shown)
        time.sleep(0.2)
    if pid is not None and not wait_for_exit(pid, EXIT_WAIT):
        print(f"mistralfs: unmounted, but daemon {pid} is still running", file=sys.stderr)
        return 1
    return 0


def _show_uploads(mountpoint: Path, last_shown: float) -> float:
    """While unmount waits, print the uploads in flight every few seconds."""
    from mistralfs.daemon.status import StatusError, snapshot_of, upload_lines

    if time.monotonic() - last_shown < UNMOUNT_PROGRESS_EVERY:
        return last_shown
    with contextlib.suppress(StatusError):
        for line in upload_lines(snapshot_of(mountpoint)):
            print(line, flush=True)
    return time.monotonic()
