"""An open-loop load generator: requests leave at a fixed rate whatever the server does.

Request ``i`` is scheduled at ``start + i / rate`` and its latency is measured from that scheduled time,
not from when a connection was free to send it, so a server that stalls is charged for every request
that queued behind the stall (no coordinated omission, as in wrk2). Connections are kept alive and
reused; a request waits for a free one when all are busy, and that wait counts as latency too.

    .venv/bin/python bench/openloop.py --port 18600 --rate 1000 --seconds 10 --get /healthz
    .venv/bin/python bench/openloop.py --port 18600 --rate 1000 --seconds 10 --requests requests.tsv
    .venv/bin/python bench/openloop.py --port 18600 --rate 1000 --requests requests.tsv --trace trace.json

``requests.tsv`` is bench/run.py's pre-signed inquiry file (one request per line, used once each).
Prints one JSON object: achieved rate, p50/p90/p99/max in ms, non-2xx count, and the generator's own
CPU use (a share near 1.0 would mean the generator, not the server, set the pace) and lateness: how long
after its scheduled time each request's task began, p99 and max. That delay is the generator's (its
1 ms tick, or the machine not running it), and it is part of every latency, so a p99 far above it is
the server's. It also prints how busy the whole machine was during the run, and what share of its
time the hypervisor gave to others (``steal``; a virtual machine's neighbours), from ``/proc/stat``: a
p99 measured on a machine at 95 % is the machine's as much as the server's. ``--trace FILE`` also writes
every answered request's scheduled send time (wall clock, seconds) and latency (seconds), for
bench/tail.py to set beside what the database was doing at the time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import re
import resource
import time

import orjson
import uvloop

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, payload: bytes) -> asyncio.Future[int]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:end])
        match = _CONTENT_LENGTH.search(head)
        total = end + 4 + (int(match.group(1)) if match else 0)
        if len(self.buffer) < total:
            return
        del self.buffer[:total]
        waiter, self.waiter = self.waiter, None
        waiter.set_result(int(head[9:12]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("the server closed the connection"))


def machine_times() -> tuple[int, int, int]:
    """(all, idle, steal) clock ticks of every CPU since boot, from /proc/stat's first line."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is in user already.
    return sum(fields[:8]), fields[3] + fields[4], fields[7]


def inquiry_requests(path: str, host: str) -> list[bytes]:
    requests = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            request_id, timestamp, signature, client_id, body = line.rstrip("\n").split("\t", 4)
            data = body.encode()
            requests.append(
                (
                    f"POST /doku/inquiry HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                    f"Client-Id: {client_id}\r\nRequest-Id: {request_id}\r\n"
                    f"Request-Timestamp: {timestamp}\r\n"
                    f"Signature: {signature}\r\nContent-Length: {len(data)}\r\n\r\n"
                ).encode()
                + data
            )
    return requests


async def run(
    host: str,
    port: int,
    requests: list[bytes],
    *,
    rate: float,
    seconds: float,
    connections: int,
    trace: list[tuple[float, float]] | None = None,
):
    loop = asyncio.get_running_loop()
    free: asyncio.Queue[_Connection] = asyncio.Queue()
    for _ in range(connections):
        _, protocol = await loop.create_connection(_Connection, host, port)
        free.put_nowait(protocol)
    total = int(rate * seconds)
    if len(requests) < total and len(requests) != 1:
        raise SystemExit(f"openloop: {total} requests needed, the file has {len(requests)}")
    latencies: list[float] = []
    late: list[float] = []  # from each request's scheduled time to its task's start: the generator's delay
    statuses: dict[int, int] = {}
    errors = 0

    running: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
    all_answered = loop.create_future()

    async def exchange(scheduled: float, payload: bytes) -> None:
        nonlocal errors
        connection = await free.get()
        try:
            status = await connection.send(payload)
        except ConnectionError:
            errors += 1
            _, connection = await loop.create_connection(_Connection, host, port)
        else:
            latencies.append(time.perf_counter() - scheduled)
            if trace is not None:
                trace.append((scheduled, latencies[-1]))
            statuses[status] = statuses.get(status, 0) + 1
        free.put_nowait(connection)

    async def one(scheduled: float, payload: bytes) -> None:
        late.append(time.perf_counter() - scheduled)
        try:
            await exchange(scheduled, payload)
        except Exception as error:  # e.g. the server is gone for good (no new connection): the run fails
            if not all_answered.done():
                all_answered.set_exception(error)
        finally:
            running.discard(asyncio.current_task())
            if not running and sent == total and not all_answered.done():
                all_answered.set_result(None)

    # The generator's own pauses are charged to the server as latency, so it must not make any. Python's
    # cyclic garbage collector stopped it for 20-160 ms at the same moments of every round (a full
    # collection over the run's tasks, and a gather() over all of them at the end): with it running, the
    # ceiling's p99 at 4,300/s was 37 ms; without, dipc's was 9-13 ms. Nothing here makes cycles that
    # reference counting would not free, so it is simply off for the run.
    gc.disable()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    machine_before = machine_times()
    start = time.perf_counter() + 0.05
    sent = 0
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - start) * rate) + 1) if now >= start else 0
        while sent < due:
            payload = requests[sent] if len(requests) > 1 else requests[0]
            running.add(loop.create_task(one(start + sent / rate, payload)))
            sent += 1
        # A tick of 1 ms, not a spin: requests sent late by it are charged to the server (at most 1 ms).
        await asyncio.sleep(0.001)
    if running or all_answered.done():
        await all_answered
    wall = time.perf_counter() - start
    gc.enable()
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    ticks, idle, steal = (now - then for now, then in zip(machine_times(), machine_before, strict=True))
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    latencies.sort()
    late.sort()

    def percentile(fraction: float, values: list[float] = latencies) -> float:
        return values[min(len(values) - 1, int(fraction * len(values)))] * 1000 if values else 0.0

    non_2xx = sum(count for status, count in statuses.items() if not 200 <= status < 300)
    return {
        "requested_rate": rate,
        "achieved_rate": len(latencies) / wall,
        "requests": len(latencies),
        "p50_ms": percentile(0.50),
        "p90_ms": percentile(0.90),
        "p99_ms": percentile(0.99),
        "max_ms": latencies[-1] * 1000 if latencies else 0.0,
        "errors": errors + non_2xx,
        "statuses": {str(status): count for status, count in sorted(statuses.items())},
        "generator_cpu_share": cpu / wall,
        "generator_late_p99_ms": percentile(0.99, late),
        "generator_late_max_ms": late[-1] * 1000 if late else 0.0,
        "machine_busy_share": (ticks - idle) / ticks if ticks else 0.0,
        "machine_steal_share": steal / ticks if ticks else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--get", metavar="PATH", help="GET this path at the rate")
    what.add_argument("--requests", metavar="FILE", help="pre-signed inquiries, one per line")
    parser.add_argument("--trace", metavar="FILE", help="write each request's send time and latency here")
    args = parser.parse_args()
    if args.get:
        requests = [f"GET {args.get} HTTP/1.1\r\nHost: {args.host}\r\n\r\n".encode()]
    else:
        requests = inquiry_requests(args.requests, args.host)
    uvloop.install()
    trace: list[tuple[float, float]] | None = [] if args.trace else None
    report = asyncio.run(
        run(
            args.host,
            args.port,
            requests,
            rate=args.rate,
            seconds=args.seconds,
            connections=args.connections,
            trace=trace,
        )
    )
    if args.trace:
        # perf_counter's times, as the wall clock's: bench/tail.py's samples are taken by the wall clock.
        offset = time.time() - time.perf_counter()
        with open(args.trace, "wb") as handle:
            handle.write(orjson.dumps([(sent + offset, latency) for sent, latency in trace or ()]))
    print(orjson.dumps(report).decode())


if __name__ == "__main__":
    main()
