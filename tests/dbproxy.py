"""A TCP stand-in in front of the test PostgreSQL, for what a network does to a database's clients."""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tests.integration.test_cli import free_port


class SilencingProxy:
    """TCP in front of PostgreSQL that can "lose" every connection open at one moment: the peer vanished
    without a reset (a failover, a host that lost power, a firewall that forgot the flow), so those
    sockets stay open and nothing ever comes back on them. Later connections work."""

    def __init__(self, database_url: str) -> None:
        parts = urlsplit(database_url)
        query = dict(parse_qsl(parts.query))
        self.upstream_port = parts.port or 5432
        self.socket_dir = query.get("host") if query.get("host", "").startswith("/") else None
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.pairs: list[dict[str, bool]] = []
        self.handlers: set[asyncio.Task] = set()
        self.server: asyncio.Server | None = None  # nothing listens on self.port until start()
        self.port = free_port()
        netloc = f"{parts.username}{':' + parts.password if parts.password else ''}@127.0.0.1:{self.port}"
        rest = urlencode({k: v for k, v in query.items() if k != "host"})
        self.url = urlunsplit(parts._replace(netloc=netloc, query=rest))

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.socket_dir:
            return await asyncio.open_unix_connection(f"{self.socket_dir}/.s.PGSQL.{self.upstream_port}")
        return await asyncio.open_connection(self.upstream_host, self.upstream_port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handlers.add(asyncio.current_task())
        up_reader, up_writer = await self._open_upstream()
        pair = {"silent": False}
        self.pairs.append(pair)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    if pair["silent"]:
                        await asyncio.Event().wait()  # swallowed, and nothing ever answers
                    sink.write(data)
                    await sink.drain()
            if not pair["silent"]:
                sink.close()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            writer.close()
            up_writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    def lose_every_open_connection(self) -> None:
        for pair in self.pairs:
            pair["silent"] = True

    async def close(self) -> None:
        """Stop listening, and end every connection, the silenced ones too (their pumps wait for ever)."""
        if self.server is not None:
            self.server.close()
        for handler in self.handlers:
            handler.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
