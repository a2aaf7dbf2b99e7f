"""HTTP as bytes on a socket: for requests no well-behaved client library would send."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson

from server.core.times import utcnow
from server.doku import auth, signature
from server.doku.auth import Client


@dataclass(frozen=True)
class RawReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return orjson.loads(self.body)


def parse_reply(data: bytes, *, head: bool = False) -> RawReply | None:
    """The first response in ``data``; None when the server closed without answering."""
    while data.startswith(b"HTTP/1.1 1"):  # an interim answer (100 Continue): the final one follows
        data = data.partition(b"\r\n\r\n")[2]
    if not data:
        return None
    top, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = top.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = 0 if head else int(headers.get("content-length", len(rest)))
    return RawReply(int(status_line.split()[1]), headers, rest[:length])


async def exchange(host: str, port: int, request: bytes, *, wait_s: float = 5.0) -> RawReply | None:
    """Send ``request`` as it is, read until the server closes (or ``wait_s``), parse the first reply."""
    head = request.startswith(b"HEAD ")
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        chunks = []
        async with asyncio.timeout(wait_s):
            while True:
                try:
                    chunk = await reader.read(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
                reply = parse_reply(b"".join(chunks), head=head)
                complete = reply is not None and (
                    head or len(reply.body) >= int(reply.headers.get("content-length", 0))
                )
                if b"\r\n\r\n" in b"".join(chunks) and complete:
                    break
        return parse_reply(b"".join(chunks), head=head)
    finally:
        writer.close()


def request_bytes(
    method: str, path: str, headers: list[tuple[bytes | str, bytes | str]], body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: localhost"]
    for name, value in headers:
        name_b = name if isinstance(name, bytes) else name.encode()
        value_b = value if isinstance(value, bytes) else value.encode()
        lines.append(name_b + b": " + value_b)
    if body and not any(
        (n if isinstance(n, str) else n.decode("latin-1")).lower() == "content-length" for n, _ in headers
    ):
        lines.append(f"Content-Length: {len(body)}".encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def signed_raw_headers(
    client: Client, *, target: str, body: bytes, request_id: bytes
) -> list[tuple[bytes | str, bytes | str]]:
    """DOKU's four headers with a Request-Id of any bytes, signed over those very bytes."""
    timestamp = auth.format_timestamp(utcnow())
    message = signature.components(
        client_id=client.client_id,
        request_id=request_id.decode("utf-8", "surrogateescape"),
        timestamp=timestamp,
        target=target,
        body=body,
    )
    return [
        ("Client-Id", client.client_id),
        ("Request-Id", request_id),
        ("Request-Timestamp", timestamp),
        ("Signature", signature.sign(client.secret_keys[0], message)),
        ("Content-Type", "application/json"),
    ]
