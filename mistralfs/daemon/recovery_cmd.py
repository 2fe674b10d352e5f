"""`mistralfs recovery list | retry | save | discard`: what the recovery folder keeps.

It works on the cache folder's `recovery/` alone (`fs/kept.py`), whether a mount runs
or not. A running mount that uses the folder notices what was retried or discarded at
its next look at the file's folder (the name that showed the entry goes, and with it
`user.mistral.error`), and `mistralfs status` counts only what is still kept. A retry
uploads with the settings of that mount, if one runs (its server), else with the
options given; the key comes from where `mount` takes it.
"""

from __future__ import annotations

import argparse
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
    cache_dir = (getattr(args, "cache_dir", None) or default_cache_dir()).expanduser().resolve()
    recovery_dir = cache_dir / "recovery"
    try:
        if action == "list":
            return _list(recovery_dir, as_json=bool(getattr(args, "json", False)))
        entry = find_entry(recovery_dir, args.id)
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


def _list(recovery_dir: Path, *, as_json: bool) -> int:
    entries = kept_entries(recovery_dir)
    if as_json:
        print(json.dumps([entry.as_dict() for entry in entries]))
        return 0
    if not entries:
        print(f"nothing kept in {recovery_dir}")
        return 0
    for entry in entries:
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
