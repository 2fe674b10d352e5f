"""Emulator fixtures: in-process (trio) and as a subprocess (``python -m mistralfs emulator``)."""

from __future__ import annotations

import contextlib
import logging
import pathlib
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
import trio
from mistralai.client import Mistral

from mistralfs.emulator.server import EmulatorConfig, serve


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `fuse` are skipped, with the reason, where no real mount can be made."""
    from mounting import fuse_missing

    reason = fuse_missing()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"mounts a real filesystem, so it {reason}")
    for item in items:
        if "fuse" in item.keywords:
            item.add_marker(skip)


if TYPE_CHECKING:
    from mounting import Mounted

API_KEY = "test-key"
LISTENING = "mistralfs emulator listening on "


@dataclass
class RunningEmulator:
    """A started emulator: its base URL (no /v1), key, data dir and config."""

    url: str
    api_key: str
    data_dir: pathlib.Path
    config: EmulatorConfig
    process: subprocess.Popen[str] | None = None


def emulator_config(tmp_path: pathlib.Path, **overrides: object) -> EmulatorConfig:
    """The config the fixtures use; tests may build variants (e.g. a small max_file_size)."""
    values: dict = {"data_dir": tmp_path / "emu", "api_key": API_KEY, "port": 0}
    values.update(overrides)
    return EmulatorConfig(**values)


async def start_emulator(nursery: trio.Nursery, config: EmulatorConfig) -> RunningEmulator:
    """Serve ``config`` in ``nursery``; cancel the nursery to stop it."""
    url = await nursery.start(serve, config)
    return RunningEmulator(url=url, api_key=config.api_key, data_dir=config.data_dir, config=config)


async def serve_asgi(nursery: trio.Nursery, handle: Any) -> str:
    """Serve an HTTP-only ASGI callable on a free local port (lifespan answered here)."""
    from hypercorn.config import Config
    from hypercorn.trio import serve as serve_hypercorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": message["type"] + ".complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await handle(scope, receive, send)

    config = Config()
    config.bind = ["127.0.0.1:0"]
    return (await nursery.start(serve_hypercorn, app, config))[0]


@pytest.fixture(autouse=True)
def _no_unexpected_warnings(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """Fail a test on a WARNING or ERROR that the client or the filesystem logged in it,
    unless the test is marked `logs_expected` (as S3QL's checklogs does): a retry, a
    failed upload or an exception caught on the way that still let the test pass is a
    problem that did not say its name. The emulator's own lines are its business."""
    yield
    if request.node.get_closest_marker("logs_expected"):
        return
    unexpected = [
        f"{record.levelname} {record.name}: {record.getMessage()}"
        for record in caplog.get_records("call")
        if record.levelno >= logging.WARNING
        and record.name.startswith("mistralfs.")
        and not record.name.startswith("mistralfs.emulator")
    ]
    if unexpected:
        pytest.fail("unexpected log lines (mark the test logs_expected if they are meant):\n"
                    + "\n".join(unexpected[:10]), pytrace=False)  # fmt: skip


async def answer(send: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """Send one whole HTTP answer from an ASGI app."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def answer_range(send: Any, range_header: str, body: bytes) -> None:
    """A 206 with the `bytes=A-B` range of `body`, as storage answers a signed URL."""
    a, b = range_header.removeprefix("bytes=").split("-")
    content_range = f"bytes {a}-{b}/{len(body)}".encode()
    await answer(send, 206, [(b"content-range", content_range)], body[int(a) : int(b) + 1])


@pytest.fixture
async def emulator(tmp_path: pathlib.Path) -> AsyncIterator[RunningEmulator]:
    """The emulator served in this test's trio run, on a fresh data dir and a free port."""
    async with trio.open_nursery() as nursery:
        yield await start_emulator(nursery, emulator_config(tmp_path))
        nursery.cancel_scope.cancel()


@contextlib.contextmanager
def emulator_process_with(tmp_path: pathlib.Path, *extra: str) -> Iterator[RunningEmulator]:
    """`python -m mistralfs emulator` with `extra` options, stopped however the test ends."""
    data_dir = tmp_path / "emu"
    cmd = [sys.executable, "-m", "mistralfs", "emulator", "--port", "0"]
    cmd += ["--data", str(data_dir), "--api-key", API_KEY, *extra]
    log = (tmp_path / "emulator.log").open("w")  # the emulator's stderr, for post-mortems
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=pathlib.Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith(LISTENING):
            raise RuntimeError(f"emulator did not start (exit {proc.poll()}): {line!r}")
        url = line[len(LISTENING) :].strip()
        config = EmulatorConfig(data_dir=data_dir, api_key=API_KEY, port=int(url.rsplit(":", 1)[1]))
        yield RunningEmulator(
            url=url, api_key=API_KEY, data_dir=data_dir, config=config, process=proc
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        log.close()


@pytest.fixture
def emulator_process(tmp_path: pathlib.Path) -> Iterator[RunningEmulator]:
    """The emulator as a separate process through the CLI, for blocking clients (the SDK)."""
    with emulator_process_with(tmp_path) as running:
        yield running


@pytest.fixture
def sdk(emulator_process: RunningEmulator) -> Mistral:
    """The official SDK, pointed at the emulator process with nothing but `server_url`."""
    return Mistral(api_key=emulator_process.api_key, server_url=emulator_process.url)


@pytest.fixture
def mounted(emulator_process: RunningEmulator, tmp_path: pathlib.Path) -> Iterator[Mounted]:
    """A real mount of the emulator process, with a one-second folder cache time."""
    from mounting import mount

    with mount(emulator_process, tmp_path, "--dir-cache-time", "1") as m:
        yield m


def count_transport_hops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The transport's worker-thread hops from here on, by what ran in each (the
    emulator in this process has hops of its own, not counted)."""
    hops: list[str] = []
    real = trio.to_thread.run_sync

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        name = getattr(fn, "__qualname__", "")
        if name.startswith("_Exchange."):
            hops.append(name)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", counted)
    return hops


Answer = Callable[[trio.SocketStream], Awaitable[None]]


async def serve_script(nursery: trio.Nursery, answers: list[Answer]) -> str:
    """A server that answers the requests of one connection with `answers`, in order."""

    async def handler(stream: trio.SocketStream) -> None:
        received = b""
        for answer in answers:
            while b"\r\n\r\n" not in received:
                data = await stream.receive_some(65536)
                if not data:
                    return
                received += data
            received = received.partition(b"\r\n\r\n")[2]
            await answer(stream)

    listeners = await nursery.start(trio.serve_tcp, handler, 0)
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/file"


def answer_with(body: bytes) -> Answer:
    """An answer of `body`, all of it at once."""

    async def answer(stream: trio.SocketStream) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        await stream.send_all(head + body)

    return answer
