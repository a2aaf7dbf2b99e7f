"""The database stops under a running server, then comes back: dipc says so fast, and recovers alone."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.app import make_app
from server.doku.client import DokuSimulator
from server.embedded import EmbeddedPostgres
from server.store import migrate
from tests.conftest import CLIENT, CODE, code_fields, make_settings
from tests.integration.test_metrics import sampled


@pytest.fixture
async def own_database(tmp_path):
    """A PostgreSQL of this test's own, to stop and start."""
    server = EmbeddedPostgres(tmp_path / "pg", durable=False)
    dsn = await asyncio.to_thread(server.start)
    await migrate.migrate_dsn(dsn)
    yield server, dsn
    await asyncio.to_thread(server.stop)


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
        ("dipc_exceptions_open", {"kind": "conflict", "reason": "ALREADY_PAID"}),
        ("dipc_exceptions_oldest_open_seconds", {}),
    ):
        await sampled(client, name, float("nan"), **labels)

    await asyncio.to_thread(server.start)
    await sampled(client, "dipc_database_up", 1, within_s=15)
    await sampled(client, "dipc_exceptions_open", 0, kind="conflict", reason="ALREADY_PAID")
    await sampled(client, "dipc_webhook_oldest_pending_seconds", 0)
