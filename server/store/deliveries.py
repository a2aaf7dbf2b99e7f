"""Webhook delivery state: one row per event and subscriber, shared by every dipc process.

A delivery is claimed with ``FOR UPDATE SKIP LOCKED`` and leased by pushing ``next_attempt_at`` past
the HTTP timeout, so no long transaction spans a request and a crashed process's lease simply expires.
Only the earliest undelivered delivery of each payment code is ever due: events of one code arrive in
order, and a delivery that failed for good holds the later ones of its code back until redelivered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from server.core.events import Event
from server.store import counts, outbox

COLUMNS = (
    "event_id, subscriber, payment_code, status, attempts, next_attempt_at, last_error, last_status, "
    "delivered_at, created_at"
)


@dataclass(frozen=True, slots=True)
class Delivery:
    event_id: int
    subscriber: str
    payment_code: str | None
    status: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    last_status: int | None
    delivered_at: datetime | None
    created_at: datetime


async def ensure_subscriber(conn: asyncpg.Connection | asyncpg.Pool, subscriber: str, url: str) -> None:
    """Register the subscriber; a new one starts after the newest event (the feed has the history)."""
    await conn.execute(
        """
        INSERT INTO webhook_subscribers (subscriber, url, started_after)
        VALUES ($1, $2, (SELECT coalesce(max(id), 0) FROM events))
        ON CONFLICT (subscriber) DO UPDATE SET url = EXCLUDED.url, updated_at = now()
         WHERE webhook_subscribers.url <> EXCLUDED.url
        """,
        subscriber,
        url,
    )


async def enqueue(conn: asyncpg.Connection | asyncpg.Pool, subscriber: str) -> int:
    """Create deliveries for events past the subscriber's stream; return how many.

    Event ids become visible in id order (see store/outbox.py), so "everything above the highest id
    enqueued" never skips an event that commits late.
    """
    status = await conn.execute(
        """
        INSERT INTO webhook_deliveries (event_id, subscriber, payment_code)
        SELECT e.id, $1, e.payment_code
          FROM events e
         WHERE e.id > greatest(
                 (SELECT started_after FROM webhook_subscribers WHERE subscriber = $1),
                 (SELECT coalesce(max(event_id), 0) FROM webhook_deliveries WHERE subscriber = $1))
         ORDER BY e.id
        ON CONFLICT DO NOTHING
        """,
        subscriber,
    )
    return int(status.rsplit(" ", 1)[-1])


async def keep_positions(conn: asyncpg.Connection | asyncpg.Pool) -> None:
    """Write each subscriber's position in the stream (the highest event it has a delivery of, where
    :func:`enqueue` continues) into its own row, which :func:`enqueue` also reads: run before delivered
    deliveries are deleted, or once none were left the next round would enqueue every event still kept,
    all sent a second time."""
    await conn.execute(
        """
        UPDATE webhook_subscribers s
           SET started_after = greatest(s.started_after,
                                        (SELECT max(d.event_id) FROM webhook_deliveries d
                                          WHERE d.subscriber = s.subscriber))
        """
    )


# A delivery ``d`` waits behind every earlier one of its code that is not delivered (ADR 5): only the
# first of each code's can be claimed, so only those say when the next claim can succeed. The check is
# asked of each delivery on its own, through webhook_deliveries_undelivered_idx, where one earlier entry
# answers it: OFFSET 0 keeps PostgreSQL from turning it into an anti-join, which it may hash on the code
# and then compare every delivery of a code with every other (a code's backlog of 3,000 while its
# receiver was down: 4.5 million comparisons, 253 ms, at every wake of the forwarder).
_FIRST_OF_ITS_CODE = """NOT EXISTS (
                    SELECT 1 FROM webhook_deliveries earlier
                     WHERE earlier.subscriber = d.subscriber
                       AND earlier.payment_code = d.payment_code
                       AND earlier.event_id < d.event_id
                       AND earlier.status <> 'delivered'
                    OFFSET 0)"""


async def claim(
    conn: asyncpg.Connection | asyncpg.Pool, subscriber: str, *, limit: int, lease_s: float
) -> list[tuple[Delivery, Event]]:
    """Take up to ``limit`` due deliveries (the earliest undelivered one of each code) on a lease."""
    rows = await conn.fetch(
        f"""
        WITH due AS (
            SELECT d.event_id
              FROM webhook_deliveries d
             WHERE d.subscriber = $1 AND d.status = 'pending' AND d.next_attempt_at <= now()
               AND {_FIRST_OF_ITS_CODE}
             ORDER BY d.event_id
             LIMIT $2
             FOR UPDATE SKIP LOCKED
        )
        UPDATE webhook_deliveries w
           SET attempts = w.attempts + 1, next_attempt_at = now() + make_interval(secs => $3)
          FROM due
         WHERE w.subscriber = $1 AND w.event_id = due.event_id
        RETURNING {", ".join(f"w.{column}" for column in COLUMNS.split(", "))}
        """,  # noqa: S608 - column list is a constant
        subscriber,
        limit,
        lease_s,
    )
    if not rows:
        return []
    events = {event.id: event for event in await outbox.read_ids(conn, [row["event_id"] for row in rows])}
    claimed = [Delivery(**dict(row)) for row in rows]
    return sorted(
        ((delivery, events[delivery.event_id]) for delivery in claimed), key=lambda pair: pair[0].event_id
    )


async def mark_delivered(
    conn: asyncpg.Connection | asyncpg.Pool, subscriber: str, event_id: int, status: int
) -> None:
    await conn.execute(
        """
        UPDATE webhook_deliveries
           SET status = 'delivered', delivered_at = now(), last_status = $3, last_error = NULL
         WHERE subscriber = $1 AND event_id = $2
        """,
        subscriber,
        event_id,
        status,
    )


async def release_lease(conn: asyncpg.Connection | asyncpg.Pool, subscriber: str, event_id: int) -> None:
    """Give a claimed delivery back at once (our process is stopping before it finished)."""
    await conn.execute(
        "UPDATE webhook_deliveries SET next_attempt_at = now() "
        "WHERE subscriber = $1 AND event_id = $2 AND status = 'pending'",
        subscriber,
        event_id,
    )


async def mark_attempt_failed(
    conn: asyncpg.Connection | asyncpg.Pool,
    subscriber: str,
    event_id: int,
    *,
    error: str,
    status: int | None,
    retry_in_s: float | None,
) -> None:
    """Record a failed attempt: retry after ``retry_in_s``, or (None) give up until redelivered."""
    await conn.execute(
        """
        UPDATE webhook_deliveries
           SET status = CASE WHEN $5::float8 IS NULL THEN 'failed' ELSE 'pending' END,
               next_attempt_at = CASE WHEN $5::float8 IS NULL THEN next_attempt_at
                                      ELSE now() + make_interval(secs => $5::float8) END,
               last_error = $3, last_status = $4
         WHERE subscriber = $1 AND event_id = $2
        """,
        subscriber,
        event_id,
        error[:500],
        status,
        retry_in_s,
    )


NEXT_DUE = f"""
    SELECT min(d.next_attempt_at) FROM webhook_deliveries d
     WHERE d.subscriber = $1 AND d.status = 'pending' AND {_FIRST_OF_ITS_CODE}
"""  # noqa: S608 - a constant


async def next_due(conn: asyncpg.Connection | asyncpg.Pool, subscriber: str) -> datetime | None:
    """When the next claim can succeed: the earliest attempt due among the first pending delivery of
    each code. The ones behind a delivery that waits out its backoff, or failed for good, were due when
    enqueued; counting them, the forwarder never slept while a receiver was down."""
    return await conn.fetchval(NEXT_DUE, subscriber)


async def list_page(
    conn: asyncpg.Connection | asyncpg.Pool, *, status: str | None, after: int | None, limit: int
) -> list[Delivery]:
    rows = await conn.fetch(
        f"""
        SELECT {COLUMNS} FROM webhook_deliveries
         WHERE ($1::text IS NULL OR status = $1) AND ($2::bigint IS NULL OR event_id > $2)
         ORDER BY event_id, subscriber
         LIMIT $3
        """,  # noqa: S608 - column list is a constant
        status,
        after,
        limit,
    )
    return [Delivery(**dict(row)) for row in rows]


async def redeliver(
    conn: asyncpg.Connection | asyncpg.Pool, event_ids: Sequence[int] | None, statuses: Sequence[str]
) -> list[tuple[int, str]]:
    """Make deliveries in ``statuses`` (failed, pending) due now; return (event id, former status) pairs.

    A failed delivery starts over (attempts 0); a pending one keeps its count and skips its backoff.
    One that is in flight at this moment may be sent twice: delivery is at least once.
    """
    rows = await conn.fetch(
        """
        WITH target AS (
            SELECT event_id, subscriber, status FROM webhook_deliveries
             WHERE status = ANY($2::text[]) AND ($1::bigint[] IS NULL OR event_id = ANY($1::bigint[]))
             FOR UPDATE
        )
        UPDATE webhook_deliveries w
           SET status = 'pending',
               attempts = CASE WHEN target.status = 'failed' THEN 0 ELSE w.attempts END,
               last_error = CASE WHEN target.status = 'failed' THEN NULL ELSE w.last_error END,
               next_attempt_at = now()
          FROM target
         WHERE w.event_id = target.event_id AND w.subscriber = target.subscriber
        RETURNING w.event_id, target.status AS was
        """,
        list(event_ids) if event_ids is not None else None,
        list(statuses),
    )
    return [(row["event_id"], row["was"]) for row in rows]


async def statuses_of(conn: asyncpg.Connection | asyncpg.Pool, event_ids: Sequence[int]) -> dict[int, str]:
    """The delivery status of each of these events that has a delivery (any subscriber)."""
    rows = await conn.fetch(
        "SELECT event_id, min(status) AS status FROM webhook_deliveries "
        "WHERE event_id = ANY($1::bigint[]) GROUP BY event_id",
        list(event_ids),
    )
    return {row["event_id"]: row["status"] for row in rows}


_STATUSES = ("pending", "failed", "delivered")
# What the sampler runs (counts.py says why the counts are bounded: pending and failed deliveries are
# never pruned, delivered ones only after 30 days). The oldest undelivered delivery is the first of each
# status in event order (deliveries are enqueued in event order): two index entries.
_COUNTS = ", ".join(
    counts.bounded("webhook_deliveries", f"status = '{status}'") + f" AS {status}" for status in _STATUSES
)
STATS = f"""
    SELECT {_COUNTS},
           coalesce(extract(epoch FROM now() - (
               SELECT min(first.created_at) FROM (
                   (SELECT created_at FROM webhook_deliveries
                     WHERE status = 'pending' ORDER BY event_id LIMIT 1)
                   UNION ALL
                   (SELECT created_at FROM webhook_deliveries
                     WHERE status = 'failed' ORDER BY event_id LIMIT 1)
               ) first)), 0) AS oldest
"""  # noqa: S608 - constants


async def stats(conn: asyncpg.Connection | asyncpg.Pool) -> tuple[dict[str, int], float]:
    """Deliveries per status (exact up to counts.EXACT_UP_TO, estimated past it), and the age in seconds
    of the oldest undelivered one (0 when none)."""
    row = await conn.fetchrow(STATS)
    by_status = {
        status: await counts.past_exact(conn, "webhook_deliveries", f"status = '{status}'", row[status])
        for status in _STATUSES
    }
    return by_status, max(float(row["oldest"]), 0.0)
