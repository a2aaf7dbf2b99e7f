"""The published contract is the product's: JSON Schemas fit what we send, OpenAPI lists what we serve."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import yaml
from jsonschema import Draft202012Validator, ValidationError
from referencing import Registry, Resource

from server.app import make_app
from server.schemas import schemas_dir
from tests.conftest import CODE, OTHER_CLIENT_ID, make_settings, spec_example


def _registry() -> Registry:
    resources = []
    for entry in schemas_dir().joinpath("json").iterdir():
        document = orjson.loads(entry.read_bytes())
        resources.append((document["$id"], Resource.from_contents(document)))
    return Registry().with_resources(resources)


REGISTRY = _registry()


def validate(schema_name: str, document: Any) -> None:
    schema = REGISTRY.contents(f"https://dipc.dev/schemas/{schema_name}.schema.json")
    Draft202012Validator(schema, registry=REGISTRY).validate(document)


def test_the_spec_examples_fit_our_schemas():
    validate("inquiry-request", orjson.loads(spec_example("inquiry-alfa.json")))
    validate("inquiry-request", orjson.loads(spec_example("inquiry-indomaret.json")))
    validate("inquiry-response", orjson.loads(spec_example("inquiry-response-success.json")))


def test_a_broken_answer_does_not_fit():
    broken = orjson.loads(spec_example("inquiry-response-success.json"))
    broken["order"]["amount"] = "150000"
    with pytest.raises(ValidationError):
        validate("inquiry-response", broken)


async def test_every_kind_of_inquiry_answer_fits_the_schema(doku, register, pool):
    await register()
    await register(payment_code="8896512345678124", invoice_number="TOP", reusable=True, info2="x", info3="y")
    await register(payment_code="8896512345678125", invoice_number="OTHER", client_id=OTHER_CLIENT_ID)
    replies = [
        await doku.inquiry(CODE),
        await doku.inquiry("8896512345678124"),
        await doku.inquiry("8896512345678125"),
        await doku.inquiry("8896599999999999"),
        await doku.inquiry(CODE, channel="INDOMARET"),
        await doku.post("/doku/inquiry", b"not json"),
        await doku.post("/doku/inquiry", b"{}"),
        await doku.inquiry(CODE, request_id="r" * 200),
    ]
    assert {reply.status for reply in replies} == {200, 400, 404}
    for reply in replies:
        validate("inquiry-response", reply.json())


async def test_admin_documents_and_errors_fit_their_schemas(client, register, admin_headers):
    validate("payment-code", await register(expires_at="2099-01-01T00:00:00Z"))
    listing = await (await client.get("/v1/payment-codes", headers=admin_headers)).json()
    for item in listing["items"]:
        validate("payment-code", item)
    for response in (
        await client.get("/v1/payment-codes/1", headers=admin_headers),
        await client.post("/v1/payment-codes", json={"amount": 0}, headers=admin_headers),
        await client.get("/v1/payment-codes"),
    ):
        assert response.status >= 400
        validate("error", await response.json())


def test_the_openapi_document_lists_exactly_the_routes_we_serve(database_url):
    document = yaml.safe_load(schemas_dir().joinpath("openapi.yaml").read_text())
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "patch", "put", "delete")
    }
    app = make_app(make_settings(), database_url)
    served = set()
    for route in app.router.routes():
        resource = route.resource
        if route.method in ("HEAD", "*") or resource is None:
            continue  # "*": DOKU's paths refuse every other method in DOKU's shape
        info = resource.get_info()
        if "app" in info:  # the /v1 sub-application
            for sub_route in info["app"].router.routes():
                if sub_route.method != "HEAD":
                    served.add((sub_route.method, sub_route.resource.canonical))
        else:
            served.add((route.method, resource.canonical))
    assert documented == served


def test_the_openapi_document_is_valid_openapi_with_resolvable_references():
    from openapi_spec_validator import validate
    from openapi_spec_validator.readers import read_from_filename

    spec, base_uri = read_from_filename(str(schemas_dir().joinpath("openapi.yaml")))
    validate(spec, base_uri=base_uri)


async def test_exceptions_and_the_audit_trail_fit_their_schemas(client, doku, register, admin_headers):
    await register()
    for ref, amount in (("a", 150000), ("b", 150000), ("c", 1)):
        await doku.notify(CODE, invoice_number="INV-2026-000123", amount=amount, original_request_id=ref)
    await doku.inquiry(CODE)
    await doku.post("/doku/notification", b"\xff not json")
    listing = await (await client.get("/v1/exceptions", headers=admin_headers)).json()
    assert len(listing["items"]) == 2
    for item in listing["items"]:
        validate("exception", item)
    resolved = await client.post(
        f"/v1/exceptions/{listing['items'][0]['payment_id']}/resolve",
        json={"resolution": "refunded", "resolved_by": "finance", "note": "", "reference": "RF-1"},
        headers=admin_headers,
    )
    validate("exception", await resolved.json())
    events = await (await client.get("/v1/events", headers=admin_headers)).json()
    for event in events["items"]:
        validate("event", event)
    assert "exception.resolved" in {event["type"] for event in events["items"]}
    for path, schema in (("/v1/inquiries", "inquiry-record"), ("/v1/notifications", "notification-record")):
        page = await (await client.get(path, headers=admin_headers)).json()
        assert page["items"]
        for item in page["items"]:
            validate(schema, item)
    for response in (
        await client.post("/v1/exceptions/1/resolve", json={}, headers=admin_headers),
        await client.get("/v1/exceptions?state=x", headers=admin_headers),
        await client.get("/v1/inquiries?after=x", headers=admin_headers),
    ):
        assert response.status >= 400
        validate("error", await response.json())
