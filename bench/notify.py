"""Payment notifications for bench/run.py: pre-signed as DOKU sends them, replayed, checked in the database.

A notification is signed with the project's own code (server/doku/auth.py, the body from
server/doku/client.py), so the bench sends exactly what the simulator and the tests send. Exactly once
is checked from the rows, not from the answers: every notification answered 200 has its raw bytes in
the inbox and exactly one payment, no invoice is paid twice, and a replay records nothing new.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

from server.core.times import utcnow
from server.doku import auth, conventions, messages
from server.doku.auth import Client
from server.doku.client import check_reply_signature, notification_body

TARGET = "/doku/notification"


@dataclass(frozen=True, slots=True)
class Bill:
    """What a customer was asked to pay: the code, the invoice number and the amount."""

    payment_code: str
    invoice_number: str
    amount: int


@dataclass(frozen=True, slots=True)
class Notification:
    request_id: str
    headers: dict[str, str]
    body: bytes
    bill: Bill
    transaction_ref: str  # the payment's identity, with code and invoice (spec §4 rule 2)


def presign(client: Client, bills: list[Bill]) -> list[Notification]:
    """One SUCCESS notification per bill, each its own store transaction and Request-Id, signed now."""
    now = utcnow()
    signed = []
    for n, bill in enumerate(bills):
        request_id = str(uuid.uuid4())
        body = notification_body(
            bill.payment_code,
            invoice_number=bill.invoice_number,
            amount=bill.amount,
            original_request_id=str(uuid.uuid4()),
            agent_trx_id=str(n),
            when=now,
        )
        headers = auth.signed_headers(client, request_id=request_id, target=TARGET, body=body, now=now,
                                      response=False)  # fmt: skip
        reference = messages.parse_notification(body).transaction_reference(request_id)
        signed.append(Notification(request_id, headers, body, bill, reference))
    return signed


def write_requests(path: Path, notifications: list[Notification]) -> None:
    """The file bench/presigned.lua reads."""
    with path.open("w") as handle:
        for notification in notifications:
            h = notification.headers
            handle.write(
                f"{h['Request-Id']}\t{h['Request-Timestamp']}\t{h['Signature']}\t{h['Client-Id']}\t"
                f"{notification.body.decode()}\n"
            )


def read_answers(path: Path) -> dict[str, int]:
    """Request-Id → HTTP status, from bench/presigned.lua's answers file."""
    answers = {}
    for line in path.read_text().splitlines():
        request_id, status = line.split("\t")
        answers[request_id] = int(status)
    return answers


@dataclass(frozen=True, slots=True)
class Replay:
    sent: int
    seconds: float
    latencies_ms: list[float]
    wrong: int  # answers that are not a signed 200 {"status":"success"} (spec §4: a repeat answers 200)


async def _replay(url: str, client: Client, notifications: list[Notification], connections: int) -> Replay:
    latencies: list[float] = []
    wrong = 0
    queue = list(reversed(notifications))

    async def sender(session: aiohttp.ClientSession) -> None:
        nonlocal wrong
        while queue:
            notification = queue.pop()
            started = time.perf_counter()
            sent = notification.headers | {"Content-Type": "application/json"}
            async with session.post(url, data=notification.body, headers=sent) as answer:
                body = await answer.read()
                headers = dict(answer.headers)
            latencies.append((time.perf_counter() - started) * 1000)
            signed, _ = check_reply_signature(client, request_id=notification.request_id, target=TARGET,
                                              headers=headers, body=body)  # fmt: skip
            if answer.status != 200 or body != conventions.NOTIFICATION_ACK or not signed:
                wrong += 1

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(sender(session) for _ in range(connections)))
    return Replay(len(notifications), time.perf_counter() - started, latencies, wrong)


def replay(url: str, client: Client, notifications: list[Notification], *, connections: int) -> Replay:
    """Send each notification again, byte for byte, as DOKU retries it; check every answer."""
    return asyncio.run(_replay(url, client, notifications, connections))


async def _quoted_bills(dsn: str, prefix: str) -> list[Bill]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            """
            SELECT DISTINCT payment_code, invoice_number, amount FROM inquiries i
             WHERE payment_code LIKE $1 AND invoice_number IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM payments p
                                WHERE p.payment_code = i.payment_code AND p.invoice_number = i.invoice_number)
             ORDER BY payment_code, invoice_number
            """,
            prefix + "%",
        )
    finally:
        await conn.close()
    return [Bill(**dict(row)) for row in rows]


def quoted_bills(dsn: str, prefix: str) -> list[Bill]:
    """Every bill an inquiry quoted for the codes under ``prefix`` and nobody paid yet."""
    return asyncio.run(_quoted_bills(dsn, prefix))


@dataclass(frozen=True, slots=True)
class Ledger:
    """What the notifications wrote for the codes under one prefix: must not move on a replay."""

    payments: int
    events: int
    paid_count: int
    inbox: int


async def _ledger(dsn: str, prefix: str) -> Ledger:
    conn = await asyncpg.connect(dsn)
    try:
        like = prefix + "%"
        row = await conn.fetchrow(
            """
            SELECT (SELECT count(*) FROM payments WHERE payment_code LIKE $1) AS payments,
                   (SELECT count(*) FROM events WHERE payment_code LIKE $1 AND type LIKE 'payment.%')
                       AS events,
                   (SELECT coalesce(sum(paid_count), 0) FROM payment_codes WHERE payment_code LIKE $1)
                       AS paid_count,
                   (SELECT count(*) FROM notifications WHERE payment_code LIKE $1) AS inbox
            """,
            like,
        )
    finally:
        await conn.close()
    return Ledger(**dict(row))


async def _settled_ledger(dsn: str, prefix: str) -> Ledger:
    # wrk stops with up to one notification per connection in flight: the server still records those
    # (their answers go unread), so what was written is read only once it has stopped moving.
    last = await _ledger(dsn, prefix)
    while True:
        await asyncio.sleep(0.5)
        current = await _ledger(dsn, prefix)
        if current == last:
            return current
        last = current


def ledger(dsn: str, prefix: str) -> Ledger:
    """The rows written under ``prefix``, once the server has finished what was sent to it."""
    return asyncio.run(_settled_ledger(dsn, prefix))


@dataclass(frozen=True, slots=True)
class Checks:
    acknowledged: int  # notifications answered 200
    without_one_payment: int  # ... whose transaction has no payment row, or (impossible by key) several
    not_normal: int  # ... whose payment is a conflict or an anomaly (each bill was paid once)
    not_in_inbox: int  # ... whose raw notification is not stored
    inbox_rows_short: int  # ... stored fewer times than they were answered 200 (replays count too)
    paid_twice: int  # invoices with more than one payment, under the prefix


async def _check(dsn: str, prefix: str, acknowledged: list[Notification], answered_times: int) -> Checks:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TEMP TABLE acknowledged (request_id text, payment_code text, invoice_number text, "
            "transaction_ref text)"
        )
        await conn.copy_records_to_table(
            "acknowledged",
            records=[
                (n.request_id, n.bill.payment_code, n.bill.invoice_number, n.transaction_ref)
                for n in acknowledged
            ],
        )
        row = await conn.fetchrow(
            """
            SELECT count(*) AS acknowledged,
                   count(*) FILTER (WHERE payments <> 1) AS without_one_payment,
                   count(*) FILTER (WHERE not_normal > 0) AS not_normal,
                   count(*) FILTER (WHERE inbox = 0) AS not_in_inbox,
                   count(*) FILTER (WHERE inbox < $1) AS inbox_rows_short
              FROM (SELECT (SELECT count(*) FROM payments p
                             WHERE (p.payment_code, p.invoice_number, p.transaction_ref)
                                 = (a.payment_code, a.invoice_number, a.transaction_ref)) AS payments,
                           (SELECT count(*) FROM payments p
                             WHERE (p.payment_code, p.invoice_number, p.transaction_ref)
                                 = (a.payment_code, a.invoice_number, a.transaction_ref)
                               AND p.kind <> 'normal') AS not_normal,
                           (SELECT count(*) FROM notifications n
                             WHERE n.payment_code = a.payment_code AND n.request_id = a.request_id) AS inbox
                      FROM acknowledged a) per_notification
            """,
            answered_times,
        )
        paid_twice = await conn.fetchval(
            """
            SELECT count(*) FROM (SELECT 1 FROM payments WHERE payment_code LIKE $1
                                   GROUP BY payment_code, invoice_number HAVING count(*) > 1) twice
            """,
            prefix + "%",
        )
    finally:
        await conn.close()
    return Checks(**dict(row), paid_twice=paid_twice)


def check(dsn: str, prefix: str, acknowledged: list[Notification], *, answered_times: int) -> Checks:
    """Exactly once, from the rows: ``answered_times`` is how often each was answered 200 (1, or 2 after
    a replay), and so how many inbox rows it must have (spec §4 rule 1: every notification is stored)."""
    return asyncio.run(_check(dsn, prefix, acknowledged, answered_times))
