"""Recording a payment notification: exactly once, before we answer (spec §4; ADR 4, ADR 11, ADR 13).

Read, decide, record: read the code and what is recorded for the invoice, without a lock; decide
(``decide_payment``, the one place the payment rules live); then one statement (its own transaction, or
with a worker's other recordings in one batch's, ADR 13) takes the code's row lock (serialising every
notification, cancel and change of that code), checks that what the decision rests on is still so, and
writes the inbox row, the payment, the code's count, the reconciliation's settlement and the outbox
event together. If anything changed, it writes nothing and the notification is read and decided again,
this time holding the lock from the read to the commit. Retries of a transaction find their payment and
record only themselves in the inbox. The payment's primary key and the one-normal-payment-per-invoice
index back the lock up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime

import asyncpg
import structlog

from server.core.codes import PaymentCode
from server.core.documents import code_document, payment_document
from server.core.errors import Unavailable
from server.core.payments import (
    NotificationOutcome,
    Payment,
    PaymentDecision,
    PaymentKind,
    PaymentNotice,
    decide_payment,
)
from server.doku import conventions
from server.store import inbox, outbox
from server.store import payments as payment_store

log = structlog.get_logger(component="dipc.notifications")

EVENT_TYPES = {
    PaymentKind.NORMAL: "payment.received",
    PaymentKind.CONFLICT: "payment.conflict",
    PaymentKind.ANOMALY: "payment.anomaly",
}
# A RawNotification's source when it is DOKU's answer to our Check Status (spec §8).
CHECK_STATUS_SOURCE = "check_status"
# A notice decided again this many times while it held its code's row lock from its read on is refused
# (503, DOKU retries) with an error line, not decided again until its deadline, taking the lock each
# time. The lock holds the code and its payments; a quote of the code's amount, which an inquiry writes
# without that lock, can still undo a decision, and does so seldom twice in a row. Past a few times the
# read and the recording disagree for good: this dipc and the database's functions of two versions (a
# deploy), or one of them wrong.
LOCKED_DECISIONS_MAX = 10


@dataclass(frozen=True, slots=True)
class RawNotification:
    """A verified notification exactly as it arrived."""

    client_id: str
    request_id: str
    headers: Sequence[tuple[str, str]]
    body: bytes
    # What DOKU told us: a notification it sent, or its answer to our Check Status (spec §8).
    source: str = "notification"


@dataclass(frozen=True, slots=True)
class NotificationResult:
    notification_id: int
    outcome: NotificationOutcome
    decision: PaymentDecision | None = None
    payment: Payment | None = None


async def record_notification(
    pool: asyncpg.Pool,
    raw: RawNotification,
    notice: PaymentNotice,
    *,
    now: datetime,
    batches: payment_store.PaymentBatches | None = None,
) -> NotificationResult:
    """Store the notification and its effect; return only once both are committed. With ``batches``, the
    recording shares its round trip and commit with those that arrive with it (ADR 13)."""
    if not notice.paid:
        outcome = NotificationOutcome.IGNORED
        values = _inbox_values(raw, notice.payment_code, notice.transaction_status, outcome)
        return NotificationResult(await inbox.insert(pool, values), outcome)
    async with outbox.sequenced(pool):
        # First without a lock: the common case costs two round trips. If the code or the invoice's
        # history changed before the recording held the lock (a cancel, another payment of the invoice),
        # read and decide again holding the lock until the recording is committed (as before ADR 11).
        lock = False
        locked_decisions = 0
        while True:
            if lock:
                locked_decisions += 1
                if locked_decisions > LOCKED_DECISIONS_MAX:
                    log.error(
                        "notification.undecidable",
                        payment_code=notice.payment_code,
                        invoice_number=notice.invoice_number,
                        transaction_ref=notice.transaction_ref,
                        decisions=LOCKED_DECISIONS_MAX,
                    )
                    raise Unavailable(
                        "the notification could not be recorded now; it will be, when sent again"
                    )
            try:
                if lock:
                    async with pool.acquire() as conn, conn.transaction():
                        result = await _decide_and_record(conn, raw, notice, now, lock=True)
                else:
                    result = await _decide_and_record(pool, raw, notice, now, batches=batches)
            except asyncpg.UniqueViolationError as error:
                # A second normal payment for one invoice reached the index, which only a race the row
                # lock does not cover could do. Nothing was committed; read the winner and decide again.
                log.warning("notification.retry_after_unique_violation", constraint=error.constraint_name)
                result = None
            if result is not None:
                return result
            log.info("notification.decided_again", payment_code=notice.payment_code, locked=lock)
            lock = True


async def _decide_and_record(
    conn: asyncpg.Connection | asyncpg.Pool,
    raw: RawNotification,
    notice: PaymentNotice,
    now: datetime,
    *,
    lock: bool = False,
    batches: payment_store.PaymentBatches | None = None,
) -> NotificationResult | None:
    """Read, decide and record once; None when what the decision rests on changed before the recording
    held the code's row lock (nothing is written then). With ``lock``, ``conn`` is a connection in a
    transaction, which the read's lock holds until it ends."""

    def raw_values(outcome: NotificationOutcome) -> tuple:
        return _inbox_values(raw, notice.payment_code, notice.transaction_status, outcome)

    facts = (notice.payment_code, notice.invoice_number, notice.transaction_ref, notice.amount)
    # What a payment of this transaction may be known by, short of its own reference (migrations 0018,
    # 0026 and 0032): an unnamed Check Status answer's, and its store transaction's.
    refs = {
        "unnamed_ref": conventions.check_status_reference(notice.invoice_number),
        "agent_ref": conventions.agent_reference(
            (notice.agent_id, notice.agent_store_id, notice.agent_trx_id)
        ),
    }
    if batches is not None:
        context = await batches.read_context(*facts, **refs, source=raw.source)
    else:
        context = await payment_store.read_context(conn, *facts, **refs, source=raw.source, lock=lock)
    if context.history.repeat:
        outcome = NotificationOutcome.REPEAT
        repeated = raw_values(outcome)
        repeat_id = await payment_store.record_repeat(conn, repeated, *facts, **refs, match=lock)
        if repeat_id is None:
            # The payment it repeated was matched with another transaction meanwhile, or it is to be
            # matched with one, which only a decision that holds the code's row lock may do.
            return None
        outbox.replayed()  # answered once its payment's event is in the feed, as the first answer was
        return NotificationResult(repeat_id, outcome)
    decision = decide_payment(notice, context.code, context.history, now)
    payment = planned_payment(notice, decision, context, raw.source)
    code = context.code
    if code is not None and decision.kind is PaymentKind.NORMAL:
        code = replace(code, updated_at=context.at)  # counted then; the count itself is the statement's
    event = (EVENT_TYPES[decision.kind], _event(payment, code))
    recording = (context, raw_values(decision.outcome), payment, event)
    if batches is not None:
        recorded = await batches.record(*recording)
    else:
        recorded = await payment_store.record(conn, *recording)
    if recorded is None:
        return None
    if recorded.payment is None:
        # Only for a code we do not know (no row to lock): a twin of this transaction got there first.
        outbox.replayed()
        return NotificationResult(recorded.notification_id, NotificationOutcome.REPEAT)
    return NotificationResult(recorded.notification_id, decision.outcome, decision, recorded.payment)


async def record_rejected(pool: asyncpg.Pool, raw: RawNotification, payment_code: str) -> int:
    """Store a verified notification whose body we could not use, so that nothing is lost."""
    return await inbox.insert(pool, _inbox_values(raw, payment_code, None, NotificationOutcome.REJECTED))


def _inbox_values(
    raw: RawNotification, payment_code: str, transaction_status: str | None, outcome: NotificationOutcome
) -> tuple:
    return inbox.values(
        payment_code=payment_code,
        client_id=raw.client_id,
        request_id=raw.request_id,
        headers=raw.headers,
        body=raw.body,
        transaction_status=transaction_status,
        outcome=outcome,
        source=raw.source,
    )


def planned_payment(
    notice: PaymentNotice, decision: PaymentDecision, context: payment_store.PaymentContext, source: str
) -> Payment:
    """The payment recording ``notice`` will write, at the time of ``context``'s read, before its ids."""
    return Payment(
        id=0,  # the ids are given by the recording (payments.record), once it holds the code's lock
        payment_code=notice.payment_code,
        invoice_number=notice.invoice_number,
        transaction_ref=notice.transaction_ref,
        kind=decision.kind.value,
        reason=decision.reason.value if decision.reason else None,
        amount=notice.amount,
        expected_amount=decision.expected_amount,
        client_id=notice.client_id,
        channel=notice.channel,
        agent_id=notice.agent_id,
        agent_store_id=notice.agent_store_id,
        agent_trx_id=notice.agent_trx_id,
        paid_at=notice.paid_at,
        notification_id=0,
        source=source,
        recorded_at=context.at,
    )


def _event(payment: Payment, code: PaymentCode | None) -> dict:
    return payment_document(payment) | {"code": code_document(code) if code else None}
