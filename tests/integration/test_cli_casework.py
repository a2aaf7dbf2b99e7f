"""`dipc exceptions`, `dipc inquiries` and `dipc notifications` as finance and support run them: real
processes on the database a running server wrote to."""

from __future__ import annotations

import asyncio
import shlex
import subprocess

import orjson

from tests.conftest import CODE
from tests.integration.test_cli import DIPC, run

INVOICE = "INV-2026-000123"


async def dipc(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return await asyncio.to_thread(run, *args, env=env)


async def resolve(env, payment_id: int, resolution: str, by: str, note: str, *more: str):
    args = ("--resolution", resolution, "--by", by, "--note", note)
    return await dipc("exceptions", "resolve", str(payment_id), *args, *more, env=env)


async def make_exceptions(doku, register, pool) -> dict[str, int]:
    await register()
    await doku.inquiry(CODE, request_id="ask-1")
    for ref, amount in (("normal", 150000), ("twice", 150000)):
        await doku.notify(CODE, invoice_number=INVOICE, amount=amount, original_request_id=ref)
    await doku.notify("8896599999999999", invoice_number="X-1", amount=5, original_request_id="ghost")
    rows = await pool.fetch("SELECT transaction_ref, id FROM payments")
    return {row["transaction_ref"]: row["id"] for row in rows}


async def test_finance_lists_and_resolves_exceptions_from_the_terminal(env, doku, register, pool):
    ids = await make_exceptions(doku, register, pool)

    listed = await dipc("exceptions", "list", "--state", "open", env=env)
    assert listed.returncode == 0, listed.stderr
    text = listed.stdout.decode()
    assert "ALREADY_PAID" in text
    assert "UNKNOWN_CODE" in text
    assert CODE in text  # the merchant's own terminal: nothing masked

    resolved = await resolve(
        env, ids["twice"], "refunded", "Sari", "refunded in store", "--reference", "RF-1", "--json"
    )
    assert resolved.returncode == 0, resolved.stderr
    document = orjson.loads(resolved.stdout)
    assert (document["state"], document["resolution"], document["resolved_by"], document["reference"]) == (
        "resolved",
        "refunded",
        "Sari",
        "RF-1",
    )
    again = await resolve(env, ids["twice"], "refunded", "Other", "", "--json")
    assert again.returncode == 0
    assert orjson.loads(again.stdout) == document

    refused = await resolve(env, ids["twice"], "dismissed", "Sari", "")
    assert refused.returncode == 1
    assert b"ALREADY_RESOLVED" in refused.stderr

    not_one = await resolve(env, ids["normal"], "dismissed", "S", "")
    assert not_one.returncode == 1
    assert b"NOT_FOUND" in not_one.stderr

    nobody = await resolve(env, ids["ghost"], "dismissed", " ", "")
    assert nobody.returncode == 1
    assert b"resolved_by" in nobody.stderr

    assert (
        await dipc("exceptions", "resolve", str(ids["ghost"]), "--resolution", "refunded", env=env)
    ).returncode == 2
    assert (await dipc("exceptions", "list", "--kind", "normal", env=env)).returncode == 2

    still_open = orjson.loads((await dipc("exceptions", "list", "--state", "open", "--json", env=env)).stdout)
    assert [item["payment_id"] for item in still_open["items"]] == [ids["ghost"]]
    assert await pool.fetchval("SELECT count(*) FROM events WHERE type = 'exception.resolved'") == 1
    # Finance reads who closed what, and at which store the money was taken, without --json.
    closed = (await dipc("exceptions", "list", "--state", "resolved", env=env)).stdout.decode().splitlines()
    assert closed[0].split()[-3:] == ["AGENT_STORE_ID", "RESOLUTION", "RESOLVED_BY"]
    assert closed[1].split()[-3:] == ["TZ01", "refunded", "Sari"]


async def test_support_reads_the_audit_trail_from_the_terminal(env, doku, register, pool):
    await make_exceptions(doku, register, pool)

    inquiries = await dipc("inquiries", "list", "--code", CODE, env=env)
    assert inquiries.returncode == 0, inquiries.stderr
    assert b"ask-1" in inquiries.stdout
    assert b"SUCCESS" in inquiries.stdout
    as_json = orjson.loads((await dipc("inquiries", "list", "--json", "--since", "2000-01-01T00:00:00Z",
                                       env=env)).stdout)  # fmt: skip
    [inquiry] = as_json["items"]
    assert inquiry["response"]["order"]["invoice_number"] == INVOICE
    assert (await dipc("inquiries", "list", "--since", "yesterday", env=env)).returncode == 2

    notifications = await dipc("notifications", "list", "--outcome", "conflict", env=env)
    assert notifications.returncode == 0
    assert b"ALREADY_PAID" in notifications.stdout
    assert b"normal" not in notifications.stdout
    raw = orjson.loads((await dipc("notifications", "list", "--code", CODE, "--json", env=env)).stdout)
    assert [item["outcome"] for item in raw["items"]] == ["normal", "conflict"]
    assert orjson.loads(raw["items"][0]["body"])["order"]["amount"] == 150000
    paged = await dipc("notifications", "list", "--code", CODE, "--after", "0", "--limit", "1", env=env)
    # The next page's command is this one, its filters kept, at the next cursor.
    [more] = [line for line in paged.stdout.decode().splitlines() if line.startswith("more: ")]
    next_command = shlex.split(more.removeprefix("more: "))
    cursor = next_command[-1]
    assert next_command == [
        "dipc",
        "notifications",
        "list",
        "--code",
        CODE,
        "--limit",
        "1",
        "--after",
        cursor,
    ]
    following = await dipc(*next_command[1:], env=env)
    assert following.returncode == 0, following.stderr
    assert b"ALREADY_PAID" in following.stdout


def test_the_help_explains_resolutions_with_examples():
    for args, words in (
        (["exceptions", "--help"], ["refunded", "accepted", "dismissed", "final"]),
        (["exceptions", "resolve", "--help"], ["example", "--reference", "still payable"]),
        (["exceptions", "list", "--help"], ["examples", "--state open"]),
        (["inquiries", "list", "--help"], ["example"]),
        (["notifications", "list", "--help"], ["example", "--outcome"]),
    ):
        result = subprocess.run([*DIPC, *args], capture_output=True, text=True, check=True)
        for word in words:
            assert word in result.stdout, (args, word)
    top = subprocess.run([*DIPC, "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("exceptions", "inquiries", "notifications"):
        assert command in top


async def test_a_command_the_database_gives_up_for_a_lock_says_to_run_it_again(
    env, register, pool, database_url
):
    """A role with a lock_timeout (a common production setting) and a code whose row another
    transaction holds: PostgreSQL refuses the cancel's lock wait (55P03), as it would break a lock cycle
    (40P01). Nothing was written; the command says so and to run it again, in one line, not a
    traceback."""
    await register()
    separator = "&" if "?" in database_url else "?"
    impatient = env | {"DATABASE_URL": f"{database_url}{separator}lock_timeout=200"}
    async with pool.acquire() as holder, holder.transaction():
        await holder.execute("SELECT FROM payment_codes WHERE payment_code = $1 FOR UPDATE", CODE)
        cancelled = await dipc("codes", "cancel", CODE, env=impatient)
    stderr = cancelled.stderr.decode()
    assert cancelled.returncode == 1, stderr
    assert "LockNotAvailableError" in stderr, stderr
    assert "try again" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert await pool.fetchval("SELECT status FROM payment_codes WHERE payment_code = $1", CODE) == "active"
    assert (await dipc("codes", "cancel", CODE, env=env)).returncode == 0  # run again
