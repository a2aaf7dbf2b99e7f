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
        assert max(rows_read(plan[0]["Plan"])) <= store.EXACT_UP_TO + 1, name


async def test_the_sampled_counts_are_exact_when_small_and_an_estimate_when_large(pool):
    await fill(pool)
    counts, lag = await store.backlog(pool)
    assert counts["pending"] == PENDING
    assert abs(counts["gave_up"] - GAVE_UP) <= GAVE_UP * 0.1
    assert lag == 0.0  # every pending check is an hour away
