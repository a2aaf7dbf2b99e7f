"""Payments: what a store transaction is, and (with notifications) what DOKU's notice of one means."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


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
    recorded_at: datetime
