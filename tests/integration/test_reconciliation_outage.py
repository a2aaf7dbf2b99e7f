"""DOKU's API down (spec §8: "polite client", "never read an unknown as unpaid"): the reconciler meets a
DOKU whose name does not resolve, that refuses connections, or that never answers.

A call that got no answer says nothing about the invoice: the invoice keeps its place on the schedule
(no attempt counted, never given up for it) and is asked again later. And it says that DOKU is not
there: the reconciler stops calling as a whole (not once per due invoice), tells ops once, and resumes
by itself when DOKU answers again. The dead DOKUs here are real sockets on loopback; DOKU back is the
stand-in on the same port.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from server.app import make_app
from server.doku.client import DokuSimulator
from server.doku.standin import DokuStandIn, Scripted
from tests.conftest import CLIENT, CLIENT_ID, make_settings
from tests.integration.test_reconciliation import REUSABLE, eventually, register, samples

INVOICES = 8  # more than one process checks at once (DIPC_RECONCILE_CONCURRENCY, 4)
SCHEDULE = (1.0, 2.0, 3.0)
UNREACHABLE = 'dipc_reconciliation_checks_total{result="unreachable"}'
TIMEOUT = 'dipc_reconciliation_checks_total{result="timeout"}'
DOWN = "dipc_reconciliation_doku_unreachable"


@contextmanager
def dead_doku(kind: str) -> Iterator[str]:
    """A DOKU API URL that gets no answer: ``refused`` (bound, not listening), ``unresolvable`` (.invalid
    never resolves), ``hanging`` (listening, never accepting: the request is sent, no answer comes)."""
    if kind == "unresolvable":
        yield "https://doku.invalid"
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        if kind == "hanging":
            sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def outage_settings(url: str, **overrides):
    values = {
        "doku_api_url": url,
        "reconcile_schedule": SCHEDULE,
        "reconcile_rps": 50.0,  # the rate limit is not what holds the calls back here
        "doku_api_timeout_s": 0.5,
    }
    return make_settings(**(values | overrides))


async def counter(dipc, admin_headers) -> DokuSimulator:
    """A store counter quoting the bills of one reusable code (registered here)."""
    await register(
        dipc, admin_headers, payment_code=REUSABLE, invoice_number="TOPUP-777", reusable=True, amount=50000
    )
    return DokuSimulator(dipc.session, str(dipc.make_url("")), CLIENT)


async def quote(doku_sim: DokuSimulator) -> str:
    """A new invoice of the reusable code, quoted once: due 1 s from now."""
    return (await doku_sim.inquiry(REUSABLE)).json()["order"]["invoice_number"]


async def quote_invoices(dipc, admin_headers) -> list[str]:
    """``INVOICES`` invoices of one reusable code, each quoted once: all due 1 s from now."""
    doku_sim = await counter(dipc, admin_headers)
    return [await quote(doku_sim) for _ in range(INVOICES)]


async def invoices(pool) -> list:
    return await pool.fetch("SELECT * FROM reconciliation ORDER BY invoice_number")


async def invoice_row(pool, invoice_number: str):
    return await pool.fetchrow("SELECT * FROM reconciliation WHERE invoice_number = $1", invoice_number)


def unanswered(found: dict[str, float]) -> float:
    return found[UNREACHABLE] + found[TIMEOUT]


@pytest.mark.parametrize("kind", ["refused", "unresolvable", "hanging"])
async def test_while_doku_cannot_be_reached_no_invoice_loses_a_check_and_doku_is_not_hammered(
    aiohttp_client, pool, database_url, admin_headers, captured_log, kind
):
    with dead_doku(kind) as url:
        settings = outage_settings(url)
        dipc = await aiohttp_client(make_app(settings, database_url))
        before = await samples(dipc)
        await quote_invoices(dipc, admin_headers)

        async def doku_found_down():
            found = await samples(dipc)
            return found if unanswered(found) > unanswered(before) and found[DOWN] == 1 else None

        await eventually(doku_found_down)
        await asyncio.sleep(SCHEDULE[-1])  # the whole schedule passes while DOKU stays down
        after = await samples(dipc)

    rows = await invoices(pool)
    assert len(rows) == INVOICES
    for row in rows:  # nobody answered: no attempt, nothing given up, still waiting to be asked
        assert (row["state"], row["attempts"], row["next_check_at"] is not None) == ("pending", 0, True)
        assert row["last_result"] in (None, "unreachable", "timeout")
    assert after["dipc_reconciliation_gave_up_total"] == before["dipc_reconciliation_gave_up_total"]
    # Not one call per due invoice and slot (up to 24 here): the first calls in flight, then one call
    # at a time after each pause, for the whole process.
    calls = unanswered(after) - unanswered(before)
    assert 1 <= calls <= settings.reconcile_concurrency + 2, calls
    assert after[DOWN] == 1
    # One line when DOKU went away, not one per invoice.
    assert len(captured_log.events("reconcile.doku_unreachable")) == 1
    assert captured_log.events("reconcile.checked") == []


async def test_when_doku_answers_again_every_waiting_invoice_is_checked_on_its_own(
    aiohttp_client, aiohttp_server, pool, database_url, admin_headers, captured_log
):
    with dead_doku("refused") as url:
        dipc = await aiohttp_client(make_app(outage_settings(url), database_url))
        quoted = await quote_invoices(dipc, admin_headers)

        async def doku_found_down():
            return (await samples(dipc))[DOWN] == 1

        await eventually(doku_found_down)
    # DOKU is back, on the same address; meanwhile the first invoice was paid at the counter.
    doku = DokuStandIn({CLIENT_ID: CLIENT})
    await aiohttp_server(doku.app(), port=int(url.rsplit(":", 1)[1]))
    doku.pay(REUSABLE, quoted[0], 50000, agent_trx_id="1")

    async def all_answered():
        rows = await invoices(pool)
        return rows if all(row["last_result"] in ("paid", "pending") for row in rows) else None

    rows = await eventually(all_answered, seconds=30)
    by_invoice = {row["invoice_number"]: row for row in rows}
    assert by_invoice[quoted[0]]["state"] == "paid"
    for invoice in quoted[1:]:
        # One answered check each, the first that counts. When DOKU came back after the schedule's last
        # slot, that one answer is what the invoice is given up on: never on the unanswered calls.
        row = by_invoice[invoice]
        assert (row["attempts"], row["last_result"]) == (1, "pending")
        assert row["state"] in ("pending", "gave_up")
    assert (await samples(dipc))[DOWN] == 0
    assert len(captured_log.events("reconcile.doku_unreachable")) == 1
    [back] = captured_log.events("reconcile.doku_reachable")
    assert back["unanswered_calls"] >= 1
    assert doku.problems == []


async def test_doku_back_while_no_invoice_is_due_is_found_back(
    aiohttp_client, aiohttp_server, pool, database_url, admin_headers, captured_log
):
    """The invoice that found DOKU gone is paid at the counter meanwhile: nothing is due when DOKU comes
    back. Only a call can find it back, and none was made: dipc_reconciliation_doku_unreachable stayed 1
    (DipcCheckStatusUnreachable fired, and stayed) until some quote fell due, hours later at night."""
    with dead_doku("refused") as url:
        dipc = await aiohttp_client(make_app(outage_settings(url), database_url))
        doku_sim = await counter(dipc, admin_headers)
        invoice = await quote(doku_sim)

        async def doku_found_down():
            return (await samples(dipc))[DOWN] == 1

        await eventually(doku_found_down)
        paid = await doku_sim.notify(REUSABLE, invoice_number=invoice, amount=50000, original_request_id="1")
        assert paid.status == 200
    doku = DokuStandIn({CLIENT_ID: CLIENT})
    await aiohttp_server(doku.app(), port=int(url.rsplit(":", 1)[1]))

    async def doku_found_back():
        return (await samples(dipc))[DOWN] == 0

    await eventually(doku_found_back, seconds=20)
    assert (await invoice_row(pool, invoice))["state"] == "paid"
    [back] = captured_log.events("reconcile.doku_reachable")
    assert back["unanswered_calls"] >= 1
    assert doku.problems == []


async def test_doku_that_answers_and_then_goes_quiet_costs_no_invoice_a_slot(
    aiohttp_client, aiohttp_server, pool, database_url, admin_headers
):
    """The tests above start with DOKU gone. Here every invoice is answered once, then DOKU hangs for all
    of them through the rest of their schedule: the silences after an answer are an outage's too."""
    doku = DokuStandIn({CLIENT_ID: CLIENT})
    server = await aiohttp_server(doku.app())
    settings = outage_settings(str(server.make_url("")).rstrip("/"), reconcile_schedule=(1.0, 3.0, 5.0))
    dipc = await aiohttp_client(make_app(settings, database_url))
    before = await samples(dipc)
    quoted = await quote_invoices(dipc, admin_headers)

    async def all_answered_once():
        return all(row["attempts"] == 1 for row in await invoices(pool))

    await eventually(all_answered_once)
    for invoice in quoted:
        doku.script(invoice, *[Scripted(delay_s=5.0)] * 100)
    await asyncio.sleep(6)  # the slots at 3 s and 5 s pass in silence
    after = await samples(dipc)
    assert after[TIMEOUT] > before[TIMEOUT]
    rows = await invoices(pool)
    for row in rows:  # one call per pause while DOKU is quiet: not every invoice was asked again
        assert (row["state"], row["attempts"]) == ("pending", 1), dict(row)
        assert row["last_result"] in ("pending", "timeout")
    assert any(row["last_result"] == "timeout" for row in rows)
    assert after["dipc_reconciliation_gave_up_total"] == before["dipc_reconciliation_gave_up_total"]


async def test_an_invoice_doku_never_answers_in_time_is_asked_less_and_less_and_never_given_up(
    aiohttp_client, aiohttp_server, pool, database_url, admin_headers, captured_log
):
    """DOKU answers about every invoice but one, whose calls time out each time. A timeout is not an
    attempt (it may be an outage's), so the invoice keeps its schedule and is never given up on it; but it
    was asked again after every pause, for ever, each time pausing every reconciler and marking DOKU
    unreachable. Each timeout in a row now doubles the invoice's own wait (up to 15 minutes)."""
    doku = DokuStandIn({CLIENT_ID: CLIENT})
    server = await aiohttp_server(doku.app())
    # Its schedule runs out while it is being asked: a timeout never gives it up.
    settings = outage_settings(str(server.make_url("")).rstrip("/"), reconcile_schedule=(1.0, 5.0))
    dipc = await aiohttp_client(make_app(settings, database_url))
    doku_sim = await counter(dipc, admin_headers)
    silent = await quote(doku_sim)
    doku.script(silent, *[Scripted(delay_s=5.0)] * 100)

    async def a_busy_counter():  # other customers keep being quoted, and DOKU answers about them
        while True:
            await quote(doku_sim)
            await asyncio.sleep(0.3)

    async def four_timeouts():
        found = await invoice_row(pool, silent)
        return found if found["timeouts_in_a_row"] >= 4 else None

    busy = asyncio.create_task(a_busy_counter())
    try:
        row = await eventually(four_timeouts, seconds=45)
        assert not busy.done(), busy  # the other invoices were quoted and answered throughout
    finally:
        busy.cancel()
    asked = [seen.started for seen in doku.checks_of(silent)]
    assert len(asked) == 4, asked
    gaps = [later - earlier for earlier, later in itertools.pairwise(asked)]
    # The pause after each timeout is 4 s, and was all the invoice waited. After its third timeout in a
    # row it waits at least 2 s (the shortest pause) times 2 ** 2.
    assert gaps[2] >= 7.5, gaps
    assert (row["state"], row["attempts"], row["last_result"]) == ("pending", 0, "timeout"), dict(row)
    assert row["timeouts_in_a_row"] == 4, dict(row)
    # Its next wait, at least 2 s times 2 ** 3, is ahead of it, and ops were told once.
    assert (row["next_check_at"] - row["last_checked_at"]).total_seconds() >= 15, dict(row)
    [line] = captured_log.events("reconcile.invoice_unanswered")
    assert (line["invoice_number"], line["timeouts_in_a_row"], line["attempts"]) == (silent, 3, 0)
    assert any(seen.status == 200 for seen in doku.seen if seen.invoice_number != silent)
    # Paid at the counter after all: DOKU's notification closes it, and its count goes with it (were it
    # quoted again, it would start without).
    paid = await doku_sim.notify(REUSABLE, invoice_number=silent, amount=50000, agent_trx_id="7")
    assert paid.status == 200
    row = await invoice_row(pool, silent)
    assert (row["state"], row["settled_by"], row["timeouts_in_a_row"]) == ("paid", "notification", 0)
    assert doku.problems == []


async def test_a_timeout_recorded_after_the_invoice_was_paid_leaves_it_paid_without_a_count(
    aiohttp_client, aiohttp_server, pool, database_url, admin_headers
):
    """DOKU's notification pays the invoice while a call about it is waiting to time out: the timeout is
    written after the payment, and must not leave a count on the paid row (a quote that reopens a row
    settled by an anomaly would start from it)."""
    doku = DokuStandIn({CLIENT_ID: CLIENT})
    server = await aiohttp_server(doku.app())
    settings = outage_settings(str(server.make_url("")).rstrip("/"), doku_api_timeout_s=2.0)
    dipc = await aiohttp_client(make_app(settings, database_url))
    doku_sim = await counter(dipc, admin_headers)
    invoice = await quote(doku_sim)
    doku.script(invoice, Scripted(delay_s=10.0))

    async def asked():
        return doku.checks_of(invoice)

    await eventually(asked)
    paid = await doku_sim.notify(REUSABLE, invoice_number=invoice, amount=50000, agent_trx_id="9")
    assert paid.status == 200

    async def timed_out():
        found = await invoice_row(pool, invoice)
        return found if found["last_result"] == "timeout" else None

    row = await eventually(timed_out)
    assert (row["state"], row["settled_by"], row["timeouts_in_a_row"]) == ("paid", "notification", 0)
    assert len(doku.checks_of(invoice)) == 1
