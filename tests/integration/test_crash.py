"""SIGKILL in the middle of a burst: every answer given is on disk, nothing is recorded or minted twice.

Notifications: every 200 is on disk and no payment is doubled. Inquiries: every answer that left is the
recorded one, byte for byte, with its minted invoice and its reconciliation row, and DOKU's resends get it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from server.doku.client import DokuSimulator, inquiry_body, notification_body
from tests.conftest import CLIENT, CLIENT_ID, dipc_env, waiting_for_a_lock
from tests.integration.test_cli import DIPC, free_port, wait_ready
from tests.integration.test_events import advisory_lock_held, until

COUNT = 300


def start_server(database_url: str, port: int, **extra: str) -> subprocess.Popen:
    """``dipc serve`` on ``port`` (``extra``: more of its environment), once it is ready."""
    env = dipc_env(database_url, DIPC_PORT=str(port), DIPC_LOG_LEVEL="WARNING", **extra)
    server = subprocess.Popen([*DIPC, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_ready(f"http://127.0.0.1:{port}/readyz", server)
    return server


@contextlib.contextmanager
def serving(database_url: str, port: int) -> Iterator[None]:
    """``dipc serve`` on ``port`` for the block, stopped with SIGTERM after it."""
    server = start_server(database_url, port)
    try:
        yield
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


async def post_all(
    port: int,
    target: str,
    bodies: dict[str, bytes],
    *,
    keys_are_request_ids: bool = False,
    kill: subprocess.Popen | None = None,
    before_kill: Callable[[DokuSimulator], Awaitable[None]] | None = None,
) -> dict[str, tuple[int, bytes]]:
    """POST every body to ``target`` once, concurrently, signed as DOKU; return the answers that arrived
    (status, body) by key. With ``keys_are_request_ids`` each key is also its request's Request-Id.

    With ``kill``, the server is SIGKILLed once a sixth of the answers are in (``before_kill`` runs just
    before, while the others are in flight).
    """
    answers: dict[str, tuple[int, bytes]] = {}
    killed = False
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=40), timeout=aiohttp.ClientTimeout(total=20)
    ) as session:
        doku = DokuSimulator(session, f"http://127.0.0.1:{port}", CLIENT)

        async def send(key: str, body: bytes) -> None:
            nonlocal killed
            try:
                reply = await doku.post(target, body, request_id=key if keys_are_request_ids else None)
            except (aiohttp.ClientError, TimeoutError):
                return
            answers[key] = (reply.status, reply.body)
            if kill is not None and len(answers) >= len(bodies) // 6 and not killed:
                killed = True
                if before_kill is not None:
                    await before_kill(doku)
                kill.send_signal(signal.SIGKILL)

        await asyncio.gather(*(send(key, body) for key, body in bodies.items()))
    return answers


async def killed_mid_burst(database_url: str, port: int, target: str, bodies: dict[str, bytes], **options):
    """``post_all`` to a ``dipc serve`` that is SIGKILLed in the middle of it; the answers that arrived."""
    server = start_server(database_url, port)
    try:
        answers = await post_all(port, target, bodies, kill=server, **options)
    finally:
        server.kill()
        server.wait(timeout=30)
    assert server.returncode == -signal.SIGKILL
    return answers


async def send_all(port: int, bodies: dict[str, bytes]) -> set[str]:
    """Send every notification body once, concurrently; return the codes whose notification got a 200."""
    return acknowledged(await post_all(port, "/doku/notification", bodies))


async def one_shot_codes(pool, count: int, *, start: int = 0) -> list[str]:
    """Register ``count`` one-shot ALFA codes (``88965`` and ``start``, ``start`` + 1, ... in 11 digits),
    invoice ``INV-<code>`` for Rp 10.000 each; return them."""
    codes = [f"88965{n:011d}" for n in range(start, start + count)]
    await pool.copy_records_to_table(
        "payment_codes",
        records=[(code, CLIENT_ID, "ALFA", f"INV-{code}", 10_000, "Pelanggan") for code in codes],
        columns=["payment_code", "client_id", "channel", "invoice_number", "amount", "customer_name"],
    )
    return codes


def batch_counter(
    prefix: str, into: dict[str, float], **labels: str
) -> Callable[[DokuSimulator], Awaitable[None]]:
    """A ``before_kill`` that copies the server's samples whose names start with ``prefix`` (and that
    have ``labels``) ``into``."""

    async def count_batches(doku: DokuSimulator) -> None:
        async with doku.session.get(f"{doku.base_url}/metrics") as response:
            for family in text_string_to_metric_families(await response.text()):
                into.update(
                    (s.name, s.value)
                    for s in family.samples
                    if s.name.startswith(prefix) and labels.items() <= s.labels.items()
                )

    return count_batches


def acknowledged(answers: dict[str, tuple[int, bytes]]) -> set[str]:
    return {code for code, (status, _) in answers.items() if status == 200}


async def test_a_killed_server_loses_no_acknowledged_notification_and_doubles_no_payment(
    database_url, pool, tmp_path
):
    codes = await one_shot_codes(pool, COUNT)
    bodies = {
        code: notification_body(
            code, invoice_number=f"INV-{code}", amount=10_000, original_request_id=f"trx-{code}"
        )
        for code in codes
    }
    port = free_port()
    batches: dict[str, float] = {}
    answers = await killed_mid_burst(
        database_url,
        port,
        "/doku/notification",
        bodies,
        before_kill=batch_counter("dipc_payment_batch", batches, statement="record"),
    )
    acked = acknowledged(answers)
    assert 0 < len(acked) < COUNT, "the kill should land in the middle of the burst"
    # What the kill interrupted was batches: the payments recorded so far shared commits (ADR 13).
    assert batches["dipc_payment_batch_size_sum"] > batches["dipc_payment_batch_size_count"] > 0

    # Every notification that got a 200 is on disk, with its payment.
    recorded = {row["payment_code"] for row in await pool.fetch("SELECT payment_code FROM payments")}
    assert acked <= recorded
    stored = {row["payment_code"] for row in await pool.fetch("SELECT payment_code FROM notifications")}
    assert acked <= stored

    # DOKU resends what was not acknowledged (and, for good measure, everything else too).
    with serving(database_url, port):
        missing = {code: body for code, body in bodies.items() if code not in acked}
        assert await send_all(port, missing) == set(missing)
        assert await send_all(port, {code: bodies[code] for code in acked}) == acked

    rows = await pool.fetch(
        "SELECT payment_code, kind, count(*) OVER (PARTITION BY payment_code) AS n FROM payments"
    )
    assert len(rows) == COUNT
    assert {row["kind"] for row in rows} == {"normal"}
    assert max(row["n"] for row in rows) == 1
    assert (
        await pool.fetchval("SELECT count(*) FROM payment_codes WHERE status = 'paid' AND paid_count = 1")
        == COUNT
    )
    # Each payment reached the feed exactly once, whatever the kill left committed but unsequenced.
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0
    events = await pool.fetch("SELECT payment_code FROM events WHERE type = 'payment.received' ORDER BY id")
    assert sorted(row["payment_code"] for row in events) == sorted(codes)


INQUIRIES = 240
TOPUP = "8896500000000777"


async def test_a_killed_server_keeps_every_answer_it_gave_and_mints_no_invoice_twice(database_url, pool):
    """The inquiry's writes (audit row, minted invoice, reconciliation row) are in the transaction of its
    batch, which commits before any of the batch's answers leaves: a kill at any moment loses no answer
    given, and a resend of any inquiry, answered or not, gets one answer for good."""
    one_shot = await one_shot_codes(pool, INQUIRIES // 3)
    await pool.execute(
        "INSERT INTO payment_codes (payment_code, client_id, channel, invoice_number, amount, customer_name,"
        " reusable) VALUES ($1, $2, 'ANY', 'TOPUP', 50000, 'Pelanggan', true)",
        TOPUP,
        CLIENT_ID,
    )
    codes = one_shot + [TOPUP] * (INQUIRIES - len(one_shot))
    code_of = {f"inq-{n}": code for n, code in enumerate(codes)}  # Request-Id -> code
    requests = {request_id: inquiry_body(code) for request_id, code in code_of.items()}
    port = free_port()
    batches: dict[str, float] = {}
    answered = await killed_mid_burst(
        database_url,
        port,
        "/doku/inquiry",
        requests,
        keys_are_request_ids=True,
        before_kill=batch_counter("dipc_inquiry_batch", batches),
    )
    assert 0 < len(answered) < INQUIRIES, "the kill should land in the middle of the burst"
    # What the kill interrupted was batches: the inquiries answered so far shared commits (ADR 12).
    assert batches["dipc_inquiry_batch_size_sum"] > batches["dipc_inquiry_batch_size_count"] > 0

    def recorded_rows():
        return pool.fetch("SELECT request_id, http_status, response_body, invoice_number FROM inquiries")

    # Every answer that left is recorded with its exact bytes.
    recorded = {row["request_id"]: row for row in await recorded_rows()}
    for request_id, (status, body) in answered.items():
        assert (recorded[request_id]["http_status"], recorded[request_id]["response_body"]) == (status, body)

    # DOKU resends everything: answered or not, each Request-Id now has its one answer, and those that
    # were answered get the same bytes again.
    with serving(database_url, port):
        again = await post_all(port, "/doku/inquiry", requests, keys_are_request_ids=True)
    assert set(again) == set(requests)
    for request_id, answer in answered.items():
        assert again[request_id] == answer
    recorded = {row["request_id"]: row for row in await recorded_rows()}
    assert set(recorded) == set(requests)
    assert all(recorded[request_id]["response_body"] == body for request_id, (_, body) in again.items())

    # Every invoice quoted was minted once, is durable, and is reconciled.
    minted = [
        row["invoice_number"] for row in recorded.values() if row["invoice_number"].startswith("TOPUP-")
    ]
    assert len(minted) == INQUIRIES - len(one_shot)
    assert len(set(minted)) == len(minted)
    last = await pool.fetchval("SELECT invoice_seq FROM payment_codes WHERE payment_code = $1", TOPUP)
    assert max(int(invoice.removeprefix("TOPUP-")) for invoice in minted) <= last
    watched = {
        (row["payment_code"], row["invoice_number"])
        for row in await pool.fetch("SELECT payment_code, invoice_number FROM reconciliation")
    }
    assert watched == {(code_of[request_id], row["invoice_number"]) for request_id, row in recorded.items()}


async def test_a_server_killed_while_its_recording_waits_for_the_lock_records_the_payment_once(
    database_url, pool
):
    """The worst moment for a notification: decided and sent, its recording waiting for the code's row
    lock, when the server dies. What waits goes on without its process once the lock is free: the
    batch's transaction, which then rolls back (it commits only on dipc's COMMIT, ADR 13), or, once the
    batch has given up on the lock (after 100 ms), the recording alone, its own transaction, which
    commits what nobody was told of. DOKU resends; either way the payment is recorded once and reaches
    the feed once."""
    [code] = await one_shot_codes(pool, 1)
    body = notification_body(code, invoice_number=f"INV-{code}", amount=10_000, original_request_id="trx-1")
    port = free_port()
    server = start_server(database_url, port)
    try:
        async with pool.acquire() as holder:
            async with holder.transaction():
                await holder.execute("SELECT 1 FROM payment_codes WHERE payment_code = $1 FOR UPDATE", code)
                await killed_while_waiting(pool, server, port, {code: body}, "dipc_payment_context")
            # The lock is free: the dead server's statement ends, and its transaction with it.
            await until_no_backend_runs(pool, "dipc_payment_context")
    finally:
        server.kill()
        server.wait(timeout=30)
    committed = await pool.fetchval("SELECT count(*) FROM payments")
    assert committed in (0, 1)
    assert await pool.fetchval("SELECT count(*) FROM notifications") == committed

    with serving(database_url, port):
        assert await send_all(port, {code: body}) == {code}
        assert await send_all(port, {code: body}) == {code}  # and DOKU's retry of it is a repeat
        events = await pool.fetch("SELECT payment_code FROM events WHERE type = 'payment.received'")
    outcomes = await pool.fetch("SELECT outcome FROM notifications ORDER BY id")
    assert [row["outcome"] for row in outcomes] == ["normal"] + ["repeat"] * (1 + committed)
    assert [row["kind"] for row in await pool.fetch("SELECT kind FROM payments")] == ["normal"]
    assert tuple(await pool.fetchrow("SELECT status, paid_count FROM payment_codes")) == ("paid", 1)
    assert [row["payment_code"] for row in events] == [code]
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0


COMMIT_GATE = 2026112701  # an advisory lock the test holds, which commits that moved events wait for


@contextlib.asynccontextmanager
async def commits_that_move_events_held(pool):
    """While inside, a transaction that inserted into ``events`` waits in its COMMIT (a deferred
    constraint trigger that takes COMMIT_GATE), after its moves, before its commit record."""
    await pool.execute(
        f"""
        CREATE FUNCTION test_commit_gate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM set_config('lock_timeout', '0', true);  -- not the batch's bound on its lock waits
            PERFORM pg_advisory_xact_lock_shared({COMMIT_GATE});
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER test_commit_gate AFTER INSERT ON events
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_commit_gate();
        """
    )
    try:
        async with advisory_lock_held(pool, COMMIT_GATE):
            yield
    finally:
        await pool.execute("DROP TRIGGER test_commit_gate ON events; DROP FUNCTION test_commit_gate()")


async def test_a_server_killed_while_a_batch_commits_its_payments_and_their_events_records_them_once(
    database_url, pool
):
    """The worst moment of a batch that moves its own events into the feed (ADR 13): its COMMIT sent,
    the events moved, the commit not yet made, when the server dies. The commit goes on without its
    process: the payment and its event are in the feed, and nobody was told. DOKU resends; the resend is
    a repeat, and the feed holds the payment once."""
    [code] = await one_shot_codes(pool, 1)
    body = notification_body(code, invoice_number=f"INV-{code}", amount=10_000, original_request_id="trx-1")
    port = free_port()
    server = start_server(database_url, port)
    try:
        async with commits_that_move_events_held(pool):
            await killed_while_waiting(pool, server, port, {code: body}, "COMMIT")
            assert await pool.fetchval("SELECT count(*) FROM payments") == 0  # not committed yet
        await until_no_backend_runs(pool, "COMMIT")
    finally:
        server.kill()
        server.wait(timeout=30)
    assert [row["kind"] for row in await pool.fetch("SELECT kind FROM payments")] == ["normal"]
    assert await pool.fetchval("SELECT count(*) FROM events WHERE type = 'payment.received'") == 1

    with serving(database_url, port):
        assert await send_all(port, {code: body}) == {code}
    outcomes = await pool.fetch("SELECT outcome FROM notifications ORDER BY id")
    assert [row["outcome"] for row in outcomes] == ["normal", "repeat"]
    assert tuple(await pool.fetchrow("SELECT status, paid_count FROM payment_codes")) == ("paid", 1)
    events = await pool.fetch("SELECT payment_code FROM events WHERE type = 'payment.received'")
    assert [row["payment_code"] for row in events] == [code]
    assert await pool.fetchval("SELECT count(*) FROM events_pending") == 0


async def killed_while_waiting(pool, server, port: int, bodies: dict[str, bytes], query_part: str) -> None:
    """Send ``bodies`` as notifications, and SIGKILL the server once a backend running ``query_part``
    waits for a lock: none is answered."""
    sent = asyncio.create_task(post_all(port, "/doku/notification", bodies))
    await waiting_for_a_lock(pool, query_part)
    server.send_signal(signal.SIGKILL)
    server.wait(timeout=30)
    assert await sent == {}


async def until_no_backend_runs(pool, query_part: str) -> None:
    """Until no backend but ours is running ``query_part`` (or in the transaction it was part of)."""
    await until(
        pool,
        "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE query LIKE '%' || $1 || '%'"
        " AND state <> 'idle' AND pid <> pg_backend_pid())",
        query_part,
    )
