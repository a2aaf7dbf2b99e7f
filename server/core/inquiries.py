"""Answering an inquiry: one call of the database's ``dipc_inquire``, which decides, mints and records.

The rules (which code answers which inquiry) and the exact bytes of each answer are SQL, in
schemas/migrations/0005_inquire.sql, so the hot path costs one round trip, shared with the worker's
other inquiries of the moment (store/inquiries.py, ``InquiryBatches``). What stays here is what only the
process knows: the BIN rules of its configuration, its clock, and the reconciliation schedule.
A repeated Request-Id is answered with the bytes recorded the first time; with another body it is a reuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from server.core.codes import CodeRules
from server.core.errors import RequestIdReused
from server.store.inquiries import Inquiry, InquiryBatches, RecordedInquiry


@dataclass(frozen=True, slots=True)
class InquiryRequest:
    client_id: str
    request_id: str
    payment_code: str
    channel: str
    body_sha256: bytes  # tells a repeated request from a reused Request-Id


async def inquire(
    batches: InquiryBatches, request: InquiryRequest, *, rules: CodeRules, now: datetime
) -> RecordedInquiry:
    """Answer an inquiry; a quoted invoice is reconciled with DOKU on the process's schedule (spec §8).

    The answer is what ``dipc_inquire`` recorded: by this call, or earlier under the Request-Id (replayed).
    """
    recorded = await batches.inquire(
        Inquiry(
            payment_code=request.payment_code,
            request_id=request.request_id,
            client_id=request.client_id,
            channel=request.channel,
            body_sha256=request.body_sha256,
            bin_channels=rules.channels_for(request.payment_code),
            at=now,
        )
    )
    if recorded.replayed and recorded.body_sha256 != request.body_sha256:
        raise RequestIdReused("this Request-Id was used before with a different body")
    return recorded
