"""The daemon's status channel: a Unix socket only the mounting user can reach.

The socket lives in the user's runtime folder (private, see `runtime`) and is itself
mode 0600.
A client connects and reads one JSON snapshot; nothing is ever read from it, so the
channel cannot change the daemon.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import trio

from mistralfs.daemon.state import remove_socket

log = logging.getLogger(__name__)

MAX_SNAPSHOT = 4 * 1024 * 1024


async def serve_status(
    path: Path,
    snapshot: Callable[[], dict[str, object]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer every connection on `path` with `snapshot()` as JSON, until cancelled."""
    remove_socket(path)  # left by a daemon that died; anything else stays, and we give up
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            await listener.bind(str(path))
        finally:
            os.umask(old_umask)
        listener.listen(16)
        task_status.started()
        while True:
            conn, _ = await listener.accept()
            with conn:
                body = json.dumps(snapshot(), default=str).encode() + b"\n"
                try:
                    with trio.move_on_after(5):
                        view = memoryview(body)
                        while view:
                            sent = await conn.send(view)
                            view = view[sent:]
                except OSError as exc:
                    log.debug("status client went away: %s", exc)
    finally:
        listener.close()
        with contextlib.suppress(OSError):
            remove_socket(path)


def read_status(path: Path, timeout: float = 5.0) -> dict[str, object]:
    """One snapshot from a running daemon (blocking: this is for the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        chunks = []
        size = 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_SNAPSHOT:
                raise ValueError("status snapshot too large")
    return json.loads(b"".join(chunks))
