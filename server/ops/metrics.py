"""Prometheus metrics: defined here, once, and rendered by ``GET /metrics``.

With several worker processes (``DIPC_WORKERS`` > 1) the supervisor sets ``PROMETHEUS_MULTIPROC_DIR``
before the workers start, every process writes its values there, and whichever worker answers a scrape
sums them all up: totals are consistent whichever process Prometheus reaches.
"""

from __future__ import annotations

import math
import os
import platform
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.registry import Collector

from server import __version__
from server.core.outcomes import CheckResult, InquiryOutcome
from server.core.payments import EXCEPTION_REASONS, NotificationOutcome, PaymentKind, Reason
from server.core.resolutions import Resolution
from server.doku.auth import SIGNATURE_FAILURE_REASONS
from server.doku.channels import CHANNELS

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
INQUIRY_BATCH_SIZE = Histogram(
    "dipc_inquiry_batch_size",
    "Inquiries recorded by one statement and one commit (a worker's inquiries share round trips).",
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
INQUIRIES_QUEUED = Gauge(
    "dipc_inquiries_queued",
    "Inquiries waiting for their lane's next batch, or for their turn to be recorded alone (after their"
    " code's other inquiries recorded alone), at the last scrape, summed over live processes.",
    multiprocess_mode="livesum",
)
PAYMENT_BATCH_SIZE = Histogram(
    "dipc_payment_batch_size",
    "Payment notifications read (statement=read) or recorded (statement=record) in one round trip and"
    " one transaction (a worker's notifications share them).",
    ["statement"],
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
PAYMENTS_QUEUED = Gauge(
    "dipc_payments_queued",
    "Payment reads and recordings waiting for their next batch, or for their turn to be made alone (after"
    " their code's others made alone), at the last scrape, summed over live processes.",
    multiprocess_mode="livesum",
)
DB_POOL = Gauge(
    "dipc_db_pool_connections",
    "Connections of the pools, summed over live processes: size, in_use, max.",
    ["state"],
    multiprocess_mode="livesum",
)
DATABASE_UP = Gauge(
    "dipc_database_up",
    "1 when the last check (the background sampler's, every few seconds, or /readyz) reached the database "
    "with current migrations, else 0.",
    multiprocess_mode="livemostrecent",
)
WEBHOOK_ATTEMPTS = Counter(
    "dipc_webhook_attempts_total",
    "Webhook delivery attempts, by result: delivered, retry (failed, will retry), failed (gave up).",
    ["result"],
)
WEBHOOK_DELIVERIES = Gauge(
    "dipc_webhook_deliveries",
    "Webhook deliveries by status (sampled from the database; NaN while it cannot be read).",
    ["status"],
    multiprocess_mode="mostrecent",
)
WEBHOOK_OLDEST_PENDING = Gauge(
    "dipc_webhook_oldest_pending_seconds",
    "Age of the oldest undelivered webhook delivery (0 when none; NaN while the database cannot be read).",
    multiprocess_mode="mostrecent",
)
EVENTS_LAST_ID = Gauge(
    "dipc_events_last_id",
    "Id of the newest event in the outbox (sampled; NaN while the database cannot be read).",
    multiprocess_mode="mostrecent",
)
EVENTS_UNSEQUENCED_AGE = Gauge(
    "dipc_events_unsequenced_oldest_seconds",
    "Age of the oldest event committed but not yet in the feed (0 when none; sampled; NaN while the "
    "database cannot be read). Events are sequenced within milliseconds, or by a server's sweep.",
    multiprocess_mode="mostrecent",
)
EXCEPTIONS_OPEN = Gauge(
    "dipc_exceptions_open",
    "Open exceptions (conflict and anomaly payments not yet resolved), by kind and reason "
    "(sampled; NaN while the database cannot be read).",
    ["kind", "reason"],
    multiprocess_mode="mostrecent",
)
EXCEPTIONS_OLDEST_OPEN = Gauge(
    "dipc_exceptions_oldest_open_seconds",
    "Age of the oldest open exception (0 when none; NaN while the database cannot be read).",
    multiprocess_mode="mostrecent",
)
EXCEPTION_RESOLUTIONS = Counter(
    "dipc_exception_resolutions_total",
    "Exceptions resolved through this server's admin API, by resolution (refunded, accepted, dismissed).",
    ["resolution"],
)
FEED_WAITERS = Gauge(
    "dipc_feed_waiters",
    "Long-polls of the event feed waiting right now.",
    multiprocess_mode="livesum",
)
RECONCILE_CHECKS = Counter(
    "dipc_reconciliation_checks_total",
    "Check Status calls to DOKU (spec §8), by result: paid, pending, expired, or an unknown "
    "(not_found, rate_limited, server_error, http_error, timeout, unreachable, unreadable, bad_signature).",
    ["result"],
)
RECONCILE_RECOVERED = Counter(
    "dipc_reconciliation_recovered_total",
    "Payments recorded from DOKU's Check Status answers because its notifications never came, by kind.",
    ["kind"],
)
RECONCILE_GAVE_UP = Counter(
    "dipc_reconciliation_gave_up_total",
    "Quoted invoices whose reconciliation schedule ran out without a final answer from DOKU.",
)
RECONCILE_INVOICES = Gauge(
    "dipc_reconciliation_invoices",
    "Quoted invoices still pending, and given up on, read from the database (exact up to 100,000 each, "
    "PostgreSQL's estimate past that).",
    ["state"],
    multiprocess_mode="mostrecent",
)
RECONCILE_LAG = Gauge(
    "dipc_reconciliation_lag_seconds",
    "How late the most overdue scheduled Check Status is (0 when none is): nobody is reconciling.",
    multiprocess_mode="mostrecent",
)
RECONCILE_DOKU_UNREACHABLE = Gauge(
    "dipc_reconciliation_doku_unreachable",
    "1 while this process's reconciler gets no answer from DOKU's API (DNS, refused, timeout) and holds "
    "its Check Status calls back; 0 once DOKU answers again.",
    multiprocess_mode="livemax",
)
WORKER_RESTARTS = Counter(
    "dipc_worker_restarts_total",
    "Worker processes the supervisor started again after one died (DIPC_WORKERS > 1).",
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

RECONCILE_BACKLOG_STATES = ("pending", "gave_up")
EXCEPTION_SERIES = tuple(
    (kind.value, reason.value) for kind, reasons in EXCEPTION_REASONS.items() for reason in reasons
)
WEBHOOK_STATUSES = ("pending", "delivered", "failed")


class Series:
    """``metric.labels(*values)``, remembered per tuple of values, for the request path.

    prometheus_client's ``labels()`` converts and checks every value and takes the metric's lock on each
    call; per request that showed in profiles. The metric itself keeps every child it ever made, so a
    second reference here adds no series: callers pass values from bounded sets, as for any label.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Counter | Histogram) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


HTTP_REQUESTS_SERIES = Series(HTTP_REQUESTS)
HTTP_DURATION_SERIES = Series(HTTP_DURATION)
INQUIRIES_SERIES = Series(INQUIRIES)
DB_DURATION_SERIES = Series(DB_DURATION)


def mark_unknown(gauge: Gauge, label_sets: tuple[tuple[str, ...], ...] = ()) -> None:
    """Set a sampled gauge to NaN: "not known now". Prometheus keeps the series (so nothing reads as a
    fresh 0), comparisons with NaN are false, and aggregations such as max() skip it."""
    if label_sets:
        for labels in label_sets:
            gauge.labels(*labels).set(math.nan)
    else:
        gauge.set(math.nan)


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
    if directory := multiprocess_dir():
        registry = CollectorRegistry()
        registry.register(_WorkerFiles(directory))
        registry.register(PlatformCollector(registry=None))
        registry.register(_WorkerProcesses(directory))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


class _WorkerFiles(multiprocess.MultiProcessCollector):
    """Every process's values, summed: prometheus_client's collector, without the files that hold none.

    A process creates its file empty and sizes it just after. Read in between, an empty file failed the
    whole scrape with a ``struct.error`` (a 500), and did so at every scrape after a worker killed in
    between, since its file stays (prometheus/client_python#1199). Files only grow, so one seen with
    bytes in it stays readable.
    """

    def __init__(self, directory: str) -> None:
        super().__init__(None, path=directory)
        self.directory = Path(directory)

    def collect(self) -> Iterable[Metric]:
        return self.merge(
            [str(path) for path in self.directory.glob("*.db") if _sized(path)], accumulate=True
        )


def _sized(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:  # a dead worker's live gauges, removed since the glob
        return False


class _WorkerProcesses(Collector):
    """``process_*`` of every live worker, labelled with its pid (the multiprocess collector has none).

    A worker is live while its ``livesum`` gauge file exists (the supervisor removes it when the worker
    dies) and its /proc entry does.
    """

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)

    def collect(self) -> Iterator[Metric]:
        pids = sorted(
            {int(match[1]) for f in self.directory.glob("gauge_live*_*.db") if (match := _PID.search(f.name))}
        )
        merged: dict[str, Metric] = {}
        for pid in pids:
            if not Path(f"/proc/{pid}").exists():
                continue
            for family in ProcessCollector(pid=lambda pid=pid: pid, registry=None).collect():
                into = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type, family.unit)
                )
                for sample in family.samples:
                    into.samples.append(sample._replace(labels={**sample.labels, "pid": str(pid)}))
        yield from merged.values()


_PID = re.compile(r"_(\d+)\.db$")


def preinitialise(*, doku_routes: Sequence[str], client_ids: Iterable[str]) -> None:
    """Create, at 0, every labelled series an alert rule watches with ``increase()`` or ``rate()``.

    A counter that appears at 1 has no earlier sample to increase from: the first conflict would not
    fire DipcPaymentConflict. So each series exists from the start, in every process.
    """
    for reason in (Reason.ALREADY_PAID, Reason.INVOICE_ALREADY_PAID):
        PAYMENTS.labels(PaymentKind.CONFLICT.value, reason.value)
    for reason in Reason:
        if reason not in (Reason.ALREADY_PAID, Reason.INVOICE_ALREADY_PAID):
            PAYMENTS.labels(PaymentKind.ANOMALY.value, reason.value)
    PAYMENTS.labels(PaymentKind.NORMAL.value, "")
    for outcome in NotificationOutcome:
        NOTIFICATIONS.labels(outcome.value)
    for inquiry_outcome in InquiryOutcome:
        for channel in CHANNELS:
            for replayed in ("false", "true"):
                INQUIRIES.labels(inquiry_outcome.value, channel, replayed)
    for route in doku_routes:
        for status, outcome in (("503", "UNAVAILABLE"), ("500", "INTERNAL")):
            HTTP_REQUESTS.labels(route, "POST", status, outcome)
        for client_id in (*client_ids, "unknown"):
            for reason in SIGNATURE_FAILURE_REASONS:
                SIGNATURE_FAILURES.labels(route, client_id, reason)
    for operation in (
        "inquiry",
        "inquiry.batch",
        "notification",
        "notification.rejected",
        "payment.read_batch",
        "payment.batch",
    ):
        for result in ("unavailable", "timeout"):
            DB_DURATION.labels(operation, result)
    for status in WEBHOOK_STATUSES:
        WEBHOOK_DELIVERIES.labels(status).set(0)
    for result in ("delivered", "retry", "failed"):
        WEBHOOK_ATTEMPTS.labels(result)
    for kind, reason in EXCEPTION_SERIES:
        EXCEPTIONS_OPEN.labels(kind, reason).set(0)
    for resolution in Resolution:
        EXCEPTION_RESOLUTIONS.labels(resolution.value)
    for result in CheckResult:
        RECONCILE_CHECKS.labels(result.value)
    for kind in PaymentKind:
        RECONCILE_RECOVERED.labels(kind.value)
    for state in RECONCILE_BACKLOG_STATES:
        RECONCILE_INVOICES.labels(state).set(0)


def exported_names() -> set[str]:
    """Every sample name dipc exposes (with _total, _bucket, _sum, _count), for checking dashboards."""
    names: set[str] = set()
    for metric in (
        HTTP_REQUESTS, HTTP_DURATION, INQUIRIES, NOTIFICATIONS, PAYMENTS, SIGNATURE_FAILURES, DB_DURATION,
        INQUIRY_BATCH_SIZE, INQUIRIES_QUEUED, PAYMENT_BATCH_SIZE, PAYMENTS_QUEUED,
        DB_POOL, DATABASE_UP, WEBHOOK_ATTEMPTS, WEBHOOK_DELIVERIES, WEBHOOK_OLDEST_PENDING, EVENTS_LAST_ID,
        EVENTS_UNSEQUENCED_AGE,
        EXCEPTIONS_OPEN, EXCEPTIONS_OLDEST_OPEN, EXCEPTION_RESOLUTIONS, FEED_WAITERS, BUILD_INFO,
        RECONCILE_CHECKS, RECONCILE_RECOVERED, RECONCILE_GAVE_UP, RECONCILE_INVOICES, RECONCILE_LAG,
        RECONCILE_DOKU_UNREACHABLE, WORKER_RESTARTS, EMBEDDED_RESTARTS,
    ):  # fmt: skip
        for family in metric.describe():
            if family.type == "counter":
                names.add(f"{family.name}_total")
            elif family.type == "histogram":
                names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
            else:
                names.add(family.name)
    return names
