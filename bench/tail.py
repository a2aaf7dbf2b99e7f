"""Where an open loop's slowest requests come from: the database's background work, or the server.

    .venv/bin/python bench/tail.py --ports 18750-18799                 # 100,000 codes, 4 rounds of each
    .venv/bin/python bench/tail.py --rows 1000000 --rounds 6 --ports 18750-18799

On a durable embedded PostgreSQL, as bench/run.py's inquiry phase: the closed loops (wrk) of dipc's
one-shot and reusable inquiries, whose bursts leave autovacuum work behind, then the same settling, then
open-loop rounds at half of each saturation rate, taken in turn with the ceiling's at dipc's one-shot
rate (bench/openloop.py with ``--trace``). Through each open-loop round a thread samples, every 20 ms,
what PostgreSQL's background processes do (pg_stat_activity: autovacuum workers, the checkpointer
writing) and the CPU time of the server and of the cluster's processes.

Each round prints its p50/p99, the share of the round's time during which autovacuum ran, and the
share of its slowest 1 % of requests that were in flight while it ran: if stalls had nothing to do with
autovacuum, the two shares would be alike. It then lists the round's worst stalls (requests over 20 ms,
those sent less than 50 ms apart taken as one), each with what ran in the background meanwhile and how
busy the server and PostgreSQL were. The ceiling's rounds are the baseline: it writes an audit row per
inquiry into the same database, so it meets the same background work, with less CPU of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import orjson
import run  # bench/run.py: this runs as a script, with bench/ on sys.path

from server.store import migrate

CEILING, DIPC_ONE_SHOT = "bench/ceiling.py, one-shot codes", "dipc, one-shot codes"
SAMPLE_S = 0.02
STALL_MS = 20.0  # a request slower than this is part of a stall
STALLS_SHOWN = 5  # the worst of each round
STALL_GAP_S = 0.05
# What a background process does when it is not idle (its wait event while idle is left out).
_ACTIVITY = """
SELECT backend_type, coalesce(wait_event, '') AS wait, query
  FROM pg_stat_activity
 WHERE backend_type IN ('autovacuum worker', 'checkpointer')
   AND (backend_type <> 'checkpointer' OR coalesce(wait_event, '') <> 'CheckpointerMain')
"""

# WAL written so far, in bytes, and how many full-page images it held (pg_stat_wal, which backends
# bring up to date about once a second): a commit's flush waits for all of the WAL before its commit
# record, whoever wrote it.
_WAL = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint, wal_fpi FROM pg_stat_wal"


@dataclass
class Sample:
    at: float
    cpu: tuple[int, dict[int, int]]  # clock ticks so far of the server, and of each PostgreSQL process
    work: list[str] = field(default_factory=list)  # what the background processes did
    wal: tuple[int, int] = (0, 0)  # WAL written so far: bytes, and full-page images


def _ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def _postgres_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


def _describe(row: asyncpg.Record) -> str:
    if row["backend_type"] == "checkpointer":
        return f"checkpointer ({row['wait'] or 'on CPU'})"
    return row["query"].removeprefix("autovacuum: ")


class Sampler(threading.Thread):
    """Samples the background work and the CPU of ``server_pid`` and the cluster until stopped."""

    def __init__(self, dsn: str, server_pid: int) -> None:
        super().__init__(daemon=True)
        self.dsn, self.server_pid = dsn, server_pid
        self.samples: list[Sample] = []
        self.stopping = threading.Event()
        self.pids = _postgres_pids()  # the pool's backends are up before a round starts

    def run(self) -> None:
        asyncio.run(self._sample())

    async def _sample(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            while not self.stopping.is_set():
                rows = await conn.fetch(_ACTIVITY)
                wal = await conn.fetchrow(_WAL)
                cpu = (_ticks(self.server_pid), {pid: _ticks(pid) for pid in self.pids})
                work = [_describe(row) for row in rows]
                self.samples.append(Sample(time.time(), cpu, work, (wal[0], wal[1])))
                await asyncio.sleep(SAMPLE_S)
        finally:
            await conn.close()


def _busy(samples: list[Sample], which: int) -> float:
    """Cores' worth of CPU over ``samples`` (0: the server, 1: PostgreSQL's processes that ran throughout)."""
    if len(samples) < 2:
        return 0.0
    seconds = samples[-1].at - samples[0].at
    first, last = samples[0].cpu, samples[-1].cpu
    if which == 0:
        ticks = last[0] - first[0]
    else:  # a process that ended meanwhile (a backend) reads 0 at the end: left out
        ticks = sum(max(0, last[1][pid] - first[1][pid]) for pid in first[1] if last[1][pid])
    return ticks / os.sysconf("SC_CLK_TCK") / seconds


def _wal_rate(samples: list[Sample]) -> tuple[float, float]:
    """WAL written per second over ``samples``: MB, and full-page images."""
    if len(samples) < 2:
        return 0.0, 0.0
    seconds = samples[-1].at - samples[0].at
    first, last = samples[0].wal, samples[-1].wal
    return (last[0] - first[0]) / 1e6 / seconds, (last[1] - first[1]) / seconds


def _vacuuming(sample: Sample) -> bool:
    """Whether an autovacuum worker was at work (anything in the background but the checkpointer)."""
    return any(not work.startswith("checkpointer") for work in sample.work)


def _during(samples: list[Sample], start: float, end: float) -> list[Sample]:
    """The samples from the last one at or before ``start`` to the first one at or after ``end``."""
    first = max((i for i, s in enumerate(samples) if s.at <= start), default=0)
    last = min((i for i, s in enumerate(samples) if s.at >= end), default=len(samples) - 1)
    return samples[first : last + 1]


def report(name: str, trace: list[tuple[float, float]], samples: list[Sample]) -> dict:
    """The round's figures, and its worst stalls printed."""
    trace = sorted(trace)
    latencies = sorted(latency for _, latency in trace)
    p99 = latencies[int(0.99 * len(latencies))]
    vacuum_share = sum(map(_vacuuming, samples)) / len(samples) if samples else 0.0
    slowest = [(sent, latency) for sent, latency in trace if latency >= p99]
    slow_share = sum(
        any(map(_vacuuming, _during(samples, sent, sent + latency))) for sent, latency in slowest
    ) / len(slowest)
    wal_mb, full_pages = _wal_rate(samples)
    figures = {
        "round": name,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": p99 * 1000,
        "autovacuum_time_share": vacuum_share,
        "slowest_1pct_share_during_autovacuum": slow_share,
        "server_cores": _busy(samples, 0),
        "postgres_cores": _busy(samples, 1),
        "wal_mb_per_s": wal_mb,
    }
    run.log(
        f"{name}: p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms; autovacuum ran "
        f"{vacuum_share:.0%} of the time, and during {slow_share:.0%} of the slowest 1 %; the server "
        f"{figures['server_cores']:.2f} cores, PostgreSQL {figures['postgres_cores']:.2f}; WAL "
        f"{wal_mb:.1f} MB/s, {full_pages:,.0f} full-page images/s"
    )
    start = trace[0][0]
    stalls = [(max(latency for _, latency in trace[a : b + 1]), a, b) for a, b in _stalls(trace)]
    for worst, first, last in sorted(stalls, reverse=True)[:STALLS_SHOWN]:
        begin, end = trace[first][0], trace[last][0] + worst
        over = sum(latency * 1000 > STALL_MS for _, latency in trace[first : last + 1])
        during = _during(samples, begin, end)
        work = sorted({w for s in during for w in s.work}) or ["nothing in the background"]
        run.log(
            f"  stall at {begin - start:5.2f} s: {over} requests over {STALL_MS:.0f} ms, "
            f"the worst {worst * 1000:.0f} ms; the server {_busy(during, 0):.2f} cores, PostgreSQL "
            f"{_busy(during, 1):.2f}; WAL {_wal_rate(during)[0]:.1f} MB/s; {'; '.join(work)}"
        )
    return figures


def _stalls(trace: list[tuple[float, float]]) -> list[tuple[int, int]]:
    """Stalls: the requests over STALL_MS, those sent less than STALL_GAP_S apart taken as one stall
    (first, last: indexes into ``trace``, which is by send time)."""
    runs: list[tuple[int, int]] = []
    for i, (sent, latency) in enumerate(trace):
        if latency * 1000 <= STALL_MS:
            continue
        if runs and sent - trace[runs[-1][1]][0] < STALL_GAP_S:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def open_loop_traced(
    dsn: str, pid: int, port: int, rate: float, seconds: int, requests: Path, name: str
) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as trace_file:
        sampler = Sampler(dsn, pid)
        sampler.start()
        try:
            command = [sys.executable, str(run.ROOT / "bench" / "openloop.py"), "--port", str(port),
                       "--rate", f"{rate:.0f}", "--seconds", str(seconds), "--requests", str(requests),
                       "--trace", trace_file.name]  # fmt: skip
            subprocess.run(command, capture_output=True, check=True)
        finally:
            sampler.stopping.set()
            sampler.join()
        trace = [tuple(each) for each in orjson.loads(Path(trace_file.name).read_bytes())]
    return report(name, trace, sampler.samples)


def _saturation(series: list[tuple], requests: Path, seconds: int) -> dict[str, float]:
    """dipc's closed-loop rates (wrk, 32 connections), the median of run.py's number of rounds each; the
    bursts also leave the database the work they leave in bench/run.py."""
    saturation = {}
    for name, _, port, codes in series:
        if name == CEILING:
            continue  # run at dipc's one-shot rate
        rates = []
        for _ in range(run.CLOSED_LOOP_ROUNDS):
            run.presign(requests, codes, 100_000, "/doku/inquiry")
            url = f"http://127.0.0.1:{port}"
            script = [str(requests), "2", "/doku/inquiry"]
            rates.append(run.run_wrk(url, seconds=seconds, connections=32, threads=2, script_args=script)[0])
        saturation[name] = statistics.median(rates)
        each = ", ".join(f"{rate:,.0f}" for rate in rates)
        run.log(f"closed loop, {name}: {saturation[name]:,.0f}/s (rounds {each})")
    return saturation


def _open_loops(dsn, series, saturation, requests, rounds, seconds) -> None:
    """Open-loop rounds of each series in turn at half its saturation rate, the ceiling's at dipc's
    one-shot rate as in bench/run.py (the same load: the baseline); then a line of each."""
    paced_by = {name: name if name in saturation else DIPC_ONE_SHOT for name, *_ in series}
    figures: dict[str, list[dict]] = {name: [] for name, *_ in series}
    for round_ in range(rounds):
        for name, process, port, codes in series:
            rate = saturation[paced_by[name]] / 2
            run.presign(requests, codes, int(rate * seconds) + 10, "/doku/inquiry")
            label = f"round {round_ + 1}, {name} at {rate:,.0f}/s"
            figures[name].append(open_loop_traced(dsn, process.pid, port, rate, seconds, requests, label))
    for name, each in figures.items():
        p99s = ", ".join(f"{f['p99_ms']:.1f}" for f in each)
        time_share = statistics.mean(f["autovacuum_time_share"] for f in each)
        slow_share = statistics.mean(f["slowest_1pct_share_during_autovacuum"] for f in each)
        print(
            f"| {name} | p99s {p99s} ms | autovacuum ran {time_share:.0%} of the time | "
            f"during {slow_share:.0%} of the slowest 1 % |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000, help="one-shot codes to import")
    parser.add_argument("--rounds", type=int, default=4, help="open-loop rounds of each server and kind")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--ports", default="18600-18699", help="ports to listen on: FIRST-LAST")
    args = parser.parse_args()
    first, _, last = args.ports.partition("-")
    run.PORTS = range(int(first), int(last) + 1)

    with run.scratch_database("dipc-tail-") as (workdir, _pg, dsn):
        env = run.dipc_env(dsn) | {"DIPC_ADMIN_TOKEN": run.ADMIN_TOKEN}
        standin, env["DIPC_DOKU_API_URL"] = run.start_doku_standin(env, workdir)
        servers = [standin]
        try:
            asyncio.run(migrate.migrate_dsn(dsn))
            run.import_codes(run._seed(workdir, args.rows), env)
            reusable_csv = workdir / "reusable.csv"
            run.write_codes_csv(reusable_csv, 1000, run.REUSABLE_PREFIX, True)
            run.import_codes(reusable_csv, env)
            run.settle(dsn)
            one_shot = [f"{run.ONE_SHOT_PREFIX}{n:010d}" for n in range(args.rows)]
            reusable = [f"{run.REUSABLE_PREFIX}{n:010d}" for n in range(1000)]
            port, ceiling_port = run.free_port(), run.free_port()
            server = run.start_server(env, port, 1)
            ceiling = run.start_ceiling(dsn, ceiling_port)
            servers += [server, ceiling]
            series = [
                (CEILING, ceiling, ceiling_port, one_shot),
                (DIPC_ONE_SHOT, server, port, one_shot),
                ("dipc, reusable codes", server, port, reusable),
            ]
            requests = workdir / "requests.tsv"
            saturation = _saturation(series, requests, args.seconds)
            run.settle_bursts(dsn)
            _open_loops(dsn, series, saturation, requests, args.rounds, args.seconds)
        finally:
            for process in servers:
                run.stop_server(process)


if __name__ == "__main__":
    main()
