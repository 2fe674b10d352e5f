"""A shaping TCP proxy: a long link (round-trip time, per-connection rate) on loopback.

    .venv/bin/python bench/mfsbench/link.py --link rtt=30ms,rate=60MB/s --upstream 127.0.0.1:8080

It prints ``link listening on 127.0.0.1:PORT`` and forwards every connection to the
upstream, shaped like a long-haul TCP path, so that a client on loopback sees what a
user far from the service sees:

- each direction is delayed by half the RTT, pipelined: bytes leave in order at the
  link's rate and arrive half an RTT later, whatever else is in flight (a queue of
  ``(deliver_at, bytes)`` per direction, not one chunk per round trip);
- each connection, each direction, is capped at the rate (bytes leave no faster than
  the rate allows: a token bucket with no burst, as the bottleneck of a path is);
- a new connection costs one RTT for the TCP handshake a real link would do: the
  first bytes the client sends leave no earlier than one RTT after it connected.

It is plain TCP: TLS passes through end to end, so the same proxy shapes HTTP and
HTTPS. A direction holds at most ``2 * rate * RTT`` bytes (at least 1 MiB) before it
stops reading its sender, so the proxy's buffers never cap a stream below the rate:
only the rate and the RTT do. One process serves one upstream; being Python on one
core, its total throughput across all connections is bounded by that core (``run.py
--link`` prints what one stream gets as the link's calibration).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import re
import signal
import sys
from dataclasses import dataclass

MiB = 1024 * 1024
READ_SIZE = 256 * 1024  # larger reads, fewer wake-ups per MiB


@dataclass(frozen=True)
class Link:
    """A path's round-trip time (seconds) and per-connection rate (bytes per second)."""

    rtt: float
    rate: float | None  # None: no cap

    @classmethod
    def parse(cls, spec: str) -> Link:
        """``rtt=30ms,rate=60MB/s`` (rtt in ms or s; rate in B, KB, MB or GB per second,
        decimal as link rates are; KiB, MiB, GiB binary; ``rate=0`` or none: no cap)."""
        fields = dict(part.split("=", 1) for part in spec.split(",") if part.strip())
        unknown = set(fields) - {"rtt", "rate"}
        if unknown or "rtt" not in fields:
            raise ValueError(f"link spec {spec!r}: want rtt=..ms[,rate=..MB/s]")
        m = re.fullmatch(r"([\d.]+)\s*(ms|s)", fields["rtt"].strip())
        if not m:
            raise ValueError(f"rtt {fields['rtt']!r}: want e.g. 30ms")
        rtt = float(m[1]) / (1000 if m[2] == "ms" else 1)
        rate = None
        if fields.get("rate", "0").strip() not in ("0", ""):
            m = re.fullmatch(r"([\d.]+)\s*([KMG]i?)?B(/s)?", fields["rate"].strip())
            if not m:
                raise ValueError(f"rate {fields['rate']!r}: want e.g. 60MB/s")
            unit = m[2] or ""
            base = 1024 if unit.endswith("i") else 1000
            rate = float(m[1]) * base ** ("KMG".index(unit[0]) + 1 if unit else 0)
        return cls(rtt, rate)

    def __str__(self) -> str:
        rate = "no cap" if self.rate is None else f"{self.rate / 1e6:g} MB/s per connection"
        return f"RTT {self.rtt * 1000:g} ms, {rate}"

    @property
    def window(self) -> int:
        """Bytes one direction may hold before it stops reading its sender."""
        rate = self.rate if self.rate is not None else 1e9
        return max(MiB, int(2 * rate * self.rtt))


class _Direction:
    """Bytes from one end to the other: they leave at the rate and arrive RTT/2 later."""

    def __init__(self, link: Link, gate: float) -> None:
        self.link = link
        self.loop = asyncio.get_running_loop()
        self.gate = gate  # nothing leaves before this (the handshake, for the client's side)
        self.free_at = 0.0  # when the link has sent all bytes queued so far
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.src: _End | None = None
        self.dest: _End | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self.dest_full = False
        self.ended = False

    def push(self, data: bytes | None) -> None:
        """Queue ``data`` (``None``: the sender closed its side) for its arrival time."""
        if self.ended:
            return
        now = self.loop.time()
        start = max(now, self.free_at, self.gate)
        size = len(data) if data is not None else 0
        self.free_at = start + (size / self.link.rate if self.link.rate else 0.0)
        self.queue.append((self.free_at + self.link.rtt / 2, data))
        self.queued += size
        if data is None:
            self.ended = True
        self.throttle()
        self.arm()

    def arm(self) -> None:
        if self.timer is None and self.queue and self.dest and self.dest.transport:
            self.timer = self.loop.call_at(self.queue[0][0], self.flush)

    def flush(self) -> None:
        """Deliver, in order, everything due by now."""
        self.timer = None
        assert self.dest is not None and self.dest.transport is not None
        transport = self.dest.transport
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if data is None:
                self.dest.peer_ended()
                continue
            self.queued -= len(data)
            if not transport.is_closing():
                transport.write(data)
        self.throttle()
        self.arm()

    def throttle(self) -> None:
        """Stop reading the sender while this direction holds a window's worth."""
        if self.src is None or self.src.transport is None or self.src.transport.is_closing():
            return
        full = self.dest_full or self.queued > self.link.window
        if full and not self.paused:
            self.src.transport.pause_reading()
            self.paused = True
        elif not full and self.paused:
            self.src.transport.resume_reading()
            self.paused = False

    def drop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued = 0


class _End(asyncio.Protocol):
    """One socket of a proxied connection: the client's or the upstream's."""

    def __init__(self, outgoing: _Direction, incoming: _Direction) -> None:
        self.outgoing = outgoing  # what this end sends
        self.incoming = incoming  # what is delivered to this end
        outgoing.src = self
        incoming.dest = self
        self.transport: asyncio.Transport | None = None
        self.eof_in = False  # the other end closed its side and that has arrived here
        self.eof_out = False  # this end closed its side
        self.other: _End | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.incoming.arm()

    def data_received(self, data: bytes) -> None:
        self.outgoing.push(data)

    def eof_received(self) -> bool:
        self.eof_out = True
        self.outgoing.push(None)
        self._close_if_done()
        return True  # keep our writing side open: the other end may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof_out = True
        self.outgoing.push(None)
        self.incoming.drop()
        if exc is not None and self.other and self.other.transport:
            self.other.transport.abort()  # a reset goes through as a reset, at once

    def pause_writing(self) -> None:
        self.incoming.dest_full = True
        self.incoming.throttle()

    def resume_writing(self) -> None:
        self.incoming.dest_full = False
        self.incoming.throttle()

    def peer_ended(self) -> None:
        """The other end's close has travelled the link: pass it on."""
        self.eof_in = True
        if self.transport is None or self.transport.is_closing():
            return
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.eof_in and self.eof_out and self.transport is not None:
            self.transport.close()


async def serve(link: Link, upstream: tuple[str, int], host: str, port: int) -> asyncio.Server:
    """Listen on ``host:port`` (0: any free port) and shape every connection to ``upstream``."""
    loop = asyncio.get_running_loop()

    def accept() -> _End:
        up, down = _Direction(link, gate=loop.time() + link.rtt), _Direction(link, gate=0.0)
        client = _End(outgoing=up, incoming=down)
        server = _End(outgoing=down, incoming=up)
        client.other, server.other = server, client

        async def connect() -> None:
            try:
                await loop.create_connection(lambda: server, *upstream)
            except OSError:
                if client.transport is not None:
                    client.transport.abort()

        task = loop.create_task(connect())
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        return client

    return await loop.create_server(accept, host, port, reuse_address=True, backlog=1024)


_tasks: set[asyncio.Task[None]] = set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link", required=True, help="e.g. rtt=30ms,rate=60MB/s")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    args = parser.parse_args(argv)
    link = Link.parse(args.link)
    up_host, up_port = args.upstream.rsplit(":", 1)

    async def run() -> None:
        server = await serve(link, (up_host, int(up_port)), args.host, args.port)
        bound = server.sockets[0].getsockname()
        print(f"link listening on {bound[0]}:{bound[1]} ({link})", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        async with server:
            await stop.wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
