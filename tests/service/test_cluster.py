"""Redis Cluster specifics against a real local cluster (3 primaries + 3 replicas): REDIS_URL forms, routing
notifications reaching every node, a wiped node detected and recovered by a republish, and a primary killed
under load (slow): failures are 503 within the failover, nothing acknowledged is lost, recovery by itself."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from service.control import CAS, ControlKeys
from service.local_redis import LocalCluster, redis_server_binary
from service.publish import publish, sync_redis
from service.redis_client import parse_redis_url
from service.redis_layout import RedisLayout, key_slot
from service.settings import Settings, mask_url
from tests.serve_process import serve_env, start_serve
from tests.serve_process import stop as stop_server

VERSION = "v1"  # the tiny model's version (tests/conftest.py)

LAYOUT = RedisLayout()
on_cluster = pytest.mark.parametrize("redis_server", ["cluster"], indirect=True)


def test_redis_url_forms():
    target = parse_redis_url("redis+cluster://app:s%40cret@10.0.0.1:7000,10.0.0.2:7001/")
    assert target.cluster and not target.tls and target.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert (target.username, target.password) == ("app", "s@cret")
    assert parse_redis_url("rediss+cluster://h:1").tls and not parse_redis_url("redis://h:1/0").cluster
    assert mask_url("redis+cluster://app:secret@a:1,b:2") == "redis+cluster://app:***@a:1,b:2"
    for bad, why in [("redis+cluster://a", "host:port"), ("redis+cluster://a:1/?db=2", "database 0"),
                     ("http://a:1", "must start with")]:
        with pytest.raises(ValueError, match=why):
            Settings(redis_url=bad)


@on_cluster
def test_a_routing_change_reaches_subscribers_on_every_node(redis_server, redis_client):
    """The routing CAS publishes from its Lua script on the control slot's node; a classic PUBLISH is
    broadcast by the cluster bus, so a worker subscribed on ANY node hears it."""
    import redis.asyncio as aredis

    keys = ControlKeys()

    async def next_message(subscription, timeout_s: float = 5.0):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:  # (an ignored subscribe confirmation also returns None)
            message = await subscription.get_message(timeout=deadline - time.monotonic())
            if message:
                return message
        return None

    async def main():
        listeners = [aredis.Redis(port=server.port) for server in redis_server.running()]
        subscriptions = [listener.pubsub(ignore_subscribe_messages=True) for listener in listeners]
        for subscription in subscriptions:
            await subscription.subscribe(keys.channel)
        assert redis_client.register_script(CAS)(keys=[keys.routing], args=["", b'{"generation": 7}',
                                                                             keys.channel, "7"]) == 1
        got = [await next_message(subscription) for subscription in subscriptions]
        for subscription, listener in zip(subscriptions, listeners, strict=True):
            await subscription.aclose()
            await listener.aclose()
        return got

    got = asyncio.run(main())
    assert len(got) == 6 and all(message and message["data"] == b"7" for message in got)


def _user_on(cluster: LocalCluster, users, server, exclude=()) -> str:
    for uid in users["user_ids"].tolist():
        if uid not in exclude and cluster.primary_of_slot(key_slot(LAYOUT.history(uid).encode())) is server:
            return uid
    raise LookupError("no published user on that node")


@on_cluster
def test_a_wiped_cluster_node_is_detected_reported_and_recovered_by_republish(
        make_client, published, redis_server, redis_client, model_repo, users, artifact):
    """FLUSHALL on one primary (its replica follows): only that node's slots lose their keys and the epoch in
    the control slot survives. The copy of the epoch in the user's slot, read in the score's one MGET, tells at
    once; every poll reads one slot's copy per node and tells without traffic. Recovered by the republish."""
    client = make_client(control_poll_s=0.1)
    control_node = redis_server.primary_of_slot(key_slot(LAYOUT.epoch.encode()))
    victim = next(server for server in redis_server.primaries() if server is not control_node)
    lost_user = _user_on(redis_server, users, victim)
    kept_user = _user_on(redis_server, users, control_node)
    candidates = artifact.schema.items.tokens[2:12]
    before = client.post("/v1/score", json={"user_id": lost_user, "candidates": candidates}).json()
    assert not before.get("cold_start") and client.get("/readyz").status_code == 200
    epoch = redis_client.get(LAYOUT.epoch).decode()

    redis_server.node(victim).flushall()
    reply = client.post("/v1/score", json={"user_id": lost_user, "candidates": candidates})
    assert reply.status_code == 503 and reply.json()["error"] == "state_lost", reply.text  # never cold-start scores
    assert client.post("/v1/score", json={"user_id": kept_user, "candidates": candidates}).status_code == 503
    assert redis_client.get(LAYOUT.epoch)  # the epoch itself survived: only the slot copies could tell
    ready = client.get("/readyz")
    assert ready.status_code == 503 and "republish" in str(ready.json())

    # a second worker that starts after the wipe finds it from its poll alone (sampled slot copies)
    other = make_client(control_poll_s=0.1, routing_file=model_repo.parent / "routing-other.json")
    deadline = time.monotonic() + 10
    while other.get("/readyz").status_code != 503:
        assert time.monotonic() < deadline, other.get("/readyz").json()
        time.sleep(0.05)
    assert "hash slot" in str(other.get("/readyz").json())

    result = publish(model_repo / VERSION, redis_client, progress=False)
    assert result.marker["epoch"] != epoch and result.marker["layout"] == 2  # renewed: the workers see it
    deadline = time.monotonic() + 10
    while client.get("/readyz").status_code != 200 or other.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").json()
        time.sleep(0.05)
    after = client.post("/v1/score", json={"user_id": lost_user, "candidates": candidates}).json()
    assert after["scores"] == before["scores"]


@on_cluster
def test_events_wait_for_replicas_or_answer_503(make_client, published, redis_client):
    """UDG_EVENTS_WAIT_REPLICAS: 1 (each shard has one replica) is answered 200 once a replica has the event;
    2 cannot be met, so the event is 503 naming the shortfall (stored on the primary: the retry is a duplicate)."""
    body = {"user_id": "wait-user", "item_id": "i1", "clicked": True, "event_id": "w1"}
    assert make_client(events_wait_replicas=1).post("/v1/events", json=body).json()["appended"] == 1
    strict = make_client(events_wait_replicas=2, events_wait_timeout_ms=50)
    reply = strict.post("/v1/events", json={**body, "event_id": "w2"})
    assert reply.status_code == 503 and "1 of 2 replica(s)" in reply.json()["message"], reply.text
    assert LAYOUT.split_history(redis_client.get(LAYOUT.history("wait-user")), 10) == ["i1", "i1"]


# --- failover under load -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_primary_killed_under_load_fails_over_with_bounded_503s_and_no_acknowledged_event_lost(
        model_repo, users, artifact, tmp_path):
    """SIGKILL the primary that holds the control slot while 4 clients send score and event requests to a real
    `udg serve` (events WAIT for 1 replica). Its replica is promoted after the node timeout (1 s). Every failed
    request is a 503 with an error kind, score failures end with the failover, event failures once the killed
    node is back as a replica (WAIT needs one), the service recovers without a restart, and every event that
    was answered 200 is in its user's history afterwards."""
    cluster = LocalCluster(redis_server_binary(), node_timeout_ms=1000).start()
    server = None
    try:
        redis = sync_redis(cluster.url, timeout_s=5)
        publish(model_repo / VERSION, redis, progress=False)
        env = serve_env(cluster.url, model_repo, tmp_path, version=VERSION, UDG_EVENTS_WAIT_REPLICAS=1,
                        UDG_EVENTS_WAIT_TIMEOUT_MS=200)
        server, base, _, server_log = start_serve(env, tmp_path / "serve.log")
        known = users["user_ids"].tolist()
        candidates = artifact.schema.items.tokens[2:22]
        log: list[tuple[float, str, int, str | None]] = []  # (time, kind, status, error kind)
        acknowledged: list[tuple[str, str]] = []
        stop = threading.Event()

        def load(worker: int):
            sequence = 0
            with httpx.Client(base_url=base, timeout=10) as http:
                while not stop.is_set():
                    sequence += 1
                    kind, user, item = ("score", known[(worker * 7919 + sequence) % len(known)], None) \
                        if sequence % 2 else ("event", f"fo{(worker * 31 + sequence) % 400}", f"it-{worker}-{sequence}")
                    try:
                        if kind == "score":
                            reply = http.post("/v1/score", json={"user_id": user, "candidates": candidates})
                        else:
                            reply = http.post("/v1/events", json={"user_id": user, "item_id": item, "clicked": True,
                                                                  "event_id": f"e-{worker}-{sequence}"})
                    except httpx.TransportError as error:  # counted as a failure that is not a 503
                        log.append((time.monotonic(), kind, 0, f"{type(error).__name__}: {error}"))
                        continue
                    if kind == "event" and reply.status_code == 200:
                        acknowledged.append((user, item))
                    error = reply.json().get("error") if reply.status_code != 200 else None
                    log.append((time.monotonic(), kind, reply.status_code, error))

        threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(2.0)
        victim = cluster.primary_of_slot(key_slot(LAYOUT.epoch.encode()))
        killed_at = time.monotonic()
        cluster.kill(victim)
        survivors = [s for s in cluster.servers if s is not victim]
        while True:  # the replica is promoted: a survivor reports another primary for the slot, cluster ok
            try:
                owner = cluster.primary_of_slot(key_slot(LAYOUT.epoch.encode()))
                if owner is not victim and all(cluster.node(s).cluster("info")["cluster_state"] == "ok"
                                               for s in survivors):
                    break
            except Exception:
                pass
            assert time.monotonic() - killed_at < 20, "no failover within 20 s"
            time.sleep(0.05)
        failed_over_at = time.monotonic()
        victim.start()  # the killed node comes back (empty) and rejoins as the new primary's replica
        cluster.wait_ok(30)
        replica_at = time.monotonic()
        time.sleep(3.0)
        stop.set()
        for thread in threads:
            thread.join(15)

        failures = [entry for entry in log if entry[2] != 200]
        statuses = {entry[2] for entry in failures}
        kinds = {entry[3] for entry in failures}
        last_score_failure = max((t for t, kind, _, _ in failures if kind == "score"), default=killed_at)
        last_event_failure = max((t for t, kind, _, _ in failures if kind == "event"), default=killed_at)
        print(f"\n{len(log)} requests, {len(failures)} failed ({sum(1 for f in failures if f[1] == 'score')} "
              f"score, {sum(1 for f in failures if f[1] == 'event')} event), kinds {kinds}; failover "
              f"{failed_over_at - killed_at:.2f} s, replica back {replica_at - killed_at:.2f} s; last score failure "
              f"+{last_score_failure - killed_at:.2f} s, last event failure +{last_event_failure - killed_at:.2f} s")
        assert statuses <= {503} and None not in kinds, (failures[:5], server_log.read_text()[-6000:])
        assert all(t >= killed_at for t, *_ in failures)
        assert last_score_failure <= failed_over_at + 2.0
        assert last_event_failure <= replica_at + 2.0
        tail = [entry for entry in log if entry[0] > replica_at + 2.0]
        assert tail and all(entry[2] == 200 for entry in tail)  # recovered, no restart
        assert len(acknowledged) > 50
        lost = [(user, item) for user, item in acknowledged
                if item not in LAYOUT.split_history(redis.get(LAYOUT.history(user)), 10_000)]
        assert lost == [], f"{len(lost)} of {len(acknowledged)} acknowledged events lost"
        if os.environ.get("UDG_FAILOVER_JOURNAL"):  # docs/cluster.md's table (loadtest/failover_report.py)
            import json

            Path(os.environ["UDG_FAILOVER_JOURNAL"]).write_text(json.dumps({
                "requests": len(log), "failed": len(failures),
                "failed_score": sum(1 for f in failures if f[1] == "score"),
                "failed_event": sum(1 for f in failures if f[1] == "event"), "statuses": sorted(statuses),
                "kinds": sorted(k for k in kinds if k), "acknowledged_events": len(acknowledged),
                "failover_s": round(failed_over_at - killed_at, 2), "replica_back_s": round(replica_at - killed_at, 2),
                "last_score_failure_s": round(last_score_failure - killed_at, 2),
                "last_event_failure_s": round(last_event_failure - killed_at, 2), "node_timeout_ms": 1000,
                "wait": "UDG_EVENTS_WAIT_REPLICAS=1, UDG_EVENTS_WAIT_TIMEOUT_MS=200"}, indent=2) + "\n")
    finally:
        if server is not None:
            stop_server(server, grace_s=20)
        cluster.cleanup()
