"""loadtest/bench_model.py: the per-model-kind section on a tiny synthetic set, one torch thread."""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from loadtest import bench_model  # noqa: E402

KINDS = ["pnn", "dien"]
SIZES = [5, 20]


def test_parse_kinds():
    assert bench_model.parse_kinds("all") == list(bench_model.ALL_KINDS)
    assert bench_model.parse_kinds("din, pnn") == ["din", "pnn"]
    with pytest.raises(ValueError):
        bench_model.parse_kinds("pnn,gbdt")


def test_kinds_table(monkeypatch, capsys, tmp_path):
    import torch

    torch.set_num_threads(1)
    tiny_data_spec = bench_model.tiny_data_spec
    default = tiny_data_spec()
    assert default.name == "synthetic"
    assert {k: default.generator.params[k] for k in bench_model.TINY_SYNTHETIC} == bench_model.TINY_SYNTHETIC
    smaller = {"users": 200, "items": 60, "events_per_user": 12}
    monkeypatch.setattr(bench_model, "tiny_data_spec", lambda **params: tiny_data_spec(**{**smaller, **params})
                        .with_overrides(**{"behavior.max_length": 8}))
    out = tmp_path / "bench.json"
    assert bench_model.main(["--kinds", ",".join(KINDS), "--sizes", ",".join(map(str, SIZES)), "--threads", "1",
                             "--repeats", "20", "--json", str(out)]) == 0
    assert torch.get_num_threads() == 1

    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| kind | N | threads | ort median ms")
    rows = [line.strip("| ").split(" | ") for line in lines[1:]]
    assert [(r[0], int(r[1]), int(r[2])) for r in rows] == [(k, n, 1) for k in KINDS for n in SIZES]
    for row in rows:
        values = [float(v) for v in row[3:]]
        assert all(math.isfinite(v) and v > 0 for v in values), row

    summary = json.loads(out.read_text())
    assert "rows" not in summary  # no CHECKPOINT: only the per-kind section ran
    assert [(r["kind"], r["n"]) for r in summary["kinds"]] == [(k, n) for k in KINDS for n in SIZES]
    assert all(r[engine]["calls"] >= 20 for r in summary["kinds"] for engine in ("ort", "ort-plain", "torch"))
    assert all(r["kflop_per_candidate"] > 0 and r["sgemm_gflops"] > 0 for r in summary["kinds"])

    # The journal alone reprints the same table (what docs/performance.md quotes).
    assert bench_model.main(["--report", str(out)]) == 0
    again = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert again == lines


def test_session_options_table_times_every_variant_against_the_default(monkeypatch, capsys, tmp_path):
    import torch

    torch.set_num_threads(1)
    tiny_data_spec = bench_model.tiny_data_spec
    smaller = {"users": 200, "items": 60, "events_per_user": 12}
    monkeypatch.setattr(bench_model, "tiny_data_spec", lambda **params: tiny_data_spec(**{**smaller, **params})
                        .with_overrides(**{"behavior.max_length": 8}))
    out = tmp_path / "bench.json"
    assert bench_model.main(["--kinds", "pnn", "--sizes", "5", "--threads", "1", "--repeats", "20",
                             "--session-options", "--json", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header = next(line for line in lines if line.startswith("| kind | N | threads | default ms"))
    variants = list(bench_model.tuning_variants())
    assert header.strip("| ").split(" | ")[4:] == variants
    row = json.loads(out.read_text())["kinds"][0]
    # three rounds of at least 20 calls each, for the default and every variant alike
    assert all(row[engine]["calls"] >= 60 for engine in ["ort", *(f"ort[{name}]" for name in variants)])
    assert bench_model.main(["--report", str(out)]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")] == lines


def test_single_model_times_a_given_graph_beside_the_serving_graph(monkeypatch, capsys, tmp_path):
    """`--graph NAME=FILE` (e.g. the serving graph an earlier commit exported) is timed as variant ort-NAME in
    the same alternating rounds; the sgemm baseline is measured before and after the rows."""
    import torch

    from export.onnx_export import export_scorer

    torch.set_num_threads(1)
    tiny_data_spec = bench_model.tiny_data_spec
    smaller = {"users": 200, "items": 60, "events_per_user": 12}
    monkeypatch.setattr(bench_model, "tiny_data_spec", lambda **params: tiny_data_spec(**{**smaller, **params})
                        .with_overrides(**{"behavior.max_length": 8}))
    data = bench_model.tiny_data()
    model, checkpoint = bench_model.train_tiny("pnn", data, epochs=1)
    checkpoint_file = checkpoint.save(tmp_path / "pnn.pt")
    graph = tmp_path / "earlier.onnx"
    graph.write_bytes(export_scorer(model, data.schema))
    out = tmp_path / "bench.json"
    assert bench_model.main([str(checkpoint_file), "--sizes", "5", "--threads", "1", "--repeats", "40", "--quick",
                             "--rounds", "2", "--graph", f"earlier={graph}", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| threads | N | ORT serving graph | ort-earlier |" in printed
    assert "sgemm baseline (torch.mm 1024x1024x1024, 20 runs, half before and half after the rows)" in printed
    summary = json.loads(out.read_text())
    [row] = summary["rows"]
    assert row["ort"]["calls"] >= 40 and row["ort-earlier"]["calls"] >= 40  # two rounds of >= 20 calls
    assert summary["sgemm_gflops"]["1"]["runs"] == 20
    assert bench_model.main(["--report", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[-8:] == printed.splitlines()[-8:]

    with pytest.raises(SystemExit):
        bench_model.main([str(checkpoint_file), "--graph", "missing"])
