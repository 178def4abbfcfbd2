"""A second domain end to end, through the public commands only: a synthetic shop click log (Parquet, 0/1
impressions, 4 profile fields with a numeric one, 4 item fields with a numeric and a multi-valued one) ->
`udg data inspect` -> `udg train` (PNN+UDG and DIN+UDG) -> `udg export` -> `udg publish` -> `udg serve` (a real
process, HTTP) -> a known user, a new user with a profile, a new item with a known category (from the
catalogue, then one added later with `udg publish-items`, no restart) -> `udg loadtest` against it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.serve_process import serve_env, start_serve, stop

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--epochs", "1", "--meta-steps", "20", "--embed-dim", "8", "--udg-dim", "8", "--hidden", "16,8", "--quiet",
         "--threads", "1"]


def udg(*argv: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "udg_cli", *argv], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"udg {' '.join(argv)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def expected_score(version_dir: Path, user: dict, item_fields: dict[str, list[int]], candidate: str) -> float:
    """What the exported scorer gives one candidate with these field tokens (onnxruntime, no service)."""
    from export.runtime import open_artifact

    artifact = open_artifact(version_dir, providers=["CPUExecutionProvider"])
    idx, _ = artifact.encode_items([candidate])
    fields = {f"candidate_{name}": np.asarray([tokens]) for name, tokens in item_fields.items()}
    return float(artifact.score(user["user_vec"], user["udg_vec"], user["history"], idx, fields)[0])


@pytest.mark.slow
def test_shop_end_to_end(tmp_path, redis_server, redis_client):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, work, repo = tmp_path / "shop", tmp_path / "work", tmp_path / "repo"
    udg("data", "make-shop", "--out", str(data), "--users", "300", "--items", "120", "--new-items", "5")
    spec = str(data / "shop.toml")
    report = json.loads(udg("data", "inspect", "--spec", spec, "--json").stdout)
    assert report["events"]["rows"] > 1000 and 0.05 < report["events"]["label_rate"] < 0.5
    assert list(report["user_fields"]) == ["country", "device", "tier", "age_band"]

    for kind in ("pnn", "din"):
        udg("train", "--spec", spec, "--model", kind, "--udg", *SMALL, "--out", str(work / f"{kind}.pt"))
        udg("export", str(work / f"{kind}.pt"), "--version", kind, "--out", str(repo))
        udg("publish", str(repo / kind), "--quiet", env={"REDIS_URL": redis_server.url})

    manifest = json.loads((repo / "pnn" / "manifest.json").read_text())
    features = manifest["features"]
    assert [f["name"] for f in features["user_fields"]] == ["country", "device", "tier", "age_band"]
    assert [f["name"] for f in features["item_fields"]] == ["category", "brand", "price_band", "tags"]
    assert manifest["graphs"]["scorer"]["inputs"][-1]["name"] == "candidate_tags"

    # The catalogue's items that no event shows: unknown ids, known features (published to the item table).
    items = pq.read_table(data / "items.parquet").to_pylist()
    known_items = set(features["items"]["tokens"])
    catalogue = [row for row in items if row["item_id"] not in known_items]
    assert catalogue, "the shop log has catalogue-only items"
    assert manifest["vocab"]["items"]["known"] == len(known_items)
    with np.load(repo / "pnn" / "items.npz") as table:
        new_rows = {str(i): r for r, i in enumerate(table["item_ids"].tolist()) if not table["known"][r]}
        assert set(new_rows) == {row["item_id"] for row in catalogue}
        fields_of = {item: {name: table[f"field_{name}"][row].tolist() for name in
                            [f["name"] for f in features["item_fields"]]} for item, row in new_rows.items()}

    with np.load(repo / "pnn" / "users.npz") as users:
        row = int(np.argmax(users["history_len"]))
        user = {"id": str(users["user_ids"][row]), "user_vec": users["user_vec"][row], "udg_vec": users["udg_vec"][row],
                "history": users["history_idx"][row][: users["history_len"][row]]}

    env = serve_env(redis_server.url, repo, tmp_path, version="pnn", UDG_CONTROL_POLL_S=0.2,
                    UDG_ADMIN_TOKEN="shop-secret")
    server, base, _, _ = start_serve(env, tmp_path / "serve.log")
    try:
        with httpx.Client(base_url=base, timeout=10) as http:
            shown = sorted(known_items)[:20]
            new_item = catalogue[0]["item_id"]

            # A known user: published state, one onnxruntime call; the catalogue item is scored by its features.
            body = http.post("/v1/score", json={"user_id": user["id"], "candidates": [*shown, new_item]}).json()
            assert body["model_version"] == "pnn" and body["cold_start"] is False
            assert body["unknown_candidates"] == [new_item]
            want = expected_score(repo / "pnn", user, fields_of[new_item], new_item)
            assert body["scores"][-1] == pytest.approx(want, abs=1e-6)
            no_features = expected_score(repo / "pnn", user, {k: [0] * len(v) for k, v in fields_of[new_item].items()},
                                         new_item)
            assert abs(want - no_features) > 1e-6  # the features change the score

            # A new user with a profile (numeric age bucketed by the version's edges) -> the meta generator.
            profile = {"country": "c0", "device": "mobile", "tier": "gold", "age_band": 33}
            cold = http.post("/v1/score", json={"user_id": "shopper-new", "candidates": shown, "profile": profile})
            assert cold.status_code == 200 and cold.json()["cold_start"] is True
            unknown_field = http.post("/v1/score", json={"user_id": "x", "candidates": shown,
                                                         "profile": {"shoe_size": 42}})
            assert unknown_field.status_code == 422 and unknown_field.json()["field"] == "profile.shoe_size"
            odd_value = http.post("/v1/score", json={"user_id": "y", "candidates": shown,
                                                     "profile": {"country": "atlantis"}})
            assert odd_value.status_code == 200
            metrics = http.get("/metrics").text
            assert 'udg_profile_oov_values_total{field="country",model_version="pnn"}' in metrics
            assert "shoe_size" not in metrics

            # /docs speaks the active version's fields.
            document = http.get("/openapi.json").json()
            score_body = document["components"]["schemas"]["ScoreRequest"]
            profile_schema = score_body["properties"]["profile"]["anyOf"][0]
            assert list(profile_schema["properties"]) == ["country", "device", "tier", "age_band"]

            # An item that arrives after training: `udg publish-items`, picked up without a restart.
            later = dict(catalogue[0], item_id="arrived-later")
            pq.write_table(pa.Table.from_pylist([later]), tmp_path / "later.parquet")
            udg("publish-items", str(repo / "pnn"), str(tmp_path / "later.parquet"),
                env={"REDIS_URL": redis_server.url})
            deadline = time.monotonic() + 15
            while True:
                scores = http.post("/v1/score", json={"user_id": user["id"],
                                                      "candidates": ["arrived-later", new_item]}).json()["scores"]
                if scores[0] == pytest.approx(scores[1], abs=1e-6):  # same features, both unknown ids
                    break
                assert time.monotonic() < deadline, f"the new item's features were not picked up: {scores}"
                time.sleep(0.2)

            # DIN+UDG serves the same requests (pinned version).
            din = http.post("/v1/score", headers={"X-Model-Version": "din"},
                            json={"user_id": user["id"], "candidates": [*shown, new_item]})
            if din.status_code == 409:  # not loaded in this worker: load it
                loaded = http.post("/v1/admin/versions/din/load", headers={"Authorization": "Bearer shop-secret"})
                assert loaded.status_code == 200, loaded.text
                din = http.post("/v1/score", headers={"X-Model-Version": "din"},
                                json={"user_id": user["id"], "candidates": [*shown, new_item]})
            assert din.status_code == 200 and din.json()["model_version"] == "din"

            # And it carries a load test.
            if all(importlib.util.find_spec(p) for p in ("locust", "matplotlib")):
                out = tmp_path / "loadtest"
                result = subprocess.run([sys.executable, "-m", "udg_cli", "loadtest", "--host", base, "--model-repo",
                                         str(repo), "--version", "pnn", "--run-time", "3", "--users", "2", "--out",
                                         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
                assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
                assert "**0 failures**" in (out / "summary.md").read_text()
    finally:
        stop(server, grace_s=20)
