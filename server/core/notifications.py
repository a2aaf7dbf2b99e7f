"""Recording a payment notification: exactly once, in one transaction, before we answer (spec §4).

The transaction: lock the code's row (serialising every notification, cancel and change of that code),
read what is recorded, decide, then write the inbox row, the payment, the code's new state and the
outbox event together. Retries of a transaction find their payment and record only themselves in the
inbox. The payment's primary key and the one-normal-payment-per-invoice index back the locks up.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import structlog

from server.core.codes import PaymentCode
from server.core.documents import code_document, payment_document
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
    pool: asyncpg.Pool, raw: RawNotification, notice: PaymentNotice, *, now: datetime
) -> NotificationResult:
    """Store the notification and its effect; return only once both are committed."""
    try:
        return await _in_transaction(pool, raw, notice, now)
    except asyncpg.UniqueViolationError as error:
        # A second normal payment for one invoice reached the index, which only a race the row lock
        # does not cover could do. Nothing was committed; the retry reads the winner and decides again.
        log.warning("notification.retry_after_unique_violation", constraint=error.constraint_name)
        return await _in_transaction(pool, raw, notice, now)


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


async def _in_transaction(
    pool: asyncpg.Pool, raw: RawNotification, notice: PaymentNotice, now: datetime
) -> NotificationResult:
    async with outbox.transaction(pool) as conn:
        code, history = await payment_store.lock_and_read(
            conn,
            notice.payment_code,
            notice.invoice_number,
            notice.transaction_ref,
            notice.amount,
            unnamed_ref=conventions.check_status_reference(notice.invoice_number),
        )

        def raw_values(outcome: NotificationOutcome) -> tuple:
            return _inbox_values(raw, notice.payment_code, notice.transaction_status, outcome)

        async def store_raw(outcome: NotificationOutcome) -> int:
            return await inbox.insert(conn, raw_values(outcome))

        if not notice.paid:
            return NotificationResult(
                await store_raw(NotificationOutcome.IGNORED), NotificationOutcome.IGNORED
            )
        if history.repeat:
            outbox.replayed()  # answered once its payment's event is in the feed, as the first answer was
            return NotificationResult(await store_raw(NotificationOutcome.REPEAT), NotificationOutcome.REPEAT)

        decision = decide_payment(notice, code, history, now)
        recorded = await payment_store.record(conn, raw_values(decision.outcome), notice, decision)
        notification_id, payment = recorded.notification_id, recorded.payment
        if payment is None:
            # Only for a code we do not know (no row to lock): a twin of this transaction got there first.
            await inbox.set_outcome(conn, notice.payment_code, notification_id, NotificationOutcome.REPEAT)
            outbox.replayed()
            return NotificationResult(notification_id, NotificationOutcome.REPEAT)
        code = recorded.counted or code  # a normal payment was counted on its code
        await outbox.append(conn, EVENT_TYPES[decision.kind], notice.payment_code, _event(payment, code))
    return NotificationResult(notification_id, decision.outcome, decision, payment)


def _event(payment: Payment, code: PaymentCode | None) -> dict:
    return payment_document(payment) | {"code": code_document(code) if code else None}
