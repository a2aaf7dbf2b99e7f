"""SharedReads: callers that ask at once share a read, and never one that began before they asked."""

from __future__ import annotations

import asyncio

import pytest

from server.store.listener import SharedReads


class Reads:
    """Reads that each return their own number, and wait for ``release`` once begun."""

    def __init__(self) -> None:
        self.begun = 0
        self.release = asyncio.Event()
        self.cancelled = 0

    async def read(self) -> int:
        self.begun += 1
        number = self.begun
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return number


async def test_callers_that_ask_before_the_read_has_run_share_it():
    shared, reads = SharedReads(), Reads()
    callers = [asyncio.create_task(shared.read("page", reads.read)) for _ in range(50)]
    await asyncio.sleep(0.01)
    reads.release.set()
    assert await asyncio.gather(*callers) == [1] * 50


async def test_callers_that_ask_while_a_read_runs_share_a_new_one_which_the_running_one_does_not_hold_back():
    """A read that runs may have begun before they asked; and one stuck on a connection that hangs must
    hold back only its own callers (found by review: the next read waited for it to end)."""
    shared, stuck, reads = SharedReads(), Reads(), Reads()
    first = asyncio.create_task(shared.read("page", stuck.read))
    await asyncio.sleep(0.01)  # the first read has begun, and does not end
    later = [asyncio.create_task(shared.read("page", reads.read)) for _ in range(20)]
    other = asyncio.create_task(shared.read("another page", reads.read))
    reads.release.set()
    assert await asyncio.wait_for(asyncio.gather(*later), 5) == [1] * 20
    assert await asyncio.wait_for(other, 5) == 2
    assert not first.done()
    stuck.release.set()
    assert await first == 1


async def test_a_read_its_callers_all_left_is_cancelled_and_one_they_share_is_not():
    shared, reads = SharedReads(), Reads()
    staying = asyncio.create_task(shared.read("page", reads.read))
    leaving = asyncio.create_task(shared.read("page", reads.read))
    await asyncio.sleep(0.01)
    leaving.cancel()
    await asyncio.sleep(0.01)
    assert reads.cancelled == 0
    staying.cancel()
    await asyncio.sleep(0.01)
    assert reads.cancelled == 1
    reads.release.set()
    assert await shared.read("page", reads.read) == 2  # nothing left behind


async def test_a_failed_read_fails_every_caller_that_shared_it():
    shared = SharedReads()

    async def failing() -> int:
        await asyncio.sleep(0.01)
        raise ConnectionResetError("the database went away")

    callers = [asyncio.create_task(shared.read("page", failing)) for _ in range(5)]
    for caller in callers:
        with pytest.raises(ConnectionResetError):
            await caller


async def test_a_caller_never_joins_a_read_abandoned_before_it_ran():
    """(Found by review.) A read every caller left before it ran stayed a step or two among the running
    ones, and a caller that asked then joined it and got a CancelledError nobody sent it."""
    loop = asyncio.get_running_loop()
    shared, reads = SharedReads(), Reads()
    first = asyncio.create_task(shared.read("page", reads.read))
    await asyncio.sleep(0.01)  # begun
    leaving = asyncio.create_task(shared.read("page", reads.read))  # the next read's only caller
    await asyncio.sleep(0.01)
    later: list[asyncio.Task[int]] = []

    def leave_then_ask() -> None:
        leaving.cancel()  # its deadline, in the tick the first read ended
        loop.call_soon(lambda: later.append(asyncio.create_task(shared.read("page", reads.read))))

    reads.release.set()
    loop.call_soon(leave_then_ask)
    assert await first == 1
    await asyncio.sleep(0.05)
    assert later[0].done()
    assert not later[0].cancelled()
