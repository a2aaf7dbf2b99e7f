"""The database stops under a running server, then comes back: dipc says so fast, and recovers alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from server.app import make_app
from server.core import manage
from server.doku.client import DokuSimulator
from server.embedded import EmbeddedPostgres
from tests.conftest import CLIENT, CLIENT_ID, CODE, code_fields, dipc_env, make_settings
from tests.integration.test_admin import csv_of
from tests.integration.test_cli import DIPC
from tests.integration.test_metrics import sampled, scrape, value

SLACK_S = 0.5  # a loaded, shared machine: scheduling, not waiting on the database


async def poll(client, path: str, status: int, seconds: float) -> float:
    """Seconds until ``path`` answers ``status``; fails after ``seconds``."""
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        if (await client.get(path)).status == status:
            return time.perf_counter() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"{path} did not answer {status} within {seconds} s")


async def test_a_stopped_database_is_reported_within_seconds_and_recovered_from(
    aiohttp_client, own_database, admin_headers
):
    server, dsn = own_database
    client = await aiohttp_client(make_app(make_settings(), dsn))
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    assert (await client.post("/v1/payment-codes", json=code_fields(), headers=admin_headers)).status == 201
    assert (await doku.inquiry(CODE)).status == 200
    assert (await client.get("/readyz")).status == 200

    await asyncio.to_thread(server.stop)
    not_ready_after = await poll(client, "/readyz", 503, seconds=2.0)
    reason = (await (await client.get("/readyz")).json())["reason"]
    assert "database unreachable" in reason

    started = time.perf_counter()
    reply = await doku.inquiry(CODE)
    unavailable_ms = (time.perf_counter() - started) * 1000
    assert reply.status == 503
    assert reply.json()["error"]["code"] == "UNAVAILABLE"
    assert reply.signature_valid
    notification = await doku.notify(
        CODE, invoice_number="INV-2026-000123", amount=150000, original_request_id="x"
    )
    assert notification.status == 503  # DOKU keeps it and retries
    assert (await client.get("/healthz")).status == 200  # the process itself is fine
    print(f"readyz 503 after {not_ready_after * 1000:.0f} ms; inquiry 503 in {unavailable_ms:.1f} ms")

    await asyncio.to_thread(server.start)
    await poll(client, "/readyz", 200, seconds=15.0)
    assert (await doku.inquiry(CODE)).status == 200
    assert (
        await doku.notify(CODE, invoice_number="INV-2026-000123", amount=150000, original_request_id="x")
    ).status == 200


async def test_a_read_only_database_is_unavailable_not_a_500(
    aiohttp_client, own_database, admin_headers, captured_log
):
    """(Found by review.) After a failover to a standby, or with default_transaction_read_only, every
    write failed with ReadOnlySQLTransactionError: a 500 and a traceback per request and per background
    round, a signed notification refused before it was stored, while /readyz said ready."""
    _, dsn = own_database
    client = await aiohttp_client(make_app(make_settings(), dsn))
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    assert (await client.post("/v1/payment-codes", json=code_fields(), headers=admin_headers)).status == 201
    admin = await asyncpg.connect(dsn)

    async def every_session_reads_only(on: bool) -> None:
        setting = "SET default_transaction_read_only = on" if on else "RESET default_transaction_read_only"
        await admin.execute(f"ALTER DATABASE {await admin.fetchval('SELECT current_database()')} {setting}")
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE pid <> pg_backend_pid() AND datname = current_database()"
        )

    await every_session_reads_only(True)
    await poll(client, "/readyz", 503, seconds=5.0)
    assert "read-only" in (await (await client.get("/readyz")).json())["reason"]
    for _ in range(3):  # the first may meet a terminated connection; every one must be a 503
        reply = await doku.inquiry(CODE)
        assert reply.status == 503, reply.body
        assert reply.json()["error"]["code"] == "UNAVAILABLE"
        paid = await doku.notify(
            CODE, invoice_number="INV-2026-000123", amount=150000, original_request_id="ro"
        )
        assert paid.status == 503, paid.body
        created = await client.post(
            "/v1/payment-codes", json=code_fields(payment_code="8896500000000999"), headers=admin_headers
        )
        assert created.status == 503, await created.text()
    assert "Traceback" not in captured_log.text()

    await every_session_reads_only(False)
    await poll(client, "/readyz", 200, seconds=5.0)
    assert (await doku.inquiry(CODE)).status == 200
    await admin.close()


async def test_without_any_readiness_probe_the_sampler_reports_the_outage(aiohttp_client, own_database):
    """Nobody calls /readyz (compose, systemd): dipc_database_up still goes 0, so DipcNotReady fires, and
    the database-derived gauges read NaN (unknown) instead of freezing at their last value."""
    server, dsn = own_database
    client = await aiohttp_client(make_app(make_settings(metrics_sample_s=0.1), dsn))
    await sampled(client, "dipc_database_up", 1)
    await sampled(client, "dipc_exceptions_oldest_open_seconds", 0)

    await asyncio.to_thread(server.stop)
    await sampled(client, "dipc_database_up", 0, within_s=5)
    for name, labels in (
        ("dipc_webhook_deliveries", {"status": "pending"}),
        ("dipc_webhook_oldest_pending_seconds", {}),
        ("dipc_events_last_id", {}),
        ("dipc_events_unsequenced_oldest_seconds", {}),
        ("dipc_exceptions_open", {"kind": "conflict", "reason": "ALREADY_PAID"}),
        ("dipc_exceptions_oldest_open_seconds", {}),
    ):
        await sampled(client, name, float("nan"), **labels)

    await asyncio.to_thread(server.start)
    await sampled(client, "dipc_database_up", 1, within_s=15)
    await sampled(client, "dipc_exceptions_open", 0, kind="conflict", reason="ALREADY_PAID")
    await sampled(client, "dipc_webhook_oldest_pending_seconds", 0)


async def test_a_table_locked_for_long_leaves_no_sampler_backend_behind_and_the_database_up(
    aiohttp_client, database_url, pool, captured_log
):
    """An operator's long lock on a table the sampler reads (a VACUUM FULL, an ALTER in an open
    transaction). Each round gives up after its second and reconnects; its backend, left waiting on the
    lock, must give up too: one per round, they used up PostgreSQL's connections. And the database
    answers, so dipc_database_up stays 1 (it flapped, and DipcNotReady said the database was gone)."""
    client = await aiohttp_client(make_app(make_settings(metrics_sample_s=0.1), database_url))
    await sampled(client, "dipc_database_up", 1)
    locker = await asyncpg.connect(database_url)
    transaction = locker.transaction()
    await transaction.start()
    try:
        await locker.execute("LOCK TABLE webhook_deliveries IN ACCESS EXCLUSIVE MODE")
        ups, waiting = [], []
        for _ in range(14):  # seven seconds: six rounds or more, each held a second by the lock
            await asyncio.sleep(0.5)
            ups.append(value(await scrape(client), "dipc_database_up"))
            waiting.append(
                await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()"
                )
            )
    finally:
        await transaction.rollback()
        await locker.close()
    assert max(waiting) <= 2, waiting
    assert ups == [1.0] * len(ups)
    timeouts = captured_log.events("sampler.sample_timeout")
    assert timeouts
    assert {line["sample"] for line in timeouts} == {"webhooks"}


async def test_a_fast_shutdown_under_load_is_a_503_never_a_500(aiohttp_client, own_database, admin_headers):
    """PostgreSQL's fast shutdown lands in the middle of statements: asyncpg then reports the dead
    connection as "cannot switch to state …; another operation is in progress" (InternalClientError)."""
    server, dsn = own_database
    client = await aiohttp_client(make_app(make_settings(db_pool_min=8, db_pool_max=8), dsn))
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    assert (await client.post("/v1/payment-codes", json=code_fields(), headers=admin_headers)).status == 201
    statuses: list[int] = []
    stopping = False

    async def traffic(n: int) -> None:
        while not stopping:
            if n % 8 == 7:  # the event feed's long-poll
                status = (await client.get("/v1/events?wait=0.5", headers=admin_headers)).status
            elif n % 3:
                status = (await doku.inquiry(CODE)).status
            else:
                notice = {
                    "invoice_number": "INV-2026-000123",
                    "amount": 150000,
                    "original_request_id": f"x{n}",
                }
                status = (await doku.notify(CODE, **notice)).status
            statuses.append(status)

    for _ in range(3):
        tasks = [asyncio.create_task(traffic(n)) for n in range(24)]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(0.2)
        await asyncio.to_thread(server.start)
        await asyncio.sleep(0.3)
        stopping = True
        await asyncio.gather(*tasks)
        stopping = False
    assert 503 in statuses  # the shutdown did land under load
    # (once paid, the inquiries answer 400 billing_already_paid: DOKU's words, not a failure)
    assert {status for status in statuses if status >= 500} == {503}


def cluster_pids(server: EmbeddedPostgres) -> list[int]:
    """The postmaster and every process it started."""
    postmaster = int((server.pgdata / "postmaster.pid").read_text().split()[0])
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            if int(fields.get("PPid", "0").strip()) == postmaster:
                children.append(int(status.parent.name))
    return [postmaster, *children]


@contextlib.asynccontextmanager
async def frozen(server: EmbeddedPostgres, seconds: float) -> AsyncIterator[None]:
    """PostgreSQL hangs instead of refusing: every process of the cluster is stopped (SIGSTOP) for
    ``seconds``, then continued whatever the block is doing (a request stuck on the database would
    otherwise wait for a thaw that never comes). The postmaster is stopped first, so that it starts no
    process meanwhile; a backend that ends between the listing and its SIGSTOP needs none."""
    postmaster, *_ = cluster_pids(server)
    pids = [postmaster]

    def thaw() -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    os.kill(postmaster, signal.SIGSTOP)
    timer = asyncio.get_running_loop().call_later(seconds, thaw)
    try:
        for pid in cluster_pids(server)[1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                pids.append(pid)
        yield
        await asyncio.sleep(max(0.0, timer.when() - asyncio.get_running_loop().time()))
    finally:
        timer.cancel()
        thaw()


async def timed(request) -> tuple[int, float]:
    started = time.perf_counter()
    reply = await request
    return reply.status, time.perf_counter() - started


async def test_a_frozen_database_gets_every_request_its_503_within_its_budget(
    aiohttp_client, own_database, admin_headers
):
    server, dsn = own_database
    settings = make_settings(notification_db_timeout_s=1.5, admin_db_timeout_s=1.5)
    client = await aiohttp_client(make_app(settings, dsn))
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    assert (await client.post("/v1/payment-codes", json=code_fields(), headers=admin_headers)).status == 201
    assert (await doku.inquiry(CODE)).status == 200  # pooled connections exist, and are frozen below

    async with frozen(server, seconds=4.0):
        for _ in range(2):  # the first round holds pooled connections; the second needs new ones
            inquiries = [timed(doku.inquiry(CODE)) for _ in range(6)]
            notice = {"invoice_number": "INV-2026-000123", "amount": 150000, "original_request_id": "x"}
            notifications = [timed(doku.notify(CODE, **notice)) for _ in range(3)]
            admin = [timed(client.get(f"/v1/payment-codes/{CODE}", headers=admin_headers))]
            answers = await asyncio.gather(*inquiries, *notifications, *admin)
            budgets = [settings.doku_db_timeout_s] * 6 + [settings.notification_db_timeout_s] * 4
            for (status, seconds), budget in zip(answers, budgets, strict=True):
                assert status == 503
                assert seconds < budget + SLACK_S, f"answered after {seconds:.2f} s, budget {budget} s"
        readiness = await timed(client.get("/readyz"))
        assert readiness[0] == 503
        assert readiness[1] < 1.0 + SLACK_S
        inquiry_s = max(seconds for _, seconds in answers[:6])
        others_s = max(seconds for _, seconds in answers[6:])
        print(
            f"frozen: inquiries 503 in {inquiry_s:.2f} s, others {others_s:.2f} s, readyz {readiness[1]:.2f}"
        )

    await poll(client, "/readyz", 200, seconds=10.0)
    assert (await doku.inquiry(CODE)).status == 200


async def test_a_frozen_database_keeps_the_money_routes_within_their_budget(
    aiohttp_client, own_database, admin_headers
):
    """Found in review: the admin lists of exceptions, reconciliation and the inbox, frozen under."""
    server, dsn = own_database
    settings = make_settings(admin_db_timeout_s=1.0, doku_db_timeout_s=0.8, db_pool_min=4, db_pool_max=4)
    client = await aiohttp_client(make_app(settings, dsn))
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    assert (await client.post("/v1/payment-codes", json=code_fields(), headers=admin_headers)).status == 201
    for _ in range(4):  # the pool's connections are open and idle: the next statements reach the server
        assert (await client.get("/v1/exceptions", headers=admin_headers)).status == 200
    async with frozen(server, 4.0):
        results = await asyncio.gather(
            timed(client.get("/v1/exceptions", headers=admin_headers)),
            timed(client.get("/v1/reconciliation", headers=admin_headers)),
            timed(client.get("/v1/notifications", headers=admin_headers)),
            timed(doku.inquiry(CODE)),
        )
    for status, seconds in results:
        assert status == 503, results
        assert seconds < 2.0, results  # the 1 s budget (0.8 s for DOKU), and slack
    deadline = time.monotonic() + 20
    while (await client.get("/v1/exceptions", headers=admin_headers)).status != 200:
        assert time.monotonic() < deadline, "no recovery after the database came back"
        await asyncio.sleep(0.1)
    assert (await doku.inquiry(CODE)).status == 200


def import_in_two_batches() -> tuple[bytes, bytes]:
    """A CSV import of two batches: its first (with the header), and the rest."""
    rows = [f"88965300{n:08d},1000,INV-{n},Budi,false" for n in range(2 * manage.IMPORT_BATCH)]
    return csv_of(rows[: manage.IMPORT_BATCH]), "".join(
        f"{row},{CLIENT_ID}\n" for row in rows[manage.IMPORT_BATCH :]
    ).encode()


async def first_batch_copied(dsn: str) -> None:
    """Until an import's first batch is at the database (its lines are copied last)."""
    watcher = await asyncpg.connect(dsn)
    try:
        for _ in range(1000):
            if await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY%dipc_import_lines%'"
            ):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the import's first batch never reached the database")
    finally:
        await watcher.close()


async def imports_whole_once_back(client, body: bytes, headers: dict[str, str]) -> None:
    """``body`` (two batches), sent again until the database is back, imports whole: nothing of an import
    that failed under it was registered."""
    deadline = time.monotonic() + 20
    while (again := await client.post("/v1/payment-codes/import", data=body, headers=headers)).status != 200:
        assert again.status == 503, await again.text()
        assert time.monotonic() < deadline, "no recovery after the database came back"
        await asyncio.sleep(0.1)
    assert ((result := await again.json())["imported"], result["rejected_count"]) == (
        2 * manage.IMPORT_BATCH,
        0,
    )


async def test_a_database_frozen_under_an_import_gets_it_a_503_within_a_step(
    aiohttp_client, own_database, admin_headers
):
    """(Left open by the performance work.) An import holds one connection in one transaction while its
    rows come, so no one deadline fits it, and a database frozen under an upload held it for the
    import's hour. Each of its database steps now has the admin budget: the upload is answered 503 once
    the step in flight outlasts it, also while the upload pauses, nothing of it is registered, and the
    same file goes in once the database is back."""
    server, dsn = own_database
    client = await aiohttp_client(make_app(make_settings(admin_db_timeout_s=1.0), dsn))
    first, rest = import_in_two_batches()
    frozen_now, answered = asyncio.Event(), asyncio.Event()

    async def upload() -> AsyncIterator[bytes]:
        yield first  # one batch: it goes to the database
        await frozen_now.wait()
        yield rest  # the next batch waits for it
        await answered.wait()  # and the upload pauses: the import does not wait for more

    headers = admin_headers | {"Content-Type": "text/csv"}
    before = await scrape(client)
    posting = asyncio.create_task(client.post("/v1/payment-codes/import", data=upload(), headers=headers))
    await first_batch_copied(dsn)
    async with frozen(server, seconds=5.0):
        frozen_now.set()
        async with asyncio.timeout(4.0):  # not the import's hour: its step's second, and slack
            answer = await posting
    answered.set()
    assert answer.status == 503, await answer.text()
    error = (await answer.json())["error"]
    assert error["code"] == "UNAVAILABLE"
    assert "did not answer the import (batch) within 1 s" in error["message"]
    after = await scrape(client)
    for outcome in ("ok", "timeout"):  # the first batch, then the second
        counts = [
            value(
                samples, "dipc_db_operation_duration_seconds_count", operation="import.batch", result=outcome
            )
            for samples in (before, after)
        ]
        assert counts[1] - counts[0] == 1, (outcome, counts)

    await imports_whole_once_back(client, first + rest, headers)


async def test_an_upload_that_stalls_on_a_frozen_database_is_answered_without_waiting_for_it(
    aiohttp_client, own_database, admin_headers
):
    """An upload that stalls while its batch is at a database that hangs: the import has failed on its own
    (408), and nothing of it can be kept. It used to roll back over the wire, which waits for the
    database to finish the batch first: the answer came only after the rollback's own step budget (43 s
    with the defaults). Its connection is now closed instead (PostgreSQL rolls back a transaction whose
    connection is gone): the answer comes at the body timeout, nothing is registered, and the same file
    goes in once the database is back."""
    server, dsn = own_database
    app = make_app(make_settings(admin_db_timeout_s=4.0, body_timeout_s=1.0), dsn)
    client = await aiohttp_client(app)
    first, rest = import_in_two_batches()
    frozen_now, answered = asyncio.Event(), asyncio.Event()

    async def upload() -> AsyncIterator[bytes]:
        yield first
        await frozen_now.wait()
        yield rest  # a batch that goes to the frozen database
        await answered.wait()  # and the upload stalls past the body timeout

    headers = admin_headers | {"Content-Type": "text/csv"}
    posting = asyncio.create_task(client.post("/v1/payment-codes/import", data=upload(), headers=headers))
    await first_batch_copied(dsn)
    async with frozen(server, seconds=6.0):
        frozen_now.set()
        async with asyncio.timeout(3.0):  # the body timeout and slack, not the step budget of 4 s
            answer = await posting
        answered.set()
        assert answer.status == 408, await answer.text()
        assert "stalled" in (await answer.json())["error"]["message"]
        assert (await client.get("/healthz")).status == 200

    await imports_whole_once_back(client, first + rest, headers)


async def test_a_database_frozen_under_a_cli_import_ends_it_within_a_step(own_database):
    """The same for `dipc codes import`, which had no bound at all: it waited as long as the database
    hung. It now fails within the admin budget (DIPC_ADMIN_DB_TIMEOUT_S), and registers nothing, also
    while the pipe it reads from is still open (the read waiting on it must not hold the exit)."""
    server, dsn = own_database
    first, rest = import_in_two_batches()
    process = await asyncio.create_subprocess_exec(
        *DIPC, "codes", "import", "--format", "csv", "-",
        env=dipc_env(dsn, DIPC_ADMIN_DB_TIMEOUT_S="1"),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stdin is not None
    try:
        process.stdin.write(first)
        await process.stdin.drain()
        await first_batch_copied(dsn)
        async with frozen(server, seconds=5.0):
            process.stdin.write(rest)  # and the pipe stays open
            await process.stdin.drain()
            async with asyncio.timeout(4.0):
                await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        process.stdin.close()
    assert process.stdout is not None
    assert process.stderr is not None
    stdout, stderr = await process.stdout.read(), await process.stderr.read()
    assert process.returncode == 1, (stdout, stderr)
    assert b"did not answer the import (batch) within 1 s" in stderr, stderr
    check = await asyncpg.connect(dsn)
    try:
        assert await check.fetchval("SELECT count(*) FROM payment_codes") == 0
    finally:
        await check.close()


async def test_a_requests_database_deadline_is_logged_with_its_request_id(
    aiohttp_client, own_database, admin_headers, captured_log
):
    """The on-call engineer finds the warning of a 503's database deadline by the request's Request-Id,
    as the request's own line has it. (Batches, which serve many requests at once, log without one.)"""
    server, dsn = own_database
    client = await aiohttp_client(make_app(make_settings(admin_db_timeout_s=1.0), dsn))
    assert (await client.get("/v1/payment-codes", headers=admin_headers)).status == 200
    async with frozen(server, seconds=3.0):
        headers = admin_headers | {"Request-Id": "req-frozen-1"}
        assert (await client.get("/v1/payment-codes", headers=headers)).status == 503
    deadlines = {line["what"]: line.get("request_id") for line in captured_log.events("db.deadline_exceeded")}
    assert deadlines["admin.list_codes"] == "req-frozen-1"
    assert deadlines.get("outbox.floor") is None  # a background loop's, of no request
    [answered] = [line for line in captured_log.events("http.request") if line["status"] == 503]
    assert answered["request_id"] == "req-frozen-1"
    assert (await client.get("/v1/payment-codes", headers=admin_headers)).status == 200
