"""`mistralfs status`: what running mounts are doing, read from their status sockets."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

from mistralfs.daemon.control import read_status
from mistralfs.daemon.state import mount_state_file, process_alive, runtime_dir
from mistralfs.fs.activity import mib
from mistralfs.fs.kept import kept_entries

BAR_WIDTH = 24


def running_mountpoints() -> list[Path]:
    """Mountpoints of this user's running daemons, from their pid files."""

    found = []
    for pid_file in sorted(runtime_dir().glob("mount-*.pid")):
        try:
            pid, mountpoint = pid_file.read_text(encoding="utf-8").split("\n")[:2]
        except (OSError, ValueError):
            continue
        if pid.isdigit() and process_alive(int(pid)):
            found.append(Path(mountpoint))
    return found


def snapshot_of(mountpoint: Path) -> dict[str, object]:
    try:
        return read_status(mount_state_file(mountpoint.resolve(), "sock"))
    except (OSError, ValueError) as exc:
        raise StatusError(f"{mountpoint}: no running mistralfs answers ({exc})") from exc


def kept_failures(recovery_dir: Path) -> list[dict[str, object]]:
    """Uploads that failed and whose content the recovery folder still keeps.

    They are counted until `mistralfs recovery` (or the mount: an upload, an `rm` of the
    name) retries or discards them, not for as long as the daemon runs.
    """
    return [
        {"purpose": e.purpose, "name": e.filename, "error": e.error, "at": e.kept_at, "id": e.id}
        for e in kept_entries(recovery_dir)
        if e.error is not None
    ]


class StatusError(Exception):
    """No daemon to ask; the message is printed as is."""


def upload_lines(snapshot: dict) -> list[str]:
    """One line per upload in flight, with a progress bar."""
    lines = []
    for up in snapshot.get("uploads", []):
        total = up["bytes"] or 1
        done = min(up["sent"] / total, 1.0) if up["bytes"] else 1.0
        filled = int(done * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        left = up.get("seconds_left")
        eta = f"{left:.0f}s left" if left is not None else "starting"
        lines.append(
            f"  {up['purpose']}/{up['name']}  [{bar}] {done:4.0%}  "
            f"{mib(up['sent'])} of {mib(up['bytes'])}  {mib(up['rate'])}/s  {eta}"
        )
    return lines


def render(snapshot: dict) -> str:
    cache = snapshot.get("cache", {})
    hit_rate = cache.get("hit_rate")
    lines = [
        f"{snapshot['mountpoint']}  (pid {snapshot['pid']}, {snapshot['server_url']}"
        + (", read-only)" if snapshot.get("read_only") else ")"),
    ]
    uploads = upload_lines(snapshot)
    lines.append(f" uploads in flight: {len(uploads)}")
    lines += uploads
    lines.append(
        f" pending {snapshot.get('pending', 0)} · failed {len(snapshot.get('failed', []))}"
        f" · kept for recovery {snapshot.get('recovered', 0)}"
        f" · uploaded {snapshot.get('uploaded', 0)} ({mib(snapshot.get('uploaded_bytes', 0))})"
    )
    lines.append(
        f" cache {mib(cache.get('bytes', 0))} of {mib(cache.get('max_bytes', 0))}, hit rate "
        + (f"{hit_rate:.0%}" if hit_rate is not None else "-")
        + f" · blocks being fetched {cache.get('fetches_in_flight', 0)}"
    )
    disk = snapshot.get("disk_cache")
    if disk:
        lines.append(
            f" disk cache {mib(disk['bytes'])} of {mib(disk['max_bytes'])}, "
            f"{disk['hits']} hits, {disk['misses']} misses, {disk['errors']} errors"
            f" · {disk['dir']}"
        )
    requests = ", ".join(f"{k} {v}" for k, v in sorted(snapshot.get("requests", {}).items()))
    errors = ", ".join(f"{k} {v}" for k, v in sorted(snapshot.get("errors", {}).items()))
    lines.append(f" requests: {requests or 'none'}")
    lines.append(f" errors: {errors or 'none'}")
    if snapshot.get("metrics"):
        lines.append(f" metrics: {snapshot['metrics']}")
    for failure in snapshot.get("failed", [])[-5:]:
        lines.append(f"  failed {failure['purpose']}/{failure['name']}: {failure['error']}")
    if snapshot.get("failed"):
        lines.append("  (retry, save or discard them: mistralfs recovery list)")
    return "\n".join(lines)


def status_command(mountpoint: Path | None, *, as_json: bool, watch: bool) -> int:
    if watch:
        # A shell starts background jobs with SIGINT ignored, and Python then leaves it
        # so: ^C or kill -INT must still end the watch.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            try:
                targets = [mountpoint] if mountpoint is not None else running_mountpoints()
                snapshots = [snapshot_of(target) for target in targets]
            except StatusError as exc:
                print(f"mistralfs: {exc}", file=sys.stderr)
                return 1
            if as_json:
                print(json.dumps(snapshots[0] if mountpoint is not None else snapshots))
            elif not snapshots:
                print("mistralfs: nothing mounted")
            else:
                if watch:
                    print("\033[H\033[2J", end="")  # clear the screen, as watch(1) does
                print("\n\n".join(render(s) for s in snapshots), flush=True)
            if not watch:
                return 0
            time.sleep(1)
    except KeyboardInterrupt:
        return 0
