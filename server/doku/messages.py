"""DOKU message bodies: parse what DOKU sends, render our protocol errors (spec §3, §4).

Parsing is lenient: unknown members are ignored, and only what we need must be present and well formed.
Rendering is byte-exact and compact (orjson keeps member order), since signatures cover the bytes. The
answers to inquiries are rendered by the database function dipc_inquire, with the rules that choose them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from server.core.documents import load_object
from server.core.errors import DipcError, InvalidField
from server.core.text import TooLarge, whole_number
from server.core.times import parse_timestamp
from server.doku import channels, conventions

PAYMENT_CODE_FIELD = "online_to_offline_info.payment_code"
MAX_RUPIAH = 2**63 - 1  # what a bigint column holds


@dataclass(frozen=True, slots=True)
class InquiryMessage:
    payment_code: str
    channel: str


def member(data: dict[str, Any], path: str) -> Any:
    """``data["a"]["b"]`` for ``path="a.b"``; None where any step is missing or not an object."""
    value: Any = data
    for key in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def payment_code_of(data: dict[str, Any]) -> str:
    code = member(data, PAYMENT_CODE_FIELD)
    if code is None or code == "":
        raise InvalidField(PAYMENT_CODE_FIELD, "is required")
    if not isinstance(code, str):
        raise InvalidField(PAYMENT_CODE_FIELD, "must be a string (leading zeros matter)")
    if not code.isascii() or not code.isdigit() or len(code) > channels.MAX_CODE_LENGTH:
        raise InvalidField(PAYMENT_CODE_FIELD, f"must be at most {channels.MAX_CODE_LENGTH} digits")
    return code


def channel_of(data: dict[str, Any]) -> str:
    channel = channels.channel_from_message(member(data, "channel.id"), member(data, "acquirer.id"))
    if channel is None:
        supported = ", ".join(channels.CHANNEL_IDS.values())
        raise InvalidField("channel.id", f"must name a supported channel ({supported})")
    return channel


def parse_inquiry(body: bytes) -> InquiryMessage:
    data = load_object(body)
    return InquiryMessage(payment_code=payment_code_of(data), channel=channel_of(data))


def render_inquiry_error(error: DipcError) -> bytes:
    """A protocol error on the inquiry path: DOKU's shape plus an ``error`` member for humans."""
    status_word = conventions.protocol_error_status(error.http_status)
    return orjson.dumps({"online_to_offline_inquiry": {"status": status_word}, "error": error.to_dict()})


# --- payment notifications (spec §4) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NotificationMessage:
    payment_code: str
    invoice_number: str
    amount: int
    channel: str
    transaction_status: str
    transaction_date: datetime | None
    original_request_id: str | None
    agent_id: str | None
    agent_store_id: str | None
    agent_trx_id: str | None

    def transaction_reference(self, request_id: str) -> str:
        return conventions.transaction_reference(
            self.original_request_id,
            (self.agent_id, self.agent_store_id, self.agent_trx_id),
            conventions.request_reference(request_id),
        )


# What a notification's texts may hold: they key a payment, so they must fit an index entry.
TEXT_MAX_LENGTH = 128


def _text_member(
    data: dict[str, Any], path: str, *, required: bool, max_length: int = TEXT_MAX_LENGTH
) -> str | None:
    value = member(data, path)
    if value is None or value == "":
        if required:
            raise InvalidField(path, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidField(path, "must be a string")
    if len(value) > max_length:
        raise InvalidField(path, f"must be at most {max_length} characters")
    if "\x00" in value:  # PostgreSQL text cannot hold it: refuse (the raw body is kept), never a 500
        raise InvalidField(path, "must not contain NUL")
    return value


# The identifiers a payment keeps (the others stay in the raw body only).
USED_IDENTIFIERS = ("AGENT_ID", "AGENT_STORE_ID", "AGENT_TRX_ID")


def _identifiers(data: dict[str, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    items = member(data, "online_to_offline_payment.identifier")
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get("name") in USED_IDENTIFIERS and item.get("value") is not None:
            name = item["name"]
            value = str(item["value"])
            if len(value) > TEXT_MAX_LENGTH:
                raise InvalidField(f"online_to_offline_payment.identifier.{name}", "is too long")
            if "\x00" in value:
                raise InvalidField(f"online_to_offline_payment.identifier.{name}", "must not contain NUL")
            found[name] = value
    return found


def _channel_fallback(data: dict[str, Any]) -> str:
    """What to record as the channel of a notification from a channel we do not know."""
    acquirer = member(data, "acquirer.id")
    if not isinstance(acquirer, str) or not acquirer or "\x00" in acquirer:
        return "UNKNOWN"
    return acquirer[:32]


def _rupiah(value: Any) -> int:
    """An amount of whole rupiah; 150000, 150000.0 and "150000" all mean the same money."""
    if value is None or value == "":
        raise InvalidField("order.amount", "is required")
    if isinstance(value, str):
        try:
            value = whole_number(value.strip(), maximum=MAX_RUPIAH)
        except TooLarge:
            raise InvalidField("order.amount", "is out of range") from None
        except ValueError:
            pass  # not digits: refused below as not a whole number
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidField("order.amount", "must be a whole number of rupiah")
    if abs(value) > MAX_RUPIAH:
        raise InvalidField("order.amount", "is out of range")
    return value


def _transaction_date(data: dict[str, Any]) -> datetime | None:
    """When the store says the customer paid; None when it says nothing we can read (money was taken:
    an unreadable date is never a reason to refuse the record)."""
    text = member(data, "transaction.date")
    if not isinstance(text, str) or not text:
        return None
    try:
        return parse_timestamp(text)
    except ValueError:
        return None


def parse_notification(body: bytes) -> NotificationMessage:
    """A payment notification. Lenient where money was already taken: an unknown channel or an
    unreadable transaction date is kept as far as it goes, never a reason to refuse the record."""
    data = load_object(body)
    amount = _rupiah(member(data, "order.amount"))
    channel = channels.channel_from_message(member(data, "channel.id"), member(data, "acquirer.id"))
    identifiers = _identifiers(data)
    return NotificationMessage(
        payment_code=payment_code_of(data),
        invoice_number=_text_member(
            data, "order.invoice_number", required=True, max_length=conventions.INVOICE_MAX_LENGTH
        )
        or "",
        amount=amount,
        channel=channel or _channel_fallback(data),
        transaction_status=(_text_member(data, "transaction.status", required=True) or "").upper(),
        transaction_date=_transaction_date(data),
        original_request_id=_text_member(data, "transaction.original_request_id", required=False),
        agent_id=identifiers.get("AGENT_ID"),
        agent_store_id=identifiers.get("AGENT_STORE_ID"),
        agent_trx_id=identifiers.get("AGENT_TRX_ID"),
    )


# --- Check Status answers (spec §8) ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckStatusMessage:
    """DOKU's answer about one invoice: its transaction status and, when paid, the transaction."""

    transaction_status: str  # upper case: PENDING, SUCCESS, EXPIRED, or whatever DOKU said
    amount: int | None
    channel: str | None
    transaction_date: datetime | None
    original_request_id: str | None
    agent_id: str | None
    agent_store_id: str | None
    agent_trx_id: str | None
    names_code: bool  # the answer says which payment code was paid (online_to_offline_info.payment_code)

    def transaction_reference(self, invoice_number: str) -> str:
        return conventions.transaction_reference(
            self.original_request_id,
            (self.agent_id, self.agent_store_id, self.agent_trx_id),
            conventions.check_status_reference(invoice_number),
        )


def parse_check_status(body: bytes, *, payment_code: str, invoice_number: str) -> CheckStatusMessage:
    """An answer shaped like a notification, some members possibly missing (spec §8).

    What is present must be about the invoice asked for; a paid answer must say how much was paid.
    Raises :class:`DipcError` (an unreadable answer, never read as "unpaid").
    """
    data = load_object(body)
    status = (_text_member(data, "transaction.status", required=True) or "").upper()
    answered_invoice = _text_member(
        data, "order.invoice_number", required=False, max_length=conventions.INVOICE_MAX_LENGTH
    )
    if answered_invoice is not None and answered_invoice != invoice_number:
        raise InvalidField("order.invoice_number", "is not the invoice asked about")
    names_code = member(data, PAYMENT_CODE_FIELD) not in (None, "")
    if names_code and payment_code_of(data) != payment_code:
        raise InvalidField(PAYMENT_CODE_FIELD, "is not the payment code of the invoice asked about")
    paid = status == conventions.CHECK_PAID
    amount = _rupiah(member(data, "order.amount")) if paid else None
    if amount is not None and amount <= 0:
        raise InvalidField("order.amount", "must be greater than 0")
    identifiers = _identifiers(data)
    return CheckStatusMessage(
        transaction_status=status,
        amount=amount,
        channel=channels.channel_from_message(member(data, "channel.id"), member(data, "acquirer.id")),
        transaction_date=_transaction_date(data),
        original_request_id=_text_member(data, "transaction.original_request_id", required=False),
        agent_id=identifiers.get("AGENT_ID"),
        agent_store_id=identifiers.get("AGENT_STORE_ID"),
        agent_trx_id=identifiers.get("AGENT_TRX_ID"),
        names_code=names_code,
    )


def render_notification_error(error: DipcError) -> bytes:
    """A protocol error on the notification path: our acknowledgement's shape plus ``error``."""
    status_word = conventions.protocol_error_status(error.http_status)
    return orjson.dumps({"status": status_word, "error": error.to_dict()})
