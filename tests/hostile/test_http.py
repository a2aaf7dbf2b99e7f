# A raw request reads best on one line, as it goes on the wire.
# ruff: noqa: E501
"""The HTTP layer itself, on a raw socket: requests no client library would send. Each is answered with
a 4xx in JSON (or the connection is closed), one log line, no traceback, no payment code in the log."""

from __future__ import annotations

import asyncio
import gzip

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import ADMIN_TOKEN, CLIENT, CODE
from tests.hostile.conftest import assert_log_clean, assert_no_5xx, counts, examples
from tests.rawhttp import exchange, request_bytes, signed_raw_headers

BAD = b"/v1/payment-codes/" + CODE.encode()
AUTH = b"Authorization: Bearer " + ADMIN_TOKEN.encode() + b"\r\n"
SIGNED = signed_raw_headers(CLIENT, target="/doku/notification", body=b"{}", request_id=b"r-1")

CASES: dict[str, bytes] = {
    "header over 8 KB": b"GET " + BAD + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n",
    "request line over 8 KB": b"GET /" + b"8" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "bare CR": b"GET " + BAD + b" HTTP/1.1\r\nHost: x\r\nX-A: b\rc\r\n\r\n",
    "bare LF line ends": b"GET " + BAD + b" HTTP/1.1\nHost: x\n" + AUTH.replace(b"\r\n", b"\n") + b"\n",
    "obs-fold": b"GET " + BAD + b" HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n",
    "NUL in a header": b"GET " + BAD + b" HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n",
    "NUL in the path": b"GET /v1/\x00" + CODE.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "space in a header name": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX A: b\r\n\r\n",
    "empty header name": b"GET /healthz HTTP/1.1\r\nHost: x\r\n: b\r\n\r\n",
    "Content-Length with chunked": b"POST /doku/inquiry HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "duplicate Content-Length": b"POST /doku/inquiry HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Content-Length: 4\r\n\r\nabcd",
    "negative Content-Length": b"POST /doku/inquiry HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    "signed Content-Length": b"POST /doku/inquiry HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n{}",
    "huge Content-Length": b"POST /doku/inquiry HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    "Content-Length over the limit": b"POST /doku/notification HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n{",
    "bad chunk size": b"POST /doku/notification HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Type: application/json\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "chunk size overflow": b"POST /doku/notification HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"ffffffffffffffffffff\r\n{}\r\n",
    "unknown transfer coding": b"POST /doku/inquiry HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{}",
    "gzip that is not gzip": b"POST /doku/notification HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
    b"Content-Type: application/json\r\nContent-Length: 4\r\n\r\nabcd",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "unknown method": b"BREW " + BAD + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "lowercase method": b"get /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    "HTTP/9.9": b"GET /healthz HTTP/9.9\r\nHost: x\r\n\r\n",
    "HTTP/1.0 without Host": b"GET /healthz HTTP/1.0\r\n\r\n",
    "absolute-form target": b"GET http://x" + BAD + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n",
    "asterisk target": b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
    "CONNECT": b"CONNECT x:443 HTTP/1.1\r\nHost: x\r\n\r\n",
    "TLS ClientHello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    "garbage": b"\x00\xff" * 64 + b"\r\n\r\n",
    "Upgrade to websocket": b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    "h2c upgrade": b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    "many headers": b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 500 + b"\r\n",
    "pipelined after a bad one": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: b\rc\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
    "HEAD of every kind": b"HEAD " + BAD + b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n",
    "OPTIONS on DOKU": b"OPTIONS /doku/inquiry HTTP/1.1\r\nHost: x\r\n\r\n",
    "duplicate Client-Id, signed": request_bytes(
        "POST", "/doku/notification", [*SIGNED, ("Client-Id", "other")], b"{}"
    ),
    "duplicate Signature, signed": request_bytes(
        "POST", "/doku/notification", [("Signature", "HMACSHA256=AAAA"), *SIGNED], b"{}"
    ),
    "percent-encoded code in the path": b"GET /v1/payment-codes/%38%38%39%36%35%30%30%30%30%30%30%30%30%37%37%37"
    b" HTTP/1.1\r\nHost: x\r\n" + AUTH + b"\r\n",
    "non-ASCII digits in the path": "GET /v1/payment-codes/٨٨٩٦٥٠٠٠٠٠٠٠٠٧٧٧ HTTP/1.1\r\nHost: x\r\n".encode()
    + AUTH
    + b"\r\n",
    "a gzip bomb": b"POST /doku/notification HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    % len(gzip.compress(b" " * 50_000_000))
    + gzip.compress(b" " * 50_000_000),
}


@pytest.mark.parametrize("request_", CASES.values(), ids=CASES.keys())
async def test_a_malformed_request_is_a_json_4xx_or_a_closed_connection(client, pool, hostile_log, request_):
    before = await counts(pool)
    reply = await exchange(client.server.host, client.server.port, request_, wait_s=5.0)
    if reply is not None:
        assert_no_5xx(reply.status)
        if reply.status >= 400 and reply.body:
            assert reply.headers["content-type"].startswith("application/json"), reply
        if reply.status == 400:  # a refused request is never echoed
            assert CODE.encode() not in reply.body
    await asyncio.sleep(0.05)
    after = await counts(pool)
    if b"Signature: HMACSHA256=" in request_ and reply is not None and reply.status == 400:
        # Signed by the merchant's key, so kept though unusable (spec §4 rule 1).
        before["notifications"] += 1
    assert after == before
    assert_log_clean(hostile_log, "8896500000000777", "88965000000")


# Random request heads: a valid request line, then bytes of any kind where the headers go.
heads = st.tuples(
    st.sampled_from([b"GET /healthz", b"POST /doku/inquiry", b"POST /doku/notification", b"GET " + BAD]),
    st.sampled_from([b" HTTP/1.1", b" HTTP/1.0", b" HTTP/1.1 ", b""]),
    st.lists(st.binary(max_size=40), max_size=6),
    st.binary(max_size=64),
)


@given(head=heads)
@examples(300)
async def test_any_bytes_where_headers_go_are_answered_without_a_trace(client, pool, hostile_log, head):
    line, version, headers, body = head
    request = line + version + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body
    reply = await exchange(client.server.host, client.server.port, request, wait_s=4.0)
    if reply is not None:
        assert_no_5xx(reply.status)
    assert_log_clean(hostile_log)


async def test_clients_vanishing_at_every_stage_leave_no_trace(client, pool, hostile_log):
    """Connect and leave; leave mid request line, mid headers, mid body; leave while being answered."""
    host, port = client.server.host, client.server.port
    whole = request_bytes("POST", "/doku/notification", SIGNED, b'{"a":"' + b"x" * 20000 + b'"}')
    for cut in (0, 5, 40, len(whole) // 2, len(whole) - 1, len(whole)):
        _, writer = await asyncio.open_connection(host, port)
        writer.write(whole[:cut])
        await writer.drain()
        writer.transport.abort()  # a reset, not a polite close
    await asyncio.sleep(0.3)
    assert_log_clean(hostile_log)
