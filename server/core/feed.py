"""The event feed (read after a cursor, wait for the next event) and its webhook deliveries."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from server.core.documents import iso
from server.core.errors import ClientAborted, ValidationFailed
from server.core.events import MAX_WAIT_S, Event
from server.core.manage import Page, page_limit
from server.store import deliveries, outbox
from server.store.deliveries import Delivery
from server.store.listener import EventListener

DELIVERY_STATUSES = ("pending", "delivered", "failed")
MAX_ID = 2**63 - 1  # event ids and cursors are bigint


# A long poll looks this often whether its client is still there: aiohttp lets a handler run on after its
# client has gone, and the wait would hold its waiter (woken, and a query made, by every event) to the end.
CLIENT_CHECK_S = 1.0


async def read_feed(
    pool: asyncpg.Pool,
    listener: EventListener,
    *,
    after: int,
    limit: int | None,
    wait: float,
    gone: Callable[[], bool] = lambda: False,
) -> tuple[list[Event], int]:
    """Events with ids above ``after`` (at most ``limit``), waiting up to ``wait`` seconds for the first.

    Returns the events and the cursor to pass as ``after`` next time. The generation is read before each
    query, so an event committed between the query and the wait still wakes us. Raises ClientAborted once
    ``gone()`` says the client has gone (asked every :data:`CLIENT_CHECK_S` of the wait).
    """
    if after < 0:
        raise ValidationFailed({"after": "must be 0 or an event id"})
    if not 0 <= wait <= MAX_WAIT_S:
        raise ValidationFailed({"wait": f"must be between 0 and {MAX_WAIT_S:g} seconds"})
    size = page_limit(limit)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        seen = listener.generation
        events = await listener.reads.read((after, size), lambda: outbox.read_after(pool, after, size))
        remaining = deadline - loop.time()
        if events or remaining <= 0:
            return events, (events[-1].id if events else after)
        # Asked at every wake too: events for other cursors may wake the wait more often than every second.
        while not gone() and not await listener.wait_for_change(seen, min(remaining, CLIENT_CHECK_S)):
            if listener.releasing:
                return events, after  # shutting down: answer now rather than hold the drain
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
        if gone():
            raise ClientAborted("the client closed the connection during the wait")


def delivery_document(delivery: Delivery) -> dict[str, object]:
    return {
        "event_id": delivery.event_id,
        "subscriber": delivery.subscriber,
        "payment_code": delivery.payment_code,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "next_attempt_at": iso(delivery.next_attempt_at),
        "last_error": delivery.last_error,
        "last_status": delivery.last_status,
        "delivered_at": iso(delivery.delivered_at),
        "created_at": iso(delivery.created_at),
    }


async def list_deliveries(
    pool: asyncpg.Pool, *, status: str | None, after: int | None, limit: int | None
) -> Page[Delivery]:
    if status is not None and status not in DELIVERY_STATUSES:
        raise ValidationFailed({"status": f"must be one of {', '.join(DELIVERY_STATUSES)}"})
    size = page_limit(limit)
    items = await deliveries.list_page(pool, status=status, after=after, limit=size + 1)
    return Page.of(items, size, lambda delivery: str(delivery.event_id))


@dataclass(frozen=True, slots=True)
class RedeliveryRequest:
    event_ids: list[int] | None  # None: every delivery in ``statuses``
    statuses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Redelivery:
    requeued: list[int]  # failed deliveries put back in line, attempts from 0
    hurried: list[int]  # pending deliveries made due now (their backoff skipped)
    skipped: dict[int, str]  # named events that were neither: "delivered", or "none" (no delivery)

    def document(self) -> dict[str, object]:
        return {
            "redelivered": len(self.requeued),
            "hurried": len(self.hurried),
            "skipped": [
                {"event_id": event_id, "status": status} for event_id, status in self.skipped.items()
            ],
        }


REDELIVERABLE = ("failed", "pending")


def parse_redelivery(raw: Mapping[str, Any]) -> RedeliveryRequest:
    """``{"event_ids": [...]}`` (failed or pending), ``{"all_failed": true}``, ``{"all_pending": true}``.

    Retrying everything has to be asked for by name: an empty or null list never means "all".
    """
    keys = {"event_ids", "all_failed", "all_pending"}
    if set(raw) - keys or len(set(raw) & keys) != 1:
        raise ValidationFailed(
            {"body": 'send {"event_ids": [...]}, {"all_failed": true} or {"all_pending": true}'}
        )
    for flag, status in (("all_failed", "failed"), ("all_pending", "pending")):
        if flag in raw:
            if raw[flag] is not True:
                raise ValidationFailed({flag: "must be true"})
            return RedeliveryRequest(None, (status,))
    event_ids = raw["event_ids"]
    if (
        not isinstance(event_ids, list)
        or not event_ids
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 < i <= MAX_ID for i in event_ids)
    ):
        raise ValidationFailed({"event_ids": "must be a non-empty list of event ids"})
    return RedeliveryRequest(event_ids, REDELIVERABLE)


async def redeliver(pool: asyncpg.Pool, request: RedeliveryRequest) -> Redelivery:
    """Put failed deliveries back in line and make pending ones due now; say what happened to each."""
    async with pool.acquire() as conn, conn.transaction():
        changed = await deliveries.redeliver(conn, request.event_ids, request.statuses)
        skipped: dict[int, str] = {}
        if request.event_ids is not None:
            done = {event_id for event_id, _ in changed}
            rest = [event_id for event_id in dict.fromkeys(request.event_ids) if event_id not in done]
            found = await deliveries.statuses_of(conn, rest) if rest else {}
            skipped = {event_id: found.get(event_id, "none") for event_id in rest}
    return Redelivery(
        requeued=[event_id for event_id, was in changed if was == "failed"],
        hurried=[event_id for event_id, was in changed if was == "pending"],
        skipped=skipped,
    )
