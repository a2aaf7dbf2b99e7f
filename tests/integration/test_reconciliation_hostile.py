"""A hostile or broken DOKU (spec §8): whatever Check Status answers, no wrong payment and no crash.

Found in review: identifiers PostgreSQL cannot store (NUL), and a redirect that hands the signed
request, and the answer we trust, to another server.
"""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from server.app import make_app
from server.doku.auth import Client
from server.doku.client import DokuSimulator, notification_body
from server.doku.standin import DokuStandIn, Scripted
from tests.conftest import CLIENT, CLIENT_ID, CODE, waiting_for_a_lock
from tests.integration.test_reconciliation import (
    INVOICE,
    eventually,
    payments,
    reconciling_settings,
    register,
    row,
)


@pytest.fixture
async def standin(aiohttp_server) -> tuple[DokuStandIn, TestServer]:
    doku = DokuStandIn({CLIENT_ID: CLIENT})
    server = await aiohttp_server(doku.app())
    yield doku, server
    assert doku.problems == [], "dipc sent a Check Status request DOKU would refuse"


def _with_nul_in(member: str) -> bytes:
    document = orjson.loads(notification_body(CODE, invoice_number=INVOICE, amount=150000))
    if member == "original_request_id":
        document["transaction"]["original_request_id"] = "ref\u0000-1"
    elif member == "agent_trx_id":
        document["online_to_offline_payment"]["identifier"].append(
            {"name": "AGENT_TRX_ID", "value": "12\u00004"}
        )
    elif member == "agent_id":
        document["online_to_offline_payment"]["identifier"][0]["value"] = "ALFA\u0000MART"
    return orjson.dumps(document)


@pytest.mark.parametrize("member", ["original_request_id", "agent_trx_id", "agent_id"])
async def test_a_paid_answer_with_a_nul_in_an_identifier_is_unreadable_not_a_crash(
    aiohttp_client, pool, database_url, standin, admin_headers, member, capsys
):
    doku, server = standin
    dipc = await aiohttp_client(make_app(reconciling_settings(server), database_url))
    doku_sim = DokuSimulator(dipc.session, str(dipc.make_url("")), CLIENT)
    await register(dipc, admin_headers)
    await doku_sim.inquiry(CODE)
    doku.script(INVOICE, Scripted(body=_with_nul_in(member)))
    doku.pay(CODE, INVOICE, 150000, original_request_id="the-real-one")  # the next, sane answer

    async def checked():
        invoice = await row(pool, CODE, INVOICE)
        return invoice if invoice["last_result"] is not None else None

    invoice = await eventually(checked)
    assert (invoice["last_result"], invoice["state"]) == ("unreadable", "pending")
    assert await payments(pool) == []
    # The next check on the schedule finds the payment, once.
    [payment] = await eventually(lambda: payments(pool))
    assert payment["transaction_ref"] == "the-real-one"
    logged = capsys.readouterr()
    assert "Traceback" not in logged.out + logged.err


@pytest.mark.parametrize("member", ["original_request_id", "agent_trx_id", "agent_id"])
async def test_a_notification_with_a_nul_in_an_identifier_is_rejected_and_kept(
    client, doku, admin_headers, pool, member, capsys
):
    """A signed notification whose transaction identity PostgreSQL cannot store as text: rejected (kept
    raw in the inbox), not a 500 that loses it."""
    await register(client, admin_headers)
    body = _with_nul_in(member)
    capsys.readouterr()
    reply = await doku.post(doku.notification_path, body)
    assert reply.status == 400, reply.body
    [stored] = await pool.fetch("SELECT outcome, body FROM notifications")
    assert (stored["outcome"], stored["body"]) == ("rejected", body)
    assert await payments(pool) == []
    logged = capsys.readouterr()
    assert "Traceback" not in logged.out + logged.err


@pytest.mark.parametrize("where", ["acquirer_id", "unused_identifier", "unused_member"])
async def test_a_nul_where_it_identifies_nothing_does_not_refuse_the_money(
    client, doku, admin_headers, pool, where, capsys
):
    """A NUL in a member dipc does not store as text (or only as a label) is no reason to refuse a paid
    notification: it is recorded, and the raw body is kept as sent."""
    await register(client, admin_headers)
    document = orjson.loads(notification_body(CODE, invoice_number=INVOICE, amount=150000))
    if where == "acquirer_id":
        document["channel"]["id"] = "SOMETHING_ELSE"
        document["acquirer"]["id"] = "AL\u0000FA"
    elif where == "unused_identifier":
        document["online_to_offline_payment"]["identifier"].append({"name": "RECEIPT", "value": "a\u0000"})
    else:
        document["customer"] = {"name": "Budi\u0000"}
    body = orjson.dumps(document)
    capsys.readouterr()
    reply = await doku.post(doku.notification_path, body)
    assert reply.status == 200, reply.body
    [payment] = await payments(pool)
    assert payment["kind"] == "normal"
    assert "\x00" not in payment["channel"]
    [stored] = await pool.fetch("SELECT outcome, body FROM notifications")
    assert (stored["outcome"], stored["body"]) == ("normal", body)
    logged = capsys.readouterr()
    assert "Traceback" not in logged.out + logged.err


async def quoted_and_checked(aiohttp_client, doku: TestServer, database_url, pool, admin_headers):
    """The invoice of the code quoted once by a dipc that reconciles with ``doku``, once checked."""
    dipc = await aiohttp_client(make_app(reconciling_settings(doku), database_url))
    await register(dipc, admin_headers)
    await DokuSimulator(dipc.session, str(dipc.make_url("")), CLIENT).inquiry(CODE)

    async def checked():
        invoice = await row(pool, CODE, INVOICE)
        return invoice if invoice["attempts"] >= 1 else None

    return await eventually(checked)


async def test_a_redirect_is_not_followed(aiohttp_client, aiohttp_server, pool, database_url, admin_headers):
    """A 3xx is an unknown answer: the signed request is not sent elsewhere, and what the other server
    says (here an unsigned SUCCESS) is never recorded as a payment."""
    elsewhere_calls = []

    async def elsewhere(request: web.Request) -> web.Response:
        elsewhere_calls.append(dict(request.headers))
        body = notification_body(CODE, invoice_number=INVOICE, amount=150000, original_request_id="x")
        return web.Response(body=body, content_type="application/json")

    other_app = web.Application()
    other_app.router.add_get("/{tail:.*}", elsewhere)
    other = await aiohttp_server(other_app)

    async def redirecting(request: web.Request) -> web.Response:
        raise web.HTTPFound(str(other.make_url(request.raw_path)))

    doku_app = web.Application()
    doku_app.router.add_get("/{tail:.*}", redirecting)
    doku = await aiohttp_server(doku_app)

    invoice = await quoted_and_checked(aiohttp_client, doku, database_url, pool, admin_headers)
    assert (invoice["state"], invoice["last_result"]) == ("pending", "http_error")
    assert await payments(pool) == []
    assert elsewhere_calls == []  # the signed headers went nowhere else


async def test_a_late_notification_after_an_answer_that_named_no_transaction_is_a_repeat(
    standin, aiohttp_client, pool, database_url, admin_headers
):
    """Check Status may leave out original_request_id and AGENT_TRX_ID (spec §8: "some members may be
    missing"); the payment is then `check-status:<invoice>`. DOKU's late notification of that same
    payment names its transaction: it is a repeat, not a conflict telling finance to refund money the
    customer paid once. Another amount is still recorded (it is other money)."""
    doku, server = standin
    dipc = await aiohttp_client(make_app(reconciling_settings(server), database_url))
    doku_sim = DokuSimulator(dipc.session, str(dipc.make_url("")), CLIENT)
    await register(dipc, admin_headers)
    quote = await doku_sim.inquiry(CODE)
    doku.pay(CODE, INVOICE, 150000)  # the answer names no transaction
    [recovered] = await eventually(lambda: payments(pool))
    assert (recovered["transaction_ref"], recovered["kind"]) == (f"check-status:{INVOICE}", "normal")

    late = await doku_sim.notify(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id=quote.request_id
    )
    assert late.status == 200
    assert [p["id"] for p in await payments(pool)] == [recovered["id"]]
    outcomes = await pool.fetch("SELECT outcome FROM notifications WHERE source = 'notification'")
    assert [r["outcome"] for r in outcomes] == ["repeat"]
    queue = await (await dipc.get("/v1/exceptions?state=open", headers=admin_headers)).json()
    assert queue["items"] == []

    other = await doku_sim.notify(CODE, invoice_number=INVOICE, amount=1000, original_request_id="another")
    assert other.status == 200
    assert [p["kind"] for p in await payments(pool)] == ["normal", "anomaly"]


async def test_a_check_by_hand_while_doku_is_backed_off_from_says_so_at_once(
    standin, aiohttp_client, pool, database_url, admin_headers
):
    """DOKU answered 429 or 5xx: every reconciler holds back for up to 5 minutes (the shared budget is
    emptied). A check by hand then answers at once that DOKU is being backed off from, and does not
    hold the request until the admin deadline to blame the database."""
    doku, server = standin
    dipc = await aiohttp_client(
        make_app(reconciling_settings(server, reconcile=False, admin_db_timeout_s=3.0), database_url)
    )
    doku_sim = DokuSimulator(dipc.session, str(dipc.make_url("")), CLIENT)
    await register(dipc, admin_headers)
    await doku_sim.inquiry(CODE)
    await pool.execute(
        "UPDATE reconciliation_rate SET tokens = -50 * 60, refilled_at = now()"
    )  # 60 s at 50/s

    started = time.perf_counter()
    check = await dipc.post(
        "/v1/reconciliation/check", json={"invoice_number": INVOICE}, headers=admin_headers
    )
    elapsed = time.perf_counter() - started
    assert check.status == 503
    error = (await check.json())["error"]
    assert error["code"] == "DOKU_BACKOFF"
    assert "database" not in error["message"]
    assert elapsed < 2.5 + 1.0  # the DOKU timeout (2 s in these tests) and a little
    assert doku.checks_of(INVOICE) == []
    # The invoice was handed back: the reconcilers (or the next check by hand) take it as usual.
    assert (await row(pool, CODE, INVOICE))["lease_until"] is None


async def test_a_quote_racing_the_payment_of_its_invoice_does_not_reopen_it(
    client, doku, admin_headers, pool
):
    """An inquiry reads the one-shot code as payable, its payment commits, then the inquiry records its
    quote: the invoice paid by a normal payment stays paid (not pending again without its payment, to be
    asked about again and perhaps given up on). An invoice settled only by an anomaly (another amount)
    is still reopened by a quote, as ADR 6 says: it can still be paid."""
    await register(client, admin_headers)
    assert (await doku.inquiry(CODE)).status == 200

    # The race, for real: dipc_inquire reads the code as payable, then waits to record its inquiry
    # behind an uncommitted twin with the same Request-Id; the payment commits meanwhile; the twin
    # rolls back, and the inquiry records its quote of an invoice that is paid by now.
    twin = await pool.acquire()
    try:
        await twin.execute("BEGIN")
        await twin.execute(
            "INSERT INTO inquiries (payment_code, request_id, client_id, channel, body_sha256, outcome,"
            " http_status, response_body) VALUES ($1, 'racing-1', $2, 'ALFA', '', 'NOT_FOUND', 404, '')",
            CODE,
            CLIENT_ID,
        )
        quote = asyncio.create_task(
            pool.fetchrow(
                "SELECT * FROM dipc_inquire($1, 'racing-1', $2, 'ALFA', '\\x00', '{ALFA}', now(), 120)",
                CODE,
                CLIENT_ID,
            )
        )
        await waiting_for_a_lock(pool, "dipc_inquire")
        paid = await doku.notify(CODE, invoice_number=INVOICE, amount=150000, original_request_id="the-one")
        assert paid.status == 200
        await twin.execute("ROLLBACK")
    finally:
        await pool.release(twin)
    quoted = await quote
    assert (quoted["outcome"], quoted["invoice_number"]) == ("SUCCESS", INVOICE)
    payment_id = await pool.fetchval("SELECT id FROM payments WHERE payment_code = $1", CODE)
    after = await row(pool, CODE, INVOICE)
    assert (after["state"], after["payment_id"], after["settled_by"]) == ("paid", payment_id, "notification")

    other = "8896512345678124"
    await register(client, admin_headers, payment_code=other, invoice_number="INV-ANOMALY")
    assert (await doku.inquiry(other)).status == 200
    short = await doku.notify(other, invoice_number="INV-ANOMALY", amount=1000, original_request_id="short")
    assert short.status == 200
    assert (await row(pool, other, "INV-ANOMALY"))["state"] == "paid"
    assert (await doku.inquiry(other)).status == 200  # still payable: quoted again
    assert (await row(pool, other, "INV-ANOMALY"))["state"] == "pending"


async def test_doku_refusing_our_signature_is_logged_as_a_warning(
    aiohttp_client, aiohttp_server, pool, database_url, admin_headers, captured_log
):
    """DOKU answers 401 to a Check Status signed with a key it does not hold (a rotated secret, another
    environment's): no invoice can be reconciled until someone fixes it, so each such check is a
    warning for the on-call, not one of the info lines of checks that went as expected."""
    doku = DokuStandIn({CLIENT_ID: Client(CLIENT_ID, (b"SK-a-key-dipc-does-not-hold",))})
    server = await aiohttp_server(doku.app())
    invoice = await quoted_and_checked(aiohttp_client, server, database_url, pool, admin_headers)
    assert (invoice["state"], invoice["last_result"]) == ("pending", "http_error")
    [line, *_] = captured_log.events("reconcile.checked")
    assert (line["level"], line["result"], line["http_status"]) == ("warning", "http_error", 401)
