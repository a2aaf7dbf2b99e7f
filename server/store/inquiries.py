"""The ``inquiries`` table: every authenticated inquiry and the exact bytes we answered it with.

Deciding, minting and recording an inquiry is one call of the server-side function ``dipc_inquire``
(schemas/migrations/0005_inquire.sql), where the rules and the answer's bytes live: one round trip.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import asyncpg


@dataclass(frozen=True, slots=True)
class RecordedInquiry:
    """An inquiry's answer as recorded: by this call, or earlier under the same Request-Id (replayed)."""

    replayed: bool
    outcome: str
    http_status: int
    response_body: bytes
    invoice_number: str | None
    body_sha256: bytes  # of the request that was answered


_INQUIRE = """
SELECT replayed, outcome, http_status, response_body, invoice_number, body_sha256
  FROM dipc_inquire($1, $2, $3, $4, $5, $6, $7, $8)
"""


async def inquire(
    conn: asyncpg.Connection | asyncpg.Pool,
    *,
    payment_code: str,
    request_id: str,
    client_id: str,
    channel: str,
    body_sha256: bytes,
    bin_channels: Iterable[str] | None,
    at: datetime,
    first_check_s: float,
) -> RecordedInquiry:
    """Answer and record an inquiry in one statement (see ``dipc_inquire`` for what it writes)."""
    row = await conn.fetchrow(
        _INQUIRE,
        payment_code,
        request_id,
        client_id,
        channel,
        body_sha256,
        None if bin_channels is None else list(bin_channels),
        at,
        first_check_s,
    )
    return RecordedInquiry(*row)
