"""The ``inquiries`` table: every authenticated inquiry and the exact bytes we answered it with.

Deciding, minting and recording an inquiry is one call of the server-side function ``dipc_inquire``
(schemas/migrations/0005_inquire.sql), where the rules and the answer's bytes live: one round trip.
A worker's inquiries share round trips and commits (:class:`InquiryBatches`, migration 0010).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from server.core.errors import Unavailable
from server.ops import metrics
from server.store.pool import deadline


@dataclass(frozen=True, slots=True)
class RecordedInquiry:
    """An inquiry's answer as recorded: by this call, or earlier under the same Request-Id (replayed)."""

    replayed: bool
    outcome: str
    http_status: int
    response_body: bytes
    invoice_number: str | None
    body_sha256: bytes  # of the request that was answered


_INQUIRE = """
SELECT replayed, outcome, http_status, response_body, invoice_number, body_sha256
  FROM dipc_inquire($1, $2, $3, $4, $5, $6, $7, $8)
"""


@dataclass(frozen=True, slots=True)
class Inquiry:
    """One inquiry as ``dipc_inquire`` takes it (the first check's delay is the process's)."""

    payment_code: str
    request_id: str
    client_id: str
    channel: str
    body_sha256: bytes
    bin_channels: frozenset[str] | None  # None: no BIN fits the code
    at: datetime


_INQUIRE_EACH = """
SELECT replayed, outcome, http_status, response_body, invoice_number, body_sha256
  FROM dipc_inquire_each($1, $2, $3, $4, $5, $6, $7, $8, $9)
"""

# A batch may wait for locks until this long after it started; past that it fails, and its inquiries
# are recorded one by one: what another transaction holds delays the inquiries of one code, not those
# that share its batch. Locks a batch meets normally (a reusable code minting in another worker's batch,
# a payment of the same code) last a commit.
BATCH_LOCK_WAIT_MS = 100
# At most this many inquiries in one batch: a bound on how long one batch holds its connection.
MAX_BATCH = 64
# A code whose inquiry, recorded alone, has waited as long as a batch may wait (its row held by a long
# transaction) has its inquiries recorded alone, outside the lanes and one at a time, for this long
# after: otherwise every batch it joined would wait BATCH_LOCK_WAIT_MS and be refused, its lane would
# answer the other codes a batch per 100 ms, and its waits would take the pool's connections.
HELD_CODE_S = 1.0


class InquiryBatches:
    """One worker's inquiries, recorded in batches: while a batch is at the database, the inquiries that
    arrive wait, and go together in the next (``dipc_inquire_each``: one statement, one commit, each
    inquiry still its own call of ``dipc_inquire``, and answered only after that commit).

    ``lanes`` batches may be at the database at once. A code's inquiries always take the same lane, one
    batch after the other, so that the worker's batches never wait for each other's locks (a reusable
    code's minting holds its row until the commit). An inquiry that finds its lane idle goes at once, a
    batch of one. A batch the database refuses (a lock still awaited :data:`BATCH_LOCK_WAIT_MS` after it
    started, or an error of one of its inquiries) is rolled back whole, and each of its inquiries is then
    recorded alone by its own request (under its own deadline, outside the lane), so that one inquiry
    cannot hold up or fail another; a code whose row turns out held goes alone for a while
    (:data:`HELD_CODE_S`). A batch cancelled or terminated at the database fails all its inquiries with
    Unavailable, as does one the database does not answer within ``timeout_s``, as it would have each of
    them; one whose request gave up meanwhile may still be recorded (its answer was a 503, and a resend
    of its Request-Id gets the recorded one).
    """

    def __init__(self, pool: asyncpg.Pool, *, first_check_s: float, timeout_s: float, lanes: int) -> None:
        self._pool = pool
        self._first_check_s = first_check_s
        self._timeout_s = timeout_s
        self._lanes: list[deque[tuple[Inquiry, asyncio.Future[RecordedInquiry | None]]]] = [
            deque() for _ in range(lanes)
        ]
        self._senders: dict[int, asyncio.Task[None]] = {}  # by lane: the last one started
        # Held codes: until when (loop time) their inquiries go alone, and the lock that has them go one
        # at a time (one connection waits for the row, not the pool).
        self._held: dict[str, tuple[float, asyncio.Lock]] = {}

    async def inquire(self, inquiry: Inquiry) -> RecordedInquiry:
        """Answer and record ``inquiry``; its answer exists once it is committed."""
        loop = asyncio.get_running_loop()
        held = self._held.get(inquiry.payment_code) if self._held else None
        if held is not None and held[0] > loop.time():
            async with held[1]:
                return await self._record_outside(inquiry)
        future: asyncio.Future[RecordedInquiry | None] = loop.create_future()
        lane = hash(inquiry.payment_code) % len(self._lanes)
        self._lanes[lane].append((inquiry, future))
        sender = self._senders.get(lane)
        if sender is None or sender.done():
            # A context of its own: the sender serves the requests after this one too, and carries nothing
            # of this one's (its deadline's bookkeeping, the connections that deadline would terminate).
            self._senders[lane] = loop.create_task(
                self._send_while_waiting(lane), context=contextvars.Context()
            )
        recorded = await future
        return recorded if recorded is not None else await self._record_outside(inquiry)

    @property
    def waiting(self) -> int:
        """Inquiries waiting for their lane's next batch."""
        return sum(map(len, self._lanes))

    async def close(self) -> None:
        """Wait for the batches at the database (called after the last request, before the pool closes)."""
        await asyncio.gather(*self._senders.values(), return_exceptions=True)

    async def _send_while_waiting(self, lane: int) -> None:
        waiting = self._lanes[lane]
        try:
            while waiting:
                batch = []
                while waiting and len(batch) < MAX_BATCH:
                    inquiry, future = waiting.popleft()
                    if not future.done():  # done: its request gave up waiting
                        batch.append((inquiry, future))
                # In one order for every batch, so that two workers' batches take the rows they share
                # in one order (the lock wait's bound ends what cycles remain: ADR 12).
                batch.sort(key=lambda each: (each[0].payment_code, each[0].request_id))
                if batch:
                    await self._send(batch)
        except BaseException:
            # Cancelled (dipc stops): what still waits for this lane is answered now, not left to wait.
            while waiting:
                _, future = waiting.popleft()
                if not future.done():
                    future.set_exception(Unavailable("dipc is stopping"))
            raise

    async def _send(self, batch: list[tuple[Inquiry, asyncio.Future[RecordedInquiry | None]]]) -> None:
        metrics.INQUIRY_BATCH_SIZE.observe(len(batch))
        results: Sequence[RecordedInquiry | None] = [None] * len(batch)  # None: record it alone
        failure: Exception | None = None
        try:
            async with deadline(self._timeout_s, "inquiry.batch"):
                results = await self._record_together([inquiry for inquiry, _ in batch])
        except asyncpg.PostgresError:
            pass  # rolled back whole
        except Exception as error:  # Unavailable: the database is down or too slow
            failure = error
        except BaseException:  # cancelled: dipc stops
            failure = Unavailable("dipc is stopping")
            raise
        finally:
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if failure is not None:
                    future.set_exception(failure)
                else:
                    future.set_result(result)

    async def _record_outside(self, one: Inquiry) -> RecordedInquiry:
        """``one`` alone, in its request's task and under its deadline, without a batch's bound on lock
        waits; once it has waited as long as that bound, its code is held (:data:`HELD_CODE_S`)."""
        loop = asyncio.get_running_loop()
        bound_s = BATCH_LOCK_WAIT_MS / 1000
        started = loop.time()
        marking = loop.call_later(bound_s, self._mark_held, one.payment_code)
        try:
            return await self._record_alone(one)
        finally:
            marking.cancel()
            if loop.time() - started < bound_s:
                self._held.pop(one.payment_code, None)

    def _mark_held(self, code: str) -> None:
        now = asyncio.get_running_loop().time()
        if len(self._held) >= 1024:  # codes no longer held are forgotten
            self._held = {held: entry for held, entry in self._held.items() if entry[0] > now}
        _, one_at_a_time = self._held.get(code, (0.0, None))
        self._held[code] = (now + HELD_CODE_S, one_at_a_time or asyncio.Lock())

    async def _record_alone(self, one: Inquiry) -> RecordedInquiry:
        row = await self._pool.fetchrow(
            _INQUIRE,
            one.payment_code,
            one.request_id,
            one.client_id,
            one.channel,
            one.body_sha256,
            None if one.bin_channels is None else sorted(one.bin_channels),
            one.at,
            self._first_check_s,
        )
        return RecordedInquiry(*row)

    async def _record_together(self, inquiries: list[Inquiry]) -> list[RecordedInquiry]:
        rows = await self._pool.fetch(
            _INQUIRE_EACH,
            [one.payment_code for one in inquiries],
            [one.request_id for one in inquiries],
            [one.client_id for one in inquiries],
            [one.channel for one in inquiries],
            [one.body_sha256 for one in inquiries],
            [None if one.bin_channels is None else ",".join(sorted(one.bin_channels)) for one in inquiries],
            [one.at for one in inquiries],
            self._first_check_s,
            BATCH_LOCK_WAIT_MS,
        )
        return [RecordedInquiry(*row) for row in rows]
