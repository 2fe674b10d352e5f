"""Serving the emulator with Hypercorn on trio: in a nursery (tests) or as a program."""

from __future__ import annotations

import logging
import pathlib
import signal
import sys
from dataclasses import dataclass

import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette

from mistralfs.emulator.app import create_app as _create_app
from mistralfs.emulator.faults import RandomPlan
from mistralfs.emulator.storage import Storage
from mistralfs.emulator.tls import ensure_self_signed, self_signed_paths, server_context_check

log = logging.getLogger("mistralfs.emulator")


@dataclass
class EmulatorConfig:
    """Where the emulator keeps its files, the key it accepts, and where it listens.

    ``faults`` turns on seeded random faults from the start: a parsed plan or a
    SPEC string (see :mod:`mistralfs.emulator.faults`).

    ``storage_url`` (e.g. ``http://127.0.0.1:8081/blobs``) makes signed URLs point
    at ``<storage_url>/<id>?se=..&sp=r&sig=..`` instead of the emulator's own
    ``/storage/`` route, as the service points at Azure Blob Storage: a static
    server over ``data_dir/blobs`` then serves content.

    ``tls_cert`` (and ``tls_key``, unless the key is in the same PEM file) serve HTTPS;
    ``tls`` serves HTTPS with a self-signed certificate kept in ``data_dir/tls/``
    (see :mod:`mistralfs.emulator.tls`). Signed URLs are then https:// too.
    """

    data_dir: pathlib.Path
    api_key: str
    host: str = "127.0.0.1"
    port: int = 8080
    max_file_size: int = 512 * 1024 * 1024
    faults: RandomPlan | str | None = None
    storage_url: str | None = None
    tls: bool = False
    tls_cert: pathlib.Path | None = None
    tls_key: pathlib.Path | None = None

    def tls_files(self) -> tuple[pathlib.Path, pathlib.Path | None] | None:
        """The certificate and key to serve HTTPS with (made for ``tls``), checked
        loadable; None for plain HTTP. Raises TlsSetupError with one line."""
        if self.tls_cert is None and not self.tls:
            return None
        if self.tls_cert is None:
            return ensure_self_signed(self.data_dir, self.host)
        server_context_check(self.tls_cert, self.tls_key)
        return self.tls_cert, self.tls_key


def create_app(config: EmulatorConfig) -> Starlette:
    """The ASGI app for ``config`` (opens or creates the data dir)."""
    return _create_app(config)


def _hypercorn_config(config: EmulatorConfig) -> hypercorn.config.Config:
    hc = hypercorn.config.Config()
    tls = config.tls_files()
    if tls is not None:
        cert, key = tls
        hc.certfile, hc.keyfile = str(cert), (str(key) if key else None)
    host = f"[{config.host}]" if ":" in config.host else config.host
    hc.bind = [f"{host}:{config.port}"]
    hc.accesslog = None  # ObserveMiddleware logs requests, without signed-URL queries
    hc.errorlog = logging.getLogger("hypercorn.error")
    hc.graceful_timeout = 1.0
    # Large uploads are streamed; allow a slow client between chunks.
    hc.read_timeout = None
    return hc


async def serve(
    config: EmulatorConfig, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Bind and serve until cancelled; ``task_status.started`` gets the real base URL."""
    storage = Storage(config.data_dir)
    try:
        app = _create_app(config, storage)
        hc = _hypercorn_config(config)
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(hypercorn.trio.serve, app, hc)
            task_status.started(binds[0])
    finally:
        storage.close()


async def _serve_until_signal(config: EmulatorConfig) -> None:
    # The signal receiver is in place before the "listening" line is printed, so
    # that a signal sent as soon as that line is read stops the server cleanly.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(serve, config)
            print(f"mistralfs emulator listening on {url}", flush=True)
            if config.tls and config.tls_cert is None:
                cert = self_signed_paths(config.data_dir)[0].resolve()
                log.info(
                    "self-signed certificate: trust it with --ca-file %s (or SSL_CERT_FILE)", cert
                )
            if isinstance(config.faults, RandomPlan):
                log.info("random faults: %s", config.faults.describe())
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def run(config: EmulatorConfig) -> None:
    """Blocking entry point: prints the listening line first, stops on SIGINT/SIGTERM."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
        )
    trio.run(_serve_until_signal, config)
