"""A frozen database (SIGSTOP: a hung host, a stalled disk, a paused VM), not a stopped one.

Found in review: a request whose statement was in flight when the database froze answered only when
the database came back, whatever its budget, because asyncpg's pool waits without a limit for the
cancelled statement before it takes the connection back. The DOKU counter and finance wait with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.app import make_app
from server.doku.client import DokuSimulator
from server.embedded import EmbeddedPostgres
from server.store import migrate
from tests.conftest import CLIENT, CODE, code_fields, make_settings


@pytest.fixture
async def own_database(tmp_path):
    server = EmbeddedPostgres(tmp_path / "pg", durable=False)
    dsn = await asyncio.to_thread(server.start)
    await migrate.migrate_dsn(dsn)
    yield server, dsn
    await asyncio.to_thread(server.stop)


def _cluster_pids(pgdata: Path) -> list[int]:
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                    pids.append(int(entry.name))
    return pids


@contextlib.contextmanager
def frozen(server: EmbeddedPostgres) -> Iterator[None]:
    pids = _cluster_pids(server.pgdata)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the cluster's processes in /proc")
async def test_a_frozen_database_answers_503_within_the_budget_and_recovers(
    aiohttp_client, own_database, admin_headers
):
    server, dsn = own_database
    settings = make_settings(admin_db_timeout_s=1.0, doku_db_timeout_s=0.8, db_pool_min=4, db_pool_max=4)
    client = await aiohttp_client(make_app(settings, dsn))
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    assert (await client.post("/v1/payment-codes", json=code_fields(), headers=admin_headers)).status == 201
    for _ in range(4):  # the pool's connections are open and idle: the next statements reach the server
        assert (await client.get("/v1/exceptions", headers=admin_headers)).status == 200

    async def timed(request) -> tuple[int, float]:
        started = time.perf_counter()
        response = await asyncio.wait_for(request, 15.0)
        return response.status, time.perf_counter() - started

    with frozen(server):
        results = await asyncio.gather(
            timed(client.get("/v1/exceptions", headers=admin_headers)),
            timed(client.get("/v1/reconciliation", headers=admin_headers)),
            timed(client.get("/v1/notifications", headers=admin_headers)),
            timed(doku.inquiry(CODE)),
        )
    for status, seconds in results:
        assert status == 503
        assert seconds < 4.0, results  # the budget, and a bounded wait for the cancelled statement

    deadline = time.monotonic() + 20
    while (await client.get("/v1/exceptions", headers=admin_headers)).status != 200:
        assert time.monotonic() < deadline, "no recovery after the database came back"
        await asyncio.sleep(0.1)
    assert (await doku.inquiry(CODE)).status == 200
