"""The audit trail without psql: what DOKU asked and what we answered, and every notification as received.

Both lists are oldest first. Inquiries have no id, so their cursor is an opaque token of the last row's
(received_at, payment_code, request_id); notifications page by id.
"""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from server.core.documents import iso
from server.core.errors import ValidationFailed
from server.core.manage import Page, key_cursor, page_limit, read_key_cursor
from server.core.payments import NotificationOutcome
from server.core.registration import parse_payment_code
from server.store import audit
from server.store.audit import InquiryCursor, InquiryRecord, NotificationRecord

MAX_ID = 2**63 - 1
NOTIFICATION_OUTCOMES = tuple(member.value for member in NotificationOutcome)


def _code_filter(payment_code: str | None) -> str | None:
    if payment_code is None:
        return None
    try:
        return parse_payment_code(payment_code)
    except ValueError as problem:
        raise ValidationFailed({"payment_code": str(problem)}) from None


def inquiry_document(record: InquiryRecord) -> dict[str, Any]:
    body = bytes(record.response_body)
    try:
        response: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        response = None
    return {
        "payment_code": record.payment_code,
        "request_id": record.request_id,
        "client_id": record.client_id,
        "channel": record.channel,
        "outcome": record.outcome,
        "invoice_number": record.invoice_number,
        "amount": record.amount,
        "http_status": record.http_status,
        "response": response,
        "received_at": iso(record.received_at),
        "response_base64": base64.b64encode(body).decode(),  # the exact bytes, whatever they are
    }


def notification_document(record: NotificationRecord) -> dict[str, Any]:
    body = bytes(record.body)
    try:
        text: str | None = body.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return {
        "id": record.id,
        "payment_code": record.payment_code,
        "client_id": record.client_id,
        "request_id": record.request_id,
        "headers": record.headers,
        "body": text,
        "transaction_status": record.transaction_status,
        "outcome": record.outcome,
        "received_at": iso(record.received_at),
        "payment_id": record.payment_id,
        "kind": record.kind,
        "reason": record.reason,
        "body_base64": base64.b64encode(body).decode(),
    }


async def list_inquiries(
    pool: asyncpg.Pool,
    *,
    payment_code: str | None = None,
    since: datetime | None = None,
    after: str | None = None,
    limit: int | None = None,
) -> Page[InquiryRecord]:
    code = _code_filter(payment_code)
    cursor: InquiryCursor | None = read_key_cursor(after) if after is not None else None
    size = page_limit(limit)
    items = await audit.inquiries(pool, payment_code=code, since=since, after=cursor, limit=size + 1)
    return Page.of(items, size, lambda last: key_cursor(last.received_at, last.payment_code, last.request_id))


async def list_notifications(
    pool: asyncpg.Pool,
    *,
    payment_code: str | None = None,
    outcome: str | None = None,
    after: int | None = None,
    limit: int | None = None,
) -> Page[NotificationRecord]:
    code = _code_filter(payment_code)
    if outcome is not None and outcome not in NOTIFICATION_OUTCOMES:
        raise ValidationFailed({"outcome": f"must be one of {', '.join(NOTIFICATION_OUTCOMES)}"})
    if after is not None and not 0 <= after <= MAX_ID:
        raise ValidationFailed({"after": "must be a notification id"})
    size = page_limit(limit)
    items = await audit.notifications(pool, payment_code=code, outcome=outcome, after=after, limit=size + 1)
    return Page.of(items, size, lambda notification: str(notification.id))
