"""The ``dipc`` command, before anything imports prometheus_client."""

from __future__ import annotations

import os
import sys


def main() -> int:
    # prometheus_client reads PROMETHEUS_MULTIPROC_DIR once, when it is imported. Only `dipc serve` (one
    # process, or the workers) writes its metrics there: another command's values would be summed into
    # the servers' scrapes (its pool's gauges) and its files left behind.
    if sys.argv[1:2] != ["serve"]:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from server.cli import main as run

    return run()
