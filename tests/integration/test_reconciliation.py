"""Reconciliation (spec §8): the notification never came, and dipc asks DOKU's Check Status itself.

DOKU is a real stand-in server on loopback (server/doku/standin.py) that checks every header of every
request; dipc is the real app with its reconciler running on a shortened schedule.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from server.app import make_app
from server.core.times import utcnow
from server.doku import conventions
from server.doku.auth import signed_headers
from server.doku.client import DokuSimulator, Reply, notification_body
from server.doku.standin import DokuStandIn, Scripted
from tests.conftest import (
    CLIENT,
    CLIENT_ID,
    CODE,
    OTHER_CLIENT,
    OTHER_CLIENT_ID,
    code_fields,
    dipc_env,
    make_settings,
)
from tests.integration.test_cli import run
from tests.integration.test_notification import history_saying_repeat_for
from tests.integration.test_schemas import validate

INVOICE = "INV-2026-000123"
REUSABLE = "8896500000000777"


async def eventually(check: Callable[[], Awaitable[Any]], seconds: float = 20.0) -> Any:
    """The first truthy result of ``check``, polled until ``seconds`` pass (then the test fails)."""
    deadline = time.monotonic() + seconds
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {check.__name__}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def standin(aiohttp_server) -> tuple[DokuStandIn, TestServer]:
    doku = DokuStandIn({CLIENT_ID: CLIENT, OTHER_CLIENT_ID: OTHER_CLIENT})
    server = await aiohttp_server(doku.app())
    yield doku, server
    assert doku.problems == [], "dipc sent a Check Status request DOKU would refuse"


def reconciling_settings(server: TestServer, **overrides: Any):
    values = {
        "doku_api_url": str(server.make_url("")).rstrip("/"),
        "reconcile_schedule": (1.0, 2.0, 3.0),
        "reconcile_rps": 50.0,
        "doku_api_timeout_s": 2.0,
    }
    return make_settings(**(values | overrides))


@pytest.fixture
async def dipc(aiohttp_client, pool, database_url, standin) -> TestClient:
    """dipc with its reconciler on, asking the stand-in."""
    return await aiohttp_client(make_app(reconciling_settings(standin[1]), database_url))


@pytest.fixture
def doku_sim(dipc: TestClient) -> DokuSimulator:
    return DokuSimulator(dipc.session, str(dipc.make_url("")), CLIENT)


@pytest.fixture
def admin(admin_headers):
    return admin_headers


async def samples(dipc: TestClient) -> dict[str, float]:
    """This process's metric samples by name and labels (counters add up over the tests: compare deltas)."""
    text = await (await dipc.get("/metrics")).text()
    found = {}
    for line in text.splitlines():
        if line.startswith("dipc_"):
            name, _, value = line.rpartition(" ")
            found[name] = float(value)
    return found


async def assert_open_exception(
    dipc: TestClient, admin: dict[str, str], payment_id: int, kind: str, reason: str
):
    """A payment recovered from Check Status that is not normal waits in finance's queue."""
    queue = await (await dipc.get("/v1/exceptions?state=open", headers=admin)).json()
    [item] = [item for item in queue["items"] if item["payment_id"] == payment_id]
    assert (item["kind"], item["reason"], item["state"]) == (kind, reason, "open")


async def register(dipc: TestClient, admin: dict[str, str], **overrides: Any) -> None:
    response = await dipc.post("/v1/payment-codes", json=code_fields(**overrides), headers=admin)
    assert response.status == 201, await response.text()


async def payments(pool, code: str = CODE) -> list[Any]:
    return await pool.fetch("SELECT * FROM payments WHERE payment_code = $1 ORDER BY id", code)


async def row(pool, code: str, invoice: str) -> Any:
    return await pool.fetchrow(
        "SELECT * FROM reconciliation WHERE payment_code = $1 AND invoice_number = $2", code, invoice
    )


async def test_a_paid_invoice_whose_notification_never_came_is_recovered_once(
    dipc, doku_sim, standin, pool, admin
):
    doku, _ = standin
    before = await samples(dipc)
    assert 'dipc_reconciliation_recovered_total{kind="normal"}' in before  # exists before the first one
    await register(dipc, admin)
    quote = await doku_sim.inquiry(CODE)
    assert quote.status == 200
    doku.pay(CODE, INVOICE, 150000, original_request_id=quote.request_id)  # ...and no notification

    async def recovered():
        return await payments(pool)

    [payment] = await eventually(recovered)
    assert (payment["kind"], payment["source"], payment["amount"]) == ("normal", "check_status", 150000)
    assert payment["transaction_ref"] == quote.request_id
    code = await (await dipc.get(f"/v1/payment-codes/{CODE}", headers=admin)).json()
    assert (code["status"], code["paid_count"]) == ("paid", 1)
    invoice = await row(pool, CODE, INVOICE)
    assert (invoice["state"], invoice["settled_by"], invoice["payment_id"]) == (
        "paid",
        "check_status",
        payment["id"],
    )
    # The raw answer is kept as the payment's source, in the inbox.
    source = await pool.fetchrow("SELECT * FROM notifications WHERE id = $1", payment["notification_id"])
    assert source["source"] == "check_status"
    assert source["body"] == doku.paid[INVOICE]
    events = await (await dipc.get("/v1/events?after=0", headers=admin)).json()
    received = [event for event in events["items"] if event["type"] == "payment.received"]
    assert len(received) == 1
    assert received[0]["payload"]["source"] == "check_status"

    # DOKU's late notification of the same transaction is a repeat: nothing new.
    late = await doku_sim.notify(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id=quote.request_id
    )
    assert late.status == 200
    assert len(await payments(pool)) == 1
    outcome = await pool.fetchval("SELECT outcome FROM notifications WHERE source = 'notification'")
    assert outcome == "repeat"
    assert len(doku.checks_of(INVOICE)) == 1  # paid: never asked about again
    after = await samples(dipc)
    for sample in (
        'dipc_reconciliation_recovered_total{kind="normal"}',
        'dipc_reconciliation_checks_total{result="paid"}',
    ):
        assert after[sample] - before[sample] == 1


async def test_a_payment_doku_named_by_its_store_transaction_is_repeated_by_its_late_notification(
    dipc, doku_sim, standin, pool, admin
):
    """(Found by a finance review.) DOKU's Check Status answer named the transaction by its store's
    AGENT_TRX_ID only (no original_request_id: spec §8, some members may be missing), so the payment's
    reference was agent:ALFAMART/TZ01/1246. DOKU's late notification of the same transaction carries its
    original_request_id too, a reference of its own: it became a conflict, and the alert told finance to
    refund a customer who had paid once. It repeats the payment now, matched with it as an unnamed
    answer's is (migration 0018): another transaction that shows the same store transaction again is not
    taken for it, and stays a conflict."""
    doku, _ = standin
    await register(dipc, admin)
    quote = await doku_sim.inquiry(CODE)
    doku.pay(CODE, INVOICE, 150000, agent_trx_id="1246")  # ...and no notification

    [payment] = await eventually(lambda: payments(pool))
    assert (payment["kind"], payment["transaction_ref"]) == ("normal", "agent:ALFAMART/TZ01/1246")
    late = await doku_sim.notify(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id=quote.request_id, agent_trx_id="1246"
    )
    assert late.status == 200
    assert [row["id"] for row in await payments(pool)] == [payment["id"]]
    outcome = await pool.fetchval("SELECT outcome FROM notifications WHERE source = 'notification'")
    assert outcome == "repeat"
    assert await pool.fetchval("SELECT notified_ref FROM payments") == quote.request_id
    # Its retry repeats it still; another transaction naming the same store transaction is a conflict.
    again = await doku_sim.notify(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id=quote.request_id, agent_trx_id="1246"
    )
    assert again.status == 200
    other = await doku_sim.notify(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id="another", agent_trx_id="1246"
    )
    assert other.status == 200
    kinds = [(row["kind"], row["transaction_ref"]) for row in await payments(pool)]
    assert kinds == [("normal", "agent:ALFAMART/TZ01/1246"), ("conflict", "another")]


async def answer_after_notification(doku_sim, standin, pool, answer: bytes, notification: bytes) -> str:
    """DOKU answers the invoice's Check Status with ``answer`` (held until ``notification`` is recorded,
    as when the notification lands while DOKU is answering); the answer's outcome once recorded."""
    doku, _ = standin
    doku.paid[INVOICE] = answer
    answered = asyncio.Event()
    doku.script(INVOICE, Scripted(hold=answered))

    async def asked():
        return doku.checks_of(INVOICE)

    await eventually(asked)
    notified = await doku_sim.post(doku_sim.notification_path, notification)
    assert notified.status == 200
    answered.set()

    async def checked():
        return await pool.fetchval("SELECT outcome FROM notifications WHERE source = 'check_status'")

    return await eventually(checked)


async def test_a_store_transaction_answer_recorded_after_its_own_notification_repeats_it(
    dipc, doku_sim, standin, pool, admin
):
    """(Left open by the review of migration 0026.) The other order: the notification lands while DOKU
    is answering the invoice's Check Status, whose answer names the transaction by its store's
    AGENT_TRX_ID only. Recorded after the notification, the answer found the invoice paid under another
    reference, and became an ALREADY_PAID conflict: the alert told finance to refund a customer who had
    paid once. It repeats the notification's payment now. A notification is its own transaction: a later
    notice of the same store transaction under another original_request_id stays a conflict."""
    await register(dipc, admin)
    quote = await doku_sim.inquiry(CODE)
    answer = notification_body(CODE, invoice_number=INVOICE, amount=150000, agent_trx_id="1246")
    notification = notification_body(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id=quote.request_id, agent_trx_id="1246"
    )
    assert await answer_after_notification(doku_sim, standin, pool, answer, notification) == "repeat"
    [payment] = await payments(pool)
    assert (payment["kind"], payment["transaction_ref"]) == ("normal", quote.request_id)
    assert await pool.fetchval("SELECT count(*) FROM payment_resolutions") == 0
    assert (await row(pool, CODE, INVOICE))["state"] == "paid"
    other = await doku_sim.notify(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id="another", agent_trx_id="1246"
    )
    assert other.status == 200
    kinds = [(row["kind"], row["transaction_ref"]) for row in await payments(pool)]
    assert kinds == [("normal", quote.request_id), ("conflict", "another")]


async def test_an_answer_of_another_store_whose_reference_reads_alike_is_not_a_repeat(
    dipc, doku_sim, standin, pool, admin
):
    """(Found by a review of migration 0027.) A reference joins the agent, store and transaction ids with
    "/" and escapes nothing: store TZ01/7 with transaction 1246, and store TZ01 with transaction 7/1246,
    are two store transactions with one text. 0027 matched the notification's payment by that text, and
    the answer of the other store's transaction was dropped as a repeat: money taken and in no payment.
    It is a conflict: only ids without "/" are matched by their text."""
    await register(dipc, admin)
    quote = await doku_sim.inquiry(CODE)
    answer = notification_body(
        CODE, invoice_number=INVOICE, amount=150000, agent_trx_id="1246", store_id="TZ01/7"
    )
    notification = notification_body(
        CODE,
        invoice_number=INVOICE,
        amount=150000,
        original_request_id=quote.request_id,
        agent_trx_id="7/1246",
    )
    assert await answer_after_notification(doku_sim, standin, pool, answer, notification) == "conflict"
    kinds = [(row["kind"], row["transaction_ref"]) for row in await payments(pool)]
    assert kinds == [("normal", quote.request_id), ("conflict", "agent:ALFAMART/TZ01/7/1246")]


def without_agent_and_store(body: bytes) -> bytes:
    """``body`` with its AGENT_ID and AGENT_STORE_ID left out (spec §8: some members may be missing)."""
    document = orjson.loads(body)
    identifiers = document["online_to_offline_payment"]["identifier"]
    document["online_to_offline_payment"]["identifier"] = [
        each for each in identifiers if each["name"] == "AGENT_TRX_ID"
    ]
    return orjson.dumps(document)


async def paid_by_an_answer_naming_the_number_alone(dipc, doku_sim, standin, pool, admin) -> Reply:
    """The code registered and quoted (the quote is returned), then paid: DOKU's Check Status answer
    names the transaction by AGENT_TRX_ID alone (agent://1246), and the reconciler records it."""
    doku, _ = standin
    await register(dipc, admin)
    quote = await doku_sim.inquiry(CODE)
    doku.paid[INVOICE] = without_agent_and_store(
        notification_body(CODE, invoice_number=INVOICE, amount=150000, agent_trx_id="1246")
    )
    [payment] = await eventually(lambda: payments(pool))
    assert (payment["kind"], payment["transaction_ref"]) == ("normal", "agent://1246")
    return quote


@pytest.mark.parametrize(("answered_trx", "outcome"), [("1246", "repeat"), ("1247", "conflict")])
async def test_an_answer_naming_the_store_transaction_number_alone_repeats_its_notification(
    dipc, doku_sim, standin, pool, admin, answered_trx, outcome
):
    """(Found by a review of migration 0027.) DOKU's answer may leave out AGENT_ID and AGENT_STORE_ID as
    well, and name the transaction by AGENT_TRX_ID alone (agent://1246). Recorded after the notification
    of ALFAMART/TZ01/1246, it was an ALREADY_PAID conflict. A store transaction is the same when the two
    agree on every id both give, the transaction's number always among them. Another number is another
    transaction, a conflict."""
    await register(dipc, admin)
    quote = await doku_sim.inquiry(CODE)
    answer = without_agent_and_store(
        notification_body(CODE, invoice_number=INVOICE, amount=150000, agent_trx_id=answered_trx)
    )
    notification = notification_body(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id=quote.request_id, agent_trx_id="1246"
    )
    assert await answer_after_notification(doku_sim, standin, pool, answer, notification) == outcome
    kinds = [row["kind"] for row in await payments(pool)]
    assert kinds == (["normal"] if outcome == "repeat" else ["normal", "conflict"])


async def test_a_notification_repeats_an_answer_that_named_the_store_transaction_number_alone(
    dipc, doku_sim, standin, pool, admin
):
    """(Found by a review of migration 0027.) The order of 0026: DOKU's answer, recorded first, named the
    transaction by AGENT_TRX_ID alone (agent://1246); its late notification names ALFAMART/TZ01/1246
    and its original_request_id. It was an ALREADY_PAID conflict; it repeats the answer's payment now,
    matched with it once: another transaction of that store number is a conflict."""
    quote = await paid_by_an_answer_naming_the_number_alone(dipc, doku_sim, standin, pool, admin)
    late = await doku_sim.notify(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id=quote.request_id, agent_trx_id="1246"
    )
    assert late.status == 200
    assert await pool.fetchval("SELECT outcome FROM notifications WHERE source = 'notification'") == "repeat"
    assert await pool.fetchval("SELECT notified_ref FROM payments") == quote.request_id
    other = await doku_sim.notify(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id="another", agent_trx_id="1246"
    )
    assert other.status == 200
    kinds = [(row["kind"], row["transaction_ref"]) for row in await payments(pool)]
    assert kinds == [("normal", "agent://1246"), ("conflict", "another")]


async def test_a_notification_without_its_request_id_repeats_an_answer_named_by_fewer_ids(
    dipc, doku_sim, standin, pool, admin
):
    """(Found by the second review of migration 0030.) DOKU's answer, recorded first, named the transaction
    by AGENT_TRX_ID alone (agent://1246); its late notification has no original_request_id either (spec
    §4 rule 2 allows it), so its reference is its store transaction's, ALFAMART/TZ01/1246. With an
    original_request_id it repeated the answer's payment (migration 0029); without one it was an
    ALREADY_PAID conflict, because the rules told an answer from a notification by that very reference.
    It repeats the payment now, matched with it once: its retry repeats it, and another transaction of
    that store number is a conflict."""
    await paid_by_an_answer_naming_the_number_alone(dipc, doku_sim, standin, pool, admin)
    for _ in range(2):  # the notification, and DOKU's retry of it
        late = await doku_sim.notify(CODE, invoice_number=INVOICE, amount=150000, agent_trx_id="1246")
        assert late.status == 200
    outcomes = await pool.fetch("SELECT outcome FROM notifications WHERE source = 'notification' ORDER BY id")
    assert [row["outcome"] for row in outcomes] == ["repeat", "repeat"]
    assert await pool.fetchval("SELECT notified_ref FROM payments") == "agent:ALFAMART/TZ01/1246"
    other = await doku_sim.notify(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id="another", agent_trx_id="1246"
    )
    assert other.status == 200
    kinds = [(row["kind"], row["transaction_ref"]) for row in await payments(pool)]
    assert kinds == [("normal", "agent://1246"), ("conflict", "another")]


async def test_a_dipc_from_before_0029_reads_a_store_transaction_by_its_text(
    dipc, doku_sim, standin, pool, admin
):
    """(Found by a review of migration 0029.) While a deploy replaces the workers, those from before 0029
    read the history with dipc_payment_history and match a repeat in their own statement by the
    reference's text. 0029 gave that function its rules by the ids: a notification of an answer named by
    fewer ids was a repeat to the history and none to the old statement, and the old worker decided it
    again about 6,000 times in 5 s, taking the code's row lock each time, then answered 503. The function
    keeps the rules by the text for them (the old worker records a conflict, as it did before 0029), and
    dipc reads by the ids through dipc_payment_history_by_ids."""
    await paid_by_an_answer_naming_the_number_alone(dipc, doku_sim, standin, pool, admin)
    notice = (CODE, INVOICE, "R1", 150000, f"check-status:{INVOICE}", "agent:ALFAMART/TZ01/1246")
    for function, repeat in (("dipc_payment_history", False), ("dipc_payment_history_by_ids", True)):
        row = await pool.fetchrow(f"SELECT * FROM {function}($1, $2, $3, $4, $5, $6)", *notice)  # noqa: S608
        assert row["repeat"] is repeat, function


async def test_a_dipc_from_before_0030_never_reads_a_store_transaction_by_an_ambiguous_text(
    dipc, doku_sim, standin, pool, admin
):
    """(Found by a review of migration 0030.) The history by the text that 0030 keeps for workers from
    before 0029 matched an answer's payment named by its store transaction only by the text alone, as
    0026 did: with a "/" in an id, the text of store TZ01/7 with transaction 1246 is that of store TZ01
    with transaction 7/1246. Workers of 0027 and 0028 then took the other store's notification for a
    repeat (money in no payment), and a worker of 0029, whose own statement reads only ids without "/",
    decided it again until its deadline. Such a text matches nothing now, in either function."""
    doku, _ = standin
    await register(dipc, admin)
    await doku_sim.inquiry(CODE)
    doku.paid[INVOICE] = notification_body(
        CODE, invoice_number=INVOICE, amount=150000, agent_trx_id="1246", store_id="TZ01/7"
    )
    [payment] = await eventually(lambda: payments(pool))
    assert payment["transaction_ref"] == "agent:ALFAMART/TZ01/7/1246"
    notice = (CODE, INVOICE, "R1", 150000, f"check-status:{INVOICE}", "agent:ALFAMART/TZ01/7/1246")
    for function in ("dipc_payment_history", "dipc_payment_history_by_ids"):
        row = await pool.fetchrow(f"SELECT * FROM {function}($1, $2, $3, $4, $5, $6)", *notice)  # noqa: S608
        assert row["repeat"] is False, function


async def test_an_answer_that_cannot_be_recorded_now_is_a_warning_not_a_traceback(
    dipc, doku_sim, standin, pool, admin, capsys
):
    """(Found by a review of fe530d8.) A notice decided again too often is refused (Unavailable). From the
    reconciler, that reached its catch-all as reconcile.check_failed with a traceback. It is one warning
    line now, and the invoice is checked again when its lease runs out."""
    doku, _ = standin
    await register(dipc, admin)
    await doku_sim.inquiry(CODE)
    doku.pay(CODE, INVOICE, 150000, original_request_id="undecidable")
    log = ""

    async def refused():
        nonlocal log
        log += capsys.readouterr().out
        return "reconcile.not_recorded" in log

    async with history_saying_repeat_for(pool, "undecidable"):
        await eventually(refused)
    assert "notification.undecidable" in log
    assert "reconcile.check_failed" not in log
    assert "Traceback" not in log
    assert await payments(pool) == []


@pytest.mark.parametrize(
    "agent",
    [
        ("ALFAMART", "TZ01", "1246"),
        (None, None, "1246"),
        ("", "TZ01", "7"),
        ("INDOMARET", None, "x/y"),
        ("ALFAMART", "TZ01", None),
        ("ALFAMART", "TZ01", ""),
    ],
)
async def test_a_store_transaction_is_named_alike_in_python_and_in_sql(pool, agent):
    """Migration 0027 matches a payment's store transaction in SQL (dipc_agent_reference), by the text that
    conventions.agent_reference gives a notice's in Python: the two must agree, or no answer matches."""
    in_sql = await pool.fetchval("SELECT dipc_agent_reference($1, $2, $3)", *agent)
    assert in_sql == conventions.agent_reference(agent)


async def test_an_invoice_paid_by_its_notification_is_never_asked_about(dipc, doku_sim, standin, pool, admin):
    doku, _ = standin
    await register(dipc, admin)
    quote = await doku_sim.inquiry(CODE)
    notified = await doku_sim.notify(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id=quote.request_id
    )
    assert notified.status == 200
    invoice = await row(pool, CODE, INVOICE)
    assert (invoice["state"], invoice["settled_by"], invoice["next_check_at"]) == (
        "paid",
        "notification",
        None,
    )
    await asyncio.sleep(2.5)  # past the first two checks of the schedule
    assert doku.checks_of(INVOICE) == []


async def test_each_invoice_of_a_reusable_code_is_reconciled_on_its_own(dipc, doku_sim, standin, pool, admin):
    doku, _ = standin
    before = await samples(dipc)
    await register(
        dipc, admin, payment_code=REUSABLE, invoice_number="TOPUP-777", reusable=True, amount=50000
    )
    first = (await doku_sim.inquiry(REUSABLE)).json()["order"]["invoice_number"]
    second = (await doku_sim.inquiry(REUSABLE)).json()["order"]["invoice_number"]
    assert first != second
    doku.pay(REUSABLE, second, 50000, agent_trx_id="77")

    async def done():
        states = {r["invoice_number"]: r["state"] for r in await pool.fetch("SELECT * FROM reconciliation")}
        return states if states == {first: "gave_up", second: "paid"} else None

    await eventually(done)
    [payment] = await payments(pool, REUSABLE)
    assert (payment["invoice_number"], payment["kind"], payment["transaction_ref"]) == (
        second,
        "normal",
        "agent:ALFAMART/TZ01/77",
    )
    assert len(doku.checks_of(first)) == 3  # the whole schedule: +1, +2, +3 s
    assert (await row(pool, REUSABLE, first))["attempts"] == 3
    after = await samples(dipc)
    assert after["dipc_reconciliation_gave_up_total"] - before["dipc_reconciliation_gave_up_total"] == 1

    async def sampled_gave_up():  # the gauge is sampled from the database in the background
        return (await samples(dipc))['dipc_reconciliation_invoices{state="gave_up"}'] == 1

    await eventually(sampled_gave_up, seconds=5.0)


async def test_a_check_status_answer_for_another_transaction_of_a_paid_code_is_a_conflict(
    dipc, doku_sim, standin, pool, admin
):
    doku, _ = standin
    await register(dipc, admin)
    quote = await doku_sim.inquiry(CODE)
    answered = asyncio.Event()
    doku.script(INVOICE, Scripted(hold=answered))  # DOKU takes its time answering the first check
    doku.pay(CODE, INVOICE, 150000, original_request_id="counter-B")
    await eventually(lambda: asyncio.sleep(0, result=doku.checks_of(INVOICE)))
    # Meanwhile counter A's notification arrives and pays the code.
    notified = await doku_sim.notify(
        CODE, invoice_number=INVOICE, amount=150000, original_request_id=quote.request_id
    )
    assert notified.status == 200
    answered.set()

    async def two():
        found = await payments(pool)
        return found if len(found) == 2 else None

    normal, conflict = await eventually(two)
    assert (normal["kind"], normal["source"]) == ("normal", "notification")
    assert (conflict["kind"], conflict["reason"], conflict["source"]) == (
        "conflict",
        "ALREADY_PAID",
        "check_status",
    )
    assert (await row(pool, CODE, INVOICE))["settled_by"] == "notification"
    await assert_open_exception(dipc, admin, conflict["id"], "conflict", "ALREADY_PAID")


async def test_a_check_status_answer_with_another_amount_is_an_anomaly(dipc, doku_sim, standin, pool, admin):
    doku, _ = standin
    await register(dipc, admin)
    quote = await doku_sim.inquiry(CODE)
    doku.pay(CODE, INVOICE, 15000, original_request_id=quote.request_id)
    [anomaly] = await eventually(lambda: payments(pool))
    assert (anomaly["kind"], anomaly["reason"], anomaly["expected_amount"]) == (
        "anomaly",
        "AMOUNT_MISMATCH",
        150000,
    )
    assert (await row(pool, CODE, INVOICE))["state"] == "paid"  # a payment of any kind settles the invoice
    code = await (await dipc.get(f"/v1/payment-codes/{CODE}", headers=admin)).json()
    assert code["status"] == "active"
    await assert_open_exception(dipc, admin, anomaly["id"], "anomaly", "AMOUNT_MISMATCH")


@pytest.mark.parametrize(
    ("scripted", "result"),
    [
        (Scripted(status=500, body=b'{"error":"internal"}'), "server_error"),
        (Scripted(status=429, body=b"{}"), "rate_limited"),
        (Scripted(status=404, body=b"{}"), "not_found"),
        (Scripted(body=b"<html>oops</html>"), "unreadable"),
        (Scripted(body=b'{"transaction":{"status":"SUCCESS"}}'), "unreadable"),  # paid, but how much?
        (Scripted(delay_s=3.0), "timeout"),
        (Scripted(signed=False, body=b'{"transaction":{"status":"WHATEVER"}}'), "unreadable"),
    ],
)
async def test_an_unknown_answer_never_closes_an_invoice(
    aiohttp_client, pool, database_url, standin, admin, scripted, result
):
    doku, server = standin
    dipc = await aiohttp_client(make_app(reconciling_settings(server, doku_api_timeout_s=0.5), database_url))
    doku_sim = DokuSimulator(dipc.session, str(dipc.make_url("")), CLIENT)
    await register(dipc, admin)
    await doku_sim.inquiry(CODE)
    doku.script(INVOICE, scripted)
    doku.pay(CODE, INVOICE, 150000, original_request_id="the-real-one")  # what DOKU knows, once it answers

    async def checked():
        invoice = await row(pool, CODE, INVOICE)
        return invoice if invoice["last_result"] == result else None

    invoice = await eventually(checked)
    assert invoice["state"] == "pending"
    assert await payments(pool) == []
    # The next check on the schedule finds the payment.
    [payment] = await eventually(lambda: payments(pool))
    assert payment["transaction_ref"] == "the-real-one"


def without_the_code(body: bytes) -> bytes:
    """DOKU's answer without `online_to_offline_info`: spec §8 says some members may be missing."""
    data = orjson.loads(body)
    del data["online_to_offline_info"]
    return orjson.dumps(data)


async def test_an_answer_that_names_no_code_pays_no_code_when_several_share_the_invoice(
    dipc, doku_sim, standin, pool, admin
):
    """(Found by a finance review.) DOKU is asked by invoice number alone. Two codes of one merchant quoted
    the same number (two one-shot codes given one invoice number, or reusable codes made alike, which mint
    the same ones), and DOKU's SUCCESS answer left out the payment code: the one store transaction was
    recorded as a normal payment on each code, both codes marked paid. Such an answer cannot be tied to
    one code, so it is unknown (spec §8: never read as paid nor unpaid), and finance looks it up in
    DOKU's Back Office when the schedule gives up. An answer for a number only one code quoted is still
    read as that code's."""
    doku, _ = standin
    twin = "8896512345678125"
    await register(dipc, admin, invoice_number="INV-SHARED")
    await register(dipc, admin, payment_code=twin, invoice_number="INV-SHARED")
    await register(dipc, admin, payment_code="8896512345678126", invoice_number="INV-ALONE")
    for code in (CODE, twin, "8896512345678126"):
        assert (await doku_sim.inquiry(code)).status == 200
    doku.paid["INV-SHARED"] = without_the_code(
        doku.pay(CODE, "INV-SHARED", 150000, original_request_id="one")
    )
    doku.paid["INV-ALONE"] = without_the_code(
        doku.pay("8896512345678126", "INV-ALONE", 150000, original_request_id="alone")
    )

    async def checked():
        rows = [await row(pool, code, "INV-SHARED") for code in (CODE, twin)]
        return rows if all(invoice["last_result"] is not None for invoice in rows) else None

    for invoice in await eventually(checked):
        assert (invoice["state"], invoice["last_result"]) == ("pending", "unreadable")
        assert "2 codes" in invoice["last_detail"]
    [alone] = await eventually(lambda: payments(pool, "8896512345678126"))
    assert (alone["kind"], alone["transaction_ref"]) == ("normal", "alone")
    assert await payments(pool, CODE) == []
    assert await payments(pool, twin) == []


async def test_an_expiry_that_names_no_code_closes_no_code_when_several_share_the_invoice(
    dipc, doku_sim, standin, pool, admin
):
    """The same for EXPIRED, which is final: read as each code's, it would stop the checks of a code whose
    customer may have paid. (DOKU's EXPIRED answers here never name the code.)"""
    doku, _ = standin
    twin = "8896512345678125"
    await register(dipc, admin, invoice_number="INV-SHARED")
    await register(dipc, admin, payment_code=twin, invoice_number="INV-SHARED")
    for code in (CODE, twin):
        assert (await doku_sim.inquiry(code)).status == 200
    doku.expire("INV-SHARED")

    async def checked():
        rows = [await row(pool, code, "INV-SHARED") for code in (CODE, twin)]
        return rows if all(invoice["last_result"] is not None for invoice in rows) else None

    for invoice in await eventually(checked):
        assert (invoice["state"], invoice["last_result"]) == ("pending", "unreadable")


async def test_expired_closes_the_invoice_as_unpaid_and_a_new_quote_reopens_it(
    dipc, doku_sim, standin, pool, admin
):
    doku, _ = standin
    await register(dipc, admin)
    await doku_sim.inquiry(CODE)
    doku.expire(INVOICE)

    async def expired():
        invoice = await row(pool, CODE, INVOICE)
        return invoice if invoice["state"] == "expired" else None

    invoice = await eventually(expired)
    assert (invoice["next_check_at"], invoice["last_result"]) == (None, "expired")
    assert await payments(pool) == []
    # The customer asks again: the invoice can be paid now, so it is watched again.
    await doku_sim.inquiry(CODE)
    reopened = await row(pool, CODE, INVOICE)
    assert (reopened["state"], reopened["attempts"]) == ("pending", 0)


async def test_the_schedule_running_out_gives_up_visibly(dipc, doku_sim, standin, pool, admin):
    doku, _ = standin
    await register(dipc, admin)
    await doku_sim.inquiry(CODE)

    async def gave_up():
        invoice = await row(pool, CODE, INVOICE)
        return invoice if invoice["state"] == "gave_up" else None

    invoice = await eventually(gave_up)
    assert (invoice["attempts"], invoice["last_result"], invoice["next_check_at"]) == (3, "pending", None)
    assert len(doku.checks_of(INVOICE)) == 3
    listed = await (await dipc.get("/v1/reconciliation?state=gave_up", headers=admin)).json()
    assert [item["invoice_number"] for item in listed["items"]] == [INVOICE]
    assert listed["items"][0]["attempts"] == 3


async def test_reconciliation_can_be_listed_and_paged(dipc, doku_sim, pool, admin):
    await register(
        dipc, admin, payment_code=REUSABLE, invoice_number="TOPUP-777", reusable=True, amount=50000
    )
    for _ in range(3):
        assert (await doku_sim.inquiry(REUSABLE)).status == 200
    first = await (await dipc.get("/v1/reconciliation?limit=2", headers=admin)).json()
    assert len(first["items"]) == 2
    assert first["next"]
    item = first["items"][0]
    assert set(item) >= {
        "payment_code",
        "invoice_number",
        "state",
        "attempts",
        "next_check_at",
        "last_result",
    }
    rest = await (await dipc.get(f"/v1/reconciliation?limit=2&after={first['next']}", headers=admin)).json()
    assert len(rest["items"]) == 1
    assert rest["next"] is None
    seen = [i["invoice_number"] for i in first["items"] + rest["items"]]
    assert sorted(seen) == ["TOPUP-777-1", "TOPUP-777-2", "TOPUP-777-3"]
    for listed in first["items"] + rest["items"]:
        validate("reconciliation", listed)
    for bad in ("state=unknown", "after=%00", "after=bm90LWEtY3Vyc29y", "limit=0"):
        response = await dipc.get(f"/v1/reconciliation?{bad}", headers=admin)
        assert response.status == 422, bad


async def test_a_check_by_hand_answers_what_doku_said(aiohttp_client, pool, database_url, standin, admin):
    doku, server = standin
    # Reconciler off: only the person asking calls DOKU.
    dipc = await aiohttp_client(make_app(reconciling_settings(server, reconcile=False), database_url))
    doku_sim = DokuSimulator(dipc.session, str(dipc.make_url("")), CLIENT)
    await register(dipc, admin)
    quote = await doku_sim.inquiry(CODE)
    check = await dipc.post("/v1/reconciliation/check", json={"invoice_number": INVOICE}, headers=admin)
    assert check.status == 200
    [item] = (await check.json())["items"]
    assert (item["state"], item["check"]["result"], item["attempts"]) == ("pending", "pending", 1)

    doku.pay(CODE, INVOICE, 150000, original_request_id=quote.request_id)
    [item] = (
        await (
            await dipc.post("/v1/reconciliation/check", json={"invoice_number": INVOICE}, headers=admin)
        ).json()
    )["items"]
    assert (item["state"], item["check"]["result"], item["check"]["recorded"]) == ("paid", "paid", "normal")
    validate("reconciliation", item)
    [again] = (
        await (
            await dipc.post("/v1/reconciliation/check", json={"invoice_number": INVOICE}, headers=admin)
        ).json()
    )["items"]
    assert (again["state"], again["check"]) == ("paid", None)  # paid: DOKU is not asked again
    assert len(doku.checks_of(INVOICE)) == 2

    missing = await dipc.post("/v1/reconciliation/check", json={"invoice_number": "INV-NEVER"}, headers=admin)
    assert missing.status == 404
    for body in ({}, {"invoice_number": INVOICE, "since": "2026-01-01T00:00:00Z"}, {"invoice_number": "a b"},
                 {"since": "yesterday"}, {"invoice_number": 7}):  # fmt: skip
        response = await dipc.post("/v1/reconciliation/check", json=body, headers=admin)
        assert response.status == 422, body


async def test_a_check_since_a_date_puts_unsettled_invoices_back_in_line(
    aiohttp_client, pool, database_url, standin, admin
):
    doku, server = standin
    dipc = await aiohttp_client(
        make_app(reconciling_settings(server, reconcile_schedule=(3600.0,)), database_url)
    )
    doku_sim = DokuSimulator(dipc.session, str(dipc.make_url("")), CLIENT)
    await register(dipc, admin)
    quote = await doku_sim.inquiry(CODE)
    doku.pay(CODE, INVOICE, 150000, original_request_id=quote.request_id)
    response = await dipc.post(
        "/v1/reconciliation/check", json={"since": "2020-01-01T00:00:00Z"}, headers=admin
    )
    assert response.status == 202
    assert await response.json() == {"scheduled": 1, "reconciler": True}
    [payment] = await eventually(
        lambda: payments(pool), seconds=10
    )  # not an hour: the reconciler took it now
    assert payment["source"] == "check_status"


async def test_scheduling_checks_says_when_no_reconciler_runs_here(client, admin_headers):
    """(Found by review.) DIPC_RECONCILE is on by default, but without DOKU's API no reconciler runs:
    the answer said one did."""
    response = await client.post(
        "/v1/reconciliation/check", json={"since": "2020-01-01T00:00:00Z"}, headers=admin_headers
    )
    assert response.status == 202
    assert await response.json() == {"scheduled": 0, "reconciler": False}


async def quoted_backlog(pool, rows: int, *, quoted: str) -> None:
    """``rows`` pending invoices of other codes, first quoted at ``quoted`` (an SQL expression)."""
    await pool.execute(
        f"""
        INSERT INTO reconciliation (payment_code, invoice_number, client_id, channel, amount,
                                    first_quoted_at, next_check_at)
        SELECT '88966' || lpad(g::text, 11, '0'), 'BACKLOG-' || g, $1, 'ALFA', 1000, {quoted},
               now() + interval '1 hour'
          FROM generate_series(1, {rows}) g
        """,  # noqa: S608 - a test's constants
        CLIENT_ID,
    )


async def test_a_check_since_a_date_holds_no_invoice_for_long(aiohttp_client, database_url, pool, admin):
    """(Found by review.) Scheduling every unsettled invoice since a date touched them in one UPDATE,
    each row locked until its commit (seconds for a few hundred thousand): an inquiry quoting one of
    them again (its upsert locks the row) waited past its budget and was answered 503, and a payment
    of one waited as long. It goes in chunks, each its own short transaction, as `dipc prune` does.
    (The whole scheduling took 14 s here, and once on a slow CI machine more than the admin API's 30 s:
    what is under test is the inquiry's budget, so the check has two minutes.)"""
    client = await aiohttp_client(make_app(make_settings(admin_db_timeout_s=120.0), database_url))
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    await register(client, admin)
    assert (await doku.inquiry(CODE)).status == 200  # pending
    await quoted_backlog(pool, 300_000, quoted="now() - interval '1 day'")
    # Quoted before the backlog, so the first of them to be made due: a statement over all of them
    # would hold it from its start to its commit.
    await pool.execute(
        "UPDATE reconciliation SET first_quoted_at = now() - interval '2 days' WHERE payment_code = $1", CODE
    )
    scheduling = asyncio.create_task(
        client.post("/v1/reconciliation/check", json={"since": "2020-01-01T00:00:00Z"}, headers=admin)
    )
    # Until the scheduling has reached the invoice: it holds its row (seen by a lock that skips it), or
    # has made it due and committed.
    for _ in range(2000):
        reached = await pool.fetchrow(
            "SELECT next_check_at <= now() AS due FROM reconciliation WHERE payment_code = $1"
            " FOR UPDATE SKIP LOCKED",
            CODE,
        )
        if reached is None or reached["due"]:
            break
        await asyncio.sleep(0.005)
    else:
        raise AssertionError("the scheduling never reached the invoice")
    again = await doku.inquiry(CODE)  # the customer asks for the bill again meanwhile
    scheduled = await scheduling
    assert scheduled.status == 202, await scheduled.text()
    assert (await scheduled.json())["scheduled"] == 300_001
    assert again.status == 200, f"the inquiry was answered {again.status} while the check was scheduled"


async def test_a_check_since_a_date_longer_than_its_budget_goes_on_when_asked_again(
    aiohttp_client, database_url, pool, admin
):
    """(Found by review.) A check since a date over more invoices than the admin budget allows ends in
    503 with part of them made due. The retry the 503 asks for started again with the pending ones,
    among them every invoice the first request had made due, spent its budget redoing them and made no
    more due. Invoices due already are left alone now: each request goes on where the last stopped.
    Scaled down here: 100,000 given-up invoices and a 0.3 s budget."""
    await pool.execute(
        """
        INSERT INTO reconciliation (payment_code, invoice_number, client_id, channel, amount, state,
                                    first_quoted_at, next_check_at, attempts)
        SELECT '88965' || lpad(g::text, 11, '0'), 'GAVE-UP-' || g, $1, 'ALFA', 1000, 'gave_up',
               now() - (g % 300) * interval '1 day', NULL, 6
          FROM generate_series(1, 100000) g
        """,
        CLIENT_ID,
    )
    await pool.execute("VACUUM ANALYZE reconciliation")
    dipc = await aiohttp_client(make_app(make_settings(admin_db_timeout_s=0.3), database_url))
    given_up = "SELECT count(*) FROM reconciliation WHERE state = 'gave_up'"
    left = [await pool.fetchval(given_up)]
    for _ in range(4):
        answer = await dipc.post(
            "/v1/reconciliation/check", json={"since": "2020-01-01T00:00:00Z"}, headers=admin
        )
        assert answer.status in (202, 503), await answer.text()
        left.append(await pool.fetchval(given_up))
        if answer.status == 202:
            break
    assert all(after < before for before, after in itertools.pairwise(left)), (
        f"given up, request by request: {left}"
    )


async def test_two_checks_since_two_dates_at_once_take_the_invoices_in_one_order(
    client, pool, database_url, admin
):
    """(Found by review.) Two schedulings at once (two operators, a script and an operator) locked the
    invoices they share in their plans' orders, a scan of the table for an old date and an index for a
    recent one: a lock cycle, which PostgreSQL broke by giving one of them up. Both are answered 202 now.
    Here R1 (recent, quoted last) is first in the table, then old ones, then R2 (recent, quoted before
    R1), and a third transaction holding an old row lines the two up."""
    recent_row = """INSERT INTO reconciliation (payment_code, invoice_number, client_id, channel, amount,
                                                first_quoted_at, next_check_at)
                    VALUES ($1, $2, $3, 'ALFA', 1000, now() - $4::interval, now() + interval '1 hour')"""
    await pool.execute(recent_row, "8896511110000001", "R1", CLIENT_ID, timedelta(0))
    await quoted_backlog(pool, 20_000, quoted="now() - interval '10 days'")
    await pool.execute(recent_row, "8896511110000002", "R2", CLIENT_ID, timedelta(minutes=1))
    await pool.execute("ANALYZE reconciliation")
    recent = (await pool.fetchval("SELECT now() - interval '10 minutes'")).isoformat()
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT FROM reconciliation WHERE invoice_number = 'BACKLOG-1' FOR UPDATE")
        everything = asyncio.create_task(
            client.post("/v1/reconciliation/check", json={"since": "2020-01-01T00:00:00Z"}, headers=admin)
        )
        lately = asyncio.create_task(
            client.post("/v1/reconciliation/check", json={"since": recent}, headers=admin)
        )
        for _ in range(500):  # until both wait for a lock (each holding what the other needs), or one is done
            waiting = await pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%UPDATE reconciliation%next_check_at = now()%'"
            )
            if waiting == 2 or lately.done():
                break
            await asyncio.sleep(0.01)
    answers = [await each for each in (everything, lately)]
    assert [answer.status for answer in answers] == [202, 202], [await answer.text() for answer in answers]
    not_due = "SELECT count(*) FROM reconciliation WHERE state <> 'pending' OR next_check_at > now()"
    assert await pool.fetchval(not_due) == 0


async def test_a_check_by_hand_keeps_a_quote_made_while_doku_answered(
    aiohttp_client, pool, database_url, standin, admin
):
    """(Found by review.) A check by hand leases a given-up invoice (the lease, not a row lock, is what
    reconcilers hold) and asks DOKU. Meanwhile the customer asks for the bill again, and the inquiry
    reopens the invoice's reconciliation (pending, attempts 0, a first check scheduled): the customer may
    pay it now. DOKU then answers "not paid". The check's result is recorded, but not the state and
    schedule it computed from the row it claimed: the invoice stays pending, or a payment after the new
    quote whose notification is lost would never be asked about."""
    doku, server = standin
    dipc = await aiohttp_client(make_app(reconciling_settings(server, reconcile=False), database_url))
    doku_sim = DokuSimulator(dipc.session, str(dipc.make_url("")), CLIENT)
    await register(dipc, admin)
    assert (await doku_sim.inquiry(CODE)).status == 200
    await pool.execute(  # its schedule ran out three days ago, unpaid
        "UPDATE reconciliation SET state = 'gave_up', next_check_at = NULL, attempts = 3,"
        " first_quoted_at = now() - interval '4 days' WHERE invoice_number = $1",
        INVOICE,
    )
    doku.script(INVOICE, Scripted(delay_s=1.0))  # not paid, after a second
    check = asyncio.create_task(
        dipc.post("/v1/reconciliation/check", json={"invoice_number": INVOICE}, headers=admin)
    )
    lease = "SELECT lease_token IS NOT NULL FROM reconciliation WHERE invoice_number = $1"
    for _ in range(200):
        if await pool.fetchval(lease, INVOICE):
            break
        await asyncio.sleep(0.01)
    assert (await doku_sim.inquiry(CODE)).status == 200  # quoted again while DOKU is asked
    state = "SELECT state, attempts, next_check_at, last_result FROM reconciliation WHERE invoice_number = $1"
    reopened = await pool.fetchrow(state, INVOICE)
    assert (reopened["state"], reopened["attempts"]) == ("pending", 0)
    assert (await check).status == 200
    after = await pool.fetchrow(state, INVOICE)
    assert (after["state"], after["attempts"], after["next_check_at"]) == (
        "pending",
        0,
        reopened["next_check_at"],
    ), f"the invoice quoted again is {after['state']}, next check {after['next_check_at']}"
    assert after["last_result"] is not None  # what DOKU said is still recorded


async def test_without_a_doku_api_a_check_by_hand_says_what_to_configure(client, doku, admin):
    await register(client, admin)
    await doku.inquiry(CODE)
    response = await client.post("/v1/reconciliation/check", json={"invoice_number": INVOICE}, headers=admin)
    assert response.status == 409
    assert "DIPC_DOKU_API_URL" in (await response.json())["error"]["message"]


async def test_the_stand_in_refuses_what_doku_would_refuse(aiohttp_client):
    doku = DokuStandIn({CLIENT_ID: CLIENT})
    server = await aiohttp_client(doku.app())
    unsigned = await server.get(f"/orders/v1/status/{INVOICE}")
    assert unsigned.status == 401
    target = f"/orders/v1/status/{INVOICE}"
    headers = signed_headers(CLIENT, request_id="r1", target=target, body=b"", now=utcnow(), response=False)
    assert (await server.get(f"/orders/v1/status/{INVOICE}", headers=headers)).status == 200
    # The same Request-Id again, and a signature over another path, are refused.
    assert (await server.get(f"/orders/v1/status/{INVOICE}", headers=headers)).status == 401
    other = signed_headers(CLIENT, request_id="r2", target="/orders/v1/status/INV-X", body=b"", now=utcnow(),
                           response=False)  # fmt: skip
    assert (await server.get(f"/orders/v1/status/{INVOICE}", headers=other)).status == 401
    assert len(doku.problems) == 3


async def test_dipc_reconcile_prints_what_doku_says_was_paid_and_what_it_became(
    aiohttp_client, pool, database_url, standin, admin
):
    """(Found by a finance review.) DOKU's answer of Rp 90,000 for a Rp 150,000 bill printed as the bill's
    amount, `paid` and `paid`, though it was recorded as an anomaly: finance read a settled invoice."""
    doku, server = standin
    dipc = await aiohttp_client(make_app(reconciling_settings(server, reconcile=False), database_url))
    doku_sim = DokuSimulator(dipc.session, str(dipc.make_url("")), CLIENT)
    await register(dipc, admin)
    quote = await doku_sim.inquiry(CODE)
    doku.pay(CODE, INVOICE, 90000, original_request_id=quote.request_id)
    env = dipc_env(database_url, DIPC_DOKU_API_URL=str(server.make_url("")).rstrip("/"))

    printed = await asyncio.to_thread(run, "reconcile", "--invoice", INVOICE, env=env)
    assert printed.returncode == 0, printed.stderr
    [header, line] = printed.stdout.decode().splitlines()
    payment_id = await pool.fetchval("SELECT id FROM payments WHERE payment_code = $1", CODE)

    def column(name: str) -> str:
        start = header.index(name)
        rest = header[start + len(name) :]
        width = len(name) + len(rest) - len(rest.lstrip())
        return line[start : start + width].strip()

    assert (column("AMOUNT"), column("PAID"), column("RECORDED")) == (
        "150000",
        "90000",
        f"anomaly AMOUNT_MISMATCH #{payment_id}",
    )


async def test_dipc_reconcile_asks_doku_by_hand_and_prints_what_it_found(
    aiohttp_client, pool, database_url, standin, admin
):
    doku, server = standin
    dipc = await aiohttp_client(make_app(reconciling_settings(server, reconcile=False), database_url))
    doku_sim = DokuSimulator(dipc.session, str(dipc.make_url("")), CLIENT)
    await register(dipc, admin)
    await register(
        dipc, admin, payment_code=REUSABLE, invoice_number="TOPUP-777", reusable=True, amount=50000
    )
    quote = await doku_sim.inquiry(CODE)
    topup = (await doku_sim.inquiry(REUSABLE)).json()["order"]["invoice_number"]
    doku.pay(CODE, INVOICE, 150000, original_request_id=quote.request_id)
    env = dipc_env(database_url, DIPC_DOKU_API_URL=str(server.make_url("")).rstrip("/"))

    one = await asyncio.to_thread(run, "reconcile", "--invoice", INVOICE, "--json", env=env)
    assert one.returncode == 0, one.stderr
    [item] = orjson.loads(one.stdout)["items"]
    assert (item["state"], item["check"]["result"], item["check"]["recorded"]) == ("paid", "paid", "normal")
    listed = await asyncio.to_thread(run, "payments", "list", env=env)  # what the alert tells on-call to read
    [header, row] = listed.stdout.decode().splitlines()
    assert row[header.index("SOURCE") :].startswith("check_status")
    # --since filters on the time dipc recorded a payment: the table shows it beside DOKU's (found by a
    # finance review: a payment paid before the time asked for was listed, its PAID_AT all it showed).
    assert header.split()[-2:] == ["PAID_AT", "RECORDED_AT"]

    since = await asyncio.to_thread(run, "reconcile", "--since", "2020-01-01T00:00:00Z", env=env)
    assert since.returncode == 0, since.stderr
    assert topup.encode() in since.stdout  # the unpaid one was asked about; the paid one is not listed
    assert b"pending" in since.stdout
    # At most --limit of them, those checked least recently first (a year's would be hours of checks, all
    # held in memory), so that each run again goes on to the others (found by review: it asked the same).
    later = (await doku_sim.inquiry(REUSABLE)).json()["order"]["invoice_number"]
    since_args = ("reconcile", "--since", "2020-01-01T00:00:00Z", "--limit", "1")
    limited = await asyncio.to_thread(run, *since_args, "--json", env=env)
    assert limited.returncode == 0, limited.stderr
    document = orjson.loads(limited.stdout)
    assert ([item["invoice_number"] for item in document["items"]], document["more"]) == ([later], True)
    told = await asyncio.to_thread(run, *since_args, env=env)  # run again, as told
    assert b"more unsettled invoices than --limit 1" in told.stderr
    assert topup.encode() in told.stdout
    assert later.encode() not in told.stdout
    assert (await asyncio.to_thread(run, "reconcile", "--limit", "0", env=env)).returncode == 2

    unknown = await asyncio.to_thread(run, "reconcile", "--invoice", "INV-NEVER-QUOTED", env=env)
    assert unknown.returncode == 1
    assert b"no quoted invoice" in unknown.stderr
    bad_date = await asyncio.to_thread(run, "reconcile", "--since", "last week", env=env)
    assert bad_date.returncode == 2
    no_api = await asyncio.to_thread(run, "reconcile", "--demo", env=env | {"DIPC_DOKU_API_URL": ""})
    assert no_api.returncode == 2
    assert b"DIPC_DOKU_API_URL" in no_api.stderr


async def test_calls_to_doku_keep_to_the_rate_and_back_off_after_a_429(
    aiohttp_client, pool, database_url, standin, admin
):
    doku, server = standin
    settings = reconciling_settings(server, reconcile_rps=4.0, reconcile_schedule=(1.0, 60.0))
    dipc = await aiohttp_client(make_app(settings, database_url))
    doku_sim = DokuSimulator(dipc.session, str(dipc.make_url("")), CLIENT)
    await register(
        dipc, admin, payment_code=REUSABLE, invoice_number="TOPUP-777", reusable=True, amount=50000
    )
    for _ in range(12):
        assert (await doku_sim.inquiry(REUSABLE)).status == 200

    async def all_checked():
        return len(doku.seen) >= 12

    await eventually(all_checked)
    started = sorted(seen.started for seen in doku.seen)
    # A full bucket holds one second's worth (4); the other 8 come at 4 per second: at least 2 s.
    assert started[-1] - started[0] >= 1.8

    # DOKU says 429: every reconciler waits (2 s at first) before its next call.
    doku.seen.clear()
    first, second = "TOPUP-777-13", "TOPUP-777-14"
    doku.script(first, Scripted(status=429, body=b"{}"))
    assert (await doku_sim.inquiry(REUSABLE)).json()["order"]["invoice_number"] == first
    await asyncio.sleep(0.3)
    assert (await doku_sim.inquiry(REUSABLE)).json()["order"]["invoice_number"] == second
    await eventually(lambda: asyncio.sleep(0, result=len(doku.checks_of(second)) >= 1))
    [throttled] = doku.checks_of(first)[:1]
    [after] = doku.checks_of(second)[:1]
    assert throttled.status == 429
    assert after.started - throttled.finished >= 1.5
    invoice = await row(pool, REUSABLE, first)
    assert (invoice["state"], invoice["attempts"], invoice["last_result"]) in {
        ("pending", 0, "rate_limited"),  # not an attempt at the invoice
        ("pending", 1, "pending"),  # ...and asked again after the backoff
    }
