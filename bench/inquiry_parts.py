"""What PostgreSQL spends on an inquiry, part by part: the ceiling's statement against ``dipc_inquire``.

    .venv/bin/python bench/inquiry_parts.py                  # 3 rounds, 8 connections, 1,500 calls each

On two cores the database's CPU is throughput too (bench/README.md, "Where an inquiry's CPU goes"). This
runs, on a durable embedded PostgreSQL with 100,000 one-shot codes and from 8 asyncpg connections in turn:

- the ceiling's one statement (bench/ceiling.py: read the code, write the audit row with an empty body);
- ``dipc_inquire`` as migrated;
- ``dipc_inquire`` without the reconciliation row (a copy, made here, without that block);
- the same copy also without the answer's body (no rendering, an empty ``response_body``).

Each with a fresh Request-Id per call, and prints the CPU time of the 8 backends per call (their own
/proc figures: WAL writer and checkpointer are left out) as a ratio to the ceiling's statement.
The copies exist only in this run's database: they say what a part costs, not that it could go.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import statistics
import sys
import time
import uuid

import asyncpg
import run  # bench/run.py: this runs as a script, with bench/ on sys.path
import uvloop
from ceiling import ONE_STATEMENT
from compare import cpu_seconds

from server.store import migrate


def _inquire(function: str) -> str:
    return f"SELECT * FROM {function}($1, $2, $3, $4, $5, ARRAY['ALFA'], now(), 120)"  # noqa: S608


STATEMENTS = {
    "ceiling's statement": ONE_STATEMENT,
    "dipc_inquire": _inquire("dipc_inquire"),
    "  without the reconciliation row": _inquire("bench_inquire_no_reconciliation"),
    "  and without the answer's body": _inquire("bench_inquire_no_body"),
}


async def make_copies(conn: asyncpg.Connection) -> None:
    """The two copies of dipc_inquire, each with a part cut out (asserted to be found)."""
    source = await conn.fetchval("SELECT pg_get_functiondef('dipc_inquire'::regproc)")
    reconciliation = re.compile(r"IF invoice_number IS NOT NULL THEN.*?END IF;", re.S)
    no_reconciliation = reconciliation.sub("", source, count=1)
    rendering = re.compile(r"SELECT answer\.http_status, answer\.body INTO .*?AS answer;", re.S)
    no_body = rendering.sub("http_status := 200; response_body := ''::bytea;", no_reconciliation, count=1)
    if not (source != no_reconciliation != no_body):
        sys.exit("bench: dipc_inquire has changed; update bench/inquiry_parts.py's cuts")
    copies = {"bench_inquire_no_reconciliation": no_reconciliation, "bench_inquire_no_body": no_body}
    for name, text in copies.items():
        await conn.execute(text.replace("public.dipc_inquire(", f"public.{name}(", 1))


async def measure(dsn: str, rounds: int, connections: int, calls: int, codes: int) -> None:
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    await make_copies(conns[0])
    backends = [await conn.fetchval("SELECT pg_backend_pid()") for conn in conns]
    rng = random.Random(7)
    per_call: dict[str, list[float]] = {name: [] for name in STATEMENTS}
    for round_ in range(rounds):
        for name, statement in STATEMENTS.items():

            async def caller(conn: asyncpg.Connection, statement: str = statement) -> None:
                for _ in range(calls):
                    code = f"{run.ONE_SHOT_PREFIX}{rng.randrange(codes):010d}"
                    request_id = str(uuid.uuid4())
                    await conn.fetchrow(statement, code, request_id, run.CLIENT.client_id, "ALFA", b"\x00")

            cpu_before, started = sum(map(cpu_seconds, backends)), time.perf_counter()
            await asyncio.gather(*(caller(conn) for conn in conns))
            elapsed, cpu = time.perf_counter() - started, sum(map(cpu_seconds, backends)) - cpu_before
            per_call[name].append(cpu / (connections * calls) * 1e6)
            print(f"round {round_ + 1} {name:34} {per_call[name][-1]:6.1f} us/call  "
                  f"{connections * calls / elapsed:7,.0f} calls/s", flush=True)  # fmt: skip
    baseline = statistics.median(per_call["ceiling's statement"])
    print(f"\nPostgreSQL backend CPU per call, medians of {rounds} rounds:")
    for name, values in per_call.items():
        median = statistics.median(values)
        print(f"  {name:34} {median:6.1f} us  {median / baseline:.2f} x the ceiling's statement")
    for conn in conns:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--calls", type=int, default=1500, help="per connection and statement, each round")
    parser.add_argument("--codes", type=int, default=100_000)
    args = parser.parse_args()
    with run.scratch_database("dipc-bench-parts-") as (workdir, _pg, dsn):
        asyncio.run(migrate.migrate_dsn(dsn))
        csv = workdir / "codes.csv"
        run.write_codes_csv(csv, args.codes, run.ONE_SHOT_PREFIX, False)
        run.import_codes(csv, run.dipc_env(dsn))
        uvloop.run(measure(dsn, args.rounds, args.connections, args.calls, args.codes))


if __name__ == "__main__":
    main()
