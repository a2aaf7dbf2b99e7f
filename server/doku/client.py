"""A DOKU simulator: builds and signs requests exactly as DOKU sends them, and checks our signed replies.

``dipc simulate`` uses it against a running server, and the test suite uses it against the real app on
loopback, so both speak the wire protocol through one piece of code.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import orjson

from server.core.times import utcnow
from server.doku import auth, channels, signature
from server.doku.auth import Client


def _envelope(channel: str) -> dict[str, Any]:
    """The members every DOKU O2O body opens with."""
    return {
        "service": {"id": "ONLINE_TO_OFFLINE"},
        "acquirer": {"id": channel},
        "channel": {"id": channels.CHANNEL_IDS[channel]},
    }


def inquiry_body(payment_code: str, *, channel: str = channels.ALFA, when: datetime | None = None) -> bytes:
    """An inquiry body in DOKU's member order (spec §3)."""
    return orjson.dumps(
        _envelope(channel)
        | {
            "online_to_offline_info": {"payment_code": payment_code},
            "online_to_offline_inquiry": {"date": auth.format_timestamp(when or utcnow()), "identifier": []},
        }
    )


def notification_body(
    payment_code: str,
    *,
    invoice_number: str,
    amount: int,
    channel: str = channels.ALFA,
    original_request_id: str | None = None,
    agent_trx_id: str | None = None,
    store_id: str = "TZ01",
    status: str = "SUCCESS",
    when: datetime | None = None,
) -> bytes:
    """A payment notification body in DOKU's member order (spec §4)."""
    transaction: dict[str, Any] = {"status": status, "date": auth.format_timestamp(when or utcnow())}
    if original_request_id is not None:
        transaction["original_request_id"] = original_request_id
    identifiers = [{"name": "AGENT_ID", "value": "ALFAMART" if channel == channels.ALFA else "INDOMARET"}]
    identifiers.append({"name": "AGENT_STORE_ID", "value": store_id})
    if agent_trx_id is not None:
        identifiers.append({"name": "AGENT_TRX_ID", "value": agent_trx_id})
    return orjson.dumps(
        _envelope(channel)
        | {
            "transaction": transaction,
            "order": {"invoice_number": invoice_number, "amount": amount},
            "online_to_offline_info": {"payment_code": payment_code},
            "online_to_offline_payment": {"identifier": identifiers},
        }
    )


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    headers: Mapping[str, str]
    request_id: str
    signature_valid: bool | None  # None: the reply carries no signature
    signature_problem: str | None = field(default=None)

    def json(self) -> Any:
        return orjson.loads(self.body)


def check_reply_signature(
    client: Client, *, request_id: str, target: str, headers: Mapping[str, str], body: bytes
) -> tuple[bool | None, str | None]:
    """Whether a reply is signed by ``client``'s keys for our request; the problem when it is not."""
    presented = headers.get(auth.SIGNATURE)
    if not presented:
        return None, None
    if headers.get(auth.REQUEST_ID) != request_id:
        return False, "Request-Id is not the request's"
    if headers.get(auth.CLIENT_ID) != client.client_id:
        return False, "Client-Id is not ours"
    message = signature.components(
        client_id=client.client_id,
        request_id=request_id,
        timestamp=headers.get(auth.RESPONSE_TIMESTAMP, ""),
        target=target,
        body=body,
        response=True,
    )
    if signature.verify(client.secret_keys, message, presented) is None:
        return False, "signature does not verify"
    return True, None


class DokuSimulator:
    """Sends what DOKU sends to a dipc server at ``base_url``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        client: Client,
        *,
        inquiry_path: str = "/doku/inquiry",
        notification_path: str = "/doku/notification",
    ) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.client = client
        self.inquiry_path = inquiry_path
        self.notification_path = notification_path

    async def post(
        self,
        path: str,
        body: bytes,
        *,
        request_id: str | None = None,
        now: datetime | None = None,
        headers: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Reply:
        """POST ``body`` signed for ``path``; ``headers`` override or add to the signed ones."""
        request_id = request_id or str(uuid.uuid4())
        sent = auth.signed_headers(
            self.client, request_id=request_id, target=path, body=body, now=now or utcnow(), response=False
        )
        sent["Content-Type"] = content_type
        sent.update(headers or {})
        async with self.session.post(f"{self.base_url}{path}", data=body, headers=sent) as response:
            received = await response.read()
            reply_headers = dict(response.headers)
        valid, problem = check_reply_signature(
            self.client, request_id=request_id, target=path, headers=reply_headers, body=received
        )
        return Reply(response.status, received, reply_headers, request_id, valid, problem)

    async def inquiry(
        self,
        payment_code: str,
        *,
        channel: str = channels.ALFA,
        request_id: str | None = None,
        now: datetime | None = None,
    ) -> Reply:
        body = inquiry_body(payment_code, channel=channel, when=now)
        return await self.post(self.inquiry_path, body, request_id=request_id, now=now)

    async def notify(
        self,
        payment_code: str,
        *,
        invoice_number: str,
        amount: int,
        channel: str = channels.ALFA,
        original_request_id: str | None = None,
        agent_trx_id: str | None = None,
        status: str = "SUCCESS",
        request_id: str | None = None,
        now: datetime | None = None,
    ) -> Reply:
        body = notification_body(
            payment_code,
            invoice_number=invoice_number,
            amount=amount,
            channel=channel,
            original_request_id=original_request_id,
            agent_trx_id=agent_trx_id,
            status=status,
            when=now,
        )
        return await self.post(self.notification_path, body, request_id=request_id, now=now)
