"""Inquiry throughput of two dipc revisions and the ceiling server, interleaved in one run.

    .venv/bin/python bench/compare.py --before HEAD~1            # the working tree against HEAD~1
    .venv/bin/python bench/compare.py --before HEAD~1 --rounds 5 --seconds 8 --kind reusable

How each speed-up's commit message measures its effect: one embedded PostgreSQL, one set of codes, the
ceiling (bench/ceiling.py), ``before`` (a ``git worktree`` of that revision) and the working tree served
side by side, and wrk rounds taken in turn (ceiling, before, after, ceiling, ...) so that a noisy
neighbour costs all three alike. Prints each round and the medians, as ratios to the ceiling, and each
server's CPU time per request (its own user + system time over the requests it answered), and
PostgreSQL's (every process of the cluster, over the same requests): on a shared machine those figures
move far less with the neighbours than throughput does.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

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
    parser.add_argument("--kind", choices=["one-shot", "reusable"], default="one-shot")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="dipc-bench-compare-"))
    before_tree = workdir / "before"
    subprocess.run(["git", "-C", str(run.ROOT), "worktree", "add", "--detach", str(before_tree), args.before],
                   check=True, capture_output=True)  # fmt: skip
    pg = EmbeddedPostgres(workdir / "data", durable=True)
    dsn = pg.start()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DIPC_", "DATABASE_URL"))}
    env |= {"DATABASE_URL": dsn, "DIPC_CLIENT_ID": run.CLIENT.client_id, "DIPC_BINS": run.BINS,
            "DIPC_SECRET_KEY": run.CLIENT.secret_keys[0].decode(), "DIPC_LOG_FORMAT": "json"}  # fmt: skip
    servers = []
    try:
        asyncio.run(migrate.migrate_dsn(dsn))
        reusable = args.kind == "reusable"
        prefix = run.REUSABLE_PREFIX if reusable else run.ONE_SHOT_PREFIX
        count = 1000 if reusable else args.codes
        csv = workdir / "codes.csv"
        run.write_codes_csv(csv, count, prefix, reusable)
        subprocess.run([run.DIPC, "codes", "import", str(csv)], env=env, check=True, capture_output=True)
        codes = [f"{prefix}{n:010d}" for n in range(count)]

        ports = {"ceiling": run.free_port(), "before": run.free_port(), "after": run.free_port()}
        servers.append(run.start_ceiling(dsn, ports["ceiling"]))
        # The revision before, imported from its worktree ahead of the installed (editable) working tree.
        servers.append(run.start_server(env | {"PYTHONPATH": str(before_tree)}, ports["before"], 1))
        servers.append(run.start_server(env, ports["after"], 1))
        pids = dict(zip(ports, (server.pid for server in servers), strict=True))
        rates: dict[str, list[float]] = {name: [] for name in ports}
        cpu_us: dict[str, list[float]] = {name: [] for name in ports}
        db_us: dict[str, list[float]] = {name: [] for name in ports}
        requests = workdir / "requests.tsv"
        for round_ in range(args.rounds):
            for name, port in ports.items():
                run.presign(requests, codes, 12_000 * args.seconds, "/doku/inquiry")
                cpu_before, db_before = cpu_seconds(pids[name]), cluster_cpu_seconds(pg)
                rps, p50, p99, errors = run.run_wrk(
                    f"http://127.0.0.1:{port}", seconds=args.seconds, connections=args.connections, threads=2,
                    script_args=[str(requests), "2", "/doku/inquiry"],
                )  # fmt: skip
                per_request = (cpu_seconds(pids[name]) - cpu_before) / (rps * args.seconds) * 1e6
                db_per_request = (cluster_cpu_seconds(pg) - db_before) / (rps * args.seconds) * 1e6
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
    finally:
        for server in servers:
            run.stop_server(server)
        pg.stop()
        shutil.rmtree(pg.cluster_dir, ignore_errors=True)  # as root, outside the workdir
        subprocess.run(["git", "-C", str(run.ROOT), "worktree", "remove", "--force", str(before_tree)],
                       check=False, capture_output=True)  # fmt: skip
        shutil.rmtree(workdir, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cluster_cpu_seconds(pg: EmbeddedPostgres) -> float:
    """CPU time of the PostgreSQL cluster so far: its postmaster and every process it started, live
    ones only (the bench's connections stay open, so each backend is counted while it serves)."""
    postmaster = int((pg.pgdata / "postmaster.pid").read_text().split()[0])
    total = cpu_seconds(postmaster)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone since the listing
            continue
        if int(fields[1]) == postmaster:
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


if __name__ == "__main__":
    sys.exit(main())
