"""Demo data for ``dipc serve --demo``: a few codes that show every kind of answer.

Each start puts them back to their unpaid state, so the printed examples always work.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from server.config import DEMO_CLIENT_ID
from server.core.codes import NewCode
from server.core.documents import code_document
from server.store import codes as code_store
from server.store import outbox


def demo_codes(now: datetime) -> list[NewCode]:
    def code(payment_code: str, channel: str, invoice: str, amount: int, name: str, **extra) -> NewCode:
        fields = {
            "customer_email": "",
            "info1": "",
            "info2": "",
            "info3": "",
            "reusable": False,
            "expires_at": None,
        } | extra
        return NewCode(
            payment_code=payment_code,
            client_id=DEMO_CLIENT_ID,
            channel=channel,
            invoice_number=invoice,
            amount=amount,
            customer_name=name,
            **fields,
        )

    return [
        # The spec's example: the answer to this inquiry is byte for byte the spec's example response.
        code("8896512345678123", "ALFA", "INV-2026-000123", 150000, "Budi Santoso", info1="Toko Contoh"),
        code("3301200000000042", "INDOMARET", "INV-2026-000042", 75000, "Siti Rahayu", info1="Toko Contoh"),
        code("8896500000000777", "ALFA", "TOPUP-777", 50000, "Member 777", reusable=True, info1="Top-up"),
        code(
            "8896500000000999",
            "ALFA",
            "INV-2026-000999",
            20000,
            "Andi Wijaya",
            expires_at=now - timedelta(days=1),
        ),
    ]


DESCRIPTIONS = {
    "8896512345678123": "one-shot, Rp 150.000, Alfa (the spec's example)",
    "3301200000000042": "one-shot, Rp 75.000, Indomaret",
    "8896500000000777": "reusable top-up, Rp 50.000, a fresh invoice number per inquiry",
    "8896500000000999": "expired yesterday: answers billing_was_expired",
}


async def seed(pool: asyncpg.Pool, now: datetime) -> list[NewCode]:
    """Register the demo codes (or reset them), with the events a registration or a change makes."""
    codes = demo_codes(now)
    async with outbox.transaction(pool) as conn:
        for code, inserted in await code_store.upsert_fresh(conn, codes):
            kind = "code.created" if inserted else "code.updated"
            await outbox.append(conn, kind, code.payment_code, code_document(code))
    return codes
