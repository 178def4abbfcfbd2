"""Online warm-up under faults: a real `udg warmup` killed with SIGKILL mid-batch (a second worker claims its
pending entries: nothing lost, nothing applied twice), Redis restarted empty under a running worker, a hot swap
while events are pending (the new version's embeddings come from the new model), a NOSCRIPT inside the event
transaction."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from loadtest.stack import stop as stop_process
from tests.conftest import VERSION

torch = pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[2]


def _routing(client, active: str, split: dict | None = None) -> None:
    from service.control import ControlKeys, new_document

    doc = new_document(active)
    doc["split"] = split
    client.set(ControlKeys().routing, orjson.dumps(doc))


def _profile(users, row: int) -> dict:
    return {f: str(v) for f, v in zip(users["profile_fields"].tolist(), users["profile"][row].tolist(), strict=True)
            if v}


def _stream_events(client, artifact, users, n_users: int, per_user: int, prefix: str = "k") -> dict[str, list]:
    """XADD per_user events for each of n_users new users, as the service would; -> user -> [(item, label)]."""
    from service.redis_layout import RedisLayout

    layout = RedisLayout()
    items = list(artifact.manifest["features"]["items"]["tokens"])[2:22]
    sent = {}
    pipe = client.pipeline(transaction=False)
    for u in range(n_users):
        user = f"{prefix}{u}"
        profile = _profile(users, u % len(users["user_ids"]))
        sent[user] = []
        for j in range(per_user):
            item, label = items[(u * 7 + j * 3) % len(items)], (u + j) % 3 == 0
            pipe.xadd(layout.warmup_stream, layout.warmup_entry(user, item, label, f"id\x1f{user}-{j}", j, profile))
            sent[user].append((item, label, profile))
    pipe.execute()
    return sent


def _expected(model, sent_user: list, alpha: float | None = None, start=None, rule: str = "sgd"
              ) -> tuple[np.ndarray, int]:
    """The user's embedding after applying every event exactly once, in order (no stored history here), from
    `start` (default: the model's generated state for the profile), under `rule` (default: the worker's)."""
    user_vec, udg_vec = start or model.generated_state(sent_user[0][2])
    items = [i for i, _, _ in sent_user]
    (udg,), _ = model.apply_rule(model.rule(rule, alpha), [user_vec], [udg_vec], None, [[[] for _ in items]], [items],
                                 [[float(lbl) for _, lbl, _ in sent_user]])
    return udg, len(items)


def _start_worker(redis_url: str, repo: Path, consumer: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": redis_url, "UDG_MODEL_REPO": str(repo), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "udg_cli", "warmup", "--consumer", consumer, "--block-ms", "100",
                             *extra], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.002):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(poll_s)


@pytest.mark.slow
def test_sigkill_mid_batch_then_claimed_nothing_lost_nothing_twice(published, redis_server, redis_client, model_repo,
                                                                   artifact, users):
    from repository import ModelRepository
    from service.redis_layout import RedisLayout
    from warmup.model import WarmupModel
    from warmup.worker import WarmupConfig, WarmupWorker

    layout = RedisLayout()
    _routing(redis_client, VERSION)
    layout.ensure_warmup_group(redis_client)
    sent = _stream_events(redis_client, artifact, users, n_users=300, per_user=4)
    total = sum(len(v) for v in sent.values())
    worker = _start_worker(redis_server.url, model_repo, "doomed", "--count", str(total), "--users-per-pass", "4")
    keys = [layout.embeddings(VERSION, user) for user in sent]

    def mid_batch() -> bool:
        assert worker.poll() is None, worker.stderr.read().decode()
        return sum(v is not None for v in redis_client.mget(keys)) >= 20

    _wait(mid_batch, 90, "the worker never started writing")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(5)
    written = sum(v is not None for v in redis_client.mget(keys))
    pending = redis_client.xpending(layout.warmup_stream, layout.warmup_group)["pending"]
    assert 20 <= written < len(keys) and pending == total, (written, pending)  # killed mid-batch, nothing acked

    rescuer = WarmupWorker(redis_client, ModelRepository(model_repo), layout,
                           WarmupConfig(claim_idle_ms=200, claim_every_s=0, count=500, block_ms=50), "rescuer")
    # claimable once idle for claim_idle_ms: every pending entry
    _wait(lambda: len(redis_client.xpending_range(layout.warmup_stream, layout.warmup_group, "-", "+", total,
                                                  idle=200)) == total, 10, "the dead worker's entries go idle", 0.02)
    for _ in range(20):
        rescuer.run_once()
        if redis_client.xpending(layout.warmup_stream, layout.warmup_group)["pending"] == 0:
            break
    assert redis_client.xpending(layout.warmup_stream, layout.warmup_group)["pending"] == 0
    assert rescuer.metrics.claimed._value.get() == total
    assert rescuer.metrics.events.labels("duplicate")._value.get() >= 4 * 20  # the dead worker's writes: skipped
    model = WarmupModel.load(ModelRepository(model_repo), VERSION)
    for user, events in sent.items():
        value = redis_client.get(layout.embeddings(VERSION, user))
        expected, steps = _expected(model, events)
        assert layout.warmup_steps(value) == steps, user  # every event once: none lost, none twice
        _, got, _ = layout.unpack_embeddings(value, model.user_dim, model.udg_dim)
        assert np.allclose(got, expected, atol=1e-5), user


@pytest.mark.slow
def test_worker_outlives_a_redis_restart(published, redis_server, redis_client, model_repo, artifact, users):
    from service.publish import publish, sync_redis
    from service.redis_layout import RedisLayout

    layout = RedisLayout()
    _routing(redis_client, VERSION)
    worker = _start_worker(redis_server.url, model_repo, "survivor")
    try:
        sent = _stream_events(redis_client, artifact, users, n_users=3, per_user=2, prefix="before")
        _wait(lambda: all(redis_client.get(layout.embeddings(VERSION, u)) for u in sent), 60, "not warmed", 0.05)
        redis_server.stop()  # restarted without persistence: stream, group, routing, state all gone
        time.sleep(1.5)
        redis_server.start()
        client = sync_redis(redis_server.url, timeout_s=5)
        assert client.xlen(layout.warmup_stream) == 0 and client.get(layout.marker(VERSION)) is None  # empty
        publish(model_repo / VERSION, client, progress=False)
        _routing(client, VERSION)
        sent = _stream_events(client, artifact, users, n_users=3, per_user=2, prefix="after")
        _wait(lambda: all(client.get(layout.embeddings(VERSION, u)) for u in sent), 60,
              "events after the restart were not warmed", 0.05)
        assert all(layout.warmup_steps(client.get(layout.embeddings(VERSION, u))) == 2 for u in sent)
        assert worker.poll() is None
        client.close()
    finally:
        stop_process(worker)  # SIGINT: `udg warmup` finishes its pass and exits


def test_hot_swap_pending_events_go_to_the_new_version_with_its_own_model(redis_client, model_repo, artifact,
                                                                          users, tmp_path):
    from export.onnx_export import export_model
    from model.checkpoint import Checkpoint
    from repository import WARMUP_FILE, ModelRepository
    from service.publish import publish
    from service.redis_layout import RedisLayout
    from warmup.model import WarmupModel
    from warmup.worker import WarmupConfig, WarmupWorker

    repo = tmp_path / "repo"
    shutil.copytree(model_repo / VERSION, repo / VERSION)
    checkpoint = Checkpoint.load(model_repo / VERSION / WARMUP_FILE)
    weights = {k: (v * 2.0 if k.startswith("gates.") else v) for k, v in checkpoint.state_dict.items()}
    meta = dict(checkpoint.meta.state_dict, bias=checkpoint.meta.state_dict["bias"] + 0.2)
    source = Checkpoint.load(model_repo.parent / "checkpoint.pt")  # with its users, for users.npz
    import dataclasses

    from model.checkpoint import MetaState

    export_model(dataclasses.replace(source, state_dict=weights, meta=MetaState(meta, checkpoint.meta.info)), "v2",
                 repo)
    for version in (VERSION, "v2"):
        publish(repo / version, redis_client, progress=False)
    layout = RedisLayout()
    _routing(redis_client, VERSION)
    worker = WarmupWorker(redis_client, ModelRepository(repo), layout,
                          WarmupConfig(rule="sgd", alpha=20.0, block_ms=50, claim_every_s=3600,
                                       routing_poll_s=0), "swapper")
    worker.run_once()  # follows v1
    assert list(worker.models) == [VERSION]
    sent = _stream_events(redis_client, artifact, users, n_users=5, per_user=3, prefix="swap")
    _routing(redis_client, "v2")  # the swap lands while the events are pending
    while worker.run_once():
        pass
    assert list(worker.models) == ["v2"]
    new_model, old_model = (WarmupModel.load(ModelRepository(repo), v) for v in ("v2", VERSION))
    for user, events in sent.items():
        assert redis_client.get(layout.embeddings(VERSION, user)) is None  # nothing under the old version
        value = redis_client.get(layout.embeddings("v2", user))
        _, got, _ = layout.unpack_embeddings(value, new_model.user_dim, new_model.udg_dim)
        start = new_model.generated_state(events[0][2])  # v2's generator, not v1's
        assert np.allclose(got, _expected(new_model, events, 20.0, rule="sgd")[0], atol=1e-5)
        moved = got - start[1]
        old_steps = _expected(old_model, events, 20.0, start, "sgd")[0] - start[1]  # v1's gradients on v2's state
        assert np.linalg.norm(moved) > 1e-3
        assert np.linalg.norm(moved - old_steps) > 0.1 * np.linalg.norm(moved)

    # an A/B split: both arms warmed, each with its own model
    _routing(redis_client, VERSION, {VERSION: 50, "v2": 50})
    sent = _stream_events(redis_client, artifact, users, n_users=2, per_user=2, prefix="split")
    while worker.run_once():
        pass
    for user, events in sent.items():
        for model in (old_model, new_model):
            _, got, _ = layout.unpack_embeddings(redis_client.get(layout.embeddings(model.version, user)),
                                                 model.user_dim, model.udg_dim)
            assert np.allclose(got, _expected(model, events, 20.0, rule="sgd")[0], atol=1e-5)


def test_noscript_inside_the_event_transaction_streams_once(client, redis_client, artifact):
    from service.redis_layout import RedisLayout

    layout = RedisLayout()
    item = list(artifact.manifest["features"]["items"]["tokens"])[3]
    redis_client.script_flush()  # as after a Redis restart: EVALSHA answers NOSCRIPT inside the MULTI
    answer = client.post("/v1/events", json={"user_id": "ns", "item_id": item, "clicked": True, "ts": 1}).json()
    assert answer["appended"] == 1
    assert redis_client.xlen(layout.warmup_stream) == 1
    assert layout.split_history(redis_client.get(layout.history("ns")), 10) == [item]
