"""DOKU message bodies: parse what DOKU sends, render what we answer (spec §3, §4).

Parsing is lenient: unknown members are ignored, and only what we need must be present and well formed.
Rendering is byte-exact and compact (orjson keeps member order), since signatures cover the bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from server.core.codes import Bill
from server.core.documents import load_object
from server.core.errors import DipcError, InvalidField
from server.core.outcomes import InquiryOutcome
from server.doku import channels, conventions

PAYMENT_CODE_FIELD = "online_to_offline_info.payment_code"


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


def render_inquiry(outcome: InquiryOutcome, payment_code: str, bill: Bill | None) -> tuple[int, bytes]:
    """HTTP status and exact body bytes of our answer to an inquiry."""
    status_word, http_status = conventions.INQUIRY_ANSWERS[outcome]
    if bill is None:
        document: dict[str, Any] = {
            "online_to_offline_info": {"payment_code": payment_code},
            "online_to_offline_inquiry": {"status": status_word},
        }
        return http_status, orjson.dumps(document)
    info: dict[str, str] = {"payment_code": bill.payment_code}
    for name in ("info1", "info2", "info3"):
        if text := getattr(bill, name):
            info[name] = text
    document = {
        "order": {"invoice_number": bill.invoice_number, "amount": bill.amount},
        "online_to_offline_info": info,
        "online_to_offline_inquiry": {"status": status_word},
        "customer": {"name": bill.customer_name, "email": bill.customer_email},
        "additional_info": {},
    }
    return http_status, orjson.dumps(document)


def render_inquiry_error(error: DipcError) -> bytes:
    """A protocol error on the inquiry path: DOKU's shape plus an ``error`` member for humans."""
    status_word = conventions.protocol_error_status(error.http_status)
    return orjson.dumps({"online_to_offline_inquiry": {"status": status_word}, "error": error.to_dict()})
