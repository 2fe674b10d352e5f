"""Block bodies are received nearest-first (mistralfs/api/receive_order.py): when the
trio thread cannot keep up with every range on its way, the reader's next block is not
left waiting behind blocks it will need last."""

from __future__ import annotations

import ssl

import httpx
import trio
import trio.testing
from conftest import answer_with, serve_script

from mistralfs.api.buffers import BlockBuffers
from mistralfs.api.receive_order import ReceiveOrder
from mistralfs.api.transport import (
    BLOCK_BUFFERS,
    PIECE_SIZE,
    PREFETCH,
    RECEIVE_KEY,
    ThreadedTransport,
)

PIECE = 16 * 1024
PIECES = 4  # a body small enough to wait whole in the socket's buffer


async def test_a_body_waits_while_a_nearer_one_is_receiving() -> None:
    order = ReceiveOrder()
    near, far, farther = object(), object(), object()
    went: list[str] = []

    async def turn(body: object, key: float, name: str) -> None:
        await order.take_turn(body, key)
        went.append(name)

    await order.take_turn(near, 1)  # alone: it goes (after one checkpoint)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(turn, far, 5, "far")
        nursery.start_soon(turn, farther, 9, "farther")
        await trio.testing.wait_all_tasks_blocked()
        assert went == []  # both held back by the nearer body
        order.step_aside(near)
        await trio.testing.wait_all_tasks_blocked()
        assert went == ["far"]  # the next nearest only
        order.step_aside(far)
    assert went == ["far", "farther"]


async def test_a_body_whose_key_moves_past_a_waiting_ones_hands_it_the_turn() -> None:
    """Two files' ranges overlap in keys: the one receiving moves on to a key past the
    one waiting, which then goes first; neither waits for the other for ever."""
    order = ReceiveOrder()
    ahead, behind = object(), object()
    went: list[str] = []

    async def behind_turn() -> None:
        await order.take_turn(behind, 10)
        went.append("behind")
        order.step_aside(behind)

    with trio.fail_after(5):
        await order.take_turn(ahead, 9)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(behind_turn)
            await trio.testing.wait_all_tasks_blocked()
            assert went == []
            await order.take_turn(ahead, 11)  # its next piece: past the waiting one's key
            went.append("ahead")
    assert went == ["behind", "ahead"]


async def test_a_body_cancelled_while_waiting_holds_no_one_back() -> None:
    order = ReceiveOrder()
    near, middle, far = object(), object(), object()
    went: list[str] = []
    await order.take_turn(near, 1)
    with trio.fail_after(5):  # a turn kept by the cancelled body would hold `far` forever
        await _cancelled_then_far(order, near, middle, far, went)
    assert went == ["far"]


async def _cancelled_then_far(
    order: ReceiveOrder, near: object, middle: object, far: object, went: list[str]
) -> None:
    async with trio.open_nursery() as nursery:
        waiting = trio.CancelScope()

        async def middle_turn() -> None:
            with waiting:
                await order.take_turn(middle, 3)

        nursery.start_soon(middle_turn)
        await trio.testing.wait_all_tasks_blocked()
        waiting.cancel()
        await trio.testing.wait_all_tasks_blocked()

        async def far_turn() -> None:
            await order.take_turn(far, 5)
            went.append("far")

        nursery.start_soon(far_turn)
        await trio.testing.wait_all_tasks_blocked()
        assert went == []
        order.step_aside(near)  # the cancelled one is gone: the far one is next


async def test_the_nearer_body_is_received_first_when_both_have_bytes(
    nursery: trio.Nursery,
) -> None:
    """Two block bodies whose bytes are all there: the one needed sooner (lower key) is
    received whole before the other finishes, even if the other started first. Without
    the order, the first to start reads on without a pause, to its end."""
    url = await serve_script(nursery, [answer_with(b"x" * (PIECE * PIECES))])
    transport = ThreadedTransport(ssl.create_default_context())
    received: list[str] = []
    heads = 0
    all_heads = trio.Event()
    far_started = trio.Event()

    async def read(client: httpx.AsyncClient, name: str, key: float) -> None:
        nonlocal heads
        extensions = {
            PREFETCH: 0,
            PIECE_SIZE: PIECE,
            BLOCK_BUFFERS: BlockBuffers(PIECE, 0),
            RECEIVE_KEY: key,
        }
        async with client.stream("GET", url, extensions=extensions) as response:
            heads += 1
            if heads == 2:
                all_heads.set()
            await all_heads.wait()
            await trio.sleep(0.2)  # every byte of both bodies in the sockets' buffers
            if name == "near":
                await far_started.wait()
            else:
                far_started.set()
            async for piece in response.aiter_raw():
                assert len(piece) == PIECE
                received.append(name)

    async with httpx.AsyncClient(transport=transport) as client, trio.open_nursery() as readers:
        readers.start_soon(read, client, "far", 10)
        readers.start_soon(read, client, "near", 0)
    assert sorted(received) == ["far"] * PIECES + ["near"] * PIECES
    assert received[-1] == "far", received  # the nearer one overtook it
    first_near = received.index("near")
    assert received[first_near : first_near + PIECES] == ["near"] * PIECES, received
