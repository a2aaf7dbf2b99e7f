"""`dipc serve` as a process: graceful SIGTERM, several workers on one port, `dipc doctor`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
import uuid

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from server.core.times import utcnow
from server.doku.auth import signed_headers
from server.doku.client import DokuSimulator, inquiry_body
from server.doku.standin import DokuStandIn
from server.store import migrate
from tests.conftest import CLIENT, CLIENT_ID, CODE, SECRET_KEY, dipc_env, table_locked
from tests.integration.test_cli import DIPC, free_port, run, wait_ready


def server_env(database_url: str, port: int, **extra: str) -> dict[str, str]:
    defaults = {"DIPC_PORT": str(port), "DIPC_LOG_LEVEL": "WARNING", "DIPC_ADMIN_TOKEN": "t"}
    return dipc_env(database_url, **(defaults | extra))


def spawn(env: dict[str, str], *, stdout: int = subprocess.DEVNULL) -> subprocess.Popen:
    return subprocess.Popen([*DIPC, "serve"], env=env, stdout=stdout, stderr=subprocess.PIPE)


async def register_code(pool) -> None:
    await pool.execute(
        "INSERT INTO payment_codes (payment_code, client_id, channel, invoice_number, amount, customer_name) "
        "VALUES ($1, $2, 'ALFA', 'INV-2026-000123', 150000, 'Budi')",
        CODE,
        CLIENT_ID,
    )


async def test_sigterm_lets_every_accepted_request_finish_and_exits_0(database_url, pool):
    await register_code(pool)
    port = free_port()
    env = server_env(
        database_url, port, DIPC_DOKU_DB_TIMEOUT_S="20", DIPC_DB_POOL_MAX="30", DIPC_SHUTDOWN_TIMEOUT_S="15"
    )
    server = spawn(env)
    try:
        await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)

        async with aiohttp.ClientSession() as session:
            doku = DokuSimulator(session, f"http://127.0.0.1:{port}", CLIENT)
            async with table_locked(pool):  # every inquiry now waits in PostgreSQL
                inquiries = [asyncio.create_task(doku.inquiry(CODE)) for _ in range(20)]
                long_poll = asyncio.create_task(
                    session.get(
                        f"http://127.0.0.1:{port}/v1/events?wait=60", headers={"Authorization": "Bearer t"}
                    )
                )
                # Accepted, and inside the server: each waits on the lock in PostgreSQL, for its batch to
                # follow one that does, or for its turn behind the code's other inquiries recorded alone
                # (ADR 12: a batch that meets the lock is recorded one by one, a code's one at a time).
                for _ in range(200):
                    waiting = await pool.fetchval(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE application_name = 'dipc' AND wait_event_type = 'Lock'"
                    )
                    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                        families = text_string_to_metric_families(await response.text())
                        [queued] = [
                            s.value for f in families for s in f.samples if s.name == "dipc_inquiries_queued"
                        ]
                    if waiting + queued == 20:
                        break
                    await asyncio.sleep(0.05)
                assert waiting + queued == 20
                server.send_signal(signal.SIGTERM)
                poll_response = await asyncio.wait_for(long_poll, 5)  # a parked long-poll answers at once
                assert poll_response.status == 200
                await asyncio.sleep(0.5)
                assert server.poll() is None  # still draining
                with _refused():
                    async with session.get(f"http://127.0.0.1:{port}/healthz") as _:
                        pass
            replies = await asyncio.gather(*inquiries)
        assert [reply.status for reply in replies] == [200] * 20
        assert all(reply.signature_valid for reply in replies)
        code = await asyncio.to_thread(server.wait, 20)
        assert code == 0, server.stderr.read().decode()
    finally:
        if server.poll() is None:  # a failed assertion must not leave it serving
            server.kill()
            server.wait()


class _refused:
    """Asserts that the block fails to connect: the listening socket is closed during the drain."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, _tb) -> bool:
        assert kind is not None, "a new connection was accepted"
        assert issubclass(kind, aiohttp.ClientConnectionError), kind
        return True


async def healthz_pids(port: int, *, tries: int) -> set[int]:
    """Which processes answer ``tries`` fresh connections (the kernel spreads them over the workers)."""
    pids: set[int] = set()
    for _ in range(tries):
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.get(f"http://127.0.0.1:{port}/healthz") as response,
        ):
            pids.add((await response.json())["pid"])
    return pids


async def both_workers_serving(port: int, server: subprocess.Popen) -> set[int]:
    """The pids of the two workers, once both answer: one /readyz says nothing of the other, whose
    values are not written yet (a scrape then sums one worker's pool)."""
    await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)
    pids: set[int] = set()
    for _ in range(50):  # the second worker may start listening a moment after the first
        pids |= await healthz_pids(port, tries=10)
        if len(pids) == 2:
            break
        await asyncio.sleep(0.1)
    assert len(pids) == 2, pids
    return pids


async def test_two_workers_share_the_port_and_report_consistent_totals(database_url, pool):
    port = free_port()
    server = spawn(server_env(database_url, port, DIPC_WORKERS="2"))
    try:
        await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)
        pids: set[int] = set()
        sent = 0
        deadline = time.monotonic() + 30
        while (len(pids) < 2 or sent < 100) and time.monotonic() < deadline:
            pids |= await healthz_pids(port, tries=10)
            sent += 10
        assert len(pids) == 2, "both workers should answer"

        totals = []
        for _ in range(6):  # scrapes land on either worker; each must report the sum of both
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
                session.get(f"http://127.0.0.1:{port}/metrics") as response,
            ):
                text = await response.text()
            totals.append(
                sum(
                    sample.value
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                    if sample.name == "dipc_http_requests_total" and sample.labels["route"] == "/healthz"
                )
            )
        assert totals == [sent] * 6
        applied = await pool.fetchval("SELECT count(*) FROM schema_migrations")
        assert applied == len(migrate.available())  # migrated once, by the supervisor
    finally:
        server.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.wait, 30)
    assert code == 0, server.stderr.read().decode()


async def test_doctor_reports_a_healthy_deployment_and_fails_on_problems(database_url, pool, aiohttp_server):
    doku = DokuStandIn({CLIENT_ID: CLIENT})
    standin = await aiohttp_server(doku.app())
    env = server_env(
        database_url, 8080, DIPC_DOKU_API_URL=str(standin.make_url("")).rstrip("/"), DIPC_RECONCILE="on"
    )
    result = await asyncio.to_thread(run, "doctor", "--json", env=env)
    assert result.returncode == 0, result.stdout
    report = orjson.loads(result.stdout)
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert statuses["database"] == statuses["migrations"] == statuses["clock"] == "ok"
    assert statuses["DOKU clients"] == "ok"
    assert statuses[f"DOKU API ({CLIENT_ID})"] == "ok"
    assert doku.problems == []
    assert len(doku.seen) == 1

    # DOKU refuses a key it does not know; an API nobody answers at is unreachable.
    wrong_key = await asyncio.to_thread(
        run, "doctor", env=env | {"DIPC_SECRET_KEY": "SK-not-the-one-doku-has"}
    )
    assert wrong_key.returncode == 1
    assert b"refused our signature" in wrong_key.stdout
    nobody = await asyncio.to_thread(run, "doctor", env=env | {"DIPC_DOKU_API_URL": "http://127.0.0.1:9"})
    assert nobody.returncode == 1
    assert b"unreachable" in nobody.stdout
    # Without a reconciler, only checks by hand need DOKU's API: a warning, not a failure.
    by_hand = await asyncio.to_thread(
        run, "doctor", env=env | {"DIPC_DOKU_API_URL": "http://127.0.0.1:9", "DIPC_RECONCILE": "off"}
    )
    assert by_hand.returncode == 0, by_hand.stdout
    assert b"unreachable" in by_hand.stdout

    broken = run("doctor", env=env | {"DIPC_SECRET_KEY": "", "DIPC_WEBHOOK_URL": "http://example.com/hook"})
    assert broken.returncode == 1
    assert b"no secret key" in broken.stdout
    assert b"DIPC_WEBHOOK_SECRET" in broken.stdout
    unreachable = run("doctor", env=env | {"DATABASE_URL": "postgresql://x@/x?host=/nonexistent"})
    assert unreachable.returncode == 1
    assert b"database unreachable" in unreachable.stdout


async def test_logs_are_json_lines_with_masked_codes_and_no_secrets(database_url, pool):
    await register_code(pool)
    port = free_port()
    env = server_env(database_url, port, DIPC_LOG_LEVEL="INFO", DIPC_LOG_FORMAT="json")
    server = spawn(env, stdout=subprocess.PIPE)
    try:
        await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)
        async with aiohttp.ClientSession() as session:
            reply = await DokuSimulator(session, f"http://127.0.0.1:{port}", CLIENT).inquiry(
                CODE, request_id="req-log-1"
            )
        assert reply.status == 200
    finally:
        server.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.to_thread(server.communicate, timeout=30)
    lines = [orjson.loads(line) for line in stdout.splitlines()]  # every line is one JSON document
    [access] = [
        line
        for line in lines
        if line.get("event") == "http.request" and line.get("request_id") == "req-log-1"
    ]
    assert access["route"] == "/doku/inquiry"
    assert access["outcome"] == "SUCCESS"
    assert access["status"] == 200
    assert isinstance(access["ms"], float)
    assert access["payment_code"] == "************8123"
    assert access["level"] == "info"
    assert {"timestamp", "client_id"} <= set(access)
    everything = stdout + stderr
    assert CODE.encode() not in everything
    assert SECRET_KEY.encode() not in everything
    assert reply.headers["Signature"].encode() not in everything


async def test_a_worker_that_dies_is_replaced(database_url, pool):
    port = free_port()
    server = spawn(server_env(database_url, port, DIPC_WORKERS="2"))
    try:
        before = await both_workers_serving(port, server)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        after: set[int] = set()
        for _ in range(100):
            await asyncio.sleep(0.1)
            try:
                after = await healthz_pids(port, tries=10)
            except aiohttp.ClientError:
                continue
            if len(after - before) == 1 and victim not in after:
                break
        assert victim not in after
        assert len(after - before) == 1, "a new worker took the dead one's place"
        assert server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.wait, 30)
    assert code == 0


BURST = 32


def signed_inquiry(code: str) -> bytes:
    """One signed inquiry as raw HTTP/1.1 bytes, keep-alive (HTTP/1.1's default)."""
    body = inquiry_body(code)
    headers = signed_headers(
        CLIENT, request_id=str(uuid.uuid4()), target="/doku/inquiry", body=body, now=utcnow(), response=False
    )
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (
        f"POST /doku/inquiry HTTP/1.1\r\nHost: dipc\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{head}\r\n"
    ).encode() + body


_unread: dict[socket.socket, bytes] = {}  # bytes received past the end of a response (the next one's)


def read_response(sock: socket.socket) -> int:
    """The status of one HTTP response read whole from ``sock`` (raises on a reset or an early close)."""
    data = _unread.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed in the middle of a response")
        rest += chunk
    _unread[sock] = rest[length:]
    return int(head.split(b" ")[1])


async def test_sigterm_answers_requests_already_sent_on_keep_alive_connections(database_url, pool):
    await register_code(pool)
    port = free_port()
    server = spawn(server_env(database_url, port))
    await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)

    def burst_then_sigterm() -> list[object]:
        connections = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(BURST)]
        try:
            for sock in connections:  # open and warm: one answered request each, then idle
                sock.sendall(signed_inquiry(CODE))
                assert read_response(sock) == 200
            for sock in connections:  # the burst: every request is sent before the signal
                sock.sendall(signed_inquiry(CODE))
            server.send_signal(signal.SIGTERM)
            outcomes: list[object] = []
            for sock in connections:
                try:
                    outcomes.append(read_response(sock))
                except OSError as error:
                    outcomes.append(type(error).__name__)
            return outcomes
        finally:
            for sock in connections:
                sock.close()

    outcomes = await asyncio.to_thread(burst_then_sigterm)
    code = await asyncio.to_thread(server.wait, 30)
    assert outcomes == [200] * BURST
    assert code == 0


async def test_sigterm_answers_requests_queued_behind_one_in_progress_on_a_keep_alive_connection(
    database_url, pool
):
    await register_code(pool)
    port = free_port()
    server = spawn(server_env(database_url, port, DIPC_DOKU_DB_TIMEOUT_S="20", DIPC_DB_POOL_MAX="40"))
    await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)
    connections = [socket.create_connection(("127.0.0.1", port), timeout=20) for _ in range(BURST)]
    try:
        for sock in connections:
            sock.sendall(signed_inquiry(CODE))
        assert [await asyncio.to_thread(read_response, sock) for sock in connections] == [200] * BURST
        async with table_locked(pool):  # every inquiry now waits in PostgreSQL
            for sock in connections:
                sock.sendall(signed_inquiry(CODE))
            for _ in range(200):
                waiting = await pool.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE application_name = 'dipc' AND wait_event_type = 'Lock'"
                )
                if waiting == BURST:
                    break
                await asyncio.sleep(0.05)
            for sock in connections:  # a second request on each, sent while the first is in progress
                sock.sendall(signed_inquiry(CODE))
            await asyncio.sleep(0.2)
            server.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)

        def answers(sock: socket.socket) -> list[object]:
            outcomes: list[object] = []
            for _ in range(2):
                try:
                    outcomes.append(read_response(sock))
                except OSError as error:
                    outcomes.append(type(error).__name__)
            return outcomes

        outcomes = [await asyncio.to_thread(answers, sock) for sock in connections]
    finally:
        for sock in connections:
            sock.close()
    code = await asyncio.to_thread(server.wait, 30)
    assert outcomes == [[200, 200]] * BURST
    assert code == 0


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """The status and body of the next (final) response on ``reader``."""
    head = await reader.readuntil(b"\r\n\r\n")
    while head.startswith(b"HTTP/1.1 1"):  # an interim answer (100 Continue)
        head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    return int(head.split(b" ")[1]), await reader.readexactly(length)


async def test_sigterm_lets_an_upload_whose_body_is_still_arriving_finish(database_url, pool):
    """(Found by a review of f4d6f7a.) The rest of a body still arriving at SIGTERM was dropped (aiohttp
    drops what comes once its stop begins), and f4d6f7a's stop ended healthy database work at half the
    timeout: an import still going 2 s after the signal got a 503 and was rolled back. The stop now waits
    for the body, and gives work on a healthy database the timeout less a second (here 7 of 8 s)."""
    port = free_port()
    server = spawn(server_env(database_url, port, DIPC_SHUTDOWN_TIMEOUT_S="8"))
    await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)
    rows = [f"88965{n:011d},1000,INV-UP-{n},Budi {n},false,{CLIENT_ID}" for n in range(500)]
    body = (
        "payment_code,amount,invoice_number,customer_name,reusable,client_id\n" + "\n".join(rows) + "\n"
    ).encode()
    head = (
        f"POST /v1/payment-codes/import HTTP/1.1\r\nHost: dipc\r\nAuthorization: Bearer t\r\n"
        f"Content-Type: text/csv\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        pieces = [body[n : n + len(body) // 10] for n in range(0, len(body), len(body) // 10)]
        for k, piece in enumerate(pieces):  # about 5 s in all, the signal 0.5 s in
            writer.write(piece)
            await writer.drain()
            if k == 0:
                await asyncio.sleep(0.5)
                server.send_signal(signal.SIGTERM)
            await asyncio.sleep(4.5 / len(pieces))
        async with asyncio.timeout(15):
            status, answer = await _answer(reader)
    finally:
        writer.close()
    code = await asyncio.to_thread(server.wait, 30)
    assert (status, orjson.loads(answer).get("imported")) == (200, 500), answer
    assert (
        await pool.fetchval("SELECT count(*) FROM payment_codes WHERE invoice_number LIKE 'INV-UP-%'") == 500
    )
    assert code == 0


async def test_sigterm_answers_a_body_sent_after_100_continue(database_url, pool):
    """(Found by a review of 106c7bb.) A client that sent Expect: 100-continue sends its body one round trip
    after its head. A signed notification whose head came before SIGTERM and whose body came after it was
    never answered, nor logged: aiohttp dropped the body. It is answered, and stored."""
    await register_code(pool)
    port = free_port()
    server = spawn(server_env(database_url, port, DIPC_SHUTDOWN_TIMEOUT_S="8"))
    await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)
    from server.doku.client import notification_body

    body = notification_body(
        CODE, invoice_number="INV-2026-000123", amount=150000, original_request_id="expect-1"
    )
    headers = signed_headers(
        CLIENT, request_id="expect-1", target="/doku/notification", body=body, now=utcnow(), response=False
    )
    head = (
        "POST /doku/notification HTTP/1.1\r\nHost: dipc\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        + "\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        async with asyncio.timeout(5):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        server.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        writer.write(body)
        async with asyncio.timeout(15):
            status, answer = await _answer(reader)
    finally:
        writer.close()
    code = await asyncio.to_thread(server.wait, 30)
    assert status == 200, answer
    assert await pool.fetchval("SELECT count(*) FROM payments WHERE transaction_ref = 'expect-1'") == 1
    assert code == 0


async def test_sigterm_answers_a_long_poll_at_once_and_the_request_queued_behind_it(database_url, pool):
    """(Found by a review of f4d6f7a.) A long-poll parked for events, with a signed inquiry sent behind it
    on the same connection: the stop waited for the queued inquiry, which waited for the poll, which was
    released only later in the stop. The poll was cut off by the stop's deadline with a 503 that blamed
    the database (before f4d6f7a: the poll waited the whole timeout and the inquiry went unanswered).
    Parked long-polls are answered when the stop begins now: the poll with no events, then the inquiry."""
    await register_code(pool)
    port = free_port()
    server = spawn(server_env(database_url, port, DIPC_SHUTDOWN_TIMEOUT_S="8"))
    await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)
    poll = b"GET /v1/events?after=1000000&wait=60 HTTP/1.1\r\nHost: dipc\r\nAuthorization: Bearer t\r\n\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(poll + signed_inquiry(CODE))
        await asyncio.sleep(1.0)  # the poll is parked; the inquiry waits behind it
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            polled = await _answer(reader)
            took = time.monotonic() - started
            inquired = await _answer(reader)
    finally:
        writer.close()
    code = await asyncio.to_thread(server.wait, 30)
    assert (polled[0], orjson.loads(polled[1])["items"]) == (200, [])
    assert took < 1.0, f"the poll was answered {took:.1f} s after the signal"
    assert inquired[0] == 200, inquired
    assert code == 0


async def test_sigterm_does_not_wait_twice_for_a_body_that_never_finishes(database_url, pool):
    """(Found by a review of 25cbaa0.) The stop waited up to DIPC_SHUTDOWN_TIMEOUT_S for bodies still
    arriving, then aiohttp waited as long again for the handler still reading one: a client trickling a
    body (no credentials needed: a DOKU route reads the body before it authenticates) held the stop for
    twice the timeout, past what a service manager allows. A body not in by the timeout is cut off."""
    port = free_port()
    server = spawn(server_env(database_url, port, DIPC_SHUTDOWN_TIMEOUT_S="4", DIPC_BODY_TIMEOUT_S="30"))
    await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST /doku/inquiry HTTP/1.1\r\nHost: dipc\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4000\r\n\r\n{"
        )
        started = None
        for k in range(60):  # a byte every 0.2 s, for longer than the stop may take
            await asyncio.sleep(0.2)
            if k == 5:
                started = time.monotonic()
                server.send_signal(signal.SIGTERM)
            if server.poll() is not None:
                break
            with contextlib.suppress(ConnectionError):
                writer.write(b" ")
                await writer.drain()
        code = await asyncio.to_thread(server.wait, 30)
        took = time.monotonic() - started
    finally:
        writer.close()
    assert code == 0
    assert took < 4 + 1.0, f"the stop took {took:.1f} s"
