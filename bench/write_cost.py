"""What one request writes in PostgreSQL: WAL records by kind, WAL bytes, and rows by table.

    .venv/bin/python bench/write_cost.py                  # 20,000 codes: their inquiries, then payments
    .venv/bin/python bench/write_cost.py --requests 5000
    PYTHONPATH=/path/to/worktree .venv/bin/python bench/write_cost.py   # another revision's server

On this shared two-core machine a throughput moves by a tenth from one minute to the next; what a request
writes does not. A change that drops an index, a lock or a row shows here as the same figure in every
run, where a rate would need interleaved rounds to see it at all (bench/README.md, "What a request
writes").

On a durable embedded PostgreSQL and one `dipc serve`, in turn: one inquiry for each of N fresh one-shot
codes, the first-time notification paying each, N inquiries of 1,000 reusable codes (each mints an
invoice), and the notification paying each invoice. Each request is sent once, 32 at a time. Each phase
runs on a server of its own, stopped before the figures are read, so that what its background work
wrote (the events' sequencing passes) counts, and its sessions have flushed their table statistics.
``pg_waldump --stats=record`` reads the phase's WAL. Divided by the rows the phase added (inquiries or
payments), not by the answers.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import uuid
from dataclasses import dataclass

import aiohttp
import asyncpg
import notify
import run  # bench/run.py: this runs as a script, with bench/ on sys.path

from server.core.times import utcnow
from server.doku import auth
from server.doku.client import inquiry_body
from server.store import migrate

CONNECTIONS = 32
KINDS_SHOWN = 0.05  # WAL record kinds written less often than this per request are summed as "other"


@dataclass(frozen=True, slots=True)
class Mark:
    """Where a phase's WAL and table statistics stood, and the rows it counts, at one moment."""

    wal_directory: str
    lsn: str
    tables: dict[str, tuple[int, int, int, int]]  # inserted, updated, of which HOT, deleted
    rows: int  # of the phase's table, for its codes


async def _mark(dsn: str, table: str, prefix: str) -> Mark:
    conn = await asyncpg.connect(dsn)
    try:
        wal_directory = await conn.fetchval("SELECT current_setting('data_directory') || '/pg_wal'")
        lsn = await conn.fetchval("SELECT pg_current_wal_lsn()::text")
        tables = await conn.fetch(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd, n_tup_del FROM pg_stat_user_tables"
        )
        rows = await conn.fetchval(f"SELECT count(*) FROM {table} WHERE payment_code LIKE $1", prefix + "%")  # noqa: S608
    finally:
        await conn.close()
    return Mark(wal_directory, lsn, {row[0]: tuple(row[1:]) for row in tables}, rows)


async def _send_once(url: str, requests: list[tuple[dict[str, str], bytes]]) -> dict[int, int]:
    """POST each (headers, body) once, CONNECTIONS at a time; the count of each answer's status."""
    statuses: dict[int, int] = {}
    queue = list(reversed(requests))

    async def sender(session: aiohttp.ClientSession) -> None:
        while queue:
            headers, body = queue.pop()
            async with session.post(
                url, data=body, headers=headers | {"Content-Type": "application/json"}
            ) as answer:
                await answer.read()
                statuses[answer.status] = statuses.get(answer.status, 0) + 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONNECTIONS)) as session:
        await asyncio.gather(*(sender(session) for _ in range(CONNECTIONS)))
    return statuses


def inquiries(codes: list[str]) -> list[tuple[dict[str, str], bytes]]:
    now = utcnow()
    signed = []
    for code in codes:
        body = inquiry_body(code, when=now)
        headers = auth.signed_headers(run.CLIENT, request_id=str(uuid.uuid4()), target="/doku/inquiry",
                                      body=body, now=now, response=False)  # fmt: skip
        signed.append((headers, body))
    return signed


def waldump(before: Mark, after: Mark) -> tuple[dict[str, int], int, int]:
    """Records by kind, all records' bytes, and the full-page images' bytes between two marks."""
    command = [run.pg_binary("pg_waldump"), "-p", before.wal_directory, "-s", before.lsn, "-e", after.lsn]
    output = subprocess.run([*command, "--stats=record"], capture_output=True, text=True, check=True).stdout
    kinds: dict[str, int] = {}
    total = fpi = 0
    for line in output.splitlines():
        fields = line.split()
        if fields and fields[0] == "Total":
            numbers = [int(field) for field in fields[1:] if field.isdigit()]
            total, fpi = numbers[-1], numbers[-2]
        elif len(fields) > 2 and "/" in fields[0] and fields[1].isdigit() and int(fields[1]):
            kinds[fields[0]] = int(fields[1])
    return kinds, total, fpi


def report(name: str, before: Mark, after: Mark) -> list[str]:
    done = after.rows - before.rows
    kinds, total, fpi = waldump(before, after)
    lines = [
        f"### {name}: {done:,} requests",
        "",
        "| per request | |",
        "|---|---:|",
        f"| WAL records | {sum(kinds.values()) / done:.2f} |",
        f"| WAL bytes (of which full-page images) | {total / done:,.0f} ({fpi / done:,.0f}) |",
    ]
    other = 0
    for kind, count in sorted(kinds.items(), key=lambda item: -item[1]):
        if count / done >= KINDS_SHOWN:
            lines.append(f"| {kind} | {count / done:.2f} |")
        else:
            other += count
    lines.append(f"| other records | {other / done:.2f} |")
    for table, counts in sorted(after.tables.items()):
        moved = [now - then for now, then in zip(counts, before.tables.get(table, (0, 0, 0, 0)), strict=True)]
        if any(moved):
            inserted, updated, hot, deleted = (value / done for value in moved)
            lines.append(
                f"| rows of {table}: inserted, updated (HOT), deleted | "
                f"{inserted:.2f}, {updated:.2f} ({hot:.2f}), {deleted:.2f} |"
            )
    return [*lines, ""]


def phase(env: dict[str, str], dsn: str, name: str, table: str, prefix: str, target: str,
          requests: list[tuple[dict[str, str], bytes]]) -> list[str]:  # fmt: skip
    """One server, the requests sent once, the server stopped, the figures per row ``table`` gained."""
    before = asyncio.run(_mark(dsn, table, prefix))
    port = run.free_port()
    server = run.start_server(env, port, 1)
    try:
        statuses = asyncio.run(_send_once(f"http://127.0.0.1:{port}{target}", requests))
    finally:
        run.stop_server(server)
    after = asyncio.run(_mark(dsn, table, prefix))
    rows = after.rows - before.rows
    run.log(f"write cost: {name}: answers {statuses}, {rows:,} rows of {table}")
    if not rows or set(statuses) != {200}:
        sys.exit(f"bench: {name}: answers {statuses}, {rows} rows of {table}")
    return report(name, before, after)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=20_000, help="of each phase (default 20,000)")
    args = parser.parse_args()
    with run.scratch_database("dipc-write-cost-") as (workdir, _, dsn):
        env = run.dipc_env(dsn)
        asyncio.run(migrate.migrate_dsn(dsn))
        kinds = (("one-shot", run.NOTIFY_ONE_SHOT_PREFIX, args.requests, False),
                 ("reusable", run.NOTIFY_REUSABLE_PREFIX, 1000, True))  # fmt: skip
        for _, prefix, count, reusable in kinds:
            run.write_codes_csv(workdir / f"{prefix}.csv", count, prefix, reusable)
            run.import_codes(workdir / f"{prefix}.csv", env)
        run.settle(dsn)
        out = ["## What a request writes", ""]
        for label, prefix, count, _ in kinds:
            codes = [f"{prefix}{n % count:010d}" for n in range(args.requests)]
            out += phase(env, dsn, f"inquiries, {label} codes", "inquiries", prefix,
                         "/doku/inquiry", inquiries(codes))  # fmt: skip
            signed = notify.presign(run.CLIENT, notify.quoted_bills(dsn, prefix))
            out += phase(env, dsn, f"first-time notifications, {label} codes", "payments",
                         prefix, notify.TARGET, [(each.headers, each.body) for each in signed])  # fmt: skip
    print("\n".join(out))


if __name__ == "__main__":
    main()
