"""`dipc prune` deletes what has served its purpose, and never money, pending work or what waits for a
person."""

from __future__ import annotations

import orjson

from server.store import deliveries as delivery_store
from tests.conftest import CODE
from tests.integration.test_cli import run_async


async def test_prune_keeps_recent_rows_money_and_unfinished_work(env, doku, register, pool):
    await register()
    for _ in range(3):
        await doku.inquiry(CODE)
    await doku.notify(CODE, invoice_number="INV-2026-000123", amount=150000, original_request_id="A")
    await doku.notify(CODE, invoice_number="INV-2026-000123", amount=150000, original_request_id="B")
    # Age some of everything: two inquiries, one notification, all three events.
    await pool.execute(
        "UPDATE inquiries SET received_at = now() - interval '100 days' "
        "WHERE request_id IN (SELECT request_id FROM inquiries ORDER BY received_at LIMIT 2)"
    )
    await pool.execute("UPDATE notifications SET received_at = now() - interval '500 days' WHERE id = 1")
    await pool.execute("UPDATE events SET created_at = now() - interval '100 days'")
    await pool.execute("UPDATE payments SET recorded_at = now() - interval '1000 days'")
    # The invoice paid above was reconciled long ago; of the other invoices quoted long ago, one expired,
    # one was given up (a person must look at it) and one is still being checked; one expired lately.
    await pool.execute("UPDATE reconciliation SET updated_at = now() - interval '100 days'")
    await pool.execute(
        "INSERT INTO reconciliation (payment_code, invoice_number, client_id, channel, amount, state, "
        "next_check_at, updated_at) VALUES "
        "($1, 'OLD-EXPIRED', 'MCH-1', 'ALFA', 1, 'expired', NULL, now() - interval '100 days'), "
        "($1, 'OLD-GAVE-UP', 'MCH-1', 'ALFA', 1, 'gave_up', NULL, now() - interval '100 days'), "
        "($1, 'OLD-PENDING', 'MCH-1', 'ALFA', 1, 'pending', now(), now() - interval '100 days'), "
        "($1, 'NEW-EXPIRED', 'MCH-1', 'ALFA', 1, 'expired', NULL, now() - interval '80 days')",
        CODE,
    )
    # Event 2 was delivered long ago; event 3 is still to be delivered.
    await pool.execute(
        "INSERT INTO webhook_deliveries (event_id, payment_code, status, delivered_at) VALUES "
        "(2, $1, 'delivered', now() - interval '40 days'), (3, $1, 'pending', NULL)",
        CODE,
    )

    code, stdout, _ = await run_async("prune", "--dry-run", "--json", env=env)
    assert code == 0
    # Event 2 can go too once its delivered delivery goes in the same run: the dry run counts it.
    expected = {"inquiries": 2, "notifications": 1, "webhook_deliveries": 1, "events": 2, "reconciliation": 2}
    assert orjson.loads(stdout) == {"dry_run": True, "rows": expected}
    assert await pool.fetchval("SELECT count(*) FROM inquiries") == 3  # a dry run deletes nothing

    code, stdout, _ = await run_async("prune", "--json", env=env)
    assert code == 0
    assert orjson.loads(stdout)["rows"] == expected  # exactly what the dry run said
    assert await pool.fetchval("SELECT count(*) FROM inquiries") == 1
    assert await pool.fetchval("SELECT count(*) FROM notifications") == 1
    assert [row["id"] for row in await pool.fetch("SELECT id FROM events")] == [3]
    assert await pool.fetchval("SELECT count(*) FROM payments") == 2  # money is never pruned
    assert await pool.fetchval("SELECT count(*) FROM payment_codes") == 1
    left = await pool.fetch("SELECT invoice_number FROM reconciliation ORDER BY invoice_number")
    assert [row["invoice_number"] for row in left] == ["NEW-EXPIRED", "OLD-GAVE-UP", "OLD-PENDING"]


async def test_prune_refuses_a_retention_under_a_day(env):
    code, _, stderr = await run_async("prune", "--inquiries", "0", env=env)
    assert code == 2
    assert b"at least 1 day" in stderr


async def test_pruning_delivered_webhooks_does_not_send_their_events_again(env, pool):
    """(Found by review.) The forwarder enqueues every event above the highest one its subscriber has a
    delivery of. Once prune had deleted all of them (30 days without an event, a shorter
    --webhook-deliveries), that position was gone, and the next round enqueued every event still kept
    (up to 60 days of them): each sent to the merchant a second time. Prune keeps it in the
    subscriber's row first."""
    await delivery_store.ensure_subscriber(pool, "default", "http://127.0.0.1:9/hook")
    await pool.execute(
        """
        INSERT INTO events (type, payment_code, payload, created_at)
        SELECT 'payment.received', '88965' || lpad(g::text, 11, '0'), '{}'::jsonb, now() - interval '40 days'
          FROM generate_series(1, 500) g
        """
    )
    assert await delivery_store.enqueue(pool, "default") == 500
    await pool.execute(
        "UPDATE webhook_deliveries SET status = 'delivered', attempts = 1, last_status = 200,"
        " delivered_at = now() - interval '40 days'"
    )
    code, stdout, stderr = await run_async("prune", "--json", env=env)
    assert code == 0, stderr
    assert orjson.loads(stdout)["rows"]["webhook_deliveries"] == 500
    assert await delivery_store.enqueue(pool, "default") == 0  # the forwarder's next round
    await pool.execute(
        "INSERT INTO events (type, payment_code, payload) VALUES ('code.created', $1, '{}')", CODE
    )
    assert await delivery_store.enqueue(pool, "default") == 1  # and a new event is still sent
