"""Desktop notifications of refused uploads, over a real D-Bus session bus.

A private `dbus-daemon --session` and a small org.freedesktop.Notifications service
(jeepney, in a thread) that records each Notify call stand in for a desktop; the mount
is started with DBUS_SESSION_BUS_ADDRESS pointing at it. Without a bus, or with one
that does not answer, nothing happens and nothing breaks.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import RunningEmulator
from jeepney import HeaderFields, MessageType, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection
from mounting import Mounted, mount, wait_for
from test_refusals import BROKEN, failing

from mistralfs.daemon.notify import DesktopNotifier
from mistralfs.fs.refusals import UploadRefused

NAME = "org.freedesktop.Notifications"


class NotificationService:
    """Owns org.freedesktop.Notifications on a bus and records what Notify is sent."""

    def __init__(self, address: str) -> None:
        self.calls: list[tuple] = []
        self._stop = threading.Event()
        self._connection = open_dbus_connection(address)
        owner = self._connection.send_and_get_reply(message_bus.RequestName(NAME), timeout=5)
        assert owner.body == (1,), owner.body  # the primary owner
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                message = self._connection.receive(timeout=0.1)
            except TimeoutError:
                continue
            header = message.header
            if (
                header.message_type is MessageType.method_call
                and header.fields.get(HeaderFields.member) == "Notify"
            ):
                self.calls.append(message.body)
                reply = new_method_return(message, "u", (len(self.calls),))
                self._connection.send(reply)

    def texts(self) -> list[tuple[str, str]]:
        """(summary, body) of each notification."""
        return [(call[3], call[4]) for call in self.calls]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._connection.close()


@pytest.fixture
def session_bus(tmp_path: Path) -> Iterator[str]:
    """A private session bus: its address."""
    daemon = shutil.which("dbus-daemon")
    assert daemon is not None, "dbus-daemon is not installed: run .ci/setup"
    address = f"unix:path={tmp_path / 'bus'}"
    process = subprocess.Popen(
        [daemon, "--session", "--nofork", f"--address={address}", "--print-address=1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        printed = process.stdout.readline().strip()
        assert printed.startswith(address), printed
        yield printed
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture
def desktop(session_bus: str) -> Iterator[NotificationService]:
    service = NotificationService(session_bus)
    try:
        yield service
    finally:
        service.close()


@pytest.fixture
def mounted_on_desktop(
    session_bus: str,
    desktop: NotificationService,
    emulator_process: RunningEmulator,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Mounted]:
    monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", session_bus)
    with mount(emulator_process, tmp_path, "--dir-cache-time", "1") as mounted:
        yield mounted


@pytest.mark.fuse
@pytest.mark.logs_expected
def test_a_refused_copy_and_a_refused_mv_reach_the_desktop(
    mounted_on_desktop: Mounted, desktop: NotificationService, tmp_path: Path
) -> None:
    mounted = mounted_on_desktop
    source = tmp_path / "train.jsonl"
    source.write_bytes(BROKEN)
    failing("cp", source, mounted / "fine-tune")
    wait_for(lambda: desktop.calls, timeout=5)
    [(summary, body)] = desktop.texts()
    assert summary == "fine-tune/train.jsonl was not uploaded"
    assert body.startswith("400 Invalid file format") and "line 2" in body, body
    assert "mistralfs recovery list" in body
    [call] = desktop.calls
    assert call[0] == "mistralfs"

    (mounted / "batch" / "hello.txt").write_bytes(b"hello\n")
    failing("mv", mounted / "batch" / "hello.txt", mounted / "ocr")
    wait_for(lambda: len(desktop.calls) == 2, timeout=5)
    summary, body = desktop.texts()[1]
    assert summary == "batch/hello.txt was not moved to ocr/hello.txt"  # the target named
    assert "text/plain" in body and "It stays where it was." in body, body


async def test_without_a_bus_nothing_happens() -> None:
    notifier = DesktopNotifier(env={})
    notifier.refused(UploadRefused("ocr/a.txt", "422 refused"))
    await notifier.run()  # returns at once: nothing to send to


async def test_a_bus_that_cannot_be_reached_costs_one_info_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mistralfs.daemon.notify")
    notifier = DesktopNotifier(env={"DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path}/none"})
    notifier.refused(UploadRefused("ocr/a.txt", "422 refused"))
    await notifier.run()  # gives up on the bus, and returns
    notifier.refused(UploadRefused("ocr/b.txt", "422 refused"))  # nothing: no bus now
    lines = [r for r in caplog.records if r.name == "mistralfs.daemon.notify"]
    assert [r.levelno for r in lines] == [logging.INFO], lines
    assert "no desktop notifications" in lines[0].getMessage()


async def test_a_burst_of_refusals_is_one_notification(
    session_bus: str, desktop: NotificationService
) -> None:
    notifier = DesktopNotifier(env={"DBUS_SESSION_BUS_ADDRESS": session_bus})
    for index in range(7):
        notifier.refused(UploadRefused(f"ocr/{index}.txt", "422 <not a document>", kept="x"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.run)
        await trio.to_thread.run_sync(lambda: wait_for(lambda: desktop.calls, timeout=5))
        await trio.sleep(0.5)  # nothing else comes
        nursery.cancel_scope.cancel()
    [(summary, body)] = desktop.texts()
    assert summary == "7 files were not stored"
    assert "ocr/0.txt: 422 &lt;not a document&gt;" in body  # markup escaped
    assert "ocr/4.txt" in body and "ocr/5.txt" not in body and "and 2 more" in body
