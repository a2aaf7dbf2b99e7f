"""Resident memory of a served process: at rest, and while 1,000 slow clients hold connections open.

A slow client here declares a 65,536-byte inquiry body, sends 60,000 bytes of it and stalls (issue 8's
reproduction): the server holds what arrived until its body timeout refuses the request. The peak RSS
during that time, and the RSS once the connections are gone, say whether memory stays bounded.
"""

from __future__ import annotations

import asyncio
import time


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _slow_clients(port: int, pid: int, clients: int, hold_s: float) -> tuple[float, int]:
    """(peak RSS in MB while ``clients`` slow clients are connected, how many got an answer)."""
    head = (
        b"POST /doku/inquiry HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: 65536\r\n\r\n"
    )
    peak = rss_mb(pid)
    answered = 0

    async def stall() -> None:
        nonlocal answered
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        try:
            writer.write(head + b"x" * 60_000)
            await writer.drain()
            if await asyncio.wait_for(reader.read(1), hold_s):
                answered += 1
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mb(pid))
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    await asyncio.gather(*(stall() for _ in range(clients)))
    watcher.cancel()
    return peak, answered


def slow_clients(port: int, pid: int, *, clients: int = 1000, hold_s: float = 30.0) -> dict[str, float]:
    """RSS before, at the peak, and two seconds after ``clients`` slow clients (MB)."""
    before = rss_mb(pid)
    peak, answered = asyncio.run(_slow_clients(port, pid, clients, hold_s))
    time.sleep(2)
    return {"before": before, "peak": peak, "after": rss_mb(pid), "answered": answered}
