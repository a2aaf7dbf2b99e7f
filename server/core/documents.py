"""The JSON documents of our objects, one shape everywhere: admin API, CLI ``--json`` and event payloads."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson

from server.core.codes import PaymentCode
from server.core.errors import InvalidJson
from server.core.payments import Payment


def load_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object, or :class:`InvalidJson` saying what is wrong with it."""
    if not body:
        raise InvalidJson("the body is empty; a JSON object was expected")
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise InvalidJson(f"the body is not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise InvalidJson("the body must be a JSON object")
    return document


def iso(moment: datetime | None) -> str | None:
    """RFC 3339 in UTC with ``Z``, or None."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def code_document(code: PaymentCode) -> dict[str, Any]:
    return {
        "payment_code": code.payment_code,
        "client_id": code.client_id,
        "channel": code.channel,
        "invoice_number": code.invoice_number,
        "amount": code.amount,
        "customer_name": code.customer_name,
        "customer_email": code.customer_email,
        "info1": code.info1,
        "info2": code.info2,
        "info3": code.info3,
        "reusable": code.reusable,
        "status": code.status.value,
        "expires_at": iso(code.expires_at),
        "paid_count": code.paid_count,
        "created_at": iso(code.created_at),
        "updated_at": iso(code.updated_at),
        "version": code.version,
    }


def payment_document(payment: Payment) -> dict[str, Any]:
    return {
        "id": payment.id,
        "payment_code": payment.payment_code,
        "invoice_number": payment.invoice_number,
        "transaction_ref": payment.transaction_ref,
        "amount": payment.amount,
        "expected_amount": payment.expected_amount,
        "kind": payment.kind,
        "reason": payment.reason,
        "client_id": payment.client_id,
        "channel": payment.channel,
        "agent_id": payment.agent_id,
        "agent_store_id": payment.agent_store_id,
        "agent_trx_id": payment.agent_trx_id,
        "paid_at": iso(payment.paid_at),
        "recorded_at": iso(payment.recorded_at),
        "notification_id": payment.notification_id,
        "source": payment.source,
        "notified_ref": payment.notified_ref,
    }
