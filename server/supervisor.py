"""``DIPC_WORKERS`` > 1: one supervisor process, N worker processes sharing the port (SO_REUSEPORT).

The supervisor has already migrated the database (once) and started the embedded PostgreSQL if there is
one; workers only serve. It restarts a worker that dies, gives up on a crash loop, and on SIGTERM or
SIGINT asks every worker to drain and waits for them (``DIPC_SHUTDOWN_TIMEOUT_S``, then SIGKILL) before
it returns, so the embedded database is stopped last.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import structlog
from prometheus_client import multiprocess

log = structlog.get_logger(component="dipc.supervisor")

RESTARTS_ALLOWED = 5  # within RESTART_WINDOW_S; more is a crash loop
RESTART_WINDOW_S = 60.0
EXIT_USAGE = 2


class Supervisor:
    def __init__(
        self, *, workers: int, worker_args: Sequence[str], env: dict[str, str], shutdown_timeout_s: float
    ):
        self.count = workers
        self.worker_args = list(worker_args)
        self.env = env
        self.shutdown_timeout_s = shutdown_timeout_s
        self.stopping = False
        self.children: dict[int, subprocess.Popen] = {}
        self.restarts: deque[float] = deque()
        self.metrics_dir: Path | None = None
        self._own_metrics_dir = False

    def run(self) -> int:
        self._prepare_metrics_dir()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.count):
                self._spawn(index)
            status = self._watch()
            self._stop_all()
            return status
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self._own_metrics_dir and self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            log.info("supervisor.stopping", signal=signal.Signals(signum).name)
        self.stopping = True

    def _prepare_metrics_dir(self) -> None:
        configured = self.env.get("PROMETHEUS_MULTIPROC_DIR")
        if configured:
            self.metrics_dir = Path(configured)  # emptied of earlier runs' files by server.console
        else:
            self.metrics_dir = Path(tempfile.mkdtemp(prefix="dipc-metrics-"))
            self._own_metrics_dir = True
        self.env = self.env | {"PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}

    def _spawn(self, index: int, *, restart: bool = False) -> None:
        # A replacement counts itself in dipc_worker_restarts_total (the supervisor writes no metrics).
        env = self.env | {
            "DIPC_WORKER_INDEX": str(index),
            "DIPC_WORKER_RESTART": "1" if restart else "",
            "DIPC_SUPERVISOR_PID": str(os.getpid()),  # a worker whose supervisor died stops (serve.py)
        }
        child = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--worker", *self.worker_args], env=env
        )
        self.children[index] = child
        log.info("supervisor.worker_started", worker=index, pid=child.pid)

    def _watch(self) -> int:
        while not self.stopping:
            time.sleep(0.2)
            for index, child in list(self.children.items()):
                code = child.poll()
                if code is None or self.stopping:
                    continue
                self._forget(child)
                if code == EXIT_USAGE:
                    log.error("supervisor.worker_refused_to_start", worker=index, pid=child.pid)
                    return EXIT_USAGE
                now = time.monotonic()
                self.restarts.append(now)
                while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
                    self.restarts.popleft()
                if len(self.restarts) > RESTARTS_ALLOWED:
                    log.error("supervisor.crash_loop", restarts=len(self.restarts), window_s=RESTART_WINDOW_S)
                    return 1
                log.error("supervisor.worker_died", worker=index, pid=child.pid, exit_code=code)
                self._spawn(index, restart=True)
        return 0

    def _forget(self, child: subprocess.Popen) -> None:
        if self.metrics_dir is not None:
            multiprocess.mark_process_dead(child.pid, str(self.metrics_dir))

    def _stop_all(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_timeout_s + 5.0
        for index, child in self.children.items():
            try:
                code = child.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                log.error("supervisor.worker_killed", worker=index, pid=child.pid)
                child.kill()
                code = child.wait()
            log.info("supervisor.worker_stopped", worker=index, pid=child.pid, exit_code=code)
            self._forget(child)


def worker_env(dsn: str) -> dict[str, str]:
    """The environment of a worker: ours, with the database the supervisor prepared."""
    return dict(os.environ) | {"DATABASE_URL": dsn}
