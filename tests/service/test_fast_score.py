"""The score route's fast path (UDG_FAST_SCORE_PATH, service/fast_score.py) answers exactly as the FastAPI route:
the same status, headers and body for good and bad requests, the same metrics and 500 handling, the same
OpenAPI document. The other contract tests (tests/service/test_service_api.py, test_observability_logs.py,
test_service_faults.py, the schemathesis run) also pass with UDG_FAST_SCORE_PATH=true in the environment."""

from __future__ import annotations

import re

import msgpack
import pytest

from service.fast_score import FastScore
from tests.service.test_service_api import BAD_SCORE_BODIES, RAW_SCORE_BODIES, known_items


def requests_to_compare(users, artifact) -> list[dict]:
    """(method, headers, content) of score requests touching every branch of the route, published users only
    (a cold start writes back state, which would make the second client's answer differ)."""
    user = str(users["user_ids"][0])
    items = known_items(artifact, 6)
    json_headers = {"Content-Type": "application/json"}
    good = [
        {"user_id": user, "candidates": items},
        {"user_id": user, "candidates": [*items, "never-seen-item"], "top_k": 3},
        {"user_id": user, "candidates": items[:1], "model_version": "v1"},
    ]
    out = [{"content": msgpack.packb(body) if packed else orjson_bytes(body),
            "headers": {"Content-Type": "application/msgpack", "Accept": "application/msgpack"} if packed
            else json_headers} for body in good for packed in (False, True)]
    out += [{"content": orjson_bytes(good[0]), "headers": {**json_headers, "X-Model-Version": "v9"}},  # 409
            {"content": orjson_bytes(good[0]), "headers": {"Content-Type": "text/plain"}},  # 415
            {"content": orjson_bytes(good[0]), "headers": {"Accept": "application/msgpack"}},  # no Content-Type
            {"content": b"\xc1", "headers": {"Content-Type": "application/msgpack"}},  # 400
            {"content": b"x" * 5000, "headers": json_headers}]  # 413 (max_body_bytes below)
    out += [{"content": orjson_bytes(body), "headers": json_headers} for body, _, _ in BAD_SCORE_BODIES]
    out += [{"content": raw, "headers": json_headers} for raw, _, _ in RAW_SCORE_BODIES]
    return out


def orjson_bytes(body) -> bytes:
    import orjson

    return orjson.dumps(body)


def http_responses(client, status: int) -> float:
    found = re.search(rf'udg_http_responses_total{{route="/v1/score",status="{status}"}} (\S+)',
                      client.get("/metrics").text)
    return float(found.group(1)) if found else 0.0


@pytest.fixture
def both(make_client, published):
    """The route as FastAPI serves it, and the fast path, over the same Redis and model."""
    settings = {"max_body_bytes": 4096}
    return make_client(fast_score_path=False, **settings), make_client(fast_score_path=True, **settings)


def test_the_fast_path_answers_exactly_as_the_route(both, users, artifact):
    route, fast = both
    assert isinstance(fast.app.middleware_stack, FastScore)
    assert not isinstance(route.app.middleware_stack, FastScore)
    seen = set()
    for i, request in enumerate(requests_to_compare(users, artifact)):
        headers = {**request["headers"], "X-Request-ID": f"cmp-{i}"}
        a = route.post("/v1/score", content=request["content"], headers=headers)
        b = fast.post("/v1/score", content=request["content"], headers=headers)
        assert (b.status_code, list(b.headers.items()), b.content) == \
               (a.status_code, list(a.headers.items()), a.content), request
        seen.add((a.status_code, a.headers["content-type"]))
    assert seen == {(200, "application/json"), (200, "application/msgpack"), *((status, "application/json")
                    for status in (400, 409, 413, 415, 422))}
    chunks = [b"x" * 1000] * 10  # no Content-Length: the limit is enforced while reading, both ways
    assert fast.post("/v1/score", content=iter(chunks)).json() == route.post("/v1/score", content=iter(chunks)).json()
    assert fast.get("/openapi.json").json() == route.get("/openapi.json").json()
    assert fast.get("/v1/score").status_code == 405  # every other request goes through FastAPI's stack


def test_the_fast_path_counts_times_and_logs_as_the_route(both, users, artifact):
    _, fast = both
    body = {"user_id": str(users["user_ids"][1]), "candidates": known_items(artifact, 4)}
    before = http_responses(fast, 200), http_responses(fast, 422)
    seconds_before = re.findall(r'udg_request_seconds_count{model_version="v1",route="/v1/score"} (\S+)',
                                fast.get("/metrics").text)
    assert fast.post("/v1/score", json=body).status_code == 200
    assert fast.post("/v1/score", json={**body, "top_k": 0}).status_code == 422
    assert (http_responses(fast, 200), http_responses(fast, 422)) == (before[0] + 1, before[1] + 1)
    seconds_after = re.findall(r'udg_request_seconds_count{model_version="v1",route="/v1/score"} (\S+)',
                               fast.get("/metrics").text)
    assert float(seconds_after[0]) == float(seconds_before[0] if seconds_before else 0) + 1
    generated = fast.post("/v1/score", json=body).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}", generated)  # generated when the client sent none


def test_a_bug_is_a_500_with_the_request_id_on_both(both, users, caplog, monkeypatch):
    body = {"user_id": str(users["user_ids"][0]), "candidates": ["1", "2"]}
    answers = []
    for client in both:
        async def broken(*args, **kwargs):
            raise RuntimeError("a bug")

        monkeypatch.setattr(client.app.state.services.scorer, "score", broken)
        reply = client.post("/v1/score", json=body, headers={"X-Request-ID": "bug-1"})
        answers.append((reply.status_code, list(reply.headers.items()), reply.content))
    assert answers[0] == answers[1] and answers[0][0] == 500
    assert dict(answers[0][1])["x-request-id"] == "bug-1"
