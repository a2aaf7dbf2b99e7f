"""Prometheus metrics: defined here, once, and rendered by ``GET /metrics``.

With several worker processes (``DIPC_WORKERS`` > 1) the supervisor sets ``PROMETHEUS_MULTIPROC_DIR``
before the workers start, every process writes its values there, and whichever worker answers a scrape
sums them all up: totals are consistent whichever process Prometheus reaches.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from server import __version__

# Inquiries are answered in milliseconds; the 1 s deadline sits inside the range.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

HTTP_REQUESTS = Counter(
    "dipc_http_requests_total",
    "HTTP requests answered, by route, method, status and outcome.",
    ["route", "method", "status", "outcome"],
)
HTTP_DURATION = Histogram(
    "dipc_http_request_duration_seconds",
    "Time from the request's arrival to the response, by route and outcome.",
    ["route", "outcome"],
    buckets=LATENCY_BUCKETS,
)
INQUIRIES = Counter(
    "dipc_inquiries_total",
    "Inquiries answered, by our finer outcome, channel, and whether the Request-Id was repeated.",
    ["outcome", "channel", "replayed"],
)
NOTIFICATIONS = Counter(
    "dipc_notifications_total",
    "Verified notifications recorded, by outcome (normal, conflict, anomaly, repeat, ignored, rejected).",
    ["outcome"],
)
PAYMENTS = Counter(
    "dipc_payments_total",
    "Payments recorded, by kind (normal, conflict, anomaly) and reason.",
    ["kind", "reason"],
)
SIGNATURE_FAILURES = Counter(
    "dipc_signature_failures_total",
    "DOKU requests refused with invalid_signature, by configured client (or 'unknown') and reason.",
    ["route", "client_id", "reason"],
)
DB_DURATION = Histogram(
    "dipc_db_operation_duration_seconds",
    "Database work of one request (pool wait included), by operation and result.",
    ["operation", "result"],
    buckets=LATENCY_BUCKETS,
)
DB_POOL = Gauge(
    "dipc_db_pool_connections",
    "Connections of the pools, summed over live processes: size, in_use, max.",
    ["state"],
    multiprocess_mode="livesum",
)
DATABASE_UP = Gauge(
    "dipc_database_up",
    "1 when the last readiness check reached the database with current migrations, else 0.",
    multiprocess_mode="livemostrecent",
)
WEBHOOK_ATTEMPTS = Counter(
    "dipc_webhook_attempts_total",
    "Webhook delivery attempts, by result: delivered, retry (failed, will retry), failed (gave up).",
    ["result"],
)
WEBHOOK_DELIVERIES = Gauge(
    "dipc_webhook_deliveries",
    "Webhook deliveries by status (read from the database at scrape time).",
    ["status"],
    multiprocess_mode="mostrecent",
)
WEBHOOK_OLDEST_PENDING = Gauge(
    "dipc_webhook_oldest_pending_seconds",
    "Age of the oldest undelivered webhook delivery (0 when none), read at scrape time.",
    multiprocess_mode="mostrecent",
)
EVENTS_LAST_ID = Gauge(
    "dipc_events_last_id",
    "Id of the newest event in the outbox, read at scrape time.",
    multiprocess_mode="mostrecent",
)
FEED_WAITERS = Gauge(
    "dipc_feed_waiters",
    "Long-polls of the event feed waiting right now.",
    multiprocess_mode="livesum",
)
BUILD_INFO = Gauge(
    "dipc_build_info",
    "Always 1; the labels say which dipc runs.",
    ["version", "python"],
    multiprocess_mode="max",
)

EMBEDDED_RESTARTS = Counter(
    "dipc_embedded_restarts",
    "Times dipc restarted the embedded PostgreSQL it owns after it died (an external one is never ours).",
)

BUILD_INFO.labels(version=__version__, python=platform.python_version()).set(1)


def count_embedded_restart(shared_dir: Path | None = None) -> None:
    """One more restart of the embedded PostgreSQL.

    The supervisor (``DIPC_WORKERS`` > 1) owns the database but answers no scrapes, and its own values
    live in memory: it writes its total into ``shared_dir``, the workers' multiprocess directory, where
    every scrape sums it with the workers' zeros.
    """
    global _embedded_restarts
    _embedded_restarts += 1
    EMBEDDED_RESTARTS.inc()
    if shared_dir is not None and multiprocess_dir() is None:
        values = MmapedDict(str(shared_dir / f"counter_{os.getpid()}.db"))
        try:
            key = mmap_key(
                "dipc_embedded_restarts",
                "dipc_embedded_restarts_total",
                [],
                [],
                EMBEDDED_RESTARTS._documentation,
            )
            values.write_value(key, float(_embedded_restarts), time.time())
        finally:
            values.close()


_embedded_restarts = 0


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def render() -> tuple[bytes, str]:
    """The exposition text of every process's metrics, and its content type."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def exported_names() -> set[str]:
    """Every sample name dipc exposes (with _total, _bucket, _sum, _count), for checking dashboards."""
    names: set[str] = set()
    for metric in (
        HTTP_REQUESTS, HTTP_DURATION, INQUIRIES, NOTIFICATIONS, PAYMENTS, SIGNATURE_FAILURES, DB_DURATION,
        DB_POOL, DATABASE_UP, WEBHOOK_ATTEMPTS, WEBHOOK_DELIVERIES, WEBHOOK_OLDEST_PENDING, EVENTS_LAST_ID,
        FEED_WAITERS, BUILD_INFO, EMBEDDED_RESTARTS,
    ):  # fmt: skip
        for family in metric.describe():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
            else:
                names.add(family.name)
    return names
