"""Model versions in process: admin API (auth, list, load, activate, split, rollback, unload), pinning, refusal
of broken artifacts while serving goes on, the split's consistency and shares, release after in-flight
requests, several workers following Redis (pub/sub and polling) and `udg gc`."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter

import numpy as np
import pytest

from service.redis_layout import RedisLayout
from tests import versions_repo

TOKEN = "s3cret-admin"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session")
def repo(model_repo, tmp_path_factory):
    return versions_repo.build(model_repo, tmp_path_factory.mktemp("versions") / "repo")


@pytest.fixture
def published_all(redis_client, repo):
    versions_repo.publish_all(repo, redis_client)
    return repo


@pytest.fixture
def make_worker(make_client):
    """Factory: one in-process 'worker' (a TestClient with its lifespan) on a repository; waits until ready."""

    def factory(repo, **overrides):
        values = dict(admin_token=TOKEN, control_poll_s=0.5, heartbeat_s=0.5, admin_wait_s=5)
        values.update(overrides)
        return make_client(repo=repo, **values)

    return factory


EXPECTED: dict = {}  # repository -> versions_repo.Expected


def score(client, user="u1", **extra):
    """The version that answered; its scores must be that version's own (v1, v2, v3 differ in every weight)."""
    candidates = ["i1", "i2", "i3"]
    reply = client.post("/v1/score", json={"user_id": user, "candidates": candidates, **extra.pop("body", {})},
                        **extra)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    repo = client.app.state.services.registry.repo
    expected = EXPECTED.setdefault(repo, versions_repo.Expected(repo))
    np.testing.assert_allclose(body["scores"], expected.scores(body["model_version"], user, candidates), atol=1e-6)
    return body["model_version"]


def wait_for(predicate, timeout_s=5.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_admin_api_disabled_without_token_and_guarded_with_one(make_worker, published_all):
    closed = make_worker(published_all, admin_token=None)
    reply = closed.get("/v1/admin/versions", headers=AUTH)
    assert reply.status_code == 403 and reply.json()["error"] == "admin_disabled"
    assert "UDG_ADMIN_TOKEN" in reply.json()["message"]

    client = make_worker(published_all)
    assert client.get("/v1/admin/versions").status_code == 401
    wrong = client.post("/v1/admin/versions/v2/activate", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
    assert score(client) == "v1"  # nothing changed

    listing = client.get("/v1/admin/versions", headers=AUTH).json()
    rows = {row["version"]: row for row in listing["versions"]}
    assert set(rows) >= {*versions_repo.VALID, *versions_repo.BROKEN}
    assert rows["v1"]["state"] == "active" and rows["v2"]["state"] == "available"
    assert rows["v1"]["manifest"]["kind"] == "pnn" and rows["v1"]["manifest"]["dims"]["user_dim"] > 0
    assert listing["routing"]["active"] == "v1" and listing["routing"]["generation"] == 1
    assert len(listing["workers"]) == 2  # both in-process workers heartbeat into the same Redis


@pytest.mark.backends
def test_load_activate_pin_rollback_unload(make_worker, published_all):
    client = make_worker(published_all)
    unloaded = client.post("/v1/score", json={"user_id": "u", "candidates": ["i1"], "model_version": "v2"})
    assert unloaded.status_code == 409 and unloaded.json()["error"] == "version_not_loaded"
    assert unloaded.json()["field"] == "model_version"

    loaded = client.post("/v1/admin/versions/v2/load", headers=AUTH)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["propagation"]["complete"] and loaded.json()["loaded"] == ["v1", "v2"]
    states = {r["version"]: r["state"] for r in client.get("/v1/admin/versions", headers=AUTH).json()["versions"]}
    assert states["v1"] == "active" and states["v2"] == "ready"
    assert score(client) == "v1"
    assert score(client, body={"model_version": "v2"}) == "v2"  # pinned in the body
    assert score(client, headers={"X-Model-Version": "v2"}) == "v2"  # or in a header

    activated = client.post("/v1/admin/versions/v2/activate", headers=AUTH).json()
    assert activated["active"] == "v2" and activated["propagation"]["complete"]
    assert activated["propagation"]["propagation_s"] < 1.0
    assert score(client) == "v2" and score(client, body={"model_version": "v1"}) == "v1"
    assert client.get("/readyz").json()["model_version"] == "v2"

    busy = client.post("/v1/admin/versions/v2/unload", headers=AUTH)
    assert busy.status_code == 409 and "serving" in busy.json()["message"]
    back = client.post("/v1/admin/rollback", headers=AUTH).json()
    assert back["active"] == "v1" and score(client) == "v1"
    assert client.post("/v1/admin/rollback", headers=AUTH).status_code == 409  # history is empty
    assert client.post("/v1/admin/versions/v9/activate", headers=AUTH).status_code == 404

    gone = client.post("/v1/admin/versions/v2/unload", headers=AUTH).json()
    assert gone["loaded"] == ["v1"] and gone["propagation"]["complete"]
    assert client.post("/v1/score", json={"user_id": "u", "candidates": ["i1"],
                                          "model_version": "v2"}).status_code == 409
    # activate loads on demand
    assert client.post("/v1/admin/versions/v3/activate", headers=AUTH).json()["active"] == "v3"
    assert score(client) == "v3"


@pytest.mark.parametrize("version", sorted(versions_repo.BROKEN))
def test_broken_version_refused_while_serving_goes_on(make_worker, published_all, version):
    client = make_worker(published_all)
    for action in ("load", "activate"):
        reply = client.post(f"/v1/admin/versions/{version}/{action}", headers=AUTH)
        assert reply.status_code == 422, reply.text
        body = reply.json()
        assert body["error"] == "version_refused" and versions_repo.BROKEN[version] in body["message"], body
        assert score(client) == "v1"
    rows = {r["version"]: r for r in client.get("/v1/admin/versions", headers=AUTH).json()["versions"]}
    assert rows[version]["state"] == "failed" and versions_repo.BROKEN[version] in rows[version]["reason"]
    assert rows["v1"]["state"] == "active"
    split = client.post("/v1/admin/split", headers=AUTH, json={"weights": {"v1": 50, version: 50}})
    assert split.status_code == 422 and score(client) == "v1"
    assert client.get("/v1/admin/versions", headers=AUTH).json()["routing"]["generation"] == 1  # untouched


def test_split_is_consistent_per_user_with_configured_shares(make_worker, published_all):
    from service.registry import bucket

    client = make_worker(published_all)
    bad = client.post("/v1/admin/split", headers=AUTH, json={"weights": {"v1": 90, "v2": 20}})
    assert bad.status_code == 422 and "sum to 110" in bad.json()["message"]
    reply = client.post("/v1/admin/split", headers=AUTH, json={"weights": {"v1": 90, "v2": 10}})
    assert reply.status_code == 200 and reply.json()["split"] == {"v1": 90, "v2": 10}
    registry = client.app.state.services.registry
    users = [f"user-{i}" for i in range(40_000)]
    arms = [registry.select(u).version for u in users]
    share = Counter(arms)["v2"] / len(users)
    assert abs(share - 0.10) < 0.01, share
    assert arms == [registry.select(u).version for u in users]  # deterministic
    assert all((bucket(u) < 9000) == (a == "v1") for u, a in zip(users, arms, strict=True))

    over_http = Counter()
    for user in users[:300]:
        first, second = score(client, user), score(client, user)
        assert first == second == registry.select(user).version
        over_http[first] += 1
    assert 0.05 < over_http["v2"] / 300 < 0.16
    metrics = client.get("/metrics").text
    assert 'udg_version_requests_total{arm="split",model_version="v2"}' in metrics
    assert 'udg_version_mean_score_count{arm="split",model_version="v1"}' in metrics

    # growing the second arm moves users only into it
    client.post("/v1/admin/split", headers=AUTH, json={"weights": {"v1": 80, "v2": 20}})
    moved = [registry.select(u).version for u in users[:5000]]
    assert all(after == "v2" for before, after in zip(arms, moved, strict=False) if before == "v2")
    back = client.post("/v1/admin/rollback", headers=AUTH).json()
    assert back["split"] == {"v1": 90, "v2": 10}


def test_inflight_request_keeps_its_version_then_it_is_released(redis_server, published_all):
    from service.feature_store import FeatureStore, create_redis
    from service.registry import ModelRegistry

    async def scenario():
        store = FeatureStore(create_redis(redis_server.url, 1.0, 8), RedisLayout())
        registry = ModelRegistry(published_all, store)
        try:
            await registry.apply({"generation": 1, "active": "v1", "loaded": ["v1", "v2"]})
            with registry.lease("u") as (held, arm):
                assert held.version == "v1" and arm == "active"
                await registry.apply({"generation": 2, "active": "v2", "loaded": ["v2"]})
                assert registry.select("u").version == "v2"  # new requests: v2
                await asyncio.sleep(0.05)
                assert held.artifact is not None and not held.released  # still in use: kept
                user_vec, udg_vec = held.artifact.cold_start(held.artifact.encode_profile(None))
                assert held.artifact.score(user_vec, udg_vec, [], [2, 3]).shape == (2,)
            await registry.drain()
            assert held.released and held.artifact is None and "v1" not in registry.models
        finally:
            registry.close()
            await store.close()

    asyncio.run(scenario())


@pytest.mark.backends
def test_workers_follow_redis_and_a_worker_that_cannot_load_keeps_serving(make_worker, published_all,
                                                                           tmp_path):
    # a and b poll only every 30 s: a switch within seconds can only come from the pub/sub notification
    # (a wall-clock bound that holds on a loaded machine, unlike "faster than a 1 s poll").
    a = make_worker(published_all, control_poll_s=30)
    b = make_worker(published_all, control_poll_s=30)
    polling = make_worker(published_all, control_pubsub=False, control_poll_s=0.2)
    broken_repo = tmp_path / "repo"
    shutil.copytree(published_all, broken_repo)
    scorer = broken_repo / "v2" / "scorer.onnx"
    scorer.write_bytes(scorer.read_bytes()[:-10])  # truncated in this worker's copy only
    c = make_worker(broken_repo)

    started = time.monotonic()
    reply = a.post("/v1/admin/versions/v2/activate", headers=AUTH).json()
    registries = {name: w.app.state.services.registry for name, w in
                  {"a": a, "b": b, "polling": polling, "c": c}.items()}
    wait_for(lambda: registries["b"].active.version == "v2")
    pubsub_s = time.monotonic() - started
    wait_for(lambda: registries["polling"].active.version == "v2", timeout_s=3)
    assert reply["propagation"]["workers"] == 4 and reply["propagation"]["complete"]
    assert pubsub_s < 10.0
    print(f"\npropagation: admin call reports {reply['propagation']['propagation_s'] * 1000:.1f} ms to the last "
          f"worker; a pub/sub follower answered v2 after {pubsub_s * 1000:.1f} ms of the call")

    # c could not load v2: keeps v1, says so in /readyz and in the heartbeat the admin call reported
    assert score(a) == "v2" and score(b) == "v2" and score(c) == "v1"
    ready = c.get("/readyz")
    assert ready.status_code == 200
    routing = ready.json()["routing"]
    assert routing["in_sync"] is False and routing["wanted_active"] == "v2"
    assert "truncated" in routing["failed"]["v2"] and "still serving v1" in routing["problems"][0]
    assert any("truncated" in " ".join(p) for p in reply["propagation"]["problems"].values())
    assert registries["c"].in_sync is False and registries["a"].in_sync is True
    assert "udg_worker_in_sync" in c.get("/metrics").text

    a.post("/v1/admin/rollback", headers=AUTH)
    wait_for(lambda: registries["b"].active.version == "v1")
    assert not registries["c"].in_sync  # v2 is still wanted loaded
    assert a.post("/v1/admin/versions/v2/unload", headers=AUTH).json()["propagation"]["complete"]
    wait_for(lambda: registries["c"].in_sync)


@pytest.mark.backends
def test_gc_removes_namespaces_no_worker_holds_never_the_active(make_worker, published_all, redis_client,
                                                                 redis_server, capsys, monkeypatch):
    from service.control import Conflict, garbage_collect
    from udg_cli import main as udg

    layout = RedisLayout()
    with pytest.raises(Conflict):
        garbage_collect(redis_client, min_age_s=0)  # no routing document yet: refuses
    client = make_worker(published_all)
    client.post("/v1/admin/versions/v2/load", headers=AUTH)
    count = {v: len(list(redis_client.scan_iter(match=layout.embeddings_pattern(v)))) for v in ("v1", "v2", "v3")}
    assert min(count.values()) > 0

    monkeypatch.setenv("REDIS_URL", redis_server.url)  # restored afterwards (the CLI writes it)
    assert udg(["gc", "--redis-url", redis_server.url, "--dry-run", "--min-age-s", "0"]) == 0
    assert '"v3"' in capsys.readouterr().out
    dry = garbage_collect(redis_client, min_age_s=0, dry_run=True)
    assert "v3" in dry["removed"] and redis_client.exists(layout.marker("v3"))
    assert garbage_collect(redis_client)["removed"] == []  # just published: kept by the age guard
    result = garbage_collect(redis_client, min_age_s=0)
    assert "v3" in result["removed"] and "v1" not in result["removed"] and "v2" not in result["removed"]
    assert result["kept"]["v1"] == "active" and result["keys_deleted"] >= count["v3"]
    assert not list(redis_client.scan_iter(match=layout.embeddings_pattern("v3")))
    assert not redis_client.exists(layout.marker("v3"))
    assert len(list(redis_client.scan_iter(match=layout.embeddings_pattern("v1")))) == count["v1"]

    client.post("/v1/admin/versions/v2/unload", headers=AUTH)
    assert "v2" in garbage_collect(redis_client, min_age_s=0)["removed"]
    assert redis_client.exists(layout.marker("v1")) and score(client) == "v1"
    refused = client.post("/v1/admin/versions/v3/activate", headers=AUTH)  # its state is gone: refused
    assert refused.status_code == 422 and "no publish marker" in refused.json()["message"]


@pytest.mark.backends
def test_a_wiped_redis_keeps_the_admin_activated_version(make_worker, published_all, redis_client):
    """After the store loses everything, the service reports it (readyz 503, score 503 state_lost), restores the
    routing from its routing file — the admin-activated v2, not UDG_MODEL_VERSION's v1 — and serves v2 again
    once the versions are republished, without a restart."""
    client = make_worker(published_all, model_version="v1")
    assert client.post("/v1/admin/versions/v2/activate", headers=AUTH).json()["active"] == "v2"
    assert score(client) == "v2"
    redis_client.flushall()
    wait_for(lambda: client.get("/readyz").status_code == 503, timeout_s=10)
    ready = client.get("/readyz").json()
    assert any("lost" in reason for reason in ready["reasons"]), ready
    lost = client.post("/v1/score", json={"user_id": "u1", "candidates": ["i1"]})
    assert lost.status_code == 503 and lost.json()["error"] == "state_lost"
    versions_repo.publish_all(published_all, redis_client)
    wait_for(lambda: client.get("/readyz").status_code == 200, timeout_s=10)
    assert score(client) == "v2" and client.get("/readyz").json()["model_version"] == "v2"


def test_the_versions_differ_in_weights_and_in_published_state(published_all, redis_client):
    """What makes the score checks above mean something: a v2 answered with v1's session or v1's Redis
    namespace would not reproduce v2's scores."""
    expected = versions_repo.Expected(published_all)
    users = expected.artifact("v1").load_users()
    known = str(users["user_ids"][0])
    layout = RedisLayout()
    for user in ("u1", known):
        by_version = {v: expected.scores(v, user, ["i1", "i2", "i3"]) for v in versions_repo.VALID}
        for a, b in (("v1", "v2"), ("v1", "v3"), ("v2", "v3")):
            assert np.abs(by_version[a] - by_version[b]).max() > 1e-3, (user, a, b)
    stored = {v: redis_client.get(layout.embeddings(v, known)) for v in versions_repo.VALID}
    assert len(set(stored.values())) == 3 and None not in stored.values()
