"""`service.feature_store.FeatureStore` against a real redis-server: each call returns what the layout stored,
every Redis failure (and only those) becomes FeatureStoreUnavailable naming the call, every call is timed, and
a fetch that sees another data epoch reports it before anything is scored."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.feature_store import FeatureStore, FeatureStoreUnavailable, create_redis, raised_in_client
from service.redis_layout import Click, NotReplicated, RedisLayout

LAYOUT = RedisLayout()


def with_store(url: str, body, timeout_s: float = 2.0):
    """Run `body(store, observed)` on a FeatureStore of `url`; observed collects (op, seconds)."""
    async def main():
        observed: list[tuple[str, float]] = []
        store = FeatureStore(create_redis(url, timeout_s, 2), LAYOUT, observe=lambda op, s: observed.append((op, s)))
        try:
            return await body(store), observed
        finally:
            await store.close()

    return asyncio.run(main())


def test_every_call_returns_the_layouts_answer_and_is_timed(redis_server, redis_client):
    packed = LAYOUT.pack_embeddings(np.ones((1, 4), np.float32), np.ones((1, 2), np.float32))
    redis_client.set(LAYOUT.embeddings("v1", "u"), packed)
    LAYOUT.write_marker(redis_client, "v1", {"version": "v1", "users": 1})
    LAYOUT.write_items(redis_client, "v1", ["new-item"], np.array([[4, 5]], np.int64))

    async def body(store):
        state = await store.fetch("v1", "u")
        written = await store.store_generated("v1", "g", packed, {"sex": "F"})
        await store.refresh_generated("v1", "g")
        epoch, markers = await store.state(["v1", "v9"])
        sentinels = await store.sentinels()
        appended = await store.append_clicks({"u": ([Click("i1", 5)], None)})
        events = await store.append_events({"u": ([Click("i2", 6)], None)}, [{"user_id": "u", "item_id": "i2"}])
        return (state, written, epoch, markers, sentinels, appended, events, await store.item_generations(["v1", "v9"]),
                await store.items("v1", 2), await store.marker("v1"), await store.marker("v9"), await store.ping())

    (state, written, epoch, markers, sentinels, appended, events, generations, items, marker, missing, ping), \
        observed = with_store(redis_server.url, body)
    assert state.embeddings == packed and state.history is None and state.epoch is None  # no epoch asked for
    assert written is True and redis_client.get(LAYOUT.embeddings("v1", "g")) == packed
    assert epoch is None and markers[0]["users"] == 1 and markers[1] is None
    assert sentinels == {0: None}
    assert appended == {"u": [1]} and events == {"u": [1]}
    assert LAYOUT.split_history(redis_client.get(LAYOUT.history("u")), 5) == ["i2", "i1"]
    assert generations[1] == 0 and generations[0] >= 1
    assert list(items) == ["new-item"] and items["new-item"].tolist() == [4, 5]
    assert marker == {"version": "v1", "users": 1} and missing is None and ping is True
    assert [op for op, _ in observed] == ["fetch", "write_back", "refresh", "state", "sentinels", "append", "append",
                                          "item_generations", "items", "marker", "marker", "ping"]
    assert all(0 <= seconds < 2 for _, seconds in observed)


def test_a_fetch_that_sees_another_epoch_reports_it(redis_server, redis_client):
    seen = []

    async def body(store):
        store.on_epoch_mismatch = seen.append
        no_expectation = await store.fetch("v1", "u")  # no expected epoch: nothing read, nothing reported
        store.expected_epoch = b"e1"
        first = await store.fetch("v1", "u")  # the sentinel of u's slot is absent: another epoch (None)
        return no_expectation, first

    (no_expectation, first), _ = with_store(redis_server.url, body)
    assert no_expectation.epoch is None and first.epoch is None and seen == [None]


def test_the_same_epoch_reports_nothing(redis_server, redis_client):
    epoch, _ = LAYOUT.ensure_epoch(redis_client, "test")
    seen = []

    async def body(store):
        store.expected_epoch = epoch.encode()
        store.on_epoch_mismatch = seen.append
        state = await store.fetch("v1", "u")
        store.expected_epoch = b"another"
        await store.fetch("v1", "u")
        store.on_epoch_mismatch = None  # no callback: the mismatch is only in the state
        return state, await store.fetch("v1", "u")

    (state, unreported), _ = with_store(redis_server.url, body)
    assert state.epoch == epoch.encode() and seen == [epoch.encode()] and unreported.epoch == epoch.encode()


def test_an_unreachable_redis_is_unavailable_naming_the_call_and_still_timed():
    async def body(store):
        errors = []
        for op, call in (("fetch", store.fetch("v1", "u")), ("ping", store.ping()),
                         ("marker", store.marker("v1")), ("state", store.state(["v1"]))):
            with pytest.raises(FeatureStoreUnavailable) as error:
                await call
            errors.append((op, str(error.value)))
        return errors

    errors, observed = with_store("redis://127.0.0.1:1", body, timeout_s=0.5)
    for op, message in errors:
        assert message.startswith(f"Redis {op} failed: ConnectionError: ")
    assert [op for op, _ in observed] == ["fetch", "ping", "marker", "state"]


@pytest.mark.parametrize("error", [NotReplicated("not acknowledged by 1 replica"), TimeoutError("slow"),
                                   OSError("reset")])
def test_replication_timeouts_and_socket_errors_are_unavailable(error):
    async def main():
        store = FeatureStore(None, LAYOUT)

        async def fail():
            raise error
        with pytest.raises(FeatureStoreUnavailable, match=f"Redis append failed: {type(error).__name__}: ") as caught:
            await store._run("append", fail())
        assert caught.value.__cause__ is error

    asyncio.run(main())


def test_a_bug_in_this_projects_code_stays_a_bug():
    async def main():
        store = FeatureStore(None, LAYOUT)

        async def bug():
            raise KeyError("ours")
        with pytest.raises(KeyError, match="ours"):
            await store._run("fetch", bug())

    asyncio.run(main())


def test_errors_raised_inside_redis_py_are_recognised_by_their_frames():
    import redis.asyncio.connection as connection

    namespace: dict = {}
    # code compiled as if it lived in redis-py: the frame's file is under .../redis/
    exec(compile("def fail():\n    raise AttributeError('writer is None')\n", connection.__file__, "exec"), namespace)
    try:
        namespace["fail"]()
    except AttributeError as error:
        assert raised_in_client(error)
    try:
        raise AttributeError("ours")
    except AttributeError as error:
        assert not raised_in_client(error)
    assert not raised_in_client(RuntimeError("never raised: no traceback"))


def test_the_store_defaults_to_the_standard_layout_and_no_expectations():
    store = FeatureStore(None)
    assert store.layout.prefix == "udg" and store.expected_epoch is None and store.on_epoch_mismatch is None
    assert store.state_lost() is None
    store._observe("fetch", 0.1)  # the default observer accepts every call


def test_the_state_cache_serves_a_repeated_user_without_a_round_trip_until_a_write(redis_server, redis_client):
    """What the store does with a worker's state cache (service/state_cache.py, here active as its invalidation
    connection would make it): a fetched state comes back from `cached` with no Redis call, each lookup is
    counted by outcome, this worker's own write drops the user at once, an inactive cache serves nothing, and a
    cached state of another data epoch is reported like a fetched one."""
    from service import metrics
    from service.state_cache import StateCache

    packed = LAYOUT.pack_embeddings(np.ones((1, 4), np.float32), np.ones((1, 2), np.float32))
    redis_client.set(LAYOUT.embeddings("v1", "u"), packed)
    redis_client.set(LAYOUT.epoch_sentinel("u"), b"old")  # the data epoch's copy in the user's slot
    counts = {outcome: metrics.STATE_CACHE_LOOKUPS.labels(outcome) for outcome in ("hit", "miss", "off")}
    before = {outcome: counter._value.get() for outcome, counter in counts.items()}
    mismatches = []

    async def body(store):
        cache = StateCache(LAYOUT.prefix)
        store.use_cache(cache)
        cache.active = True
        assert store.cached("v1", "u") is None  # nothing yet: a miss
        fetched = await store.fetch("v1", "u")
        again = store.cached("v1", "u")
        await store.append_clicks({"u": ([Click("i1", 5)], None)})  # this worker's write: dropped now
        after_write = store.cached("v1", "u")
        await store.fetch("v1", "u")
        store.expected_epoch, store.on_epoch_mismatch = b"new", mismatches.append
        with_epoch = await store.fetch("v1", "u")  # another key: (version, with the epoch)
        mismatches.clear()
        cached_epoch = store.cached("v1", "u")
        cache.active = False
        return fetched, again, after_write, with_epoch, cached_epoch, store.cached("v1", "u")

    (fetched, again, after_write, with_epoch, cached_epoch, inactive), observed = with_store(redis_server.url, body)
    assert again is fetched and after_write is None and inactive is None
    assert cached_epoch is with_epoch and mismatches == [b"old"]  # the cached state's epoch is checked too
    assert [op for op, _ in observed] == ["fetch", "append", "fetch", "fetch"]  # no call for the hits
    assert {outcome: counter._value.get() - before[outcome] for outcome, counter in counts.items()} == \
        {"hit": 2, "miss": 2, "off": 1}
