"""What the background sampler's reconciliation queries cost on a large table: EXPLAIN ANALYZE of each.

    flock /tmp/bench.lock .venv/bin/python bench/backlog_cost.py --rows 1000000

Every serving process runs the sampler's queries every ``DIPC_METRICS_SAMPLE_S`` (5 s), all of them
within ``SAMPLE_TIMEOUT_S`` (1 s; past it the sampler takes the database for down). Given-up invoices
are never pruned: abandoned quotes end there after 72 h, so that state only grows. This starts a
durable embedded PostgreSQL, fills ``reconciliation`` with ``--rows`` invoices (most given up, three
days' worth pending, some paid and expired), vacuums and analyzes it as autovacuum would, and prints
each query's plan and execution time (the best of ``--repeat`` runs).
"""

from __future__ import annotations

import argparse
import asyncio
import time

import asyncpg
import run  # bench/run.py: this runs as a script, with bench/ on sys.path

from server.store import migrate
from server.store import reconciliation as store

FILL = """
INSERT INTO reconciliation (payment_code, invoice_number, client_id, channel, amount, state,
                            first_quoted_at, attempts, next_check_at, payment_id, settled_by)
SELECT lpad(n::text, 16, '8'), 'INV-' || n, 'MCH-BENCH-0001', 'ALFA', 150000, s.state,
       now() - make_interval(secs => ($1 - n) * 1.0),
       CASE s.state WHEN 'pending' THEN 2 ELSE 6 END,
       CASE s.state WHEN 'pending' THEN now() + make_interval(secs => n % 86400) END,
       CASE s.state WHEN 'paid' THEN n END,
       CASE s.state WHEN 'paid' THEN 'notification' END
  FROM generate_series(1, $1) AS n,
       LATERAL (SELECT CASE WHEN n > $1 * 0.9 THEN 'pending'
                            WHEN n % 10 = 0 THEN 'paid'
                            WHEN n % 10 = 1 THEN 'expired'
                            ELSE 'gave_up' END AS state) s
"""


async def explain(conn: asyncpg.Connection, sql: str, repeat: int) -> tuple[float, str]:
    """(best execution time in ms, the plan of that run)."""
    best: tuple[float, str] | None = None
    for _ in range(repeat):
        lines = [row[0] for row in await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}")]
        ms = float(next(line for line in lines if line.startswith("Execution Time")).split()[2])
        if best is None or ms < best[0]:
            best = (ms, "\n".join(lines))
    assert best is not None
    return best


async def main(rows: int, repeat: int, queries: dict[str, str]) -> None:
    with run.scratch_database("dipc-backlog-") as (_workdir, _pg, dsn):
        await migrate.migrate_dsn(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(FILL, rows)
            await conn.execute("VACUUM ANALYZE reconciliation")
            counts = await conn.fetch("SELECT state, count(*) FROM reconciliation GROUP BY 1 ORDER BY 1")
            print(f"reconciliation: {', '.join(f'{r[0]} {r[1]:,}' for r in counts)}")
            for name, sql in queries.items():
                ms, plan = await explain(conn, sql, repeat)
                print(f"\n### {name}: {ms:.1f} ms (best of {repeat})\n{plan}")
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                found = await store.backlog(conn)
                times.append((time.perf_counter() - started) * 1000)
            print(f"\n### store.backlog(), as sampled: {min(times):.1f} ms (best of {repeat}): {found}")
        finally:
            await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.repeat, store.BACKLOG_QUERIES))
