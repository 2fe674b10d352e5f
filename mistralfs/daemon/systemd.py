"""The sd_notify protocol, so that systemd knows when the mount is ready and what it does.

A datagram to the socket named by `NOTIFY_SOCKET` (a path, or `@name` for the abstract
namespace). Without that variable every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(*lines: str) -> bool:
    """Send `READY=1`, `STATUS=...`, `STOPPING=1` and the like; True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc)
        return False
    return True
