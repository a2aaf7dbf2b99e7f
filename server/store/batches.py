"""Writes of one worker that share round trips and commits (ADR 12).

A commit is most of what a small write costs PostgreSQL, and a round trip much of what it costs dipc.
:class:`Batches` records a worker's writes of one kind together: while a batch is at the database, the
writes that arrive wait, and go together in the next, one statement and one commit, each still its own
statement or call inside it, and each answered only after that commit. A write that finds its lane idle
goes at once, a batch of one.

What sharing risks is one write holding up the others: one that waits for a row lock (a code held by a
long transaction, a lock cycle with another worker's batch), or one the database refuses. So a batch
may wait for locks only until :data:`BATCH_LOCK_WAIT_MS` after it started, and a batch the database
refuses (that bound passed, or an error of one of its writes) is rolled back whole; each of its writes is
then made alone by its own request (under its own deadline, outside the lane). The writes of one code made
alone go one at a time, so that a held row keeps one connection waiting, not the pool's. A code whose row
turns out held goes alone for a while (:data:`HELD_CODE_S`).

A batch of several round trips (payment recordings: BEGIN, the writes, the move of their events, COMMIT)
answers the batch before it only once its own first round trip is back (:meth:`Batches.answer_previous`):
the previous batch's answers, each a request's continuation, then run while the database works on this
batch, instead of delaying the event loop's reading of that round trip's answer.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import asyncpg
from prometheus_client import Histogram

from server.core.errors import Unavailable
from server.store.pool import UNAVAILABLE_ERRORS, deadline

# A batch may wait for locks until this long after it started; past that it fails, and its writes are
# made one by one: what another transaction holds delays the writes of one code, not those that share
# its batch. Locks a batch meets normally (a reusable code minting in another worker's batch, a payment
# of the same code) last a commit.
BATCH_LOCK_WAIT_MS = 100
_BOUND_S = BATCH_LOCK_WAIT_MS / 1000
# At most this many writes in one batch: a bound on how long one batch holds its connection.
MAX_BATCH = 64
# A code whose write, made alone, has waited as long as a batch may wait (its row held by a long
# transaction) has its writes made alone, outside the lanes and one at a time, for this long after:
# otherwise every batch it joined would wait BATCH_LOCK_WAIT_MS and be refused, its lane would serve the
# other codes a batch per 100 ms, and its waits would take the pool's connections.
HELD_CODE_S = 1.0
# The longest a committed batch's answers wait for the next batch's first round trip (answer_previous).
ANSWER_HOLD_S = 0.002

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Alone:
    """A batch's result for a write that its request must make alone (the batch was refused)."""


class _Turns:
    """The writes of one code made alone: one at a time (one connection waits for a held row, not the
    pool's), in the order they came."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.writes = 0  # waiting or being made
        self.waiting = 0  # waiting for their turn
        self.out_since: float | None = None  # when the one being made went to the database (loop time)


ALONE = _Alone()


class Batches(Generic[Item, Result]):
    """One worker's writes of one kind, recorded in batches (the module's docstring says how).

    ``lanes`` batches may be at the database at once. A code's writes always take the same lane, one
    batch after the other, so that the worker's batches never wait for each other's locks. A batch is
    ordered by :meth:`order`, so that two workers' batches take the rows they share in one order (the
    lock wait's bound ends what cycles remain). A batch cancelled or terminated at the database fails all
    its writes with Unavailable, as does one the database does not answer within ``timeout_s``, as it
    would have each of them; one whose request gave up meanwhile may still be committed (its answer was
    a 503, and the client's retry finds it).

    A kind implements :meth:`together` (one statement and one commit, lock waits bounded by
    BATCH_LOCK_WAIT_MS from its start), :meth:`alone` and :meth:`order`. One whose :meth:`together`
    takes several round trips sets ANSWERS_AFTER_NEXT_BEGINS and calls :meth:`answer_previous` once its
    first is back.
    """

    ANSWERS_AFTER_NEXT_BEGINS = False

    def __init__(
        self, pool: asyncpg.Pool, *, timeout_s: float, lanes: int, operation: str, sizes: Histogram
    ) -> None:
        self._pool = pool
        self._timeout_s = timeout_s
        self._operation = operation  # the batch's round trip, in dipc_db_operation_duration_seconds
        self._sizes = sizes
        self._lanes: list[deque[tuple[Item, asyncio.Future[Result | _Alone]]]] = [
            deque() for _ in range(lanes)
        ]
        self._senders: dict[int, asyncio.Task[None]] = {}  # by lane: the last one started
        # Held codes: until when (loop time) their writes go alone.
        self._held: dict[str, float] = {}
        # Codes with writes being made alone, which go one at a time.
        self._alone: dict[str, _Turns] = {}
        # Committed batches whose answers wait for the next batch's first round trip, with their timers.
        self._unanswered: list[tuple[Callable[[], None], asyncio.TimerHandle]] = []

    async def together(self, items: list[Item]) -> Sequence[Result]:
        """Make ``items`` in this order, in one transaction; raise PostgresError to have each made alone."""
        raise NotImplementedError

    async def alone(self, conn: asyncpg.Connection, item: Item) -> Result:
        """Make ``item`` by itself on ``conn``, without a bound on its lock waits."""
        raise NotImplementedError

    def order(self, item: Item) -> tuple[str, ...]:
        """Where ``item`` goes in its batch; the first member is its payment code."""
        raise NotImplementedError

    async def submit(self, item: Item) -> Result:
        """Make ``item`` with the writes that arrive with it; its result exists once it is committed."""
        code = self.order(item)[0]
        if self._is_held(code):
            return await self._outside(code, item)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result | _Alone] = loop.create_future()
        lane = hash(code) % len(self._lanes)
        self._lanes[lane].append((item, future))
        sender = self._senders.get(lane)
        if sender is None or sender.done():
            # A context of its own: the sender serves the requests after this one too, and carries nothing
            # of this one's (its deadline's bookkeeping, the connections that deadline would terminate).
            self._senders[lane] = loop.create_task(
                self._send_while_waiting(lane), context=contextvars.Context()
            )
        result = await future
        return await self._outside(code, item) if isinstance(result, _Alone) else result

    def answer_previous(self) -> None:
        """Answer the batches committed before this one (called by :meth:`together` once its first round
        trip is back: the answers' continuations then run while the database works on this batch)."""
        unanswered, self._unanswered = self._unanswered, []
        for answer, timer in unanswered:
            timer.cancel()
            answer()

    @property
    def waiting(self) -> int:
        """Writes waiting for their lane's next batch, or for their turn to be made alone."""
        return sum(map(len, self._lanes)) + sum(turns.waiting for turns in self._alone.values())

    async def close(self) -> None:
        """Wait for the batches at the database (called after the last request, before the pool closes)."""
        await asyncio.gather(*self._senders.values(), return_exceptions=True)

    async def _send_while_waiting(self, lane: int) -> None:
        waiting = self._lanes[lane]
        try:
            while waiting:
                batch = []
                while waiting and len(batch) < MAX_BATCH:
                    item, future = waiting.popleft()
                    if not future.done():  # done: its request gave up waiting
                        batch.append((item, future))
                batch.sort(key=lambda each: self.order(each[0]))
                if batch:
                    await self._send(batch, waiting)
        except BaseException:
            # Cancelled (dipc stops): what still waits for this lane is answered now, not left to wait.
            while waiting:
                _, future = waiting.popleft()
                if not future.done():
                    future.set_exception(Unavailable("dipc is stopping"))
            raise
        finally:
            self.answer_previous()  # the last batch's, held for a next one whose writes all gave up waiting

    async def _send(
        self, batch: list[tuple[Item, asyncio.Future[Result | _Alone]]], waiting: deque[object]
    ) -> None:
        self._sizes.observe(len(batch))
        results: Sequence[Result | _Alone] = [ALONE] * len(batch)
        failure: Exception | None = None
        try:
            async with deadline(self._timeout_s, self._operation):
                results = await self.together([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} came back with {len(results)} results")
        except asyncpg.PostgresError:
            results = [ALONE] * len(batch)  # rolled back whole
        except Exception as error:  # Unavailable: the database is down or too slow
            failure = error
        except BaseException:  # cancelled: dipc stops
            failure = Unavailable("dipc is stopping")
            raise
        finally:
            self.answer_previous()  # if together() did not
            answer = functools.partial(_answer, batch, results, failure)
            if self.ANSWERS_AFTER_NEXT_BEGINS and waiting and failure is None:
                timer = asyncio.get_running_loop().call_later(ANSWER_HOLD_S, self.answer_previous)
                self._unanswered.append((answer, timer))
            else:
                answer()

    def _is_held(self, code: str) -> bool:
        """Whether ``code``'s writes skip the lanes: a write of it made alone has waited at the database
        as long as a batch may wait for locks, and still waits, or did less than HELD_CODE_S ago."""
        now = asyncio.get_running_loop().time()
        turns = self._alone.get(code) if self._alone else None
        if turns is not None and turns.out_since is not None and now - turns.out_since >= _BOUND_S:
            return True
        return bool(self._held) and self._held.get(code, 0.0) > now

    async def _outside(self, code: str, item: Item) -> Result:
        """``item`` alone, in its request's task and under its deadline, without a batch's bound on lock
        waits, after the code's other writes made alone. A write that waited at the database as long as
        that bound, or gave up there, leaves its code held for HELD_CODE_S; one made at once, not."""
        turns = self._alone.get(code)
        if turns is None:
            turns = self._alone[code] = _Turns()
        turns.writes += 1
        try:
            turns.waiting += 1
            try:
                await turns.lock.acquire()
            finally:
                turns.waiting -= 1
            loop = asyncio.get_running_loop()
            try:
                async with self._pool.acquire() as conn:
                    # Timed from here: a wait for a connection says nothing of the code's row.
                    turns.out_since = started = loop.time()
                    try:
                        result = await self.alone(conn, item)
                    except (asyncio.CancelledError, *UNAVAILABLE_ERRORS):
                        # Its deadline ended its wait (cancelled, or its connection terminated first),
                        # for the code's row most likely.
                        self._mark_held(code)
                        raise
                    finally:
                        turns.out_since = None
            finally:
                turns.lock.release()
            if loop.time() - started < _BOUND_S:
                self._held.pop(code, None)  # made at once: the row is free
            else:
                self._mark_held(code)
            return result
        finally:
            turns.writes -= 1
            if not turns.writes:
                del self._alone[code]

    def _mark_held(self, code: str) -> None:
        now = asyncio.get_running_loop().time()
        if len(self._held) >= 1024:  # codes no longer held are forgotten
            self._held = {held: until for held, until in self._held.items() if until > now}
        self._held[code] = now + HELD_CODE_S


def _answer(
    batch: Sequence[tuple[object, asyncio.Future[Result | _Alone]]],
    results: Sequence[Result | _Alone],
    failure: Exception | None,
) -> None:
    for (_, future), result in zip(batch, results, strict=True):
        if future.done():
            continue
        if failure is not None:
            future.set_exception(failure)
        else:
            future.set_result(result)
