"""The ceiling: the least a DOKU inquiry responder can do, against which bench/ measures dipc.

aiohttp + asyncpg + uvloop, one process, as many pool connections as dipc (10 by default). Per request it
verifies the DOKU signature (SHA-256 digest, HMAC-SHA256, constant-time compare), parses the body with
orjson, runs ONE statement that reads the code and writes the audit row, renders the bill with orjson and
signs the reply. No logging, no metrics, no deadline, no idempotency replay, no rules beyond "the code
exists and is active": it is a floor for the work, not a product.

    .venv/bin/python bench/ceiling.py --port 18610 --dsn postgresql://... --client-id X --secret Y
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
from datetime import UTC, datetime

import asyncpg
import orjson
import uvloop
from aiohttp import web

TARGET = "/doku/inquiry"

# Reads the code and writes the audit row in one statement (the response bytes are not known yet, so
# the row records an empty body: a ceiling may cut that corner, dipc may not).
ONE_STATEMENT = """
WITH code AS (
    SELECT payment_code, invoice_number, amount, customer_name, customer_email, status
      FROM payment_codes WHERE payment_code = $1
), audit AS (
    INSERT INTO inquiries (payment_code, request_id, client_id, channel, body_sha256, outcome,
                           invoice_number, amount, http_status, response_body)
    SELECT $1, $2, $3, $4, $5,
           CASE WHEN code.status = 'active' THEN 'SUCCESS' ELSE 'NOT_FOUND' END,
           code.invoice_number, code.amount, 200, ''::bytea
      FROM (SELECT 1) one LEFT JOIN code ON true
    ON CONFLICT DO NOTHING
)
SELECT * FROM code
"""


def _sign(key: bytes, message: bytes) -> str:
    return "HMACSHA256=" + base64.b64encode(hmac.new(key, message, hashlib.sha256).digest()).decode()


def make_app(dsn: str, client_id: str, secret: bytes, pool_size: int) -> web.Application:
    app = web.Application()
    state: dict[str, asyncpg.Pool] = {}

    async def pool_context(_app: web.Application):
        state["pool"] = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
        yield
        await state["pool"].close()

    async def inquiry(request: web.Request) -> web.Response:
        body = await request.read()
        headers = request.headers
        if headers.get("Client-Id") != client_id:
            return web.Response(status=401)
        request_id, timestamp = headers["Request-Id"], headers["Request-Timestamp"]
        body_sha256 = hashlib.sha256(body).digest()
        digest = base64.b64encode(body_sha256).decode()
        message = (
            f"Client-Id:{client_id}\nRequest-Id:{request_id}\nRequest-Timestamp:{timestamp}\n"
            f"Request-Target:{TARGET}\nDigest:{digest}"
        ).encode()
        if not hmac.compare_digest(_sign(secret, message).encode(), headers.get("Signature", "").encode()):
            return web.Response(status=401)
        data = orjson.loads(body)
        code = data["online_to_offline_info"]["payment_code"]
        channel = data["acquirer"]["id"]
        row = await state["pool"].fetchrow(ONE_STATEMENT, code, request_id, client_id, channel, body_sha256)
        if row is None or row["status"] != "active":
            document: dict = {"online_to_offline_inquiry": {"status": "NOT_FOUND"}}
        else:
            document = {
                "order": {"invoice_number": row["invoice_number"], "amount": row["amount"]},
                "online_to_offline_info": {"payment_code": code},
                "online_to_offline_inquiry": {"status": "SUCCESS"},
                "customer": {"name": row["customer_name"], "email": row["customer_email"]},
                "additional_info": {},
            }
        answer = orjson.dumps(document)
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        reply = (
            f"Client-Id:{client_id}\nRequest-Id:{request_id}\nResponse-Timestamp:{now}\n"
            f"Request-Target:{TARGET}\nDigest:{base64.b64encode(hashlib.sha256(answer).digest()).decode()}"
        ).encode()
        return web.Response(
            body=answer,
            content_type="application/json",
            headers={"Client-Id": client_id, "Request-Id": request_id, "Response-Timestamp": now,
                     "Signature": _sign(secret, reply)},
        )  # fmt: skip

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.cleanup_ctx.append(pool_context)
    app.router.add_post(TARGET, inquiry)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--pool-size", type=int, default=10)
    args = parser.parse_args()
    uvloop.install()
    app = make_app(args.dsn, args.client_id, args.secret.encode(), args.pool_size)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, shutdown_timeout=1)


if __name__ == "__main__":
    main()
