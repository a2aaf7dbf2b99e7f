"""Events: what the merchant's other systems learn, in the order it happened."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from server.core.documents import iso

MAX_WAIT_S = 60.0


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    type: str
    payment_code: str | None
    payload: dict[str, Any]
    created_at: datetime

    def document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "payment_code": self.payment_code,
            "payload": self.payload,
            "created_at": iso(self.created_at),
        }

    def document_json(self) -> str:
        return orjson.dumps(self.document()).decode()
