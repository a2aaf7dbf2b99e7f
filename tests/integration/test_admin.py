"""The admin API under /v1 against the real app and PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
from datetime import timedelta

import asyncpg
import orjson
import pytest

from server.app import make_app
from server.core import manage
from server.core.imports import YIELD_EVERY_LINES, lines_of, read_rows
from server.core.times import utcnow
from server.doku.client import DokuSimulator
from server.store import codes as code_store
from tests.conftest import (
    ADMIN_TOKEN,
    CLIENT,
    CLIENT_ID,
    CODE,
    code_fields,
    make_settings,
    waiting_for_a_lock,
)


async def events(pool: asyncpg.Pool) -> list[tuple[str, str | None]]:
    return [
        (row["type"], row["payment_code"]) for row in await pool.fetch("SELECT * FROM events ORDER BY id")
    ]


# --- authentication ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", "test-admin-token", "Basic test-admin-token", "Bearer "],
)
async def test_a_missing_or_wrong_token_is_unauthorized(client, authorization):
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = await client.get("/v1/payment-codes", headers=headers)
    assert response.status == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert (await response.json())["error"]["code"] == "UNAUTHORIZED"


async def test_without_a_configured_token_the_admin_api_is_disabled(aiohttp_client, pool, database_url):
    client = await aiohttp_client(make_app(make_settings(admin_tokens=()), database_url))
    response = await client.get("/v1/payment-codes", headers={"Authorization": "Bearer anything"})
    assert response.status == 404
    assert (await response.json())["error"]["code"] == "DISABLED"


async def test_every_token_of_a_rotation_is_accepted(aiohttp_client, pool, database_url):
    client = await aiohttp_client(make_app(make_settings(admin_tokens=("new", "old")), database_url))
    for token in ("new", "old"):
        assert (
            await client.get("/v1/payment-codes", headers={"Authorization": f"Bearer {token}"})
        ).status == 200


async def test_errors_are_json_even_for_unknown_routes_and_methods(client, admin_headers):
    missing = await client.get("/v1/nothing-here", headers=admin_headers)
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "NOT_FOUND"
    wrong_method = await client.delete(f"/v1/payment-codes/{CODE}", headers=admin_headers)
    assert wrong_method.status == 405
    assert (await wrong_method.json())["error"]["code"] == "METHOD_NOT_ALLOWED"
    assert "PATCH" in wrong_method.headers["Allow"]


# --- create and read ---------------------------------------------------------------------------


async def test_a_registered_code_is_created_and_readable(client, admin_headers, pool):
    response = await client.post("/v1/payment-codes", json=code_fields(reusable=True), headers=admin_headers)
    assert response.status == 201
    assert response.headers["Location"] == f"/v1/payment-codes/{CODE}"
    created = await response.json()
    assert created | {"created_at": None, "updated_at": None} == {
        "payment_code": CODE,
        "client_id": CLIENT_ID,
        "channel": "ALFA",
        "invoice_number": "INV-2026-000123",
        "amount": 150000,
        "customer_name": "Budi Santoso",
        "customer_email": "",
        "info1": "Toko Contoh",
        "info2": "",
        "info3": "",
        "reusable": True,
        "status": "active",
        "expires_at": None,
        "paid_count": 0,
        "created_at": None,
        "updated_at": None,
        "version": 1,
    }
    fetched = await client.get(f"/v1/payment-codes/{CODE}", headers=admin_headers)
    assert await fetched.json() == created
    assert await events(pool) == [("code.created", CODE)]


async def test_registering_an_existing_code_conflicts(client, register, admin_headers, pool):
    await register()
    response = await client.post("/v1/payment-codes", json=code_fields(amount=5), headers=admin_headers)
    assert response.status == 409
    assert (await response.json())["error"]["code"] == "ALREADY_EXISTS"
    assert await pool.fetchval("SELECT amount FROM payment_codes") == 150000


async def test_an_invalid_registration_names_every_field(client, admin_headers, pool):
    response = await client.post(
        "/v1/payment-codes",
        json={"payment_code": "88965abc", "amount": 0, "invoice_number": "bad invoice", "customer_name": ""},
        headers=admin_headers,
    )
    assert response.status == 422
    error = (await response.json())["error"]
    assert error["code"] == "VALIDATION_FAILED"
    assert set(error["fields"]) == {"payment_code", "amount", "invoice_number", "customer_name", "client_id"}
    assert await pool.fetchval("SELECT count(*) FROM payment_codes") == 0


async def test_a_code_breaking_the_bin_rules_is_refused(client, admin_headers):
    response = await client.post(
        "/v1/payment-codes", json=code_fields(payment_code="889660" + "1" * 15), headers=admin_headers
    )
    assert response.status == 422
    assert "at most 14 digits after the BIN" in (await response.json())["error"]["fields"]["payment_code"]


@pytest.mark.parametrize(
    ("body", "content_type", "status", "code"),
    [
        (b"{not json", "application/json", 400, "INVALID_JSON"),
        (b"[]", "application/json", 400, "INVALID_JSON"),
        (b"{}", "text/plain", 415, "UNSUPPORTED_MEDIA_TYPE"),
        (b'{"x":"' + b"y" * 70_000 + b'"}', "application/json", 413, "BODY_TOO_LARGE"),
    ],
)
async def test_unusable_bodies_are_clear_errors(client, admin_headers, body, content_type, status, code):
    response = await client.post(
        "/v1/payment-codes", data=body, headers=admin_headers | {"Content-Type": content_type}
    )
    assert response.status == status
    assert (await response.json())["error"]["code"] == code


async def test_an_unknown_code_is_404(client, admin_headers):
    for path in (f"/v1/payment-codes/{CODE}", "/v1/payment-codes/not-digits"):
        response = await client.get(path, headers=admin_headers)
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "NOT_FOUND"


# --- change and cancel ----------------------------------------------------------------------


async def test_an_active_code_can_be_changed(client, register, admin_headers, pool):
    await register()
    expiry = (utcnow() + timedelta(days=3)).replace(microsecond=0)
    response = await client.patch(
        f"/v1/payment-codes/{CODE}",
        json={"amount": 175000, "expires_at": expiry.isoformat(), "info2": "Cabang 2", "version": 1},
        headers=admin_headers,
    )
    assert response.status == 200
    changed = await response.json()
    assert (changed["amount"], changed["info2"], changed["version"]) == (175000, "Cabang 2", 2)
    assert changed["expires_at"] == expiry.isoformat().replace("+00:00", "Z")
    event = await pool.fetchrow("SELECT * FROM events WHERE type = 'code.updated'")
    assert event["payload"]["changed"] == ["amount", "expires_at", "info2"]


async def test_a_stale_version_conflicts(client, register, admin_headers):
    await register()
    response = await client.patch(
        f"/v1/payment-codes/{CODE}", json={"amount": 1, "version": 7}, headers=admin_headers
    )
    assert response.status == 409
    assert (await response.json())["error"]["code"] == "VERSION_CONFLICT"


@pytest.mark.parametrize("status", ["paid", "cancelled"])
async def test_a_paid_or_cancelled_code_cannot_change(client, register, admin_headers, pool, status):
    await register()
    await pool.execute("UPDATE payment_codes SET status = $1, paid_count = $2", status, int(status == "paid"))
    response = await client.patch(f"/v1/payment-codes/{CODE}", json={"amount": 1}, headers=admin_headers)
    assert response.status == 409
    assert (await response.json())["error"]["code"] == "NOT_MODIFIABLE"
    assert await pool.fetchval("SELECT amount FROM payment_codes") == 150000


async def test_an_invalid_change_is_422(client, register, admin_headers):
    await register()
    response = await client.patch(
        f"/v1/payment-codes/{CODE}", json={"amount": -1, "payment_code": "1"}, headers=admin_headers
    )
    assert response.status == 422
    assert set((await response.json())["error"]["fields"]) == {"amount", "payment_code"}


async def test_cancel_answers_the_cancelled_code_and_is_idempotent(client, register, admin_headers, pool):
    await register()
    first = await client.post(f"/v1/payment-codes/{CODE}/cancel", headers=admin_headers)
    assert first.status == 200
    assert (await first.json())["status"] == "cancelled"
    again = await client.post(f"/v1/payment-codes/{CODE}/cancel", headers=admin_headers)
    assert again.status == 200
    assert await events(pool) == [("code.created", CODE), ("code.cancelled", CODE)]


async def test_a_paid_code_cannot_be_cancelled(client, register, admin_headers, pool):
    await register()
    await pool.execute("UPDATE payment_codes SET status = 'paid', paid_count = 1")
    response = await client.post(f"/v1/payment-codes/{CODE}/cancel", headers=admin_headers)
    assert response.status == 409
    assert await pool.fetchval("SELECT status FROM payment_codes") == "paid"


async def test_a_cancel_racing_reusable_inquiries_leaves_no_invoice_after_it(
    client, doku, register, admin_headers, pool
):
    await register(reusable=True, invoice_number="TOPUP")
    inquiries = [doku.inquiry(CODE) for _ in range(20)]
    cancel = client.post(f"/v1/payment-codes/{CODE}/cancel", headers=admin_headers)
    results = await asyncio.gather(*inquiries[:10], cancel, *inquiries[10:])
    replies = [r for r in results if hasattr(r, "signature_valid")]
    succeeded = [r for r in replies if r.status == 200]
    declined = [r for r in replies if r.status == 400]
    assert len(succeeded) + len(declined) == 20
    assert all(r.json()["online_to_offline_inquiry"]["status"] == "decline" for r in declined)
    assert await pool.fetchval("SELECT invoice_seq FROM payment_codes") == len(succeeded)


# --- listing ----------------------------------------------------------------------------------


async def test_codes_are_listed_by_keyset_pages_and_filtered_by_status(client, register, admin_headers, pool):
    for n in range(7):
        await register(payment_code=f"889650000000{n:04d}", invoice_number=f"INV-{n}")
    await pool.execute(
        "UPDATE payment_codes SET status = 'cancelled' WHERE payment_code LIKE '%3' OR payment_code LIKE '%5'"
    )
    seen, cursor = [], None
    while True:
        query = {"limit": "3"} | ({"after": cursor} if cursor else {})
        page = await (await client.get("/v1/payment-codes", params=query, headers=admin_headers)).json()
        seen += [item["payment_code"] for item in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [f"889650000000{n:04d}" for n in range(7)]
    active = await (
        await client.get("/v1/payment-codes", params={"status": "active"}, headers=admin_headers)
    ).json()
    assert [item["payment_code"][-1] for item in active["items"]] == ["0", "1", "2", "4", "6"]
    assert active["next"] is None


@pytest.mark.parametrize("query", [{"status": "gone"}, {"limit": "0"}, {"limit": "5000"}, {"limit": "ten"}])
async def test_bad_list_parameters_are_422(client, admin_headers, query):
    response = await client.get("/v1/payment-codes", params=query, headers=admin_headers)
    assert response.status == 422


@pytest.mark.parametrize(
    ("path", "query"),
    [
        ("/v1/payments", {"after": str(2**70)}),  # past bigint: a 422, never a database error
        ("/v1/payments", {"after": "-1"}),
        ("/v1/payments", {"since": ""}),
        ("/v1/payments", {"since": "yesterday"}),
        ("/v1/events", {"after": str(2**63)}),
        ("/v1/webhook-deliveries", {"after": "x"}),
    ],
)
async def test_malformed_typed_parameters_are_422(client, admin_headers, path, query):
    response = await client.get(path, params=query, headers=admin_headers)
    assert response.status == 422
    assert list((await response.json())["error"]["fields"]) == list(query)


async def test_a_time_whose_plus_the_url_made_a_space_is_told_how_to_write_it(client, admin_headers):
    """(Found by review.) An offset written +07:00 in a query arrives as a space, and was answered 'must
    be an ISO 8601 timestamp with a UTC offset', though the caller wrote one."""
    response = await client.get("/v1/payments?since=2026-11-25T00:00:00+07:00", headers=admin_headers)
    assert response.status == 422
    assert "write + as %2B" in (await response.json())["error"]["fields"]["since"]
    escaped = await client.get("/v1/payments?since=2026-11-25T00:00:00%2B07:00", headers=admin_headers)
    assert escaped.status == 200


async def test_a_method_a_path_does_not_have_is_405_not_a_lookup(client, admin_headers):
    response = await client.patch("/v1/payment-codes/import", json={}, headers=admin_headers)
    assert response.status == 405
    assert (await client.get("/v1/payment-codes/import", headers=admin_headers)).status == 405


async def test_payments_are_listed_with_filters(client, register, admin_headers, pool):
    await register()
    for n, kind in enumerate(["normal", "conflict", "anomaly"]):
        await pool.execute(
            """INSERT INTO payments (payment_code, invoice_number, transaction_ref, kind, amount, client_id,
                                     channel, notification_id, paid_at)
               VALUES ($1, 'INV-2026-000123', $2, $3, 150000, $4, 'ALFA', $5, now())""",
            CODE,
            f"ref-{n}",
            kind,
            CLIENT_ID,
            n,
        )
    everything = await (await client.get("/v1/payments", params={"limit": "2"}, headers=admin_headers)).json()
    assert [item["kind"] for item in everything["items"]] == ["normal", "conflict"]
    assert everything["next"] == "2"
    rest = await (await client.get("/v1/payments", params={"after": "2"}, headers=admin_headers)).json()
    assert [item["kind"] for item in rest["items"]] == ["anomaly"]
    conflicts = await (
        await client.get("/v1/payments", params={"kind": "conflict"}, headers=admin_headers)
    ).json()
    [conflict] = conflicts["items"]
    assert conflict["transaction_ref"] == "ref-1"
    assert conflict["amount"] == 150000
    assert conflict["paid_at"].endswith("Z")
    assert (await client.get("/v1/payments", params={"kind": "odd"}, headers=admin_headers)).status == 422


# --- bulk import ------------------------------------------------------------------------------


def csv_of(
    rows: list[str], header: str = "payment_code,amount,invoice_number,customer_name,reusable"
) -> bytes:
    """A CSV import for the test merchant (the client_id column names it: two merchants are configured)."""
    return ("\n".join([f"{header},client_id", *(f"{row},{CLIENT_ID}" for row in rows)]) + "\n").encode()


async def test_a_csv_import_registers_valid_rows_and_reports_the_rest(client, register, admin_headers, pool):
    await register(payment_code="8896500000000003", invoice_number="EXISTING")
    body = csv_of(
        [
            "8896500000000001,1000,INV-1,Budi,false",
            "8896500000000002,0,INV-2,Siti,false",  # amount
            "8896500000000003,3000,INV-3,Andi,false",  # registered before
            "8896500000000001,1000,INV-1,Budi,false",  # repeats line 2
            "12345,5000,INV-5,Dewi,true",  # not under a BIN
            "8896500000000006,6000,INV-6,Rina,true",
        ]
    )
    response = await client.post(
        "/v1/payment-codes/import", data=body, headers=admin_headers | {"Content-Type": "text/csv"}
    )
    assert response.status == 200
    result = await response.json()
    assert result["imported"] == 2, result
    assert result["rejected_count"] == 4
    assert [(r["line"], r["error"].split(":")[0]) for r in result["rejected"]] == [
        (3, "amount"),
        (4, "payment_code"),
        (5, "payment_code"),
        (6, "payment_code"),
    ]
    assert "already registered" in result["rejected"][1]["error"]
    assert "repeats line 2" in result["rejected"][2]["error"]
    rows = await pool.fetch("SELECT payment_code, reusable, client_id FROM payment_codes ORDER BY 1")
    assert [(r["payment_code"], r["reusable"]) for r in rows] == [
        ("8896500000000001", False),
        ("8896500000000003", False),
        ("8896500000000006", True),
    ]
    assert await pool.fetchval("SELECT payload FROM events WHERE type = 'codes.imported'") == {
        "imported": 2,
        "rejected": 4,
    }


async def rows_of(body: bytes, fmt: str = "csv"):
    async def chunks():
        yield body

    async for row in read_rows(lines_of(chunks()), fmt):
        yield row


@pytest.mark.parametrize("batch_size", [1, 2, 3, 1000])
async def test_an_import_rejects_the_same_lines_however_it_is_batched(client, register, pool, batch_size):
    await register(payment_code="8896500000000003", invoice_number="EXISTING")
    await register(payment_code="8896500000000007", invoice_number="EXISTING-7")
    body = csv_of(
        [
            "8896500000000001,1000,INV-1,Budi,false",
            "8896500000000003,3000,INV-3,Andi,false",  # registered before
            "8896500000000004,4000,INV-4,Wati,false",
            "8896500000000001,1000,INV-1,Budi,false",  # repeats line 2
            "8896500000000003,3000,INV-3,Andi,false",  # repeats line 3 (registered before)
            "8896500000000005,0,INV-5,Joko,false",  # amount
            "8896500000000006,6000,INV-6,Rina,true",
            "8896500000000004,4000,INV-4,Wati,false",  # repeats line 4
            "8896500000000007,7000,INV-7,Eko,false",  # registered before
            "8896500000000008,8000,INV-8,Tuti,false",
        ]
    )
    settings = make_settings()
    result = await manage.import_codes(
        pool,
        rows_of(body),
        rules=settings.bins,
        client_ids=settings.client_ids,
        now=utcnow(),
        step_timeout_s=settings.admin_db_timeout_s,
        batch_size=batch_size,
    )
    assert [(r.line, r.error) for r in result.rejected] == [
        (3, "payment_code: 8896500000000003 is already registered"),
        (5, "payment_code: 8896500000000001 repeats line 2"),
        (6, "payment_code: 8896500000000003 repeats line 3"),
        (7, "amount: must be greater than 0"),
        (9, "payment_code: 8896500000000004 repeats line 4"),
        (10, "payment_code: 8896500000000007 is already registered"),
    ]
    assert (result.imported, result.rejected_count) == (4, 6)
    rows = await pool.fetch("SELECT payment_code, invoice_number FROM payment_codes ORDER BY 1")
    assert [(r["payment_code"], r["invoice_number"]) for r in rows] == [
        ("8896500000000001", "INV-1"),
        ("8896500000000003", "EXISTING"),
        ("8896500000000004", "INV-4"),
        ("8896500000000006", "INV-6"),
        ("8896500000000007", "EXISTING-7"),
        ("8896500000000008", "INV-8"),
    ]


async def test_an_upload_cut_off_after_batches_went_in_registers_nothing(aiohttp_client, pool, database_url):
    client = await aiohttp_client(make_app(make_settings(import_max_bytes=1_000_000), database_url))
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "text/csv"}
    rows = [f"8896510{n:09d},{1000 + n},INV-{n},Pelanggan,false" for n in range(40_000)]  # ~2 MB

    async def upload():  # no Content-Length: the limit is met mid-stream, with batches already sent
        body = csv_of(rows)
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    response = await client.post("/v1/payment-codes/import", data=upload(), headers=headers)
    assert response.status == 413
    assert await pool.fetchval("SELECT count(*) FROM payment_codes") == 0
    again = await client.post("/v1/payment-codes/import", data=csv_of(rows[:10]), headers=headers)
    assert (await again.json())["imported"] == 10


async def test_slow_uploads_cannot_take_every_database_connection_from_doku(
    aiohttp_client, pool, database_url
):
    """(Found by review.) An import holds a pool connection for its whole upload, which may last an
    hour: as many slow uploads as the pool has connections left none for DOKU's inquiries, each a 503.
    A quarter of the pool may import at once; an upload past that is refused at once."""
    client = await aiohttp_client(make_app(make_settings(db_pool_min=1, db_pool_max=8), database_url))
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "text/csv"}
    await client.post(
        "/v1/payment-codes", json=code_fields(), headers={"Authorization": headers["Authorization"]}
    )
    finish = asyncio.Event()

    async def slow_upload(n: int):  # the header, then its row only once the test says so
        header, row = csv_of([f"88965100000{n:05d},1000,INV-{n},Pelanggan,false"]).split(b"\n", 1)
        yield header + b"\n"
        await finish.wait()
        yield row

    uploads = [
        asyncio.create_task(client.post("/v1/payment-codes/import", data=slow_upload(n), headers=headers))
        for n in range(8)
    ]
    for _ in range(100):  # all but two are refused at once (before: all eight waited, holding the pool)
        if sum(upload.done() for upload in uploads) >= 6:
            break
        await asyncio.sleep(0.1)
    refused = [upload.result() for upload in uploads if upload.done()]
    importing = [upload for upload in uploads if not upload.done()]
    assert [response.status for response in refused] == [503] * 6
    assert {(await response.json())["error"]["code"] for response in refused} == {"OVERLOADED"}
    doku = DokuSimulator(client.session, str(client.make_url("")), CLIENT)
    assert [quote.status for quote in await asyncio.gather(*(doku.inquiry(CODE) for _ in range(8)))] == [
        200
    ] * 8

    finish.set()
    imported = [await upload for upload in importing]
    assert [(await response.json())["imported"] for response in imported] == [1, 1]
    again = await client.post("/v1/payment-codes/import", data=slow_upload(9), headers=headers)
    assert (await again.json())["imported"] == 1


async def test_an_import_of_codes_registered_already_reads_only_the_rejections_it_reports(pool, monkeypatch):
    """(Found by review.) An import reports a thousand rejected lines and counts the rest, but read every
    line payment_codes refused into the serving process: a nightly re-upload of 300,000 registered codes
    grew it by 81 MB. It reads the ones it reports now, and counts the others."""
    rows = [f"88966{n:011d},1000,INV-{n},Budi,false" for n in range(5_000)]
    settings = make_settings()
    read: list[int] = []
    refused_rows = code_store.refused_rows

    async def counted(*args, **kwargs):
        listed = await refused_rows(*args, **kwargs)
        read.append(len(listed))
        return listed

    monkeypatch.setattr(code_store, "refused_rows", counted)

    async def imported() -> manage.ImportResult:
        return await manage.import_codes(
            pool,
            rows_of(csv_of(rows)),
            rules=settings.bins,
            client_ids=settings.client_ids,
            now=utcnow(),
            step_timeout_s=settings.admin_db_timeout_s,
        )

    assert ((new := await imported()).imported, new.rejected_count) == (5_000, 0)
    again = await imported()
    assert (again.imported, again.rejected_count, len(again.rejected)) == (
        0,
        5_000,
        manage.REJECTIONS_REPORTED,
    )
    assert again.rejected[-1].error == f"payment_code: 88966{999:011d} is already registered"
    assert read == [manage.REJECTIONS_REPORTED], f"rows read to report {manage.REJECTIONS_REPORTED}: {read}"


async def test_an_import_the_database_gives_up_for_a_deadlock_is_answered_503(client, admin_headers, pool):
    """(Found by review.) An import holds the codes it has copied, uncommitted, until its end; a second
    import of the same codes in another order (a corrected file sent while the first still runs, or
    `dipc codes import` meanwhile) waits for the first's while holding its own: a cycle, which
    PostgreSQL breaks by giving one of them up. That one imported nothing and is answered 503, to be sent
    again; not a 500. Here the other import (manage.import_codes, what the CLI runs) has copied Y and,
    once the upload has copied X and waits for Y, copies X."""
    first, second = "8896511110000001", "8896511110000002"
    second_row = asyncio.Event()

    async def other_file():
        yield csv_of([f"{second},1000,INV-{second},Budi,false"])
        await second_row.wait()
        yield f"{first},1000,INV-{first},Budi,false,{CLIENT_ID}\n".encode()

    settings = make_settings()
    other = asyncio.create_task(
        manage.import_codes(
            pool,
            read_rows(lines_of(other_file()), "csv"),
            rules=settings.bins,
            client_ids=settings.client_ids,
            now=utcnow(),
            step_timeout_s=settings.admin_db_timeout_s,
            batch_size=1,
        )
    )
    for _ in range(500):  # the other import holds Y, uncommitted
        if await pool.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE a.query LIKE 'COPY%payment_codes%' AND l.locktype = 'transactionid'"
        ):
            break
        await asyncio.sleep(0.01)
    upload = asyncio.create_task(
        client.post(
            "/v1/payment-codes/import",
            data=csv_of([f"{code},1000,INV-{code},Budi,false" for code in (first, second)]),
            headers=admin_headers | {"Content-Type": "text/csv"},
        )
    )
    await waiting_for_a_lock(pool, "COPY")  # the upload: X copied, waits for the other's Y
    second_row.set()
    response = await upload
    result = await asyncio.wait_for(other, 10)
    assert response.status == 503, await response.text()
    assert (await response.json())["error"]["code"] == "UNAVAILABLE"
    assert result.imported == 2  # the other one went on
    assert await pool.fetchval("SELECT count(*) FROM payment_codes") == 2


@pytest.mark.parametrize("lines", ["valid rows", "rejected rows", "blank lines"])
async def test_an_import_lets_the_other_work_of_its_worker_run(pool, lines):
    """An upload's lines are read and checked on the event loop that answers the worker's inquiries.
    Lines that arrive faster than that (here: all of them at once) must still let other tasks run every
    few dozen lines, whether or not a batch is at the database, whatever the lines hold."""
    ticks = 0

    async def ticker() -> None:  # counts the event loop's turns that other tasks get
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    count = 3_000  # under one batch: no COPY goes out until the end
    amount = "0" if lines == "rejected rows" else "1000"
    rows = [
        "" if lines == "blank lines" else f"88965200{n:08d},{amount},INV-{n},Budi,false" for n in range(count)
    ]
    body = csv_of(rows) if lines != "blank lines" else csv_of([]) + b"\n" * count
    turns_seen: list[int] = []

    async def one_chunk():
        yield body

    async def lines_read():
        async for text in lines_of(one_chunk()):
            turns_seen.append(ticks)
            yield text

    settings = make_settings()
    other_work = asyncio.create_task(ticker())
    try:
        result = await manage.import_codes(
            pool,
            read_rows(lines_read(), "csv"),
            rules=settings.bins,
            client_ids=settings.client_ids,
            now=utcnow(),
            step_timeout_s=settings.admin_db_timeout_s,
        )
    finally:
        other_work.cancel()
    expected = {"valid rows": (count, 0), "rejected rows": (0, count), "blank lines": (0, 0)}[lines]
    assert (result.imported, result.rejected_count) == expected
    assert len(turns_seen) == count + 1  # and the header
    # The most lines read one after the other while no other task ran:
    longest = max(len(list(lines_in_one_turn)) for _, lines_in_one_turn in itertools.groupby(turns_seen))
    assert longest <= YIELD_EVERY_LINES


async def test_an_ndjson_import_streams_many_rows(client, admin_headers, pool):
    count = 20_000
    lines = (
        orjson.dumps(
            {"payment_code": f"8896510{n:09d}", "amount": 1000 + n, "invoice_number": f"INV-{n}",
             "customer_name": "Pelanggan", "client_id": CLIENT_ID}
        )
        for n in range(count)
    )  # fmt: skip
    body = b"\n".join(lines) + b"\n"
    response = await client.post(
        "/v1/payment-codes/import",
        data=body,
        headers=admin_headers | {"Content-Type": "application/x-ndjson"},
    )
    result = await response.json()
    assert (result["imported"], result["rejected_count"]) == (count, 0)
    assert await pool.fetchval("SELECT count(*) FROM payment_codes") == count
    assert (
        await pool.fetchval("SELECT amount FROM payment_codes WHERE payment_code = '8896510000019999'")
        == 20999
    )


async def test_an_import_with_a_bad_header_imports_nothing(client, admin_headers, pool):
    body = csv_of(
        ["8896500000000001,1000,INV-1,Budi"], header="payment_code,ammount,invoice_number,customer_name"
    )
    response = await client.post(
        "/v1/payment-codes/import", data=body, headers=admin_headers | {"Content-Type": "text/csv"}
    )
    assert response.status == 400
    assert "unknown column(s) 'ammount'" in (await response.json())["error"]["message"]
    assert await pool.fetchval("SELECT count(*) FROM payment_codes") == 0


@pytest.mark.parametrize(("body", "fmt"), [(b"", "csv"), (b"", "ndjson")])
async def test_an_empty_import_is_refused(client, admin_headers, body, fmt):
    response = await client.post(
        "/v1/payment-codes/import", params={"format": fmt}, data=body, headers=admin_headers
    )
    assert response.status == 400
    assert "empty" in (await response.json())["error"]["message"]


async def test_an_import_needs_a_known_format(client, admin_headers):
    response = await client.post(
        "/v1/payment-codes/import",
        data=b"x",
        headers=admin_headers | {"Content-Type": "application/octet-stream"},
    )
    assert response.status == 400
    assert (await response.json())["error"]["code"] == "BAD_REQUEST"
