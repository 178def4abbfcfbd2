"""Hot swap under load through a real `udg serve` (uvicorn, 2 workers) over HTTP: several clients send a few
thousand score requests while versions are activated, split, rolled back, unloaded and reloaded through the
admin API (and the `udg models` CLI). Zero non-2xx answers; every answer's model_version was legitimately
serving (or pinned) while the request was in flight; p99 in blocks with swaps vs blocks without is measured
(blocks alternate so both see the same background load) and reported."""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests import versions_repo
from tests.serve_process import serve_env, start_serve
from tests.serve_process import stop as stop_process

TOKEN = "hot-swap-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLIENTS, BLOCK_S, BLOCKS = 4, 2.0, 4  # blocks alternate: calm, swaps, calm, swaps
PIN_EVERY = 10


@pytest.fixture(scope="module")
def repo(model_repo, tmp_path_factory):
    return versions_repo.build(model_repo, tmp_path_factory.mktemp("hot_swap") / "repo")


def start_server(repo: Path, redis_url: str, tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """Two workers, returned once both heartbeat (the admin listing names both)."""
    env = serve_env(redis_url, repo, tmp_path, workers=2, UDG_ADMIN_TOKEN=TOKEN, UDG_HEARTBEAT_S=1)

    def both_workers_listed(http: httpx.Client) -> bool:
        reply = http.get("/v1/admin/versions", headers=AUTH)
        return reply.status_code == 200 and len(reply.json()["workers"]) == 2

    server, base, _, _ = start_serve(env, tmp_path / "serve.log", until=both_workers_listed)
    return server, base


def p99(values) -> float:
    return float(np.percentile(values, 99)) * 1000 if len(values) else float("nan")


def legit_versions(state: dict, user: str) -> set[str]:
    from service.registry import bucket, split_bounds

    if state.get("split"):
        b = bucket(user)
        return {next(v for upper, v in split_bounds(state["split"]) if b < upper)}
    return {state["active"]}


def test_hot_swap_under_load_with_two_workers(repo, redis_server, redis_client, users, tmp_path):
    from udg_cli import main as udg

    versions_repo.publish_all(repo, redis_client)
    server, base = start_server(repo, redis_server.url, tmp_path)
    user_ids = [str(u) for u in users["user_ids"][:150]] + [f"new-{i}" for i in range(50)]
    candidates = [f"i{i}" for i in range(20)]
    records: list[tuple] = []  # (sent, received, status, version, user, pinned, block)
    answers: list[tuple] = []  # (version, user, scores) of every 2xx
    swaps: list[dict] = []  # {start, end, state: {active, split}, propagation}
    block = {"index": -1}
    stop = threading.Event()
    try:
        with httpx.Client(base_url=base, timeout=30) as admin:
            for version in ("v2", "v3"):
                assert admin.post(f"/v1/admin/versions/{version}/load", headers=AUTH).json()["propagation"][
                    "complete"]
            initial = admin.get("/v1/admin/versions", headers=AUTH).json()["routing"]
            swaps.append({"start": 0.0, "end": 0.0, "state": initial, "action": "initial"})

            def client_loop(seed: int) -> None:
                rng = random.Random(seed)
                out = []
                with httpx.Client(base_url=base, timeout=30) as http:
                    n = 0
                    while not stop.is_set():
                        user = rng.choice(user_ids)
                        body = {"user_id": user, "candidates": candidates, "top_k": 5}
                        pinned = None
                        n += 1
                        if n % PIN_EVERY == 0:
                            pinned = body["model_version"] = rng.choice(("v1", "v2"))
                        sent = time.perf_counter()
                        reply = http.post("/v1/score", json=body)
                        received = time.perf_counter()
                        version = reply.json().get("model_version") if reply.status_code == 200 else reply.text
                        out.append((sent, received, reply.status_code, version, user, pinned, block["index"]))
                        if reply.status_code == 200:
                            answers.append((version, user, reply.json()["scores"]))
                records.extend(out)

            def change(method: str, path: str, body=None) -> None:
                start = time.perf_counter()
                reply = admin.request(method, path, headers=AUTH, json=body)
                end = time.perf_counter()
                assert reply.status_code == 200, reply.text
                answer = reply.json()
                swaps.append({"start": start, "end": end, "action": answer["action"],
                              "state": {"active": answer["active"], "split": answer["split"]},
                              "propagation": answer["propagation"]})

            plan = [("POST", "/v1/admin/versions/v2/activate", None),
                    ("POST", "/v1/admin/versions/v3/activate", None),
                    ("POST", "/v1/admin/rollback", None),
                    ("POST", "/v1/admin/split", {"weights": {"v1": 70, "v2": 30}}),
                    ("POST", "/v1/admin/rollback", None), ("POST", "/v1/admin/rollback", None),
                    ("POST", "/v1/admin/versions/v3/unload", None),
                    ("POST", "/v1/admin/versions/v3/activate", None),  # loads v3 again (under load)
                    ("POST", "/v1/admin/versions/v1/activate", None)]
            threads = [threading.Thread(target=client_loop, args=(seed,)) for seed in range(CLIENTS)]
            for thread in threads:
                thread.start()
            for index in range(BLOCKS):
                block["index"] = index
                until = time.perf_counter() + BLOCK_S
                if index % 2:
                    for method, path, body in plan:
                        change(method, path, body)
                        time.sleep(0.05)
                while time.perf_counter() < until:
                    time.sleep(0.01)
            stop.set()
            for thread in threads:
                thread.join(30)

            assert udg(["models", "--url", base, "--token", TOKEN, "list"]) == 0
            assert udg(["models", "--url", base, "--token", TOKEN, "split", "v1=50", "v2=50"]) == 0
            assert udg(["models", "--url", base, "--token", "wrong", "rollback"]) == 1
            metrics_text = admin.get("/metrics").text
    finally:
        stop.set()
        stop_process(server, grace_s=20)

    # --- zero non-2xx; every version legitimately serving (or pinned) while the request was in flight ---
    # A floor, not a throughput target: a quiet 2-core machine sends ~3,000; one busy with training ~1,000.
    assert len(records) >= 500, len(records)
    failures = [r for r in records if r[2] != 200]
    assert not failures, failures[:5]
    timeline = []  # (from, until, state): a state may serve from its call's start to the next call's end
    for i, swap in enumerate(swaps):
        until = swaps[i + 1]["end"] if i + 1 < len(swaps) else float("inf")
        timeline.append((swap["start"] if i else float("-inf"), until, swap["state"]))
    wrong = []
    for sent, received, _, version, user, pinned, _ in records:
        if pinned is not None:
            ok = version == pinned
        else:
            ok = any(version in legit_versions(state, user) for lo, hi, state in timeline
                     if lo <= received and sent <= hi)
        if not ok:
            wrong.append((version, user, pinned))
    assert not wrong, wrong[:5]
    served = {r[3] for r in records}
    assert {"v1", "v2", "v3"} <= served
    # every answer's scores are those of the version it names (the versions differ in weights and state)
    expected = versions_repo.Expected(repo)
    cache: dict[tuple, np.ndarray] = {}
    for version, user, scores in answers:
        if (version, user) not in cache:
            cache[version, user] = expected.scores(version, user, candidates)
        np.testing.assert_allclose(scores, cache[version, user], atol=1e-6, err_msg=f"{version} {user}")

    # --- latency with and without swaps; propagation -----------------------------------------------------
    calm = [r[1] - r[0] for r in records if r[6] % 2 == 0 and r[6] >= 0]
    swapping = [r[1] - r[0] for r in records if r[6] % 2 == 1]
    # a swap between loaded versions vs an activation that first loads the version in the other worker
    pairs = list(zip(swaps, swaps[1:], strict=False))  # (previous, this): "activate v3" after "unload v3" loads
    propagation = [s["propagation"]["propagation_s"] for p, s in pairs if p["action"] != "unload v3"]
    with_load = [s["propagation"]["propagation_s"] for p, s in pairs if p["action"] == "unload v3"]
    assert all(s["propagation"]["complete"] and s["propagation"]["workers"] == 2 for s in swaps[1:])
    report = {"requests": len(records), "calm_requests": len(calm), "swap_requests": len(swapping),
              "swaps": len(swaps) - 1, "p50_calm_ms": float(np.median(calm)) * 1000,
              "p50_swaps_ms": float(np.median(swapping)) * 1000, "p99_calm_ms": p99(calm),
              "p99_swaps_ms": p99(swapping), "propagation_median_ms": float(np.median(propagation)) * 1000,
              "propagation_max_ms": max(propagation) * 1000,
              "propagation_with_load_max_ms": max(with_load) * 1000}
    print("\nhot swap:", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in report.items()}))
    if os.environ.get("UDG_HOT_SWAP_REPORT"):
        Path(os.environ["UDG_HOT_SWAP_REPORT"]).write_text(json.dumps(report, indent=1))
    assert report["propagation_max_ms"] < 1000  # pub/sub, else the 1 s poll
    assert report["propagation_with_load_max_ms"] < 10_000
    # target: within 2x; the 2-core CI machine is shared, so a few ms of scheduler noise are tolerated
    assert report["p99_swaps_ms"] <= 2 * report["p99_calm_ms"] + 5, report

    # --- per-version metrics, aggregated over both workers -------------------------------------------
    for version in ("v1", "v2", "v3"):
        assert f'udg_version_requests_total{{arm="active",model_version="{version}"}}' in metrics_text
    assert 'udg_version_requests_total{arm="pinned",model_version="v2"}' in metrics_text
    assert 'udg_version_requests_total{arm="split",model_version="v2"}' in metrics_text
    assert "udg_version_mean_score_sum" in metrics_text and "udg_version_request_seconds_bucket" in metrics_text
