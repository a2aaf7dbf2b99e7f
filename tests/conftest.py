"""Shared fixtures: one real PostgreSQL per test session, a clean schema per test, the real app on loopback.

Without DATABASE_URL the session starts an embedded PostgreSQL (the same mechanism `dipc serve` uses)
in a temporary directory; with DATABASE_URL it creates, and later drops, a database of its own there.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from server.app import make_app
from server.config import Settings
from server.doku.auth import Client
from server.doku.channels import BinTable
from server.doku.client import DokuSimulator
from server.embedded import EmbeddedPostgres
from server.store import migrate
from server.store.pool import create_pool

SPEC = Path(__file__).parent / "fixtures" / "spec"

CLIENT_ID = "MCH-0001-10791114622547"  # the spec's test-vector Client-Id
SECRET_KEY = "SK-example-0123456789abcdef"  # the spec's test-vector key
OLD_SECRET_KEY = "SK-retired-key-still-accepted"
OTHER_CLIENT_ID = "MCH-0002-OTHER"
OTHER_SECRET_KEY = "SK-other-merchant-key"
ADMIN_TOKEN = "test-admin-token"
BINS = "ALFA:88965:direct,INDOMARET:33012:direct,ALFA:889660:exclusive"

TABLES = (
    "payment_codes",
    "inquiries",
    "notifications",
    "payments",
    "events",
    "events_pending",
    "webhook_deliveries",
    "webhook_subscribers",
    "reconciliation",
    "payment_resolutions",
)

CLIENT = Client(CLIENT_ID, (SECRET_KEY.encode(), OLD_SECRET_KEY.encode()))
OTHER_CLIENT = Client(OTHER_CLIENT_ID, (OTHER_SECRET_KEY.encode(),))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto` (pyproject.toml): a worker per core this process may use, at most 4.

    Each worker runs its own PostgreSQL and its tests start real servers, so more workers than cores
    would only make them wait on each other; many tests spend their time in sleeps and timeouts, so two
    cores serve two workers well (CI: the suite in about half the time).
    """
    return max(1, min(len(os.sched_getaffinity(0)), 4))


def spec_example(name: str) -> bytes:
    return (SPEC / name).read_bytes()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session", autouse=True)
def embedded_root() -> Iterator[None]:
    """As root, embedded clusters (and the binaries' copy) live in a directory of this session's own.

    dipc keeps them in ``$DIPC_EMBEDDED_ROOT`` (default ``/var/lib/dipc``) because the unprivileged user
    PostgreSQL runs as cannot reach a checkout or a pytest temp directory under a 0700 directory.
    """
    if os.name != "posix" or os.geteuid() != 0 or os.environ.get("DIPC_EMBEDDED_ROOT"):
        yield
        return
    parent = "/tmp" if Path("/tmp").is_dir() else None
    root = Path(tempfile.mkdtemp(prefix="dipc-test-embedded-", dir=parent))
    root.chmod(0o755)  # ours: PostgreSQL's system user must pass through it
    os.environ["DIPC_EMBEDDED_ROOT"] = str(root)
    try:
        yield
    finally:
        del os.environ["DIPC_EMBEDDED_ROOT"]
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("DATABASE_URL")
    if external:
        name = f"dipc_test_{uuid.uuid4().hex[:10]}"

        async def admin(sql: str) -> None:
            conn = await asyncpg.connect(external)
            try:
                await conn.execute(sql)
            finally:
                await conn.close()

        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
        dsn = _with_database(external, name)
        asyncio.run(migrate.migrate_dsn(dsn))
        yield dsn
        asyncio.run(admin(f'DROP DATABASE "{name}" WITH (FORCE)'))
        return
    server = EmbeddedPostgres(tmp_path_factory.mktemp("pg"), durable=False)
    dsn = server.start()
    asyncio.run(migrate.migrate_dsn(dsn))
    yield dsn
    server.stop()


@pytest.fixture
async def own_database(tmp_path):
    """A PostgreSQL of this test's own, to stop and start."""
    server = EmbeddedPostgres(tmp_path / "pg", durable=False)
    dsn = await asyncio.to_thread(server.start)
    await migrate.migrate_dsn(dsn)
    yield server, dsn
    await asyncio.to_thread(server.stop)


@pytest.fixture
async def fresh_database(database_url: str) -> AsyncIterator[str]:
    """An empty database of its own in the test cluster (no migrations applied), dropped afterwards."""
    name = f"dipc_fresh_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    yield _with_database(database_url, name)
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    """A pool on a database whose tables were emptied for this test."""
    pool = await create_pool(database_url, min_size=1, max_size=4)
    await pool.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
    # The reconcilers' shared rate budget starts full: an earlier test's backoff must not slow this one.
    await pool.execute("UPDATE reconciliation_rate SET tokens = 1000, refilled_at = now()")
    yield pool
    await pool.close()


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "clients": {CLIENT_ID: CLIENT, OTHER_CLIENT_ID: OTHER_CLIENT},
        "admin_tokens": (ADMIN_TOKEN,),
        "bins": BinTable.parse(BINS),
        "db_pool_min": 1,
        "db_pool_max": 8,
        # Database-derived gauges are sampled in the background; tests should not wait 5 s for them.
        "metrics_sample_s": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
async def client(aiohttp_client, pool: asyncpg.Pool, settings: Settings, database_url: str) -> TestClient:
    """The real app on a loopback port, on the test database."""
    return await aiohttp_client(make_app(settings, database_url))


@pytest.fixture
def doku(client: TestClient) -> DokuSimulator:
    """DOKU, as the spec's test-vector merchant."""
    return DokuSimulator(client.session, str(client.make_url("")), CLIENT)


@pytest.fixture
def admin_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


CODE = "8896512345678123"  # the spec's example code, under the direct ALFA BIN 88965


def code_fields(**overrides: Any) -> dict[str, Any]:
    """The spec's example bill; tests override what they are about."""
    fields: dict[str, Any] = {
        "payment_code": CODE,
        "amount": 150000,
        "invoice_number": "INV-2026-000123",
        "customer_name": "Budi Santoso",
        "info1": "Toko Contoh",
        "client_id": CLIENT_ID,
    }
    fields.update(overrides)
    return fields


@pytest.fixture
def register(client: TestClient, admin_headers: dict[str, str]):
    """Register a code through the admin API and return its document."""

    async def register(**overrides: Any) -> dict[str, Any]:
        response = await client.post(
            "/v1/payment-codes", json=code_fields(**overrides), headers=admin_headers
        )
        assert response.status == 201, await response.text()
        return await response.json()

    return register


@asynccontextmanager
async def table_locked(pool: asyncpg.Pool, table: str = "payment_codes") -> AsyncIterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on ``table`` for the block: every statement touching it waits.

    Whatever answers inside the block answered while the database was, for dipc, hanging.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        yield


async def waiting_for_a_lock(pool: asyncpg.Pool, query_part: str) -> None:
    """Until a backend running ``query_part`` waits for a lock (a real wait, seen by PostgreSQL)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        waiting = await pool.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND query LIKE '%' || $1 || '%' AND pid <> pg_backend_pid()",
            query_part,
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no backend running {query_part} waited for a lock")


def clean_env() -> dict[str, str]:
    """Our environment without dipc's settings (but where, as root, embedded clusters live)."""
    keep = ("DIPC_EMBEDDED_ROOT",)
    return {
        key: value
        for key, value in os.environ.items()
        if key in keep or not key.startswith(("DIPC_", "DATABASE_URL"))
    }


def dipc_env(database_url: str, **extra: str) -> dict[str, str]:
    """The environment of a dipc process for the test merchant, on the test database."""
    base = clean_env()
    return (
        base
        | {
            "DATABASE_URL": database_url,
            "DIPC_CLIENT_ID": CLIENT_ID,
            "DIPC_SECRET_KEY": SECRET_KEY,
            "DIPC_BINS": BINS,
            "DIPC_LOG_FORMAT": "json",
            # Never DOKU's real API from a test: tests that reconcile start a stand-in and say so.
            "DIPC_DOKU_API_URL": "http://127.0.0.1:9",
            "DIPC_RECONCILE": "off",
        }
        | extra
    )


@pytest.fixture
def env(database_url: str, pool: asyncpg.Pool) -> dict[str, str]:
    """The environment of a merchant's shell: one DOKU client, its BINs, the (emptied) test database."""
    return dipc_env(database_url)


class CapturedLog:
    """Every line dipc (structlog) and its libraries (stdlib logging) wrote, as the JSON a server writes."""

    def __init__(self) -> None:
        import io

        self.raw = io.BytesIO()
        self.stream = io.TextIOWrapper(self.raw, encoding="utf-8", write_through=True)

    def text(self) -> str:
        self.stream.flush()
        return self.raw.getvalue().decode("utf-8", "backslashreplace")

    def lines(self) -> list[dict[str, Any]]:
        import orjson

        return [orjson.loads(line) for line in self.text().splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines() if line.get("event") == name]

    def clear(self) -> None:
        self.raw.seek(0)
        self.raw.truncate()


@pytest.fixture
def captured_log() -> Iterator[CapturedLog]:
    """Logging configured as in production (JSON lines), written to memory for the test to read."""
    import logging

    import structlog

    from server.ops.logging import configure_logging

    captured = CapturedLog()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging("json", "INFO", stream=captured.stream)
    # Module-level loggers must not keep this stream after the test.
    structlog.configure(cache_logger_on_first_use=False)
    yield captured
    structlog.reset_defaults()
    root.handlers[:], level = saved
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = False


async def applied_before(conn: asyncpg.Connection, version: str) -> None:
    """The shipped migrations before ``version``, as a database of that time has them."""
    await conn.execute(migrate._LEDGER)
    for migration in migrate.available():
        if migration.version >= version:
            break
        await conn.execute(migration.sql)
        await conn.execute(
            "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
            migration.version,
            migration.checksum,
        )
