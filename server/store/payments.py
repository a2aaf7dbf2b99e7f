"""The ``payments`` table: one row per store transaction."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from server.core.codes import PaymentCode
from server.core.payments import Payment, PaymentHistory, PaymentKind
from server.ops import metrics
from server.store import codes as code_store
from server.store import inbox, outbox, reconciliation
from server.store.batches import BATCH_LOCK_WAIT_MS, Batches

COLUMNS = (
    "id, payment_code, invoice_number, transaction_ref, kind, reason, amount, expected_amount, client_id, "
    "channel, agent_id, agent_store_id, agent_trx_id, paid_at, notification_id, source, recorded_at, "
    "notified_ref"
)


_COLUMN_NAMES = COLUMNS.split(", ")


def payment_from_row(row: asyncpg.Record) -> Payment:
    return Payment(**dict(row))


async def list_page(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    payment_code: str | None,
    kind: str | None,
    since: datetime | None,
    after: int | None,
    limit: int,
) -> list[Payment]:
    """Up to ``limit`` payments in id order after the cursor ``after`` (keyset pagination)."""
    rows = await conn.fetch(
        f"""
        SELECT {COLUMNS} FROM payments
         WHERE ($1::text IS NULL OR payment_code = $1)
           AND ($2::text IS NULL OR kind = $2)
           AND ($3::timestamptz IS NULL OR recorded_at >= $3)
           AND ($4::bigint IS NULL OR id > $4)
         ORDER BY id
         LIMIT $5
        """,  # noqa: S608 - column list is a constant
        payment_code,
        kind,
        since,
        after,
        limit,
    )
    return [payment_from_row(row) for row in rows]


@dataclass(frozen=True, slots=True)
class PaymentContext:
    """What a notice is decided on, and what recording it will write unless that has changed."""

    code: PaymentCode | None  # None: not registered
    history: PaymentHistory
    at: datetime  # the database's time of the read: the payment's recorded_at
    unnamed_ref: str  # what a Check Status answer that named no transaction is recorded as
    agent_ref: str | None  # what one that named the notice's store transaction only is recorded as
    code_state: str | None  # what of the code the decision depends on (dipc_code_state)
    counting_state: str | None  # the same for a payment counted on the code


def _read_context(code: str, source: str) -> str:
    return f"""
    SELECT {code_store.prefixed_columns(code, "code_")},
           facts.repeat, facts.invoice_paid, facts.quoted_amounts,
           now() AS at, dipc_code_state({code}, false) AS code_state,
           dipc_code_state({code}, true) AS counting_state
      FROM {source}
    """  # noqa: S608 - constants


# The history with the rules by the notice's source (migration 0032): the functions a dipc from before
# it calls keep their rules, for while a deploy replaces the workers.
_READ_CONTEXT = {
    False: _read_context(
        "code",
        "dipc_payment_history_by_source($1, $2, $3, $4, $5, $6, $7) AS facts"
        " LEFT JOIN payment_codes code ON code.payment_code = $1",
    ),
    # dipc_payment_context_by_source takes the code's row lock, then reads the history (migrations 0008,
    # 0032).
    True: _read_context(
        "(facts.code)", "dipc_payment_context_by_source($1, $2, $3, $4, $5, $6, $7) AS facts"
    ),
}


async def read_context(
    conn: asyncpg.Connection | asyncpg.Pool,
    payment_code: str,
    invoice_number: str,
    transaction_ref: str,
    amount: int,
    *,
    unnamed_ref: str,
    agent_ref: str | None = None,
    source: str = "notification",
    lock: bool = False,
) -> PaymentContext:
    """Read a notice's code and what is recorded for its invoice: :func:`record` writes only if both are
    still so when it holds the code's row lock. With ``lock``, take that lock first (in the caller's
    transaction, which holds it until it ends): what is read cannot change before the recording.

    ``dipc_payment_history_by_source`` (migration 0008's history, last changed by 0032) says what is
    recorded: a repeat is the same transaction reference, or the same amount where one side is a Check
    Status answer that named no transaction (``unnamed_ref``, ``check-status:<invoice>``; spec §8 rule
    3), or a payment of the same store transaction, which one side named by it only (``agent_ref``, the
    notice's store transaction's reference; a notice is matched with such an answer's payment once,
    unless it is itself a Check Status answer, ``source``, named so); the invoice is paid by a normal
    payment or by an exception finance accepted (spec §9).
    """
    row = await conn.fetchrow(
        _READ_CONTEXT[lock],
        payment_code,
        invoice_number,
        transaction_ref,
        amount,
        unnamed_ref,
        agent_ref,
        source,
    )
    return _context(row, unnamed_ref, agent_ref)


def _context(row: asyncpg.Record, unnamed_ref: str, agent_ref: str | None) -> PaymentContext:
    return PaymentContext(
        code=code_store.code_from_row(row, "code_") if row["code_payment_code"] is not None else None,
        history=PaymentHistory(
            repeat=row["repeat"],
            invoice_paid=row["invoice_paid"],
            quoted_amounts=frozenset(row["quoted_amounts"]),
        ),
        at=row["at"],
        unnamed_ref=unnamed_ref,
        agent_ref=agent_ref,
        code_state=row["code_state"],
        counting_state=row["counting_state"],
    )


@dataclass(frozen=True, slots=True)
class Recorded:
    notification_id: int
    payment: Payment | None  # None: this transaction was recorded already (a racing retry)


# The statement that records payments: recordings (``dipc_recording``, migration 0019; ``_recording``
# gives each) as $1, each recorded as if alone, on a condition: no two of one code (``_rounds``). For each
# in turn it first takes the code's row lock and reads the history again with
# dipc_payment_context_within_by_source (migrations 0008 and 0032; its own statements have fresh snapshots,
# so it sees what the lock's previous holder committed), then takes the lock of the invoice's
# reconciliation row, which it settles (migration 0016),
# and writes nothing unless the code (dipc_code_state) and the history are what the caller decided on
# (ADR 11). In a batch, the first recording takes every code's and every invoice's lock ($3 and $4), all
# within $2 ms of the batch's start (ADR 13). The ids are taken after those locks, so a recording that
# waited for one does not commit an id smaller than one a reader paging by id has already seen. The
# statement writes them into the event's document (payment_document's "id" and "notification_id"), and a
# normal payment's count, status and version into its "code" (the columns count_statement moves, under
# code_document's names for them). The rest of the statement has a snapshot from before the locks, which
# is safe for its writes: the payment's unique keys see every committed row, and an UPDATE of a row
# changed since the snapshot re-reads that row and checks its conditions again. A payment is inserted
# before its inbox row, so that a twin that recorded the transaction meanwhile (only possible for a code
# we do not know: no row to lock) makes the inbox row a repeat in the same statement. $5 holds each
# recording's agent_ref (PaymentContext), by position: not a field of dipc_recording, which a dipc of
# before migration 0026 still running encodes without it.
_RECORDED = (
    "(SELECT id, source, kind, payment_code, invoice_number FROM payments"
    " UNION ALL SELECT id, source, kind, payment_code, invoice_number FROM payment)"
)
# The invoices of the payments the statement inserts, settled by them (or by a normal payment before).
_SETTLE = reconciliation.settle_statement(
    "payment.payment_code", "payment.invoice_number", _RECORDED, source="payment"
)
_RECORD = f"""
WITH recording AS (
    SELECT * FROM unnest($1::dipc_recording[]) WITH ORDINALITY
),
context AS (
    SELECT r.*, dipc_code_state(c.code, r.counting) AS code_state, c.repeat AS repeated,
           c.invoice_paid AS paid, c.quoted_amounts AS quoted
      FROM recording r,
           dipc_payment_context_within_by_source(r.payment_code, r.invoice_number, r.transaction_ref,
                                                 r.amount, r.unnamed_ref, ($5::text[])[r.ordinality],
                                                 r.source, $2, CASE r.ordinality WHEN 1 THEN $3::text[] END,
                                                 CASE r.ordinality WHEN 1 THEN $4::text[] END) AS c
),
ids AS (
    SELECT context.*, nextval('payments_id_seq') AS payment_id,
           nextval('notifications_id_seq') AS notification_id, event::jsonb AS document
      FROM context
     WHERE code_state IS NOT DISTINCT FROM decided_state AND NOT repeated AND paid = invoice_paid
       AND quoted = quoted_amounts
),
payment AS (
    INSERT INTO payments (id, payment_code, invoice_number, transaction_ref, kind, reason, amount,
                          expected_amount, client_id, channel, agent_id, agent_store_id, agent_trx_id,
                          paid_at, notification_id, source, recorded_at)
    OVERRIDING SYSTEM VALUE
    SELECT payment_id, payment_code, invoice_number, transaction_ref, kind, reason, amount,
           expected_amount, client_id, channel, agent_id, agent_store_id, agent_trx_id, paid_at,
           notification_id, source, recorded_at
      FROM ids
    ON CONFLICT (payment_code, invoice_number, transaction_ref) DO NOTHING
    RETURNING id, source, kind, payment_code, invoice_number, notification_id, recorded_at
),
inbox AS (
    INSERT INTO notifications (id, {inbox.COLUMNS}, received_at) OVERRIDING SYSTEM VALUE
    SELECT notification_id, payment_code, notified_client_id, request_id, headers::jsonb, body,
           transaction_status,
           CASE WHEN EXISTS (SELECT FROM payment WHERE payment.notification_id = ids.notification_id)
                THEN outcome ELSE 'repeat' END,
           source, recorded_at
      FROM ids
    RETURNING id
),
counted AS (
    {code_store.count_statement("payment.payment_code", "payment.recorded_at", source="payment")}
       AND payment.kind = 'normal'
    RETURNING payment_codes.payment_code, paid_count, status, version
),
settled AS (
    {_SETTLE}
),
event AS (
    {outbox.INSERT_PENDING}
    SELECT ids.event_type, payment.payment_code,
           ids.document
           || jsonb_build_object('id', payment.id, 'notification_id', payment.notification_id)
           || coalesce((SELECT jsonb_build_object('code', (ids.document -> 'code')
                                  || jsonb_build_object('paid_count', paid_count, 'status', status,
                                                        'version', version))
                          FROM counted WHERE counted.payment_code = payment.payment_code), '{{}}')
      FROM payment JOIN ids USING (notification_id)
)
SELECT inbox.id AS notification_id, payment.id AS payment_id
  FROM recording
  LEFT JOIN ids USING (ordinality)
  LEFT JOIN inbox ON inbox.id = ids.notification_id
  LEFT JOIN payment ON payment.notification_id = ids.notification_id
 ORDER BY recording.ordinality
"""  # noqa: S608 - constants


async def record(
    conn: asyncpg.Connection | asyncpg.Pool,
    context: PaymentContext,
    notification: tuple[Any, ...],
    payment: Payment,
    event: tuple[str, dict[str, Any]],
) -> Recorded | None:
    """Store the notification (``inbox.values``), the payment it tells of, a normal payment's count on
    its code (codes.count_statement, at the payment's ``recorded_at``), the invoice's reconciliation
    settled (any payment stops reconciliation asking DOKU about it) and the payment's event: in one
    statement, its own transaction unless ``conn`` is in one, inside an :func:`outbox.sequenced`. None,
    and nothing written, when the code or the history is no longer the ``context`` the payment was
    decided on: read it again and decide again.

    The event's document comes without the ids, which the statement adds, and for a normal payment with
    its code as read but for what counting moves: the statement writes the count, status and version it
    left, and the time of the count is ``recorded_at``.

    When this transaction is recorded already (a racing retry), only the inbox row is written, as a
    repeat. Only the payment's own identity is a tolerated conflict: a second normal payment for one
    invoice violates ``payments_one_normal_idx`` and raises, so it can never pass silently.
    """
    recording = _recording(context, notification, payment, event)
    [row] = await conn.fetch(_RECORD, *_statement_args([recording], *_UNBATCHED))
    return _recorded(row, payment)


# A repeat's inbox row, written only if the payment it repeats is still found by its identity, which a
# payment never loses: its own reference, the reference of the notification matched with it, or (for an
# unnamed Check Status answer, $11 = $13) its amount. A notice that repeats a payment no notification is
# matched with yet, recorded from a Check Status answer that named no transaction
# ('check-status:<invoice>', $13, migration 0018; dipc_repeats_unnamed_answer) or named it by the
# notice's store transaction only ($14; dipc_notification_repeats_answer, migrations 0026, 0029 and
# 0032), by amount, is matched with it here, under the payment's row lock: of two store transactions
# racing for it, one is matched, and the other finds it matched once the first commits and writes
# nothing, to be decided again. It is matched only by a caller that holds the code's row lock, taken
# by an earlier statement of its transaction ($15): a recording of a dipc from before 0032, whose rules
# do not see the match, holds that lock from its read to its commit, and its payment is then seen here
# (a review of 0032 found the two recording one transaction twice). A Check Status answer ($8, the inbox
# row's source) named by its store transaction only ($14 = $11) repeats a payment of that store
# transaction and amount, and matches nothing (dipc_answer_repeats: migrations 0027 to 0032). The rules
# are the history's (dipc_payment_history_by_source), in the same functions.
_RECORD_REPEAT = f"""
WITH matched AS (
    UPDATE payments p SET notified_ref = $11
     WHERE $15 AND p.payment_code = $9 AND p.invoice_number = $10 AND p.transaction_ref <> $11
       AND (dipc_repeats_unnamed_answer(p, $12, $13)
            OR dipc_notification_repeats_answer(p, $11, $12, $14, $8))
       AND NOT EXISTS (SELECT FROM payments known
                        WHERE known.payment_code = $9 AND known.invoice_number = $10
                          AND (known.transaction_ref = $11 OR known.notified_ref = $11))
    RETURNING id
),
repeated AS (
    SELECT FROM matched
    UNION ALL
    SELECT FROM payments p
     WHERE p.payment_code = $9 AND p.invoice_number = $10
       AND (p.transaction_ref = $11 OR p.notified_ref = $11 OR ($11 = $13 AND p.amount = $12)
            OR dipc_answer_repeats(p, $11, $12, $14, $8))
)
INSERT INTO notifications ({inbox.COLUMNS})
SELECT $1, $2, $3, $4, $5, $6, $7, $8 WHERE EXISTS (SELECT FROM repeated)
RETURNING id
"""  # noqa: S608 - constants


async def record_repeat(
    conn: asyncpg.Connection | asyncpg.Pool,
    notification: tuple[Any, ...],
    payment_code: str,
    invoice_number: str,
    transaction_ref: str,
    amount: int,
    *,
    unnamed_ref: str,
    agent_ref: str | None = None,
    match: bool = False,
) -> int | None:
    """Store a notification (``inbox.values``) as a repeat of a payment :func:`read_context` found, and
    match it with that payment if it is one recorded by ``unnamed_ref`` or ``agent_ref`` that no
    notification is matched with yet (for the latter, unless the notice is itself a Check Status answer
    named by its store transaction only: its source is the inbox row's). Only with ``match``, which says
    that ``conn``'s transaction holds the code's row lock (``read_context(lock=True)``). Its inbox id;
    None, and nothing written, when the payment it repeated is now another transaction's (matched
    meanwhile), or is to be matched without ``match``: read it again (with the lock) and decide again."""
    return await conn.fetchval(
        _RECORD_REPEAT,
        *notification,
        payment_code,
        invoice_number,
        transaction_ref,
        amount,
        unnamed_ref,
        agent_ref,
        match,
    )


class PaymentBatches:
    """One worker's payment notifications, read and recorded in batches (ADR 13): the reads (as
    :func:`read_context` without the lock) that arrive while a batch of them is out go together in the
    next, each its own statement, sent in one round trip (asyncpg's ``fetchmany``, pipelined); and so do
    the recordings, in :func:`record`'s statement, one per round of the batch (``_rounds``). A batch is
    one transaction. A recording waits for its code's row lock only until BATCH_LOCK_WAIT_MS after its
    batch began (``dipc_payment_context_within_by_source``, migrations 0011 and 0032). A batch of
    recordings moves its events into the feed in its own commit (:func:`outbox.sequence_in_commit`), so
    that its writers need no sequencing pass after it, unless another sequencing holds on.
    """

    def __init__(self, pool: asyncpg.Pool, *, timeout_s: float) -> None:
        self._reads = _Reads(pool, timeout_s=timeout_s, lanes=1, operation="payment.read_batch",
                             sizes=metrics.PAYMENT_BATCH_SIZE.labels("read"))  # fmt: skip
        self._recordings = _Recordings(pool, timeout_s=timeout_s, lanes=1, operation="payment.batch",
                                       sizes=metrics.PAYMENT_BATCH_SIZE.labels("record"))  # fmt: skip

    async def read_context(
        self,
        payment_code: str,
        invoice_number: str,
        transaction_ref: str,
        amount: int,
        *,
        unnamed_ref: str,
        agent_ref: str | None = None,
        source: str = "notification",
    ) -> PaymentContext:
        """:func:`read_context` (without the lock), with the reads that arrive with it."""
        item = (payment_code, invoice_number, transaction_ref, amount, unnamed_ref, agent_ref, source)
        return _context(await self._reads.submit(item), unnamed_ref, agent_ref)

    async def record(
        self,
        context: PaymentContext,
        notification: tuple[Any, ...],
        payment: Payment,
        event: tuple[str, dict[str, Any]],
    ) -> Recorded | None:
        """:func:`record`, with the recordings that arrive with it."""
        row, in_feed = await self._recordings.submit(_recording(context, notification, payment, event))
        return _recorded(row, payment, in_feed=in_feed)

    @property
    def waiting(self) -> int:
        """Reads and recordings waiting for their next batch."""
        return self._reads.waiting + self._recordings.waiting

    async def close(self) -> None:
        await self._reads.close()
        await self._recordings.close()


class _Reads(Batches[tuple[Any, ...], asyncpg.Record]):
    def order(self, item: tuple[Any, ...]) -> tuple[str, ...]:
        return item[:3]  # the payment code, the invoice, the transaction reference

    async def alone(self, conn: asyncpg.Connection, item: tuple[Any, ...]) -> asyncpg.Record:
        return await conn.fetchrow(_READ_CONTEXT[False], *item)

    async def together(self, items: list[tuple[Any, ...]]) -> list[asyncpg.Record]:
        return await self._pool.fetchmany(_READ_CONTEXT[False], items)


class _Recordings(Batches[tuple[Any, ...], tuple[asyncpg.Record, bool]]):
    """Recordings (``_recording``), each with whether its event is in the feed at its commit."""

    ANSWERS_AFTER_NEXT_BEGINS = True  # a batch is four round trips

    def order(self, item: tuple[Any, ...]) -> tuple[str, ...]:
        return _payment_key(item)

    async def alone(self, conn: asyncpg.Connection, item: tuple[Any, ...]) -> tuple[asyncpg.Record, bool]:
        [row] = await conn.fetch(_RECORD, *_statement_args([item], *_UNBATCHED))
        return row, False

    async def together(self, items: list[tuple[Any, ...]]) -> list[tuple[asyncpg.Record, bool]]:
        # The first recording of the first round takes every code's row lock and every invoice's
        # reconciliation row lock, before any takes its ids (migrations 0011 and 0016).
        codes, invoices = zip(*sorted({self.order(item)[:2] for item in items}), strict=True)
        rounds = _rounds(items)
        first = (BATCH_LOCK_WAIT_MS, list(codes), list(invoices))
        later = (BATCH_LOCK_WAIT_MS, None, None)
        args = [
            _statement_args([items[n] for n in members], *(later if k else first))
            for k, members in enumerate(rounds)
        ]
        async with self._pool.acquire() as conn, conn.transaction():
            self.answer_previous()  # BEGIN is back: the batch before is answered while this one runs
            # One round trip for every round; a round's rows come in its recordings' order.
            rows = await conn.fetchmany(_RECORD, args)
            # The batch's events go into the feed with its commit, unless another sequencing is under way
            # or holds on (migration 0013): its writers then need no pass after it.
            appended = any(row["payment_id"] is not None for row in rows)
            in_feed = appended and await outbox.sequence_in_commit(conn)
        by_position = dict(zip((n for members in rounds for n in members), rows, strict=True))
        return [(by_position[n], in_feed) for n in range(len(items))]


def _rounds(items: Sequence[tuple[Any, ...]]) -> list[list[int]]:
    """The positions of ``items`` (recordings sorted by ``order``) in rounds: the first recording of each
    code in the first, its second in the second, and so on. One statement records a round: it holds no
    two recordings of one code, which would not see each other's writes."""
    rounds: list[list[int]] = []
    seen: dict[str, int] = {}
    for n, item in enumerate(items):
        k = seen[item[_CODE]] = seen.get(item[_CODE], -1) + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(n)
    return rounds


# In a recording (``_recording``): its code, and the payment's identity (code, invoice, transaction).
_CODE = 0
_payment_key = operator.itemgetter(_CODE, 8, 9)
# The recording statement's lock parameters for recordings made alone: no bound on their lock waits, no
# batch's codes and invoices to lock first.
_UNBATCHED = (None, None, None)
# A recording's last item is its agent_ref, which the statement takes apart ($5), not in dipc_recording.
_AGENT_REF = -1


def _statement_args(items: Sequence[tuple[Any, ...]], *locks: Any) -> tuple[Any, ...]:
    """The recording statement's parameters for ``items`` (``_recording``), with its lock parameters."""
    return ([item[:_AGENT_REF] for item in items], *locks, [item[_AGENT_REF] for item in items])


def _recording(
    context: PaymentContext,
    notification: tuple[Any, ...],
    payment: Payment,
    event: tuple[str, dict[str, Any]],
) -> tuple[Any, ...]:
    """One recording for :func:`record`'s statement: a ``dipc_recording`` (migration 0019), then its
    ``agent_ref``."""
    counting = payment.kind == PaymentKind.NORMAL
    payment_code, client_id, request_id, headers, *rest = notification  # inbox.values
    if payment_code != payment.payment_code:
        raise ValueError("a notification's inbox row and its payment name two codes")
    event_type, document = event
    return (
        payment_code,
        client_id,
        request_id,
        orjson.dumps(headers).decode(),
        *rest,  # the body, the transaction's status, the outcome, the source
        payment.invoice_number,
        payment.transaction_ref,
        payment.kind,
        payment.reason,
        payment.amount,
        payment.expected_amount,
        payment.client_id,
        payment.channel,
        payment.agent_id,
        payment.agent_store_id,
        payment.agent_trx_id,
        payment.paid_at,
        payment.recorded_at,
        event_type,
        orjson.dumps(document).decode(),  # without the ids, which the statement adds
        context.unnamed_ref,
        # What the payment was decided on (of the code, what counting does not move).
        context.counting_state if counting else context.code_state,
        context.history.invoice_paid,
        sorted(context.history.quoted_amounts),
        counting,
        context.agent_ref,  # taken apart by _statement_args
    )


def _recorded(row: asyncpg.Record, payment: Payment, *, in_feed: bool = False) -> Recorded | None:
    if row["notification_id"] is None:
        return None
    if row["payment_id"] is None:
        return Recorded(row["notification_id"], None)
    if not in_feed:
        outbox.appended()  # its event is pending: the enclosing outbox.sequenced waits for a pass
    return Recorded(
        row["notification_id"],
        replace(payment, id=row["payment_id"], notification_id=row["notification_id"]),
    )
