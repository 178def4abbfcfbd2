"""End to end through a real `udg serve` process (uvicorn, 2 workers) over HTTP on 127.0.0.1."""

from __future__ import annotations

import httpx
import numpy as np

from tests.serve_process import serve_env, start_serve, stop

TOKEN = "e2e-admin"


def fresh(base: str, method: str, path: str, **kwargs) -> httpx.Response:
    """One request on a connection of its own: the kernel may hand it to either worker."""
    with httpx.Client(base_url=base, timeout=5, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        return getattr(http, method)(path, headers={"Authorization": f"Bearer {TOKEN}", **kwargs.pop("headers", {})},
                                     **kwargs)


def served_per_worker(base: str, attempts: int = 60) -> dict[str, int]:
    """{worker id: score requests v1 served there}, asking over new connections until both workers answered."""
    served: dict[str, int] = {}
    for _ in range(attempts):
        listing = fresh(base, "get", "/v1/admin/versions").json()
        served[listing["this_worker"]] = next(r["served"] for r in listing["versions"] if r["version"] == "v1")
        if len(served) == 2:
            break
    return served


def test_udg_serve_over_http(published, redis_server, model_repo, artifact, users, tmp_path):
    ready: set[str] = set()  # worker ids that answered ready, each asked over a connection of its own

    def both_workers_ready(http: httpx.Client) -> bool:
        reply = fresh(str(http.base_url), "get", "/readyz")
        if reply.status_code == 200:
            ready.add(reply.json()["routing"]["worker"])
        return len(ready) == 2

    env = serve_env(redis_server.url, model_repo, tmp_path, workers=2, UDG_ADMIN_TOKEN=TOKEN)
    server, base, _, _ = start_serve(env, tmp_path / "serve.log", until=both_workers_ready)
    try:
        with httpx.Client(base_url=base, timeout=5) as http:
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

        # Both workers, each over a new connection per request (keep-alive would pin one worker): every answer
        # sees the click (state is in Redis, not in a worker), until each worker has answered some of them.
        sent = 1
        served = {}
        for _ in range(20):
            for _ in range(5):
                after = fresh(base, "post", "/v1/score", json={"user_id": user_id, "candidates": candidates})
                assert after.status_code == 200 and after.json()["scores"] != body["scores"]
                sent += 1
            served = served_per_worker(base)
            if len(served) == 2 and min(served.values()) > 0:
                break
        assert len(served) == 2 and min(served.values()) > 0, served
        assert sum(served.values()) == sent, (served, sent)  # exact: no request lost or counted twice

        metrics = fresh(base, "get", "/metrics").text  # aggregated over both workers (multiprocess mode)
        count = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                    if line.startswith("udg_request_seconds_count") and "/v1/score" in line)
        assert count == sent
        bad = fresh(base, "post", "/v1/score", content=b'{"user_id": 1}', headers={"Content-Type": "application/json"})
        assert bad.status_code == 422 and bad.json()["field"] == "user_id"
    finally:
        stop(server, grace_s=20)
