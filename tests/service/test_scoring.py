"""`service.scoring.Scorer` driven directly (no HTTP) against a real redis-server: the ranking, the cold-start
paths and their write-back, the TTL refresh of generated state, new items, the checks, and the counters."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from service import metrics, scoring
from service.api.schemas import ScoreRequest
from service.errors import InvalidField, ServiceUnavailable
from service.feature_store import FeatureStore, FeatureStoreUnavailable, create_redis
from service.redis_layout import TAG_META, RedisLayout
from service.registry import ServingModel

LAYOUT = RedisLayout()


def value(counter, *labels) -> float:
    return (counter.labels(*labels) if labels else counter)._value.get()


def known(artifact, n: int) -> list[str]:
    return artifact.schema.items.tokens[2:2 + n]


def run(redis_server, artifact, requests, scorer_options=None, store_setup=None, model=None):
    """Score each request (dict of ScoreRequest fields) with one Scorer; -> (answers, scorer, model), after
    every background task finished."""
    model = model or ServingModel(artifact, "sha")

    async def main():
        store = FeatureStore(create_redis(redis_server.url, 2.0, 4), LAYOUT)
        if store_setup:
            store_setup(store)
        scorer = scoring.Scorer(store, **(scorer_options or {}))
        answers = []
        try:
            for request in requests:
                try:
                    answers.append(await scorer.score(model, ScoreRequest(**request),
                                                      scoring.StageTimer(time.perf_counter())))
                except Exception as error:  # the test looks at it
                    answers.append(error)
            await scorer.drain()
        finally:
            await store.close()
        return answers, scorer

    answers, scorer = asyncio.run(main())
    return answers, scorer, model


def test_a_published_user_scores_with_their_state_and_is_ranked(redis_server, published, artifact, users):
    row = int(np.argmax(users["history_len"]))
    user = str(users["user_ids"][row])
    candidates = known(artifact, 9)
    (full, top, one), _, _ = run(redis_server, artifact, [
        {"user_id": user, "candidates": candidates},
        {"user_id": user, "candidates": candidates, "top_k": 3},
        {"user_id": user, "candidates": candidates[:1]}])
    history, _ = artifact.encode_items(users["history"][row][:users["history_len"][row]].tolist())
    expected = artifact.score(users["user_vec"][row], users["udg_vec"][row], history,
                              artifact.encode_items(candidates)[0])
    np.testing.assert_allclose(full["scores"], expected, atol=1e-6)
    assert full["ranking"] == [candidates[i] for i in np.argsort(-expected, kind="stable")]
    assert top["ranking"] == full["ranking"][:3]  # the top 3 in order, not just any 3
    np.testing.assert_allclose(top["scores"], expected, atol=1e-6)  # scores stay in request order
    assert one["ranking"] == candidates[:1]
    assert (full["model_version"], full["cold_start"], full["unknown_candidates"], full["warmup_steps"]) == (
        "v1", False, [], 0)


def test_ties_rank_in_request_order_with_and_without_top_k(redis_server, published, artifact, users, monkeypatch):
    monkeypatch.setattr(artifact, "score", lambda *a: np.array([0.5, 0.9, 0.5, 0.5, 0.1], np.float32))
    user = str(users["user_ids"][0])
    candidates = known(artifact, 5)
    (full, top), _, _ = run(redis_server, artifact, [{"user_id": user, "candidates": candidates},
                                                     {"user_id": user, "candidates": candidates, "top_k": 4}])
    order = [candidates[i] for i in (1, 0, 2, 3, 4)]
    assert full["ranking"] == order and top["ranking"] == order[:4]


def test_unknown_candidates_are_listed_and_counted_with_new_items_scored_by_features(redis_server, published,
                                                                                      artifact, users):
    user = str(users["user_ids"][0])
    model = ServingModel(artifact, "sha")
    model.new_items = {"fresh-1": np.array([3], np.int64)}
    before = [value(metrics.UNKNOWN_CANDIDATES, "v1"), value(metrics.NEW_ITEM_CANDIDATES, "v1"),
              value(metrics.CANDIDATES, "v1")]
    candidates = [*known(artifact, 2), "fresh-1", "fresh-2"]
    (answer,), _, _ = run(redis_server, artifact, [{"user_id": user, "candidates": candidates}], model=model)
    assert answer["unknown_candidates"] == ["fresh-1", "fresh-2"]
    assert [value(metrics.UNKNOWN_CANDIDATES, "v1"), value(metrics.NEW_ITEM_CANDIDATES, "v1"),
            value(metrics.CANDIDATES, "v1")] == [before[0] + 2, before[1] + 1, before[2] + 4]
    idx, _ = artifact.encode_items(candidates)
    fields = artifact.candidate_fields(idx, candidates, model.new_items)
    history = users["history"][0][:users["history_len"][0]].tolist()
    expected = artifact.score(users["user_vec"][0], users["udg_vec"][0], artifact.encode_items(history)[0], idx,
                              fields)
    np.testing.assert_allclose(answer["scores"], expected, atol=1e-6)
    assert answer["scores"][2] != answer["scores"][3]  # fresh-1 has its category, fresh-2 none


def test_only_known_candidates_count_nothing_unknown(redis_server, published, artifact, users):
    model = ServingModel(artifact, "sha")
    model.new_items = {"fresh-1": np.array([3], np.int64)}
    before = value(metrics.NEW_ITEM_CANDIDATES, "v1"), value(metrics.UNKNOWN_CANDIDATES, "v1")
    run(redis_server, artifact, [{"user_id": str(users["user_ids"][0]), "candidates": ["fresh-9"]}], model=model)
    assert (value(metrics.NEW_ITEM_CANDIDATES, "v1"), value(metrics.UNKNOWN_CANDIDATES, "v1")) == (
        before[0], before[1] + 1)  # unknown, and without features of its own


def test_a_request_profile_cold_starts_and_is_written_back(redis_server, redis_client, artifact):
    profile = {"cohort": "a1", "sex": "F", "segment": "o3"}
    before = value(metrics.COLD_STARTS, "v1", "request"), value(metrics.GENERATED_USERS, "written")
    (answer, again), _, _ = run(redis_server, artifact, [
        {"user_id": "new", "candidates": known(artifact, 4), "profile": profile},
        {"user_id": "new", "candidates": known(artifact, 4)}])
    user_vec, udg_vec = artifact.cold_start(artifact.encode_profile(profile))
    np.testing.assert_allclose(answer["scores"], artifact.score(user_vec, udg_vec, [], artifact.encode_items(
        known(artifact, 4))[0]), atol=1e-6)
    assert answer["cold_start"] is True and answer["warmup_steps"] == 0
    assert redis_client.get(LAYOUT.embeddings("v1", "new")).endswith(TAG_META)
    assert LAYOUT.unpack_profile(redis_client.get(LAYOUT.profile("new"))) == profile
    assert again["cold_start"] is True  # read back (or generated again): still a generated state
    np.testing.assert_array_equal(again["scores"], answer["scores"])
    assert (value(metrics.COLD_STARTS, "v1", "request"), value(metrics.GENERATED_USERS, "written")) == (
        before[0] + 1, before[1] + 1)


def test_a_stored_profile_cold_starts_and_writes_back_embeddings_only(redis_server, redis_client, artifact):
    redis_client.set(LAYOUT.profile("stored"), LAYOUT.pack_profile({"sex": "M", "zodiac": "leo"}))
    before = value(metrics.COLD_STARTS, "v1", "stored")
    (answer,), _, _ = run(redis_server, artifact, [{"user_id": "stored", "candidates": known(artifact, 3)}])
    user_vec, udg_vec = artifact.cold_start(artifact.encode_profile({"sex": "M"}))  # fields of this version only
    np.testing.assert_allclose(answer["scores"], artifact.score(user_vec, udg_vec, [], artifact.encode_items(
        known(artifact, 3))[0]), atol=1e-6)
    assert value(metrics.COLD_STARTS, "v1", "stored") == before + 1
    assert redis_client.exists(LAYOUT.embeddings("v1", "stored"))
    assert redis_client.ttl(LAYOUT.profile("stored")) == -1  # the stored profile is not rewritten with a TTL


def test_no_profile_scores_the_average_new_user_and_writes_nothing(redis_server, redis_client, artifact):
    redis_client.set(LAYOUT.profile("other-fields"), LAYOUT.pack_profile({"zodiac": "leo"}))
    before = value(metrics.COLD_STARTS, "v1", "none")
    answers, _, _ = run(redis_server, artifact, [{"user_id": "anon", "candidates": known(artifact, 3)},
                                                 {"user_id": "other-fields", "candidates": known(artifact, 3)}])
    user_vec, udg_vec = artifact.cold_start(artifact.encode_profile({}))
    for answer in answers:
        np.testing.assert_allclose(answer["scores"], artifact.score(user_vec, udg_vec, [], artifact.encode_items(
            known(artifact, 3))[0]), atol=1e-6)
    assert value(metrics.COLD_STARTS, "v1", "none") == before + 2
    assert not redis_client.exists(LAYOUT.embeddings("v1", "anon"), LAYOUT.embeddings("v1", "other-fields"))


def test_write_back_off_scores_the_same_and_writes_nothing(redis_server, redis_client, artifact):
    profile = {"cohort": "a1"}
    (answer,), _, _ = run(redis_server, artifact, [{"user_id": "n2", "candidates": known(artifact, 2),
                                                    "profile": profile}], {"write_back": False})
    assert answer["cold_start"] is True and not redis_client.exists(LAYOUT.embeddings("v1", "n2"))


def test_a_capped_write_back_is_counted_and_a_failed_one_fails_nothing(redis_server, redis_client, artifact):
    capped = value(metrics.GENERATED_USERS, "capped")
    layout = RedisLayout(generated_cap=0)

    def cap(store):
        store.layout = layout

    run(redis_server, artifact, [{"user_id": "c1", "candidates": known(artifact, 2), "profile": {"sex": "F"}}],
        store_setup=cap)
    assert value(metrics.GENERATED_USERS, "capped") == capped + 1 and not redis_client.exists(
        layout.embeddings("v1", "c1"))

    failures = value(metrics.WRITE_BACK_FAILURES)

    def refuse(store):
        async def fail(*args):
            raise FeatureStoreUnavailable("Redis write_back failed: refused")
        store.store_generated = fail

    (answer,), _, _ = run(redis_server, artifact, [{"user_id": "c2", "candidates": known(artifact, 2),
                                                    "profile": {"sex": "F"}}], store_setup=refuse)
    assert answer["cold_start"] is True and value(metrics.WRITE_BACK_FAILURES) == failures + 1


def test_a_generated_state_in_use_has_its_ttl_pushed_back_once_per_tenth(redis_server, redis_client, artifact):
    profile = {"sex": "F"}
    run(redis_server, artifact, [{"user_id": "g", "candidates": known(artifact, 2), "profile": profile}])
    key = LAYOUT.embeddings("v1", "g")
    redis_client.expire(key, 100)
    redis_client.expire(LAYOUT.profile("g"), 100)
    _, scorer, _ = run(redis_server, artifact, [{"user_id": "g", "candidates": known(artifact, 2)}])
    assert redis_client.ttl(key) > 1000 and redis_client.ttl(LAYOUT.profile("g")) > 1000  # refreshed
    assert list(scorer._refreshed) == [("v1", "g")]

    refreshed = []

    def count(store):
        async def refresh(version, user):
            refreshed.append(user)
        store.refresh_generated = refresh

    run(redis_server, artifact, [{"user_id": "g", "candidates": known(artifact, 2)}] * 3, store_setup=count)
    assert refreshed == ["g"]  # once, not per request
    run(redis_server, artifact, [{"user_id": "g", "candidates": known(artifact, 2)}], {"write_back": False},
        store_setup=count)
    assert refreshed == ["g"]  # without write-back nothing is refreshed either


def test_refreshes_again_after_a_tenth_of_the_ttl_and_bounds_its_memory(redis_server, artifact, monkeypatch):
    scorer = scoring.Scorer(FeatureStore(None, RedisLayout(generated_ttl_s=100)))
    spawned = []
    monkeypatch.setattr(scorer, "_spawn", lambda coroutine: spawned.append(coroutine.close()))
    now = [1000.0]
    monkeypatch.setattr(scoring.time, "monotonic", lambda: now[0])
    scorer._maybe_refresh("v1", "u")
    now[0] += 9.9
    scorer._maybe_refresh("v1", "u")
    assert len(spawned) == 1
    now[0] += 0.1  # a tenth of the TTL (10 s) since the refresh
    scorer._maybe_refresh("v1", "u")
    assert len(spawned) == 2
    monkeypatch.setattr(scoring, "REFRESHED_KEEP", 3)
    for user in ("a", "b"):
        scorer._maybe_refresh("v1", user)
    assert len(scorer._refreshed) == 3
    scorer._maybe_refresh("v1", "c")  # full: forgotten, then this one remembered
    assert list(scorer._refreshed) == [("v1", "c")]


def test_a_failed_refresh_is_logged_not_raised(redis_server, artifact, caplog, monkeypatch):
    from service.ratelog import RateLimitedLog

    monkeypatch.setattr(scoring, "_WRITE_BACK_LOG", RateLimitedLog(scoring.log))  # no earlier line's window

    async def main():
        scorer = scoring.Scorer(FeatureStore(None, LAYOUT))

        async def fail(version, user):
            raise FeatureStoreUnavailable("Redis refresh failed: down")
        scorer.store.refresh_generated = fail
        await scorer._refresh("v1", "u")

    asyncio.run(main())
    assert [r.getMessage() for r in caplog.records if r.name == "service.scoring"] == [
        "TTL refresh of generated state failed: Redis refresh failed: down"]


def test_a_warmed_state_reports_its_steps(redis_server, redis_client, published, artifact, users):
    user = str(users["user_ids"][0])
    key = LAYOUT.embeddings("v1", user)
    vectors = redis_client.get(key)[:-1]
    redis_client.set(key, vectors + (7).to_bytes(4, "little") + b"P" + b"W")
    (answer,), _, _ = run(redis_server, artifact, [{"user_id": user, "candidates": known(artifact, 2)}])
    assert answer["warmup_steps"] == 7 and answer["cold_start"] is False


def test_lost_state_is_a_503_not_a_cold_start(redis_server, published, artifact, users):
    def lost(store):
        store.state_lost = lambda: "the data epoch changed"

    (error,), _, _ = run(redis_server, artifact, [{"user_id": str(users["user_ids"][0]),
                                                   "candidates": known(artifact, 2)}], store_setup=lost)
    assert isinstance(error, ServiceUnavailable) and error.kind == "state_lost"
    assert str(error) == "the data epoch changed" and error.headers == {"Retry-After": "5"}


def test_an_encoding_failure_cancels_the_fetch(redis_server, artifact, monkeypatch):
    fetches = []

    def broken(ids):
        raise RuntimeError("encoding broke")

    async def main():
        store = FeatureStore(create_redis(redis_server.url, 2.0, 2), LAYOUT)
        original = store.fetch

        async def fetch(version, user):
            try:
                return await original(version, user)
            except asyncio.CancelledError:
                fetches.append("cancelled")
                raise
        store.fetch = fetch
        try:
            with pytest.raises(RuntimeError, match="encoding broke"):
                await scoring.Scorer(store).score(ServingModel(artifact, "sha"), ScoreRequest(
                    user_id="u", candidates=["i1"]), scoring.StageTimer(time.perf_counter()))
            await asyncio.sleep(0.05)
        finally:
            await store.close()

    monkeypatch.setattr(artifact, "encode_items", broken)
    asyncio.run(main())
    assert fetches == ["cancelled"]


def test_candidate_checks_name_the_offending_slot():
    scoring.check_candidates(["a", "b"], 2)
    with pytest.raises(InvalidField, match="candidates: 3 candidates, at most 2 per request") as error:
        scoring.check_candidates(["a", "b", "c"], 2)
    assert error.value.field == "candidates"
    with pytest.raises(InvalidField, match=r"candidates.3: duplicate of candidates.1 \('b'\)") as error:
        scoring.check_candidates(["a", "b", "c", "b", "a"], 10)
    assert error.value.field == "candidates.3"


def test_profile_checks_name_the_field_and_count_unknown_values(artifact):
    model = ServingModel(artifact, "sha")
    with pytest.raises(InvalidField, match=r"profile.zodiac: unknown profile field; version v1 has the fields") as e:
        scoring.check_profile(model, {"sex": "F", "zodiac": "leo"})
    assert e.value.field == "profile.zodiac"
    before = value(metrics.PROFILE_OOV, "v1", "segment")
    scoring.check_profile(model, {"segment": "never-seen", "sex": "F"})
    scoring.check_profile(model, None)
    assert value(metrics.PROFILE_OOV, "v1", "segment") == before + 1


def test_stage_timer_accumulates_per_stage_and_flushes_into_the_histogram(monkeypatch):
    clock = iter([1.5, 2.0, 4.0])
    monkeypatch.setattr(scoring.time, "perf_counter", lambda: next(clock))
    timer = scoring.StageTimer(1.0)
    timer.mark("encode")
    timer.mark("redis")
    timer.mark("encode")
    assert timer.spent == {"encode": 2.5, "redis": 0.5} and timer.last == 4.0
    before = metrics.STAGE_SECONDS.labels("encode")._sum.get()
    timer.flush()
    assert metrics.STAGE_SECONDS.labels("encode")._sum.get() == pytest.approx(before + 2.5)
    assert set(scoring._stage_children()) == set(scoring.STAGES)


def test_the_micro_batcher_scores_exactly_as_one_call_per_request(redis_server, published, artifact, users):
    from service.batching import MicroBatcher

    class Counting(MicroBatcher):
        calls = 0

        async def score(self, *args, **kwargs):
            Counting.calls += 1
            return await super().score(*args, **kwargs)

    model = ServingModel(artifact, "sha")
    model.new_items = {"fresh-1": np.array([3], np.int64)}  # its features must reach the batcher too
    requests = [{"user_id": str(users["user_ids"][0]), "candidates": [*known(artifact, 3), "fresh-1", "fresh-2"]},
                {"user_id": "cold", "candidates": known(artifact, 2), "profile": {"sex": "F"}}]
    plain, _, _ = run(redis_server, artifact, requests, {"write_back": False}, model=model)
    batch, _, _ = run(redis_server, artifact, requests, {"write_back": False, "batcher": Counting(0.001)},
                      model=model)
    assert Counting.calls == 2
    for one, many in zip(plain, batch, strict=True):
        np.testing.assert_allclose(many["scores"], one["scores"], rtol=1e-5, atol=1e-6)
        assert many["ranking"] == one["ranking"]


def test_with_tracing_the_stage_marks_become_spans(monkeypatch):
    spans = []
    monkeypatch.setattr(scoring.tracing, "ENABLED", True)
    monkeypatch.setattr(scoring.tracing, "stage_spans", spans.append)
    clock = iter([2.0, 3.0])
    monkeypatch.setattr(scoring.time, "perf_counter", lambda: next(clock))
    timer = scoring.StageTimer(1.0)
    timer.mark("redis")
    timer.mark("model")
    timer.flush()
    assert spans == [[("start", 1.0), ("redis", 2.0), ("model", 3.0)]]
    monkeypatch.setattr(scoring.tracing, "ENABLED", False)
    assert scoring.StageTimer(1.0).marks is None


def test_a_failed_write_back_logs_the_user_and_the_reason(redis_server, artifact, caplog, monkeypatch):
    from service.ratelog import RateLimitedLog

    monkeypatch.setattr(scoring, "_WRITE_BACK_LOG", RateLimitedLog(scoring.log))

    def refuse(store):
        async def fail(*args):
            raise FeatureStoreUnavailable("Redis write_back failed: refused")
        store.store_generated = fail

    run(redis_server, artifact, [{"user_id": "c3", "candidates": known(artifact, 2), "profile": {"sex": "F"}}],
        store_setup=refuse)
    assert [r.getMessage() for r in caplog.records if r.name == "service.scoring"] == [
        "cold-start write-back for user 'c3' failed (it will be regenerated): Redis write_back failed: refused"]
