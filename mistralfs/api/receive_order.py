"""Which block body the trio thread receives next, when several have bytes waiting.

The trio thread reads the bodies of block ranges from their sockets (transport.py). On
a long link a sequential reader has some thirty ranges on their way at once, and when
their bytes come faster than one core can decrypt them, the trio thread is the limit.
Served in turn, every range then moves at the same slow pace: the reader waits for
the block it needs next while the trio thread decrypts blocks it will need last, its
FUSE reads wait behind whole rounds of receiving, and the requests for the blocks
after the window, sent as the reader moves on, leave late.

So a body that says when its bytes are needed (a key: lower is sooner) receives only
while no body with a lower key has bytes waiting. The others' bytes wait in their
sockets' buffers meanwhile, at no cost: their senders are paused by TCP's flow control
and go on when read. A body with nothing to read steps aside, so that the next one
gets the turn. Between two pieces a body lets the other tasks run once (its reader's
FUSE reads among them).
"""

from __future__ import annotations

import math

import trio


class ReceiveOrder:
    """The bodies that have bytes to receive now, by key, and those waiting for a turn."""

    def __init__(self) -> None:
        self._ready: dict[object, float] = {}  # a body with bytes to read -> its key
        self._waiting: dict[object, trio.Event] = {}

    async def take_turn(self, body: object, key: float) -> None:
        """Return when `body` may receive: no body with a lower key has bytes to read.

        Once it returns, `body` counts as ready (holding back those with higher keys)
        until `step_aside`. It always lets the other tasks run first."""
        self._ready[body] = key
        self._hand_over()  # a key moved past a waiting body's: that one goes first now
        try:
            await trio.lowlevel.checkpoint()
            while key > self._lowest():
                turn = self._waiting[body] = trio.Event()
                try:
                    await turn.wait()
                finally:
                    del self._waiting[body]
        except BaseException:
            self.step_aside(body)
            raise

    def step_aside(self, body: object) -> None:
        """`body` has nothing to read for now, or is done: the next one may receive."""
        if self._ready.pop(body, None) is not None:
            self._hand_over()

    def _hand_over(self) -> None:
        """Wake the waiting bodies whose key is now the lowest."""
        lowest = self._lowest()
        for waiting, turn in self._waiting.items():
            if self._ready[waiting] <= lowest:
                turn.set()

    def _lowest(self) -> float:
        return min(self._ready.values(), default=math.inf)
