"""Putting the filesystem together: one place that wires its parts, for the daemon and
for the tests alike, so that what the tests run is what the mount runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import trio

from mistralfs.api.protocol import FilesApi
from mistralfs.fs.activity import Activity
from mistralfs.fs.disk_cache import DiskCache, NoDiskCache
from mistralfs.fs.filesystem import Filesystem
from mistralfs.fs.mtimes import KeptTimes, TimesFile
from mistralfs.fs.names import DEFAULT_LOCAL_NAMES, LocalNames
from mistralfs.fs.namespace import Namespace
from mistralfs.fs.reader import FREE_GROWTH_BLOCKS, BlockReader
from mistralfs.fs.refusals import RefusalListener, ignore
from mistralfs.fs.upload_settings import UploadSettings
from mistralfs.fs.writer import Writer

T = TypeVar("T")


@dataclass(frozen=True)
class FsOptions:
    """What a mount's options say about the filesystem itself."""

    spool_dir: Path
    recovery_dir: Path
    cache_size: int
    block_size: int
    max_file_size: int
    dir_cache_time: float = 60.0
    read_only: bool = False
    max_throughput: float | None = None  # bytes per second; None: no target
    free_growth_blocks: int = FREE_GROWTH_BLOCKS  # see reader.py
    local_names: tuple[str, ...] = DEFAULT_LOCAL_NAMES  # scratch files: see names.py
    # --visibility, --expiry
    upload_defaults: UploadSettings = field(default_factory=UploadSettings)
    times_file: Path | None = None  # where set times are kept (mtimes.py); None: memory


@dataclass(frozen=True)
class FsParts:
    """The filesystem, and the parts the daemon reports on and hooks into."""

    fs: Filesystem
    namespace: Namespace
    reader: BlockReader
    writer: Writer
    activity: Activity
    times: KeptTimes


def build_filesystem(
    client: FilesApi,
    nursery: trio.Nursery,
    options: FsOptions,
    *,
    disk: DiskCache | NoDiskCache | None = None,
    on_refused: RefusalListener = ignore,
) -> FsParts:
    """The filesystem over `client`; its background work runs in `nursery`.

    `on_refused` hears of each upload that did not happen (the daemon tells the desktop).
    """
    activity = Activity()
    namespace = Namespace(client, options.dir_cache_time, LocalNames(options.local_names))
    reader = BlockReader(
        client,
        nursery,
        cache_size=options.cache_size,
        block_size=options.block_size,
        disk=disk,
        max_throughput=options.max_throughput,
        free_growth_blocks=options.free_growth_blocks,
    )
    writer = Writer(
        client,
        namespace,
        reader,
        activity,
        nursery=nursery,
        spool_dir=options.spool_dir,
        recovery_dir=options.recovery_dir,
        max_file_size=options.max_file_size,
        upload_defaults=options.upload_defaults,
        on_refused=on_refused,
    )
    times = KeptTimes(TimesFile(options.times_file), writer.spool_for)
    kept = disk if disk is not None else NoDiskCache()  # what is kept by file id goes with it
    namespace.on_file_bound = times.bound
    namespace.on_id_forgotten = times.forget
    namespace.on_deleted_elsewhere = _each(kept.forget, times.forget)
    namespace.on_account_listed = _each(kept.keep_only, times.keep_only)
    fs = Filesystem(
        client,
        namespace,
        reader,
        writer,
        read_only=options.read_only,
        times=times,
        activity=activity,
    )
    return FsParts(fs, namespace, reader, writer, activity, times)


def _each(*calls: Callable[[T], None]) -> Callable[[T], None]:
    """One hook for several parts that keep things by file id."""

    def each(argument: T) -> None:
        for call in calls:
            call(argument)

    return each
