"""``dipc serve``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import gc
import os
import resource
import signal
import socket
import sys
from pathlib import Path

import structlog
from aiohttp import web

from server import demo
from server.app import make_app
from server.cli.common import (
    EXIT_USAGE,
    REFUSED_ERRORS,
    CommandFailed,
    apply_migrations,
    database_failure,
    log_database_choice,
)
from server.config import DEMO_ADMIN_TOKEN, DEMO_CLIENT_ID, DEMO_SECRET_KEY, Settings, load_settings
from server.core.errors import error_text
from server.core.times import utcnow
from server.embedded import EmbeddedError, EmbeddedPostgres, Watchdog
from server.http import drain
from server.http.keys import LISTENER
from server.ops import metrics
from server.ops.logging import bind_process, configure_logging
from server.store import migrate, privileges
from server.store.pool import UNAVAILABLE_ERRORS, create_pool, end_database_work_within
from server.supervisor import Supervisor, worker_env

log = structlog.get_logger(component="dipc.serve")

# What the stop keeps of DIPC_SHUTDOWN_TIMEOUT_S after database work in flight has been ended (at most half).
STOP_MARGIN_S = 1.0

SERVE_HELP = """\
Run the server: DOKU's inquiry endpoint, the admin API under /v1, /healthz and /readyz.

The database is DATABASE_URL: an external PostgreSQL (postgresql://…), whose schema must be current
(run `dipc migrate` as the schema's owner first: serve never changes an external schema), or
`embedded`: a PostgreSQL started under $DIPC_DATA_DIR, migrated at start and stopped on exit. With
--demo and no DATABASE_URL the embedded one is used. Stop with Ctrl+C or SIGTERM: in-flight requests
finish first.
"""

SERVE_EPILOG = """\
examples:
  dipc serve --demo
  DATABASE_URL=postgresql://dipc_app:...@db/dipc DIPC_CLIENT_ID=MCH-0001 DIPC_SECRET_KEY=SK-... \
    DIPC_BINS=ALFA:88965 dipc serve --port 8080
"""


def register(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the server",
        description=SERVE_HELP,
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--demo",
        action="store_true",
        help="use fixed demo credentials (printed at start) and seed demo codes; never in production",
    )
    serve.add_argument("--host", help="listen address (default $DIPC_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port (default $DIPC_PORT or 8080)")
    serve.add_argument(
        "--workers",
        type=int,
        help="processes sharing the port (default $DIPC_WORKERS or 1); migrations run once",
    )
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by the supervisor
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    settings = load_settings(demo=args.demo)
    overrides = {
        name: value for name in ("host", "port", "workers") if (value := getattr(args, name)) is not None
    }
    settings = dataclasses.replace(settings, **overrides)
    settings.require_serving()
    configure_logging(settings.log_format, settings.log_level)
    if args.worker:
        # The supervisor prepared the database and passed it as DATABASE_URL.
        bind_process(worker=int(os.environ.get("DIPC_WORKER_INDEX", "0")))
        if os.environ.get("DIPC_WORKER_RESTART"):
            metrics.WORKER_RESTARTS.inc()
        assert settings.database_url is not None
        _run(settings, settings.database_url, reuse_port=True)
        return 0
    if not settings.bins:
        log.warning("config.no_bins", detail="DIPC_BINS is unset: codes are not checked against BIN rules")
    settings.require_database()
    log_database_choice(settings)
    _raise_open_files_limit()  # before the workers and the embedded server, which inherit it
    _refuse_taken_ports(settings)  # before the database: a demo's seed resets its codes

    embedded: EmbeddedPostgres | None = None
    watchdog: Watchdog | None = None
    try:
        embedded = EmbeddedPostgres(settings.data_dir) if settings.embedded else None
        dsn = embedded.start() if embedded else settings.database_url
        assert dsn is not None
        seeded = asyncio.run(_prepare(settings, dsn))
        if settings.demo:
            _print_demo_banner(settings, seeded)
        supervisor = None
        if settings.workers > 1:
            worker_args = [
                "--host",
                settings.host,
                "--port",
                str(settings.port),
                *(["--demo"] if args.demo else []),
            ]
            supervisor = Supervisor(
                workers=settings.workers,
                worker_args=worker_args,
                env=worker_env(dsn),
                shutdown_timeout_s=settings.shutdown_timeout_s,
            )
        if embedded is not None and embedded.owner:
            # This process owns the embedded server: if it dies, this process brings it back.
            watchdog = Watchdog(
                embedded,
                on_restart=lambda: metrics.count_embedded_restart(supervisor and supervisor.metrics_dir),
            )
            watchdog.start()
        if supervisor is None:
            _run(settings, dsn)
            return 0
        return supervisor.run()
    except EmbeddedError as error:
        raise CommandFailed(f"embedded PostgreSQL: {error}", EXIT_USAGE) from None
    finally:
        if watchdog is not None:
            watchdog.stop()
        if embedded is not None:
            embedded.stop()


# Below this many open files a burst of connections (or a client opening them on purpose) can take every
# descriptor: accept() fails, the next connection (DOKU's) is reset, and the pool cannot reconnect.
MIN_OPEN_FILES = 4096


def _raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one.

    Every connection is a descriptor. systemd starts services with a soft limit of 1,024 (for programs
    still using select()) and a far higher hard limit, which a program that needs more is expected to
    raise its soft limit to, as Go's runtime and nginx (worker_rlimit_nofile) do. dipc uses epoll only.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as error:  # an unlimited hard limit above the kernel's nr_open
            log.info("server.open_files_unchanged", limit=soft, hard_limit=hard, error=str(error))
        else:
            log.info("server.open_files_raised", limit=hard, was=soft)
            soft = hard
    if soft < MIN_OPEN_FILES:
        log.warning(
            "server.open_files_low",
            limit=soft,
            detail=f"at most about {soft} connections at once; raise the hard limit to {MIN_OPEN_FILES} "
            "or more (systemd: LimitNOFILE=; docker: --ulimit nofile=; a shell: ulimit -Hn)",
        )


def _refuse_taken_ports(settings: Settings) -> None:
    """Refuse to start, before any other work, when a port to listen on is taken (binding as the
    server will, with SO_REUSEADDR, and letting go at once)."""
    ports = [(settings.host, settings.port)]
    if settings.admin_port is not None:
        ports.append((settings.admin_host or settings.host, settings.admin_port))
    for host, port in ports:
        try:
            # As asyncio's create_server binds: "" is every interface, and a family the kernel lacks
            # (IPv6 disabled) is skipped.
            for family, kind, proto, _name, address in socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            ):
                try:
                    probe = socket.socket(family, kind, proto)
                except OSError:
                    continue
                with probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    probe.bind(address)
        except OSError as error:
            raise CommandFailed(f"cannot start on {host}:{port}: {error}", EXIT_USAGE) from None


async def _prepare(settings: Settings, dsn: str) -> list:
    """Reach the database (or refuse to start), check (embedded: bring) its schema, seed the demo codes.

    An external database is never migrated here: the serving role may not own the schema, and a schema
    change is a deployment step of its own (``dipc migrate``, a Kubernetes Job, an ExecStartPre).
    """
    try:
        pool = await create_pool(
            dsn,
            min_size=1,
            max_size=2,
            connect_timeout=settings.db_connect_timeout_s,
            statement_cache_size=settings.db_statement_cache_size,
        )
    except (*UNAVAILABLE_ERRORS, *REFUSED_ERRORS) as error:
        raise database_failure(error, settings) from None
    try:
        if settings.embedded:
            applied = await apply_migrations(pool)
            if applied:
                log.info("migrations.applied", versions=applied)
        async with pool.acquire() as conn:
            try:
                state = await migrate.state(conn)
                role = await privileges.check(conn)
            except REFUSED_ERRORS as error:
                raise database_failure(error, settings) from None
        _require_current(settings, state)
        if not role.sufficient:
            raise CommandFailed(
                f"database role {role.role} lacks privileges dipc needs to serve: "
                f"{', '.join(role.missing[:6])}{' …' if len(role.missing) > 6 else ''}; "
                "grant them as in deploy/postgres/roles.sql (`dipc doctor` lists them all)",
                EXIT_USAGE,
            )
        return await demo.seed(pool, utcnow()) if settings.demo else []
    finally:
        await pool.close()


def _require_current(settings: Settings, state: migrate.MigrationState) -> None:
    if state.unknown:
        # A rollback to an older dipc: migrations are written to be compatible with the previous release.
        log.warning("migrations.newer_than_this_dipc", versions=state.unknown)
    if state.current:
        return
    problems = [f"pending {', '.join(state.pending)}"] if state.pending else []
    problems += [f"changed since applied {', '.join(state.changed)}"] if state.changed else []
    raise CommandFailed(
        f"the database schema is not current ({'; '.join(problems)}): run `dipc migrate` as the "
        "schema's owner first; serve never changes an external database's schema",
        EXIT_USAGE,
    )


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it exists
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run(settings: Settings, dsn: str, *, reuse_port: bool = False) -> None:
    log.info(
        "server.starting",
        host=settings.host,
        port=settings.port,
        admin_port=settings.admin_port,
        inquiry_path=settings.inquiry_path,
        clients=sorted(settings.clients),
        bins=str(settings.bins),
        doku_api=settings.doku_api_url,
        reconcile=settings.reconciling,
    )
    # What web.run_app does, with our own stop sequence (server/http/drain.py) before aiohttp's.
    loop = _new_loop()
    asyncio.set_event_loop(loop)
    main = loop.create_task(_serve(settings, dsn, reuse_port=reuse_port))
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):  # SIGTERM, SIGINT
        pass
    except UNAVAILABLE_ERRORS as error:  # the port is taken, or the database went away during start
        raise CommandFailed(
            f"cannot start on {settings.host}:{settings.port}: {error_text(error)}", EXIT_USAGE
        ) from None
    finally:
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(main)
        _cancel_what_is_left(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        asyncio.set_event_loop(None)
    log.info("server.stopped")


def _cancel_what_is_left(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks still pending once the server has stopped, and let them end, as web.run_app does.

    A connection that aiohttp answered without reading its body (a 408, a refusal) lingers over the
    rest for up to 2 s; lost meanwhile, its handler task leaves the server's list but goes on. At a stop
    within those seconds it was left pending, and closing the loop logged an error for each ("Task was
    destroyed but it is pending!"). They end at once when cancelled; the bound is only against a task
    that would not.
    """
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.wait(tasks, timeout=STOP_LEFTOVERS_S))
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.error("server.task_failed_at_stop", task=task.get_name(), error=error_text(task.exception()))


STOP_LEFTOVERS_S = 1.0
ORPHAN_CHECK_S = 0.5


async def _stop_when_orphaned(supervisor_pid: int) -> None:
    """A worker whose supervisor died (kill -9, the OOM killer) drains and exits, as on SIGTERM.

    Otherwise it would serve on for ever: with SO_REUSEPORT beside the workers of the next ``dipc
    serve``, and after that one stops, answering 503 with nobody to stop it or its database.
    """
    while True:
        if os.getppid() != supervisor_pid:  # re-parented: to init, or to a subreaper
            break
        await asyncio.sleep(ORPHAN_CHECK_S)
    # Signal first: the log's reader often died with the supervisor, and then the line fails (EPIPE).
    os.kill(os.getpid(), signal.SIGTERM)
    with contextlib.suppress(OSError):
        log.warning("worker.orphaned", supervisor_pid=supervisor_pid, action="stopping")


# Connections the kernel completes and queues while a worker is busy (the kernel caps it at
# net.core.somaxconn). aiohttp's 128 dropped the SYN of the 129th of a burst: resent after 1 s, 3 s, ...
LISTEN_BACKLOG = 1024


async def _serve(settings: Settings, dsn: str, *, reuse_port: bool) -> None:
    supervisor_pid = os.environ.get("DIPC_SUPERVISOR_PID", "") if reuse_port else ""
    orphan_watch = (
        asyncio.create_task(_stop_when_orphaned(int(supervisor_pid)), name="dipc-orphan-watch")
        if supervisor_pid.isdigit()
        else None
    )
    app = make_app(settings, dsn)
    drain.install(app)
    runner = web.AppRunner(
        app, handle_signals=True, access_log=None, shutdown_timeout=settings.shutdown_timeout_s
    )
    await runner.setup()
    try:
        listen = functools.partial(web.TCPSite, runner, reuse_port=reuse_port, backlog=LISTEN_BACKLOG)
        await listen(settings.host, settings.port).start()
        if settings.admin_port is not None:  # the admin API and /metrics apart (server/http/ports.py)
            await listen(settings.admin_host or settings.host, settings.admin_port).start()
        # What exists now (modules, the app, the pool) lives as long as the process: out of the cyclic
        # garbage collector's way, so its full collections under load walk only what requests left.
        gc.freeze()
        await asyncio.Future()  # until SIGTERM or SIGINT (GracefulExit) cancels this task
    finally:
        if orphan_watch is not None:
            orphan_watch.cancel()
        # Work on a database that hangs ends a little before the timeout, so that what follows (its
        # answer, the pool's close) fits in it; healthy work has the timeout, as aiohttp gives it.
        timeout_s = settings.shutdown_timeout_s
        end_database_work_within(max(timeout_s - STOP_MARGIN_S, timeout_s / 2))
        # Parked long-polls answer at once (empty), and so do the requests queued behind them.
        await app[LISTENER].release_waiters()
        try:
            await drain.answer_received(runner, app, timeout_s)
        finally:
            await runner.cleanup()


def _print_demo_banner(settings: Settings, seeded: list) -> None:
    base = f"http://{settings.host}:{settings.port}"
    # With an admin port, the admin API is only there (server/http/ports.py).
    admin = (
        f"http://{settings.admin_host or settings.host}:{settings.admin_port}"
        if settings.admin_port
        else base
    )
    # The command as it was typed (".venv/bin/dipc"), so the examples can be pasted as they are.
    dipc = sys.argv[0] if Path(sys.argv[0]).name == "dipc" else "dipc"
    lines = [
        "",
        "dipc demo: fixed credentials for trying dipc out. Never use them in production.",
        f"  inquiry URL   {base}{settings.inquiry_path}",
        f"  Client-Id     {DEMO_CLIENT_ID}",
        f"  Secret key    {DEMO_SECRET_KEY}",
        f"  Admin token   {DEMO_ADMIN_TOKEN}",
        f"  BINs          {settings.bins}",
        "  demo codes:",
        *(f"    {code.payment_code}  {demo.DESCRIPTIONS.get(code.payment_code, '')}" for code in seeded),
        "",
        "Try it from another terminal:",
        f"  {dipc} simulate inquiry --demo --url {base} 8896512345678123",
        f"  {dipc} simulate flow --demo --url {base} 8896500000000777    # inquiry, then its payment",
        f"  curl -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' {admin}/v1/payment-codes",
        f"  curl -H 'Authorization: Bearer {DEMO_ADMIN_TOKEN}' '{admin}/v1/events?wait=30'",
        f"  {dipc} exceptions list --demo    # conflicts and anomalies to close",
        "",
    ]
    if settings.doku_api_url is None:
        lines[-1:-1] = [
            "",
            "Reconciliation (DOKU's Check Status) is off: --demo never calls DOKU. To rehearse a lost",
            "notification, run a stand-in, stop this server and start it pointed at the stand-in",
            "(README, Money assurance):",
            f"  {dipc} simulate doku-api --demo --port 8090",
            f"  DIPC_DOKU_API_URL=http://127.0.0.1:8090 DIPC_RECONCILE_SCHEDULE=5,30,60 {dipc} serve --demo",
        ]
    else:
        lines[-1:-1] = [
            "",
            f"Reconciliation asks {settings.doku_api_url} (a stand-in: --demo never calls DOKU).",
        ]
    print("\n".join(lines), file=sys.stderr, flush=True)
