"""Serving the emulator with Hypercorn on trio: in a nursery (tests) or as a program."""

from __future__ import annotations

import logging
import signal
import sys

import hypercorn.config
import hypercorn.trio
import trio
from starlette.applications import Starlette

from mistralfs.emulator.app import create_app as _create_app
from mistralfs.emulator.config import EmulatorConfig
from mistralfs.emulator.faults import RandomPlan
from mistralfs.emulator.storage import Storage
from mistralfs.emulator.tls import self_signed_paths

log = logging.getLogger("mistralfs.emulator")


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
        try:
            hc = _hypercorn_config(config)
            async with trio.open_nursery() as nursery:
                binds = await nursery.start(hypercorn.trio.serve, app, hc)
                task_status.started(binds[0])
        finally:
            app.state.batch_jobs.store.close()
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
