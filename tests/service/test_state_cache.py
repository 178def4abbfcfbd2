"""The worker's hot-user state cache (UDG_STATE_CACHE): a repeated user is scored without a Redis read, and every
write — through another client, this worker's own events, a FLUSHALL — is seen by the next score once Redis's
invalidation message has arrived; a lost or silent invalidation connection empties and bypasses the cache; on a
Redis Cluster it stays off. Real redis-server throughout (the unit part needs none)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.redis_layout import RedisLayout, UserState
from service.state_cache import CLIENT_NAME, StateCache

LAYOUT = RedisLayout()


def wait_for(predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


# --- the bookkeeping alone ----------------------------------------------------------------------------------
def _active_cache(**kwargs) -> StateCache:
    cache = StateCache("udg", **kwargs)
    cache.active = True
    return cache


def test_store_lookup_and_invalidation_by_key():
    cache = _active_cache()
    state = UserState(b"e", b"h", b"p", b"epoch")
    cache.store("v1", "u{1}", True, state, cache.begin())
    assert cache.lookup("v1", "u{1}", True) is state
    assert cache.lookup("v1", "u{1}", False) is None  # read without the epoch copy: another entry
    assert cache.lookup("v2", "u{1}", True) is None
    cache.invalidated([LAYOUT.history("u{1}").encode()])  # the id's own braces: the tag is the outer pair
    assert cache.lookup("v1", "u{1}", True) is None
    cache.store("v1", "a", True, state, cache.begin())
    cache.invalidated([LAYOUT.embeddings("v9", "a").encode()])  # any version's embeddings drop the user
    assert cache.lookup("v1", "a", True) is None


def test_a_read_that_raced_an_invalidation_is_not_stored():
    cache = _active_cache()
    token = cache.begin()  # MGET sent
    cache.invalidated([LAYOUT.profile("u").encode()])  # the write's message arrives before the reply
    cache.store("v1", "u", True, UserState(b"old", None, None), token)
    assert cache.lookup("v1", "u", True) is None
    other = cache.begin()
    cache.invalidated([LAYOUT.profile("someone-else").encode()])
    cache.store("v1", "u", True, UserState(b"new", None, None), other)  # another user's write: kept
    assert cache.lookup("v1", "u", True).embeddings == b"new"


@pytest.mark.parametrize("message", [None, [LAYOUT.slot_sentinel(7).encode()], [b"udg:weird-key"]])
def test_flush_all_epoch_write_or_unknown_key_empties_everything(message):
    cache = _active_cache()
    token = cache.begin()
    cache.store("v1", "a", True, UserState(b"x", None, None), cache.begin())
    cache.invalidated(message)
    assert len(cache) == 0 and cache.lookup("v1", "a", True) is None
    cache.store("v1", "b", True, UserState(b"x", None, None), token)  # read begun before the flush
    assert len(cache) == 0


def test_bounds_inactive_and_age():
    cache = _active_cache(max_users=2, max_age_s=0.05)
    for user in ("a", "b", "c"):
        cache.store("v1", user, False, UserState(user.encode(), None, None), cache.begin())
    assert len(cache) == 2 and cache.lookup("v1", "a", False) is None  # least recently used dropped
    time.sleep(0.06)
    assert cache.lookup("v1", "c", False) is None  # too old: read again
    cache.active = False
    assert cache.begin() is None
    cache.store("v1", "d", False, UserState(b"d", None, None), 0)
    assert cache.lookup("v1", "d", False) is None


# --- over a real Redis, through the service -------------------------------------------------------------------
def _lookups(outcome: str) -> float:
    return REGISTRY.get_sample_value("udg_state_cache_lookups_total", {"outcome": outcome}) or 0.0


def _count_fetches(store) -> list[int]:
    """Counts the user-state reads the worker sends to Redis (the layout's MGET)."""
    calls, fetch = [0], store.layout.fetch

    def counted(*args, **kwargs):
        calls[0] += 1
        return fetch(*args, **kwargs)

    store.layout.fetch = counted
    return calls


@pytest.fixture
def cached_client(make_client, published):
    client = make_client(state_cache=True, state_cache_ping_s=0.2)
    cache = client.app.state.services.store.cache
    wait_for(lambda: cache.active)
    return client, cache


def _score(client, user_id, candidates):
    response = client.post("/v1/score", json={"user_id": user_id, "candidates": candidates})
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["scores"])


def _expected(artifact, user_vec, udg_vec, history, candidates):
    hist_idx, _ = artifact.encode_items(history[: artifact.max_history])
    return artifact.score(user_vec, udg_vec, hist_idx, artifact.encode_items(candidates)[0])


def _history(redis_client, user_id):
    return LAYOUT.split_history(redis_client.get(LAYOUT.history(user_id)), 10**4)


def test_repeated_user_is_served_without_a_redis_read(cached_client, redis_client, artifact, users):
    client, cache = cached_client
    row = int(np.argmax(users["history_len"]))
    user_id, candidates = str(users["user_ids"][row]), list(artifact.schema.items.tokens[2:14])
    reads = _count_fetches(client.app.state.services.store)
    first = _score(client, user_id, candidates)
    assert reads[0] == 1
    hits, counted = cache.stats["hits"], _lookups("hit")
    again = _score(client, user_id, candidates)
    assert reads[0] == 1 and cache.stats["hits"] == hits + 1 and _lookups("hit") == counted + 1
    assert REGISTRY.get_sample_value("udg_state_cache_active") == 1
    np.testing.assert_array_equal(first, again)
    expected = _expected(artifact, users["user_vec"][row], users["udg_vec"][row],
                         _history(redis_client, user_id), candidates)
    np.testing.assert_allclose(again, expected, atol=1e-6)


def test_writes_through_another_client_are_seen_by_the_next_score(cached_client, redis_client, artifact, users):
    client, cache = cached_client
    row = int(np.argmax(users["history_len"]))
    user_id, candidates = str(users["user_ids"][row]), list(artifact.schema.items.tokens[2:14])
    _score(client, user_id, candidates)
    _score(client, user_id, candidates)  # cached now

    # warm-up's kind of write: new embeddings for the serving version
    rng = np.random.default_rng(0)
    user_vec = rng.normal(size=artifact.user_dim).astype(np.float32)
    udg_vec = rng.normal(size=artifact.udg_dim).astype(np.float32)
    seen = cache.stats["invalidations"]
    redis_client.set(LAYOUT.embeddings("v1", user_id), LAYOUT.pack_embeddings(user_vec, udg_vec))
    wait_for(lambda: cache.stats["invalidations"] > seen)  # Redis's message has arrived
    history = _history(redis_client, user_id)
    np.testing.assert_allclose(_score(client, user_id, candidates),
                               _expected(artifact, user_vec, udg_vec, history, candidates), atol=1e-6)

    # an event's kind of write, from outside this worker: the history
    _score(client, user_id, candidates)
    seen = cache.stats["invalidations"]
    history = [candidates[5], *history]
    redis_client.set(LAYOUT.history(user_id), LAYOUT.join_history(history))
    wait_for(lambda: cache.stats["invalidations"] > seen)
    np.testing.assert_allclose(_score(client, user_id, candidates),
                               _expected(artifact, user_vec, udg_vec, history, candidates), atol=1e-6)

    # this worker's own event: dropped locally once acknowledged, before the message
    reply = client.post("/v1/events", json={"user_id": user_id, "item_id": candidates[7], "clicked": True,
                                            "ts": 123})
    assert reply.status_code == 200 and reply.json()["appended"] == 1
    np.testing.assert_allclose(_score(client, user_id, candidates),
                               _expected(artifact, user_vec, udg_vec, _history(redis_client, user_id),
                                         candidates), atol=1e-6)


def test_a_republish_drops_the_cached_users(cached_client, redis_client, model_repo, artifact, users):
    from service.publish import publish

    client, cache = cached_client
    candidates = list(artifact.schema.items.tokens[2:6])
    for row in range(3):
        _score(client, str(users["user_ids"][row]), candidates)
    assert len(cache) == 3
    publish(model_repo / "v1", redis_client, progress=False)  # rewrites every user's embeddings key
    wait_for(lambda: len(cache) == 0)


def test_flushall_empties_the_cache(cached_client, redis_client, artifact, users):
    client, cache = cached_client
    user_id, candidates = str(users["user_ids"][0]), list(artifact.schema.items.tokens[2:6])
    _score(client, user_id, candidates)
    assert len(cache) == 1
    flushes = cache.stats["flushes"]
    redis_client.flushall()
    wait_for(lambda: cache.stats["flushes"] > flushes)
    assert len(cache) == 0
    # the epoch went with the data: the next score answers state_lost rather than cached scores
    response = client.post("/v1/score", json={"user_id": user_id, "candidates": candidates})
    assert response.status_code == 503 and response.json()["error"] == "state_lost"


def _kill_invalidation_connection(redis_client) -> int:
    return int(redis_client.execute_command("CLIENT", "KILL", "ID", _connection_id(redis_client)))


def _connection_id(redis_client) -> int:
    for entry in redis_client.client_list():
        if entry.get("name") == CLIENT_NAME:
            return int(entry["id"])
    raise AssertionError("no invalidation connection")


def test_lost_invalidation_connection_flushes_and_never_serves_stale(cached_client, redis_client, artifact,
                                                                     users):
    client, cache = cached_client
    row = int(np.argmax(users["history_len"]))
    user_id, candidates = str(users["user_ids"][row]), list(artifact.schema.items.tokens[2:14])
    _score(client, user_id, candidates)
    assert len(cache) == 1
    connects = cache.stats["connects"]
    assert _kill_invalidation_connection(redis_client) == 1
    # written while the worker has no invalidation connection: never announced to it
    history = [candidates[2], *_history(redis_client, user_id)]
    redis_client.set(LAYOUT.history(user_id), LAYOUT.join_history(history))
    wait_for(lambda: not cache.active or cache.stats["connects"] > connects)
    assert len(cache) == 0
    expected = _expected(artifact, users["user_vec"][row], users["udg_vec"][row], history, candidates)
    np.testing.assert_allclose(_score(client, user_id, candidates), expected, atol=1e-6)
    wait_for(lambda: cache.active and cache.stats["connects"] > connects)  # back, and tracking again
    np.testing.assert_allclose(_score(client, user_id, candidates), expected, atol=1e-6)
    assert len(cache) == 1


def test_silent_invalidation_connection_turns_the_cache_off(cached_client, redis_client, artifact, users):
    """A connection that stays open but stops answering (here: Redis pauses every client) cannot be trusted to
    deliver invalidations: after 2 silent ping periods the cache is emptied and bypassed."""
    client, cache = cached_client
    _score(client, str(users["user_ids"][0]), list(artifact.schema.items.tokens[2:6]))
    assert len(cache) == 1
    redis_client.execute_command("CLIENT", "PAUSE", 1500, "ALL")
    try:
        wait_for(lambda: not cache.active, timeout_s=1.4)
        assert len(cache) == 0 and REGISTRY.get_sample_value("udg_state_cache_active") == 0
    finally:
        redis_client.execute_command("CLIENT", "UNPAUSE")
    wait_for(lambda: cache.active)


def test_off_by_default(client):
    assert client.app.state.services.store.cache is None


def test_disabled_on_a_cluster(redis_cluster, model_repo, tmp_path, caplog):
    from fastapi.testclient import TestClient

    from service.main import create_app
    from tests.conftest import make_settings

    settings = make_settings(redis_cluster.url, model_repo, state_cache=True, routing_file=tmp_path / "r.json")
    with caplog.at_level("WARNING", logger="udg.service"), TestClient(create_app(settings)) as client:
        assert client.app.state.services.store.cache is None
    assert any("not supported on a Redis Cluster" in record.getMessage() for record in caplog.records)
