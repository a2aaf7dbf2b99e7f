"""The sampler's reconciliation figures cost the same at any size of the table (server/ops/sampler.py).

Given-up invoices are never pruned (abandoned quotes end there), and every serving process samples
every ``DIPC_METRICS_SAMPLE_S``: a sample that reads every such row grows without bound (about 90 ms
and three backends per sample at a million rows, bench/backlog_cost.py), up to the sampler's 1 s, past
which it takes the database for down. What each statement reads is asked of PostgreSQL's own plans.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson

from server.store import counts, deliveries
from server.store import reconciliation as store

GAVE_UP = 150_000  # more than are counted exactly
PENDING = 1_000


async def fill(pool) -> None:
    await pool.execute(
        """
        INSERT INTO reconciliation (payment_code, invoice_number, client_id, channel, amount, state,
                                    first_quoted_at, attempts, next_check_at)
        SELECT lpad(n::text, 16, '8'), 'INV-' || n, 'MCH-0001', 'ALFA', 150000,
               CASE WHEN n <= $1::int THEN 'gave_up' ELSE 'pending' END, now() - interval '4 days', 6,
               CASE WHEN n > $1::int THEN now() + interval '1 hour' END
          FROM generate_series(1, $1::int + $2::int) AS n
        """,
        GAVE_UP,
        PENDING,
    )
    await pool.execute("ANALYZE reconciliation")  # as autovacuum would after such a change


def rows_read(node: dict[str, Any]) -> Iterator[int]:
    """Rows each scan of a plan (EXPLAIN ANALYZE, JSON) returned, in all its loops."""
    if "Scan" in node["Node Type"]:
        yield int(node["Actual Rows"] * node["Actual Loops"])
    for child in node.get("Plans", []):
        yield from rows_read(child)


async def test_the_reconciliation_sample_reads_a_bounded_number_of_rows_at_any_size(pool):
    await fill(pool)
    for name, sql in store.BACKLOG_QUERIES.items():
        plan = orjson.loads(await pool.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}"))
        assert max(rows_read(plan[0]["Plan"])) <= counts.EXACT_UP_TO + 1, name


async def test_the_sampled_counts_are_exact_when_small_and_an_estimate_when_large(pool):
    await fill(pool)
    counts, lag = await store.backlog(pool)
    assert counts["pending"] == PENDING
    assert abs(counts["gave_up"] - GAVE_UP) <= GAVE_UP * 0.1
    assert lag == 0.0  # every pending check is an hour away


async def test_the_webhook_sample_reads_a_bounded_number_of_rows_at_any_size(pool):
    """(Found by review.) Pending and failed webhook deliveries are never pruned (a receiver down for
    months keeps every event since as one), and the webhook figures counted every delivery."""
    await pool.execute(
        """
        INSERT INTO events (type, payment_code, payload, created_at)
        SELECT 'code.created', lpad(n::text, 16, '8'), '{}'::jsonb, now() - interval '2 hours'
          FROM generate_series(1, $1::int) AS n
        """,
        GAVE_UP,
    )
    await pool.execute(
        """
        INSERT INTO webhook_deliveries (event_id, subscriber, payment_code, status, attempts, created_at)
        SELECT id, 'default', payment_code, CASE WHEN id % 3 = 0 THEN 'failed' ELSE 'pending' END, 20,
               created_at + (id % 7) * interval '1 minute'
          FROM events
        """
    )
    await pool.execute("ANALYZE webhook_deliveries")
    plan = orjson.loads(await pool.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {deliveries.STATS}"))
    assert max(rows_read(plan[0]["Plan"])) <= counts.EXACT_UP_TO + 1
    by_status, oldest = await deliveries.stats(pool)
    assert abs(by_status["pending"] - GAVE_UP * 2 / 3) <= GAVE_UP * 0.1
    assert by_status["failed"] == GAVE_UP // 3
    assert by_status["delivered"] == 0
    first = await pool.fetchval(
        "SELECT extract(epoch FROM now() - created_at) FROM webhook_deliveries ORDER BY event_id LIMIT 1"
    )
    assert abs(oldest - float(first)) < 5  # the first event's delivery, two hours ago
