"""Readahead across files: small files that follow, in name order, the ones being read.

Tools that read a folder file by file (`cat *`, `grep -r`, `tar`, `cp -r`, `rsync`)
mostly open the files in name order. Each small file costs a request, and a request's
latency, not its bytes, is what such a run waits on. When the files opened in a
folder follow each other by name, the next ones are fetched in the background, the
window doubling up to a bound, just as blocks are within one file. Nothing is fetched
for a single open, or for opens out of order; a listing alone fetches nothing.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from mistralfs.fs.namespace import FileNode, Folder
from mistralfs.fs.reader import BlockReader

MAX_WINDOW = 32  # files fetched ahead at most, per folder


@dataclass
class _FolderRun:
    """What the opens in one folder look like so far."""

    names: list[str] = field(default_factory=list)  # sorted; rebuilt when it goes stale
    last: int = -1  # position of the file opened last
    window: int = 0
    fetched_to: int = -1  # the furthest position fetched ahead


class FolderReadahead:
    """Decides, at each open, which following small files to fetch ahead."""

    def __init__(self, reader: BlockReader) -> None:
        self._reader = reader
        self._runs: dict[int, _FolderRun] = {}

    def opening(self, node: FileNode) -> None:
        folder = node.folder
        run = self._runs.setdefault(folder.inode, _FolderRun())
        position = self._position(run, folder, node.name)
        if position is None:
            return
        if run.last >= 0 and 0 < position - run.last <= 2:  # the next file, or one skipped
            run.window = min(max(2 * run.window, 2), MAX_WINDOW)
        else:
            run.window, run.fetched_to = 0, position
        run.last = position
        start = max(position, run.fetched_to) + 1
        for name in run.names[start : position + run.window + 1]:
            sibling = folder.entries.get(name)
            if sibling is not None and sibling.remote is not None and sibling.local_size is None:
                self._reader.prefetch_whole(sibling.remote)
        run.fetched_to = max(run.fetched_to, position + run.window)

    def _position(self, run: _FolderRun, folder: Folder, name: str) -> int | None:
        """Where `name` sorts among the folder's names; the sorted list is rebuilt
        when the folder has changed (a different count, or a name not found)."""
        for fresh in (False, True):
            if fresh or len(run.names) != len(folder.entries):
                run.names = sorted(folder.entries)
                run.last, run.window, run.fetched_to = -1, 0, -1
            position = bisect.bisect_left(run.names, name)
            if position < len(run.names) and run.names[position] == name:
                return position
        return None
