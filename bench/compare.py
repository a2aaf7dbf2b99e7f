"""Inquiry throughput of two dipc revisions and the ceiling server, interleaved in one run.

    .venv/bin/python bench/compare.py --before HEAD~1            # the working tree against HEAD~1
    .venv/bin/python bench/compare.py --before HEAD~1 --rounds 5 --seconds 8 --kind reusable
    .venv/bin/python bench/compare.py --before HEAD~1 --rounds 5 --seconds 8 --kind notification
    .venv/bin/python bench/compare.py --before HEAD~1 --kind notification --hold-snapshot
    .venv/bin/python bench/compare.py --before HEAD~1 --open-loop 2400    # and the tail at 2,400/s
    .venv/bin/python bench/compare.py --before HEAD~1 --kind import --codes 400000 --rounds 4

How each speed-up's commit message measures its effect: one embedded PostgreSQL, one set of codes, the
ceiling (bench/ceiling.py), ``before`` (a ``git worktree`` of that revision) and the working tree served
side by side, and wrk rounds taken in turn (ceiling, before, after, ceiling, ...) so that a noisy
neighbour costs all three alike. Prints each round and the medians, as ratios to the ceiling, and each
server's CPU time per request (its own user + system time over the requests it answered), and
PostgreSQL's (every process of the cluster, over the same requests): on a shared machine those figures
move far less with the neighbours than throughput does.

``--open-loop RATE`` then measures the tail of the three at one fixed rate, in interleaved rounds of 10 s
(bench/openloop.py, as bench/run.py's open loop, whose rate is half of each saturation rate and so moves
with the change measured): a change's effect on p99 at the same load.

``--kind notification`` compares first-time payment notifications instead, without the ceiling: each round,
on ``before`` then ``after`` (then the other way round), inquiries quote bills of fresh one-shot codes as in
bench/run.py's notification phase, then notifications pay them. It prints each server's notification rate,
its ratio to the inquiry rate of the same round (issue 10's figure), the server's CPU time per notification
and PostgreSQL's (every backend of the cluster, over the notification run: only one server is loaded at a
time). ``--hold-snapshot`` has a session of each server's database hold one snapshot through every round,
as a pg_dump does (bench/run.py's option of that name).

``--kind import`` compares `dipc codes import` of ``--codes`` rows: each round, PostgreSQL's own COPY of
such a file (the baseline, as in bench/run.py), then ``before`` and ``after`` (then the other way round),
each into a database made by its own migrations, each file of fresh codes. It prints each import's wall
time as a ratio to the round's COPY, the command's CPU time per row and PostgreSQL's over the import.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import notify  # bench/notify.py
import run  # bench/run.py: compare.py runs as a script, with bench/ on sys.path

from server.embedded import EmbeddedPostgres
from server.store import migrate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", required=True, help="a git revision")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--codes", type=int, default=100_000)
    parser.add_argument("--kind", choices=["one-shot", "reusable", "notification", "import"],
                        default="one-shot")  # fmt: skip
    parser.add_argument("--open-loop", type=float, default=0, metavar="RATE",
                        help="then p50/p99 of each server at RATE inquiries/s, open loop")  # fmt: skip
    parser.add_argument("--hold-snapshot", action="store_true",
                        help="notification: a session holds a snapshot through the rounds")  # fmt: skip
    args = parser.parse_args()

    with run.scratch_database("dipc-bench-compare-") as (workdir, pg, dsn):
        before_tree = workdir / "before"
        git = ["git", "-C", str(run.ROOT), "worktree"]
        subprocess.run([*git, "add", "--detach", str(before_tree), args.before], check=True,
                       capture_output=True)  # fmt: skip
        try:
            _compare(args, run.dipc_env(dsn), dsn, pg, before_tree, workdir)
        finally:
            subprocess.run([*git, "remove", "--force", str(before_tree)], check=False, capture_output=True)


def _compare(args: argparse.Namespace, env: dict[str, str], dsn: str, pg: EmbeddedPostgres, before_tree: Path,
             workdir: Path) -> None:  # fmt: skip
    servers: list[subprocess.Popen] = []
    try:
        asyncio.run(migrate.migrate_dsn(dsn))
        if args.kind == "notification":
            compare_notifications(args, env, dsn, pg, before_tree, workdir, servers)
            return
        if args.kind == "import":
            compare_imports(args, env, dsn, pg, before_tree, workdir)
            return
        reusable = args.kind == "reusable"
        prefix = run.REUSABLE_PREFIX if reusable else run.ONE_SHOT_PREFIX
        count = 1000 if reusable else args.codes
        csv = workdir / "codes.csv"
        run.write_codes_csv(csv, count, prefix, reusable)
        run.import_codes(csv, env)
        codes = [f"{prefix}{n:010d}" for n in range(count)]

        ports = {"ceiling": run.free_port(), "before": run.free_port(), "after": run.free_port()}
        servers.append(run.start_ceiling(dsn, ports["ceiling"]))
        before_dsn, before_env = before_database(dsn, env, before_tree)
        run.import_codes(csv, before_env)
        for database in (dsn, before_dsn):
            run.settle(database)
        servers.append(run.start_server(before_env, ports["before"], 1))
        servers.append(run.start_server(env, ports["after"], 1))
        pids = dict(zip(ports, (server.pid for server in servers), strict=True))
        rates: dict[str, list[float]] = {name: [] for name in ports}
        cpu_us: dict[str, list[float]] = {name: [] for name in ports}
        db_us: dict[str, list[float]] = {name: [] for name in ports}
        postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
        requests = workdir / "requests.tsv"
        for round_ in range(args.rounds):
            for name, port in ports.items():
                run.presign(requests, codes, 12_000 * args.seconds, "/doku/inquiry")
                cpu_since = cpu_meter(pids[name], postmaster)
                rps, p50, p99, errors = run.run_wrk(
                    f"http://127.0.0.1:{port}", seconds=args.seconds, connections=args.connections, threads=2,
                    script_args=[str(requests), "2", "/doku/inquiry"],
                )  # fmt: skip
                per_request, db_per_request = cpu_since(rps * args.seconds)
                rates[name].append(rps)
                cpu_us[name].append(per_request)
                db_us[name].append(db_per_request)
                print(f"round {round_ + 1} {name:8} {rps:8,.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms"
                      f"  errors {errors}  cpu {per_request:4.0f} us/req  db {db_per_request:4.0f} us/req",
                      flush=True)  # fmt: skip
        ceiling = statistics.median(rates["ceiling"])
        print(f"\n{args.kind} inquiries, medians of {args.rounds} rounds of {args.seconds} s:")
        for name, values in rates.items():
            median = statistics.median(values)
            print(f"  {name:8} {median:8,.0f} req/s  {median / ceiling:.2f} x ceiling"
                  f"  server cpu {statistics.median(cpu_us[name]):4.0f} us/req"
                  f"  database cpu {statistics.median(db_us[name]):4.0f} us/req")  # fmt: skip
        after, before = statistics.median(rates["after"]), statistics.median(rates["before"])
        print(f"  after / before: {after / before:.3f}")
        cpu_after, cpu_before = statistics.median(cpu_us["after"]), statistics.median(cpu_us["before"])
        print(f"  server cpu per request, after / before: {cpu_after / cpu_before:.3f}")
        if args.open_loop:
            compare_open_loop(args, (dsn, before_dsn), ports, codes, requests, pids, postmaster)
    finally:
        for server in servers:
            run.stop_server(server)


OPEN_LOOP_S = 10


def compare_open_loop(args, dsns, ports, codes, requests, pids, postmaster) -> None:
    """p50/p99 of each server at one rate, rounds interleaved, after the bursts have settled, and the CPU
    each server and PostgreSQL spent per request at that rate (where batches are short)."""
    run.settle_bursts(*dsns)
    p99s: dict[str, list[float]] = {name: [] for name in ports}
    cpu_us: dict[str, list[float]] = {name: [] for name in ports}
    db_us: dict[str, list[float]] = {name: [] for name in ports}
    for round_ in range(args.rounds):
        for name, port in ports.items():
            run.presign(requests, codes, int(args.open_loop * OPEN_LOOP_S) + 10, "/doku/inquiry")
            cpu_since = cpu_meter(pids[name], postmaster)
            report = run.run_open_loop(port, rate=args.open_loop, seconds=OPEN_LOOP_S, requests=requests)
            server_us, database_us = cpu_since(args.open_loop * OPEN_LOOP_S)
            cpu_us[name].append(server_us)
            db_us[name].append(database_us)
            p99s[name].append(report["p99_ms"])
            print(f"round {round_ + 1} {name:8} open loop at {args.open_loop:,.0f}/s"
                  f"  p50 {report['p50_ms']:6.2f} ms  p99 {report['p99_ms']:6.2f} ms"
                  f"  errors {report['errors']}  generator cpu {report['generator_cpu_share']:.0%}"
                  f" late p99 {report['generator_late_p99_ms']:.1f} ms"
                  f"  machine busy {report['machine_busy_share']:.0%}"
                  f" stolen {report['machine_steal_share']:.1%}"
                  f"  cpu {cpu_us[name][-1]:4.0f} us/req  db {db_us[name][-1]:4.0f} us/req",
                  flush=True)  # fmt: skip
    print(f"\nopen loop at {args.open_loop:,.0f} {args.kind} inquiries/s,"
          f" p99 of {args.rounds} rounds of {OPEN_LOOP_S} s:")  # fmt: skip
    for name, values in p99s.items():
        each = ", ".join(f"{value:.2f}" for value in values)
        print(f"  {name:8} median {statistics.median(values):6.2f} ms  ({each})"
              f"  server cpu {statistics.median(cpu_us[name]):4.0f} us/req"
              f"  database cpu {statistics.median(db_us[name]):4.0f} us/req")  # fmt: skip


def before_database(dsn: str, env: dict[str, str], before_tree: Path) -> tuple[str, dict[str, str]]:
    """A database of its own for the revision before, in the same cluster, made by its own migrations;
    returns its DSN and the environment that runs that revision's `dipc` on it. In one database both
    servers would run the SQL functions of the working tree, and a change to one would not be measured."""
    parts = urlsplit(dsn)
    name = f"{parts.path.lstrip('/')}_before"
    run.psql(dsn, f'CREATE DATABASE "{name}";')
    before_dsn = urlunsplit(parts._replace(path=f"/{name}"))
    # The revision before, imported from its worktree ahead of the installed (editable) working tree.
    before_env = env | {"DATABASE_URL": before_dsn, "PYTHONPATH": str(before_tree)}
    subprocess.run([run.DIPC, "migrate"], env=before_env, check=True, capture_output=True)
    return before_dsn, before_env


# One-shot codes the notification comparison quotes and pays, one prefix per server (BIN 88965).
NOTIFY_PREFIXES = {"before": "889657", "after": "889656"}


def compare_notifications(args, env, dsn, pg, before_tree, workdir, servers) -> None:
    inquiries = run.INQUIRIES_PER_SECOND * args.seconds  # per round, as bench/run.py
    before_dsn, before_env = before_database(dsn, env, before_tree)
    dsns, envs = {"before": before_dsn, "after": dsn}, {"before": before_env, "after": env}
    for name, prefix in NOTIFY_PREFIXES.items():
        csv = workdir / f"{name}.csv"
        run.write_codes_csv(csv, inquiries * args.rounds, prefix, False)
        run.import_codes(csv, envs[name])
        run.settle(dsns[name])
    ports = {"before": run.free_port(), "after": run.free_port()}
    servers.append(run.start_server(before_env, ports["before"], 1))
    servers.append(run.start_server(env, ports["after"], 1))
    pids = dict(zip(ports, (server.pid for server in servers), strict=True))
    postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
    rates, ratios, cpu_us, pg_us = ({name: [] for name in ports} for _ in range(4))
    requests, answers = workdir / "requests.tsv", workdir / "answers.tsv"
    with contextlib.ExitStack() as held:
        if args.hold_snapshot:  # a snapshot holds back only its own database's cleanup: one in each
            for held_dsn in dsns.values():
                held.enter_context(run.snapshot_held(held_dsn))
        _notification_rounds(args, ports, dsns, pids, postmaster, requests, answers,
                             (rates, ratios, cpu_us, pg_us))  # fmt: skip
    print(f"\nfirst-time notifications, one-shot codes, medians of {args.rounds} rounds of {args.seconds} s:")
    for name in ports:
        print(f"  {name:6} {statistics.median(rates[name]):7,.0f} notifications/s"
              f"  {statistics.median(ratios[name]):.2f} x inquiry"
              f"  server cpu {statistics.median(cpu_us[name]):4.0f} us"
              f"  postgres cpu {statistics.median(pg_us[name]):4.0f} us per notification")  # fmt: skip
    print_changes({"rate": rates, "ratio to inquiry": ratios, "server cpu": cpu_us, "postgres cpu": pg_us})


def _notification_rounds(args, ports, dsns, pids, postmaster, requests, answers, figures) -> None:
    rates, ratios, cpu_us, pg_us = figures
    inquiries = run.INQUIRIES_PER_SECOND * args.seconds  # per round, as bench/run.py
    for round_ in range(args.rounds):
        order = list(ports) if round_ % 2 == 0 else list(reversed(ports))
        for name in order:
            base, prefix = f"http://127.0.0.1:{ports[name]}", NOTIFY_PREFIXES[name]
            codes = [f"{prefix}{n:010d}" for n in range(round_ * inquiries, (round_ + 1) * inquiries)]
            run.presign(requests, codes, inquiries, "/doku/inquiry")
            inquired = run.run_wrk(base, seconds=args.seconds, connections=args.connections, threads=2,
                                   script_args=[str(requests), "2", "/doku/inquiry"])[0]  # fmt: skip
            notify.ledger(dsns[name], prefix)  # the last run's stragglers are recorded: not quoted again
            bills = notify.quoted_bills(dsns[name], prefix)
            notify.write_requests(requests, notify.presign(run.CLIENT, bills))
            cpu_since = cpu_meter(pids[name], postmaster)
            rps, p50, p99, errors = run.run_wrk(
                base, seconds=args.seconds, connections=args.connections, threads=2,
                script_args=[str(requests), "2", notify.TARGET, str(answers)],
            )  # fmt: skip
            server_us, postgres_us = cpu_since(rps * args.seconds)
            cpu_us[name].append(server_us)
            pg_us[name].append(postgres_us)
            rates[name].append(rps)
            ratios[name].append(rps / inquired)
            print(f"round {round_ + 1} {name:6} {inquired:7,.0f} inquiries/s {rps:7,.0f} notifications/s"
                  f" ({rps / inquired:.2f} x)  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  errors {errors}"
                  f"  cpu {cpu_us[name][-1]:4.0f} us, postgres {pg_us[name][-1]:4.0f} us per notification",
                  flush=True)  # fmt: skip


def compare_imports(args, env, dsn, pg, before_tree, workdir) -> None:
    before_dsn, before_env = before_database(dsn, env, before_tree)
    dsns, envs = {"before": before_dsn, "after": dsn}, {"before": before_env, "after": env}
    postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
    walls, ratios, cpu_us, pg_us = ({name: [] for name in envs} for _ in range(4))
    csv = workdir / "codes.csv"
    files = iter(range(1000))  # each file's codes a prefix of their own: 88965 and three digits
    for round_ in range(args.rounds):
        run.write_codes_csv(csv, args.codes, f"88965{next(files):03d}", False)
        copy_s = run.timed_copy(dsn, csv)
        print(f"round {round_ + 1} COPY   {copy_s:6.2f} s", flush=True)
        for name in ("before", "after") if round_ % 2 == 0 else ("after", "before"):
            run.write_codes_csv(csv, args.codes, f"88965{next(files):03d}", False)
            database, command = cluster_cpu_seconds(postmaster), ended_children_cpu_seconds()
            wall_s = run.timed_import(csv, envs[name], args.codes)
            own_s = ended_children_cpu_seconds() - command
            walls[name].append(wall_s)
            ratios[name].append(wall_s / copy_s)
            cpu_us[name].append(own_s / args.codes * 1e6)
            pg_us[name].append((cluster_cpu_seconds(postmaster) - database) / args.codes * 1e6)
            print(
                f"round {round_ + 1} {name:6} {wall_s:6.2f} s ({ratios[name][-1]:.2f} x COPY)"
                f"  cpu {cpu_us[name][-1]:5.1f} us, postgres {pg_us[name][-1]:5.1f} us per row",
                flush=True,
            )
        for database in dsns.values():  # the next round's imports into tables as large as this one's
            run.psql(database, "TRUNCATE payment_codes CASCADE;\nCHECKPOINT;\n")
    print(f"\n`dipc codes import` of {args.codes:,} codes, medians of {args.rounds} rounds:")
    for name in envs:
        print(f"  {name:6} {statistics.median(walls[name]):6.2f} s"
              f"  {statistics.median(ratios[name]):.2f} x COPY  cpu {statistics.median(cpu_us[name]):5.1f} us"
              f"  postgres cpu {statistics.median(pg_us[name]):5.1f} us per row")  # fmt: skip
    print_changes({"wall": walls, "ratio to COPY": ratios, "cpu": cpu_us, "postgres cpu": pg_us})


def print_changes(figures: dict[str, dict[str, list[float]]]) -> None:
    """Each figure's median after over its median before."""
    for what, values in figures.items():
        change = statistics.median(values["after"]) / statistics.median(values["before"])
        print(f"  {what}, after / before: {change:.3f}")


def cpu_meter(pid: int, postmaster: int) -> Callable[[float], tuple[float, float]]:
    """From now: what returns the CPU time, in µs per request over ``served`` requests, that the server
    ``pid`` and PostgreSQL (every process of the cluster) have spent since."""
    server, database = cpu_seconds(pid), cluster_cpu_seconds(postmaster)

    def per_request(served: float) -> tuple[float, float]:
        return (
            (cpu_seconds(pid) - server) / served * 1e6,
            (cluster_cpu_seconds(postmaster) - database) / served * 1e6,
        )

    return per_request


def ended_children_cpu_seconds() -> float:
    """User + system CPU time of this process's children that have ended (the commands it ran)."""
    times = os.times()
    return times.children_user + times.children_system


def cluster_cpu_seconds(postmaster: int) -> float:
    """User + system CPU time of the postmaster and every process it started (backends, WAL writer...),
    those that have ended included: a backend that ends between two readings (a connection closed
    meanwhile) takes its time from the live ones into the postmaster's, which waited for it."""
    total = cpu_seconds(postmaster, ended_children=True)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if parent == postmaster:
                    total += cpu_seconds(int(entry.name))
            except (OSError, ValueError):
                continue  # ended meanwhile
    return total


def cpu_seconds(pid: int, *, ended_children: bool = False) -> float:
    """User + system CPU time a process has used so far (Linux /proc), and with ``ended_children`` that
    of its children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    used = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if ended_children else 0)
    return used / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
