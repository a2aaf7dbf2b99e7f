"""Answering an inquiry: decide from the code's row, mint an invoice for a reusable code, record, reply.

The hot path costs two round trips for a one-shot code (one lookup, one INSERT) and three for a
reusable one (the invoice sequence is taken with a conditional UPDATE, so a cancel racing the inquiry
wins cleanly). A repeated Request-Id never reaches the rules: it gets the bytes recorded the first time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from server.core.codes import Bill, CodeRules, PaymentCode, bill_for, decide_inquiry
from server.core.errors import RequestIdReused
from server.core.outcomes import InquiryOutcome
from server.store import codes as code_store
from server.store import inquiries as inquiry_store
from server.store.inquiries import PriorInquiry

# Renders (outcome, payment code, bill or None) into (HTTP status, exact body bytes): the protocol's job.
Render = Callable[[InquiryOutcome, str, Bill | None], tuple[int, bytes]]


@dataclass(frozen=True, slots=True)
class InquiryRequest:
    client_id: str
    request_id: str
    payment_code: str
    channel: str
    body_sha256: bytes  # tells a repeated request from a reused Request-Id


@dataclass(frozen=True, slots=True)
class InquiryAnswer:
    outcome: str
    http_status: int
    body: bytes
    invoice_number: str | None
    replayed: bool


async def inquire(
    pool: asyncpg.Pool,
    request: InquiryRequest,
    *,
    rules: CodeRules,
    render: Render,
    now: datetime,
    first_check_s: float,
) -> InquiryAnswer:
    """Answer an inquiry; a quoted invoice is first checked with DOKU ``first_check_s`` later (spec §8)."""
    async with pool.acquire() as conn:
        return await _inquire(conn, request, rules=rules, render=render, now=now, first_check_s=first_check_s)


async def _inquire(
    conn: asyncpg.Connection,
    request: InquiryRequest,
    *,
    rules: CodeRules,
    render: Render,
    now: datetime,
    first_check_s: float,
) -> InquiryAnswer:
    code, prior = await inquiry_store.lookup(conn, request.payment_code, request.request_id)
    if prior is not None:
        return _replay(prior, request.body_sha256)

    bin_channels = rules.channels_for(request.payment_code)
    outcome, bill = await _decide(conn, code, request, bin_channels, now)
    http_status, body = render(outcome, request.payment_code, bill)
    recorded = await inquiry_store.record(
        conn,
        payment_code=request.payment_code,
        request_id=request.request_id,
        client_id=request.client_id,
        channel=request.channel,
        body_sha256=request.body_sha256,
        outcome=outcome,
        invoice_number=bill.invoice_number if bill else None,
        amount=bill.amount if bill else None,
        http_status=http_status,
        response_body=body,
        first_check_s=first_check_s,
    )
    if not recorded:
        # A twin with the same Request-Id was recorded while we worked: answer what it answered, so
        # one Request-Id never yields two invoice numbers.
        prior = await inquiry_store.get(conn, request.payment_code, request.request_id)
        return _replay(prior, request.body_sha256)
    return InquiryAnswer(
        outcome=outcome,
        http_status=http_status,
        body=body,
        invoice_number=bill.invoice_number if bill else None,
        replayed=False,
    )


async def _decide(
    conn: asyncpg.Connection,
    code: PaymentCode | None,
    request: InquiryRequest,
    bin_channels: frozenset[str] | None,
    now: datetime,
) -> tuple[InquiryOutcome, Bill | None]:
    def decide(current: PaymentCode | None) -> InquiryOutcome:
        return decide_inquiry(
            current, client_id=request.client_id, channel=request.channel, bin_channels=bin_channels, now=now
        )

    outcome = decide(code)
    if outcome is not InquiryOutcome.SUCCESS or code is None:
        return outcome, None
    if not code.reusable:
        return outcome, bill_for(code)
    sequence = await code_store.mint_invoice(conn, code.payment_code)
    if sequence is None:
        # Cancelled between our read and the mint: decide again on what is there now. The mint only
        # fails for a code that is no longer active, which no rule lets succeed.
        again = decide(await code_store.get(conn, code.payment_code))
        assert again is not InquiryOutcome.SUCCESS
        return again, None
    return outcome, bill_for(code, invoice_seq=sequence)


def _replay(prior: PriorInquiry, body_sha256: bytes) -> InquiryAnswer:
    if prior.body_sha256 != body_sha256:
        raise RequestIdReused("this Request-Id was used before with a different body")
    return InquiryAnswer(
        outcome=prior.outcome,
        http_status=prior.http_status,
        body=prior.response_body,
        invoice_number=prior.invoice_number,
        replayed=True,
    )
