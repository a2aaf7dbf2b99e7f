"""The ``events`` outbox: appended in the transaction of the change it reports.

Event ids must become visible in id order, or a reader that keeps "the last id I saw" could step over an
event whose transaction commits late. So appending takes a transaction-scoped advisory lock first: id
allocation and commit are serialised across writers, held only from the append to the commit.
"""

from __future__ import annotations

from typing import Any

import asyncpg

EVENTS_LOCK_KEY = int.from_bytes(b"dipcevnt", "big") & 0x7FFF_FFFF_FFFF_FFFF
CHANNEL = "dipc_events"  # LISTEN/NOTIFY channel that wakes long-polling readers


async def append(
    conn: asyncpg.Connection, event_type: str, payment_code: str | None, payload: dict[str, Any]
) -> int:
    """Append one event inside the caller's transaction; return its id. Call it last, just before commit."""
    # One round trip: the lock is taken before the row (and so its id) exists; NOTIFY is delivered at
    # commit, never for a rolled-back transaction.
    event_id: int = await conn.fetchval(
        """
        WITH locked AS (SELECT pg_advisory_xact_lock($1))
        INSERT INTO events (type, payment_code, payload)
        SELECT $2, $3, $4 FROM locked
        RETURNING id, pg_notify($5, id::text)
        """,
        EVENTS_LOCK_KEY,
        event_type,
        payment_code,
        payload,
        CHANNEL,
    )
    return event_id
