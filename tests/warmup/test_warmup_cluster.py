"""Online warm-up on a Redis Cluster (3 primaries + 3 replicas): events posted through a real `udg serve` on the
cluster, a real `udg warmup` reading the stream (its own slot) and writing each user's embedding with the
compare-and-set (the user's slot), the warmed embedding read back and served, each event applied once —
a client's retry too, and under both rules (adam's moments live in the user's slot as well)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import numpy as np
import pytest

from tests.conftest import VERSION
from tests.serve_process import ROOT, serve_env, start_serve, stop, wait_until

pytest.importorskip("torch")
on_cluster = pytest.mark.parametrize("redis_server", ["cluster"], indirect=True)


@on_cluster
@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_udg_warmup_on_the_cluster_applies_each_served_event_once(redis_server, redis_client, published, model_repo,
                                                                  artifact, users, tmp_path, rule):
    from repository import ModelRepository
    from service.redis_layout import RedisLayout, key_slot
    from warmup.model import WarmupModel

    layout = RedisLayout()
    env = serve_env(redis_server.url, model_repo, tmp_path, version=VERSION)
    served = start_serve(env, tmp_path / "serve.log")
    worker_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    worker_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    worker = None
    try:
        items = list(artifact.manifest["features"]["items"]["tokens"])[2:12]
        profile = {f: str(v) for f, v in zip(users["profile_fields"].tolist(), users["profile"][0].tolist(),
                                             strict=True) if v}
        # new users spread over the three primaries (their keys in their own slots, the stream in another)
        new_users = [f"cluster-new-{n}" for n in range(6)]
        assert len({redis_server.primary_of_slot(key_slot(layout.history(u).encode())).port
                    for u in new_users}) > 1
        events = {u: [{"user_id": u, "item_id": items[(n + j) % len(items)], "clicked": (n + j) % 2 == 0,
                       "event_id": f"{u}-{j}", "profile": profile} for j in range(4)]
                  for n, u in enumerate(new_users)}
        with httpx.Client(base_url=served.base, timeout=10) as http:
            before = {u: http.post("/v1/score", json={"user_id": u, "candidates": items, "profile": profile}).json()
                      for u in new_users}
            assert all(b["warmup_steps"] == 0 and b["cold_start"] for b in before.values())
            for user_events in events.values():
                answer = http.post("/v1/events/batch", json={"events": user_events})
                assert answer.status_code == 200, answer.text
            initial = {u: None for u in new_users}

            def written_back() -> bool:  # the generated states the scores wrote back: the worker starts there
                for u in new_users:
                    initial[u] = initial[u] or redis_client.get(layout.embeddings(VERSION, u))
                return all(initial.values())

            wait_until(written_back, 10, "the cold-start write-backs")
            assert redis_client.xlen(layout.warmup_stream) == 24
            worker = subprocess.Popen([sys.executable, "-m", "udg_cli", "warmup", "--rule", rule, "--block-ms",
                                       "100", "--consumer", "cluster-worker"], env=worker_env, cwd=ROOT,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

            def steps() -> list[int]:
                assert worker.poll() is None, worker.stderr.read().decode()
                return [layout.warmup_steps(v) for v in
                        (redis_client.get(layout.embeddings(VERSION, u)) for u in new_users)]

            wait_until(lambda: steps() == [4] * len(new_users), 60, "the worker never applied every event")
            wait_until(lambda: redis_client.xpending(layout.warmup_stream, layout.warmup_group)["pending"] == 0, 10,
                  "entries left unacked")
            warmed = {u: redis_client.get(layout.embeddings(VERSION, u)) for u in new_users}

            # the same rule computed here, from each write-back, each event with the history it saw
            model = WarmupModel.load(ModelRepository(model_repo), VERSION)
            for u in new_users:
                user_vec, udg_vec, _ = layout.unpack_embeddings(initial[u], model.user_dim, model.udg_dim)
                clicks, histories = [], []
                for event in events[u]:
                    histories.append(list(clicks))
                    if event["clicked"]:
                        clicks.insert(0, event["item_id"])
                (expected,), (state,) = model.apply_rule(model.rule(rule), [user_vec], [udg_vec], None, [histories],
                                                         [[e["item_id"] for e in events[u]]],
                                                         [[float(e["clicked"]) for e in events[u]]])
                _, got, _ = layout.unpack_embeddings(warmed[u], model.user_dim, model.udg_dim)
                assert np.allclose(got, expected, atol=1e-5), u
                stored = layout.unpack_rule_state(redis_client.get(layout.warmup_rule_state(VERSION, u)),
                                                  state.shape[1], warmed[u]) if rule == "adam" else None
                if rule == "adam":
                    assert stored is not None and np.allclose(stored, state, atol=1e-5), u
                else:
                    assert redis_client.get(layout.warmup_rule_state(VERSION, u)) is None

            # served: the next score uses the warmed embedding and says so
            after = http.post("/v1/score", json={"user_id": new_users[0], "candidates": items,
                                                 "profile": profile}).json()
            assert after["warmup_steps"] == 4 and not np.allclose(after["scores"], before[new_users[0]]["scores"])

            # a client's retry of every event: streamed again, applied once
            for user_events in events.values():
                assert http.post("/v1/events/batch", json={"events": user_events}).status_code == 200
            assert redis_client.xlen(layout.warmup_stream) == 48
            wait_until(lambda: redis_client.xpending(layout.warmup_stream, layout.warmup_group)["pending"] == 0
                  and redis_client.xinfo_groups(layout.warmup_stream)[0]["lag"] == 0, 30, "the retries never drained")
            assert {u: redis_client.get(layout.embeddings(VERSION, u)) for u in new_users} == warmed
    finally:
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            worker.wait(15)
        stop(served.process)
