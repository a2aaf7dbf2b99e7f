"""The fault suite: the database killed, stopped, frozen and restarted, and dipc itself killed and
SIGTERMed, each in the middle of a burst of DOKU inquiries and notifications.

Every scenario runs the real ``dipc serve`` process against a PostgreSQL cluster of its own, and asserts
what DOKU and the merchant would see: every request answered within its budget (plus slack for a
loaded machine) with a 200 or a deliberate 503; after DOKU-style resends of everything not acknowledged,
every notification is recorded exactly once, every 200 has its row; and no person had to do anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest
from aiohttp import web

from server.doku.client import DokuSimulator, inquiry_body, notification_body
from server.embedded import EmbeddedError, EmbeddedPostgres, Watchdog
from server.store import migrate
from tests.conftest import CLIENT, CLIENT_ID, clean_env, dipc_env
from tests.integration.test_cli import DIPC, free_port
from tests.integration.test_outage import cluster_pids

INQUIRY_BUDGET_S = 0.8  # the default DIPC_DOKU_DB_TIMEOUT_S
NOTIFICATION_BUDGET_S = 2.0  # DIPC_NOTIFICATION_DB_TIMEOUT_S for these servers (default 5)
SLACK_S = 1.0  # two shared cores, five test suites: scheduling, never waiting on the database
BUDGET_ENV = {
    "DIPC_DOKU_DB_TIMEOUT_S": str(INQUIRY_BUDGET_S),
    "DIPC_NOTIFICATION_DB_TIMEOUT_S": str(NOTIFICATION_BUDGET_S),
    "DIPC_LOG_LEVEL": "INFO",
    "DIPC_ADMIN_TOKEN": "t",
}
PER_BURST = 120  # notifications per burst; as many inquiries beside them


class Dipc:
    """A ``dipc serve`` process; its log goes to a file (a pipe nobody reads would block it)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.env = env | {"DIPC_PORT": str(self.port)}
        self.log = log
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen([*DIPC, "serve"], env=self.env, stdout=log, stderr=log)
        wait_until(lambda: self._ready(), 60, f"{self.url}/readyz did not become ready")

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"dipc exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
        return http_status(f"{self.url}/readyz") == 200

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def http_status(url: str) -> int | None:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - loopback
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def wait_until(check, seconds: float, message: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(message)


@dataclass
class Burst:
    """What DOKU saw: per request, the status (None: no answer) and how long it took."""

    answers: list[tuple[str, int | None, float]] = field(default_factory=list)
    acknowledged: set[str] = field(default_factory=set)

    def check_budgets(self) -> None:
        for kind, status, seconds in self.answers:
            budget = INQUIRY_BUDGET_S if kind == "inquiry" else NOTIFICATION_BUDGET_S
            assert seconds < budget + SLACK_S, f"{kind} answered {status} after {seconds:.2f} s"
            assert status in (None, 200, 503), f"{kind} answered {status}"

    def statuses(self) -> set[int | None]:
        return {status for _, status, _ in self.answers}


async def burst(
    url: str, notifications: dict[str, bytes], inquiries: list[str], *, fault=None, after: int = 40
) -> Burst:
    """Send every notification and inquiry once, 32 at a time; ``fault()`` runs after ``after`` answers."""
    result = Burst()
    gate = asyncio.Semaphore(32)
    answered = 0
    faulted = asyncio.Event()
    fault_task: list[asyncio.Task] = []

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=32), timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        doku = DokuSimulator(session, url, CLIENT)

        async def send(kind: str, key: str, body: bytes) -> None:
            nonlocal answered
            async with gate:
                started = time.perf_counter()
                try:
                    path = "/doku/notification" if kind == "notification" else "/doku/inquiry"
                    reply = await doku.post(path, body)
                    status: int | None = reply.status
                except (aiohttp.ClientError, TimeoutError):
                    status = None
                result.answers.append((kind, status, time.perf_counter() - started))
                if kind == "notification" and status == 200:
                    result.acknowledged.add(key)
                answered += 1
                if fault is not None and answered >= after and not faulted.is_set():
                    faulted.set()
                    fault_task.append(asyncio.create_task(fault()))

        sends = [send("notification", code, body) for code, body in notifications.items()]
        sends += [send("inquiry", code, inquiry_body(code)) for code in inquiries]
        # Interleaved, so both kinds are in flight when the fault lands.
        mixed = [
            item
            for pair in zip(sends[: len(inquiries)], sends[len(notifications) :], strict=False)
            for item in pair
        ]
        mixed += sends[len(inquiries) : len(notifications)]
        await asyncio.gather(*mixed)
        if fault_task:
            await fault_task[0]
    return result


async def resend_until_acknowledged(url: str, bodies: dict[str, bytes], seconds: float = 40) -> float:
    """DOKU's retries, compressed: resend what is not acknowledged until all of it is. Returns seconds."""
    started = time.monotonic()
    waiting = dict(bodies)
    while waiting:
        assert time.monotonic() - started < seconds, f"{len(waiting)} notifications never acknowledged"
        result = await burst(url, waiting, [])
        for code in result.acknowledged:
            waiting.pop(code)
        if waiting:
            await asyncio.sleep(0.3)
    return time.monotonic() - started


async def register_codes(dsn: str, prefix: str, count: int) -> list[str]:
    codes = [f"88965{prefix}{n:0{11 - len(prefix)}d}" for n in range(count)]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "payment_codes",
            records=[(code, CLIENT_ID, "ALFA", f"INV-{code}", 10_000, "Pelanggan") for code in codes],
            columns=["payment_code", "client_id", "channel", "invoice_number", "amount", "customer_name"],
        )
    finally:
        await conn.close()
    return codes


def notifications_for(codes: list[str]) -> dict[str, bytes]:
    return {
        code: notification_body(
            code, invoice_number=f"INV-{code}", amount=10_000, original_request_id=f"trx-{code}"
        )
        for code in codes
    }


async def check_recorded_once(dsn: str, codes: list[str], acknowledged: set[str]) -> None:
    """Every acknowledged notification has its row; after the resends, every code is paid exactly once."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT payment_code, count(*) AS n, bool_and(kind = 'normal') AS normal FROM payments "
            "WHERE payment_code = ANY($1) GROUP BY payment_code",
            codes,
        )
        paid = await conn.fetchval(
            "SELECT count(*) FROM payment_codes "
            "WHERE payment_code = ANY($1) AND status = 'paid' AND paid_count = 1",
            codes,
        )
    finally:
        await conn.close()
    recorded = {row["payment_code"]: row for row in rows}
    assert acknowledged <= set(recorded)
    assert set(recorded) == set(codes)
    assert all(row["n"] == 1 and row["normal"] for row in rows)
    assert paid == len(codes)


async def scenario(dipc: Dipc, dsn: str, prefix: str, fault, *, after: int = 40) -> Burst:
    """One burst with ``fault`` in the middle, then DOKU's resends; the common assertions."""
    notification_codes = await register_codes(dsn, prefix + "1", PER_BURST)
    inquiry_codes = await register_codes(dsn, prefix + "2", PER_BURST)
    bodies = notifications_for(notification_codes)
    result = await burst(dipc.url, bodies, inquiry_codes, fault=fault, after=after)
    result.check_budgets()
    recovered_s = await resend_until_acknowledged(dipc.url, bodies)
    await check_recorded_once(dsn, notification_codes, result.acknowledged)
    statuses = sorted(str(status) for status in result.statuses())
    slowest = max(seconds for _, _, seconds in result.answers)
    acked = len(result.acknowledged)
    print(f"{prefix}: {statuses}, {acked} acked, slowest {slowest:.2f} s, resent {recovered_s:.1f} s")
    return result


# --- the database fails under a running dipc -------------------------------------------------------


@contextlib.contextmanager
def frozen(server: EmbeddedPostgres) -> Iterator[None]:
    """Every process of ``server``'s cluster stopped (SIGSTOP) for the block, then let go on (SIGCONT)."""
    pids = cluster_pids(server)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def own_cluster(tmp_path_factory) -> Iterator[tuple[EmbeddedPostgres, str]]:
    """An external PostgreSQL for dipc: ours to stop, freeze and restart, never dipc's."""
    server = EmbeddedPostgres(tmp_path_factory.mktemp("faults-pg"), durable=False)
    dsn = server.start()
    asyncio.run(migrate.migrate_dsn(dsn))
    yield server, dsn
    server.stop()


@pytest.fixture(scope="module")
def dipc_on_own_cluster(own_cluster, tmp_path_factory) -> Iterator[Dipc]:
    _, dsn = own_cluster
    dipc = Dipc(
        dipc_env(dsn, **BUDGET_ENV, DIPC_DB_POOL_MAX="16"), tmp_path_factory.mktemp("faults") / "dipc.log"
    )
    dipc.start()
    yield dipc
    dipc.stop()


async def test_database_stopped_and_restarted_mid_burst(own_cluster, dipc_on_own_cluster):
    server, dsn = own_cluster

    async def stop_and_restart() -> None:
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.start)

    server.owner = True  # the fixture's own cluster: this test stops and starts it
    result = await scenario(dipc_on_own_cluster, dsn, "1", stop_and_restart)
    assert 503 in result.statuses()
    assert None not in result.statuses()  # dipc itself never stopped answering
    assert "http.unhandled" not in dipc_on_own_cluster.log_text()


async def test_database_frozen_mid_burst(own_cluster, dipc_on_own_cluster):
    server, dsn = own_cluster

    async def freeze() -> None:
        with frozen(server):
            await asyncio.sleep(3.0)

    result = await scenario(dipc_on_own_cluster, dsn, "2", freeze)
    assert 503 in result.statuses()
    assert None not in result.statuses()
    assert "http.unhandled" not in dipc_on_own_cluster.log_text()


# --- dipc fails -------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_dipc_killed_or_stopped_mid_burst_and_started_again(own_cluster, tmp_path, signum):
    _, dsn = own_cluster
    dipc = Dipc(dipc_env(dsn, **BUDGET_ENV), tmp_path / "dipc.log")
    dipc.start()

    async def kill_and_restart() -> None:
        dipc.signal(signum)
        await asyncio.to_thread(dipc.process.wait, 30)
        await asyncio.to_thread(dipc.start)  # the service manager's restart

    try:
        prefix = "3" if signum == signal.SIGKILL else "4"
        result = await scenario(dipc, dsn, prefix, kill_and_restart)
    finally:
        code = dipc.stop()
    assert None in result.statuses() or signum == signal.SIGTERM  # a kill drops connections
    assert code == 0


# --- the embedded database dies under the dipc that owns it ----------------------------------------


@pytest.fixture
async def dipc_owning_embedded(tmp_path) -> AsyncIterator[tuple[Dipc, EmbeddedPostgres]]:
    data_dir = tmp_path / "data"
    env = clean_env() | dipc_env("", **BUDGET_ENV)
    env["DATABASE_URL"] = "embedded"  # chosen on purpose (outside --demo it must be)
    dipc = Dipc(env | {"DIPC_DATA_DIR": str(data_dir)}, tmp_path / "dipc.log")
    await asyncio.to_thread(dipc.start)
    yield dipc, EmbeddedPostgres(data_dir)
    code = await asyncio.to_thread(dipc.stop)
    assert code == 0


def restarts_metric(url: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:  # noqa: S310 - loopback
        for line in response.read().decode().splitlines():
            if line.startswith("dipc_embedded_restarts_total "):
                return float(line.split()[1])
    raise AssertionError("dipc_embedded_restarts_total is not exported")


async def test_embedded_database_killed_mid_burst_is_restarted_by_dipc(dipc_owning_embedded):
    dipc, embedded = dipc_owning_embedded
    assert await asyncio.to_thread(restarts_metric, dipc.url) == 0
    killed_at: list[float] = []

    async def kill_postmaster() -> None:
        postmaster = int((embedded.pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        killed_at.append(time.monotonic())

    result = await scenario(dipc, embedded.dsn, "5", kill_postmaster)
    assert None not in result.statuses()
    await asyncio.to_thread(wait_until, lambda: restarts_metric(dipc.url) == 1, 5, "restart not counted")
    log = dipc.log_text()
    assert "embedded.died" in log
    assert "embedded.restarted" in log
    assert "http.unhandled" not in log


# Takes every file descriptor this process may open, then asks whether the cluster under argv[1] runs.
_ALIVE_WITHOUT_DESCRIPTORS = """
import sys
from pathlib import Path
from server.embedded import EmbeddedPostgres
server = EmbeddedPostgres(Path(sys.argv[1]))
held = []
try:
    while True:
        held.append(open("/dev/null"))
except OSError:
    pass
print(server.postmaster_alive(), len(held))
"""


def test_a_process_out_of_file_descriptors_does_not_take_its_database_for_dead(own_database, tmp_path):
    """With every descriptor taken (1,100 idle connections to a `dipc serve --demo` limited to 1,024), the
    watchdog could not read postmaster.pid, logged `embedded.died` at error and tried to restart a server
    that was running, and the restart metric counted it. Only a missing pid file, or a pid that is gone,
    means the server died."""
    server, _ = own_database
    done = subprocess.run(
        [sys.executable, "-c", _ALIVE_WITHOUT_DESCRIPTORS, str(tmp_path / "pg")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    alive, held = done.stdout.split()
    assert int(held) > 0
    assert alive == "True"
    assert server.postmaster_alive()


def _postmaster(server: EmbeddedPostgres) -> int:
    return int((server.pgdata / "postmaster.pid").read_text().split()[0])


def _started_by_hand(server: EmbeddedPostgres) -> bool:
    try:
        server._pg_ctl("-w", "-t", "60", "-l", str(server.log_file), "start")
    except EmbeddedError:
        return False
    return True


def _wait_for(check, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {seconds} s: {what}")
        time.sleep(0.05)


async def test_a_database_back_without_the_watchdog_ends_its_outage(own_database, captured_log):
    """(Found by a hostile-client review.) While the watchdog's restarts failed, the server came back
    another way (a CLI command starts it too): the watchdog went on, its outage never ended, and the
    next death logged no embedded.died and counted nothing. Its return now ends the outage, counted as
    the restart it is."""
    server, _ = own_database
    restarts: list[int] = []
    watchdog = Watchdog(server, on_restart=lambda: restarts.append(1), every_s=0.05)
    lock = server.data_dir / "embedded.lock"
    await asyncio.to_thread(watchdog.start)
    try:
        lock.unlink()
        lock.mkdir()  # every restart of the watchdog's fails: it cannot open its lock file
        os.kill(_postmaster(server), signal.SIGKILL)
        await asyncio.to_thread(
            _wait_for, lambda: captured_log.events("embedded.restart_failed"), "a failed restart"
        )
        await asyncio.to_thread(_wait_for, lambda: not server.postmaster_alive(), "the postmaster reaped")
        # Back another way: pg_ctl, as a `dipc` command of another process would start it (once the dead
        # server's processes have let go of its shared memory, as the watchdog's own tries wait for).
        await asyncio.to_thread(_wait_for, lambda: _started_by_hand(server), "a start by hand")
        await asyncio.to_thread(_wait_for, lambda: restarts == [1], "its return counted")
        lock.rmdir()
        os.kill(_postmaster(server), signal.SIGKILL)  # and it dies again: a new outage
        await asyncio.to_thread(_wait_for, lambda: restarts == [1, 1], "the second restart")
    finally:
        await asyncio.to_thread(watchdog.stop)
        if lock.is_dir():
            lock.rmdir()
    assert len(captured_log.events("embedded.died")) == 2
    assert len(captured_log.events("embedded.restarted")) == 2


async def test_with_several_workers_the_supervisor_restarts_the_embedded_database(tmp_path):
    data_dir = tmp_path / "data"
    env = clean_env() | dipc_env("", **BUDGET_ENV) | {"DIPC_DATA_DIR": str(data_dir), "DIPC_WORKERS": "2"}
    env["DATABASE_URL"] = "embedded"  # chosen on purpose (outside --demo it must be)
    dipc = Dipc(env, tmp_path / "dipc.log")
    await asyncio.to_thread(dipc.start)
    try:
        embedded = EmbeddedPostgres(data_dir)

        def both_workers_serve() -> bool:  # a worker still starting would refuse to (and stop them all)
            http_status(f"{dipc.url}/readyz")
            served = [line for line in dipc.log_text().splitlines() if '"http.request"' in line]
            return all(any(f'"worker":{n},' in line for line in served) for n in (0, 1))

        await asyncio.to_thread(wait_until, both_workers_serve, 30, "a worker did not start")
        assert await asyncio.to_thread(restarts_metric, dipc.url) == 0
        os.kill(int((embedded.pgdata / "postmaster.pid").read_text().split()[0]), signal.SIGKILL)
        await asyncio.sleep(0.5)
        back = await asyncio.to_thread(
            wait_until, lambda: http_status(f"{dipc.url}/readyz") == 200, 30, "no restart"
        )
        print(f"supervisor: ready again {back + 0.5:.1f} s after the kill")
        # counted once the restart returned (a moment after the database answers), whichever worker answers
        await asyncio.to_thread(wait_until, lambda: restarts_metric(dipc.url) == 1, 5, "restart not counted")
    finally:
        code = await asyncio.to_thread(dipc.stop)
    assert code == 0
    assert "embedded.restarted" in dipc.log_text()


# --- dipc is stopped while the database hangs -------------------------------------------------------


async def sigterm_and_wait(dipc: Dipc, seconds: float) -> tuple[int | None, float]:
    """SIGTERM ``dipc``; its exit code (None: still running after ``seconds``) and how long it took."""
    started = time.monotonic()
    dipc.signal(signal.SIGTERM)
    try:
        code = await asyncio.to_thread(dipc.process.wait, seconds)
    except subprocess.TimeoutExpired:
        code = None
    return code, time.monotonic() - started


@pytest.mark.parametrize(("reconcile", "webhooks"), [("off", False), ("on", False), ("off", True)])
async def test_sigterm_while_the_database_is_frozen_exits_within_the_shutdown_timeout(
    own_cluster, tmp_path, aiohttp_server, reconcile, webhooks
):
    """A frozen database must not hold the stop: background work on it (the reconciler's claims and
    checks, the pool) gives up within the shutdown timeout, and the exit is clean (not a SIGKILL from
    the supervisor or the service manager)."""
    from server.doku.standin import DokuStandIn

    server, dsn = own_cluster
    standin = await aiohttp_server(DokuStandIn({CLIENT_ID: CLIENT}).app())

    async def accept(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    receiver = web.Application()
    receiver.router.add_post("/hook", accept)
    hooks = await aiohttp_server(receiver)
    webhook_env = (
        {"DIPC_WEBHOOK_URL": str(hooks.make_url("/hook")), "DIPC_WEBHOOK_SECRET": "s"} if webhooks else {}
    )
    shutdown_s = 8.0
    dipc = Dipc(
        dipc_env(
            dsn,
            **BUDGET_ENV,
            DIPC_SHUTDOWN_TIMEOUT_S=str(shutdown_s),
            DIPC_RECONCILE=reconcile,
            DIPC_DOKU_API_URL=str(standin.make_url("")).rstrip("/"),
            DIPC_RECONCILE_SCHEDULE="1,2,4",
            **webhook_env,
        ),
        tmp_path / "dipc.log",
    )
    dipc.start()
    codes = await register_codes(dsn, "6" if reconcile == "on" else "8" if webhooks else "7", 20)
    async with aiohttp.ClientSession() as session:
        doku = DokuSimulator(session, dipc.url, CLIENT)
        for code in codes:  # quoted invoices: the reconciler has work due while the database hangs
            assert (await doku.inquiry(code)).status == 200
        for code, body in notifications_for(codes).items():  # events: the forwarder has work
            assert (await doku.post("/doku/notification", body)).status == 200, code
    await asyncio.sleep(1.5)
    try:
        with frozen(server):
            await asyncio.sleep(2.0)  # background work is now waiting on the frozen database
            code, took = await sigterm_and_wait(dipc, shutdown_s + 10)
    finally:
        dipc.stop()
    assert code == 0, f"dipc did not exit by itself within {shutdown_s + 10} s:\n{dipc.log_text()[-3000:]}"
    assert took < shutdown_s + SLACK_S, f"the stop took {took:.1f} s"
    assert "Traceback" not in dipc.log_text()


async def test_sigterm_with_a_long_poll_stuck_on_a_frozen_database_exits_within_the_shutdown_timeout(
    own_cluster, tmp_path
):
    """(Found in session 29's review.) A long-poll of the event feed whose read hung on a frozen database
    held the stop until its own deadline (the admin timeout plus its wait: up to about 90 s), past
    DIPC_SHUTDOWN_TIMEOUT_S, and a service manager would then SIGKILL the process."""
    server, dsn = own_cluster
    shutdown_s = 4.0
    dipc = Dipc(dipc_env(dsn, **BUDGET_ENV, DIPC_SHUTDOWN_TIMEOUT_S=str(shutdown_s)), tmp_path / "dipc.log")
    dipc.start()
    try:
        with frozen(server):
            async with aiohttp.ClientSession(headers={"Authorization": "Bearer t"}) as session:
                poll = asyncio.ensure_future(session.get(f"{dipc.url}/v1/events?after=0&wait=60"))
                await asyncio.sleep(1.5)  # the poll's read now waits on the frozen database
                assert not poll.done()
                code, took = await sigterm_and_wait(dipc, shutdown_s + 30)
                with contextlib.suppress(aiohttp.ClientError):
                    (await poll).release()
    finally:
        dipc.stop()
    assert code == 0, f"dipc did not exit by itself within {shutdown_s + 30} s:\n{dipc.log_text()[-3000:]}"
    assert took < shutdown_s + SLACK_S, f"the stop took {took:.1f} s"
    assert "Traceback" not in dipc.log_text()
    lines = [orjson.loads(line) for line in dipc.log_text().splitlines() if line.startswith("{")]
    assert {"event": "db.ended_by_stop", "what": "admin.events"}.items() <= next(
        line for line in lines if line["event"] == "db.ended_by_stop"
    ).items()


async def test_events_tail_says_when_the_database_hangs_and_goes_on_when_it_answers(own_cluster):
    """(Found in session 29's review.) `dipc events tail` on a frozen database waited for ever, silent.
    It now says so on stderr once its poll's deadline passes, and prints what comes once the database
    answers again, from where it was."""
    from server.cli.events import POLL_WAIT_S

    server, dsn = own_cluster
    timeout_s = 1.0
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)

    async def add_event(code: str) -> int:
        return await pool.fetchval(
            "INSERT INTO events (type, payment_code, payload) VALUES ('code.created', $1, '{}') RETURNING id",
            code,
        )

    first = await add_event("tail-1")
    tail = await asyncio.create_subprocess_exec(
        *DIPC, "events", "tail", "--after", str(first - 1), "--json",
        env=dipc_env(dsn, DIPC_ADMIN_DB_TIMEOUT_S=str(timeout_s)),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert tail.stdout is not None
    assert tail.stderr is not None

    async def said(words: bytes) -> bytes:
        """The next line on the tail's stderr with ``words`` in it (its log lines go there too)."""
        while words not in (line := await tail.stderr.readline()):
            assert line, "the tail closed its stderr"
        return line

    try:
        async with asyncio.timeout(30):
            assert orjson.loads(await tail.stdout.readline())["id"] == first
        with frozen(server):
            frozen_at = time.monotonic()
            async with asyncio.timeout(POLL_WAIT_S + timeout_s + 10):
                await said(b"dipc: the database did not answer within")
            took = time.monotonic() - frozen_at
        assert took <= POLL_WAIT_S + timeout_s + SLACK_S, f"said after {took:.1f} s"
        second = await add_event("tail-2")
        async with asyncio.timeout(30):
            assert orjson.loads(await tail.stdout.readline())["id"] == second
            await said(b"dipc: the database answers again; going on after event %d" % first)
    finally:
        await pool.close()
        if tail.returncode is None:
            tail.send_signal(signal.SIGINT)
        _, errors = await tail.communicate()
    assert tail.returncode == 0, errors
    assert b"Traceback" not in errors


async def test_ctrl_c_ends_events_tail_at_once_on_a_frozen_database(own_cluster):
    """(Found by a review of ae5662d.) Ctrl+C of `dipc events tail` on a frozen database was ignored until
    a second one: the command's pool closed gracefully, waiting for the database. A command cancelled by
    Ctrl+C terminates its connections at once."""
    server, dsn = own_cluster
    tail = await asyncio.create_subprocess_exec(
        *DIPC, "events", "tail", "--json", env=dipc_env(dsn),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    await asyncio.sleep(3.0)  # started, and waiting for events
    assert tail.returncode is None
    with frozen(server):
        await asyncio.sleep(1.0)
        started = time.monotonic()
        tail.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(10):
                _, errors = await tail.communicate()
        except TimeoutError:
            tail.kill()
            _, errors = await tail.communicate()
        took = time.monotonic() - started
    assert took < 1.0 + SLACK_S, f"the tail ended {took:.1f} s after Ctrl+C"
    assert tail.returncode == 0, errors
    assert b"Traceback" not in errors


# --- the supervisor dies ----------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    children = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if int(fields.get("PPid", "0").strip()) == pid:
            children.append(int(status.parent.name))
    return children


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"  # exited; its new parent has not reaped it yet


def test_workers_of_a_killed_supervisor_stop_instead_of_serving_on(own_cluster, tmp_path):
    """kill -9 (or the OOM killer) on the supervisor must not leave its workers serving the port: with
    SO_REUSEPORT they would share it with the next generation, and answer 503 for ever once its
    database is gone. They notice their parent is gone and drain."""
    _, dsn = own_cluster
    # TMPDIR: the metrics directory a killed supervisor cannot remove goes with the test's own.
    env = dipc_env(dsn, **BUDGET_ENV, DIPC_WORKERS="2", TMPDIR=str(tmp_path))
    dipc = Dipc(env, tmp_path / "dipc.log")
    dipc.start()
    assert dipc.process is not None
    try:
        wait_until(lambda: len(_children(dipc.process.pid)) == 2, 30, "two workers did not start")
        workers = _children(dipc.process.pid)
        dipc.signal(signal.SIGKILL)
        dipc.process.wait(10)
        took = wait_until(lambda: all(_gone(pid) for pid in workers), 15, "the orphaned workers still run")
    finally:
        dipc.stop()
        for pid in workers if "workers" in locals() else []:  # the bug this tests: leave nothing running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert took < 5
    assert http_status(f"{dipc.url}/healthz") is None  # nobody serves the port any more
    assert "worker.orphaned" in dipc.log_text()


@dataclass
class PipedServer:
    """A ``dipc serve`` whose stdout is a pipe the test reads from, until :meth:`close_reader`."""

    process: subprocess.Popen
    url: str
    read_end: int

    def close_reader(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.read_end)


@contextlib.contextmanager
def serving_into_a_pipe(database_url: str, **env: str) -> Iterator[PipedServer]:
    """``dipc serve`` (ready) with its log going into a pipe; killed, and the pipe closed, at the end."""
    port = free_port()
    read_end, write_end = os.pipe()
    environment = dipc_env(database_url, **BUDGET_ENV, DIPC_PORT=str(port), **env)
    process = subprocess.Popen([*DIPC, "serve"], env=environment, stdout=write_end, stderr=subprocess.DEVNULL)
    os.close(write_end)
    server = PipedServer(process, f"http://127.0.0.1:{port}", read_end)
    try:
        wait_until(lambda: http_status(f"{server.url}/healthz") == 200, 30, "nobody serves")
        yield server
    finally:
        server.close_reader()
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_a_server_whose_log_reader_went_away_still_answers(database_url):
    """stdout is a pipe to whatever keeps the logs (a process manager, `| tee`, a log shipper). If that
    reader goes away, each log line fails (EPIPE): the lines are lost, the requests must not be. Every
    request's line used to raise in the middle of its answer, and nothing was answered at all."""
    with serving_into_a_pipe(database_url) as server:
        server.close_reader()
        assert [http_status(f"{server.url}{path}") for path in ("/healthz", "/readyz")] == [200, 200]
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(20) == 0


def test_workers_of_a_killed_supervisor_stop_even_when_nobody_reads_their_log(database_url, tmp_path):
    """(Found by review.) The supervisor's log reader often dies with it: a pipe to a process manager, a
    shell that went away. Then the workers' first log line fails (EPIPE); their check that their parent
    is gone must stop them all the same. It logged before it signalled, and the workers served on."""
    workers: list[int] = []
    try:
        with serving_into_a_pipe(database_url, DIPC_WORKERS="2", TMPDIR=str(tmp_path)) as server:
            supervisor = server.process
            wait_until(lambda: len(_children(supervisor.pid)) == 2, 30, "two workers did not start")
            workers = _children(supervisor.pid)
            server.close_reader()  # the reader goes first, then the supervisor
            supervisor.kill()
            supervisor.wait(10)
            wait_until(lambda: all(_gone(pid) for pid in workers), 15, "the orphaned workers still run")
    finally:
        for pid in workers:  # the bug this tests: leave nothing running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert http_status(f"{server.url}/healthz") is None  # nobody serves the port any more
