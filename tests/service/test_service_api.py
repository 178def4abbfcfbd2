"""The scoring API against a real redis-server: published users score exactly as the in-process model,
cold start through the meta generator with write-back, click events, and every bad input -> 4xx naming
the field (never a 500)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from service.redis_layout import TAG_META, RedisLayout

LAYOUT = RedisLayout()


def wait_for(predicate, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def known_items(artifact, n: int) -> list[str]:
    return artifact.schema.items.tokens[2:2 + n]  # the item vocabulary, after <pad> and <oov>


def user_row(users, with_history: bool = True) -> int:
    return int(np.argmax(users["history_len"])) if with_history else int(np.argmin(users["history_len"]))


@pytest.mark.backends
def test_published_user_scores_equal_in_process_onnx(client, artifact, users):
    row = user_row(users)
    user_id = str(users["user_ids"][row])
    candidates = known_items(artifact, 20) + ["never-seen-item"]
    response = client.post("/v1/score", json={"user_id": user_id, "candidates": candidates, "top_k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    idx, unknown = artifact.encode_items(candidates)
    history = users["history_idx"][row][: users["history_len"][row]]
    expected = artifact.score(users["user_vec"][row], users["udg_vec"][row], history, idx)
    np.testing.assert_allclose(body["scores"], expected, rtol=0, atol=1e-6)
    assert body["model_version"] == "v1" and body["cold_start"] is False
    assert body["unknown_candidates"] == ["never-seen-item"]
    order = np.argsort(-expected, kind="stable")[:5]
    assert body["ranking"] == [candidates[i] for i in order]
    assert len(body["scores"]) == len(candidates)


def test_full_ranking_without_top_k_and_request_order(client, artifact, users):
    candidates = known_items(artifact, 10)[::-1]
    body = client.post("/v1/score", json={"user_id": str(users["user_ids"][0]), "candidates": candidates}).json()
    assert sorted(body["ranking"]) == sorted(candidates)
    by_id = dict(zip(candidates, body["scores"], strict=True))
    assert [by_id[c] for c in body["ranking"]] == sorted(body["scores"], reverse=True)


@pytest.mark.backends
def test_unseen_user_with_profile_gets_meta_embedding_written_back(client, redis_client, artifact):
    profile = {"cohort": "a1", "sex": "F", "segment": "o3"}
    assert (artifact.encode_profile(profile) > artifact.oov_index).all()  # values the model knows
    candidates = known_items(artifact, 8)
    body = client.post("/v1/score", json={"user_id": "new-user", "candidates": candidates,
                                          "profile": profile}).json()
    assert body["cold_start"] is True
    user_vec, udg_vec = artifact.cold_start(artifact.encode_profile(profile))
    idx, _ = artifact.encode_items(candidates)
    expected = artifact.score(user_vec, udg_vec, np.zeros(0, np.int64), idx)
    np.testing.assert_allclose(body["scores"], expected, atol=1e-6)

    key = LAYOUT.embeddings("v1", "new-user")
    wait_for(lambda: redis_client.exists(key))
    raw = redis_client.get(key)
    assert raw.endswith(TAG_META)
    stored_user, stored_udg, made_by_meta = LAYOUT.unpack_embeddings(raw, artifact.user_dim, artifact.udg_dim)
    assert made_by_meta
    np.testing.assert_allclose(stored_udg[0], udg_vec, atol=1e-7)
    np.testing.assert_allclose(stored_user[0], user_vec, atol=1e-7)
    assert redis_client.exists(LAYOUT.profile("new-user"))
    # the next request reads the written-back state (still flagged as a cold-start embedding)
    again = client.post("/v1/score", json={"user_id": "new-user", "candidates": candidates}).json()
    assert again["cold_start"] is True and again["scores"] == body["scores"]


def test_unseen_user_without_profile_uses_fallback_and_is_not_written_back(client, redis_client, artifact):
    body = client.post("/v1/score", json={"user_id": "anonymous", "candidates": known_items(artifact, 4)})
    assert body.status_code == 200 and body.json()["cold_start"] is True
    user_vec, udg_vec = artifact.cold_start(artifact.encode_profile({}))
    expected = artifact.score(user_vec, udg_vec, [], artifact.encode_items(known_items(artifact, 4))[0])
    np.testing.assert_allclose(body.json()["scores"], expected, atol=1e-6)
    client.portal.call(client.app.state.services.scorer.drain)  # every write-back the request started is done
    assert not redis_client.exists(LAYOUT.embeddings("v1", "anonymous"))


def test_stored_profile_is_used_for_cold_start(client, redis_client, artifact):
    profile = {"cohort": "a2", "sex": "M", "segment": "o1"}
    assert client.post("/v1/events", json={"user_id": "evt-user", "item_id": known_items(artifact, 1)[0],
                                           "clicked": False, "profile": profile}).status_code == 200
    body = client.post("/v1/score", json={"user_id": "evt-user", "candidates": known_items(artifact, 3)}).json()
    user_vec, udg_vec = artifact.cold_start(artifact.encode_profile(profile))
    expected = artifact.score(user_vec, udg_vec, [], artifact.encode_items(known_items(artifact, 3))[0])
    np.testing.assert_allclose(body["scores"], expected, atol=1e-6)


@pytest.mark.backends
def test_event_changes_the_next_score(client, redis_client, artifact, users):
    row = user_row(users, with_history=False)
    user_id = str(users["user_ids"][row])
    candidates = known_items(artifact, 12)
    before = client.post("/v1/score", json={"user_id": user_id, "candidates": candidates}).json()["scores"]
    clicked = candidates[3]
    reply = client.post("/v1/events", json={"user_id": user_id, "item_id": clicked, "clicked": True, "ts": 1000})
    assert reply.status_code == 200 and reply.json()["appended"] == 1
    after = client.post("/v1/score", json={"user_id": user_id, "candidates": candidates}).json()["scores"]
    assert before != after
    history = LAYOUT.split_history(redis_client.get(LAYOUT.history(user_id)), 10**4)
    assert history[0] == clicked
    hist_idx, _ = artifact.encode_items(history[: artifact.max_history])
    expected = artifact.score(users["user_vec"][row], users["udg_vec"][row], hist_idx,
                              artifact.encode_items(candidates)[0])
    np.testing.assert_allclose(after, expected, atol=1e-6)
    # a retried delivery (same item and ts) is not counted twice; a later click is
    again = client.post("/v1/events", json={"user_id": user_id, "item_id": clicked, "clicked": True, "ts": 1000})
    assert again.json() == {"accepted": 1, "appended": 0, "duplicates": 1, "not_clicked": 0, "refused": [],
                            "event_ids": [None]}
    assert LAYOUT.split_history(redis_client.get(LAYOUT.history(user_id)), 10**4) == history


@pytest.mark.backends
def test_event_batch_orders_by_ts_and_creates_unknown_users(client, redis_client, artifact):
    items = known_items(artifact, 3)
    events = [{"user_id": "fresh", "item_id": items[0], "clicked": True, "ts": 30},
              {"user_id": "fresh", "item_id": items[1], "clicked": True, "ts": 10},
              {"user_id": "fresh", "item_id": items[2], "clicked": False, "ts": 20},
              {"user_id": "other", "item_id": items[2], "clicked": True}]
    reply = client.post("/v1/events/batch", json={"events": events})
    assert reply.status_code == 200
    answer = reply.json()
    assert answer.pop("event_ids")[:3] == [None, None, None]  # the ts-less event got a server-assigned id
    assert answer == {"accepted": 4, "appended": 3, "duplicates": 0, "not_clicked": 1, "refused": []}
    assert LAYOUT.split_history(redis_client.get(LAYOUT.history("fresh")), 10**4) == [items[0], items[1]]
    assert LAYOUT.split_history(redis_client.get(LAYOUT.history("other")), 9) == [items[2]]
    body = client.post("/v1/score", json={"user_id": "fresh", "candidates": items}).json()
    assert body["cold_start"] is True


def test_history_is_bounded(make_client, published, redis_client, artifact):
    client = make_client(history_cap=5)
    items = known_items(artifact, 8)
    events = [{"user_id": "heavy", "item_id": item, "clicked": True, "ts": i} for i, item in enumerate(items)]
    assert client.post("/v1/events/batch", json={"events": events}).status_code == 200
    assert LAYOUT.split_history(redis_client.get(LAYOUT.history("heavy")), 10**4) == items[::-1][:5]


@pytest.mark.backends
def test_health_ready_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_version"] == "v1"
    client.post("/v1/score", json={"user_id": "m", "candidates": ["i1", "i2"]})
    text = client.get("/metrics").text
    for name in ("udg_request_seconds_bucket", "udg_stage_seconds_bucket", "udg_redis_seconds_bucket",
                 "udg_candidates_scored_total", "udg_cold_starts_total", "udg_errors_total"):
        assert name in text, name
    assert any('route="/v1/score"' in line and 'model_version="v1"' in line
               for line in text.splitlines() if line.startswith("udg_request_seconds_count"))


def test_activation_refused_without_publish_marker(make_client, redis_client):
    client = make_client(wait_ready=False)
    registry = client.app.state.services.registry
    deadline = time.monotonic() + 10
    while "publish marker" not in (registry.last_error or ""):  # the activation was tried and refused
        assert time.monotonic() < deadline, registry.last_error
        time.sleep(0.01)
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "publish marker" in " ".join(ready.json()["reasons"])
    reply = client.post("/v1/score", json={"user_id": "u", "candidates": ["i1"]})
    assert reply.status_code == 503 and reply.json()["error"] == "model_unavailable"


BIG = [f"i{i}" for i in range(51)]
BAD_SCORE_BODIES = [
    ({"candidates": ["i1"]}, 422, "user_id"),
    ({"user_id": 7, "candidates": ["i1"]}, 422, "user_id"),
    ({"user_id": "", "candidates": ["i1"]}, 422, "user_id"),
    ({"user_id": "u"}, 422, "candidates"),
    ({"user_id": "u", "candidates": []}, 422, "candidates"),
    ({"user_id": "u", "candidates": "i1"}, 422, "candidates"),
    ({"user_id": "u", "candidates": ["i1", 2]}, 422, "candidates.1"),
    ({"user_id": "u", "candidates": ["i1", None]}, 422, "candidates.1"),
    ({"user_id": "u", "candidates": BIG}, 422, "candidates"),
    ({"user_id": "u", "candidates": ["i1", "i2", "i1"]}, 422, "candidates.2"),
    ({"user_id": "u", "candidates": ["i1"], "top_k": 0}, 422, "top_k"),
    ({"user_id": "u", "candidates": ["i1"], "top_k": "3"}, 422, "top_k"),
    ({"user_id": "u", "candidates": ["i1"], "top_k": 2.5}, 422, "top_k"),
    ({"user_id": "u", "candidates": ["i1"], "profile": ["a"]}, 422, "profile"),
    ({"user_id": "u", "candidates": ["i1"], "profile": {"cohort": None}}, 422, "profile.cohort"),
    ({"user_id": "u", "candidates": ["i1"], "profile": {"cohort": True}}, 422, "profile.cohort"),
    ({"user_id": "u", "candidates": ["i1"], "profile": {"cohort": {"x": 1}}}, 422, "profile.cohort"),
    ({"user_id": "u", "candidates": ["i1"], "profile": {"shoe_size": "42"}}, 422, "profile.shoe_size"),
    ({"user_id": "u", "candidates": ["i1"], "candidate": ["i2"]}, 422, "candidate"),
]
RAW_SCORE_BODIES = [
    (b'{"user_id": "u", "candidates": ["i1"], "profile": {"cohort": NaN}}', 422, "profile.cohort"),
    (b'{"user_id": "u", "candidates": ["i1"], "profile": {"cohort": Infinity}}', 422, "profile.cohort"),
    (b'{"user_id": "u", "candidates": ["i1"], "profile": {"cohort": 1e999}}', 422, "profile.cohort"),
    (b'{"user_id": "u", "candidates": ["i1"]', 400, "body"),
    (b"", 400, "body"),
    (b"[]", 422, "body"),
    (b"null", 422, "body"),
    (b'"text"', 422, "body"),
    (b"\xff\xfe garbage", 400, "body"),
    (b'{"user_id": "u", "candidates": ["' + b"x" * 300 + b'"]}', 422, "candidates.0"),
]


@pytest.mark.parametrize(("body", "status", "field"), BAD_SCORE_BODIES)
def test_bad_score_requests(client, body, status, field):
    reply = client.post("/v1/score", json=body)
    assert reply.status_code == status, reply.text
    payload = reply.json()
    assert payload["field"] == field, payload
    assert payload["message"]


@pytest.mark.parametrize(("raw", "status", "field"), RAW_SCORE_BODIES)
def test_bad_raw_score_bodies(client, raw, status, field):
    reply = client.post("/v1/score", content=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code == status, reply.text
    assert reply.json()["field"] == field


def test_oversized_body_is_413(make_client, published):
    client = make_client(max_body_bytes=2048)
    body = {"user_id": "u", "candidates": [f"item-{i:05d}" for i in range(40)], "profile": {"cohort": "x" * 1500}}
    reply = client.post("/v1/score", json=body)
    assert reply.status_code == 413 and reply.json()["field"] == "body"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b"x" * 1000

    reply = client.post("/v1/score", content=chunks())
    assert reply.status_code == 413


BAD_EVENTS = [
    ({"item_id": "i1", "clicked": True}, "user_id"),
    ({"user_id": "u", "clicked": True}, "item_id"),
    ({"user_id": "u", "item_id": "i1"}, "clicked"),
    ({"user_id": "u", "item_id": "i1", "clicked": "yes"}, "clicked"),
    ({"user_id": "u", "item_id": "i1", "clicked": 1}, "clicked"),
    ({"user_id": "u", "item_id": "a\x1fb", "clicked": True}, "item_id"),
    ({"user_id": "u", "item_id": "", "clicked": True}, "item_id"),
    ({"user_id": "u", "item_id": "i1", "clicked": True, "ts": -5}, "ts"),
    ({"user_id": "u", "item_id": "i1", "clicked": True, "ts": "yesterday"}, "ts"),
    ({"user_id": "u", "item_id": "i1", "clicked": True, "extra": 1}, "extra"),
]


@pytest.mark.parametrize(("body", "field"), BAD_EVENTS)
def test_bad_events(client, redis_client, body, field):
    reply = client.post("/v1/events", json=body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["field"] == field
    assert not redis_client.exists(LAYOUT.history("u"))


def test_bad_event_batches(client):
    assert client.post("/v1/events/batch", json={"events": []}).json()["field"] == "events"
    reply = client.post("/v1/events/batch", json={"events": [{"user_id": "u", "item_id": "i", "clicked": True},
                                                             {"user_id": "u", "clicked": True}]})
    assert reply.status_code == 422 and reply.json()["field"] == "events.1.item_id"
    many = {"events": [{"user_id": "u", "item_id": "i", "clicked": True}] * 1001}
    assert client.post("/v1/events/batch", json=many).json()["field"] == "events"


def test_event_profiles_are_checked_against_the_serving_schema(client, redis_client):
    """A profile field no serving version has is refused with 422 naming it, and nothing of the batch is stored."""
    reply = client.post("/v1/events", json={"user_id": "pf", "item_id": "i1", "clicked": True,
                                            "profile": {"shoe_size": "42"}})
    assert reply.status_code == 422 and reply.json()["field"] == "profile.shoe_size"
    batch = {"events": [{"user_id": "pf", "item_id": "i1", "clicked": True},
                        {"user_id": "pf", "item_id": "i2", "clicked": True, "profile": {"cohort": "a1", "x": "1"}}]}
    reply = client.post("/v1/events/batch", json=batch)
    assert reply.status_code == 422 and reply.json()["field"] == "events.1.profile.x"
    assert not redis_client.exists(LAYOUT.history("pf"))
    ok = client.post("/v1/events", json={"user_id": "pf", "item_id": "i1", "clicked": True,
                                         "profile": {"cohort": "a1"}})
    assert ok.status_code == 200 and ok.json()["appended"] == 1


def test_unknown_routes_and_methods_are_json(client):
    assert client.get("/v1/nothing").json()["error"] == "not_found"
    reply = client.get("/v1/score")
    assert reply.status_code == 405 and reply.json()["error"] == "method_not_allowed"


def test_openapi_lists_the_active_versions_profile_fields(client):
    document = client.get("/openapi.json").json()
    assert "v1" in document["info"]["description"]
    body = document["components"]["schemas"]["ScoreRequest"]
    profile = body["properties"]["profile"]["anyOf"][0]
    assert list(profile["properties"]) == ["cohort", "sex", "segment"] and profile["additionalProperties"] is False
    assert "a1" in profile["properties"]["cohort"]["examples"]
    event = document["components"]["schemas"]["Event"]
    assert list(event["properties"]["profile"]["anyOf"][0]["properties"]) == ["cohort", "sex", "segment"]
    assert client.get("/docs").status_code == 200
