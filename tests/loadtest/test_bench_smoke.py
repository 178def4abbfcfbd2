"""Smoke runs of the benchmark scripts in loadtest/: each runs at a tiny size (a few seconds) and the table or
journal it prints holds every figure it reports, with values that can be true. Where the full run takes
minutes (bench_ddp's trainings, bench_warmup's replay) its measurement runs here on the test model and the
tables are printed from the committed journal. The others have their own: bench_model, bench_ingest
(test_bench_*.py), bench_compare (test_loadtest_cli.py), fault_drill (test_faults_state.py), http_drill
(test_http_limits.py), rolling_restart (test_graceful_shutdown.py)."""

from __future__ import annotations

import json
from pathlib import Path

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



def test_bench_compare_sends_msgpack_for_a_variant_that_asks_and_refuses_unknown_client_settings(artifact):
    import msgpack
    import pytest

    from loadtest.bench_compare import make_inputs, parse_variant, score_requests, server_env

    name, env = parse_variant("fast-msgpack:UDG_FAST_SCORE_PATH=true,body=msgpack")
    assert name == "fast-msgpack" and server_env(env) == {"UDG_FAST_SCORE_PATH": "true"}
    inputs = make_inputs(artifact, 20, 3)
    for raw, x in zip(score_requests(inputs, env["body"]), inputs, strict=True):
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"Content-Type: application/msgpack" in head and b"Accept: application/msgpack" in head
        assert f"Content-Length: {len(body)}".encode() in head
        assert msgpack.unpackb(body) == {"user_id": x["user_id"], "candidates": x["candidates"]}
    with pytest.raises(SystemExit, match="body=json|msgpack"):
        parse_variant("x:body=xml")


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with `header_start` (after the separator)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_bench_batching_measures_every_cell_and_reprints_its_journal(model_repo, tmp_path, capsys):
    from loadtest.bench_batching import main

    journal = tmp_path / "batching.json"
    assert main([str(model_repo / "v1"), "--users", "1,3", "--sizes", "5,20", "--blocks", "2", "--per-block", "2",
                 "--json", str(journal)]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out, "| N | users per call |")
    assert [(r[0], r[1]) for r in rows] == [("5", "1"), ("5", "3"), ("20", "1"), ("20", "3")]
    for n, users, single_ms, batched_ms, speedup, single_rate, _ in rows:
        assert float(single_ms) > 0 and float(batched_ms) > 0
        assert float(speedup) == pytest.approx(float(single_ms) / float(batched_ms), rel=0.02, abs=0.01)
        rate = int(n) * int(users) / (float(single_ms) / 1e3)
        assert float(single_rate.replace(",", "")) == pytest.approx(rate, rel=0.02)
    assert "1-min load average" in out
    assert main(["--report", str(journal)]) == 0
    assert table_rows(capsys.readouterr().out, "| N | users per call |") == rows  # the journal holds the table


def test_bench_observability_reports_every_layer_against_its_baseline(tmp_path, capsys):
    pytest.importorskip("opentelemetry.sdk")
    from loadtest.bench_observability import main

    out_file = tmp_path / "overhead.md"
    assert main(["--requests", "200", "--rounds", "2", "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    rows = {r[0]: r for r in table_rows(out, "| configuration")}
    assert list(rows) == ["no layer (baseline)", "id layer (default)", "id layer + access log", "id layer + tracing",
                          "empty ASGI app (baseline)", "id layer on the empty app", "stage timer, tracing off",
                          "stage timer, tracing on"]
    for name, median, p90, delta in rows.values():
        assert 0 < float(median) <= float(p90)
        if "baseline" in name or name.endswith("tracing off"):
            assert float(delta) == 0  # each group is measured against its own baseline
    assert float(rows["id layer (default)"][3]) == pytest.approx(
        float(rows["id layer (default)"][1]) - float(rows["no layer (baseline)"][1]), abs=0.11)
    assert "200 calls per configuration, 2 interleaved rounds" in out
    assert out_file.read_text().startswith("<!-- written by: python -m loadtest.bench_observability")


def test_gpu_check_runs_parity_and_latency_on_the_cpu_provider(model_repo, tmp_path, capsys):
    from loadtest.gpu_check import main

    journal = tmp_path / "gpu.json"
    code = main([str(model_repo.parent / "checkpoint.pt"), "--sizes", "1,10", "--seconds", "0.05",
                 "--json", str(journal)])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(journal.read_text())
    kind = result["kinds"][0]
    assert kind["kind"] == "pnn" and kind["failures"] == []
    parity = table_rows(out, "| path | N=")
    assert parity and all(row[-1] == "yes" for row in parity)
    latency = table_rows(out, "| path | N | median µs |")
    assert {int(row[1]) for row in latency} == {1, 10}
    for _, n, median, p99, rate in latency:
        assert 0 < float(median.replace(",", "")) <= float(p99.replace(",", ""))
        assert float(rate.replace(",", "")) == pytest.approx(int(n) / (float(median.replace(",", "")) / 1e6),
                                                             rel=0.01)
    if result["gpu"].startswith("NO GPU") or "CUDA" not in out.splitlines()[0]:
        assert "parity ok on every path (CPU only" in out
    assert main(["--report", str(journal)]) == 0
    report = table_rows(capsys.readouterr().out, "| model | N | ORT CPU")
    assert [(row[0], row[1]) for row in report] == [("PNN", "1"), ("PNN", "10")]
    assert all(float(row[2].replace(",", "")) > 0 for row in report)  # the CPU provider's median, from the journal


def test_bench_ddp_measures_a_step_and_prints_its_tables(capsys):
    """The full run (3 trainings, torchrun) takes minutes: the step measurement behind table 3 runs here in
    process, and the tables are printed from the committed journal."""
    from loadtest.bench_ddp import DEFAULT_JOURNAL, USER_DIMS, _bench_data, _grown_model, _step_times, main
    from model.distributed import SINGLE

    data = _bench_data(60)
    step = _step_times(data, 1_000, SINGLE, steps=1, batch_size=64)
    assert step["vocab"] == 1_000 and step["step_ms"] > 0 and step["cpu_ms"] > 0
    assert step["allreduce_mib_per_step"] == 0  # one process: nothing handed to an all-reduce
    grown = sum(p.numel() for p in _grown_model(data, 3_000).parameters())
    assert grown - step["parameters"] == 2_000 * USER_DIMS  # only the user tables grow with the vocabulary
    assert main(["--from-journal", str(DEFAULT_JOURNAL)]) == 0
    out = capsys.readouterr().out
    committed = json.loads(DEFAULT_JOURNAL.read_text())
    assert len(table_rows(out, "| run | ranks |")) == len(committed["throughput"])
    assert len(table_rows(out, "| processes at once |")) == len(committed["ingest"])
    vocab = table_rows(out, "| user vocabulary |")
    assert [int(row[0].replace(",", "")) for row in vocab] == [r["vocab"] for r in committed["tables"]]


def test_bench_warmup_measures_the_events_cost_and_reports(model_repo, tmp_path, capsys, monkeypatch):
    """The replay trains on the full synthetic world (minutes): the events-cost measurement (one round) runs
    here on the test model, and the report is made from it and the committed replay journals."""
    import shutil

    from loadtest.bench_warmup import events_cost, main

    # what is measured is the stream's cost, not a loaded machine's Redis stalls past the 0.25 s default
    monkeypatch.setenv("UDG_REDIS_TIMEOUT_S", "2")
    out = tmp_path / "out"
    out.mkdir()
    committed = sorted((Path(__file__).resolve().parents[2] / "docs" / "results" / "warmup").glob("replay-*.json"))
    for journal in committed:
        shutil.copy(journal, out)
    cost = events_cost(model_repo / "v1", 20, rounds=1)
    assert set(cost) == {"off", "on"}
    for setting in ("off", "on"):
        assert cost[setting]["requests"] == 20
        assert 0 < cost[setting]["p50_ms"] <= cost[setting]["p99_ms"]
    (out / "events-cost.json").write_text(json.dumps({**cost, "command": "smoke"}))
    capsys.readouterr()  # the measurement's own lines
    assert main(["--summary-only", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("### Replay:") == len(committed) > 0
    stream = table_rows(text, "| stream | requests |")
    assert [(r[0], r[1]) for r in stream] == [("off", "20"), ("on", "20")]
    assert float(stream[0][2]) == pytest.approx(cost["off"]["p50_ms"], abs=0.001)
    assert (out / "report.md").read_text() == text  # print() and the file end in one newline each


def test_bench_ddp_gives_the_callers_cache_folder_back(monkeypatch, tmp_path):
    """The run points UDG_CACHE_DIR at its temporary folder while it trains; an in-process caller must not be
    left with a path to that deleted folder."""
    import os

    import loadtest.bench_ddp as bench

    seen = []
    monkeypatch.setattr(bench, "throughput", lambda *a: seen.append(os.environ["UDG_CACHE_DIR"]) or [])
    monkeypatch.setattr(bench, "ingest_cost", lambda *a: [])
    monkeypatch.setattr(bench, "table_sweep", lambda *a: [])
    monkeypatch.setattr(bench, "format_tables", lambda journal: "")
    monkeypatch.setenv("UDG_CACHE_DIR", str(tmp_path / "mine"))
    assert bench.main(["--journal", str(tmp_path / "j.json")]) == 0
    assert seen and seen[0] != str(tmp_path / "mine")  # the run used its own folder
    assert os.environ["UDG_CACHE_DIR"] == str(tmp_path / "mine")
    monkeypatch.delenv("UDG_CACHE_DIR")
    assert bench.main(["--journal", str(tmp_path / "j.json")]) == 0
    assert "UDG_CACHE_DIR" not in os.environ


def test_bench_overhead_measures_each_part_on_the_test_model(artifact, redis_server, published):
    """bench_overhead's three measurements at a tiny size, and the table of a journal built from them."""
    from loadtest.bench_compare import make_inputs, score_requests
    from loadtest.bench_overhead import format_report, http_floor, redis_read, route_work
    from service.redis_layout import RedisLayout

    inputs = make_inputs(artifact, 20, 4)
    alone = route_work(artifact, inputs, 40, with_model=False)
    interleaved = route_work(artifact, inputs, 40, with_model=True)
    assert len(alone) == len(interleaved) == 36 and min(alone) > 0 and min(interleaved) > 0
    layout, user = RedisLayout(), inputs[0]["user_id"]
    keys = [layout.embeddings(artifact.version, user).encode(), layout.history(user).encode()]
    reads = redis_read(redis_server.url, keys, 60)
    assert set(reads) == {"redis-py", "pipelined"} and all(len(v) == 3 and min(v) > 0 for v in reads.values())
    floor = http_floor(1000, score_requests(inputs[:1])[0], 0.5, [1, 2])
    assert set(floor) == {"1", "2"} and all(e["n"] > 0 and e["errors"] == 0 and e["cpu_ms_per_request"] > 0
                                            for e in floor.values())
    journal = {"candidates": 20, "cpus": 2, "route": {"alone": [100.0], "with_model": [250.0]},
               "redis_read_us": {"redis-py": [180.0], "pipelined": [45.0]}, "answer_bytes": 1000,
               "http_floor": floor, "load": {"before": [0.5], "after": [0.7]}}
    table = format_report(journal)
    assert "| the same work with the model call between requests | 250 | 2.50 |" in table
    assert "| Redis read, client CPU: pipelined reader MGET | 45 | 0.25 |" in table
    cpu_us = 1e3 * floor["2"]["cpu_ms_per_request"]
    assert f"canned 1,000-byte answer, concurrency 2, server CPU | {cpu_us:.0f}" in table
