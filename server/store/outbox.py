"""The ``events`` outbox: appended in the transaction of the change it reports.

Event ids must become visible in id order, or a reader that keeps "the last id I saw" could step over an
event whose transaction commits late. So appending takes a transaction-scoped advisory lock first: id
allocation and commit are serialised across writers, held only from the append to the commit.
"""

from __future__ import annotations

from typing import Any

import asyncpg

from server.core.events import Event

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


COLUMNS = "id, type, payment_code, payload, created_at"


async def read_after(conn: asyncpg.Connection | asyncpg.Pool, after: int, limit: int) -> list[Event]:
    """Up to ``limit`` events with ids above ``after``, in id order."""
    rows = await conn.fetch(
        f"SELECT {COLUMNS} FROM events WHERE id > $1 ORDER BY id LIMIT $2",  # noqa: S608 - constant
        after,
        limit,
    )
    return [Event(**dict(row)) for row in rows]


async def last_id(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    return await conn.fetchval("SELECT coalesce(max(id), 0) FROM events")


async def read_ids(conn: asyncpg.Connection | asyncpg.Pool, ids: list[int]) -> list[Event]:
    rows = await conn.fetch(f"SELECT {COLUMNS} FROM events WHERE id = ANY($1::bigint[])", ids)  # noqa: S608
    return [Event(**dict(row)) for row in rows]
