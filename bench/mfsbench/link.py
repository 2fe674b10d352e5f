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
only the rate and the RTT do. One process serves one upstream (trio, one thread); being
Python on one core, its total throughput across all connections is bounded by that core
(``run.py --link`` prints what one stream gets as the link's calibration).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import re
import signal
import socket
import struct
import sys
from dataclasses import dataclass

import trio

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


class Direction:
    """Bytes from one end to the other: they leave at the rate and arrive RTT/2 later.

    ``pump`` reads the sender and queues each chunk for its arrival time; ``deliver``
    writes it to the receiver then. The sender is not read while a window's worth is
    queued or while the receiver does not take what is written to it."""

    def __init__(
        self, link: Link, gate: float, src: trio.SocketStream, dest: trio.SocketStream
    ) -> None:
        self.link = link
        self.gate = gate  # nothing leaves before this (the handshake, for the client's side)
        self.src, self.dest = src, dest
        self.free_at = 0.0  # when the link has sent all bytes queued so far
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.queued = 0
        self.writing = False  # the receiver is being written to (blocked: it is full)
        self.changed = trio.Event()  # set when the queue or ``writing`` changes

    def _wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def push(self, data: bytes | None) -> None:
        """Queue ``data`` (``None``: the sender closed its side) for its arrival time."""
        start = max(trio.current_time(), self.free_at, self.gate)
        size = len(data) if data is not None else 0
        self.free_at = start + (size / self.link.rate if self.link.rate else 0.0)
        self.queue.append((self.free_at + self.link.rtt / 2, data))
        self.queued += size
        self._wake()

    async def pump(self) -> None:
        """Read the sender until it closes its side; that close is queued too."""
        while True:
            while self.writing or self.queued > self.link.window:
                await self.changed.wait()
            data = await self.src.receive_some(READ_SIZE)
            self.push(bytes(data) if data else None)
            if not data:
                return

    async def deliver(self) -> None:
        """Write each chunk to the receiver at its arrival time, in order; pass the
        sender's close on once it has travelled the link."""
        while True:
            while not self.queue:
                await self.changed.wait()
            await trio.sleep_until(self.queue[0][0])
            _, data = self.queue.popleft()
            if data is None:
                await self.dest.send_eof()
                return
            self.writing = True
            try:
                await self.dest.send_all(data)
            finally:
                self.queued -= len(data)
                self.writing = False
                self._wake()


def abort(stream: trio.SocketStream) -> None:
    """Close with a reset (SO_LINGER 0): a reset goes through as a reset, at once."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


async def proxy(link: Link, upstream: tuple[str, int], client: trio.SocketStream) -> None:
    """One connection: to ``upstream``, both directions shaped, until both have closed;
    a reset or an error on either side resets both at once."""
    gate = trio.current_time() + link.rtt
    try:
        server = await trio.open_tcp_stream(*upstream)
    except OSError:
        abort(client)
        return
    up = Direction(link, gate, client, server)
    down = Direction(link, 0.0, server, client)
    broken = False
    try:
        async with trio.open_nursery() as nursery:
            for task in (up.pump, up.deliver, down.pump, down.deliver):
                nursery.start_soon(task)
    except* Exception:  # a reset, or the other end gone while written to
        broken = True
    for stream in (client, server):
        if broken:
            abort(stream)
        else:
            await stream.aclose()


async def serve(
    link: Link,
    upstream: tuple[str, int],
    host: str,
    port: int,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (0: any free port; the address bound is passed to
    ``task_status``) and shape every connection to ``upstream``."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
    bound = listeners[0].socket.getsockname()
    task_status.started((bound[0], bound[1]))

    async def handle(client: trio.SocketStream) -> None:
        await proxy(link, upstream, client)

    await trio.serve_listeners(handle, listeners)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--link", required=True, help="e.g. rtt=30ms,rate=60MB/s")
    parser.add_argument("--upstream", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    args = parser.parse_args(argv)
    link = Link.parse(args.link)
    up_host, up_port = args.upstream.rsplit(":", 1)

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                bound = await nursery.start(
                    serve, link, (up_host, int(up_port)), args.host, args.port
                )
                print(f"link listening on {bound[0]}:{bound[1]} ({link})", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
