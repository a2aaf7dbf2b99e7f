"""The background sampler: gauges read from the database every few seconds, in every serving process.

Without it ``dipc_database_up`` changed only when someone called ``/readyz`` and the webhook gauges only
when someone scraped, freezing at their last value through an outage. Each round checks readiness (which
sets ``dipc_database_up``) and then runs every sample in :data:`SAMPLES` on the readiness checker's own
connection, never the request pool, under a short deadline of its own. When the database cannot be read
the sampled gauges become NaN ("unknown"), not a stale number: PromQL comparisons with NaN are false and
max() skips it, while ``dipc_database_up`` is 0 and ``DipcNotReady`` fires.

To sample something new (reconciliation gauges, say), write a :class:`Sample` and add it to SAMPLES.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import asyncpg
import structlog

from server.core.errors import error_text
from server.ops import metrics
from server.ops.health import HealthChecker
from server.store import casework, deliveries, outbox, reconciliation
from server.store.pool import UNAVAILABLE_ERRORS

log = structlog.get_logger(component="dipc.sampler")

SAMPLE_TIMEOUT_S = 1.0  # all samples of one round together; cheap queries answer in milliseconds


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    read: Callable[[asyncpg.Connection], Awaitable[None]]  # query and set the gauges
    unknown: Callable[[], None]  # mark the same gauges unknown (NaN)


async def _read_webhooks(conn: asyncpg.Connection) -> None:
    counts, oldest = await deliveries.stats(conn)
    for status in metrics.WEBHOOK_STATUSES:
        metrics.WEBHOOK_DELIVERIES.labels(status).set(counts.get(status, 0))
    metrics.WEBHOOK_OLDEST_PENDING.set(oldest)


def _webhooks_unknown() -> None:
    metrics.mark_unknown(metrics.WEBHOOK_DELIVERIES, tuple((status,) for status in metrics.WEBHOOK_STATUSES))
    metrics.mark_unknown(metrics.WEBHOOK_OLDEST_PENDING)


async def _read_events(conn: asyncpg.Connection) -> None:
    metrics.EVENTS_LAST_ID.set(await outbox.last_id(conn))
    metrics.EVENTS_UNSEQUENCED_AGE.set(await outbox.oldest_unsequenced_s(conn))


def _events_unknown() -> None:
    metrics.mark_unknown(metrics.EVENTS_LAST_ID)
    metrics.mark_unknown(metrics.EVENTS_UNSEQUENCED_AGE)


_exception_series: set[tuple[str, str]] = set(metrics.EXCEPTION_SERIES)


async def _read_exceptions(conn: asyncpg.Connection) -> None:
    counts, oldest = await casework.open_stats(conn)
    _exception_series.update(counts)  # a pair seen once is reported (at 0) from then on
    for kind, reason in _exception_series:
        metrics.EXCEPTIONS_OPEN.labels(kind, reason).set(counts.get((kind, reason), 0))
    metrics.EXCEPTIONS_OLDEST_OPEN.set(oldest)


def _exceptions_unknown() -> None:
    metrics.mark_unknown(metrics.EXCEPTIONS_OPEN, tuple(_exception_series))
    metrics.mark_unknown(metrics.EXCEPTIONS_OLDEST_OPEN)


async def _read_reconciliation(conn: asyncpg.Connection) -> None:
    invoices, lag = await reconciliation.backlog(conn)
    for state in metrics.RECONCILE_BACKLOG_STATES:
        metrics.RECONCILE_INVOICES.labels(state).set(invoices.get(state, 0))
    metrics.RECONCILE_LAG.set(lag)


def _reconciliation_unknown() -> None:
    metrics.mark_unknown(
        metrics.RECONCILE_INVOICES, tuple((state,) for state in metrics.RECONCILE_BACKLOG_STATES)
    )
    metrics.mark_unknown(metrics.RECONCILE_LAG)


SAMPLES: list[Sample] = [
    Sample("webhooks", _read_webhooks, _webhooks_unknown),
    Sample("events", _read_events, _events_unknown),
    Sample("exceptions", _read_exceptions, _exceptions_unknown),
    Sample("reconciliation", _read_reconciliation, _reconciliation_unknown),
]


class DatabaseSampler:
    def __init__(
        self, health: HealthChecker, *, every_s: float, samples: Sequence[Sample] | None = None
    ) -> None:
        self.health = health
        self.every_s = every_s
        self.samples = SAMPLES if samples is None else samples

    async def run(self) -> None:
        """Sample until cancelled; a failed round never ends the loop."""
        while True:
            try:
                await self.sample_once()
            except Exception:
                log.exception("sampler.round_failed")
                self._all_unknown()
            await asyncio.sleep(self.every_s)

    async def sample_once(self) -> bool:
        """One round; True when every sample was read."""
        readiness = await self.health.readiness()
        if not readiness.ready:
            self._all_unknown()
            return False
        read_all = True
        async with self.health.connection() as conn:
            if conn is None:  # closed between the check and now
                metrics.DATABASE_UP.set(0)
                self._all_unknown()
                return False
            sample = None
            try:
                async with asyncio.timeout(SAMPLE_TIMEOUT_S):
                    for sample in self.samples:
                        try:
                            await sample.read(conn)
                        except UNAVAILABLE_ERRORS:
                            raise
                        except Exception:  # one broken sample must not blind the others
                            log.exception("sampler.sample_failed", sample=sample.name)
                            sample.unknown()
                            read_all = False
            except TimeoutError:
                # The database answered the check just now: a read that hangs waits on something (a table
                # an operator holds locked), and says so, by name; it is not the database gone. The
                # connection goes (its backend gives up by itself: health.STATEMENT_TIMEOUT_MS); if the
                # database is what hangs, the next round's check says so.
                log.warning("sampler.sample_timeout", sample=sample and sample.name, seconds=SAMPLE_TIMEOUT_S)
                conn.terminate()
                self._all_unknown()
                return False
            except UNAVAILABLE_ERRORS as error:
                # The database went away (or hangs) since the check: down, and nothing is known now.
                log.warning("sampler.database_unavailable", error=error_text(error))
                conn.terminate()
                metrics.DATABASE_UP.set(0)
                self._all_unknown()
                return False
        return read_all

    def _all_unknown(self) -> None:
        for sample in self.samples:
            sample.unknown()
