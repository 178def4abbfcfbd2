"""Smoke runs of the benchmark scripts that produce published figures and had no test: each runs end to end at
a tiny size and its output holds every figure it reports, with values that can be true."""

from __future__ import annotations

import json

import numpy as np
import pytest


def test_bench_publish_runs_and_reports_throughput_memory_and_the_idempotent_rerun(model_repo, capsys):
    from loadtest.bench_publish import main

    assert main(["--users", "500", "--model-repo", str(model_repo), "--version", "v1", "--chunk", "64"]) == 0
    out = capsys.readouterr().out
    assert "generated 500 synthetic users" in out
    assert "publish of 500 users:" in out and "users/s)" in out
    keys = int(out.split("users/s), ", 1)[1].split(" keys", 1)[0].replace(",", ""))
    assert keys > 500  # every user's embeddings, and the histories and profiles that are not empty
    assert "B/user" in out and "republish (idempotent, same keys): " in out
    assert f"{keys:,d} keys, used_memory" in out.split("republish", 1)[1]  # the rerun wrote no new key


@pytest.mark.slow
def test_bench_service_runs_one_cell_and_writes_its_json(model_repo, tmp_path, capsys):
    from loadtest.bench_service import main

    report = tmp_path / "bench.json"
    assert main(["--model-repo", str(model_repo), "--version", "v1", "--sizes", "10", "--concurrency", "1,2",
                 "--requests", "50", "--warmup", "5", "--workers", "1", "--no-bare", "--json", str(report)]) == 0
    results = json.loads(report.read_text())
    cell = results["sizes"]["10"]
    service = cell["service"]
    assert set(service) == {"1", "2"} and service["1"]["n"] == 50
    assert 0 < cell["in_process"]["median"] < service["1"]["median"]  # HTTP + Redis cost more than the graph
    assert service["1"]["median"] <= service["1"]["p99"] and service["1"]["rps"] > 0
    assert cell["stages_c1"]  # the per-stage medians from the service's histograms
    assert "model v1" in capsys.readouterr().out
    assert main(["--report", str(report)]) == 0  # the Markdown tables of the journal, running nothing
    table = capsys.readouterr().out
    inproc = cell["in_process"]["median"] * 1e3
    assert f"| 10 | 1 | {inproc:.3f} ms | {service['1']['median'] * 1e3:.3f} ms |" in table
    assert "| 10 | 2 |" in table and "load average" in table


def test_bench_compare_builds_its_requests_from_the_artifact(artifact):
    from loadtest.bench_compare import make_inputs

    inputs = make_inputs(artifact, 20, 5)
    assert len(inputs) == 5
    known = set(artifact.schema.items.tokens[2:])
    for request in inputs:
        candidates = request["candidates"]
        assert len(candidates) == len(set(candidates)) == 20 and set(candidates) <= known
        np.testing.assert_array_equal(request["candidate_idx"], artifact.encode_items(candidates)[0])
