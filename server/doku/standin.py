"""A stand-in for DOKU's Check Status API (spec §8), for rehearsals and for the test suite.

It serves ``GET /orders/v1/status/<invoice_number>`` as DOKU does: every header of every request is
checked (a known Client-Id, a fresh Request-Id, a timestamp within the skew, the signature over the four
lines without a Digest), and the answer is signed. It answers ``SUCCESS`` for the invoices it was told
were paid, ``EXPIRED`` for those it was told expired, and ``PENDING`` for the rest; it can be scripted to
misbehave (an error status, garbage, a hang past the caller's timeout). ``dipc simulate doku-api`` serves
it; ``dipc simulate flow --lost-notification`` pays an invoice at it without notifying dipc, so a
merchant can rehearse "the notification never came" end to end.

Control endpoints (no authentication: run it on loopback): ``POST /_standin/payments`` with
``{"payment_code", "invoice_number", "amount", "original_request_id"?, "channel"?}`` and
``GET /_standin/requests``.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web

from server.core.errors import error_text
from server.core.times import parse_timestamp, utcnow
from server.doku import auth, channels, conventions, signature
from server.doku.auth import Client
from server.doku.client import notification_body

_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


@dataclass
class Scripted:
    """One scripted answer: ``status`` with ``body`` (None: the normal answer), after ``delay_s`` and
    after ``hold`` is set; ``signed=False`` leaves the signature headers out."""

    status: int = 200
    body: bytes | None = None
    delay_s: float = 0.0
    hold: asyncio.Event | None = None
    signed: bool = True


@dataclass
class Seen:
    """A request the stand-in received, and what was wrong with it."""

    invoice_number: str
    client_id: str | None
    request_id: str | None
    problems: list[str]
    started: float
    finished: float | None = None
    status: int | None = None


@dataclass
class DokuStandIn:
    clients: Mapping[str, Client]
    max_skew_s: float = 300.0
    paid: dict[str, bytes] = field(default_factory=dict)  # invoice -> the SUCCESS answer's body
    expired: set[str] = field(default_factory=set)
    scripts: dict[str, deque[Scripted]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    _request_ids: set[str] = field(default_factory=set)

    # --- what a test or a rehearsal tells it ---------------------------------------------------

    def pay(
        self,
        payment_code: str,
        invoice_number: str,
        amount: int,
        *,
        original_request_id: str | None = None,
        agent_trx_id: str | None = None,
        channel: str = channels.ALFA,
        when: datetime | None = None,
    ) -> bytes:
        """The customer paid at the counter: from now on Check Status answers SUCCESS with this body."""
        body = notification_body(
            payment_code,
            invoice_number=invoice_number,
            amount=amount,
            channel=channel,
            original_request_id=original_request_id,
            agent_trx_id=agent_trx_id,
            when=when,
        )
        self.paid[invoice_number] = body
        return body

    def expire(self, invoice_number: str) -> None:
        self.expired.add(invoice_number)

    def script(self, invoice_number: str, *answers: Scripted) -> None:
        """The next checks of ``invoice_number`` get these answers, in order, then the normal one."""
        self.scripts.setdefault(invoice_number, deque()).extend(answers)

    def checks_of(self, invoice_number: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.invoice_number == invoice_number]

    @property
    def problems(self) -> list[str]:
        return [f"{seen.invoice_number}: {problem}" for seen in self.seen for problem in seen.problems]

    def overlapping(self) -> list[str]:
        """Invoices that were being checked by two requests at the same time."""
        found = []
        by_invoice: dict[str, list[Seen]] = {}
        for seen in self.seen:
            by_invoice.setdefault(seen.invoice_number, []).append(seen)
        for invoice, requests in by_invoice.items():
            spans = sorted((s.started, s.finished or time.monotonic()) for s in requests)
            if any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)):
                found.append(invoice)
        return found

    # --- the server ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(conventions.CHECK_STATUS_PATH + "{invoice:.+}", self._check_status)
        app.router.add_post("/_standin/payments", self._control_pay)
        app.router.add_get("/_standin/requests", self._control_requests)
        return app

    def _verify(self, request: web.Request, seen: Seen) -> Client | None:
        headers = request.headers
        missing = [name for name in auth.REQUIRED_HEADERS if not headers.get(name)]
        if missing:
            seen.problems.append(f"missing header(s) {', '.join(missing)}")
            return None
        client = self.clients.get(headers[auth.CLIENT_ID])
        if client is None:
            seen.problems.append(f"unknown Client-Id {headers[auth.CLIENT_ID]!r}")
            return None
        request_id = headers[auth.REQUEST_ID]
        if len(request_id) > conventions.REQUEST_ID_MAX_LENGTH:
            seen.problems.append("Request-Id is over 128 characters")
        if request_id in self._request_ids:
            seen.problems.append(f"Request-Id {request_id} was used before")
        self._request_ids.add(request_id)
        stamp = headers[auth.REQUEST_TIMESTAMP]
        if not _TIMESTAMP.match(stamp):
            seen.problems.append(
                f"Request-Timestamp {stamp!r} is not UTC ISO 8601 with Z at second precision"
            )
        elif abs((utcnow() - parse_timestamp(stamp)).total_seconds()) > self.max_skew_s:
            seen.problems.append(f"Request-Timestamp {stamp} is off by more than {self.max_skew_s:g} s")
        if request.can_read_body or request.content_length:
            seen.problems.append("a Check Status request has no body")
        target = request.raw_path.split("?", 1)[0]
        message = signature.components(
            client_id=client.client_id, request_id=request_id, timestamp=stamp, target=target, body=b""
        )
        if signature.verify(client.secret_keys, message, headers[auth.SIGNATURE]) is None:
            seen.problems.append("the signature does not verify (four lines, no Digest, the path as sent)")
        return None if seen.problems else client

    async def _check_status(self, request: web.Request) -> web.Response:
        invoice = unquote(request.match_info["invoice"])
        seen = Seen(invoice, request.headers.get(auth.CLIENT_ID), request.headers.get(auth.REQUEST_ID), [],
                    time.monotonic())  # fmt: skip
        self.seen.append(seen)
        try:
            client = self._verify(request, seen)
            if client is None:
                seen.status = 401
                return _json(
                    401, {"error": {"code": "invalid_signature", "message": "; ".join(seen.problems)}}
                )
            queue = self.scripts.get(invoice)
            scripted = queue.popleft() if queue else Scripted()
            if scripted.hold is not None:
                await scripted.hold.wait()
            if scripted.delay_s:
                await asyncio.sleep(scripted.delay_s)
            body = scripted.body if scripted.body is not None else self._answer(invoice)
            headers = None
            if scripted.signed:
                headers = auth.signed_headers(
                    client,
                    request_id=request.headers[auth.REQUEST_ID],
                    target=request.raw_path.split("?", 1)[0],
                    body=body,
                    now=utcnow(),
                    response=True,
                )
            seen.status = scripted.status
            return web.Response(
                status=scripted.status, body=body, content_type="application/json", headers=headers
            )
        finally:
            seen.finished = time.monotonic()

    def _answer(self, invoice: str) -> bytes:
        if invoice in self.paid:
            return self.paid[invoice]
        status = conventions.CHECK_EXPIRED if invoice in self.expired else conventions.CHECK_PENDING
        return orjson.dumps({"order": {"invoice_number": invoice}, "transaction": {"status": status}})

    async def _control_pay(self, request: web.Request) -> web.Response:
        try:
            document: Any = orjson.loads(await request.read())
            body = self.pay(
                str(document["payment_code"]),
                str(document["invoice_number"]),
                int(document["amount"]),
                original_request_id=document.get("original_request_id"),
                channel=document.get("channel") or channels.ALFA,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            return _json(400, {"error": {"code": "BAD_REQUEST", "message": error_text(error)}})
        return web.Response(status=201, body=body, content_type="application/json")

    async def _control_requests(self, request: web.Request) -> web.Response:
        return _json(
            200,
            {
                "requests": [
                    {"invoice_number": s.invoice_number, "client_id": s.client_id, "request_id": s.request_id,
                     "status": s.status, "problems": s.problems}
                    for s in self.seen
                ]
            },
        )  # fmt: skip


def _json(status: int, document: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(document), content_type="application/json")
