"""Payments: what a store transaction is, and what DOKU's notice of one means for the code (spec §4).

Pure rules. The caller holds the code's row lock and has read what is already recorded, so the decision
here is final for this transaction; unique keys in PostgreSQL back it up.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from server.core.codes import PaymentCode
from server.core.outcomes import CodeStatus


class PaymentKind(StrEnum):
    NORMAL = "normal"  # the bill was paid
    CONFLICT = "conflict"  # money taken again for a bill already paid: refund it
    ANOMALY = "anomaly"  # money taken that does not match any payable bill: settle it by hand


class NotificationOutcome(StrEnum):
    """What a verified notification did; stored with it in the inbox."""

    NORMAL = "normal"
    CONFLICT = "conflict"
    ANOMALY = "anomaly"
    REPEAT = "repeat"  # a retry of a transaction already recorded: nothing new
    IGNORED = "ignored"  # transaction.status other than paid: recorded, changes nothing
    REJECTED = "rejected"  # the body was unusable; stored raw, answered with a protocol error


class Reason(StrEnum):
    ALREADY_PAID = "ALREADY_PAID"  # one-shot code paid by another transaction
    INVOICE_ALREADY_PAID = "INVOICE_ALREADY_PAID"  # reusable invoice paid by another transaction
    UNKNOWN_CODE = "UNKNOWN_CODE"
    OTHER_CLIENT = "OTHER_CLIENT"
    UNKNOWN_INVOICE = "UNKNOWN_INVOICE"
    AMOUNT_MISMATCH = "AMOUNT_MISMATCH"
    CANCELLED = "CANCELLED"
    EXPIRED = "EXPIRED"


# Conflicts and anomalies are exceptions: finance resolves each once (spec §9, core/casework.py).
EXCEPTION_KINDS = (PaymentKind.CONFLICT, PaymentKind.ANOMALY)

# Every (kind, reason) decide_payment below can record as an exception: the metrics
# export each pair from the start, so an alert sees the first one arrive.
EXCEPTION_REASONS: dict[PaymentKind, tuple[Reason, ...]] = {
    PaymentKind.CONFLICT: (Reason.ALREADY_PAID, Reason.INVOICE_ALREADY_PAID),
    PaymentKind.ANOMALY: (
        Reason.UNKNOWN_CODE,
        Reason.OTHER_CLIENT,
        Reason.UNKNOWN_INVOICE,
        Reason.AMOUNT_MISMATCH,
        Reason.CANCELLED,
        Reason.EXPIRED,
    ),
}


@dataclass(frozen=True, slots=True)
class PaymentNotice:
    """A protocol-neutral notice that a store transaction happened."""

    client_id: str
    payment_code: str
    invoice_number: str
    amount: int
    transaction_ref: str
    channel: str
    paid: bool  # the transaction succeeded (DOKU: transaction.status == SUCCESS)
    transaction_status: str
    paid_at: datetime | None
    agent_id: str | None
    agent_store_id: str | None
    agent_trx_id: str | None


@dataclass(frozen=True, slots=True)
class PaymentHistory:
    """What is recorded already for the notice's code and invoice."""

    repeat: bool  # this very transaction (same code, invoice and reference) is recorded
    invoice_paid: bool  # a normal payment, or an accepted exception, exists for this code and invoice
    quoted_amounts: frozenset[int]  # amounts successful inquiries quoted for this invoice


@dataclass(frozen=True, slots=True)
class PaymentDecision:
    kind: PaymentKind
    reason: Reason | None
    expected_amount: int | None

    @property
    def outcome(self) -> NotificationOutcome:
        return NotificationOutcome(self.kind.value)


@dataclass(frozen=True, slots=True)
class Payment:
    id: int
    payment_code: str
    invoice_number: str
    transaction_ref: str
    kind: str
    reason: str | None
    amount: int
    expected_amount: int | None
    client_id: str
    channel: str
    agent_id: str | None
    agent_store_id: str | None
    agent_trx_id: str | None
    paid_at: datetime | None
    notification_id: int
    source: str  # notification, or check_status (recovered by reconciliation)
    recorded_at: datetime
    # For a Check Status answer that named no transaction: the reference of DOKU's notification of it,
    # once one came (migration 0018). None otherwise.
    notified_ref: str | None = None


def _anomaly(reason: Reason, expected: int | None) -> PaymentDecision:
    return PaymentDecision(PaymentKind.ANOMALY, reason, expected)


def decide_payment(
    notice: PaymentNotice, code: PaymentCode | None, history: PaymentHistory, now: datetime
) -> PaymentDecision:
    """What a new (not repeated) paid transaction is: a normal payment, a conflict, or an anomaly.

    First whether it matches a bill at all (code, merchant, invoice, amount), then whether that bill
    could still be paid (cancelled, expired, already paid).
    """
    if code is None:
        return _anomaly(Reason.UNKNOWN_CODE, None)
    if code.client_id != notice.client_id:
        return _anomaly(Reason.OTHER_CLIENT, None)
    if code.reusable:
        # Every invoice of a reusable code was minted by an inquiry, which quoted its amount.
        if not history.quoted_amounts:
            return _anomaly(Reason.UNKNOWN_INVOICE, None)
        accepted, billed = history.quoted_amounts, min(history.quoted_amounts)
    else:
        if notice.invoice_number != code.invoice_number:
            return _anomaly(Reason.UNKNOWN_INVOICE, code.amount)
        # The customer paid what the counter showed: the current amount, or one an inquiry quoted
        # before the merchant changed it.
        accepted, billed = history.quoted_amounts | {code.amount}, code.amount
    if notice.amount not in accepted:
        return _anomaly(Reason.AMOUNT_MISMATCH, billed)
    expected = notice.amount
    if code.status is CodeStatus.CANCELLED:
        return _anomaly(Reason.CANCELLED, expected)
    if code.status is CodeStatus.PAID or history.invoice_paid:
        reason = Reason.INVOICE_ALREADY_PAID if code.reusable else Reason.ALREADY_PAID
        return PaymentDecision(PaymentKind.CONFLICT, reason, expected)
    if code.is_expired(notice.paid_at or now):
        return _anomaly(Reason.EXPIRED, expected)
    return PaymentDecision(PaymentKind.NORMAL, None, expected)
