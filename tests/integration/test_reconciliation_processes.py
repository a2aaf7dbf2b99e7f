"""Two `dipc serve` processes reconciling the same database at once: every lost payment is recovered
exactly once, no invoice is asked about by both at the same time, and DOKU's late notifications are
repeats. DOKU is the stand-in server, on loopback, in this test's process."""

from __future__ import annotations

import asyncio
import subprocess

import aiohttp
import orjson

from server.doku.client import DokuSimulator
from server.doku.standin import DokuStandIn, Scripted
from tests.conftest import CLIENT, CLIENT_ID, CODE, dipc_env
from tests.integration.test_cli import DIPC, free_port, wait_ready
from tests.integration.test_reconciliation import eventually

REUSABLE = "8896500000000777"
TOPUPS = 8


async def test_two_processes_recover_every_lost_payment_exactly_once(
    aiohttp_server, database_url, pool, tmp_path
):
    await pool.execute(
        "INSERT INTO payment_codes (payment_code, client_id, channel, invoice_number, amount, customer_name, "
        "reusable) VALUES ($1, $2, 'ALFA', 'INV-2026-000123', 150000, 'Budi', false),"
        "        ($3, $2, 'ALFA', 'TOPUP-777', 50000, 'Member', true)",
        CODE,
        CLIENT_ID,
        REUSABLE,
    )
    doku = DokuStandIn({CLIENT_ID: CLIENT})
    standin = await aiohttp_server(doku.app())
    ports = [free_port(), free_port()]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    servers = []
    for port, log in zip(ports, logs, strict=True):
        env = dipc_env(
            database_url,
            DIPC_PORT=str(port),
            DIPC_DOKU_API_URL=str(standin.make_url("")).rstrip("/"),
            DIPC_RECONCILE="on",
            DIPC_RECONCILE_SCHEDULE="1,2,3,4",
            DIPC_RECONCILE_RPS="100",
            DIPC_RECONCILE_CONCURRENCY="1",  # one check at a time each: the other process takes the next
        )
        servers.append(
            subprocess.Popen(  # noqa: ASYNC220 - starting is instant; the test then waits in threads
                [*DIPC, "serve"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
            )
        )
    try:
        for port, server in zip(ports, servers, strict=True):
            await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)
        async with aiohttp.ClientSession() as session:
            sims = [DokuSimulator(session, f"http://127.0.0.1:{port}", CLIENT) for port in ports]
            quotes = [await sims[0].inquiry(CODE)]
            quotes += [await sims[i % 2].inquiry(REUSABLE) for i in range(TOPUPS)]
            assert all(quote.status == 200 for quote in quotes)
            invoices = {}
            for quote in quotes:
                order = quote.json()["order"]
                code = quote.json()["online_to_offline_info"]["payment_code"]
                invoices[order["invoice_number"]] = (code, order["amount"], quote.request_id)
                # The customer pays at the counter; DOKU's notification is lost. DOKU answers a little slowly.
                doku.script(order["invoice_number"], Scripted(delay_s=0.2))
                doku.pay(code, order["invoice_number"], order["amount"], original_request_id=quote.request_id)

            async def all_recovered():
                count = await pool.fetchval("SELECT count(*) FROM payments")
                return count if count >= len(invoices) else None

            await eventually(all_recovered, seconds=40)
            await asyncio.sleep(1.5)  # any second check would have happened by now
            rows = await pool.fetch("SELECT * FROM payments ORDER BY invoice_number")
            assert sorted(row["invoice_number"] for row in rows) == sorted(
                invoices
            )  # one payment per invoice
            assert {(row["kind"], row["source"]) for row in rows} == {("normal", "check_status")}
            assert doku.overlapping() == []
            assert {invoice: len(doku.checks_of(invoice)) for invoice in invoices} == dict.fromkeys(
                invoices, 1
            )
            assert await pool.fetchval("SELECT count(*) FROM reconciliation WHERE state <> 'paid'") == 0

            # DOKU's late notifications, to either process: repeats, nothing new.
            for index, (invoice, (code, amount, reference)) in enumerate(invoices.items()):
                late = await sims[index % 2].notify(
                    code, invoice_number=invoice, amount=amount, original_request_id=reference
                )
                assert late.status == 200
            assert await pool.fetchval("SELECT count(*) FROM payments") == len(invoices)
            outcomes = await pool.fetch("SELECT outcome FROM notifications WHERE source = 'notification'")
            assert {row["outcome"] for row in outcomes} == {"repeat"}
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            assert server.wait(timeout=30) == 0
    recovered_by = []
    for log in logs:
        events = [orjson.loads(line) for line in log.read_bytes().splitlines() if line.startswith(b"{")]
        recovered_by.append(sum(event["event"] == "reconcile.recovered" for event in events))
        assert not [event for event in events if event.get("level") == "error"], "a process logged an error"
    assert sum(recovered_by) == len(invoices)
    assert all(recovered_by), f"both processes reconcile: {recovered_by}"
