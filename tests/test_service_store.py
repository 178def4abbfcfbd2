"""Feature store and publish against a real redis-server: key layout and codecs, one-command fetch, the click
script (order, bound, retry dedup), publish idempotency, completion marker, shared keys kept; settings."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.feature_store import (
    SEP,
    TAG_META,
    TAG_PUBLISHED,
    Click,
    FeatureStore,
    Keys,
    create_redis,
    pack_embeddings,
    split_history,
    unpack_embeddings,
)
from service.publish import PublishError, publish

KEYS = Keys()


def run(coroutine_factory, url: str, history_cap: int = 200):
    async def main():
        store = FeatureStore(create_redis(url, 1.0, 4), KEYS, history_cap)
        try:
            return await coroutine_factory(store)
        finally:
            await store.close()
    return asyncio.run(main())


def test_codecs_round_trip():
    user, udg = np.arange(8, dtype=np.float32), -np.arange(4, dtype=np.float32)
    raw = pack_embeddings(user, udg, TAG_META)
    assert len(raw) == 4 * 12 + 1
    u, g, meta = unpack_embeddings(raw, 8, 4)
    assert meta and np.array_equal(u[0], user) and np.array_equal(g[0], udg)
    assert unpack_embeddings(raw, 8, 5) is None and unpack_embeddings(None, 8, 4) is None
    assert split_history(SEP.join(["a", "b", "c"]).encode(), 2) == ["a", "b"]
    assert split_history(b"", 5) == [] and split_history(None, 5) == []


def test_keys_share_the_users_hash_tag():
    for key in (KEYS.embeddings("v1", "u:1"), KEYS.history("u:1"), KEYS.profile("u:1"), KEYS.dedup("u:1")):
        assert key.endswith("{u:1}")


def test_publish_writes_layout_marker_and_fetches_in_one_command(redis_client, redis_server, model_repo, users):
    result = publish(model_repo / "v1", redis_client, progress=False)
    assert result.users == len(users["user_ids"])
    marker = redis_client.get(KEYS.marker("v1"))
    assert marker and b"manifest_sha256" in marker
    row = int(np.argmax(users["history_len"]))
    uid = str(users["user_ids"][row])
    redis_client.config_resetstat()
    state = run(lambda store: store.fetch("v1", uid), redis_server.url)
    stats = redis_client.info("commandstats")
    connection = ("cmdstat_config", "cmdstat_info", "cmdstat_hello", "cmdstat_client")  # handshake, this test
    assert {k for k in stats if not k.startswith(connection)} == {"cmdstat_mget"}
    assert stats["cmdstat_mget"]["calls"] == 1
    u, g, meta = unpack_embeddings(state.embeddings, users["user_vec"].shape[1], users["udg_vec"].shape[1])
    assert not meta and state.embeddings.endswith(TAG_PUBLISHED)
    np.testing.assert_array_equal(u[0], users["user_vec"][row])
    np.testing.assert_array_equal(g[0], users["udg_vec"][row])
    length = users["history_len"][row]
    assert split_history(state.history, 100) == users["history"][row][:length].tolist()
    assert state.profile


def test_publish_is_idempotent_and_keeps_live_history(redis_client, model_repo, users):
    publish(model_repo / "v1", redis_client, progress=False)
    first = {k: redis_client.dump(k) for k in redis_client.scan_iter("udg:[ehp]:*")}
    uid = str(users["user_ids"][0])
    redis_client.set(KEYS.history(uid), "live-click")
    publish(model_repo / "v1", redis_client, progress=False)
    second = {k: redis_client.dump(k) for k in redis_client.scan_iter("udg:[ehp]:*")}
    assert second.keys() == first.keys()
    assert redis_client.get(KEYS.history(uid)) == b"live-click"  # shared state kept (SET NX)
    assert all(second[k] == first[k] for k in first if k != KEYS.history(uid).encode())
    publish(model_repo / "v1", redis_client, progress=False, overwrite_shared=True)
    assert redis_client.get(KEYS.history(uid)) != b"live-click"


def test_interrupted_publish_leaves_no_marker(redis_client, model_repo, users):
    publish(model_repo / "v1", redis_client, progress=False)
    broken = dict(users)
    broken["user_vec"] = users["user_vec"][:, :3]
    with pytest.raises(PublishError):
        publish(model_repo / "v1", redis_client, progress=False, users=broken)

    class Boom(RuntimeError):
        pass

    real = redis_client.pipeline

    def failing_pipeline(*args, **kwargs):
        raise Boom()

    redis_client.pipeline = failing_pipeline
    try:
        with pytest.raises(Boom):
            publish(model_repo / "v1", redis_client, progress=False)
    finally:
        redis_client.pipeline = real
    assert not redis_client.exists(KEYS.marker("v1"))


def test_append_clicks_orders_bounds_and_deduplicates(redis_client, redis_server):
    async def scenario(store):
        first = await store.append_clicks({"u": ([Click("a", 1), Click("b", 2), Click("c", None)], None)})
        again = await store.append_clicks({"u": ([Click("b", 2), Click("d", 3)], {"gender": "F"}),
                                           "w": ([Click("z", None)], None)})
        return first, again

    first, again = run(scenario, redis_server.url, history_cap=3)
    assert first == {"u": [1, 1, 1]} and again == {"u": [0, 1], "w": [1]}
    assert redis_client.get(KEYS.history("u")).decode().split(SEP) == ["d", "c", "b"]
    assert redis_client.get(KEYS.profile("u")) == b'{"gender":"F"}'
    assert redis_client.ttl(KEYS.dedup("u")) > 0


def test_settings_from_environment(monkeypatch):
    from service.settings import Settings

    monkeypatch.setenv("REDIS_URL", "rediss://user:s3cret@cache.example:6380/2")
    monkeypatch.setenv("UDG_MODEL_REPO", "/models")
    monkeypatch.setenv("UDG_MODEL_VERSION", "2024-06-01a")
    monkeypatch.setenv("UDG_ADMIN_TOKEN", "adm1n-s3cret")
    monkeypatch.setenv("UDG_ORT_THREADS", "2")
    settings = Settings()
    assert settings.redis_url.startswith("rediss://") and settings.max_candidates == 2000
    assert settings.redis_url_for_logs() == "rediss://user:***@cache.example:6380/2"
    assert str(settings.model_repo) == "/models" and settings.model_version == "2024-06-01a"
    assert settings.admin_token.get_secret_value() == "adm1n-s3cret" and "s3cret" not in repr(settings)
    assert settings.ort_threads == 2 and settings.cuda_graph
    monkeypatch.setenv("UDG_CUDA_GRAPH", "0")
    assert Settings().cuda_graph is False
    monkeypatch.setenv("UDG_MODEL_VERSION", "../etc")
    with pytest.raises(ValueError):
        Settings()
    monkeypatch.setenv("UDG_MODEL_VERSION", "v1")
    monkeypatch.setenv("REDIS_URL", "http://x")
    with pytest.raises(ValueError):
        Settings()


def test_password_protected_redis(model_repo):
    from service.local_redis import RedisServer, free_port
    from service.publish import sync_redis
    from tests.conftest import REDIS_BINARY

    server = RedisServer(REDIS_BINARY, free_port(), password="s3cret").start()
    try:
        assert publish(model_repo / "v1", sync_redis(server.url), progress=False).users > 0
        assert run(lambda store: store.marker("v1"), server.url)["version"] == "v1"
    finally:
        server.cleanup()
