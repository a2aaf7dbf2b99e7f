"""LISTEN for new events on a connection of its own, so waiters wake the moment an event commits.

Waiters remember :attr:`EventListener.generation` before they read, and wait for it to change. A lost
connection also bumps the generation (notifications may have been missed meanwhile), and the listener
reconnects with backoff. Nobody polls.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Hashable
from typing import TypeVar

import asyncpg
import structlog

from server.core.errors import error_text
from server.store.outbox import CHANNEL
from server.store.pool import UNAVAILABLE_ERRORS

log = structlog.get_logger(component="dipc.listener")
T = TypeVar("T")


class EventListener:
    def __init__(self, dsn: str, *, connect_timeout: float = 5.0) -> None:
        self.dsn = dsn
        self.connect_timeout = connect_timeout
        self.generation = 0
        self.connected = asyncio.Event()
        self._changed = asyncio.Event()  # set, and replaced, at every bump
        self._task: asyncio.Task[None] | None = None
        self._releasing = False
        self._reads: dict[tuple[int, Hashable], asyncio.Future] = {}

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dipc-event-listener")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def releasing(self) -> bool:
        return self._releasing

    async def release_waiters(self) -> None:
        """Wake every waiter now and let no one wait again (the process is shutting down)."""
        self._releasing = True
        self._bump()

    async def wait_for_change(self, seen: int, seconds: float) -> bool:
        """Wait until the generation differs from ``seen`` or ``seconds`` pass; True if it changed."""
        if self.generation != seen or seconds <= 0 or self._releasing:
            return self.generation != seen
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)
        return self.generation != seen

    async def read_once(self, key: Hashable, read: Callable[[], Awaitable[T]]) -> T:
        """``read()``, shared by every caller that asks with the same ``key`` at the same generation while it
        runs: an event wakes every waiter at once, and the waiters at one cursor then cost one query.

        Sound for a waiter that took :attr:`generation` just before: the read started at that generation,
        so whatever commits after it started bumps the generation again and wakes the waiter. A caller
        that stops waiting (its client went, its deadline passed) does not cancel the read of the others.
        """
        slot = (self.generation, key)
        shared = self._reads.get(slot)
        if shared is None:
            shared = self._reads[slot] = asyncio.ensure_future(read())
            shared.add_done_callback(lambda done: self._read_done(slot, done))
        return await asyncio.shield(shared)

    def _read_done(self, slot: tuple[int, Hashable], done: asyncio.Future) -> None:
        del self._reads[slot]
        if not done.cancelled():
            done.exception()  # retrieved: every caller may have gone, and asyncio would log it as lost

    def _bump(self) -> None:
        self.generation += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _on_notify(self, *_args: object) -> None:
        self._bump()

    async def _run(self) -> None:
        delay = 0.2
        while True:
            lost = asyncio.Event()
            try:
                conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout)
            except Exception as error:  # whatever it is, keep trying: the feed falls back to its timeouts
                log.warning("listener.connect_failed", error=error_text(error), retry=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            try:
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                async with asyncio.timeout(self.connect_timeout):  # LISTEN, on a server that may hang
                    await conn.add_listener(CHANNEL, self._on_notify)
                self.connected.set()
                delay = 0.2
                self._bump()  # anything committed while we were not listening is read now
                await lost.wait()
                log.warning("listener.connection_lost")
            except UNAVAILABLE_ERRORS as error:
                log.warning("listener.failed", error=error_text(error))
            except Exception:
                log.exception("listener.error")  # keep going: waiters fall back to their timeouts meanwhile
            finally:
                self.connected.clear()
                if not conn.is_closed():
                    conn.terminate()
            self._bump()
            await asyncio.sleep(delay)
