"""Counts the metrics sampler reads at any size of a table: exact up to :data:`EXACT_UP_TO`, and
PostgreSQL's estimate past it (planned, never run).

Every serving process samples every ``DIPC_METRICS_SAMPLE_S``, and some rows are never pruned (given-up
invoices, undelivered webhooks): a count that reads every such row grows without bound, at a million
rows about 0.1 s and three backends (bench/backlog_cost.py), up to the sampler's 1 s for all its
samples, past which it takes the database for down.
"""

from __future__ import annotations

import asyncpg
import orjson

EXACT_UP_TO = 100_000


def bounded(table: str, condition: str) -> str:
    """A scalar subquery: how many rows of ``table`` meet ``condition``, counting up to EXACT_UP_TO + 1
    (a bounded index scan where an index leads with the condition's column)."""
    limit = EXACT_UP_TO + 1
    return f"(SELECT count(*) FROM (SELECT FROM {table} WHERE {condition} LIMIT {limit}) bounded)"  # noqa: S608


async def past_exact(
    conn: asyncpg.Connection | asyncpg.Pool, table: str, condition: str, counted: int
) -> int:
    """``counted`` (of a :func:`bounded` count), or past EXACT_UP_TO, PostgreSQL's estimate of it."""
    if counted <= EXACT_UP_TO:
        return counted
    plan = orjson.loads(await conn.fetchval(f"EXPLAIN (FORMAT JSON) SELECT FROM {table} WHERE {condition}"))
    return max(int(plan[0]["Plan"]["Plan Rows"]), counted)
