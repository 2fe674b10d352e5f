"""`mistralfs recovery list | retry | save | discard`: what the recovery folder keeps.

It works on the cache folder's `recovery/` alone (`fs/kept.py`), whether a mount runs
or not; without `--cache-dir`, on those of the running mounts and the default one. A
running mount that uses the folder notices what was retried or discarded at its next
look at the file's folder (the name that showed the entry goes, and with it
`user.mistral.error`), and `mistralfs status` counts only what is still kept. A retry
uploads with the settings of that mount, if one runs (its server), else with the
options given; the key comes from where `mount` takes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import trio

from mistralfs.api import ApiError, FilesClient, RetryPolicy
from mistralfs.config import DEFAULT_RETRY_TIME, DEFAULT_SERVER_URL, default_cache_dir, read_api_key
from mistralfs.daemon.status import StatusError, running_mountpoints, snapshot_of
from mistralfs.fs.kept import (
    EntryNotFound,
    KeptEntry,
    discard,
    find_entry,
    kept_entries,
    retry,
    save,
)

SHOWN_ID = 12  # characters of an entry's id that `list` shows; any unique prefix will do


def recovery_command(action: str, args: argparse.Namespace) -> int:
    """Run one action; the exit status (0 done, 1 refused or failed, 2 bad usage)."""
    given = getattr(args, "cache_dir", None)
    folders = [given.expanduser().resolve() / "recovery"] if given else _recovery_dirs()
    try:
        if action == "list":
            return _list(folders, as_json=bool(getattr(args, "json", False)))
        entry = _find(folders, args.id)
        cache_dir = entry.path.parent.parent
        if action == "discard":
            discard(entry)
            print(f"discarded {entry.where} ({entry.id[:SHOWN_ID]})")
            return 0
        if action == "save":
            saved = save(entry, args.dest.expanduser())
            print(f"saved {entry.where} to {saved}")
            return 0
        return _retry(entry, cache_dir, args)
    except (EntryNotFound, OSError, ValueError) as exc:
        print(f"mistralfs: {exc}", file=sys.stderr)
        return 1


def _recovery_dirs() -> list[Path]:
    """Without --cache-dir: the recovery folders of this user's running mounts (the demo
    and any mount given --cache-dir keep theirs elsewhere), then the default one."""
    folders = []
    for mountpoint in running_mountpoints():
        with contextlib.suppress(StatusError):
            cache_dir = snapshot_of(mountpoint).get("cache_dir")
            if isinstance(cache_dir, str):
                folders.append(Path(cache_dir) / "recovery")
    folders.append(default_cache_dir().expanduser().resolve() / "recovery")
    return list(dict.fromkeys(folders))


def _find(folders: list[Path], prefix: str) -> KeptEntry:
    """The one entry, in any of `folders`, whose id starts with `prefix`."""
    found = []
    for folder in folders:
        with contextlib.suppress(EntryNotFound):
            found.append(find_entry(folder, prefix))
    if len(found) != 1:
        what = "no entry" if not found else f"{len(found)} entries"
        places = " or ".join(map(str, folders))
        raise EntryNotFound(f"{what} in {places} with the id {prefix!r}")
    return found[0]


def _list(folders: list[Path], *, as_json: bool) -> int:
    entries = [entry for folder in folders for entry in kept_entries(folder)]
    if as_json:
        print(json.dumps([entry.as_dict() for entry in entries]))
        return 0
    if not entries:
        print(f"nothing kept in {' or '.join(map(str, folders))}")
        return 0
    for folder in folders:
        kept = [entry for entry in entries if entry.path.parent == folder]
        if kept:
            print(f"in {folder}:")
        for entry in kept:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.kept_at))
            print(f"{entry.id[:SHOWN_ID]}  {when}  {entry.size:>10} B  {entry.where}")
            print(f"    {entry.error or 'not uploaded (no reason noted)'}")
    return 0


def _retry(entry: KeptEntry, cache_dir: Path, args: argparse.Namespace) -> int:
    server_url, ca_file = _mount_settings(cache_dir, args)
    client = FilesClient(
        server_url,
        read_api_key(getattr(args, "api_key_file", None)),
        retry=RetryPolicy(total_budget=DEFAULT_RETRY_TIME),
        ca_file=ca_file,
    )
    purpose, name = getattr(args, "purpose", None), getattr(args, "name", None)

    async def upload() -> str:
        async with client:
            remote = await retry(client, entry, purpose=purpose, filename=name)
        return f"{remote.purpose}/{remote.filename} ({remote.id})"

    try:
        stored = trio.run(upload)
    except ApiError as exc:
        where = f"{purpose or entry.purpose}/{name or entry.filename}"
        print(f"mistralfs: {where} was refused again: {exc}; still kept as "
              f"{entry.id[:SHOWN_ID]}", file=sys.stderr)  # fmt: skip
        return 1
    print(f"uploaded {entry.where} as {stored}")
    return 0


def _mount_settings(cache_dir: Path, args: argparse.Namespace) -> tuple[str, Path | None]:
    """The server (and CA file) to upload to: as given, else a running mount's of this
    cache folder, else the environment's or the default."""
    server_url = getattr(args, "server_url", None)
    ca_file = getattr(args, "ca_file", None)
    if server_url is None:
        for mountpoint in running_mountpoints():
            try:
                snapshot = snapshot_of(mountpoint)
            except StatusError:
                continue
            if snapshot.get("cache_dir") == str(cache_dir):
                server_url = str(snapshot["server_url"])
                if ca_file is None and snapshot.get("ca_file"):
                    ca_file = Path(str(snapshot["ca_file"]))
                break
    return server_url or os.environ.get("MISTRAL_SERVER_URL", DEFAULT_SERVER_URL), ca_file
