"""Desktop notifications of uploads that did not happen, over the session's D-Bus.

A file manager shows an errno at most ("Bad message"); the service's reason would
otherwise reach only the log. Where the mount runs in a desktop session
(`DBUS_SESSION_BUS_ADDRESS` set), each refusal becomes a freedesktop notification
(`org.freedesktop.Notifications.Notify`) naming the file and the service's message.
Without a bus, or when the bus or its notification service fails, nothing happens:
one INFO line says so, and the mount goes on as before.

The filesystem calls `DesktopNotifier.refused` (a `RefusalListener`), which only
queues; `run` sends, one notification at a time, connecting at the first one. A burst
of refusals (a folder copied into a purpose that refuses its files) is one
notification that names the first few and counts the rest.
"""

from __future__ import annotations

import html
import logging
import os
from collections.abc import Mapping

import trio
from jeepney import DBusAddress, MessageType, new_method_call
from jeepney.io.trio import open_dbus_connection

from mistralfs.fs.refusals import UploadRefused

log = logging.getLogger(__name__)

NOTIFICATIONS = DBusAddress(
    "/org/freedesktop/Notifications",
    bus_name="org.freedesktop.Notifications",
    interface="org.freedesktop.Notifications",
)
APP_NAME = "mistralfs"
ICON = "dialog-warning"
WAITING = 256  # refusals queued while the bus is slow; later ones are dropped
CALL_SECONDS = 5.0  # connecting, or one Notify call
# Refusals that come this close together (`cp -r`, rsync into a refusing folder) make
# one notification, not a flood of them.
GATHER_SECONDS = 0.3
LISTED = 5  # refusals a gathered notification names; the rest are counted


def notification_text(events: list[UploadRefused]) -> tuple[str, str]:
    """The summary and body of the notification for `events` (the body is markup)."""
    if len(events) > 1:
        lines = [f"{e.where}: {e.reason}" for e in events[:LISTED]]
        if len(events) > LISTED:
            lines.append(f"and {len(events) - LISTED} more")
        lines.append("What was written is kept: mistralfs recovery list")
        return f"{len(events)} files were not stored", html.escape("\n".join(lines), quote=False)
    [event] = events
    if event.renamed_from is not None:
        summary = f"{event.renamed_from} was not moved to {event.where}"
        after = "It stays where it was."
    else:
        summary = f"{event.where} was not uploaded"
        after = (
            f"Its content is kept: mistralfs recovery list (entry {event.kept})"
            if event.kept
            else "Nothing of it was kept."
        )
    return summary, html.escape(f"{event.reason}\n{after}", quote=False)


class DesktopNotifier:
    """Sends a notification per refused upload, if the session has a bus."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = env.get("DBUS_SESSION_BUS_ADDRESS") or None
        self._send, self._receive = trio.open_memory_channel[UploadRefused](WAITING)
        if self._address is None:
            log.debug("no session bus (DBUS_SESSION_BUS_ADDRESS unset): no desktop notifications")

    def refused(self, event: UploadRefused) -> None:
        """Queue a notification of `event` (a `RefusalListener`); never blocks or fails."""
        if self._address is None:
            return
        try:
            self._send.send_nowait(event)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            log.debug("desktop notification of %s dropped", event.where)

    async def run(self) -> None:
        """Send what is queued until cancelled; stop for good if the bus cannot be used."""
        if self._address is None:
            return
        async with self._receive:
            async for event in self._receive:
                events = [event]
                await trio.sleep(GATHER_SECONDS)
                while True:
                    try:
                        events.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                try:
                    with trio.fail_after(CALL_SECONDS):
                        await self._notify(events)
                except Exception as exc:  # whatever the bus does, the mount goes on
                    log.info("no desktop notifications: the session bus at %s did not take "
                             "one (%s)", self._address, exc or type(exc).__name__)  # fmt: skip
                    self._address = None
                    return

    async def _notify(self, events: list[UploadRefused]) -> None:
        summary, body = notification_text(events)
        assert self._address is not None
        message = new_method_call(
            NOTIFICATIONS,
            "Notify",
            "susssasa{sv}i",
            (APP_NAME, 0, ICON, summary, body, [], {"urgency": ("y", 1)}, -1),
        )
        connection = await open_dbus_connection(self._address)
        async with connection, connection.router() as router:
            reply = await router.send_and_get_reply(message)
        if reply.header.message_type is MessageType.error:
            raise RuntimeError(f"Notify answered {reply.body}")
        log.debug("desktop notified: %s", summary)
