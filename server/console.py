"""The ``dipc`` command, before anything imports prometheus_client."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> int:
    # prometheus_client reads PROMETHEUS_MULTIPROC_DIR once, when it is imported, and makes its files at
    # once. Only `dipc serve` (one process, or the supervisor and its workers) writes its metrics there:
    # another command's values would be summed into the servers' scrapes (its pool's gauges) and its
    # files left behind.
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if sys.argv[1:2] != ["serve"]:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    elif directory and "--worker" not in sys.argv:
        forget_earlier_runs(Path(directory))
    from server.cli import main as run

    return run()


def forget_earlier_runs(directory: Path) -> None:
    """Delete what earlier runs left in a multiprocess directory, before this run makes its own files:
    they would be summed with this run's values (a dead run's gauges counted for ever, the pool's size
    doubled at each restart), or, under the same pid (1, in a container), taken up again as this run's."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
