"""/metrics after real traffic: the counters and histograms move as the traffic says."""

from __future__ import annotations

import asyncio
import math

from prometheus_client.parser import text_string_to_metric_families

from server.doku.auth import Client
from server.doku.client import DokuSimulator
from server.ops import metrics
from server.ops.health import HealthChecker
from server.ops.sampler import SAMPLES, DatabaseSampler, Sample
from tests.conftest import CLIENT_ID, CODE


async def scrape(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name: str, **labels: str) -> float:
    """The sum of every series of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


async def sampled(client, name: str, expected: float, within_s: float = 5.0, **labels: str) -> None:
    """Wait until the background sampler has brought ``name`` to ``expected`` (nobody calls /readyz)."""
    deadline = asyncio.get_running_loop().time() + within_s
    while True:
        seen = value(await scrape(client), name, **labels)
        if seen == expected or (math.isnan(expected) and math.isnan(seen)):
            return
        assert asyncio.get_running_loop().time() < deadline, f"{name}{labels} is {seen}, not {expected}"
        await asyncio.sleep(0.05)


async def test_traffic_moves_the_counters_and_histograms(client, doku, register, admin_headers):
    await register()
    before = await scrape(client)

    await doku.inquiry(CODE)  # SUCCESS
    await doku.inquiry("8896599999999999")  # NOT_FOUND
    unknown = DokuSimulator(client.session, str(client.make_url("")), Client("MCH-UNKNOWN", (b"k",)))
    await unknown.inquiry(CODE)  # invalid_signature, client not configured
    wrong_key = DokuSimulator(client.session, str(client.make_url("")), Client(CLIENT_ID, (b"wrong",)))
    await wrong_key.inquiry(CODE)  # invalid_signature, bad signature
    await doku.post("/doku/inquiry", b"not json")  # INVALID_JSON
    await doku.notify(CODE, invoice_number="INV-2026-000123", amount=150000, original_request_id="A")
    await doku.notify(CODE, invoice_number="INV-2026-000123", amount=150000, original_request_id="A")
    await doku.notify(CODE, invoice_number="INV-2026-000123", amount=150000, original_request_id="B")
    await doku.notify(CODE, invoice_number="INV-2026-000123", amount=1, original_request_id="C")

    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("dipc_inquiries_total", outcome="SUCCESS", channel="ALFA", replayed="false") == 1
    assert moved("dipc_inquiries_total", outcome="NOT_FOUND") == 1
    assert moved("dipc_http_requests_total", route="/doku/inquiry", status="200", outcome="SUCCESS") == 1
    assert (
        moved("dipc_http_requests_total", route="/doku/inquiry", status="401", outcome="INVALID_SIGNATURE")
        == 2
    )
    assert moved("dipc_http_requests_total", route="/doku/inquiry", status="400", outcome="INVALID_JSON") == 1
    assert moved("dipc_signature_failures_total", client_id="unknown", reason="UNKNOWN_CLIENT") == 1
    assert moved("dipc_signature_failures_total", client_id=CLIENT_ID, reason="BAD_SIGNATURE") == 1
    assert moved("dipc_http_request_duration_seconds_count", route="/doku/inquiry") == 5
    assert moved("dipc_http_request_duration_seconds_bucket", route="/doku/inquiry", le="+Inf") == 5
    assert moved("dipc_notifications_total", outcome="normal") == 1
    assert moved("dipc_notifications_total", outcome="repeat") == 1
    assert moved("dipc_notifications_total", outcome="conflict") == 1
    assert moved("dipc_notifications_total", outcome="anomaly") == 1
    assert moved("dipc_payments_total", kind="normal") == 1
    assert moved("dipc_payments_total", kind="conflict", reason="ALREADY_PAID") == 1
    assert moved("dipc_payments_total", kind="anomaly", reason="AMOUNT_MISMATCH") == 1
    assert moved("dipc_db_operation_duration_seconds_count", operation="inquiry", result="ok") == 2
    assert moved("dipc_db_operation_duration_seconds_count", operation="notification", result="ok") == 4

    assert value(after, "dipc_db_pool_connections", state="max") >= 1
    await sampled(client, "dipc_events_last_id", 4)  # code.created, received, conflict, anomaly
    assert value(after, "dipc_build_info") == 1


async def test_readiness_is_reported_as_a_gauge(client):
    assert (await client.get("/readyz")).status == 200
    assert value(await scrape(client), "dipc_database_up") == 1


async def test_a_broken_sample_blinds_only_its_own_gauges(database_url, pool):
    """A sample that fails for a reason of its own (not the database going away) is logged and its gauges
    read NaN; the database is still up and the other samples still read."""

    async def broken(conn) -> None:
        await conn.fetchval("SELECT no_such_column FROM events")

    def broken_unknown() -> None:
        metrics.mark_unknown(metrics.FEED_WAITERS)

    health = HealthChecker(database_url)
    try:
        sampler = DatabaseSampler(
            health, every_s=1, samples=[Sample("broken", broken, broken_unknown), *SAMPLES]
        )
        metrics.FEED_WAITERS.set(0)
        metrics.EVENTS_LAST_ID.set(math.nan)
        assert await sampler.sample_once() is False
        assert math.isnan(metrics.FEED_WAITERS._value.get())
        assert metrics.EVENTS_LAST_ID._value.get() == 0  # read, after the broken one
        assert metrics.DATABASE_UP._value.get() == 1
    finally:
        metrics.FEED_WAITERS.set(0)
        await health.close()


async def test_every_exception_series_exists_from_the_start(client):
    """Alerts and panels see the first exception and the first resolution arrive (no series born at 1)."""
    samples = await scrape(client)
    for kind, reason in metrics.EXCEPTION_SERIES:
        assert ("dipc_exceptions_open", (("kind", kind), ("reason", reason))) in samples
    for resolution in ("refunded", "accepted", "dismissed"):
        assert ("dipc_exception_resolutions_total", (("resolution", resolution),)) in samples
    assert ("dipc_exceptions_oldest_open_seconds", ()) in samples
    assert len(metrics.EXCEPTION_SERIES) == 8


async def test_events_kept_from_the_feed_are_reported_by_age_until_a_sweep_moves_them(client, pool):
    async with pool.acquire() as sequencing, sequencing.transaction():
        # The sequencing lock held elsewhere: no pass can move the event a writer committed meanwhile.
        await sequencing.execute("SELECT pg_advisory_xact_lock(7235437848553746036)")
        await pool.execute(
            "INSERT INTO events_pending (type, payment_code, payload, created_at) "
            "VALUES ('code.created', '1', '{}', now() - interval '90 seconds')"
        )
        deadline = asyncio.get_running_loop().time() + 5
        while (age := value(await scrape(client), "dipc_events_unsequenced_oldest_seconds")) < 90:
            assert asyncio.get_running_loop().time() < deadline, f"sampled age {age}"
            await asyncio.sleep(0.05)
    # Released: the server's sweep moves it, and the gauge falls back to 0.
    await sampled(client, "dipc_events_unsequenced_oldest_seconds", 0, within_s=15)
    assert await pool.fetchval("SELECT count(*) FROM events WHERE payment_code = '1'") == 1
