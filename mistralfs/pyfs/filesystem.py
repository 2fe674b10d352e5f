"""`mistral://PURPOSE/NAME`: the account's files as an fsspec filesystem.

The store is flat and keyed by purpose, as the mount shows it: the root holds one
folder per purpose, each folder its files, under the names the mount gives them
(fs/names.py: duplicates as `stem (id8).ext`, unsafe characters mapped). Listings are
cached in fsspec's `DirCache` for `listings_expiry_time` seconds (the mount's
`--dir-cache-time` by default) and dropped by this filesystem's own writes.

Reads go through the client: a small file whole from `/content`, a range through the
file's signed URL (renewed when storage refuses it). Writes are uploaded once, whole,
with the folder's purpose; a write over a name uploads the new file, then deletes the
one it replaces, as the mount does. There is no rename in the API: `mv` is a copy (a
download and an upload) and a delete.

The client is trio code, run on a thread of its own (bridge.py); the key is kept out
of `repr` and `to_dict` (unless asked), and never put in an error.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import errno
import os
import tempfile
import threading
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from cachetools import LRUCache
from fsspec.asyn import AsyncFileSystem, sync
from fsspec.callbacks import DEFAULT_CALLBACK

from mistralfs import DEFAULT_SERVER_URL
from mistralfs.api import ApiError, FilesClient, RemoteFile, SignedUrl, UrlExpired
from mistralfs.config import DEFAULT_DIR_CACHE_TIME, read_api_key
from mistralfs.files_api import FILE_FIELDS
from mistralfs.fs.names import STANDARD_PURPOSES, folder_name, free_name, shown_names, storable
from mistralfs.pyfs.bridge import TrioThread
from mistralfs.pyfs.errors import translated
from mistralfs.pyfs.files import MistralFile
from mistralfs.usage import ConfigError

T = TypeVar("T")
Entry = dict[str, Any]

PAGE_SIZE = 1000  # a folder of a thousand files is one request, as in the mount
WHOLE_READ_MAX = 1024**2  # a file this small is read whole from /content: one request
SIGNED_URL_HOURS = 24
SIGNED_URL_MARGIN = 300.0  # seconds: a URL this close to its expiry is renewed first
MAX_SIGNED_URLS = 4096  # kept for the files read last
NO_FOLDERS = "mistral:// holds one folder per purpose, and no folder inside them"


class MistralFileSystem(AsyncFileSystem):
    """The files of a Mistral AI account, one folder per purpose.

    Options (each may be given as `storage_options`): `api_key`, else `api_key_file`,
    else MISTRAL_API_KEY (read where the filesystem is made: each Dask worker reads its
    own unless the key is passed); `server_url`, else MISTRAL_SERVER_URL, else the
    service; `ca_file`, else SSL_CERT_FILE / SSL_CERT_DIR, else the system's store;
    and fsspec's own (`listings_expiry_time`, `use_listings_cache`, `asynchronous`,
    `loop`, `skip_instance_cache`).
    """

    protocol = "mistral"
    root_marker = ""
    async_impl = True

    def __init__(
        self,
        api_key: str | None = None,
        *,
        api_key_file: str | os.PathLike[str] | None = None,
        server_url: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("listings_expiry_time", DEFAULT_DIR_CACHE_TIME)
        super().__init__(**kwargs)
        try:
            key = api_key or read_api_key(Path(api_key_file) if api_key_file else None)
        except ConfigError as exc:
            raise ValueError(f"{exc} (from Python: pass api_key= or api_key_file=)") from None
        self._api_key = key
        self.server_url = server_url or os.environ.get("MISTRAL_SERVER_URL") or DEFAULT_SERVER_URL
        self._ca_file = Path(ca_file) if ca_file else None
        self._thread: TrioThread | None = None
        self._thread_pid = 0
        self._thread_lock = threading.Lock()
        self._purposes: dict[str, str] = {}  # folder name -> purpose, from the root listing
        self._made: set[str] = set()  # purposes made here by mkdir, shown while empty
        self._urls: LRUCache[str, SignedUrl] = LRUCache(MAX_SIGNED_URLS)  # by file id
        self._listing_locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(
            asyncio.Lock
        )

    def __repr__(self) -> str:
        return f"MistralFileSystem(server_url={self.server_url!r})"

    def to_dict(self, *, include_password: bool = True) -> dict[str, Any]:
        """fsspec's serialization; the key is left out unless `include_password`."""
        out: dict[str, Any] = super().to_dict(include_password=include_password)
        if not include_password:
            out.pop("api_key", None)
        return out

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        stripped: str = super()._strip_protocol(path)
        return stripped.lstrip("/")

    # -- the client, on its own trio thread ---------------------------------------

    def _client_thread(self) -> TrioThread:
        """This process's trio thread and client, started at first use (so that a
        pickled filesystem unpickled in a Dask worker opens its own connections)."""
        with self._thread_lock:
            if self._thread is None or self._thread_pid != os.getpid():
                server_url, api_key, ca_file = self.server_url, self._api_key, self._ca_file
                thread = TrioThread(lambda: FilesClient(server_url, api_key, ca_file=ca_file))
                weakref.finalize(self, thread.close)
                self._thread, self._thread_pid = thread, os.getpid()
            return self._thread

    def close(self) -> None:
        """Close the client's connections and stop its thread (also done when the
        filesystem is garbage-collected, or at exit)."""
        with self._thread_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.close()

    async def _api(self, call: Callable[[FilesClient], Awaitable[T]], path: str) -> T:
        """`call(client)` on the client's thread; its errors as Python's, for `path`."""
        try:
            return await self._client_thread().run(call)
        except ApiError as exc:
            raise translated(exc, path) from exc

    # -- paths and listings --------------------------------------------------------

    def _split(self, path: str) -> tuple[str, str]:
        """`batch/x.jsonl` -> (`batch`, `x.jsonl`); the root is ("", "")."""
        folder, _, name = self._strip_protocol(path).partition("/")
        return folder, name

    async def _purpose_of(self, folder: str) -> str | None:
        """The purpose a folder name shows, or None if no purpose shows as it."""
        if folder in self._purposes:
            return self._purposes[folder]
        if folder_name(folder) == folder:
            return folder  # a purpose shows as itself unless it holds odd characters
        await self._list_root()
        return self._purposes.get(folder)

    def _file_entry(self, folder: str, name: str, remote: RemoteFile) -> Entry:
        entry: Entry = {"name": f"{folder}/{name}", "size": remote.bytes, "type": "file"}
        # The remote fields, under the names the mount's user.mistral.* attributes have.
        entry.update({f: getattr(remote, f, None) for f in FILE_FIELDS if f != "bytes"})
        return entry

    @staticmethod
    def _folder_entry(folder: str, purpose: str) -> Entry:
        return {"name": folder, "size": 0, "type": "directory", "purpose": purpose}

    def _folder_entries(self, folder: str, files: list[RemoteFile]) -> list[Entry]:
        named = shown_names(files)
        return [self._file_entry(folder, n, named[n]) for n in sorted(named)]

    async def _list_root(self) -> list[Entry]:
        """The whole account: which purposes hold files, and every folder's files."""
        files = await self._api(lambda c: c.list_all(page_size=PAGE_SIZE), "")
        by_purpose: dict[str, list[RemoteFile]] = {p: [] for p in STANDARD_PURPOSES}
        by_purpose.update({p: [] for p in self._made})
        for remote in files:
            by_purpose.setdefault(remote.purpose, []).append(remote)
        self._purposes = {folder_name(p): p for p in sorted(by_purpose)}
        for folder, purpose in self._purposes.items():
            self.dircache[folder] = self._folder_entries(folder, by_purpose[purpose])
        root = [self._folder_entry(f, p) for f, p in self._purposes.items()]
        self.dircache[""] = root
        return root

    async def _list_folder(self, folder: str, purpose: str, refresh: bool) -> list[Entry]:
        """A folder's files, from the cache unless stale or `refresh`; one listing at
        a time per folder, so that many readers starting at once list it once."""
        async with self._listing_locks[folder]:
            if not refresh and folder in self.dircache:
                entries: list[Entry] = self.dircache[folder]
                return entries
            files = await self._api(
                lambda c: c.list_all(purpose=purpose, page_size=PAGE_SIZE), folder
            )
            entries = self._folder_entries(folder, [f for f in files if f.purpose == purpose])
            self.dircache[folder] = entries
            return entries

    def _shown_empty(self, purpose: str) -> bool:
        return purpose in STANDARD_PURPOSES or purpose in self._made

    async def _ls(
        self, path: str, detail: bool = True, refresh: bool = False, **kwargs: Any
    ) -> Any:
        path = self._strip_protocol(path)
        folder, name = self._split(path)
        if not folder:
            entries = (None if refresh else self.dircache.get("")) or await self._list_root()
        elif not name:
            purpose = await self._purpose_of(folder)
            if purpose is None:
                raise FileNotFoundError(errno.ENOENT, "no such purpose folder", path)
            entries = await self._list_folder(folder, purpose, refresh)
            if not entries and not self._shown_empty(purpose):
                raise FileNotFoundError(errno.ENOENT, "no such purpose folder", path)
        else:
            entries = [await self._info(path, refresh=refresh)]
        # A copy: the cached list changes with this filesystem's own writes.
        return list(entries) if detail else [e["name"] for e in entries]

    async def _info(self, path: str, refresh: bool = False, **kwargs: Any) -> Entry:
        path = self._strip_protocol(path)
        folder, name = self._split(path)
        if not folder:
            return {"name": "", "size": 0, "type": "directory"}
        purpose = await self._purpose_of(folder)
        if purpose is None:
            raise FileNotFoundError(errno.ENOENT, "no such file or folder", path)
        if not name:
            await self._ls(folder, refresh=refresh)  # raises if the folder is not shown
            return self._folder_entry(folder, purpose)
        found = await self._find_entry(folder, purpose, name, refresh)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "no such file", path)
        return found

    async def _find_entry(
        self, folder: str, purpose: str, name: str, refresh: bool = False, recheck: bool = True
    ) -> Entry | None:
        """A file's entry; with `recheck`, a listing from the cache that lacks it is
        fetched again (the file may have been made elsewhere since)."""
        if "/" in name:
            return None
        cached = recheck and not refresh and folder in self.dircache
        entries = await self._list_folder(folder, purpose, refresh)
        found = next((e for e in entries if e["name"] == f"{folder}/{name}"), None)
        if found is None and cached:
            entries = await self._list_folder(folder, purpose, refresh=True)
            found = next((e for e in entries if e["name"] == f"{folder}/{name}"), None)
        return found

    async def _file_info(self, path: str) -> Entry:
        info = await self._info(path)
        if info["type"] != "file":
            raise IsADirectoryError(errno.EISDIR, "a purpose folder, not a file", path)
        return info

    def invalidate_cache(self, path: str | None = None) -> None:
        if path is None:
            self.dircache.clear()
            self._purposes = {}
        else:
            folder, _ = self._split(path)
            self.dircache.pop(folder, None)
            if folder not in self._purposes:  # a new purpose: the root changes too
                self.dircache.pop("", None)
        super().invalidate_cache(path)

    # -- reading -------------------------------------------------------------------

    async def _cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any
    ) -> bytes:
        return await self._read(await self._file_info(path), start, end)

    async def _read(self, info: Entry, start: int | None, end: int | None) -> bytes:
        """Bytes [start, end) of the file `info` names (Python's slice rules), read by
        its id: a file being read keeps its content if its name is written meanwhile."""
        path, file_id, size = info["name"], info["id"], info["size"]
        start, end, _ = slice(start, end).indices(size)
        if start >= end:
            return b""
        if start == 0 and end == size and size <= WHOLE_READ_MAX:
            return await self._api(lambda c: c.content(file_id, size), path)
        for fresh in (False, True):
            try:
                return await self._read_signed(file_id, path, start, end - start, fresh)
            except UrlExpired as exc:  # storage refused the URL: once more with a new one
                if fresh:
                    raise translated(exc, path) from exc
            except ApiError as exc:
                raise translated(exc, path) from exc
        raise AssertionError("unreachable")

    async def _read_signed(
        self, file_id: str, path: str, start: int, length: int, fresh: bool
    ) -> bytes:
        url = (await self._signed_url(file_id, path, fresh)).url
        return await self._client_thread().run(lambda c: c.read_range(url, start, length))

    async def _signed_url(self, file_id: str, path: str, fresh: bool) -> SignedUrl:
        url = self._urls.get(file_id)
        now = datetime.datetime.now(datetime.UTC).timestamp()
        if fresh or url is None or url.expires_at - SIGNED_URL_MARGIN < now:
            url = await self._api(lambda c: c.signed_url(file_id, SIGNED_URL_HOURS), path)
            self._urls[file_id] = url
        return url

    async def _get_file(
        self, rpath: str, lpath: str, callback: Any = DEFAULT_CALLBACK, **kwargs: Any
    ) -> None:
        info = await self._info(rpath)
        if info["type"] == "directory":
            os.makedirs(lpath, exist_ok=True)
            return
        callback.set_size(info["size"])
        file_id, dest = info["id"], Path(lpath)
        try:
            await self._api(lambda c: c.download(file_id, dest), info["name"])
        except BaseException:
            await asyncio.to_thread(dest.unlink, missing_ok=True)
            raise
        callback.relative_update(info["size"])

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> MistralFile:
        path = self._strip_protocol(path)
        if mode == "rb":
            details = self.info(path)
            if details["type"] != "file":
                raise IsADirectoryError(errno.EISDIR, "a purpose folder, not a file", path)
        elif mode in ("wb", "xb"):
            self._writable(path)
            if mode == "xb" and self.exists(path):
                raise FileExistsError(errno.EEXIST, "the file exists", path)
            details = None
        else:
            raise NotImplementedError(
                f"mode {mode!r}: files are read (rb) or written whole (wb, xb); "
                "the service keeps no partial content to append to"
            )
        return MistralFile(
            self,
            path,
            mode,
            block_size=block_size,
            autocommit=autocommit,
            cache_options=cache_options,
            details=details,
            **kwargs,
        )

    # -- writing -------------------------------------------------------------------

    def _writable(self, path: str) -> tuple[str, str]:
        """(folder, name) of a path a file may be written to, or the reason it may not."""
        folder, name = self._split(path)
        if not folder or not name:
            raise PermissionError(errno.EACCES, "files go in a purpose folder", path)
        if "/" in name:
            raise PermissionError(errno.EPERM, NO_FOLDERS, path)
        if not storable(name) or name in (".", ".."):
            raise ValueError(f"{path}: a name the service would not keep as given")
        return folder, name

    async def _upload(self, local: Path, path: str, mode: str = "overwrite") -> None:
        """Upload `local` once as `path` with its folder's purpose; a file the name
        held is deleted once the new one is stored (`mode="create"`: FileExistsError).

        The folder's cached listing is trusted for whether the name is free, as the
        mount trusts its own (a file made elsewhere since may then stay beside the new
        one, under its own name), so that putting many files lists the folder once."""
        folder, name = self._writable(path)
        path = f"{folder}/{name}"
        purpose = await self._purpose_of(folder) or folder
        create = mode == "create"
        old = await self._find_entry(folder, purpose, name, refresh=create, recheck=False)
        if old is not None and create:
            raise FileExistsError(errno.EEXIST, "the file exists", path)
        # Over a name that carries an id, the new file keeps the remote filename.
        filename = old["filename"] if old is not None else name
        stored = await self._api(
            lambda c: c.upload(local, filename=filename, purpose=purpose), path
        )
        if old is not None:
            old_id = old["id"]
            try:
                await self._api(lambda c: c.delete(old_id), path)
            except FileNotFoundError:
                pass  # deleted elsewhere meanwhile
            except BaseException:
                self.invalidate_cache(path)  # both files are there: list them again
                raise
        self._note_upload(folder, name if old is not None else None, stored, old)

    def _note_upload(
        self, folder: str, name: str | None, stored: RemoteFile, old: Entry | None
    ) -> None:
        """Show a new file in the cached listing, as the mount does: under the name
        it replaced, or under the name a new file gets in that folder."""
        entries: list[Entry] | None = self.dircache.get(folder)
        if folder not in self._purposes:
            self.dircache.pop("", None)  # maybe a new purpose: the root changes too
        if entries is None:
            return
        gone = {stored.id, old["id"] if old is not None else None}
        entries[:] = [e for e in entries if e["id"] not in gone]  # a listing made meanwhile
        if name is None:
            taken = {e["name"].partition("/")[2] for e in entries}
            name = free_name(taken, stored.filename, stored.id)
        entries.append(self._file_entry(folder, name, stored))
        entries.sort(key=lambda e: e["name"])  # in place: the listing's age stays as is

    async def _put_file(
        self,
        lpath: str,
        rpath: str,
        mode: str = "overwrite",
        callback: Any = DEFAULT_CALLBACK,
        **kwargs: Any,
    ) -> None:
        if await asyncio.to_thread(os.path.isdir, lpath):
            await self._makedirs(rpath, exist_ok=True)
            return
        size = await asyncio.to_thread(os.path.getsize, lpath)
        callback.set_size(size)
        await self._upload(Path(lpath), rpath, mode)
        callback.relative_update(size)

    async def _pipe_file(
        self, path: str, value: bytes, mode: str = "overwrite", **kwargs: Any
    ) -> None:
        with tempfile.TemporaryDirectory(prefix="mistralfs-") as tmp:
            local = Path(tmp) / "content"
            await asyncio.to_thread(local.write_bytes, value)
            await self._upload(local, path, mode)

    async def _cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """A copy is a download and an upload: the API copies nothing by itself."""
        info = await self._info(path1)
        if info["type"] == "directory":
            await self._makedirs(path2, exist_ok=True)
            return
        with tempfile.TemporaryDirectory(prefix="mistralfs-") as tmp:
            local = Path(tmp) / "content"
            await self._get_file(path1, str(local))
            await self._upload(local, path2)

    async def _rm_file(self, path: str, **kwargs: Any) -> None:
        folder, name = self._split(path)
        if not folder:
            raise PermissionError(errno.EPERM, "the root cannot be removed", path)
        if not name:
            self._made.discard(await self._purpose_of(folder) or folder)
            return  # a purpose folder goes with its last file
        info = await self._file_info(path)
        file_id = info["id"]
        self._urls.pop(file_id, None)
        try:
            await self._api(lambda c: c.delete(file_id), info["name"])
        except BaseException:
            self.invalidate_cache(path)
            raise
        # The others keep their names until the next listing, as in the mount.
        entries: list[Entry] | None = self.dircache.get(folder)
        if entries is not None and info in entries:
            entries.remove(info)

    async def _mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        folder, name = self._split(path)
        if not folder or name:
            raise PermissionError(errno.EPERM, NO_FOLDERS, self._strip_protocol(path))
        # Nothing to make: a purpose's folder shows while it holds files, and this one
        # meanwhile, so that files can be put in it.
        self._made.add(await self._purpose_of(folder) or folder)
        self.invalidate_cache(folder)

    async def _makedirs(self, path: str, exist_ok: bool = False) -> None:
        folder, _ = self._split(path)
        if not exist_ok and await self._exists(path):
            raise FileExistsError(errno.EEXIST, "the folder exists", self._strip_protocol(path))
        if folder and not await self._isdir(path):
            await self._mkdir(path)

    # -- fields --------------------------------------------------------------------

    def ukey(self, path: str) -> str:
        """The file id: a name written again names another id."""
        file_id: str = self.info(path)["id"]
        return file_id

    def created(self, path: str) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.info(path)["created_at"], datetime.UTC)

    def modified(self, path: str) -> datetime.datetime:
        """The service keeps one time per file: when it was stored."""
        return self.created(path)

    # Reads through an open file: by id, with fsspec's block cache in front.
    def read_block_of(self, info: Entry, start: int, end: int) -> bytes:
        data: bytes = sync(self.loop, self._read, info, start, end)
        return data

    def upload_file(self, local: Path, path: str, mode: str) -> None:
        sync(self.loop, self._upload, local, path, mode)
