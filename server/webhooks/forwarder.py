"""The webhook forwarder: a background task of every dipc process that has DIPC_WEBHOOK_URL.

Each event goes to the merchant's backend as a signed POST of its JSON document. A 2xx marks it
delivered; anything else is retried with exponential backoff (with jitter, capped) until
DIPC_WEBHOOK_MAX_ATTEMPTS, then it waits as ``failed`` for ``dipc events redeliver``. All state lives in
PostgreSQL, so restarts lose nothing and several processes share the work. Delivery is at least once
(a crash between the receiver's 2xx and our bookkeeping resends the event): receivers deduplicate on
``Dipc-Event-Id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from datetime import UTC, datetime

import aiohttp
import asyncpg
import orjson
import structlog

from server import __version__
from server.config import Settings
from server.core.errors import error_text
from server.core.events import Event
from server.ops import metrics
from server.store import deliveries
from server.store.deliveries import Delivery
from server.store.listener import EventListener
from server.store.pool import UNAVAILABLE_ERRORS
from server.webhooks import signing

log = structlog.get_logger(component="dipc.webhooks")

SUBSCRIBER = "default"
USER_AGENT = f"dipc/{__version__}"  # receivers see who calls, not the HTTP library
IDLE_RECHECK_S = 5.0  # an upper bound on sleeping, in case a wake-up is missed while reconnecting


def backoff_s(attempts: int, *, base_s: float, cap_s: float) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: doubling, capped, ±20% jitter."""
    delay = min(base_s * 2 ** (attempts - 1), cap_s)
    return delay * random.uniform(0.8, 1.2)


class WebhookForwarder:
    def __init__(
        self,
        pool: asyncpg.Pool,
        listener: EventListener,
        settings: Settings,
        session: aiohttp.ClientSession,
    ) -> None:
        assert settings.webhook_url is not None
        self.pool = pool
        self.listener = listener
        self.settings = settings
        self.url = settings.webhook_url
        self.session = session
        # A claimed delivery is ours for this long; past it another process may take it over.
        self.lease_s = settings.webhook_timeout_s + 30.0

    async def run(self) -> None:
        while True:
            try:
                await deliveries.ensure_subscriber(self.pool, SUBSCRIBER, self.url)
                break
            except UNAVAILABLE_ERRORS as error:
                log.warning("webhook.database_unavailable", error=error_text(error))
                await asyncio.sleep(1.0)
        while not self.listener.releasing:  # the process is shutting down: start nothing new
            seen = self.listener.generation
            try:
                if await self.step():
                    continue
                due = await deliveries.next_due(self.pool, SUBSCRIBER)
            except UNAVAILABLE_ERRORS as error:
                log.warning("webhook.database_unavailable", error=error_text(error))
                await asyncio.sleep(1.0)
                continue
            except Exception:
                # Never let the forwarder die quietly: log, pause, and carry on with the next round.
                log.exception("webhook.forwarder_error")
                await asyncio.sleep(IDLE_RECHECK_S)
                continue
            sleep_s = IDLE_RECHECK_S
            if due is not None:
                sleep_s = min(max((due - datetime.now(UTC)).total_seconds(), 0.0), IDLE_RECHECK_S)
            await self.listener.wait_for_change(seen, sleep_s)

    async def step(self) -> bool:
        """Enqueue new events and deliver what is due; True if anything was attempted."""
        await deliveries.enqueue(self.pool, SUBSCRIBER)
        claimed = await deliveries.claim(
            self.pool, SUBSCRIBER, limit=self.settings.webhook_concurrency, lease_s=self.lease_s
        )
        if not claimed:
            return False
        await asyncio.gather(*(self.deliver(delivery, event) for delivery, event in claimed))
        return True

    async def deliver(self, delivery: Delivery, event: Event) -> None:
        try:
            await self._attempt(delivery, event)
        except asyncio.CancelledError:
            # Stopping mid-delivery: hand the lease back so a live process retries now, not in a minute.
            with contextlib.suppress(Exception):
                await asyncio.shield(deliveries.release_lease(self.pool, SUBSCRIBER, event.id))
            raise

    async def _attempt(self, delivery: Delivery, event: Event) -> None:
        body = orjson.dumps(event.document())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            signing.EVENT_ID_HEADER: str(event.id),
            signing.EVENT_TYPE_HEADER: event.type,
            signing.SIGNATURE_HEADER: signing.sign(self.settings.webhook_secrets, body, int(time.time())),
        }
        status: int | None = None
        try:
            async with self.session.post(
                self.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s),
            ) as response:
                status = response.status
                await response.read()
            if 200 <= status < 300:
                await deliveries.mark_delivered(self.pool, SUBSCRIBER, event.id, status)
                metrics.WEBHOOK_ATTEMPTS.labels("delivered").inc()
                log.info("webhook.delivered", event_id=event.id, type=event.type, attempts=delivery.attempts)
                return
            error = f"HTTP {status}"
        except (aiohttp.ClientError, TimeoutError) as failure:
            error = error_text(failure)
        give_up = delivery.attempts >= self.settings.webhook_max_attempts
        retry_in = (
            None
            if give_up
            else backoff_s(
                delivery.attempts,
                base_s=self.settings.webhook_backoff_base_s,
                cap_s=self.settings.webhook_backoff_cap_s,
            )
        )
        await deliveries.mark_attempt_failed(
            self.pool, SUBSCRIBER, event.id, error=error, status=status, retry_in_s=retry_in
        )
        metrics.WEBHOOK_ATTEMPTS.labels("failed" if give_up else "retry").inc()
        log.warning(
            "webhook.failed" if give_up else "webhook.retry",
            event_id=event.id,
            attempts=delivery.attempts,
            error=error,
            retry_in_s=round(retry_in, 3) if retry_in is not None else None,
        )
