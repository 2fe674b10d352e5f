"""The Prometheus endpoint (`--metrics-address`): what `status` knows, in OpenMetrics.

One source of truth: at each scrape, `StatusCollector` turns the status snapshot (the
dict `mistralfs status --json` prints, built in serve.py) into metric families. Only
the two latency histograms hold state of their own; reads and uploads feed them
through `Activity.timings`. The registry is this mount's own, never prometheus_client's
global one, and the exposition is prometheus_client's (OpenMetrics or the classic text
format, as the scraper asks).

The endpoint is served by hypercorn in the daemon's nursery, on the trio thread like
everything else (no thread of prometheus_client's own). The socket is bound here first,
so that a port in use or an unknown host is one clear line at startup.

Labels are bounded and hold nothing secret: routes are templates
(`/v1/files/{id}/content`), every signed-URL read is the one route `storage`, statuses
are numbers, and no file name, id, URL or key is ever a label or a value.
"""

from __future__ import annotations

import functools
import logging
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import hypercorn.config
import hypercorn.trio
import trio
from prometheus_client import Histogram
from prometheus_client.asgi import make_asgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from mistralfs.api.calls import RequestStats
from mistralfs.config import format_address
from mistralfs.fs.activity import Activity

log = logging.getLogger(__name__)

PATH = "/metrics"
READ_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
UPLOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
STORAGE_ROUTE = "storage"  # every read through a signed URL: the URL itself is a secret
# A path segment that may be an id even if not a UUID (route() already makes those
# `{id}`): any with a digit but the version (`v1`). Keeps the label set bounded.
_ID_LIKE = re.compile(r"(?!v\d+$)[^/{}]*\d[^/{}]*")

Snapshot = Callable[[], Mapping[str, Any]]


class MetricsError(Exception):
    """The endpoint cannot be served; the message is the one line shown to the user."""


@functools.lru_cache(maxsize=1024)  # kinds are few: each is worked out once
def route_labels(kind: str) -> tuple[str, str]:
    """A request kind of `RequestStats` (`GET /v1/files/{id}` or `storage`) as
    (method, route), with any id-like segment left as `{id}`."""
    if kind == STORAGE_ROUTE:
        return "GET", STORAGE_ROUTE
    method, _, path = kind.partition(" ")
    return method, "/".join(
        "{id}" if _ID_LIKE.fullmatch(segment) else segment for segment in path.split("/")
    )


def _by_route(
    name: str, documentation: str, counts: Mapping[str, int], *, with_status: bool = False
) -> CounterMetricFamily:
    labels = ["method", "route", "status"] if with_status else ["method", "route"]
    family = CounterMetricFamily(name, documentation, labels=labels)
    summed: dict[tuple[str, ...], int] = {}
    for key, count in counts.items():
        if with_status:
            kind, _, status = key.rpartition(" ")
            values: tuple[str, ...] = (*route_labels(kind), status)
        else:
            values = route_labels(key)
        summed[values] = summed.get(values, 0) + count
    for values, count in sorted(summed.items()):
        family.add_metric(list(values), count)
    return family


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


class StatusCollector(Collector):
    """The status snapshot as metric families, read fresh at each scrape."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        status = self._snapshot()
        yield from self._requests(status)
        yield from self._cache(status)
        yield from self._uploads(status)

    def _requests(self, status: Mapping[str, Any]) -> Iterator[Metric]:
        yield _by_route(
            "mistralfs_requests",
            "HTTP requests sent to the service and its storage (each attempt), by route",
            status.get("requests", {}),
        )
        yield _by_route(
            "mistralfs_responses",
            "HTTP answers received, by route and status",
            status.get("answers", {}),
            with_status=True,
        )
        yield _by_route(
            "mistralfs_retries",
            "attempts after the first (a retried request counts once per retry), by route",
            status.get("retries", {}),
        )
        errors = CounterMetricFamily(
            "mistralfs_errors",
            "requests that failed for good, after retries, by error kind",
            labels=["kind"],
        )
        for kind, count in sorted(status.get("errors", {}).items()):
            errors.add_metric([kind], count)
        yield errors

    def _cache(self, status: Mapping[str, Any]) -> Iterator[Metric]:
        cache = status.get("cache", {})
        read = CounterMetricFamily(
            "mistralfs_read_bytes",
            "content bytes by source: network and disk into memory, memory to reads",
            labels=["source"],
        )
        sources = cache.get("bytes_from", {})
        for source in ("network", "disk", "memory"):
            read.add_metric([source], sources.get(source, 0))
        yield read
        yield _counter("mistralfs_cache_hits", "blocks found in memory", cache.get("hits", 0))
        yield _counter("mistralfs_cache_misses", "blocks not in memory", cache.get("misses", 0))
        hit_rate = cache.get("hit_rate")
        yield _gauge(
            "mistralfs_cache_hit_ratio",
            "hits / (hits + misses) since the mount started (NaN before the first read)",
            float("nan") if hit_rate is None else hit_rate,
        )
        yield _gauge("mistralfs_cache_bytes", "bytes held in memory", cache.get("bytes", 0))
        yield _gauge(
            "mistralfs_cache_max_bytes", "--cache-size, in bytes", cache.get("max_bytes", 0)
        )
        disk = status.get("disk_cache")
        if disk:
            yield _counter("mistralfs_disk_cache_hits", "block runs read from disk", disk["hits"])
            yield _counter("mistralfs_disk_cache_misses", "block runs not on disk", disk["misses"])
            yield _counter(
                "mistralfs_disk_cache_errors", "disk tier reads or writes failed", disk["errors"]
            )
            yield _gauge("mistralfs_disk_cache_bytes", "bytes held on disk", disk["bytes"])
            yield _gauge(
                "mistralfs_disk_cache_max_bytes", "--disk-cache-size, in bytes", disk["max_bytes"]
            )

    def _uploads(self, status: Mapping[str, Any]) -> Iterator[Metric]:
        uploads = status.get("uploads", [])
        yield _gauge("mistralfs_uploads_in_flight", "uploads being sent", len(uploads))
        yield _gauge(
            "mistralfs_uploads_in_flight_sent_bytes",
            "bytes sent so far by the uploads in flight",
            sum(upload["sent"] for upload in uploads),
        )
        yield _gauge(
            "mistralfs_uploads_in_flight_total_bytes",
            "bytes the uploads in flight will send in all",
            sum(upload["bytes"] for upload in uploads),
        )
        yield _counter("mistralfs_uploads", "uploads completed", status.get("uploaded", 0))
        yield _counter(
            "mistralfs_uploaded_bytes", "bytes uploaded", status.get("uploaded_bytes", 0)
        )
        yield _counter(
            "mistralfs_upload_failures",
            "uploads refused or failed (content kept for recovery)",
            status.get("failed_total", 0),
        )
        yield _gauge(
            "mistralfs_uploads_pending",
            "files changed through an open descriptor, not uploaded yet",
            status.get("pending", 0),
        )
        yield _gauge(
            "mistralfs_recovery_files",
            "contents kept in the cache folder's recovery/ after a refused or failed upload",
            status.get("recovered", 0),
        )


class MountMetrics:
    """This mount's registry: the status collector and the latency histograms."""

    def __init__(self, snapshot: Snapshot, activity: Activity, requests: RequestStats) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(StatusCollector(snapshot))
        self.request_seconds = Histogram(
            "mistralfs_request_seconds",
            "time of a call to the service or its storage, from the first attempt to the "
            "answer read, retries included, by route",
            ["method", "route"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.read_seconds = Histogram(
            "mistralfs_read_seconds",
            "time to answer a read of remote content (memory, disk or network)",
            ["outcome"],
            buckets=READ_BUCKETS,
            registry=self.registry,
        )
        self.upload_seconds = Histogram(
            "mistralfs_upload_seconds",
            "time from an upload's start to the service's answer",
            ["outcome"],
            buckets=UPLOAD_BUCKETS,
            registry=self.registry,
        )
        for histogram in (self.read_seconds, self.upload_seconds):
            for outcome in ("ok", "failed"):
                histogram.labels(outcome)  # both series from the start, at zero
        activity.timings.read = self._observe_read
        activity.timings.upload = self._observe_upload
        requests.observe = self._observe_request

    def _observe_request(self, kind: str, seconds: float) -> None:
        self.request_seconds.labels(*route_labels(kind)).observe(seconds)

    def _observe_read(self, seconds: float, ok: bool) -> None:
        self.read_seconds.labels("ok" if ok else "failed").observe(seconds)

    def _observe_upload(self, seconds: float, ok: bool) -> None:
        self.upload_seconds.labels("ok" if ok else "failed").observe(seconds)


def bind(address: tuple[str, int]) -> socket.socket:
    """The endpoint's listening socket, or a MetricsError saying why not."""
    host, port = address
    sock = None
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        return sock
    except OSError as exc:
        if sock is not None:
            sock.close()
        reason = exc.strerror or str(exc)
        raise MetricsError(f"cannot serve metrics at {format_address(address)}: {reason}") from exc


def _app(registry: CollectorRegistry) -> Callable[..., Any]:
    """prometheus_client's ASGI app at PATH, a 404 elsewhere, and no lifespan to run."""
    metrics = make_asgi_app(registry)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["path"] == PATH:
            await metrics(scope, receive, send)
        else:
            headers = [(b"content-type", b"text/plain")]
            await send({"type": "http.response.start", "status": 404, "headers": headers})
            await send({"type": "http.response.body", "body": f"see {PATH}\n".encode()})

    return app


async def serve_metrics(
    sock: socket.socket,
    metrics: MountMetrics,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the registry on the bound `sock` until cancelled; started with its URL."""
    config = hypercorn.config.Config()
    config.bind = [f"fd://{sock.detach()}"]  # hypercorn's socket from here on
    config.accesslog = None
    config.errorlog = logging.getLogger(f"{__name__}.http")
    config.errorlog.setLevel(logging.WARNING)  # not hypercorn's "Running on": ours says it
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn.trio.serve, _app(metrics.registry), config)
        url = binds[0] + PATH
        log.info("metrics at %s", url)
        task_status.started(url)
