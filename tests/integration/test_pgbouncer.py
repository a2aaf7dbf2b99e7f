"""dipc behind a real pgbouncer in transaction mode (Debian's package), as many replicas would run it.

Transaction pooling shares a few server connections among many clients, one transaction at a time.
Three things need care, and each is exercised here: asyncpg's named prepared statements (pgbouncer before
1.21 cannot follow them: DIPC_DB_STATEMENT_CACHE_SIZE=0), the event feed's LISTEN (it needs a session of
its own: DIPC_LISTEN_DATABASE_URL goes to PostgreSQL directly), and session settings sent at connect
(pgbouncer must be told to ignore them; set them on the role instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg
import orjson
import pytest

from server.app import make_app
from server.doku.client import DokuSimulator
from tests.conftest import CLIENT, CLIENT_ID, code_fields, dipc_env, make_settings
from tests.integration.test_cli import free_port, run
from tests.integration.test_outage import frozen

PGBOUNCER = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin:/usr/local/sbin")


@dataclass(frozen=True)
class Bouncer:
    url: str
    version: tuple[int, ...]
    console: str  # pgbouncer's admin console (PAUSE, RESUME)


def _server_of(dsn: str) -> str:
    """The pgbouncer [databases] entry for the PostgreSQL at ``dsn``."""
    parts = urlsplit(dsn)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    fields = {
        "host": parts.hostname or query.get("host", ""),
        "port": str(parts.port or query.get("port", 5432)),
        "dbname": parts.path.lstrip("/"),
        "user": parts.username or query.get("user", "postgres"),
    }
    if parts.password:
        fields["password"] = parts.password
    return " ".join(f"{key}={value}" for key, value in fields.items())


@pytest.fixture
def bouncer(database_url: str) -> Iterator[Bouncer]:
    with running_bouncer(database_url) as started:
        yield started


@contextlib.contextmanager
def running_bouncer(database_url: str) -> Iterator[Bouncer]:
    """A pgbouncer in transaction mode in front of the PostgreSQL at ``database_url``."""
    if PGBOUNCER is None:
        if os.environ.get("CI"):
            pytest.fail("pgbouncer is not installed: .ci/run installs Debian's package")
        pytest.skip("pgbouncer is not installed (apt-get install pgbouncer)")
    version_text = subprocess.run([PGBOUNCER, "--version"], capture_output=True, text=True).stdout
    version = tuple(int(n) for n in re.search(r"(\d+)\.(\d+)", version_text).groups())
    port = free_port()
    # pgbouncer refuses to run as root, so as root it runs as another user, which must reach its folder:
    # one this test creates for it (the test's tmp_path sits under pytest's 0700 base directory).
    home = Path(tempfile.mkdtemp(prefix="dipc-pgbouncer-"))
    (home / "pgbouncer.ini").write_text(
        f"""
[databases]
dipc = {_server_of(database_url)}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
admin_users = postgres
; A server login that fails (one a PAUSE cut short) is tried again after 1 s, not pgbouncer's 15.
server_login_retry = 1
pool_mode = transaction
; Fewer server connections than dipc's pool: clients really share them.
default_pool_size = 2
max_client_conn = 200
; Session settings dipc sends at connect; behind pgbouncer they belong on the role (README).
ignore_startup_parameters = extra_float_digits,jit,statement_timeout,idle_in_transaction_session_timeout
logfile = {home}/pgbouncer.log
pidfile = {home}/pgbouncer.pid
"""
    )
    user = None
    if os.geteuid() == 0:  # pgbouncer refuses to run as root
        for candidate in ("dipc_postgres", "nobody"):
            try:
                pwd.getpwnam(candidate)
            except KeyError:
                continue
            user = candidate
            break
        shutil.chown(home, user)
    process = subprocess.Popen(
        [PGBOUNCER, str(home / "pgbouncer.ini")], user=user, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                log = (home / "pgbouncer.log").read_text() if (home / "pgbouncer.log").exists() else ""
                raise AssertionError(f"pgbouncer did not start: {process.stdout.read()!r} {log}") from None
            time.sleep(0.05)
    try:
        yield Bouncer(
            url=f"postgresql://postgres@127.0.0.1:{port}/dipc",
            version=version,
            console=f"postgresql://postgres@127.0.0.1:{port}/pgbouncer",
        )
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(home, ignore_errors=True)


async def test_dipc_serves_through_a_transaction_pooling_pgbouncer(
    aiohttp_client, pool, database_url, bouncer
):
    settings = make_settings(
        db_pool_min=4, db_pool_max=8, db_statement_cache_size=0, listen_database_url=database_url
    )
    client = await aiohttp_client(make_app(settings, bouncer.url))
    headers = {"Authorization": "Bearer test-admin-token"}
    assert (await client.get("/readyz")).status == 200

    # A long-poll parked before anything happens is woken by the first event: LISTEN works (directly).
    feed = asyncio.create_task(client.get("/v1/events", params={"after": "0", "wait": "20"}, headers=headers))
    await asyncio.sleep(0.3)
    codes = [f"88965000000{n:05d}" for n in range(24)]
    started = time.monotonic()
    created = await asyncio.gather(
        *(
            client.post(
                "/v1/payment-codes",
                json=code_fields(payment_code=code, invoice_number=f"INV-{code}"),
                headers=headers,
            )
            for code in codes
        )
    )
    assert {response.status for response in created} == {201}
    woken = await asyncio.wait_for(feed, 10)
    assert (await woken.json())["items"][0]["type"] == "code.created"
    assert time.monotonic() - started < 5

    # Many concurrent inquiries and notifications share two server connections.
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    replies = await asyncio.gather(*(doku.inquiry(code) for code in codes))
    assert {(reply.status, reply.signature_valid) for reply in replies} == {(200, True)}
    paid = await asyncio.gather(
        *(
            doku.notify(code, invoice_number=f"INV-{code}", amount=150000, original_request_id=f"r-{code}")
            for code in codes[:12]
        )
    )
    assert {reply.status for reply in paid} == {200}
    assert await pool.fetchval("SELECT count(*) FROM payments WHERE kind = 'normal'") == 12

    # A bulk import: a temporary table and COPY inside one transaction.
    csv = "payment_code,amount,invoice_number,customer_name,client_id\n" + "".join(
        f"88965100000{n:05d},1000,IMP-{n},Pelanggan,{CLIENT_ID}\n" for n in range(300)
    )
    imported = await client.post(
        "/v1/payment-codes/import", data=csv, headers=headers | {"Content-Type": "text/csv"}
    )
    assert imported.status == 200, await imported.text()
    assert (await imported.json())["imported"] == 300


async def test_a_database_paused_behind_pgbouncer_is_a_503_within_the_budget(
    aiohttp_client, pool, database_url, bouncer
):
    """(Found by review.) Behind pgbouncer a new connection's login completes without a server, so a
    database that hangs shows first in the pool's init of it. No deadline could reach that connection (no
    request holds it yet), and asyncpg closes a cancelled one gracefully, waiting for the server: requests
    that needed a new connection waited until the database answered again, past their budget."""
    settings = make_settings(
        db_pool_min=1,
        db_pool_max=6,
        db_statement_cache_size=0,
        listen_database_url=database_url,
        admin_db_timeout_s=1.0,
    )
    client = await aiohttp_client(make_app(settings, bouncer.url))
    headers = {"Authorization": "Bearer test-admin-token"}
    console = await asyncpg.connect(bouncer.console, statement_cache_size=0)
    # Logged in before the pause: a PAUSE during pgbouncer's first server login fails it, and pgbouncer
    # then refuses logins for server_login_retry (15 s), which the read after RESUME would meet.
    assert (await client.get("/v1/payment-codes", headers=headers)).status == 200

    async def timed_read() -> tuple[int, float]:  # each holds a connection of its own: most need a new one
        started = time.monotonic()
        response = await client.get("/v1/payment-codes", params={"limit": "5"}, headers=headers)
        return response.status, time.monotonic() - started

    async def resume_later() -> None:  # before the fix, the hung requests ended only here
        await asyncio.sleep(8.0)
        await console.execute("RESUME dipc")

    await console.execute("PAUSE dipc")
    resume = asyncio.create_task(resume_later())
    try:
        answered = await asyncio.gather(*(timed_read() for _ in range(6)))
    finally:
        if not resume.done():
            resume.cancel()
            await console.execute("RESUME dipc")
    await console.close()
    assert [status for status, _ in answered] == [503] * 6
    assert max(seconds for _, seconds in answered) < 3.0, answered  # the budget is 1 s
    for _ in range(50):  # and the pool serves again once the database is back
        if (await client.get("/v1/payment-codes", headers=headers)).status == 200:
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError("no 200 within 10 s of RESUME")


def test_the_cli_works_through_pgbouncer(bouncer, database_url, pool):
    env = dipc_env(bouncer.url, DIPC_DB_STATEMENT_CACHE_SIZE="0", DIPC_LISTEN_DATABASE_URL=database_url)
    doctor = run("doctor", "--json", env=env)
    checks = {check["name"]: check["status"] for check in orjson.loads(doctor.stdout)["checks"]}
    assert checks["database"] == checks["migrations"] == "ok", doctor.stdout
    listed = run("codes", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    # Without a direct URL for LISTEN, doctor points at the feed's problem.
    unlistened = run("doctor", "--json", env=env | {"DIPC_LISTEN_DATABASE_URL": ""})
    checks = {check["name"]: check for check in orjson.loads(unlistened.stdout)["checks"]}
    assert checks["event feed"]["status"] == "warn"
    assert "DIPC_LISTEN_DATABASE_URL" in checks["event feed"]["detail"]


async def test_named_prepared_statements_do_not_survive_transaction_pooling(bouncer):
    """Why DIPC_DB_STATEMENT_CACHE_SIZE=0: asyncpg's default cache fails behind pgbouncer < 1.21."""
    if bouncer.version >= (1, 21):
        pytest.skip("pgbouncer 1.21+ can track prepared statements (max_prepared_statements)")
    failures = 0

    async def client(index: int) -> None:
        nonlocal failures
        conn = await asyncpg.connect(bouncer.url)
        try:
            for step in range(20):
                try:
                    await conn.fetchval(f"SELECT $1::int + {step % 5}", index)
                except asyncpg.PostgresError:
                    failures += 1
        finally:
            await conn.close()

    await asyncio.gather(*(client(index) for index in range(8)))
    assert failures > 0


async def test_the_cli_and_serve_behind_pgbouncer_give_up_on_a_frozen_database(own_database):
    """(c83eec7 fixed it without a test.) Behind pgbouncer a login completes without a server, so a
    PostgreSQL that hangs (every process stopped) shows first in the pool's init of its first
    connection, which nothing bounded, and asyncpg closes such a connection gracefully, waiting for the
    server: `dipc codes list` and `dipc serve` hung at start until PostgreSQL came back. Now each ends
    with exit 1, "database unreachable", once DIPC_DB_CONNECT_TIMEOUT_S has passed."""
    server, dsn = own_database
    with running_bouncer(dsn) as bouncer:
        env = dipc_env(
            bouncer.url,
            DIPC_DB_STATEMENT_CACHE_SIZE="0",
            DIPC_LISTEN_DATABASE_URL=dsn,
            DIPC_DB_CONNECT_TIMEOUT_S="2",
        )
        listed = await asyncio.to_thread(run, "codes", "list", env=env)
        assert listed.returncode == 0, listed.stderr  # pgbouncer holds a server connection now
        async with frozen(server, seconds=12.0):  # before the fix, both commands ended only at the thaw
            listed = await asyncio.to_thread(run, "codes", "list", env=env, timeout=8)
            served = await asyncio.to_thread(run, "serve", "--port", str(free_port()), env=env, timeout=8)
        for result in (listed, served):
            assert result.returncode == 1, result.stderr
            assert b"database unreachable" in result.stderr
            assert b"Traceback" not in result.stderr
