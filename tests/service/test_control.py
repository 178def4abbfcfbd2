"""`service.control` driven directly against a real redis-server and the tiny version: the bootstrap and the
restore of a lost routing document, the compare-and-set, the routing file, the detection of lost state and
the recovery from it, heartbeats and the workers they list, and `udg gc`'s decisions."""

from __future__ import annotations

import asyncio
import json
import time

import orjson
import pytest

from service import control as ctl
from service.control import Conflict, Control, ControlKeys, garbage_collect
from service.feature_store import FeatureStore, FeatureStoreUnavailable, create_redis
from service.redis_layout import RedisLayout
from service.registry import ModelRegistry
from tests.conftest import VERSION, make_settings

LAYOUT = RedisLayout()


def scenario(redis_url, model_repo, tmp_path, body, **settings):
    """body(control) with a Control over a real registry of `model_repo` (not started: the test drives it)."""
    async def main():
        config = make_settings(redis_url, model_repo, routing_file=tmp_path / "routing.json", **settings)
        redis = create_redis(config.redis_url, 2.0, 4)
        store = FeatureStore(redis, LAYOUT)
        registry = ModelRegistry(model_repo, store)
        try:
            return await body(Control(config, registry, redis))
        finally:
            registry.close()
            await store.close()

    return asyncio.run(main())


def test_the_first_worker_bootstraps_the_configured_version(redis_server, redis_client, published, model_repo,
                                                            tmp_path):
    async def body(control):
        await control.sync()
        return control

    control = scenario(redis_server.url, model_repo, tmp_path, body)
    doc = orjson.loads(redis_client.get(ControlKeys().routing))
    assert {k: doc[k] for k in ("generation", "active", "split", "loaded", "history", "action")} == {
        "generation": 1, "active": VERSION, "split": None, "loaded": [VERSION], "history": [],
        "action": f"bootstrap {VERSION}"}
    assert control.registry.active.version == VERSION and control.applied_at > 0
    assert json.loads((tmp_path / "routing.json").read_text())["generation"] == 1  # saved for a wipe
    beat = orjson.loads(redis_client.get(ControlKeys().worker(control.worker_id)))
    assert (beat["worker"], beat["generation"], beat["active"], beat["ready"]) == (
        control.worker_id, 1, VERSION, [VERSION])
    assert beat["epoch"] == control.epoch == redis_client.get(LAYOUT.epoch).decode()  # adopted from the publish


def test_a_wiped_document_is_restored_from_the_routing_file(redis_server, redis_client, published, model_repo,
                                                            tmp_path):
    saved = {"generation": 7, "active": VERSION, "split": None, "loaded": [VERSION], "history": []}
    (tmp_path / "routing.json").write_text(json.dumps(saved))

    async def body(control):
        await control.sync()
        return control

    control = scenario(redis_server.url, model_repo, tmp_path, body)
    doc = orjson.loads(redis_client.get(ControlKeys().routing))
    assert doc["generation"] == 7 and doc["restored"]["from"] == f"the routing file {tmp_path / 'routing.json'}"
    assert doc["restored"]["by"] == control.worker_id and control.registry.routing.generation == 7


def test_no_version_anywhere_is_reported_not_invented(redis_server, redis_client, tmp_path):
    empty = tmp_path / "repo"
    empty.mkdir()

    async def body(control):
        await control.sync()
        return control

    control = scenario(redis_server.url, empty, tmp_path, body, model_version=None)
    assert control.registry.last_error == f"no model versions in {empty}"
    assert redis_client.get(ControlKeys().routing) is None


def test_an_unpublished_configured_version_is_refused_with_the_reason(redis_server, redis_client, model_repo,
                                                                     tmp_path):
    async def body(control):
        await control.sync()
        return control

    control = scenario(redis_server.url, model_repo, tmp_path, body)
    assert "no publish marker in Redis" in control.registry.last_error
    assert redis_client.get(ControlKeys().routing) is None


def test_update_is_a_compare_and_set_that_notifies(redis_server, redis_client, published, model_repo, tmp_path):
    async def body(control):
        with pytest.raises(Conflict, match="no routing document in Redis yet"):
            await control.update(lambda doc: None, "nothing")
        await control.sync()
        listener = control.redis.pubsub(ignore_subscribe_messages=True)
        await listener.subscribe(control.keys.channel)
        doc = await control.update(lambda doc: doc.update(split={VERSION: 100}), "split it")
        message = None
        for _ in range(100):
            message = await listener.get_message(timeout=0.05)
            if message:
                break
        await listener.aclose()

        def refuse(doc):
            raise Conflict("refused")
        with pytest.raises(Conflict, match="refused"):
            await control.update(refuse, "refused")
        return control, doc, message

    control, doc, message = scenario(redis_server.url, model_repo, tmp_path, body)
    stored = orjson.loads(redis_client.get(ControlKeys().routing))
    assert stored == doc and doc["generation"] == 2 and doc["split"] == {VERSION: 100}
    assert doc["action"] == "split it" and doc["by"] == control.worker_id and doc["updated_at"] <= time.time()
    assert message["data"] == b"2"


def test_update_retries_when_the_document_changed_under_it(redis_server, redis_client, published, model_repo,
                                                           tmp_path):
    async def body(control):
        await control.sync()
        calls = []

        def meddle(doc):  # another worker changes the document between this read and this write, once
            calls.append(doc["generation"])
            if len(calls) == 1:
                redis_client.set(control.keys.routing, orjson.dumps({**doc, "generation": 5}))
        return await control.update(meddle, "after a race"), calls

    doc, calls = scenario(redis_server.url, model_repo, tmp_path, body)
    assert calls == [1, 5] and doc["generation"] == 6


def test_a_redis_failure_is_unavailable_naming_the_call(redis_server, model_repo, tmp_path):
    async def body(control):
        with pytest.raises(FeatureStoreUnavailable, match="Redis GET routing failed: ConnectionError"):
            await control.read()
        with pytest.raises(KeyError):  # a bug of this project stays one
            await control._call("x", _raise(KeyError("ours")))

    scenario("redis://127.0.0.1:1", model_repo, tmp_path, body)


async def _raise(error):
    raise error


def test_the_routing_file_is_written_once_per_generation_and_errors_are_kept(redis_server, model_repo, tmp_path):
    async def body(control):
        path = control.routing_path
        control.save_routing_file({"generation": 3, "active": VERSION})
        assert json.loads(path.read_text()) == {"generation": 3, "active": VERSION}
        path.write_text("{}")
        control.save_routing_file({"generation": 3, "active": VERSION})  # same generation: not rewritten
        assert path.read_text() == "{}" and control.load_routing_file() is None  # no active version in it
        path.write_text("{not json")
        assert control.load_routing_file() is None
        path.unlink()
        assert control.load_routing_file() is None
        control.routing_path = tmp_path / "missing-dir" / "routing.json"
        control.save_routing_file({"generation": 4, "active": VERSION})
        error = control.routing_file_error
        control.routing_path = path
        control.save_routing_file({"generation": 4, "active": VERSION})
        return error, control.routing_file_error, control.load_routing_file()

    error, after, loaded = scenario(redis_server.url, model_repo, tmp_path, body)
    assert error.startswith("FileNotFoundError: ") and after is None and loaded["generation"] == 4
    assert not list(tmp_path.glob(".routing.json.*.tmp"))


def test_lost_state_is_detected_reported_and_recovered_from(redis_server, redis_client, published, model_repo,
                                                            tmp_path):
    from service import metrics
    from service.publish import publish

    async def body(control):
        await control.sync()
        first = control.epoch
        losses = metrics.STATE_LOSSES._value.get()
        redis_client.flushall()  # Redis restarted empty
        await control.check_state()
        lost = control.registry.state_lost
        await control.check_state()  # reported once
        assert metrics.STATE_LOSSES._value.get() == losses + 1 and metrics.STATE_LOST._value.get() == 1
        publish(model_repo / VERSION, redis_client, progress=False)
        await control.check_state()
        return first, lost, control

    first, lost, control = scenario(redis_server.url, model_repo, tmp_path, body)
    assert lost.startswith("Redis lost the published state: the data epoch vanished")
    assert f"republish the serving version(s) ['{VERSION}'] with `udg publish`" in lost
    assert control.registry.state_lost is None and control.lost_at is None
    assert control.epoch == redis_client.get(LAYOUT.epoch).decode() != first
    assert control.registry.store.expected_epoch == control.epoch.encode()


def test_a_changed_epoch_and_a_wrong_marker_keep_the_loss(redis_server, redis_client, published, model_repo,
                                                          tmp_path):
    async def body(control):
        await control.sync()
        old = control.epoch
        redis_client.set(LAYOUT.epoch, "another")
        await control.check_state()
        lost = control.registry.state_lost
        # republished from another artifact: the marker's sha256 differs from the loaded one -> still lost
        marker = LAYOUT.unpack_marker(redis_client.get(LAYOUT.marker(VERSION)))
        LAYOUT.write_marker(redis_client, VERSION, {**marker, "epoch": "another", "manifest_sha256": "0" * 64})
        await control.check_state()
        still = control.registry.state_lost
        LAYOUT.write_marker(redis_client, VERSION, {**marker, "epoch": "another"})
        await control.check_state()  # the sentinels still hold the old epoch: not recovered
        return old, lost, still, control.registry.state_lost

    old, lost, still, after = scenario(redis_server.url, model_repo, tmp_path, body)
    assert f"the data epoch changed ({old} -> another)" in lost and still == lost
    assert after is not None and "hash slot(s) [0]" not in after  # the first cause is kept


def test_a_score_requests_epoch_mismatch_marks_the_loss_at_once(redis_server, redis_client, published, model_repo,
                                                                tmp_path):
    async def body(control):
        await control.sync()
        control._epoch_mismatch(b"other")
        changed = control.registry.state_lost
        control.registry.state_lost = None
        control._epoch_mismatch(None)
        return control.epoch, changed, control.registry.state_lost, control.registry.store.state_lost()

    epoch, changed, vanished, seen_by_store = scenario(redis_server.url, model_repo, tmp_path, body)
    assert f"the data epoch changed ({epoch} -> other)" in changed
    assert "the data epoch's copy in a user's hash slot vanished" in vanished and seen_by_store == vanished


def test_a_deployment_without_an_epoch_gets_one_from_its_markers(redis_server, redis_client, published, model_repo,
                                                                 tmp_path):
    async def body(control):
        await control.sync()
        redis_client.delete(LAYOUT.epoch)
        control.epoch = None  # a worker that starts on a deployment published before epochs existed
        await control.check_state()
        return control

    control = scenario(redis_server.url, model_repo, tmp_path, body)
    created = redis_client.get(LAYOUT.epoch).decode()
    assert control.epoch == created and created.endswith(f"by worker {control.worker_id} (markers present, no epoch)")
    assert control.registry.state_lost is None


def test_workers_are_listed_from_live_heartbeats_and_wait_applied_reports(redis_server, redis_client, published,
                                                                          model_repo, tmp_path):
    async def body(control):
        await control.sync()
        keys = control.keys
        now = int(time.time() * 1000)
        pipe = redis_client.pipeline()
        keys.queue_heartbeat(pipe, "old", orjson.dumps({"worker": "old"}), 1000, now - 5000)  # expired
        keys.queue_heartbeat(pipe, "behind", orjson.dumps({"worker": "behind", "generation": 0, "applied_at": 1.0,
                                                           "problems": ["v9 failed"]}), 60_000, now)
        pipe.execute()
        workers = await control.workers()
        waited = await control.wait_applied({"generation": 1, "updated_at": control.applied_at - 0.5}, 0.05)
        redis_client.delete(keys.worker("behind"))
        complete = await control.wait_applied({"generation": 1, "updated_at": control.applied_at - 0.5}, 1.0)
        await control.forget()
        return control, workers, waited, complete, await control.workers()

    control, workers, waited, complete, after = scenario(redis_server.url, model_repo, tmp_path, body)
    assert [w["worker"] for w in workers] == sorted(["behind", control.worker_id])
    assert (waited["workers"], waited["applied"], waited["complete"]) == (2, 1, False)
    assert waited["problems"] == {"behind": ["v9 failed"]}
    assert (complete["workers"], complete["applied"], complete["complete"]) == (1, 1, True)
    assert complete["propagation_s"] == 0.5
    assert after == []  # forgotten: its key and its index entry


def test_the_workers_index_forgets_workers_gone_for_a_ttl(redis_client):
    keys = ControlKeys("t")
    assert (keys.routing, keys.channel, keys.worker("w"), keys.workers_index) == (
        "t:{ctl}:routing", "t:{ctl}:changed", "t:{ctl}:worker:w", "t:{ctl}:workers")
    pipe = redis_client.pipeline()
    keys.queue_heartbeat(pipe, "a", b"{}", 1000, 10_000)
    keys.queue_heartbeat(pipe, "b", b"{}", 1000, 12_500)  # a's expiry (11 000) is a TTL before 12 500 - 1000
    pipe.execute()
    assert redis_client.zrange(keys.workers_index, 0, -1, withscores=True) == [(b"t:{ctl}:worker:b", 13_500.0)]
    assert 0 < redis_client.pttl(keys.worker("b")) <= 1000
    assert ctl.live_worker_keys(redis_client, keys, 13_500) == [b"t:{ctl}:worker:b"]
    assert ctl.live_worker_keys(redis_client, keys, 13_501) == []


def test_gc_needs_the_document_or_force_and_keeps_recent_publishes(redis_client, published):
    with pytest.raises(Conflict, match="no routing document in Redis: the active version is unknown"):
        garbage_collect(redis_client)
    kept = garbage_collect(redis_client, force=True)  # v1 was published a moment ago
    assert kept["removed"] == [] and kept["kept"][VERSION].startswith("published ") and \
        kept["kept"][VERSION].endswith(" s ago (< 300 s)")
    dry = garbage_collect(redis_client, force=True, min_age_s=0, dry_run=True)
    assert (dry["removed"], dry["keys_deleted"], dry["dry_run"]) == ([VERSION], 0, True)
    assert redis_client.get(LAYOUT.marker(VERSION)) is not None  # a dry run deletes nothing
    done = garbage_collect(redis_client, force=True, min_age_s=0, batch=7)
    assert done["removed"] == [VERSION] and done["keys_deleted"] > 0 and not done["dry_run"]
    assert redis_client.get(LAYOUT.marker(VERSION)) is None


def test_gc_keeps_versions_the_document_loads(redis_client, published):
    redis_client.set(ControlKeys().routing, orjson.dumps({"generation": 2, "active": "v0", "split": None,
                                                          "loaded": [VERSION], "history": []}))
    assert garbage_collect(redis_client, min_age_s=0)["kept"] == {VERSION: "loaded (routing document)"}


def test_published_age_reads_the_markers_clock():
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 100))
    assert 99 <= ctl._published_age_s({"published_at": stamp}) <= 102
    assert ctl._published_age_s({}) is None and ctl._published_age_s({"published_at": "yesterday"}) is None
    assert ctl._published_age_s({"published_at": None}) is None


def test_a_new_document_serves_one_version():
    doc = ctl.new_document("v3")
    assert {k: doc[k] for k in ("generation", "active", "split", "loaded", "history", "action")} == {
        "generation": 1, "active": "v3", "split": None, "loaded": ["v3"], "history": [], "action": "bootstrap v3"}
    assert abs(doc["updated_at"] - time.time()) < 5


def test_a_worker_restores_the_document_it_applied_when_redis_loses_it(redis_server, redis_client, published,
                                                                      model_repo, tmp_path):
    async def body(control):
        await control.sync()
        redis_client.delete(control.keys.routing)
        (tmp_path / "routing.json").unlink()  # only this worker's memory knows the routing now
        await control.sync()
        return control

    scenario(redis_server.url, model_repo, tmp_path, body)
    doc = orjson.loads(redis_client.get(ControlKeys().routing))
    assert doc["restored"]["from"] == "this worker's memory" and doc["generation"] == 1


def test_a_routing_file_without_a_generation_counts_as_generation_0(redis_server, redis_client, published,
                                                                    model_repo, tmp_path):
    (tmp_path / "routing.json").write_text(json.dumps({"active": VERSION, "split": None, "loaded": [VERSION],
                                                       "history": []}))

    async def body(control):
        await control.bootstrap()
        return control

    scenario(redis_server.url, model_repo, tmp_path, body)
    assert orjson.loads(redis_client.get(ControlKeys().routing))["restored"]["from"].startswith("the routing file")


def test_update_gives_up_after_fifty_lost_races(redis_server, redis_client, published, model_repo, tmp_path):
    async def body(control):
        await control.sync()
        attempts = []

        async def lost(**kwargs):
            attempts.append(kwargs["args"][-1])
            return 0
        control._cas = lost
        with pytest.raises(Conflict, match="^the routing document kept changing; try again$"):
            await control.update(lambda doc: None, "never")
        return attempts

    assert len(scenario(redis_server.url, model_repo, tmp_path, body)) == 50


def test_a_slot_that_lost_its_sentinel_is_a_loss_naming_the_slot(redis_server, redis_client, published,
                                                                 model_repo, tmp_path):
    async def body(control):
        await control.sync()
        redis_client.delete(LAYOUT.slot_sentinel(0))  # the epoch itself survived: only this node's keys went
        await control.check_state()
        return control.registry.state_lost

    lost = scenario(redis_server.url, model_repo, tmp_path, body)
    assert lost.startswith("Redis lost the published state: the data epoch's copy in hash slot(s) [0] vanished "
                           "(the node holding them lost its keys)")


def test_an_undecodable_epoch_is_reported_readably(redis_server, redis_client, published, model_repo, tmp_path):
    async def body(control):
        await control.sync()
        control._epoch_mismatch(b"\xffe2")
        return control.epoch, control.registry.state_lost

    epoch, lost = scenario(redis_server.url, model_repo, tmp_path, body)
    assert f"the data epoch changed ({epoch} -> \ufffde2)" in lost


def test_a_created_epoch_names_its_time_and_keeps_a_concurrent_one(redis_server, redis_client, published,
                                                                   model_repo, tmp_path):
    async def body(control):
        await control.sync()
        redis_client.delete(LAYOUT.epoch)
        control.epoch = None
        await control.check_state()
        created = control.epoch
        redis_client.delete(LAYOUT.epoch)
        control.epoch = None
        original = control.redis.set

        async def racing(key, value, **kwargs):  # another worker creates it first
            redis_client.set(key, "theirs")
            return await original(key, value, **kwargs)
        control.redis.set = racing
        await control.check_state()
        return created, control.epoch

    created, adopted = scenario(redis_server.url, model_repo, tmp_path, body)
    stamp = created.split("@", 1)[1].split(" by ")[0]
    assert abs(time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(time.gmtime())) < 120
    assert adopted == "theirs"


def test_the_heartbeat_of_a_worker_with_nothing_active_and_a_failed_version(redis_server, redis_client, model_repo,
                                                                         tmp_path):  # redis_client: flushed
    async def body(control):
        from service.registry import VersionRefused

        before = control.heartbeat_body()
        with pytest.raises(VersionRefused):
            await control.registry.ensure_loaded(VERSION)  # v1 has no publish marker: refused
        return before, control.heartbeat_body()

    before, after = scenario(redis_server.url, model_repo, tmp_path, body)
    assert before["active"] is None and before["ready"] == [] and before["failed"] == {}
    assert list(after["failed"]) == [VERSION] and "no publish marker" in after["failed"][VERSION]


def test_listing_workers_without_redis_is_unavailable_naming_the_call(model_repo, tmp_path):
    async def body(control):
        with pytest.raises(FeatureStoreUnavailable, match="^Redis ZRANGEBYSCORE workers failed: "):
            await control.workers()

    scenario("redis://127.0.0.1:1", model_repo, tmp_path, body)


@pytest.mark.parametrize("pubsub", [True, False])
def test_the_follower_polls_and_reports_an_unreachable_redis(redis_server, redis_client, published, model_repo,
                                                             tmp_path, pubsub):
    async def body(control):
        syncs = []
        original = control.sync

        async def sync():
            syncs.append(1)
            await original()
        control.sync = sync
        task = asyncio.get_running_loop().create_task(control.follow())
        deadline = time.monotonic() + 10
        while len(syncs) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        healthy = control.follow_error
        await control.stop(task)
        return len(syncs), healthy

    syncs, healthy = scenario(redis_server.url, model_repo, tmp_path, body, control_pubsub=pubsub,
                              control_poll_s=0.05)
    assert syncs >= 3 and healthy is None

    async def down(control):
        task = asyncio.get_running_loop().create_task(control.follow())
        deadline = time.monotonic() + 10
        while control.follow_error is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await control.stop(task)
        return control.follow_error, control.registry.last_error

    error, last = scenario("redis://127.0.0.1:1", model_repo, tmp_path, down, control_pubsub=pubsub)
    assert error is not None and "ConnectionError" in error and last == error  # nothing active: the reason
