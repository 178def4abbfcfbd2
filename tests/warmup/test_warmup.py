"""Online warm-up: the event stream, the worker's α steps, compare-and-set, exactly-once, skips, the score answer."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from tests.conftest import VERSION

pytest.importorskip("torch")

NEW = "warm-new-user"


def _worker(redis_client, model_repo, **config):
    from repository import ModelRepository
    from service.redis_layout import RedisLayout
    from warmup.worker import WarmupConfig, WarmupWorker

    config.setdefault("block_ms", 50)
    config.setdefault("claim_every_s", 3600)
    return WarmupWorker(redis_client, ModelRepository(model_repo), RedisLayout(), WarmupConfig(**config),
                        consumer="test-worker")


def _drain(worker, rounds: int = 20) -> int:
    total = 0
    for _ in range(rounds):
        handled = worker.run_once()
        total += handled
        if not handled:
            break
    return total


def _items(artifact, n):
    return list(artifact.manifest["features"]["items"]["tokens"])[2:2 + n]


def _profile(users):
    return {f: str(v) for f, v in zip(users["profile_fields"].tolist(), users["profile"][0].tolist(), strict=True)
            if v}


def test_warmed_value_codec():
    from service.redis_layout import TAG_META, TAG_PUBLISHED, RedisLayout

    layout = RedisLayout()
    user, udg = np.arange(3, dtype=np.float32), np.arange(2, dtype=np.float32) + 10
    published = layout.pack_embeddings(user, udg)
    assert layout.warmup_steps(published) == 0 and layout.embedding_origin(published) == TAG_PUBLISHED
    warmed = layout.pack_warmed(user, udg + 1, 7, TAG_META)
    got_user, got_udg, meta = layout.unpack_embeddings(warmed, 3, 2)
    assert np.array_equal(got_user[0], user) and np.array_equal(got_udg[0], udg + 1) and meta
    assert layout.warmup_steps(warmed) == 7 and layout.embedding_origin(warmed) == TAG_META
    assert layout.unpack_embeddings(warmed[:-1] + b"X", 3, 2) is None  # neither format
    assert layout.unpack_embeddings(warmed, 3, 3) is None  # another version's dims


def test_events_warm_a_new_user_and_the_next_score_uses_it(client, redis_client, model_repo, artifact, users):
    from repository import ModelRepository
    from service.redis_layout import RedisLayout
    from warmup.model import WarmupModel

    layout = RedisLayout()
    items, profile = _items(artifact, 6), _profile(users)
    before = client.post("/v1/score", json={"user_id": NEW, "candidates": items, "profile": profile}).json()
    assert before["cold_start"] and before["warmup_steps"] == 0
    initial = None
    for _ in range(100):  # the write-back runs after the response
        initial = redis_client.get(layout.embeddings(VERSION, NEW))
        if initial:
            break
        time.sleep(0.02)
    assert initial is not None, "the cold-start state was written back"
    events = [{"user_id": NEW, "item_id": items[i], "clicked": i % 2 == 0, "ts": 1000 + i} for i in range(4)]
    answer = client.post("/v1/events/batch", json={"events": events}).json()
    assert answer["appended"] == 2 and answer["not_clicked"] == 2
    assert redis_client.xlen(layout.warmup_stream) == 4  # clicks and non-clicks are both labels

    worker = _worker(redis_client, model_repo)
    assert _drain(worker) == 4
    value = redis_client.get(layout.embeddings(VERSION, NEW))
    assert layout.warmup_steps(value) == 4

    # the same steps computed here from the written-back state, each event with the history it saw
    model = WarmupModel.load(ModelRepository(model_repo), VERSION)
    user_vec, udg_vec, _ = layout.unpack_embeddings(initial, model.user_dim, model.udg_dim)
    histories = [[], [items[0]], [items[0]], [items[2], items[0]]]
    expected = model.step(user_vec, udg_vec, histories, items[:4], [1, 0, 1, 0], model.meta_alpha)
    _, got, _ = layout.unpack_embeddings(value, model.user_dim, model.udg_dim)
    assert np.allclose(got, expected, atol=1e-6)
    assert not np.allclose(got, udg_vec)

    after = client.post("/v1/score", json={"user_id": NEW, "candidates": items, "profile": profile}).json()
    assert after["warmup_steps"] == 4 and after["cold_start"]  # still a generated (not trained) user
    assert not np.allclose(after["scores"], before["scores"])
    assert redis_client.xpending(layout.warmup_stream, layout.warmup_group)["pending"] == 0

    # a client's retry of the same events is streamed again and applied once
    client.post("/v1/events/batch", json={"events": events})
    assert _drain(worker) == 4
    assert redis_client.get(layout.embeddings(VERSION, NEW)) == value
    assert worker.metrics.events.labels("duplicate")._value.get() == 4


def test_skips_are_counted_and_acked(client, redis_client, model_repo, artifact, users):
    from service.redis_layout import RedisLayout

    layout = RedisLayout()
    items = _items(artifact, 2)
    client.post("/v1/events", json={"user_id": NEW, "item_id": "never-seen-item", "clicked": True, "ts": 5})
    redis_client.xadd(layout.warmup_stream, {"u": NEW, "i": items[0]})  # no label, no identity
    redis_client.xadd(layout.warmup_stream, {"u": NEW, "i": items[0], "c": "yes", "id": "x"})
    known_user = str(users["user_ids"][0])
    client.post("/v1/events", json={"user_id": known_user, "item_id": items[1], "clicked": True, "ts": 6})
    published = redis_client.get(layout.embeddings(VERSION, known_user))
    worker = _worker(redis_client, model_repo)
    assert _drain(worker) == 4
    count = worker.metrics.events.labels
    assert count("unknown_item")._value.get() == 1
    assert count("malformed")._value.get() == 2
    assert count("not_cold")._value.get() == 1  # users="cold": a published user is left as trained
    assert redis_client.get(layout.embeddings(VERSION, known_user)) == published
    assert redis_client.get(layout.embeddings(VERSION, NEW)) is None  # nothing learnt: nothing written
    assert redis_client.xpending(layout.warmup_stream, layout.warmup_group)["pending"] == 0
    assert _drain(worker) == 0  # acked: never retried

    client.post("/v1/events", json={"user_id": known_user, "item_id": items[1], "clicked": True, "ts": 7})
    everyone = _worker(redis_client, model_repo, users="all")
    everyone.consumer = "test-worker-all"
    assert _drain(everyone) == 1
    warmed = redis_client.get(layout.embeddings(VERSION, known_user))
    assert layout.warmup_steps(warmed) == 1 and layout.embedding_origin(warmed) == b"P"


def test_compare_and_set_never_overwrites_a_newer_value(published, redis_server, redis_client, users):
    from service.redis_layout import TAG_META, RedisLayout

    layout = RedisLayout()
    user = str(users["user_ids"][0])
    key = layout.embeddings(VERSION, user)
    read = redis_client.get(key)
    dims = (users["user_vec"].shape[1], users["udg_vec"].shape[1])
    republished = layout.pack_embeddings(np.ones(dims[0]), np.ones(dims[1]))
    redis_client.set(key, republished)  # a republish lands between the worker's read and its write
    stale = layout.pack_warmed(np.zeros(dims[0]), np.zeros(dims[1]), 1, TAG_META)
    assert not layout.write_warmed(redis_client, VERSION, user, read, stale, ["id\x1fe1"])
    assert redis_client.get(key) == republished
    assert redis_client.zcard(layout.warmup_applied(VERSION, user)) == 0  # not marked applied either
    assert layout.write_warmed(redis_client, VERSION, user, republished, stale, ["id\x1fe1"])
    assert redis_client.get(key) == stale and redis_client.ttl(key) == -1  # a published key keeps no TTL
    # a value created from nothing gets the generated state's TTL, and so does its applied set
    assert layout.write_warmed(redis_client, VERSION, "fresh", None, stale, ["id\x1fe2"])
    assert 0 < redis_client.ttl(layout.embeddings(VERSION, "fresh")) <= layout.generated_ttl_s
    assert 0 < redis_client.ttl(layout.warmup_applied(VERSION, "fresh")) <= layout.generated_ttl_s
    # a score's refresh of the generated state pushes back the applied set's expiry with the embedding's
    for key in (layout.embeddings(VERSION, "fresh"), layout.warmup_applied(VERSION, "fresh")):
        redis_client.expire(key, 5)
    asyncio.run(_refresh(layout, redis_server.url, "fresh"))
    assert redis_client.ttl(layout.warmup_applied(VERSION, "fresh")) > 5
    assert redis_client.ttl(layout.embeddings(VERSION, "fresh")) > 5
    assert redis_client.ttl(layout.warmup_applied(VERSION, user)) == -1  # a published user's keys keep no TTL


async def _refresh(layout, url: str, user_id: str) -> None:
    from service.feature_store import FeatureStore, create_redis

    store = FeatureStore(create_redis(url, 2.0, 2), layout)
    try:
        await store.refresh_generated(VERSION, user_id)
    finally:
        await store.close()


def test_stream_is_bounded(make_client, published, redis_client, artifact):
    from service.redis_layout import RedisLayout

    layout = RedisLayout()
    client = make_client(warmup_stream_maxlen=1000)
    item = _items(artifact, 1)[0]
    for start in range(0, 3000, 500):
        events = [{"user_id": f"u{i}", "item_id": item, "clicked": True, "ts": i} for i in range(start, start + 500)]
        assert client.post("/v1/events/batch", json={"events": events}).status_code == 200
    assert redis_client.xlen(layout.warmup_stream) < 3000 * 0.7  # MAXLEN ~ trims whole macro nodes

    off = make_client(warmup_stream=False)
    redis_client.delete(layout.warmup_stream)
    off.post("/v1/events", json={"user_id": "u1", "item_id": item, "clicked": True, "ts": 1})
    assert redis_client.xlen(layout.warmup_stream) == 0


def test_a_version_without_its_checkpoint_is_not_warmed(redis_client, model_repo, tmp_path, artifact):
    import json
    import shutil

    import orjson

    from repository import WARMUP_FILE, ModelRepository
    from service.control import ControlKeys, new_document
    from service.publish import publish
    from service.redis_layout import RedisLayout
    from warmup.model import NotWarmable, WarmupModel

    repo = tmp_path / "repo"
    shutil.copytree(model_repo / VERSION, repo / "old")
    manifest = json.loads((repo / "old" / "manifest.json").read_text())
    manifest["version"] = "old"
    del manifest["files"][WARMUP_FILE]  # exported before warm-up existed
    (repo / "old" / WARMUP_FILE).unlink()
    (repo / "old" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(NotWarmable, match="no warmup.pt"):
        WarmupModel.load(ModelRepository(repo), "old")
    publish(repo / "old", redis_client, progress=False)
    redis_client.set(ControlKeys().routing, orjson.dumps(new_document("old")))
    layout = RedisLayout()
    redis_client.xadd(layout.warmup_stream, layout.warmup_entry(NEW, _items(artifact, 1)[0], True, "id\x1fa", 1,
                                                                None))
    worker = _worker(redis_client, repo)
    assert _drain(worker) == 1
    assert worker.metrics.events.labels("not_warmable")._value.get() == 1
    assert "old" in worker.refused and not worker.models
    assert redis_client.get(layout.embeddings("old", NEW)) is None


def test_two_workers_split_the_stream_and_each_event_is_applied_once(published, redis_client, model_repo, artifact,
                                                                       users):
    import orjson

    from service.control import ControlKeys, new_document
    from service.redis_layout import RedisLayout

    layout = RedisLayout()
    redis_client.set(ControlKeys().routing, orjson.dumps(new_document(VERSION)))
    layout.ensure_warmup_group(redis_client)
    items, profile = _items(artifact, 5), _profile(users)
    for k in range(40):  # 10 users x 4 events, interleaved
        user = f"split-{k % 10}"
        redis_client.xadd(layout.warmup_stream, layout.warmup_entry(user, items[k % 5], k % 2 == 0, f"id\x1f{k}", k,
                                                                    profile))
    first, second = _worker(redis_client, model_repo, count=7), _worker(redis_client, model_repo, count=7)
    second.consumer = "test-worker-2"
    while first.run_once() + second.run_once():
        pass
    assert first.processed > 0 and second.processed > 0 and first.processed + second.processed == 40
    for u in range(10):
        assert layout.warmup_steps(redis_client.get(layout.embeddings(VERSION, f"split-{u}"))) == 4
    assert redis_client.xpending(layout.warmup_stream, layout.warmup_group)["pending"] == 0


def test_no_routing_document_no_event_consumed(redis_client, model_repo, artifact):
    from service.redis_layout import RedisLayout

    layout = RedisLayout()
    layout.ensure_warmup_group(redis_client)
    redis_client.xadd(layout.warmup_stream, layout.warmup_entry(NEW, _items(artifact, 1)[0], True, "id\x1fz", 1,
                                                                None))
    worker = _worker(redis_client, model_repo)
    assert worker.run_once() == 0 and not worker.models
    group = redis_client.xinfo_groups(layout.warmup_stream)[0]
    assert group["pending"] == 0 and group["last-delivered-id"] == b"0-0"  # still there for when a version is


def test_a_restarted_worker_resumes_its_own_pending_entries_at_once(published, redis_client, model_repo, artifact,
                                                                     users):
    import orjson

    from service.control import ControlKeys, new_document
    from service.redis_layout import RedisLayout

    layout = RedisLayout()
    redis_client.set(ControlKeys().routing, orjson.dumps(new_document(VERSION)))
    layout.ensure_warmup_group(redis_client)
    for k in range(3):
        redis_client.xadd(layout.warmup_stream, layout.warmup_entry(NEW, _items(artifact, 3)[k], True, f"id\x1fr{k}",
                                                                    k, _profile(users)))
    assert len(layout.read_warmup_events(redis_client, "test-worker", 10, 10)) == 3  # read, then the worker died
    worker = _worker(redis_client, model_repo)  # same consumer name; claiming others' entries is an hour away
    worker.config.claim_idle_ms = 3_600_000
    assert worker.run_once() == 3
    assert layout.warmup_steps(redis_client.get(layout.embeddings(VERSION, NEW))) == 3
    assert layout.warmup_backlog(redis_client) == {"length": 3, "pending": 0, "lag": 0}
