"""Guards that protect state, each pinned by a test that fails when the guard is removed: `udg gc` keeps
split arms and versions a live worker holds; activation refuses a publish marker from another artifact; a
cold-start write-back never replaces a published state; publishing in chunks writes every user whatever the
chunk size; a worker started after an admin change serves the routing document, not its configuration."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import orjson
import pytest

from service.redis_layout import RedisLayout
from tests import versions_repo


@pytest.fixture(scope="module")
def repo(model_repo, tmp_path_factory):
    return versions_repo.build(model_repo, tmp_path_factory.mktemp("guards") / "repo")


def test_gc_keeps_split_arms_and_versions_held_by_a_live_worker(redis_client, repo):
    from service.control import ControlKeys, garbage_collect

    versions_repo.publish_all(repo, redis_client)  # v1 v2 v3 bad-checksum bad-graph bad-golden
    keys = ControlKeys()
    redis_client.set(keys.routing, orjson.dumps({"generation": 3, "active": "v1", "split": {"v1": 90, "v2": 10},
                                                 "loaded": ["v1"], "history": []}))
    pipe = redis_client.pipeline()
    now_ms = int(time.time() * 1000)
    keys.queue_heartbeat(pipe, "host:1:a", orjson.dumps({"worker": "host:1:a", "active": "v1", "ready": ["v1", "v3"]}),
                         15_000, now_ms)
    keys.queue_heartbeat(pipe, "host:2:b", orjson.dumps({"worker": "host:2:b", "active": "bad-golden", "ready": []}),
                         15_000, now_ms)
    pipe.execute()
    result = garbage_collect(redis_client, min_age_s=0)
    assert result["kept"] == {"v1": "active", "v2": "split arm", "v3": "loaded by worker host:1:a",
                              "bad-golden": "loaded by worker host:2:b"}
    assert sorted(result["removed"]) == ["bad-checksum", "bad-graph"]
    stored = RedisLayout().stored_versions(redis_client)
    assert {"v1", "v2", "v3", "bad-golden"} <= set(stored) and "bad-graph" not in stored

    # once the heartbeat expires (the worker is gone) and the split ends, those versions are collected
    redis_client.delete(keys.worker("host:1:a"), keys.worker("host:2:b"))
    redis_client.set(keys.routing, orjson.dumps({"generation": 4, "active": "v1", "split": None,
                                                 "loaded": ["v1"], "history": []}))
    assert sorted(garbage_collect(redis_client, min_age_s=0)["removed"]) == ["bad-golden", "v2", "v3"]


def test_activation_refuses_a_marker_published_from_another_artifact(redis_server, redis_client, repo):
    from service.feature_store import FeatureStore, create_redis
    from service.registry import ModelRegistry, VersionRefused

    versions_repo.publish_all(repo, redis_client)
    layout = RedisLayout()
    stale = layout.unpack_marker(redis_client.get(layout.marker("v2")))
    stale["manifest_sha256"] = "0" * 64  # v2's state in Redis came from a different build of v2
    layout.write_marker(redis_client, "v2", stale)

    async def scenario():
        store = FeatureStore(create_redis(redis_server.url, 1.0, 4), layout)
        registry = ModelRegistry(repo, store)
        try:
            assert (await registry.ensure_loaded("v1")).version == "v1"  # an intact marker loads
            with pytest.raises(VersionRefused) as refused:
                await registry.ensure_loaded("v2")
            assert refused.value.version == "v2" and refused.value.reason == (
                "the state in Redis was published from a different artifact (manifest sha256 differs); "
                "publish this one again")
            assert "v2" not in registry.models and registry.failed["v2"].reason == refused.value.reason
            with pytest.raises(VersionRefused) as unpublished:  # no marker at all: the command to run
                await registry.ensure_loaded("no-marker")
            assert unpublished.value.version == "no-marker" and unpublished.value.reason == (
                f"no publish marker in Redis; run `udg publish {repo / 'no-marker'}` first")
        finally:
            registry.close()
            await store.close()

    asyncio.run(scenario())


def test_cold_start_write_back_never_replaces_a_published_state(redis_server, redis_client, published, users):
    from service.feature_store import create_redis

    layout = RedisLayout()
    user = str(users["user_ids"][0])
    before_state = redis_client.get(layout.embeddings("v1", user))
    before_profile = redis_client.get(layout.profile(user))
    assert before_state is not None and before_profile is not None
    generated = layout.pack_embeddings(np.ones((1, users["user_vec"].shape[1]), np.float32),
                                       np.ones((1, users["udg_vec"].shape[1]), np.float32))

    async def write():
        redis = create_redis(redis_server.url, 1.0, 2)
        try:
            return [await layout.write_generated(redis, "v1", u, generated, {"gender": "zz"}) for u in (user, "fresh")]
        finally:
            await redis.aclose()

    assert asyncio.run(write()) == [True, True]  # both under the cap
    assert redis_client.get(layout.embeddings("v1", user)) == before_state  # published: untouched
    assert redis_client.get(layout.profile(user)) == before_profile
    assert redis_client.ttl(layout.embeddings("v1", user)) == -1  # and no TTL was put on it
    assert redis_client.get(layout.embeddings("v1", "fresh")) == generated  # an unknown user is written
    assert 0 < redis_client.ttl(layout.embeddings("v1", "fresh")) <= layout.generated_ttl_s
    assert redis_client.get(layout.profile("fresh")) == layout.pack_profile({"gender": "zz"})
    assert 0 < redis_client.ttl(layout.profile("fresh")) <= layout.generated_ttl_s  # a generated profile expires


def test_cold_start_write_backs_are_capped_per_window(redis_server, redis_client):
    from service.feature_store import create_redis

    layout = RedisLayout(generated_cap=2, generated_window_s=3600)
    now = 1_000_000 * 3600 + 10.0  # a fixed instant, far from the clock: the window comes from `now`
    packed = layout.pack_embeddings(np.zeros((1, 2), np.float32), None)

    async def writes():
        redis = create_redis(redis_server.url, 1.0, 2)
        try:
            got = [await layout.write_generated(redis, "v1", f"u{i}", packed, None, now=now) for i in range(3)]
            got.append(await layout.write_generated(redis, "v1", "next", packed, None, now=now + 3600))
            return got
        finally:
            await redis.aclose()

    assert asyncio.run(writes()) == [True, True, False, True]  # the third is over the cap; a new window opens
    assert not redis_client.exists(layout.embeddings("v1", "u2"))
    counter = layout.generated_counter(1_000_000)
    assert redis_client.get(counter) == b"3" and 3600 < redis_client.ttl(counter) <= 7200
    assert redis_client.get(layout.generated_counter(1_000_001)) == b"1"


@pytest.mark.parametrize("chunk", [7, 179, 1])
def test_publish_in_chunks_writes_every_user(redis_client, model_repo, users, chunk):
    from service.publish import publish

    layout = RedisLayout()
    n = len(users["user_ids"])
    assert n > chunk and n % chunk != 0 or chunk == 1  # the last chunk is partial (or every chunk is one user)
    result = publish(model_repo / "v1", redis_client, chunk=chunk, progress=False)
    assert result.users == n == result.marker["users"]
    assert len(list(redis_client.scan_iter(match=layout.embeddings_pattern("v1"), count=1000))) == n
    user_dim, udg_dim = users["user_vec"].shape[1], users["udg_vec"].shape[1]
    for row in (0, chunk - 1, chunk, n - 2, n - 1):  # both sides of a chunk boundary, and the very last user
        raw = redis_client.get(layout.embeddings("v1", str(users["user_ids"][row])))
        user_vec, udg_vec = layout.unpack_embeddings(raw, user_dim, udg_dim)[:2]
        np.testing.assert_array_equal(np.asarray(user_vec).reshape(-1), users["user_vec"][row])
        np.testing.assert_array_equal(np.asarray(udg_vec).reshape(-1), users["udg_vec"][row])


def test_a_restarted_worker_adopts_the_routing_document(redis_server, redis_client, repo, tmp_path):
    from fastapi.testclient import TestClient

    from service.main import create_app
    from tests.conftest import make_settings
    from tests.service.test_versions import wait_for

    versions_repo.publish_all(repo, redis_client)
    token = {"Authorization": "Bearer guard-token"}

    def worker(routing_file):
        # configured for v1, each with a routing file of its own
        return TestClient(create_app(make_settings(redis_server.url, repo, admin_token="guard-token",
                                                   model_version="v1", routing_file=routing_file)))

    with worker(tmp_path / "first.json") as first:
        wait_for(lambda: first.app.state.services.registry.active is not None, timeout_s=30)
        assert first.post("/v1/admin/versions/v3/activate", headers=token).json()["active"] == "v3"
        generation = first.get("/v1/admin/versions", headers=token).json()["routing"]["generation"]
    # the first worker is gone; the document stays in Redis. The new worker has no routing file: only the
    # document can tell it v3, and it must serve v3 from its first answer on
    with worker(tmp_path / "second.json") as second:
        registry = second.app.state.services.registry
        wait_for(lambda: registry.active is not None, timeout_s=30)
        assert registry.active.version == "v3" and registry.routing.generation == generation
        reply = second.post("/v1/score", json={"user_id": "u1", "candidates": ["i1", "i2"]})
        assert reply.status_code == 200 and reply.json()["model_version"] == "v3"


def test_a_private_redis_never_mistakes_another_server_on_its_port_for_itself(redis_server):
    from service.local_redis import RedisServer

    taken = redis_server.port  # a port another redis-server already listens on
    with pytest.raises(RuntimeError, match="busy"):
        RedisServer(redis_server.binary, taken).start(timeout_s=5)
    moved = RedisServer(redis_server.binary, taken).start(timeout_s=5, move_on_clash=True)
    try:
        assert moved.port != taken and moved._answers_as_itself()
    finally:
        moved.cleanup()
