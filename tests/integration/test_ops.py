"""What operators watch: series that exist before the first event, and workers that stay visible."""

from __future__ import annotations

import asyncio
import os
import signal

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_cli import free_port, wait_ready
from tests.integration.test_lifecycle import both_workers_serving, server_env, spawn
from tests.integration.test_metrics import scrape, value


async def test_every_series_an_alert_watches_exists_at_zero_before_the_first_event(client):
    samples = await scrape(client)
    names = {(name, labels) for name, labels in samples}

    def exported(name: str, **labels: str) -> bool:
        return any(n == name and set(labels.items()) <= set(ls) for n, ls in names)

    # The first double payment must be an increase from 0, or DipcPaymentConflict never fires.
    assert exported("dipc_payments_total", kind="conflict", reason="ALREADY_PAID")
    assert exported("dipc_payments_total", kind="conflict", reason="INVOICE_ALREADY_PAID")
    assert exported("dipc_payments_total", kind="anomaly", reason="AMOUNT_MISMATCH")
    assert exported("dipc_notifications_total", outcome="rejected")
    assert exported("dipc_inquiries_total", outcome="NOT_FOUND", channel="INDOMARET", replayed="false")
    assert exported("dipc_signature_failures_total", route="/doku/inquiry", client_id="unknown")
    assert exported("dipc_http_requests_total", route="/doku/notification", status="503")
    assert exported("dipc_db_operation_duration_seconds_count", operation="inquiry", result="timeout")
    assert exported("dipc_worker_restarts_total")


async def scrape_url(port: int) -> dict:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as reply:
        text = await reply.text()
    assert reply.status == 200, text[:300]
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


async def test_with_workers_metrics_keep_process_series_and_count_restarts(database_url, pool):
    port = free_port()
    server = spawn(server_env(database_url, port, DIPC_WORKERS="2"))
    try:
        pids = await both_workers_serving(port, server)
        samples = await scrape_url(port)
        memory = {dict(labels)["pid"] for name, labels in samples if name == "process_resident_memory_bytes"}
        assert memory == {str(pid) for pid in pids}, "one process_* series per live worker"
        assert any(name == "python_info" for name, _ in samples)
        assert value(samples, "dipc_worker_restarts_total") == 0

        os.kill(min(pids), signal.SIGKILL)
        restarts = 0.0
        for _ in range(100):
            await asyncio.sleep(0.1)
            try:
                restarts = value(await scrape_url(port), "dipc_worker_restarts_total")
            except aiohttp.ClientError:
                continue
            if restarts == 1:
                break
        assert restarts == 1
        # The replacement counts itself as it starts, before it serves and writes its other values.
        serving = await both_workers_serving(port, server)
        assert min(pids) not in serving
        samples = await scrape_url(port)
        live = {dict(labels)["pid"] for name, labels in samples if name == "process_resident_memory_bytes"}
        assert live == {str(pid) for pid in serving}  # the dead worker's process series are gone
    finally:
        server.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.wait, 30)
    assert code == 0


async def test_a_metrics_file_a_worker_created_and_had_not_sized_yet_fails_no_scrape(
    database_url, pool, tmp_path
):
    """prometheus_client creates a worker's file empty and sizes it just after. A scrape in between
    failed whole (/metrics answered 500; seen once as a worker was restarted), and so did every scrape
    after a worker killed in between, whose empty file stays (prometheus/client_python#1199)."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    port = free_port()
    server = spawn(server_env(database_url, port, DIPC_WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(directory)))
    try:
        await both_workers_serving(port, server)
        for kind in ("counter", "gauge_livesum", "histogram"):  # a pid no process has: a killed worker's
            (directory / f"{kind}_4194304.db").touch()
        samples = await scrape_url(port)
        assert value(samples, "dipc_worker_restarts_total") == 0
        assert value(samples, "dipc_db_pool_connections", state="max") == 20  # both workers, 10 each
    finally:
        server.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.wait, 30)
    assert code == 0


async def test_one_process_with_a_metrics_directory_starts_its_totals_afresh(database_url, tmp_path):
    """PROMETHEUS_MULTIPROC_DIR given to a single-process serve (a shared env file): every run's values
    stayed in the directory and were summed with the next run's (the pool's size doubled at each restart,
    a dead run's gauges counted for ever), and every CLI command left its files there too."""
    from tests.integration.test_cli import run

    directory = tmp_path / "metrics"
    directory.mkdir()
    env_extra = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    seen = []
    for _ in range(2):
        port = free_port()
        server = spawn(server_env(database_url, port, **env_extra))
        try:
            await asyncio.to_thread(wait_ready, f"http://127.0.0.1:{port}/readyz", server)
            seen.append(value(await scrape_url(port), "dipc_db_pool_connections", state="max"))
        finally:
            server.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(server.wait, 30)
        assert code == 0
    assert seen[0] > 0
    assert seen == [seen[0]] * 2
    before = sorted(path.name for path in directory.iterdir())
    listed = run("codes", "list", env=server_env(database_url, free_port(), **env_extra))
    assert listed.returncode == 0, listed.stderr
    assert sorted(path.name for path in directory.iterdir()) == before


async def test_doku_endpoints_keep_their_route_label_at_any_path(aiohttp_client, database_url):
    """The alert rules and the dashboard watch route="/doku/inquiry" and route=~"/doku/.*": served at
    DIPC_INQUIRY_PATH=/pay/inquiry, the series were labelled /pay/inquiry and those pages never fired."""
    from server.app import make_app
    from server.doku.client import DokuSimulator
    from tests.conftest import CLIENT, CODE, make_settings

    settings = make_settings(inquiry_path="/pay/inquiry", notification_path="/pay/notify")
    client = await aiohttp_client(make_app(settings, database_url))
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT, inquiry_path="/pay/inquiry")
    before = await scrape(client)
    assert (await doku.inquiry(CODE)).status == 404  # no such code: answered
    after = await scrape(client)

    def moved(name: str, **labels: str) -> float:  # the counters are the test process's, shared
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("dipc_http_requests_total", route="/doku/inquiry", status="404") == 1
    assert moved("dipc_http_request_duration_seconds_count", route="/doku/inquiry") == 1
    assert not [labels for name, labels in after if ("route", "/pay/inquiry") in labels]
    assert [
        labels
        for name, labels in after
        if name == "dipc_http_requests_total" and ("route", "/doku/notification") in labels
    ]
    assert not [labels for name, labels in after if ("route", "/pay/notify") in labels]
