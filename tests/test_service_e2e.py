"""End to end through a real `udg serve` process (uvicorn, 2 workers) over HTTP on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

from loadtest.stack import stop
from service.local_redis import free_port

ROOT = Path(__file__).resolve().parents[1]


def test_udg_serve_over_http(published, redis_server, model_repo, artifact, users):
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_server.url, "UDG_MODEL_REPO": str(model_repo),
           "UDG_MODEL_VERSION": "v1", "UDG_PORT": str(port), "UDG_WORKERS": "2"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = subprocess.Popen([sys.executable, "-m", "udg_cli", "serve"], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=5) as http:
            deadline = time.monotonic() + 60
            while True:
                assert server.poll() is None, server.stdout.read().decode()
                try:
                    if http.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "not ready within 60 s"
                time.sleep(0.1)

            row = int(np.argmax(users["history_len"]))
            user_id = str(users["user_ids"][row])
            candidates = artifact.schema.items.tokens[2:32]  # the item vocabulary after <pad>, <oov>
            reply = http.post("/v1/score", json={"user_id": user_id, "candidates": candidates, "top_k": 3})
            assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
            body = reply.json()
            idx, _ = artifact.encode_items(candidates)
            history = users["history_idx"][row][: users["history_len"][row]]
            expected = artifact.score(users["user_vec"][row], users["udg_vec"][row], history, idx)
            np.testing.assert_allclose(body["scores"], expected, atol=1e-6)
            assert len(body["ranking"]) == 3

            event = http.post("/v1/events", json={"user_id": user_id, "item_id": candidates[0], "clicked": True})
            assert event.status_code == 200 and event.json()["appended"] == 1
            # whichever worker answers next sees the click (state is in Redis, not in a worker)
            for _ in range(4):
                after = http.post("/v1/score", json={"user_id": user_id, "candidates": candidates}).json()
                assert after["scores"] != body["scores"]

            bad = http.post("/v1/score", content=b'{"user_id": 1}', headers={"Content-Type": "application/json"})
            assert bad.status_code == 422 and bad.json()["field"] == "user_id"

            metrics = http.get("/metrics").text  # aggregated over both workers (multiprocess mode)
            count = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                        if line.startswith("udg_request_seconds_count") and "/v1/score" in line)
            assert count >= 5
    finally:
        stop(server, grace_s=20)
