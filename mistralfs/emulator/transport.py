"""Resetting the TCP connection of a request, for the ``reset`` and ``lost`` faults.

ASGI gives an application no handle on its connection, and in Hypercorn an
application that fails before answering still gets a ``500`` sent for it. To
drop a connection without any answer, the server side socket is found among
the process's open descriptors by its two addresses (the scope's ``server``
and ``client``), and disconnected with ``connect(AF_UNSPEC)``: on Linux that
aborts a TCP connection with an RST, so the client reads ECONNRESET, as when
a proxy or the network drops it. The server's own reader then sees the error
and closes its side as for any broken connection. Where that call is refused,
``shutdown()`` is used instead (the client then reads an early EOF).

Linux only (``/proc/self/fd``), like the rest of mistralfs.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import stat
import struct
from collections.abc import MutableMapping
from typing import Any

log = logging.getLogger("mistralfs.emulator")

_SOCKADDR_UNSPEC = bytes(16)  # sa_family = AF_UNSPEC (0), rest zero


def _same(address: Any, wanted: Any) -> bool:
    return (
        isinstance(address, tuple)
        and wanted is not None
        and len(address) >= 2
        and (address[0], address[1]) == (wanted[0], wanted[1])
    )


def _disconnect(sock: socket.socket) -> None:
    """RST the connection (connect(AF_UNSPEC)); fall back to shutdown()."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.connect(
            ctypes.c_int(sock.fileno()),
            ctypes.c_char_p(_SOCKADDR_UNSPEC),
            ctypes.c_int(len(_SOCKADDR_UNSPEC)),
        )
    except (OSError, AttributeError):
        result = -1
    if result != 0:
        sock.shutdown(socket.SHUT_RDWR)


def reset_connection(scope: MutableMapping[str, Any]) -> bool:
    """Abort the connection ``scope`` came in on; False if its socket was not found."""
    server, client = scope.get("server"), scope.get("client")
    if not server or not client:
        return False
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return False
    for name in names:
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except (OSError, ValueError):
            continue
        with sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                if not (_same(sock.getsockname(), server) and _same(sock.getpeername(), client)):
                    continue
            except OSError:
                continue
            with contextlib.suppress(OSError):
                _disconnect(sock)
                return True
    log.warning("could not find the socket of %s to reset it", client)
    return False
