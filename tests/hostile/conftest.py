"""The hostile-input suite: whatever a client sends, dipc answers 4xx in the route's shape (or a deliberate
503), logs no traceback, no full payment code and no secret, and changes only what it should.

Hypothesis runs derandomized (the same cases every run, so CI is reproducible); set
``DIPC_HOSTILE_EXAMPLES=10`` (a multiplier) and ``DIPC_HOSTILE_RANDOM=1`` to explore more widely by hand.
"""

from __future__ import annotations

import os
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, settings

from tests.conftest import ADMIN_TOKEN, CODE, OLD_SECRET_KEY, OTHER_SECRET_KEY, SECRET_KEY, CapturedLog

_MULTIPLIER = max(1, int(os.environ.get("DIPC_HOSTILE_EXAMPLES", "1")))
settings.register_profile(
    "hostile",
    derandomize=not os.environ.get("DIPC_HOSTILE_RANDOM"),
    deadline=None,
    database=None,
    print_blob=True,
    # One app and one database serve every example of a test: they are arranged once, on purpose.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

SECRETS = (SECRET_KEY, OLD_SECRET_KEY, OTHER_SECRET_KEY, ADMIN_TOKEN)


def examples(count: int) -> settings:
    """The settings of one hostile test: ``count`` cases (times the multiplier), the suite's profile."""
    return settings(settings.get_profile("hostile"), max_examples=count * _MULTIPLIER)


def assert_log_clean(captured_log: CapturedLog, *codes: str) -> None:
    """No traceback, no error line, no secret and no full payment code; then forget what was read."""
    text = captured_log.text()
    assert "Traceback" not in text, text[-2000:]
    for line in captured_log.lines():
        assert "exception" not in line, line
        assert line.get("level") not in ("error", "critical"), line
    for secret in (*SECRETS, CODE, *codes):
        assert secret not in text, f"{secret[:4]}… appears in the log"
    captured_log.clear()


def assert_no_5xx(status: int) -> None:
    assert status < 500 or status == 503, status


TABLES = ("payment_codes", "inquiries", "notifications", "payments", "events", "events_pending")


async def counts(pool: asyncpg.Pool) -> dict[str, Any]:
    """Row counts, and the codes' state: what a refused request must leave as it was."""
    # Our own table names, not input.
    columns = ", ".join(f"(SELECT count(*) FROM {table}) AS {table}" for table in TABLES)  # noqa: S608
    row = await pool.fetchrow(f"SELECT {columns}")
    state = await pool.fetch("SELECT payment_code, status, version, amount FROM payment_codes ORDER BY 1")
    return dict(row) | {"codes": [tuple(r) for r in state]}


@pytest.fixture
def hostile_log(captured_log: CapturedLog) -> CapturedLog:
    return captured_log


@pytest.fixture
async def client(aiohttp_client, pool, database_url):
    """The real app, with short read timeouts so that stalled cases end quickly."""
    from server.app import make_app
    from tests.conftest import make_settings

    settings = make_settings(body_timeout_s=0.5, header_timeout_s=1.0)
    return await aiohttp_client(make_app(settings, database_url))
