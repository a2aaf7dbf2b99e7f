"""What a payment code is: what a merchant registers, and a registered code with its state.

Which inquiry a code answers is decided in the database, by dipc_inquire
(schemas/migrations/0005_inquire.sql).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from server.core.outcomes import CodeStatus

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

# A code to register as the values of NEW_CODE_COLUMNS, in that order: what an import checks and COPYs.
CodeValues = tuple[Any, ...]


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
