"""DOKU's API down, as the reconciler of a serving process meets it: the pieces of run.py's outage phase.

A DOKU outage must not cost the inquiry hot path, which shares the process (and its event loop and its
database pool) with the reconciler. The phase serves inquiries at a fixed open-loop rate while the
reconciler has a backlog of due invoices and DOKU is, in turn:

- ``off``: the baseline, ``DIPC_RECONCILE=off`` (no Check Status calls at all);
- ``healthy``: ``dipc simulate doku-api`` answers every call;
- ``unresolvable``: its name does not resolve (``https://doku.invalid``, as in a DNS outage);
- ``refused``: a loopback port nobody listens on (connection refused at once);
- ``hanging``: a socket that listens but never accepts: the kernel completes the handshakes, the
  request is sent, and no answer ever comes (every call ends at ``DIPC_DOKU_API_TIMEOUT_S``).

This module holds what does not need run.py: the dead DOKUs, and reading what the reconciler did from
``/metrics``.
"""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

STATES = ("off", "healthy", "unresolvable", "refused", "hanging")
UNRESOLVABLE_URL = "https://doku.invalid"  # .invalid never resolves (RFC 6761)


@contextmanager
def closed_port(port: int) -> Iterator[str]:
    """A loopback URL on ``port``, held bound but not listening: connecting is refused at once.

    Binding without listen() keeps another process from taking the port meanwhile.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        yield f"http://127.0.0.1:{port}"


@contextmanager
def hanging_server(port: int) -> Iterator[str]:
    """A loopback URL whose server accepts connections (in the kernel) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen(4096)  # never accept(): handshakes complete in the backlog, requests go unread
        yield f"http://127.0.0.1:{port}"


def check_calls(port: int) -> dict[str, float]:
    """``dipc_reconciliation_checks_total`` of the server on ``port``, by result (calls made so far)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    calls = {}
    prefix = 'dipc_reconciliation_checks_total{result="'
    for line in text.splitlines():
        if line.startswith(prefix):
            labels, _, value = line.rpartition(" ")
            calls[labels[len(prefix) : -2]] = float(value)
    return calls


def calls_between(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """The calls made between two readings of :func:`check_calls`, by result, leaving out zeros."""
    made = {result: int(after.get(result, 0) - before.get(result, 0)) for result in after}
    return {result: count for result, count in sorted(made.items()) if count}
