"""DOKU's Check Status API (spec §8): ask DOKU what became of one invoice.

``GET <DOKU API>/orders/v1/status/<invoice_number>``, signed as spec §6 without a ``Digest`` line (a GET
has no body), with a fresh ``Request-Id`` and a per-request timeout. Every answer is classified into
one of a few results; only ``SUCCESS``, ``PENDING`` and ``EXPIRED`` in a readable, authentic 200 are
answers about the invoice, everything else is *unknown* and never read as "unpaid".
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote, urlsplit

import aiohttp

from server.core.errors import DipcError, error_text
from server.core.outcomes import CheckResult
from server.doku import auth, conventions
from server.doku.auth import Client
from server.doku.client import check_reply_signature
from server.doku.messages import CheckStatusMessage, parse_check_status

# Bodies are small JSON documents; a larger one is not an answer we can use.
MAX_ANSWER_BYTES = 256 * 1024
USER_AGENT = "dipc (Check Status)"


_STATUS_RESULTS = {
    conventions.CHECK_PAID: CheckResult.PAID,
    conventions.CHECK_PENDING: CheckResult.PENDING,
    conventions.CHECK_EXPIRED: CheckResult.EXPIRED,
}


@dataclass(frozen=True, slots=True)
class CheckAnswer:
    """One call and what came back, exactly as received (the raw answer of a payment is kept)."""

    request_id: str
    target: str
    result: CheckResult
    detail: str
    http_status: int | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    message: CheckStatusMessage | None = None  # set for PAID, PENDING and EXPIRED


class CheckStatusClient:
    """Signs and sends Check Status requests to the DOKU API at ``base_url``."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, *, timeout_s: float) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        # A base URL with a path (a gateway in front of DOKU) keeps it: the target is the path as sent.
        self._prefix = urlsplit(self.base_url).path.rstrip("/")

    def target(self, invoice_number: str) -> str:
        """The path we call and sign: the invoice number is one path segment, percent-encoded."""
        return f"{self._prefix}{conventions.CHECK_STATUS_PATH}{quote(invoice_number, safe='')}"

    async def check(
        self, client: Client, *, payment_code: str, invoice_number: str, now: datetime
    ) -> CheckAnswer:
        """Ask about one invoice; never raises for what DOKU or the network does."""
        target = self.target(invoice_number)
        request_id = str(uuid.uuid4())
        headers = auth.signed_headers(
            client, request_id=request_id, target=target, body=b"", now=now, response=False
        )
        headers["User-Agent"] = USER_AGENT
        url = f"{self.base_url}{target[len(self._prefix) :]}"

        def answer(result: CheckResult, detail: str, **fields) -> CheckAnswer:
            return CheckAnswer(request_id, target, result, detail, **fields)

        try:
            # Never follow a redirect: it would carry our signed headers to another server, and its answer
            # is not DOKU's. A 3xx is an unknown answer like any other non-200.
            async with self.session.get(
                url, headers=headers, timeout=self.timeout, allow_redirects=False
            ) as response:
                body = bytearray()
                async for chunk in response.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_ANSWER_BYTES:
                        break
                status = response.status
                received = tuple(response.headers.items())
        except TimeoutError:
            return answer(CheckResult.TIMEOUT, f"no answer within {self.timeout.total:g} s")
        except (aiohttp.ClientError, OSError, ValueError) as error:
            return answer(CheckResult.UNREACHABLE, error_text(error)[:300])
        raw = {"http_status": status, "headers": received, "body": bytes(body)}
        if status != 200:
            return answer(_status_result(status), f"HTTP {status}", **raw)
        if len(body) > MAX_ANSWER_BYTES:
            return answer(CheckResult.UNREADABLE, f"the answer is over {MAX_ANSWER_BYTES} bytes", **raw)
        valid, problem = check_reply_signature(
            client, request_id=request_id, target=target, headers=dict(received), body=raw["body"]
        )
        if valid is False:
            return answer(CheckResult.BAD_SIGNATURE, f"the answer's signature: {problem}", **raw)
        try:
            message = parse_check_status(
                raw["body"], payment_code=payment_code, invoice_number=invoice_number
            )
        except DipcError as error:
            return answer(CheckResult.UNREADABLE, error.message[:300], **raw)
        result = _STATUS_RESULTS.get(message.transaction_status)
        if result is None:
            return answer(
                CheckResult.UNREADABLE, f"transaction.status {message.transaction_status!r}"[:300], **raw
            )
        return answer(result, message.transaction_status, message=message, **raw)


def _status_result(status: int) -> CheckResult:
    if status == 404:
        return CheckResult.NOT_FOUND
    if status == 429:
        return CheckResult.RATE_LIMITED
    if status >= 500:
        return CheckResult.SERVER_ERROR
    return CheckResult.HTTP_ERROR
