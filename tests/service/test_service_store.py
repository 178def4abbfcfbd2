"""Feature store and publish against a real redis-server: key layout and codecs, one-command fetch, the click
script (order, bound, retry dedup), publish idempotency, completion marker, shared keys kept; settings."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest

from service.feature_store import FeatureStore, create_redis
from service.publish import PublishError, publish
from service.redis_client import primaries
from service.redis_layout import LAYOUT_FORMAT, SEP, TAG_META, TAG_PUBLISHED, Click, RedisLayout, key_slot

LAYOUT = RedisLayout()

pytestmark = pytest.mark.backends  # every test here runs on one Redis and on a Redis Cluster


def run(coroutine_factory, url: str, history_cap: int = 200):
    async def main():
        store = FeatureStore(create_redis(url, 1.0, 4), RedisLayout(history_cap=history_cap))
        try:
            return await coroutine_factory(store)
        finally:
            await store.close()
    return asyncio.run(main())


def test_codecs_round_trip():
    user, udg = np.arange(8, dtype=np.float32), -np.arange(4, dtype=np.float32)
    raw = LAYOUT.pack_embeddings(user, udg, TAG_META)
    assert len(raw) == 4 * 12 + 1
    u, g, meta = LAYOUT.unpack_embeddings(raw, 8, 4)
    assert meta and np.array_equal(u[0], user) and np.array_equal(g[0], udg)
    assert LAYOUT.unpack_embeddings(raw, 8, 5) is None and LAYOUT.unpack_embeddings(None, 8, 4) is None
    assert LAYOUT.split_history(SEP.join(["a", "b", "c"]).encode(), 2) == ["a", "b"]
    assert LAYOUT.split_history(b"", 5) == [] and LAYOUT.split_history(None, 5) == []
    rows = LAYOUT.pack_embedding_rows(np.stack([user, user + 1]), np.stack([udg, udg - 1]))
    assert rows[1].tobytes() == LAYOUT.pack_embeddings(user + 1, udg - 1)  # the bulk path packs the same bytes
    assert LAYOUT.unpack_profile(LAYOUT.pack_profile({"gender": "F", "age": ""})) == {"gender": "F"}
    assert LAYOUT.unpack_profile(b"not json") is None and LAYOUT.unpack_profile(b"[1]") is None


def test_byte_format_is_pinned():
    """What is already in Redis must stay readable: the key names and value bytes, written out literally."""
    layout = RedisLayout("udg")
    assert layout.embeddings("v1", "u:1") == "udg:e:v1:{u:1}" and layout.history("u:1") == "udg:h:{u:1}"
    assert layout.profile("u:1") == "udg:p:{u:1}" and layout.dedup("u:1") == "udg:x:{u:1}"
    assert layout.legacy_dedup("u:1") == "udg:d:{u:1}" and layout.embeddings_pattern("v1") == "udg:e:v1:*"
    # layout format 2: the epoch, the markers and the item-table generations in the control slot {ctl}
    assert LAYOUT_FORMAT == 2 and layout.epoch == "udg:{ctl}:epoch" and layout.marker("v1") == "udg:{ctl}:published:v1"
    assert layout.item_generation("v1") == "udg:{ctl}:i:v1:generation" and layout.item_table("v1") == "udg:i:v1:items"
    assert layout.slot_sentinel(0) == "udg:epoch:{3560}" and key_slot(b"udg:epoch:{3560}") == 0
    assert key_slot(layout.epoch_sentinel("u:1").encode()) == key_slot(layout.history("u:1").encode())
    assert RedisLayout("t").history("u") == "t:h:{u}"
    packed = layout.pack_embeddings(np.array([1.0, -2.0], np.float32), np.array([0.5], np.float32))
    assert packed == bytes.fromhex("0000803f" "000000c0" "0000003f") + b"P"
    assert layout.pack_embeddings(np.array([1.0], np.float32), None, TAG_META) == bytes.fromhex("0000803f") + b"M"
    assert layout.join_history(["i3", "i1"]) == "i3\x1fi1"
    # live entries (from events) end with \x1e; old untagged values read the same
    assert layout.split_history(b"i3\x1e\x1fi1\x1fi2", 5) == ["i3", "i1", "i2"]
    assert layout.split_entries(b"i3\x1e\x1fi1") == [("i3", True), ("i1", False)]
    assert layout.pack_profile({"occupation": "x", "age": "25", "gender": ""}) == b'{"age":"25","occupation":"x"}'


def test_keys_share_the_users_hash_tag():
    for key in (LAYOUT.embeddings("v1", "u:1"), LAYOUT.history("u:1"), LAYOUT.profile("u:1"), LAYOUT.dedup("u:1")):
        assert key.endswith("{u:1}")


def test_publish_writes_layout_marker_and_fetches_in_one_command(redis_client, redis_server, model_repo, users):
    result = publish(model_repo / "v1", redis_client, progress=False)
    assert result.users == len(users["user_ids"])
    marker = redis_client.get(LAYOUT.marker("v1"))
    assert marker and b"manifest_sha256" in marker
    row = int(np.argmax(users["history_len"]))
    uid = str(users["user_ids"][row])
    epoch = orjson.loads(marker)["epoch"].encode()

    nodes = primaries(redis_client)

    async def fetch_checking_epoch(store):
        await store.ping()  # a cluster client reads the slot map on its first command: not counted below
        for node in nodes:
            node.config_resetstat()
        store.expected_epoch = epoch  # the epoch's copy in the user's slot comes back in the same MGET
        return await store.fetch("v1", uid)

    state = run(fetch_checking_epoch, redis_server.url)
    assert state.epoch == epoch
    # one MGET, on one node (on a cluster: every key in the user's slot), nothing else but the handshake
    connection = ("cmdstat_config", "cmdstat_info", "cmdstat_hello", "cmdstat_client", "cmdstat_command",
                  "cmdstat_cluster",  # handshake (a cluster client also reads the slot map), this test
                  "cmdstat_replconf", "cmdstat_ping")  # a replica's once-a-second ACK to its primary
    stats = [{k: v for k, v in node.info("commandstats").items() if not k.startswith(connection)} for node in nodes]
    assert sorted(stat.get("cmdstat_mget", {}).get("calls", 0) for stat in stats)[-2:] == [0, 1][-len(nodes):]
    assert [set(stat) for stat in stats if stat] == [{"cmdstat_mget"}]
    u, g, meta = LAYOUT.unpack_embeddings(state.embeddings, users["user_vec"].shape[1], users["udg_vec"].shape[1])
    assert not meta and state.embeddings.endswith(TAG_PUBLISHED)
    np.testing.assert_array_equal(u[0], users["user_vec"][row])
    np.testing.assert_array_equal(g[0], users["udg_vec"][row])
    length = users["history_len"][row]
    assert LAYOUT.split_history(state.history, 100) == users["history"][row][:length].tolist()
    assert state.profile


def test_publish_is_idempotent_and_keeps_live_history(redis_client, model_repo, users):
    publish(model_repo / "v1", redis_client, progress=False)
    first = {k: redis_client.dump(k) for k in redis_client.scan_iter("udg:[ehp]:*")}
    uid = str(users["user_ids"][0])
    redis_client.set(LAYOUT.history(uid), "live-click")
    publish(model_repo / "v1", redis_client, progress=False)
    second = {k: redis_client.dump(k) for k in redis_client.scan_iter("udg:[ehp]:*")}
    assert second.keys() == first.keys()
    assert redis_client.get(LAYOUT.history(uid)) == b"live-click"  # shared state kept (SET NX)
    assert all(second[k] == first[k] for k in first if k != LAYOUT.history(uid).encode())
    publish(model_repo / "v1", redis_client, progress=False, overwrite_shared=True)
    assert redis_client.get(LAYOUT.history(uid)) != b"live-click"


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
    assert not redis_client.exists(LAYOUT.marker("v1"))


def test_append_clicks_orders_bounds_and_deduplicates(redis_client, redis_server):
    async def scenario(store):
        first = await store.append_clicks({"u": ([Click("a", 1), Click("b", 2), Click("c", None)], None)})
        again = await store.append_clicks({"u": ([Click("b", 2), Click("d", 3)], {"gender": "F"}),
                                           "w": ([Click("z", None)], None)})
        return first, again

    first, again = run(scenario, redis_server.url, history_cap=3)
    assert first == {"u": [1, 1, 1]} and again == {"u": [0, 1], "w": [1]}
    assert LAYOUT.split_history(redis_client.get(LAYOUT.history("u")), 10) == ["d", "c", "b"]
    assert redis_client.get(LAYOUT.profile("u")) == b'{"gender":"F"}'
    assert redis_client.ttl(LAYOUT.dedup("u")) > 0


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

    server = RedisServer(REDIS_BINARY, free_port(), password="s3cret").start(move_on_clash=True)
    try:
        assert publish(model_repo / "v1", sync_redis(server.url), progress=False).users > 0
        assert run(lambda store: store.marker("v1"), server.url)["version"] == "v1"
    finally:
        server.cleanup()


def test_clicks_survive_a_script_cache_flush(redis_client, redis_server):
    """A restarted Redis has no scripts: the first EVALSHA answers NOSCRIPT, the layout loads it and reruns."""
    async def scenario(store):
        redis_client.script_flush()
        one = await store.append_clicks({"s1": ([Click("a", 1)], None)})
        redis_client.script_flush()
        many = await store.append_clicks({"s1": ([Click("b", 2)], None), "s2": ([Click("c", None)], None)})
        return one, many

    assert run(scenario, redis_server.url) == ({"s1": [1]}, {"s1": [1], "s2": [1]})
    assert redis_client.get(LAYOUT.history("s1")) == b"b\x1e\x1fa\x1e"  # live entries are tagged


def test_delete_version_removes_its_namespace_and_marker_only(redis_client):
    layout = RedisLayout("gc")
    user_vec, udg_vec = np.ones((3, 2), np.float32), np.zeros((3, 1), np.float32)
    for version in ("v1", "v2"):
        layout.write_batch(redis_client, version, ["a", "b", "c"], user_vec, udg_vec,
                           [["i1"], [], ["i2", "i1"]], [{"age": "25"}, {}, {"age": ""}])
    layout.write_marker(redis_client, "v2", {"version": "v2"})
    redis_client.set(layout.embeddings("half", "a"), b"x")  # a namespace whose publish never completed
    assert layout.stored_versions(redis_client) == {"v1": None, "v2": {"version": "v2"}, "half": None}
    assert redis_client.get(layout.history("b")) is None and redis_client.get(layout.profile("c")) is None
    assert layout.delete_version(redis_client, "v2", batch=2) == 3
    assert not redis_client.exists(layout.marker("v2"))
    assert not list(redis_client.scan_iter(match=layout.embeddings_pattern("v2")))
    assert len(list(redis_client.scan_iter(match=layout.embeddings_pattern("v1")))) == 3
    assert redis_client.get(layout.history("c")) == b"i2\x1fi1"  # shared state is nobody's version: kept
    assert set(layout.stored_versions(redis_client)) == {"v1", "half"}
