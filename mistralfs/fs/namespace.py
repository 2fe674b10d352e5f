"""The tree the mount shows: inodes, purpose folders, names, and the cached listings.

Each folder's listing is fetched by itself, filtered by its purpose (all pages at once
once the total is known), and trusted for `dir_cache_time` seconds: `ls` of one folder
never waits for the files of the others. Only the root needs the whole account, to
learn which other purposes (say `audio`) hold files; that listing refreshes every
folder it covers. Changes made through this mount are applied at once, and remembered
so that a listing fetched while they happened cannot undo them.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import pyfuse3
import trio

from mistralfs.api import RemoteFile
from mistralfs.api.protocol import FilesApi
from mistralfs.fs.failures import RecentFailures
from mistralfs.fs.names import (
    STANDARD_PURPOSES,
    LocalNames,
    folder_name,
    free_name,
    oldest_first,
)
from mistralfs.fs.upload_settings import UploadSettings, expired

log = logging.getLogger(__name__)

# Large pages: a folder of a thousand files is one request. The client follows the
# service if it caps the page size.
LIST_PAGE_SIZE = 1000


@dataclass(eq=False)
class Folder:
    """A purpose folder. `entries` holds remote files and files still being written."""

    inode: int
    purpose: str
    name: str
    entries: dict[str, FileNode] = field(default_factory=dict)
    fetched_at: float | None = None  # when the listing its entries come from was started
    # The kernel was told a name is missing here: names later listings bring are
    # reported (on_name_added), so that it forgets those absences.
    absences_told: bool = False
    refresh_lock: trio.Lock = field(default_factory=trio.Lock, repr=False)


class Presence(enum.Enum):
    """Whether a file still has its name, and if not, what took it.

    NAMED goes to any of the others once; only GONE comes back, when a rename gives a
    name again to a file a listing dropped meanwhile.
    """

    NAMED = "named"
    REMOVED = "removed"  # rm through this mount
    REPLACED = "replaced"  # a rename through this mount took its name
    GONE = "gone"  # deleted elsewhere, or closed without ever being uploaded


@dataclass(eq=False)
class FileNode:
    """A file: remote once uploaded (`remote` set), local while only in a spool."""

    inode: int
    folder: Folder
    name: str
    filename: str  # the remote filename its next upload gets (the name may carry an id)
    remote: RemoteFile | None = None
    local_size: int | None = None  # set while a spool holds newer content than `remote`
    local_time: int = 0
    presence: Presence = field(default_factory=lambda: Presence.NAMED)
    # Given a scratch file's name through the mount (`LocalNames`): its content lives in
    # the spool only, never uploaded; a remote file renamed to such a name keeps it.
    local: bool = False
    # Its own upload settings (xattrs user.mistral.visibility, .expiry): see upload_settings.py
    upload_settings: UploadSettings = field(default_factory=UploadSettings)
    # Why its last move through the mount was refused (shown as user.mistral.error on
    # the name it kept), until its content is uploaded again.
    refused_move: str | None = None
    # Serialises uploads, renames and opening or dropping the spool of this file.
    lock: trio.Lock = field(default_factory=trio.Lock, repr=False)

    @property
    def attached(self) -> bool:
        """It still has its name."""
        return self.presence is Presence.NAMED

    @property
    def unlinked(self) -> bool:
        """Removed by the user, so unsaved changes may go too."""
        return self.presence is Presence.REMOVED

    @property
    def replaced(self) -> bool:
        """Its name was taken by a rename through this mount."""
        return self.presence is Presence.REPLACED

    @property
    def removed_here(self) -> bool:
        """Its name went through this mount (rm, or a rename over it), not elsewhere."""
        return self.presence in (Presence.REMOVED, Presence.REPLACED)

    @property
    def size(self) -> int:
        if self.local_size is not None:
            return self.local_size
        return self.remote.bytes if self.remote is not None else 0


@dataclass(eq=False)
class Root:
    inode: int = pyfuse3.ROOT_INODE


Node = Root | Folder | FileNode


class Namespace:
    """Inode table and folder contents, refreshed from the API when stale."""

    def __init__(
        self, client: FilesApi, dir_cache_time: float, local_names: LocalNames | None = None
    ) -> None:
        self._client = client
        self.dir_cache_time = dir_cache_time
        self.local_names = local_names if local_names is not None else LocalNames()
        self.root = Root()
        self._nodes: dict[int, Node] = {self.root.inode: self.root}
        self._next_inode = self.root.inode + 1
        self._folders: dict[str, Folder] = {}
        self._inode_by_id: dict[str, int] = {}
        # The account-wide listing, which tells which purposes hold files.
        self._root_fetched_at: float | None = None
        self._root_lock = trio.Lock()
        # A listing that just gave up fails at once for a moment (see failures.py).
        self._failures = RecentFailures()
        # Own changes, so that a listing fetched while they happened cannot undo them.
        self._deleted_ids: set[str] = set()
        self._own_uploads: dict[str, tuple[RemoteFile, float]] = {}
        # (purpose, filename) of uploads in flight: a listing made meanwhile may already
        # hold the new file, which must not appear as a second file before it is known.
        self._uploading: collections.Counter[tuple[str, str]] = collections.Counter()
        # Called with (folder inode, name) when a name goes, so the kernel forgets it too.
        self.on_name_removed: Callable[[int, str], None] = lambda _inode, _name: None
        # Called with (folder inode, name) when a listing brings a new name, so that the
        # kernel forgets that it was missing.
        self.on_name_added: Callable[[int, str], None] = lambda _inode, _name: None
        # Called with an inode whose attributes changed (a new upload: size, times).
        self.on_attrs_changed: Callable[[int], None] = lambda _inode: None
        # Called with the id of a file that a listing shows deleted elsewhere, and with
        # every id of the account after a whole listing, so that kept content goes too.
        self.on_deleted_elsewhere: Callable[[str], None] = lambda _file_id: None
        self.on_account_listed: Callable[[frozenset[str]], None] = lambda _file_ids: None
        # Called when an upload binds a file to a new id (with the remote file it showed
        # before), and with each id this mount deleted: the times kept by id follow.
        self.on_file_bound: Callable[[FileNode, RemoteFile | None], None] = lambda _n, _r: None
        self.on_id_forgotten: Callable[[str], None] = lambda _file_id: None
        for purpose in STANDARD_PURPOSES:
            self._folder_for(purpose)

    # -- lookups --------------------------------------------------------------

    def node(self, inode: int) -> Node | None:
        return self._nodes.get(inode)

    async def folders(self) -> list[Folder]:
        """Standard folders always; another purpose's folder while it holds files."""
        await self.ensure_root_fresh()
        return [f for f in self._folders.values() if self._shown(f)]

    def file_by_id(self, file_id: str) -> FileNode | None:
        inode = self._inode_by_id.get(file_id)
        node = self._nodes.get(inode) if inode is not None else None
        return node if isinstance(node, FileNode) else None

    async def find_folder(self, name: str) -> Folder | None:
        """The root's entry `name`, with the folder's listing fresh.

        A name no folder is known by costs, while the root's listing is stale, one
        listing filtered by the purpose of that name (which, for a folder that exists,
        is the listing its `ls` needs next), and only if that finds nothing the whole
        account's: a folder's name can differ from its purpose.
        """
        folder = self._named(name)
        if folder is not None and folder.purpose in STANDARD_PURPOSES:
            return folder  # always there: its listing waits until it is listed or searched
        if folder is not None:
            await self.ensure_folder_fresh(folder)
            if self._shown(folder):
                return folder
        if self._root_is_stale() and name not in self._folders and folder_name(name) == name:
            started = trio.current_time()
            files = await self._list(name)
            if any(f.purpose == name for f in files):  # else no folder is made for a probe
                folder = self._folder_for(name)
                self._apply_folder_listing(folder, files, started)
                if self._shown(folder):
                    return folder
        await self.ensure_root_fresh()
        folder = self._named(name)
        return folder if folder is not None and self._shown(folder) else None

    async def ensure_folder_fresh(self, folder: Folder) -> None:
        """Fetch the folder's listing again if it is older than the folder cache time."""
        if not self._is_stale(folder.fetched_at):
            return
        async with folder.refresh_lock:
            if self._is_stale(folder.fetched_at):  # refreshed while we waited
                await self._refresh_folder(folder)

    async def ensure_root_fresh(self) -> None:
        """Fetch the whole account's listing again if it is older than the cache time."""
        if not self._root_is_stale():
            return
        async with self._root_lock:
            if self._root_is_stale():
                await self._refresh_root()

    def fresh_for(self, folder: Folder) -> float:
        """Seconds for which the folder's listing is still trusted (0 once stale)."""
        if folder.fetched_at is None:
            return 0.0
        return max(0.0, folder.fetched_at + self.dir_cache_time - trio.current_time())

    def invalidate(self) -> None:
        """Make the next lookup or listing fetch the account again."""
        self._root_fetched_at = None
        for folder in self._folders.values():
            folder.fetched_at = None

    def _root_is_stale(self) -> bool:
        return self._is_stale(self._root_fetched_at)

    def _is_stale(self, fetched_at: float | None) -> bool:
        if fetched_at is None:
            return True
        return trio.current_time() - fetched_at >= self.dir_cache_time

    def _named(self, name: str) -> Folder | None:
        return next((f for f in self._folders.values() if f.name == name), None)

    @staticmethod
    def _shown(folder: Folder) -> bool:
        return folder.purpose in STANDARD_PURPOSES or bool(folder.entries)

    # -- changes made through this mount ----------------------------------------

    def add_local(self, folder: Folder, name: str, now: int) -> FileNode:
        """A new file that exists only in a spool until its upload succeeds."""
        node = FileNode(
            inode=self._new_inode(),
            folder=folder,
            name=name,
            filename=name,
            local_size=0,
            local_time=now,
            local=name in self.local_names,
        )
        self._nodes[node.inode] = node
        folder.entries[name] = node
        return node

    @contextlib.contextmanager
    def uploading(self, purpose: str, filename: str) -> Iterator[None]:
        """While an upload is in flight, listings leave out new files of that name."""
        key = (purpose, filename)
        self._uploading[key] += 1
        try:
            yield
        finally:
            self._uploading[key] -= 1
            if not self._uploading[key]:
                del self._uploading[key]

    def uploaded(self, node: FileNode, remote: RemoteFile) -> None:
        """The spool behind `node` is now the remote file `remote`."""
        previous = node.remote
        if node.remote is not None:
            self._inode_by_id.pop(node.remote.id, None)
        node.remote = remote
        node.refused_move = None
        self._inode_by_id[remote.id] = node.inode
        self._own_uploads[remote.id] = (remote, trio.current_time())
        self.on_file_bound(node, previous)
        self.on_attrs_changed(node.inode)

    def move(self, node: FileNode, folder: Folder, name: str) -> None:
        """Rename: the node keeps its inode; its next upload carries the new name."""
        if node.folder.entries.get(node.name) is node:
            del node.folder.entries[node.name]
        node.folder, node.name, node.filename = folder, name, name
        node.local = name in self.local_names
        folder.entries[name] = node
        if node.presence is Presence.GONE:  # a listing dropped it while it was renamed
            node.presence = Presence.NAMED

    def detach(
        self, node: FileNode, *, deleted: bool = True, why: Presence = Presence.GONE
    ) -> None:
        """Remove a file's name at once; `why` says what took it, if nothing did before.

        `deleted` says its remote file is gone for good, so that a listing fetched
        before the deletion cannot bring it back. A file only hidden (a rename target
        whose replacement is not uploaded yet) comes back with the next listing if it
        is still there.
        """
        if node.folder.entries.get(node.name) is node:
            del node.folder.entries[node.name]
            self.on_name_removed(node.folder.inode, node.name)
        if node.presence is Presence.NAMED:
            node.presence = why
        if node.remote is not None:
            if self._inode_by_id.get(node.remote.id) == node.inode:
                del self._inode_by_id[node.remote.id]
            self._own_uploads.pop(node.remote.id, None)
            if deleted:
                self._deleted_ids.add(node.remote.id)

    def forget_id(self, file_id: str) -> None:
        """A remote file this mount deleted: drop whatever still shows it."""
        node = self.file_by_id(file_id)
        if node is not None and node.remote is not None and node.remote.id == file_id:
            self.detach(node)
        self._deleted_ids.add(file_id)
        self._own_uploads.pop(file_id, None)
        self.on_id_forgotten(file_id)

    # -- the listing --------------------------------------------------------------

    async def _refresh_folder(self, folder: Folder) -> None:
        started = trio.current_time()
        files = await self._list(folder.purpose)
        self._apply_folder_listing(folder, files, started)

    async def _list(self, purpose: str | None) -> list[RemoteFile]:
        """The files of `purpose` (of the whole account if None)."""
        return await self._failures.run(
            purpose, lambda: self._client.list_all(purpose=purpose, page_size=LIST_PAGE_SIZE)
        )

    def _apply_folder_listing(
        self, folder: Folder, files: list[RemoteFile], started: float
    ) -> None:
        self._apply_listing(files, started, folder.purpose)
        folder.fetched_at = max(folder.fetched_at or started, started)
        log.debug("listing of %s refreshed: %d files", folder.purpose, len(files))

    async def _refresh_root(self) -> None:
        started = trio.current_time()
        files = await self._list(None)
        shown = self._apply_listing(files, started, None)
        self._root_fetched_at = started
        for folder in self._folders.values():  # it covered every folder
            folder.fetched_at = max(folder.fetched_at or started, started)
        log.debug("account listing refreshed: %d files", len(files))
        self.on_account_listed(shown)

    def _apply_listing(
        self, files: Iterable[RemoteFile], started: float, purpose: str | None
    ) -> frozenset[str]:
        """Make the folders of `purpose` (every purpose if None) show the listing `files`;
        the ids of the files that exist for them: those listed, and this mount's uploads
        too recent to be listed."""

        def covered(remote: RemoteFile) -> bool:
            return purpose is None or remote.purpose == purpose

        # Files of other purposes (from a service that ignored the filter) are left to
        # their own folders' listings.
        # A file past its `expires_at` is gone, even if the service still lists it.
        now = time.time()
        current = {
            f.id: f
            for f in files
            if covered(f) and f.id not in self._deleted_ids and not expired(f, now)
        }
        for file_id, (remote, uploaded_at) in list(self._own_uploads.items()):
            if not covered(remote):
                continue
            if file_id in current or uploaded_at < started:
                # Listed, or missing from a listing made after the upload: deleted elsewhere.
                del self._own_uploads[file_id]
            else:
                current[file_id] = remote

        for file_id, inode in list(self._inode_by_id.items()):
            node = self._nodes[inode]
            assert isinstance(node, FileNode) and node.remote is not None
            if file_id not in current and covered(node.remote):
                log.info("%s/%s was deleted elsewhere", node.folder.name, node.name)
                self.detach(node, deleted=False)
                self.on_deleted_elsewhere(file_id)

        fresh = oldest_first(
            f
            for f in current.values()
            if f.id not in self._inode_by_id and (f.purpose, f.filename) not in self._uploading
        )
        for remote in fresh:
            folder = self._folder_for(remote.purpose)
            node = FileNode(
                inode=self._new_inode(),
                folder=folder,
                name=self._free_name(folder, remote),
                filename=remote.filename,
                remote=remote,
            )
            self._nodes[node.inode] = node
            folder.entries[node.name] = node
            self._inode_by_id[remote.id] = node.inode
            if folder.absences_told:
                self.on_name_added(folder.inode, node.name)
        return frozenset(current)

    def _free_name(self, folder: Folder, remote: RemoteFile) -> str:
        return free_name(folder.entries, remote.filename, remote.id)

    def _folder_for(self, purpose: str) -> Folder:
        folder = self._folders.get(purpose)
        if folder is None:
            name = folder_name(purpose)
            if any(f.name == name for f in self._folders.values()):
                name = f"{name} ({len(self._folders)})"
            folder = Folder(inode=self._new_inode(), purpose=purpose, name=name)
            self._folders[purpose] = folder
            self._nodes[folder.inode] = folder
        return folder

    def new_inode(self) -> int:
        """An inode for a node kept outside the namespace (jobs/: see jobs.py)."""
        return self._new_inode()

    def _new_inode(self) -> int:
        inode = self._next_inode
        self._next_inode += 1
        return inode
