"""What a resolution of an exception is (spec §9): the request, and the final record of it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class Resolution(StrEnum):
    REFUNDED = "refunded"  # the money went back to the customer
    ACCEPTED = "accepted"  # the merchant keeps the money and honours the payment
    DISMISSED = "dismissed"  # no money moved (a test, a duplicate record)


@dataclass(frozen=True, slots=True)
class ResolutionRequest:
    resolution: Resolution
    resolved_by: str
    note: str
    reference: str | None


@dataclass(frozen=True, slots=True)
class PaymentResolution:
    payment_code: str
    payment_id: int
    resolution: str
    resolved_by: str
    note: str
    reference: str | None
    code_paid: bool
    resolved_at: datetime
