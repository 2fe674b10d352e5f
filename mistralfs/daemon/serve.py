"""The daemon's trio main loop: check the key, mount, serve, and stop cleanly.

Everything runs in one nursery: pyfuse3's request handlers, block prefetches and the
signal watcher. On SIGTERM or SIGINT the daemon waits for uploads in flight, then ends
the FUSE loop and unmounts.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from mistralfs.api import ApiError, AuthError, CertificateRejected, FilesClient, RetryPolicy
from mistralfs.config import MountConfig
from mistralfs.daemon import systemd
from mistralfs.daemon.collector import collector_stats, settle_startup_heap
from mistralfs.daemon.control import serve_status
from mistralfs.daemon.notify import DesktopNotifier
from mistralfs.daemon.status import kept_failures
from mistralfs.fs.activity import Activity
from mistralfs.fs.build import FsOptions, build_filesystem
from mistralfs.fs.disk_cache import (
    MAX_PENDING_STORES,
    DiskCache,
    DiskCacheError,
    NoDiskCache,
)
from mistralfs.fs.filesystem import Filesystem
from mistralfs.fs.namespace import Namespace
from mistralfs.fs.operations import Operations
from mistralfs.fs.recovery import leftover_spools, recover

log = logging.getLogger(__name__)

STARTUP_CHECK_SECONDS = 12.0
NO_TRASH_OPTION = "x-gvfs-notrash"  # GLib: offer no trash on this mount
STATUS_INTERVAL = 1.0
DISK_FLUSH_SECONDS = 10.0  # at a clean stop, how long blocks queued for the disk cache may take
READAHEAD_KIB = 1024  # the largest request FUSE sends (256 pages)
MAX_OPEN_FILES = 1 << 20  # when the hard limit is "unlimited": the kernel's usual nr_open
STARTUP_RETRY = RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=2.0, total_budget=8.0)


class MountError(Exception):
    """Mounting did not happen; the message is the one line shown to the user."""


def fuse_options(config: MountConfig) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {"fsname=mistralfs", "subtype=mistralfs"}
    if config.read_only:
        options.add("ro")
    if config.allow_other:
        options.add("allow_other")
    return options


def _note_no_trash(mountpoint: Path, add: bool) -> None:
    """Tell GLib (file managers, `gio trash`) that this mount has no trash, or forget it.

    A trash needs a `.Trash-UID` folder in the root, which the mount cannot hold. For
    anyone but root the root is not writable, so GLib offers none; root may write
    anywhere, so GLib needs its `x-gvfs-notrash` option, which it reads with the
    mount's options through libmount. libfuse refuses `x-` options, so `mount --fake`
    (no mount(2), no helper) records it in libmount's utab beside the kernel's options,
    and `umount --fake` takes it away again. Only root may write utab.
    """
    if os.geteuid() != 0:
        return
    if add:
        command = ["mount", "--fake", "-i", "--no-canonicalize", "-t", "fuse.mistralfs"]
        command += ["-o", NO_TRASH_OPTION, "mistralfs", str(mountpoint)]
    else:
        command = ["umount", "--fake", "--no-canonicalize", str(mountpoint)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("%s: %s", " ".join(command), exc)
        return
    if result.returncode != 0:
        log.debug("%s: %s", " ".join(command), result.stderr.strip())


async def check_key(config: MountConfig, client: FilesClient) -> None:
    """Fail fast, with one clear line, on a refused key or an unreachable server."""
    try:
        with trio.fail_after(STARTUP_CHECK_SECONDS):
            await client.check_auth(STARTUP_RETRY)
    except CertificateRejected as exc:
        raise MountError(
            f"cannot use the server at {config.server_url}: {exc.message} (use --ca-file)"
        ) from exc
    except AuthError as exc:
        raise MountError(
            f"the server at {config.server_url} refused the API key ({exc.status})"
        ) from exc
    except ApiError as exc:
        raise MountError(f"cannot use the server at {config.server_url}: {exc}") from exc
    except trio.TooSlowError as exc:
        raise MountError(f"the server at {config.server_url} did not answer in time") from exc


async def serve(config: MountConfig, on_ready: Callable[[], None]) -> None:
    """Mount, call `on_ready` once the mount answers, and serve until unmounted or signalled."""
    retry = RetryPolicy(total_budget=config.retry_time)
    client = FilesClient(config.server_url, config.api_key, retry=retry, ca_file=config.ca_file)
    async with client:
        # The check's connection to the API is the one the first listing then finds open.
        await check_key(config, client)
        _raise_open_file_limit()
        async with await open_disk_cache(config) as disk, trio.open_nursery() as nursery:
            await _serve_mounted(config, client, disk, nursery, on_ready)


async def _serve_mounted(
    config: MountConfig,
    client: FilesClient,
    disk: DiskCache | NoDiskCache,
    nursery: trio.Nursery,
    on_ready: Callable[[], None],
) -> None:
    """Serve the mount: `client` checked, `disk` open, background work in `nursery`."""
    options = FsOptions(
        spool_dir=config.spool_dir,
        recovery_dir=config.recovery_dir,
        cache_size=config.cache_size,
        block_size=config.block_size,
        max_file_size=config.max_file_size,
        dir_cache_time=config.dir_cache_time,
        read_only=config.read_only,
        max_throughput=config.max_throughput,
        local_names=config.local_names,
        upload_defaults=config.upload_defaults,
        times_file=config.times_file,
    )
    notifier = DesktopNotifier()  # refused uploads reach the desktop, where there is one
    nursery.start_soon(notifier.run)
    parts = build_filesystem(client, nursery, options, disk=disk, on_refused=notifier.refused)
    fs, namespace, reader, writer = parts.fs, parts.namespace, parts.reader, parts.writer
    activity = parts.activity
    namespace.on_name_removed = namespace.on_name_added = _forget_in_kernel
    namespace.on_attrs_changed = _forget_attrs_in_kernel
    nursery.start_soon(disk.run)
    nursery.start_soon(client.warm_up)

    metrics_url: list[str] = []  # once the endpoint serves

    def snapshot() -> dict[str, object]:
        return {
            "mountpoint": str(config.mountpoint),
            "server_url": config.server_url,
            "pid": os.getpid(),
            "read_only": config.read_only,
            **activity.snapshot(),
            "pending": writer.pending(),
            "recovered": len(list(config.recovery_dir.glob("*.spool"))),
            "failed": kept_failures(config.recovery_dir),  # until retried or discarded
            "cache_dir": str(config.cache_dir),
            "ca_file": str(config.ca_file) if config.ca_file else None,
            "cache": reader.stats(),
            "disk_cache": disk.stats(),
            "requests": dict(client.stats.requests),
            "errors": dict(client.stats.errors),
            "answers": dict(client.stats.answers),
            "retries": dict(client.stats.retries),
            "metrics": metrics_url[0] if metrics_url else None,
            "gc": collector_stats(),
        }

    if config.metrics_address is not None:  # before mounting: a port in use refuses the mount
        address = config.metrics_address
        metrics_url.append(await _start_metrics(address, client, snapshot, activity, nursery))

    leftovers = leftover_spools(config.spool_dir)  # before this mount makes its own
    try:
        pyfuse3.init(Operations(fs), str(config.mountpoint), fuse_options(config))
    except RuntimeError as exc:
        raise MountError(f"cannot mount at {config.mountpoint}: {exc}") from exc
    stop = _StopRequest()
    unmounted_by_kernel = stopped = False
    try:
        recovered = trio.Event()
        nursery.start_soon(_recover, client, leftovers, config, namespace, recovered)
        nursery.start_soon(_serve_status, config.control_socket, snapshot)
        nursery.start_soon(_stop_on_signal, fs, activity, stop, recovered, config.stop_timeout)
        nursery.start_soon(_announce_when_answering, config, activity, on_ready)
        await pyfuse3.main()
        unmounted_by_kernel = not stop.requested
        stopped = True
    finally:
        # After `umount` the kernel has unmounted already; after a signal or a crash
        # we unmount, so no dead mount is left behind.
        pyfuse3.close(unmount=not unmounted_by_kernel)
        _note_no_trash(config.mountpoint, False)
        writer.drop_local()  # scratch files live as long as the mount
        if stopped:  # a clean stop: what was read is on disk for the next mount
            with trio.move_on_after(DISK_FLUSH_SECONDS):
                await disk.flush()
        nursery.cancel_scope.cancel()
    log.info("unmounted %s", config.mountpoint)


async def _start_metrics(
    address: tuple[str, int],
    client: FilesClient,
    snapshot: Callable[[], dict[str, object]],
    activity: Activity,
    nursery: trio.Nursery,
) -> str:
    """Serve the metrics at `address` in `nursery`; their URL.

    Imported here: most mounts serve none, and need not load prometheus_client.
    """
    from mistralfs.daemon.metrics import MetricsError, MountMetrics, bind, serve_metrics

    try:
        sock = bind(address)
    except MetricsError as exc:
        raise MountError(str(exc)) from exc
    metrics = MountMetrics(snapshot, activity, client.stats)
    url: str = await nursery.start(serve_metrics, sock, metrics)
    return url


async def open_disk_cache(config: MountConfig) -> DiskCache | NoDiskCache:
    """The disk tier asked for, locked and indexed; refusing it refuses the mount."""
    if config.disk_cache is None:
        return NoDiskCache()
    # Blocks waiting to be written are mostly the memory cache's own: let as many wait as
    # it holds, so that a disk slower than the download still gets them all.
    waiting = max(MAX_PENDING_STORES, config.cache_size // config.block_size)
    try:
        return await DiskCache.open(
            config.disk_cache, config.disk_cache_size, config.block_size, waiting
        )
    except DiskCacheError as exc:
        raise MountError(str(exc)) from exc


def _raise_open_file_limit() -> None:
    """Allow as many open files as the hard limit does, not the soft one (often 1024).

    Every block the disk tier serves is a mapping of its file, and a mapping keeps its
    file open: a memory cache of a few GiB of such blocks needs thousands.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = MAX_OPEN_FILES
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as exc:
            log.debug("open file limit left at %d: %s", soft, exc)


def _raise_readahead(device: int, kib: int) -> None:
    """Let the kernel read ahead `kib` KiB on this mount instead of its default 128.

    FUSE reads then come as 1 MiB requests instead of 128 KiB ones: eight times fewer
    trips through Python for a sequential read. Only root may change it; anyone else
    keeps the default, which works, just with more requests.
    """
    path = Path(f"/sys/class/bdi/{os.major(device)}:{os.minor(device)}/read_ahead_kb")
    try:
        if int(path.read_text()) < kib:
            path.write_text(str(kib))
    except (OSError, ValueError) as exc:
        log.debug("kernel readahead left as it is (%s): %s", path, exc)


async def _serve_status(path: Path, snapshot: Callable[[], dict[str, object]]) -> None:
    """The status channel is a convenience: without it the mount still serves."""
    try:
        await serve_status(path, snapshot)
    except OSError as exc:
        log.warning("no status channel at %s: %s", path, exc)


async def _announce_when_answering(
    config: MountConfig, activity: Activity, on_ready: Callable[[], None]
) -> None:
    """Report ready only once the mountpoint answers, then keep systemd's STATUS current."""
    device = (await trio.to_thread.run_sync(os.stat, config.mountpoint)).st_dev
    _raise_readahead(device, READAHEAD_KIB)
    await trio.to_thread.run_sync(_note_no_trash, config.mountpoint, True)
    settle_startup_heap()
    log.info("mounted %s at %s", config.server_url, config.mountpoint)
    on_ready()
    status = activity.summary()
    systemd.notify("READY=1", f"STATUS={status}")
    while True:
        await trio.sleep(STATUS_INTERVAL)
        if activity.summary() != status:
            status = activity.summary()
            systemd.notify(f"STATUS={status}")


def _forget_in_kernel(folder_inode: int, name: str) -> None:
    """Drop the kernel's cached entry for a name: gone, or no longer missing."""
    try:
        pyfuse3.invalidate_entry_async(folder_inode, name.encode("utf-8"), ignore_enoent=True)
    except OSError as exc:
        log.debug("could not invalidate %s in the kernel: %s", name, exc)


def _forget_attrs_in_kernel(inode: int) -> None:
    """Drop the kernel's cached attributes of a file that was uploaded again.

    Without a writeback cache this does not block, so it is safe from a handler.
    """
    try:
        pyfuse3.invalidate_inode(inode, attr_only=True)
    except OSError as exc:  # ENOENT: the kernel does not know the inode
        log.debug("could not invalidate inode %d in the kernel: %s", inode, exc)


class _StopRequest:
    requested = False


async def _recover(
    client: FilesClient,
    leftovers: list[Path],
    config: MountConfig,
    namespace: Namespace,
    done: trio.Event,
) -> None:
    """Deal with what a crashed daemon left, while this one already serves."""
    try:
        if leftovers:
            log.info("recovery: %d spool(s) left by a previous daemon", len(leftovers))
            await recover(client, leftovers, config.recovery_dir, config.upload_defaults)
            namespace.invalidate()  # recovered uploads show up at the next listing
    finally:
        done.set()


async def _stop_on_signal(
    fs: Filesystem,
    activity: Activity,
    stop: _StopRequest,
    recovered: trio.Event,
    stop_timeout: float,
) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: waiting for uploads in flight, then unmounting", signal.strsignal(signum))
            systemd.notify("STOPPING=1", f"STATUS=stopping: {activity.summary()}")
            with trio.move_on_after(stop_timeout) as waited:
                await recovered.wait()
                await fs.wait_for_uploads()
            if waited.cancelled_caught:
                log.warning("stopping after %g s with uploads in flight; their spools are "
                            "uploaded at the next mount", stop_timeout)  # fmt: skip
            stop.requested = True
            pyfuse3.terminate()
            return
