"""Retention: delete what has served its purpose, in small batches so no lock is held for long.

Payments and payment codes are never deleted: they are the money. Nor is what is still to do: pending
webhook deliveries and the events they need, invoices still reconciled or given up.
"""

from __future__ import annotations

from datetime import timedelta

import asyncpg

from server.store import deliveries

BATCH = 10_000

# table -> (time column, extra condition): what may go once it is older than the retention.
PRUNABLE: dict[str, tuple[str, str]] = {
    # Replays need an inquiry for minutes, a reusable invoice's notification for hours.
    "inquiries": ("received_at", "true"),
    # The raw inbox is the audit trail of what DOKU said.
    "notifications": ("received_at", "true"),
    # Delivered webhooks only: pending and failed ones are work still to do.
    "webhook_deliveries": ("delivered_at", "status = 'delivered'"),
    # Events no undelivered webhook still needs; feed consumers that far behind start at the oldest.
    "events": (
        "created_at",
        "NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = events.id)",
    ),
    # Invoices whose reconciliation ended paid or expired. A pending one is work still to do; one given
    # up waits for a person (the backlog's metric and `dipc reconcile` show it). An inquiry that quotes
    # a pruned invoice again starts its reconciliation again, as it would the row's.
    "reconciliation": ("updated_at", "state IN ('paid', 'expired')"),
}


async def count(conn: asyncpg.Connection | asyncpg.Pool, table: str, older_than: timedelta) -> int:
    column, condition = PRUNABLE[table]
    return await conn.fetchval(
        f"SELECT count(*) FROM {table} WHERE {column} < now() - $1::interval AND {condition}",  # noqa: S608
        older_than,
    )


# An event is kept while a delivery of it remains; this is that condition after the deliveries older
# than $2 have been pruned (a dry run must count what the real run, deliveries first, deletes).
_EVENTS_AFTER_DELIVERIES = """
SELECT count(*) FROM events
 WHERE created_at < now() - $1::interval
   AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d
                    WHERE d.event_id = events.id
                      AND NOT (d.status = 'delivered' AND d.delivered_at < now() - $2::interval))
"""


async def count_all(conn: asyncpg.Connection | asyncpg.Pool, ages: dict[str, timedelta]) -> dict[str, int]:
    """What :func:`prune` of each table in ``ages``, in that order, would delete: a dry run."""
    counted: dict[str, int] = {}
    for table, older_than in ages.items():
        if table == "events" and "webhook_deliveries" in counted:
            counted[table] = await conn.fetchval(
                _EVENTS_AFTER_DELIVERIES, older_than, ages["webhook_deliveries"]
            )
        else:
            counted[table] = await count(conn, table, older_than)
    return counted


async def prune(conn: asyncpg.Connection | asyncpg.Pool, table: str, older_than: timedelta) -> int:
    """Delete rows of ``table`` older than ``older_than``; return how many went."""
    column, condition = PRUNABLE[table]
    if table == "webhook_deliveries":
        await deliveries.keep_positions(conn)  # they are what the forwarder continues from
    deleted = 0
    while True:
        status = await conn.execute(
            f"""
            DELETE FROM {table} WHERE ctid IN (
                SELECT ctid FROM {table}
                 WHERE {column} < now() - $1::interval AND {condition}
                 LIMIT {BATCH})
            """,  # noqa: S608 - table and condition come from PRUNABLE
            older_than,
        )
        batch = int(status.rsplit(" ", 1)[-1])
        deleted += batch
        if batch < BATCH:
            return deleted
