"""The OpenAPI document is the contract: every `$ref` resolves, every status a route answers is documented
with the error body, request schemas say what is validated. Schemathesis (dev extra) checks the running
service against it in tests/service/test_service_e2e.py."""

from __future__ import annotations


def resolve(document: dict, ref: str) -> dict:
    assert ref.startswith("#/"), ref
    node = document
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"unresolvable $ref {ref}"
        node = node[part]
    return node


def refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("$ref"), str):
            yield node["$ref"]
        for value in node.values():
            yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def request_schema(document: dict, path: str) -> dict:
    schema = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return resolve(document, schema["$ref"]) if "$ref" in schema else schema


def test_every_ref_resolves_and_lives_under_components(client):
    document = client.get("/openapi.json").json()
    found = list(refs(document))
    assert found
    for ref in found:
        assert ref.startswith("#/components/schemas/"), ref
        resolve(document, ref)
    assert "$defs" not in str(document)


def test_every_route_documents_its_errors(client):
    document = client.get("/openapi.json").json()
    error = {"$ref": "#/components/schemas/ErrorBody"}
    expected = {("/v1/score", "post"): {"200", "400", "409", "413", "422", "503"},
                ("/v1/events", "post"): {"200", "400", "413", "422", "503"},
                ("/v1/events/batch", "post"): {"200", "400", "413", "422", "503"},
                ("/v1/admin/split", "post"): {"200", "401", "403", "404", "409", "413", "422", "503"},
                ("/readyz", "get"): {"200", "503"}}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            assert {"400", "408", "431", "503"} <= set(answers), (path, method)
            assert expected.get((path, method), set()) <= set(answers), (path, method, sorted(answers))
            for status, answer in answers.items():
                if int(status) >= 400 and path != "/readyz":
                    assert answer["content"] == {"application/json": {"schema": error}}, (path, status)
                if status == "200" and path != "/metrics":
                    assert "$ref" in answer["content"]["application/json"]["schema"], (path, method)
    assert set(document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    body = resolve(document, "#/components/schemas/ErrorBody")
    assert set(body["required"]) == {"error", "message", "field", "details"}


def test_request_schemas_match_validation(client):
    document = client.get("/openapi.json").json()
    score = request_schema(document, "/v1/score")
    candidates = score["properties"]["candidates"]
    assert candidates["uniqueItems"] is True and candidates["minItems"] == 1 and candidates["maxItems"] == 50
    event = request_schema(document, "/v1/events")
    ts = event["properties"]["ts"]["anyOf"][0]
    assert ts["type"] == "number" and ts["minimum"] == 0 and ts["maximum"] == 1e13
    batch = request_schema(document, "/v1/events/batch")
    assert batch["properties"]["events"]["items"] == {"$ref": "#/components/schemas/Event"}
    # the served version's profile fields, in every request body that takes a profile
    for schema in (score, event):
        profile = schema["properties"]["profile"]["anyOf"][0]
        assert profile["additionalProperties"] is False and profile["properties"]
        for field in profile["properties"].values():
            assert {"type": "number"} in field["anyOf"]
    # what the schema calls invalid is refused, what it calls valid is accepted
    assert client.post("/v1/events", json={"user_id": "u", "item_id": "i", "clicked": True, "ts": {}}
                       ).status_code == 422
    assert client.post("/v1/score", json={"user_id": "u", "candidates": ["a", "a"]}).status_code == 422
