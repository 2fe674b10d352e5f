"""Putting the filesystem together: one place that wires its parts, for the daemon and
for the tests alike, so that what the tests run is what the mount runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import trio

from mistralfs.api.protocol import FilesApi
from mistralfs.fs.activity import Activity
from mistralfs.fs.disk_cache import DiskCache, NoDiskCache
from mistralfs.fs.filesystem import Filesystem
from mistralfs.fs.names import DEFAULT_LOCAL_NAMES, LocalNames
from mistralfs.fs.namespace import Namespace
from mistralfs.fs.reader import FREE_GROWTH_BLOCKS, BlockReader
from mistralfs.fs.upload_settings import UploadSettings
from mistralfs.fs.writer import Writer


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


@dataclass(frozen=True)
class FsParts:
    """The filesystem, and the parts the daemon reports on and hooks into."""

    fs: Filesystem
    namespace: Namespace
    reader: BlockReader
    writer: Writer
    activity: Activity


def build_filesystem(
    client: FilesApi,
    nursery: trio.Nursery,
    options: FsOptions,
    *,
    disk: DiskCache | NoDiskCache | None = None,
) -> FsParts:
    """The filesystem over `client`; its background work runs in `nursery`."""
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
    )
    fs = Filesystem(client, namespace, reader, writer, read_only=options.read_only)
    return FsParts(fs, namespace, reader, writer, activity)
