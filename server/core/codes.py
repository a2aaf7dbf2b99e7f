"""The rules of payment codes: what a code is and which inquiry it answers.

Pure functions and frozen dataclasses; no I/O, so every rule is tested without HTTP or SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from server.core.outcomes import CodeStatus, InquiryOutcome
from server.doku import conventions

ANY_CHANNEL = "ANY"


class CodeRules(Protocol):
    """What the protocol adapter knows about valid codes (DOKU's BIN rules)."""

    def check(self, code: str) -> frozenset[str]:
        """Channels ``code`` may be paid at; raises ValueError saying which rule it breaks."""
        ...

    def channels_for(self, code: str) -> frozenset[str] | None:
        """Like :meth:`check`, but None when the code breaks the rules."""
        ...


@dataclass(frozen=True, slots=True)
class NewCode:
    """What a merchant registers; its field order is the column order of inserts and imports."""

    payment_code: str
    client_id: str
    channel: str
    invoice_number: str
    amount: int
    customer_name: str
    customer_email: str
    info1: str
    info2: str
    info3: str
    reusable: bool
    expires_at: datetime | None


NEW_CODE_COLUMNS: tuple[str, ...] = tuple(NewCode.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class PaymentCode(NewCode):
    """A registered code and its state."""

    status: CodeStatus
    paid_count: int
    invoice_seq: int
    created_at: datetime
    updated_at: datetime
    version: int

    def is_expired(self, now: datetime) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True, slots=True)
class Bill:
    """What an inquiry quotes: the bill the store shows the customer."""

    payment_code: str
    invoice_number: str
    amount: int
    customer_name: str
    customer_email: str
    info1: str
    info2: str
    info3: str


# --- inquiries ---------------------------------------------------------------------------------


def decide_inquiry(
    code: PaymentCode | None,
    *,
    client_id: str,
    channel: str,
    bin_channels: frozenset[str] | None,
    now: datetime,
) -> InquiryOutcome:
    """Whether ``code`` can be paid now at ``channel`` by ``client_id``'s customer, and if not, why.

    ``bin_channels`` is what the BIN rules allow for the code (None: no configured BIN fits it).
    """
    if bin_channels is None:
        return InquiryOutcome.UNKNOWN_BIN
    if code is None:
        return InquiryOutcome.NOT_FOUND
    if code.client_id != client_id:
        return InquiryOutcome.OTHER_CLIENT
    if code.status is CodeStatus.CANCELLED:
        return InquiryOutcome.CANCELLED
    if code.status is CodeStatus.PAID:
        return InquiryOutcome.ALREADY_PAID
    if code.is_expired(now):
        return InquiryOutcome.EXPIRED
    if channel not in bin_channels or code.channel not in (ANY_CHANNEL, channel):
        return InquiryOutcome.CHANNEL_MISMATCH
    return InquiryOutcome.SUCCESS


def bill_for(code: PaymentCode, *, invoice_seq: int | None = None) -> Bill:
    """The bill an inquiry quotes; a reusable code's carries the invoice number minted for it."""
    if code.reusable:
        if invoice_seq is None:
            raise ValueError("a reusable code's bill needs a minted invoice sequence")
        invoice_number = conventions.reusable_invoice_number(code.invoice_number, invoice_seq)
    else:
        invoice_number = code.invoice_number
    return Bill(
        payment_code=code.payment_code,
        invoice_number=invoice_number,
        amount=code.amount,
        customer_name=code.customer_name,
        customer_email=code.customer_email,
        info1=code.info1,
        info2=code.info2,
        info3=code.info3,
    )
