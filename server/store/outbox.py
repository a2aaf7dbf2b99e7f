"""The ``events`` outbox: appended in the transaction of the change it reports, sequenced after commit.

Event ids must become visible in id order, or a reader that keeps "the last id I saw" could step over an
event whose transaction commits late. Writers do not allocate them: an event is appended to
``events_pending`` in the change's transaction, and once that has committed, ``dipc_sequence_events``
(schemas/migrations/0007_event_sequencer.sql), alone under an advisory lock, moves committed events into
``events`` in the order they were appended. Writers' commits therefore never wait on one another.

Every writer goes through :func:`transaction` (or :func:`connection`, for a change written by one
statement), which sequences its events before it returns: when an API call has answered, its event is
in the feed (a repeat that appends nothing waits the same way, see :func:`replayed`). Events left
pending by a process that died between its commit and that step, or whose sequencing could not finish
within SEQUENCE_WAIT_S (the database in trouble; the change is committed and the answer says so), are
moved by the next sequencing anywhere, or by every server's sweep (:func:`sweep_forever`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import weakref
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from server.core.errors import Unavailable, error_text
from server.core.events import Event
from server.store.pool import DEADLINE_TICK_S, UNAVAILABLE_ERRORS, deadline, time_left

log = structlog.get_logger(component="dipc.outbox")

CHANNEL = "dipc_events"  # LISTEN/NOTIFY channel that wakes long-polling readers (sent by the sequencing)
SEQUENCE_BATCH = 1000  # events moved per sequencing statement
SEQUENCE_GAP_S = 0.002  # the least time between two sequencing passes of one process
SWEEP_S = 5.0  # how often a server moves what a dead writer left pending
# How often a server advances events_pending's floor (migration 0020): a move reads from there, so under
# a snapshot held elsewhere it walks the events moved since the floor's last two steps, not since the
# snapshot began. Each step is a transaction of its own, with an xid and without a WAL flush.
FLOOR_S = 0.25
# Its first step lowers the floor below anything a restored dump left pending, reading every pending
# row, dead ones included: a bound of its own.
FLOOR_REPAIR_S = 30.0
# The longest a transaction waits for the sequencing lock to move its own events (sequence_in_commit):
# the lock's holders hold it for a move and a commit, and a transaction that waits holds its row locks.
SEQUENCE_IN_COMMIT_WAIT_MS = 5
# The longest such a transaction, holding that lock, may then wait for its COMMIT: a client frozen
# between the two loses its session (and its uncommitted batch) instead of stopping every sequencing.
SEQUENCE_IN_COMMIT_IDLE_MS = 500
# The longest a writer waits, after its commit, for its event to be sequenced; a pass holds its process's
# sequencer, so it is bounded wherever it runs (a lost connection would otherwise stop every writer).
SEQUENCE_WAIT_S = 1.0


@dataclass(slots=True)
class _Answer:
    """What the enclosing :func:`transaction`'s answer must wait for once it has committed."""

    # An event appended, or a change made before answered again (a repeat), whose event may still be
    # pending: either way the answer comes once the feed has it.
    waits_for_feed: bool = False


_TRANSACTION: ContextVar[_Answer | None] = ContextVar("dipc_outbox_transaction", default=None)


@contextlib.asynccontextmanager
async def connection(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection whose statements may append events, each statement its own transaction;
    their events are in the feed when it exits."""
    async with sequenced(pool), pool.acquire() as conn:
        yield conn


@contextlib.asynccontextmanager
async def sequenced(pool: asyncpg.Pool) -> AsyncIterator[None]:
    """Statements run meanwhile, on any connection of ``pool``, may append events (each statement its
    own transaction); their events are in the feed when it exits."""
    answer = _Answer()
    token = _TRANSACTION.set(answer)
    try:
        yield
    finally:
        _TRANSACTION.reset(token)
    if answer.waits_for_feed:
        # Committed: whatever happens now, the answer says so. Within a request's deadline the wait ends
        # early enough for that answer to leave before it; an event not sequenced by then is moved by
        # the next pass anywhere, or by the sweep.
        left = time_left()
        wait = SEQUENCE_WAIT_S if left is None else min(SEQUENCE_WAIT_S, left - 2 * DEADLINE_TICK_S)
        try:
            if wait <= 0:
                raise Unavailable("no time left in the request's deadline")
            await sequence(pool, wait)
        except Unavailable as error:
            log.warning("outbox.sequencing_deferred", error=str(error))


@contextlib.asynccontextmanager
async def transaction(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A transaction on a pooled :func:`connection` that may append events; they are in the feed when it
    exits. On an exception the transaction rolls back and nothing is sequenced.
    """
    async with connection(pool) as conn, conn.transaction():
        yield conn


def replayed() -> None:
    """The enclosing :func:`transaction` answers a change made before (a repeat): it sequences after its
    commit too, so that, like the first answer, it comes only once that change's event is in the feed."""
    _current("outbox.replayed").waits_for_feed = True


def _current(what: str) -> _Answer:
    answer = _TRANSACTION.get()
    if answer is None:
        raise RuntimeError(
            f"{what} outside outbox.transaction or .connection: the event would not be sequenced"
        )
    return answer


# Appends one event; ``INSERT_PENDING VALUES (type, payment_code, payload)``, or a SELECT of the three
# inside a statement that writes the change it reports (then call :func:`appended`).
INSERT_PENDING = "INSERT INTO events_pending (type, payment_code, payload)"


async def append(
    conn: asyncpg.Connection, event_type: str, payment_code: str | None, payload: dict[str, Any]
) -> None:
    """Append one event inside the caller's :func:`transaction`."""
    answer = _current("outbox.append")
    if not conn.is_in_transaction():
        raise RuntimeError("outbox.append outside a transaction: the event would not commit with its change")
    await conn.execute(f"{INSERT_PENDING} VALUES ($1, $2, $3)", event_type, payment_code, payload)
    answer.waits_for_feed = True


def appended() -> None:
    """A statement run on the enclosing :func:`connection` appended an event (``INSERT_PENDING``)."""
    _current("outbox.appended").waits_for_feed = True


class _Sequencer:
    """Sequencing for one pool (one database): writers that committed meanwhile share the next pass.

    Passes start at least SEQUENCE_GAP_S apart, so under load each moves many events (as commits share
    a WAL flush); a writer that finds the last pass that long ago starts its own at once. A pass runs one
    at a time, in a task of its own under a deadline of its own (SEQUENCE_WAIT_S), and each writer waits
    for it under the writer's: a writer that gives up leaves the pass running for the others. (When a
    pass ran under the deadline of the writer that started it, a held sequencing lock cost a backend and
    a new connection per writer, as each one's pass was terminated when it gave up.)
    """

    def __init__(self) -> None:
        self.requested = 0  # passes asked for
        self.covered = 0  # requests a finished pass started after
        self.last_start = -SEQUENCE_GAP_S
        self.running: asyncio.Task[None] | None = None
        self.running_for = 0  # the requests made before the running pass was started: it covers them

    async def sequence(self, pool: asyncpg.Pool) -> None:
        self.requested += 1
        mine = self.requested
        while self.covered < mine:  # a pass that started after we asked (so after our commit) covers us
            if self.running is None:
                # A context of its own: the pass is nobody's request (nor under anybody's deadline).
                self.running = asyncio.get_running_loop().create_task(
                    self._pass(pool), context=contextvars.Context()
                )
                self.running.add_done_callback(_seen)  # its waiters may all have given up before it ended
                self.running_for = self.requested
            ours = self.running_for >= mine
            try:
                await asyncio.shield(self.running)
            except Unavailable:
                if ours:
                    raise  # the pass that would have covered us failed: so do we
                # One that began before we asked failed: the next is ours, within our own wait.

    async def _pass(self, pool: asyncpg.Pool) -> None:
        try:
            loop = asyncio.get_running_loop()
            if (gap := self.last_start + SEQUENCE_GAP_S - loop.time()) > 0:
                await asyncio.sleep(gap)  # writers committing meanwhile join this pass
            covers = self.requested
            self.last_start = loop.time()
            async with deadline(SEQUENCE_WAIT_S, "outbox.pass"):
                await _move_all(pool)
            self.covered = covers
        finally:
            self.running = None


def _seen(task: asyncio.Task[None]) -> None:
    """Take a finished pass's failure, which its waiters have had (asyncio would log it as never seen)."""
    if not task.cancelled():
        task.exception()


# One per pool: a pass covers the writers of its own database only, and goes with its pool.
_SEQUENCERS: weakref.WeakKeyDictionary[asyncpg.Pool, _Sequencer] = weakref.WeakKeyDictionary()


async def sequence(pool: asyncpg.Pool, wait: float = SEQUENCE_WAIT_S) -> None:
    """Return once every event committed before the call is in ``events``; raise Unavailable if that
    takes longer than ``wait`` seconds."""
    sequencer = _SEQUENCERS.get(pool)
    if sequencer is None:
        sequencer = _SEQUENCERS[pool] = _Sequencer()
    async with deadline(wait, "outbox.sequence"):
        await sequencer.sequence(pool)


async def sequence_in_commit(conn: asyncpg.Connection) -> bool:
    """Last in a transaction that appended events: move them into the feed in this transaction, with
    every event committed before (they are in the feed once it has committed, and need no pass). False,
    having moved nothing, if another sequencing held on for SEQUENCE_IN_COMMIT_WAIT_MS (migration 0013).
    Commit at once: if the transaction then stays idle SEQUENCE_IN_COMMIT_IDLE_MS, its session ends.
    """
    if not conn.is_in_transaction():
        raise RuntimeError("outbox.sequence_in_commit outside a transaction: its events committed already")
    return await conn.fetchval(
        "SELECT dipc_sequence_events_in_commit($1, $2, $3)",
        SEQUENCE_BATCH,
        SEQUENCE_IN_COMMIT_WAIT_MS,
        SEQUENCE_IN_COMMIT_IDLE_MS,
    )


async def _move_all(pool: asyncpg.Pool) -> int:
    moved = 0
    while True:
        batch: int = await pool.fetchval("SELECT dipc_sequence_events($1)", SEQUENCE_BATCH)
        moved += batch
        if batch < SEQUENCE_BATCH:
            return moved


async def sweep_forever(pool: asyncpg.Pool, every_s: float = SWEEP_S) -> None:
    """Move events a dead writer committed but never sequenced, now and every ``every_s`` seconds."""
    while True:
        try:
            await sequence(pool)
        except (Unavailable, *UNAVAILABLE_ERRORS) as error:
            log.warning("outbox.sweep_failed", error=error_text(error))
        except Exception:
            log.exception("outbox.sweep_error")  # keep sweeping: the next writer's sequencing also moves them
        await asyncio.sleep(every_s)


async def floor_forever(pool: asyncpg.Pool, every_s: float = FLOOR_S) -> None:
    """Keep events_pending's floor close behind the moves (migration 0020): lower it below anything a
    restored dump left pending, then advance it every ``every_s`` seconds, or every SWEEP_S while the
    database fails (the failure is logged by the deadline, once a step)."""
    repaired = False
    while True:
        pause = every_s
        try:
            if not repaired:
                async with deadline(FLOOR_REPAIR_S, "outbox.floor_repair"):
                    await pool.fetchval("SELECT dipc_repair_events_floor()")
                repaired = True
            async with deadline(SEQUENCE_WAIT_S, "outbox.floor"):
                await pool.fetchval("SELECT dipc_advance_events_floor()")
        except Unavailable:
            pause = SWEEP_S
        except Exception:
            # Moves read from the floor as it was meanwhile: more slowly under a held snapshot, never wrong.
            log.exception("outbox.floor_error")
            pause = SWEEP_S
        await asyncio.sleep(pause)


COLUMNS = "id, type, payment_code, payload, created_at"


async def read_after(conn: asyncpg.Connection | asyncpg.Pool, after: int, limit: int) -> list[Event]:
    """Up to ``limit`` events with ids above ``after``, in id order."""
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM events WHERE id > $1 ORDER BY id LIMIT $2",  # noqa: S608 - constant
        after,
        limit,
    )
    return [Event(**dict(row)) for row in rows]


async def last_id(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    return await conn.fetchval("SELECT coalesce(max(id), 0) FROM events")


async def oldest_unsequenced_s(conn: asyncpg.Connection | asyncpg.Pool) -> float:
    """Seconds since the committed event next in line for its feed id was appended (0: none). Read from the
    floor up (migration 0020), as a move reads: the rows below it may be many, dead and not yet vacuumed."""
    age = await conn.fetchval(
        """
        SELECT extract(epoch FROM now() - created_at) FROM events_pending
         WHERE id > (SELECT last_value FROM events_pending_floor) ORDER BY id LIMIT 1
        """
    )
    return max(float(age), 0.0) if age is not None else 0.0


async def read_ids(conn: asyncpg.Connection | asyncpg.Pool, ids: list[int]) -> list[Event]:
    rows = await conn.fetch(f"SELECT {COLUMNS} FROM events WHERE id = ANY($1::bigint[])", ids)  # noqa: S608
    return [Event(**dict(row)) for row in rows]
