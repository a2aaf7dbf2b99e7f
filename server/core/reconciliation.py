"""Reconciliation (spec §8): ask DOKU about every quoted invoice that has no payment, on a schedule.

The rules: when an invoice is checked next, what a check's answer does to it, and how a paid answer
becomes a payment — through :func:`server.core.notifications.record_notification`, the very transaction
a notification goes through (identity, one-shot and reusable rules, conflicts, anomalies), with the raw
answer kept in the inbox as the payment's source.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from server.core.documents import iso
from server.core.errors import ValidationFailed
from server.core.manage import Page, key_cursor, page_limit, read_key_cursor
from server.core.notifications import (
    CHECK_STATUS_SOURCE,
    NotificationResult,
    RawNotification,
    record_notification,
)
from server.core.outcomes import CheckResult
from server.core.payments import PaymentNotice
from server.core.times import parse_timestamp
from server.doku import conventions
from server.doku.auth import Client
from server.doku.checkstatus import CheckAnswer, CheckStatusClient
from server.store import reconciliation as store
from server.store.reconciliation import Claimed, QuotedInvoice

STATES = ("pending", "paid", "expired", "gave_up")
# An invoice whose calls time out again and again waits longer each time: its retry after the n-th in a
# row is the pause's times 2 ** (n - 1), up to this (after_check).
TIMEOUT_RETRY_CAP_S = 900.0
# At this many timeouts in a row, the reconciler warns once that DOKU does not answer about the invoice.
TIMEOUTS_WARNED = 3
_INVOICE_RE = re.compile(conventions.INVOICE_PATTERN)


def invoice_document(invoice: QuotedInvoice) -> dict[str, Any]:
    return {
        "payment_code": invoice.payment_code,
        "invoice_number": invoice.invoice_number,
        "client_id": invoice.client_id,
        "channel": invoice.channel,
        "amount": invoice.amount,
        "state": invoice.state,
        "first_quoted_at": iso(invoice.first_quoted_at),
        "attempts": invoice.attempts,
        "timeouts_in_a_row": invoice.timeouts_in_a_row,
        "next_check_at": iso(invoice.next_check_at),
        "last_checked_at": iso(invoice.last_checked_at),
        "last_result": invoice.last_result,
        "last_detail": invoice.last_detail,
        "payment_id": invoice.payment_id,
        "settled_by": invoice.settled_by,
    }


def next_check(first_quoted_at: datetime, schedule: Sequence[float], now: datetime) -> datetime | None:
    """The first scheduled check after ``now``; None when the schedule has run out.

    Checks missed while no reconciler ran are not made up one by one: the next one is the next slot.
    """
    for offset in schedule:
        moment = first_quoted_at + timedelta(seconds=offset)
        if moment > now:
            return moment
    return None


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a check does to its invoice's row."""

    state: str
    next_check_at: datetime | None
    counted: bool  # an attempt at the invoice (a throttled or unanswered call is not one)
    timeouts_in_a_row: int  # the invoice's calls in a row that got no answer in time, this one included


def after_check(
    invoice: QuotedInvoice, answer: CheckAnswer, schedule: Sequence[float], now: datetime, retry_s: float
) -> Outcome:
    """The row after a check. A paid answer was recorded as a payment, which closed the row already.

    A call DOKU throttled (429) or never answered (DOKU unreachable, or no reply in time) is not an
    attempt at the invoice: it keeps its place on the schedule and its due check is asked again after
    ``retry_s``. Otherwise a DOKU outage would use up the schedule of every invoice due during it, and
    give them up without DOKU ever having been asked.

    But a timeout may be the invoice's own (DOKU answers about the others and hangs on this one), and
    then it would be asked after every pause for ever. So each timeout in a row after the first doubles
    the invoice's wait (:func:`retry_after`): never given up on silence, asked less and less. An answer
    about it, or a counted error, starts the count again; a 429 or a connection that failed says nothing
    about one invoice, and neither adds to the count nor clears it (the wait still follows the count).
    A row that leaves ``pending`` drops its count (here, and in ``store.settle_statement``).
    """
    result = answer.result
    if result is CheckResult.PAID:
        return Outcome("paid", None, True, 0)
    if result is CheckResult.EXPIRED:
        return Outcome("expired", None, True, 0)
    counted = not (result is CheckResult.RATE_LIMITED or result.unanswered)
    if invoice.state != "pending":
        # A check by hand of an invoice already given up on (or expired) that found nothing final. Only
        # a pending invoice keeps a count of timeouts: one quoted again starts without.
        return Outcome(invoice.state, None, counted, 0)
    timeouts = 0 if counted else invoice.timeouts_in_a_row + int(result is CheckResult.TIMEOUT)
    if not counted:
        retry_at = now + timedelta(seconds=retry_after(retry_s, timeouts))
        # A check by hand of an invoice not due yet never brings its next scheduled check earlier.
        if invoice.next_check_at is not None and invoice.next_check_at > retry_at:
            retry_at = invoice.next_check_at
        return Outcome("pending", retry_at, False, timeouts)
    following = next_check(invoice.first_quoted_at, schedule, now)
    state = "pending" if following else "gave_up"
    return Outcome(state, following, True, timeouts)


def retry_after(retry_s: float, timeouts_in_a_row: int) -> float:
    """Seconds until an unanswered or throttled invoice is asked again: ``retry_s`` (the pause every
    reconciler takes), doubled for each of its timeouts in a row after the first, up to
    :data:`TIMEOUT_RETRY_CAP_S` (never below ``retry_s``)."""
    doublings = min(max(timeouts_in_a_row - 1, 0), 20)  # 2 ** 20 pauses is far past the cap
    return max(retry_s, min(retry_s * 2**doublings, TIMEOUT_RETRY_CAP_S))


@dataclass(frozen=True, slots=True)
class CheckReport:
    """One check, for logs, metrics, the admin API and the CLI."""

    invoice: QuotedInvoice
    answer: CheckAnswer
    recorded: NotificationResult | None  # set when a paid answer went through the payment rules

    @property
    def recovered(self) -> bool:
        """This check recorded a payment DOKU's notifications had not brought."""
        return self.recorded is not None and self.recorded.payment is not None

    def document(self) -> dict[str, Any]:
        document = invoice_document(self.invoice) | {
            "check": {
                "result": self.answer.result.value,
                "detail": self.answer.detail,
                "http_status": self.answer.http_status,
                "request_id": self.answer.request_id,
            }
        }
        if self.answer.message is not None:
            document["check"]["amount"] = self.answer.message.amount  # what DOKU says was paid
        if self.recorded is not None:
            payment = self.recorded.payment
            document["check"]["recorded"] = self.recorded.outcome.value
            document["check"]["reason"] = payment.reason if payment else None
            document["check"]["payment_id"] = payment.id if payment else None
        return document


async def check(
    pool: asyncpg.Pool,
    api: CheckStatusClient,
    clients: Mapping[str, Client],
    claimed: Claimed,
    *,
    schedule: Sequence[float],
    retry_s: float,
    now_fn,
) -> CheckReport:
    """Ask DOKU about one claimed invoice, record what it said, and end the lease."""
    invoice = claimed.invoice
    client = clients.get(invoice.client_id)
    if client is None or not client.secret_keys:
        answer = CheckAnswer(
            "", "", CheckResult.HTTP_ERROR, f"DOKU client {invoice.client_id} is not configured"
        )
    else:
        answer = await api.check(
            client, payment_code=invoice.payment_code, invoice_number=invoice.invoice_number, now=now_fn()
        )
    answer = await _tied_to_the_code(pool, invoice, answer)
    recorded = None
    if answer.result is CheckResult.PAID:
        recorded = await _record_payment(pool, invoice, answer, now_fn())
    outcome = after_check(invoice, answer, schedule, now_fn(), retry_s)
    async with pool.acquire() as conn, conn.transaction():
        if answer.result is CheckResult.PAID:
            # A repeat (DOKU's notification got there first) settles the row with the existing payment.
            await store.settle(conn, invoice.payment_code, invoice.invoice_number)
        updated = await store.record_check(
            conn,
            claimed,
            result=answer.result.value,
            detail=answer.detail,
            state=outcome.state,
            next_check_at=outcome.next_check_at,
            counted=outcome.counted,
            timeouts_in_a_row=outcome.timeouts_in_a_row,
        )
    if updated is None:  # the lease ran out while DOKU answered: whoever holds it now writes the result
        updated = await store.get(pool, invoice.payment_code, invoice.invoice_number) or invoice
    return CheckReport(updated, answer, recorded)


async def _tied_to_the_code(pool: asyncpg.Pool, invoice: QuotedInvoice, answer: CheckAnswer) -> CheckAnswer:
    """The answer, or an unknown one when it cannot be tied to the invoice's code.

    DOKU is asked by invoice number alone (spec §8). An answer that names no payment code is about
    whichever of the merchant's codes quoted that number: when two or more did (two one-shot codes given
    one invoice number, reusable codes made alike), a SUCCESS would pay each of them for one store
    transaction, and an EXPIRED would close each as unpaid. Unknown instead: checked again on the
    schedule, and given up visibly if DOKU never names the code.
    """
    message = answer.message
    if message is None or message.names_code or answer.result not in (CheckResult.PAID, CheckResult.EXPIRED):
        return answer
    codes = await store.codes_quoting(pool, invoice.client_id, invoice.invoice_number)
    if codes < 2:
        return answer
    detail = (
        f"DOKU answered {message.transaction_status} without naming the payment code, and {codes} codes "
        f"quoted invoice {invoice.invoice_number}: it cannot be tied to one "
        "(look it up in DOKU's Back Office)"
    )
    return replace(answer, result=CheckResult.UNREADABLE, detail=detail[:300], message=None)


async def _record_payment(
    pool: asyncpg.Pool, invoice: QuotedInvoice, answer: CheckAnswer, now: datetime
) -> NotificationResult:
    message = answer.message
    assert message is not None
    assert message.amount is not None
    raw = RawNotification(
        client_id=invoice.client_id,
        request_id=answer.request_id,
        headers=list(answer.headers),
        body=answer.body,
        source=CHECK_STATUS_SOURCE,
    )
    notice = PaymentNotice(
        client_id=invoice.client_id,
        payment_code=invoice.payment_code,
        invoice_number=invoice.invoice_number,
        amount=message.amount,
        transaction_ref=message.transaction_reference(invoice.invoice_number),
        channel=message.channel or invoice.channel,
        paid=True,
        transaction_status=message.transaction_status,
        paid_at=message.transaction_date,
        agent_id=message.agent_id,
        agent_store_id=message.agent_store_id,
        agent_trx_id=message.agent_trx_id,
    )
    return await record_notification(pool, raw, notice, now=now)


# --- what the admin API and the CLI ask -------------------------------------------------------------


async def list_invoices(
    pool: asyncpg.Pool, *, state: str | None, after: str | None, limit: int | None
) -> Page[QuotedInvoice]:
    if state is not None and state not in STATES:
        raise ValidationFailed({"state": f"must be one of {', '.join(STATES)}"})
    size = page_limit(limit)
    items = await store.list_page(
        pool, state=state, after=read_key_cursor(after) if after else None, limit=size + 1
    )
    return Page.of(
        items, size, lambda last: key_cursor(last.first_quoted_at, last.payment_code, last.invoice_number)
    )


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """A check by hand: one invoice now, or every unsettled invoice quoted since a moment."""

    invoice_number: str | None = None
    since: datetime | None = None


def parse_check_request(raw: Mapping[str, Any]) -> CheckRequest:
    if set(raw) - {"invoice_number", "since"} or ("invoice_number" in raw) == ("since" in raw):
        raise ValidationFailed({"body": 'send {"invoice_number": "..."} or {"since": "<RFC 3339>"}'})
    if "since" in raw:
        try:
            return CheckRequest(since=parse_timestamp(raw["since"]))
        except ValueError as problem:
            raise ValidationFailed({"since": str(problem)}) from None
    invoice_number = raw["invoice_number"]
    if not isinstance(invoice_number, str) or not _INVOICE_RE.match(invoice_number):
        raise ValidationFailed({"invoice_number": "must be an invoice number ([A-Za-z0-9_/-], at most 64)"})
    return CheckRequest(invoice_number=invoice_number)
