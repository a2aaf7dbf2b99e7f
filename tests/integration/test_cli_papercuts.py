"""The CLI as someone new meets it: the help's examples work, defaults follow the configuration, and
every exit code says what happened."""

from __future__ import annotations

import subprocess
from datetime import timedelta

import orjson

from server import demo
from server.core.times import utcnow
from tests.integration.test_cli import DIPC, run, run_async


def test_the_help_shows_the_demo_flag_that_makes_its_examples_work():
    top = subprocess.run([*DIPC, "--help"], capture_output=True, text=True, check=True).stdout
    assert "dipc codes add --demo 8896512345678124" in top
    assert "dipc codes import --demo" in top
    assert "DATABASE_URL=postgresql://" in top
    add = subprocess.run([*DIPC, "codes", "add", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--demo" in add
    assert "dipc codes add --demo 8896512345678124" in add
    imports = subprocess.run(
        [*DIPC, "codes", "import", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--all-or-nothing" in imports
    assert "3  partly imported" in imports


async def test_simulate_asks_on_the_channel_of_the_codes_bin(env, client, register):
    await register(payment_code="3301200000000042", channel="INDOMARET", invoice_number="INV-42")
    url = str(client.make_url("")).rstrip("/")
    code, stdout, stderr = await run_async(
        "simulate", "inquiry", "--url", url, "--json", "3301200000000042", env=env
    )
    assert code == 0, stderr
    assert orjson.loads(stdout)["status"] == 200  # asked as Indomaret, not as the ALFA default
    code, stdout, _ = await run_async(
        "simulate", "inquiry", "--url", url, "--json", "--channel", "ALFA", "3301200000000042", env=env
    )
    assert orjson.loads(stdout)["body"]["online_to_offline_inquiry"]["status"] == "decline"


def write_codes(tmp_path, *codes: str) -> str:
    path = tmp_path / "codes.csv"
    lines = ["payment_code,amount,invoice_number,customer_name"]
    lines += [f"{code},{amount},INV-{index},Pelanggan" for index, (code, amount) in enumerate(codes)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_import_exit_codes_say_whether_anything_was_saved(env, tmp_path, pool):
    partial = write_codes(tmp_path, ("8896500000000001", "1000"), ("8896500000000002", "0"))

    checked = run("codes", "import", "--check", "--json", partial, env=env)
    assert checked.returncode == 1
    assert orjson.loads(checked.stdout) | {"seconds": 0} == {
        "imported": 0,
        "valid": 1,
        "saved": False,
        "rejected": [{"line": 3, "error": "amount: must be greater than 0"}],
        "rejected_count": 1,
        "seconds": 0,
    }
    strict = run("codes", "import", "--all-or-nothing", partial, env=env)
    assert strict.returncode == 1
    assert b"imported nothing: 1 lines rejected (--all-or-nothing)" in strict.stdout
    listed = run("codes", "list", "--json", env=env)
    assert orjson.loads(listed.stdout)["items"] == []  # neither saved anything

    imported = run("codes", "import", partial, env=env)
    assert imported.returncode == 3  # partly imported: the valid line is saved
    assert b"imported 1 codes, rejected 1 lines" in imported.stdout
    again = run("codes", "import", partial, env=env)
    assert again.returncode == 1  # nothing new: one exists already, one is invalid

    valid = write_codes(tmp_path, ("8896500000000003", "1000"))
    assert run("codes", "import", "--check", valid, env=env).returncode == 0
    assert run("codes", "import", "--all-or-nothing", valid, env=env).returncode == 0


async def test_codes_list_shows_expired_codes_as_expired(env, client, register, pool):
    await register(payment_code="8896500000000010", invoice_number="INV-10")
    await register(payment_code="8896500000000011", invoice_number="INV-11")
    await pool.execute(
        "UPDATE payment_codes SET expires_at = $1 WHERE payment_code = '8896500000000011'",
        utcnow() - timedelta(hours=1),
    )
    code, stdout, _ = await run_async("codes", "list", "--status", "active", "--json", env=env)
    assert [item["payment_code"] for item in orjson.loads(stdout)["items"]] == ["8896500000000010"]
    code, stdout, _ = await run_async("codes", "list", "--status", "expired", "--json", env=env)
    [expired] = orjson.loads(stdout)["items"]
    assert (expired["payment_code"], expired["status"]) == ("8896500000000011", "expired")
    code, stdout, _ = await run_async("codes", "list", env=env)
    assert code == 0
    assert b"expired" in stdout
    code, stdout, _ = await run_async("codes", "show", "8896500000000011", env=env)
    assert b"expired" in stdout
    # The admin API keeps the stored status (and the expiry that explains it).
    response = await client.get(
        "/v1/payment-codes/8896500000000011", headers={"Authorization": "Bearer test-admin-token"}
    )
    assert (await response.json())["status"] == "active"


async def test_demo_codes_are_announced_as_events(pool):
    await demo.seed(pool, utcnow())
    events = await pool.fetch("SELECT type, payment_code FROM events ORDER BY id")
    assert [(e["type"], e["payment_code"]) for e in events] == [
        ("code.created", code.payment_code) for code in demo.demo_codes(utcnow())
    ]
    await demo.seed(pool, utcnow())  # a restart puts them back to unpaid: that is a change too
    types = [row["type"] for row in await pool.fetch("SELECT type FROM events WHERE id > $1", len(events))]
    assert types == ["code.updated"] * len(events)
