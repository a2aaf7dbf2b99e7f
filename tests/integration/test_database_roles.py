"""The database as production has it: chosen on purpose, an owner that migrates, a role that only serves.

The roles and GRANTs are the ones `deploy/postgres/roles.sql` documents, run for real in the test's
PostgreSQL; credentials that are wrong end in one line and exit code 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import pytest

from server.doku.client import DokuSimulator
from tests.conftest import CLIENT, CODE, code_fields, dipc_env
from tests.dbproxy import SilencingProxy
from tests.integration.test_cli import DIPC, free_port, run, wait_ready
from tests.integration.test_events import until

ROLES_SQL = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "roles.sql"


def with_user(dsn: str, user: str, database: str, password: str | None = None) -> str:
    parts = urlsplit(dsn)
    auth = f"{user}:{password}" if password else user
    netloc = f"{auth}@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc, path=f"/{database}"))


def roles_script(suffix: str) -> list[str]:
    """roles.sql's three steps, with names of this test's own (roles are cluster-wide)."""
    text = ROLES_SQL.read_text()
    text = text.replace("dipc_owner", f"dipc_owner_{suffix}").replace("dipc_app", f"dipc_app_{suffix}")
    text = re.sub(r"DATABASE dipc\b", f"DATABASE dipc_roles_{suffix}", text)
    steps = re.split(r"^-- [234]\. .*$", text, flags=re.MULTILINE)
    return ["\n".join(line for line in step.splitlines() if not line.startswith("--")) for step in steps[:3]]


@dataclass(frozen=True)
class Roles:
    owner: str
    app: str
    owner_dsn: str
    app_dsn: str
    database: str


@pytest.fixture
async def roles(database_url: str) -> AsyncIterator[Roles]:
    suffix = uuid.uuid4().hex[:8]
    database = f"dipc_roles_{suffix}"
    cluster, in_database, as_owner = roles_script(suffix)
    admin = await asyncpg.connect(database_url)
    for statement in filter(str.strip, cluster.split(";")):  # CREATE DATABASE cannot run in a block
        await admin.execute(statement)
    superuser = urlsplit(database_url).username or "postgres"
    conn = await asyncpg.connect(with_user(database_url, superuser, database))
    await conn.execute(in_database)
    await conn.close()
    result = Roles(
        owner=f"dipc_owner_{suffix}",
        app=f"dipc_app_{suffix}",
        owner_dsn=with_user(database_url, f"dipc_owner_{suffix}", database, "change-me-owner"),
        app_dsn=with_user(database_url, f"dipc_app_{suffix}", database, "change-me-app"),
        database=database,
    )
    conn = await asyncpg.connect(result.owner_dsn)
    await conn.execute(as_owner)
    await conn.close()
    yield result
    await admin.execute(f'DROP DATABASE "{database}" WITH (FORCE)')
    await admin.execute(f'DROP ROLE "{result.app}"')
    await admin.execute(f'DROP ROLE "{result.owner}"')
    await admin.close()


def spawn(env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([*DIPC, "serve"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def doctor(env: dict[str, str]) -> tuple[int, dict[str, dict]]:
    result = run("doctor", "--json", env=env)
    report = orjson.loads(result.stdout)
    return result.returncode, {check["name"]: check for check in report["checks"]}


def one_line_refusal(result: subprocess.CompletedProcess) -> str:
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert "Traceback" not in stderr
    return stderr


async def test_the_owner_migrates_and_a_least_privilege_role_serves(roles: Roles):
    app_env = dipc_env(roles.app_dsn)
    # Before migrating, serve refuses and changes nothing: no DDL against an external database.
    refused = one_line_refusal(run("serve", env=app_env))
    assert "run `dipc migrate`" in refused
    conn = await asyncpg.connect(roles.owner_dsn)
    assert await conn.fetchval("SELECT to_regclass('schema_migrations')") is None
    await conn.close()
    # The serving role may not migrate; the owner may.
    not_owner = run("migrate", env=app_env)
    assert not_owner.returncode == 2, not_owner.stderr  # a configuration error, said in one line
    assert b"Traceback" not in not_owner.stderr
    assert b"owner" in not_owner.stderr
    migrated = run("migrate", env=dipc_env(roles.owner_dsn))
    assert migrated.returncode == 0, migrated.stderr
    assert b"applied 0001_initial" in migrated.stdout

    code, checks = doctor(app_env)
    assert code == 0, [check for check in checks.values() if check["status"] != "ok"]
    assert checks["database role"]["status"] == "ok"
    assert checks["migrations"]["status"] == "ok"
    _, owner_checks = doctor(dipc_env(roles.owner_dsn))
    assert owner_checks["database role"]["status"] == "warn"  # serving as the owner: works, but too much

    port = free_port()
    env = app_env | {"DIPC_PORT": str(port), "DIPC_ADMIN_TOKEN": "t", "DIPC_LOG_LEVEL": "INFO"}
    server = spawn(env)
    try:
        await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)
        async with aiohttp.ClientSession() as session:
            created = await session.post(
                f"http://127.0.0.1:{port}/v1/payment-codes",
                json=code_fields(),
                headers={"Authorization": "Bearer t"},
            )
            assert created.status == 201, await created.text()
            simulator = DokuSimulator(session, f"http://127.0.0.1:{port}", CLIENT)
            inquiry = await simulator.inquiry(CODE)
            assert inquiry.status == 200
            paid = await simulator.notify(
                CODE, invoice_number="INV-2026-000123", amount=150000, original_request_id="r-1"
            )
            assert paid.status == 200
        # The serving role reads events_pending's floor and moves it through the owner's functions
        # (migration 0020): the two events are soon below it.
        app_pool = await asyncpg.create_pool(roles.app_dsn, min_size=1, max_size=1)
        try:
            await until(app_pool, "SELECT last_value >= 2 FROM events_pending_floor")
        finally:
            await app_pool.close()
    finally:
        server.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.to_thread(server.communicate, timeout=30)
    assert server.returncode == 0, stderr.decode()
    [chosen] = [orjson.loads(line) for line in stdout.splitlines() if b'"database.chosen"' in line]
    assert chosen["database"] == "external"
    assert roles.database in chosen["where"]
    assert "change-me" not in stdout.decode()  # the password is never logged
    pruned = run("prune", env=app_env)  # retention runs as the serving role too
    assert pruned.returncode == 0, pruned.stderr


async def test_a_role_missing_a_grant_is_found_by_doctor_and_refused_by_serve(roles: Roles):
    assert run("migrate", env=dipc_env(roles.owner_dsn)).returncode == 0
    conn = await asyncpg.connect(roles.owner_dsn)
    await conn.execute(f'REVOKE DELETE ON inquiries FROM "{roles.app}"')
    await conn.execute(f'REVOKE USAGE ON SEQUENCE events_id_seq FROM "{roles.app}"')
    await conn.execute(f'REVOKE EXECUTE ON FUNCTION dipc_inquire FROM PUBLIC, "{roles.app}"')
    context = (
        "dipc_payment_context_by_source(text, text, text, bigint, text, text, text)"  # dipc calls it (0032)
    )
    await conn.execute(f'REVOKE EXECUTE ON FUNCTION {context} FROM PUBLIC, "{roles.app}"')
    await conn.close()
    app_env = dipc_env(roles.app_dsn)
    code, checks = doctor(app_env)
    assert code == 1
    assert checks["database role"]["status"] == "fail"
    assert "DELETE on inquiries" in checks["database role"]["detail"]
    assert "USAGE on sequence events_id_seq" in checks["database role"]["detail"]
    assert "EXECUTE on function dipc_inquire" in checks["database role"]["detail"]
    assert "EXECUTE on function dipc_payment_context_by_source" in checks["database role"]["detail"]
    refused = one_line_refusal(run("serve", env=app_env))
    assert "lacks privileges" in refused
    assert "DELETE on inquiries" in refused


@pytest.fixture
def password_role(database_url: str) -> Iterator[tuple[str, str]]:
    """A role that must give its password (scram), however the test's PostgreSQL trusts others."""
    name = f"dipc_pw_{uuid.uuid4().hex[:8]}"

    async def admin(*statements: str) -> str:
        conn = await asyncpg.connect(database_url)
        try:
            for statement in statements:
                await conn.execute(statement)
            return await conn.fetchval("SHOW hba_file")
        finally:
            await conn.close()

    hba = Path(asyncio.run(admin(f"CREATE ROLE {name} LOGIN PASSWORD 'right'")))
    try:
        original = hba.read_text()
        hba.write_text(f"local all {name} scram-sha-256\nhost all {name} all scram-sha-256\n{original}")
    except OSError:
        asyncio.run(admin(f"DROP ROLE {name}"))
        pytest.skip("the test's PostgreSQL does not let us require a password")
    asyncio.run(admin("SELECT pg_reload_conf()"))
    try:
        yield name, urlsplit(database_url).path.lstrip("/")
    finally:
        hba.write_text(original)
        asyncio.run(admin("SELECT pg_reload_conf()", f"DROP ROLE {name}"))


def test_wrong_credentials_end_in_one_line_and_exit_2(database_url, password_role, pool):
    role, database = password_role
    cases = {
        "the password was refused": with_user(database_url, role, database, "wrong"),
        "does not exist": with_user(database_url, role, "no_such_database", "right"),
    }
    for expected, dsn in cases.items():
        env = dipc_env(dsn, DIPC_DB_CONNECT_TIMEOUT_S="3")
        # `migrate --wait` waits for a database that does not answer, never for one that refuses.
        for command in (
            ["migrate"],
            ["migrate", "--wait", "60"],
            ["serve"],
            ["codes", "list"],
            ["prune", "--dry-run"],
        ):
            stderr = one_line_refusal(run(*command, env=env))
            assert expected in stderr, (command, stderr)
            assert "wrong" not in stderr  # the password is not repeated back
            assert "trying again" not in stderr
        stderr = one_line_refusal(run("serve", env=env | {"DIPC_WORKERS": "2"}))
        assert expected in stderr
        code, checks = doctor(env)
        assert code == 1
        assert checks["database"]["status"] == "fail"
        assert expected in checks["database"]["detail"]


async def test_migrate_waits_for_a_database_that_does_not_answer_yet(database_url, pool):
    """A host that booted with its database: deploy/systemd's dipc-migrate.service runs `dipc migrate
    --wait`, which tries again until the database answers, so that dipc.service, ordered after it,
    finds the schema current rather than refusing it (exit 2) for good."""
    proxy = SilencingProxy(database_url)  # nothing listens on its port until it starts
    env = dipc_env(proxy.url, DIPC_DB_CONNECT_TIMEOUT_S="2")
    at_once = run("migrate", env=env)
    assert at_once.returncode == 1, at_once.stderr
    assert b"database unreachable" in at_once.stderr
    process = await asyncio.create_subprocess_exec(
        *DIPC, "migrate", "--wait", "60", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        async with asyncio.timeout(30):
            waiting = await process.stderr.readline()  # it met no database, and says that it waits
        assert b"database unreachable" in waiting
        assert b"trying again every 2 s for up to 60 s" in waiting
        assert process.returncode is None
        await proxy.start()
        async with asyncio.timeout(60):
            stdout, stderr = await process.communicate()
    finally:
        await proxy.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr
    assert stdout == b"the database is up to date\n"
    assert b"Traceback" not in stderr


def test_outside_demo_the_embedded_database_must_be_chosen(tmp_path):
    # As root the session's own DIPC_EMBEDDED_ROOT (tests/conftest.py) is kept: never /var/lib/dipc.
    base = {
        key: value
        for key, value in os.environ.items()
        if key == "DIPC_EMBEDDED_ROOT" or not key.startswith(("DIPC_", "DATABASE_URL"))
    }
    env = base | {
        "DIPC_CLIENT_ID": "MCH-1",
        "DIPC_SECRET_KEY": "SK-1",
        "DIPC_DATA_DIR": str(tmp_path / "data"),
        "DIPC_PORT": str(free_port()),
    }
    for command in (["serve"], ["codes", "list"], ["migrate"], ["events", "deliveries"]):
        stderr = one_line_refusal(run(*command, env=env))
        assert "DATABASE_URL=embedded" in stderr
        assert "DATABASE_URL=postgresql://" in stderr
    assert not (tmp_path / "data").exists()  # nothing was started on the quiet

    chosen = run("migrate", env=env | {"DATABASE_URL": "embedded"})
    assert chosen.returncode == 0, chosen.stderr
    assert b"up to date" in chosen.stdout  # opening the embedded database brought its schema
    assert (tmp_path / "data").is_dir()
    listed = run("codes", "list", "--demo", env=env)  # --demo means the embedded database too
    assert listed.returncode == 0, listed.stderr


async def test_a_role_refused_while_serving_is_a_503_until_it_may_log_in_again(
    roles: Roles, database_url, aiohttp_client
):
    """Credentials rotated under a running dipc (or its role locked, or its database renamed): every new
    connection is refused. The database is what is missing, as in an outage: 503 and not ready, without a
    traceback, and back by itself once the role may log in again. (It was a 500 on every route, and
    dipc_database_up stayed 1.)"""
    from server.app import make_app
    from tests.conftest import make_settings

    assert run("migrate", env=dipc_env(roles.owner_dsn)).returncode == 0
    from tests.conftest import ADMIN_TOKEN

    client = await aiohttp_client(make_app(make_settings(), roles.app_dsn))
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert (await client.post("/v1/payment-codes", json=code_fields(), headers=headers)).status == 201
    simulator = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    assert (await simulator.inquiry(CODE)).status == 200

    superuser = await asyncpg.connect(database_url)
    try:
        await superuser.execute(f'ALTER ROLE "{roles.app}" NOLOGIN')
        await superuser.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", roles.app
        )
        for _ in range(3):
            refused = await simulator.inquiry(CODE)
            assert refused.status == 503, refused.body
        for _ in range(30):  # a check's result is reused for half a second
            ready = await client.get("/readyz")
            if ready.status != 200:
                break
            await asyncio.sleep(0.1)
        assert ready.status == 503, await ready.text()
        assert "database unreachable" in (await ready.json())["reason"]
        await superuser.execute(f'ALTER ROLE "{roles.app}" LOGIN')
        answered = None
        for _ in range(50):
            answered = await simulator.inquiry(CODE)
            if answered.status == 200:
                break
            await asyncio.sleep(0.1)
        assert answered is not None
        assert answered.status == 200
    finally:
        await superuser.execute(f'ALTER ROLE "{roles.app}" LOGIN')
        await superuser.close()
