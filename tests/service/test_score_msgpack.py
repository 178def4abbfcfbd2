"""POST /v1/score in msgpack (`application/msgpack`, service/api/bodies.py), on the FastAPI route and on the fast
path: the same answer as JSON, chosen by Content-Type and Accept; a body that is not msgpack is a 400 naming the
body, a wrong type a 422 naming the field, as in JSON; another Content-Type is a 415 naming it; errors stay JSON."""

from __future__ import annotations

import msgpack
import numpy as np
import orjson
import pytest

from tests.service.test_service_api import BAD_SCORE_BODIES, known_items

MSGPACK = "application/msgpack"


@pytest.fixture(params=[False, True], ids=["route", "fast-path"])
def client(request, make_client, published):
    return make_client(fast_score_path=request.param)


def post_msgpack(client, body, accept: str | None = MSGPACK, raw: bytes | None = None):
    headers = {"Content-Type": MSGPACK, **({"Accept": accept} if accept else {})}
    return client.post("/v1/score", content=msgpack.packb(body) if raw is None else raw, headers=headers)


def test_a_msgpack_round_trip_scores_as_json(client, users, artifact):
    body = {"user_id": str(users["user_ids"][0]), "candidates": [*known_items(artifact, 7), "never-seen"],
            "top_k": 4}
    as_json = client.post("/v1/score", json=body)
    reply = post_msgpack(client, body)
    assert reply.status_code == 200 and reply.headers["content-type"] == MSGPACK
    answer = msgpack.unpackb(reply.content)
    expected = as_json.json()
    # msgpack carries the float32 scores as float32; JSON writes the same float32 values in decimal
    np.testing.assert_array_equal(np.float32(answer.pop("scores")), np.float32(expected.pop("scores")))
    assert answer == expected and answer["unknown_candidates"] == ["never-seen"] and len(answer["ranking"]) == 4


def test_accept_chooses_the_answers_format(client, users, artifact):
    body = {"user_id": str(users["user_ids"][0]), "candidates": known_items(artifact, 3)}
    packed = msgpack.packb(body)
    cases = [  # (Content-Type, Accept) -> the answer's Content-Type
        ((MSGPACK, None), MSGPACK),  # no Accept: the request's format
        ((MSGPACK, "*/*"), MSGPACK),
        ((MSGPACK, "application/json"), "application/json"),
        (("application/json", MSGPACK), MSGPACK),
        (("application/json", "application/json;q=0.5, application/msgpack"), MSGPACK),
        (("application/json", "application/msgpack;q=0.2, application/json;q=0.9"), "application/json"),
        (("application/json; charset=utf-8", "text/html"), "application/json"),  # neither named: JSON
    ]
    for (content_type, accept), answered in cases:
        content = packed if content_type == MSGPACK else orjson.dumps(body)
        headers = {"Content-Type": content_type, **({"Accept": accept} if accept else {})}
        reply = client.post("/v1/score", content=content, headers=headers)
        assert reply.status_code == 200, (content_type, accept, reply.text)
        assert reply.headers["content-type"] == answered, (content_type, accept)
        scores = msgpack.unpackb(reply.content)["scores"] if answered == MSGPACK else reply.json()["scores"]
        assert len(scores) == 3


@pytest.mark.parametrize("raw", [b"", b"\xc1", b"\x82\xa7user_id", msgpack.packb({"user_id": "u"}) + b"\x00",
                                 b"\x81\xa1\xff\x01"], ids=["empty", "reserved-byte", "truncated", "trailing-bytes",
                                                          "invalid-utf8"])
def test_a_body_that_is_not_msgpack_is_a_400_naming_the_body(client, raw):
    reply = post_msgpack(client, None, raw=raw)
    assert reply.status_code == 400, reply.text
    assert reply.headers["content-type"] == "application/json"  # errors are JSON whatever was asked
    payload = reply.json()
    assert payload["error"] == "invalid_msgpack" and payload["field"] == "body" and "msgpack" in payload["message"]


@pytest.mark.parametrize(("body", "status", "field"), [
    *BAD_SCORE_BODIES,
    ({"user_id": b"bytes", "candidates": ["i1"]}, 422, "user_id"),  # msgpack bin is not a string
    ({"user_id": "u", "candidates": ["i1", b"i2"]}, 422, "candidates.1"),
    ({"user_id": "u", "candidates": ["i1"], "top_k": float("nan")}, 422, "top_k"),
    ({"user_id": "u", "candidates": ["i1"], "profile": {"cohort": float("inf")}}, 422, "profile.cohort"),
    ({"user_id": "u", "candidates": ["i1"], 7: "x"}, 422, "7"),
    (["u", ["i1"]], 422, "body"),
])
def test_wrong_types_are_the_same_422_naming_the_field(client, body, status, field):
    reply = post_msgpack(client, body)
    assert reply.status_code == status, reply.text
    assert reply.json()["field"] == field and reply.json()["message"]


def test_another_content_type_is_a_415_naming_it(client, users):
    body = b'{"user_id": "u", "candidates": ["i1"]}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/xml"):
        reply = client.post("/v1/score", content=body, headers={"Content-Type": content_type})
        assert reply.status_code == 415, (content_type, reply.text)
        payload = reply.json()
        assert payload["error"] == "unsupported_media_type" and payload["field"] == "Content-Type"
        assert content_type in payload["message"] and MSGPACK in payload["message"]
    # no Content-Type at all (or an empty one): JSON, as before
    known = body.replace(b'"u"', f'"{users["user_ids"][0]}"'.encode())
    for headers in ({}, {"Content-Type": ""}):
        reply = client.post("/v1/score", content=known, headers=headers)
        assert reply.status_code == 200 and reply.headers["content-type"] == "application/json", headers


def test_the_openapi_document_declares_msgpack_and_the_415(client):
    operation = client.get("/openapi.json").json()["paths"]["/v1/score"]["post"]
    ref = {"$ref": "#/components/schemas/ScoreRequest"}
    assert operation["requestBody"]["content"] == {"application/json": {"schema": ref}, MSGPACK: {"schema": ref}}
    answers = operation["responses"]
    assert set(answers["200"]["content"]) == {"application/json", MSGPACK}
    assert answers["200"]["content"][MSGPACK]["schema"] == {"$ref": "#/components/schemas/ScoreResponse"}
    assert answers["415"]["content"] == {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
