"""A busy reusable code's payments against a new reusable code's, in one run: does a payment's cost grow
with its code's history?

    .venv/bin/python bench/history.py        # 200,000 codes paid once, and a code paid 5,000 times
    .venv/bin/python bench/history.py --history 10000 --payments 100 --rounds 5

The database is built as a merchant's ends up (with COPY, not through the API): ``--one-shot`` one-shot
codes, each quoted and paid once, and one reusable code quoted and paid ``--history`` times, each
payment with its quote and inbox row; then it is analyzed, as autovacuum would. The busy code is kept a
small share of the payments, as a merchant's busiest code is: one that is a larger share of them (a
tenth, here) is known as such to the statistics, and PostgreSQL keeps planning its statements for it.
One `dipc serve` serves it. In each round, a new reusable code (the baseline) and the busy one in turn
have ``--payments`` invoices quoted and paid, one after the other, as at one counter. Prints each
round's payments/s and PostgreSQL's CPU time per payment, then the medians and the busy code's as a
ratio to the new code's: 1.0 when a payment costs what it costs whatever its code's history. Durable
embedded PostgreSQL, as bench/run.py.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import aiohttp
import asyncpg
import run  # bench/run.py: this runs as a script, with bench/ on sys.path
from compare import cpu_meter

from server.doku.client import DokuSimulator
from server.store import migrate

ONE_SHOT_PREFIX = "889656"  # + 10 digits
BUSY = "8896570000000001"
NEW = "8896570000000002"
AMOUNT = 50_000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--one-shot", type=int, default=200_000, help="one-shot codes paid once")
    parser.add_argument("--history", type=int, default=5_000, help="the busy code's payments before")
    parser.add_argument("--payments", type=int, default=200, help="of each code per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ports", help="e.g. 18750-18799: where bench/run.py looks for free ports")
    args = parser.parse_args()
    if args.ports:
        first, last = (int(part) for part in args.ports.split("-"))
        run.PORTS = range(first, last + 1)
    with run.scratch_database("dipc-history-") as (_, pg, dsn):
        asyncio.run(build(dsn, args.one_shot, args.history))
        run.log(f"history: {args.one_shot:,} one-shot codes paid once, {BUSY} paid {args.history:,} times")
        port = run.free_port()
        server = run.start_server(run.dipc_env(dsn), port, 1)
        try:
            postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
            rounds = asyncio.run(pay_in_rounds(f"http://127.0.0.1:{port}", server.pid, postmaster, args))
        finally:
            run.stop_server(server)
    report(rounds, args)


async def build(dsn: str, one_shot: int, history: int) -> None:
    """The codes, quotes, inbox rows and payments of a merchant's tables, then ANALYZE."""
    await migrate.migrate_dsn(dsn)
    quoted = [(f"{ONE_SHOT_PREFIX}{n:010d}", f"INV-{n}", 10_000) for n in range(one_shot)]
    quoted += [(BUSY, f"TOPUP-{n}", AMOUNT) for n in range(1, history + 1)]
    client = run.CLIENT.client_id
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "payment_codes",
            records=[(code, client, "ALFA", invoice, amount, "Pelanggan", False, "paid", 1, 0)
                     for code, invoice, amount in quoted[:one_shot]]
            + [(BUSY, client, "ANY", "TOPUP", AMOUNT, "Pelanggan", True, "active", history, history),
               (NEW, client, "ANY", "TOPUP", AMOUNT, "Pelanggan", True, "active", 0, 0)],
            columns=["payment_code", "client_id", "channel", "invoice_number", "amount", "customer_name",
                     "reusable", "status", "paid_count", "invoice_seq"],
        )  # fmt: skip
        await conn.copy_records_to_table(
            "inquiries",
            records=[(code, f"quote-{n}", client, "ALFA", b"", "SUCCESS", invoice, amount, 200, b"{}")
                     for n, (code, invoice, amount) in enumerate(quoted)],
            columns=["payment_code", "request_id", "client_id", "channel", "body_sha256", "outcome",
                     "invoice_number", "amount", "http_status", "response_body"],
        )  # fmt: skip
        await conn.copy_records_to_table(  # inbox ids 1, 2, ... in this order
            "notifications",
            records=[(code, client, f"paid-{n}", "{}", b"{}", "SUCCESS", "normal")
                     for n, (code, _, _) in enumerate(quoted)],
            columns=["payment_code", "client_id", "request_id", "headers", "body", "transaction_status",
                     "outcome"],
        )  # fmt: skip
        await conn.copy_records_to_table(
            "payments",
            records=[(code, invoice, f"trx-{n}", "normal", amount, client, "ALFA", n)
                     for n, (code, invoice, amount) in enumerate(quoted, start=1)],
            columns=["payment_code", "invoice_number", "transaction_ref", "kind", "amount", "client_id",
                     "channel", "notification_id"],
        )  # fmt: skip
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def pay_in_rounds(base: str, pid: int, postmaster: int, args) -> dict[str, list[tuple[float, float]]]:
    """Each round, NEW then BUSY (then the other way round): (payments/s, PostgreSQL µs per payment)."""
    results: dict[str, list[tuple[float, float]]] = {NEW: [], BUSY: []}
    async with aiohttp.ClientSession() as session:
        doku = DokuSimulator(session, base, run.CLIENT)
        await pay(doku, NEW, 20)  # warm: the pool's connections, their plans
        await pay(doku, BUSY, 20)
        for round_ in range(args.rounds):
            for code in (NEW, BUSY) if round_ % 2 == 0 else (BUSY, NEW):
                cpu_since = cpu_meter(pid, postmaster)
                started = time.perf_counter()
                await pay(doku, code, args.payments)
                rate = args.payments / (time.perf_counter() - started)
                _, database_us = cpu_since(args.payments)
                results[code].append((rate, database_us))
                name = "busy" if code == BUSY else "new"
                run.log(f"history: round {round_ + 1}, {name} code: {rate:,.0f} payments/s,"
                        f" PostgreSQL {database_us:,.0f} µs per payment")  # fmt: skip
    return results


async def pay(doku: DokuSimulator, code: str, count: int) -> None:
    """``count`` invoices of ``code``, each quoted and then paid, one after the other."""
    for _ in range(count):
        quote = await doku.inquiry(code)
        if quote.status != 200:
            raise SystemExit(f"history: inquiry of {code} answered {quote.status}: {quote.body!r}")
        invoice = quote.json()["order"]["invoice_number"]
        paid = await doku.notify(
            code, invoice_number=invoice, amount=AMOUNT, original_request_id=quote.request_id
        )
        if paid.status != 200:
            raise SystemExit(f"history: notification for {code} answered {paid.status}: {paid.body!r}")


def report(rounds: dict[str, list[tuple[float, float]]], args) -> None:
    new_rate, new_db = (statistics.median(values) for values in zip(*rounds[NEW], strict=True))
    busy_rate, busy_db = (statistics.median(values) for values in zip(*rounds[BUSY], strict=True))
    print(f"\nmedians of {args.rounds} rounds of {args.payments} payments (each quoted, then paid):")
    for name, rate, database_us, ratio in (
        ("a new reusable code", new_rate, new_db, "baseline"),
        (f"a code paid {args.history:,} times", busy_rate, busy_db,
         f"{busy_rate / new_rate:.2f} x the rate, {busy_db / new_db:.2f} x the CPU"),
    ):  # fmt: skip
        print(f"  {name:30} {rate:7,.1f} payments/s  PostgreSQL {database_us:7,.0f} µs per payment  {ratio}")


if __name__ == "__main__":
    main()
