"""loadtest/bench_ingest.py at a tiny size: the table's columns, and the new ingestion agreeing with the first
version (c41d538, run from `git archive` like the benchmark does) on every part of the output."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from loadtest import bench_ingest

EVENTS = 20_000


def _has_baseline() -> bool:
    if shutil.which("git") is None:
        return False
    done = subprocess.run(["git", "-C", str(bench_ingest.REPO), "cat-file", "-e",
                           f"{bench_ingest.BASELINE_COMMIT}^{{commit}}"], capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(not _has_baseline(), reason="needs git and the baseline commit in this checkout")
def test_tiny_benchmark_table_and_agreement(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = bench_ingest.main(["--sizes", str(EVENTS), "--repeats", "1", "--check", "--json", str(out),
                                "--data-dir", str(tmp_path / "data")])
    printed = capsys.readouterr().out
    header = "| " + " | ".join(bench_ingest.COLUMNS) + " |"
    assert header in printed
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "events", "implementation", "seconds (median)", "CPU seconds", "events/s", "peak RSS (GiB)",
        "batch of 1024 (ms)", "train / valid / test rows"]
    rows = [line for line in printed.splitlines() if line.startswith(f"| {EVENTS:,} |")]
    assert [row.split("|")[2].strip() for row in rows] == ["new", "baseline", "pre-refactor"]
    assert report["agree"] is True and report["checked"] == [EVENTS]
    assert "agree between new and baseline" in printed and "New vs pre-refactor" in printed

    saved = json.loads(out.read_text())
    assert {r["implementation"] for r in saved["results"]} == {"new", "baseline", "pre-refactor"}
    for result in saved["results"]:
        assert result["events"] == EVENTS
        assert result["seconds"] > 0 and result["peak_rss_bytes"] > 0
        assert result["batch_shapes"]["history"] == [1024, 50]
        assert sum(result["splits"].values()) == EVENTS
    legacy = next(r for r in saved["results"] if r["implementation"] == "pre-refactor")
    assert {k: legacy["splits"][k] for k in ("train", "valid", "test")} == \
        {k: saved["results"][0]["splits"][k] for k in ("train", "valid", "test")}  # the same splits
    new, old = (next(r for r in saved["results"] if r["implementation"] == k) for k in ("new", "baseline"))
    assert new["splits"] == old["splits"]
    assert bench_ingest.render(saved) in printed  # --render reproduces the printed table


def test_batches_and_whole_files_agree(tmp_path, monkeypatch):
    """Scanning Parquet in batches of a few rows gives what reading each file whole gives."""
    from dataset import ingest
    from dataset.spec import load_spec

    spec_path, _ = bench_ingest.make_data(3_000, tmp_path)
    spec = load_spec(spec_path)
    whole = bench_ingest.fingerprint(ingest.prepare(spec))
    monkeypatch.setattr(ingest, "BATCH_ROWS", 7)
    assert bench_ingest.fingerprint(ingest.prepare(spec)) == whole
    events = ingest.read_events(spec)
    assert len(events.users) >= 3_000 // 7  # one part per batch: it did read in batches


@pytest.mark.parametrize("range_bits", [None, 0, 3])
def test_user_time_order_is_a_stable_lexsort(monkeypatch, range_bits):
    """One packed sort, packed sorts per user range (forced narrow here), and lexsort where nothing fits."""
    from dataset import ingest

    if range_bits is not None:
        monkeypatch.setattr(ingest, "_range_bits", lambda counts, span: range_bits)
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 2000))
        users = np.unique(rng.integers(0, 300, n), return_inverse=True)[1].astype(np.int32)
        scale = [1, 1000, 10**12, 2**61 if range_bits is None else 2**30][trial % 4]
        ts = rng.integers(-scale, scale, n) if trial % 2 else rng.integers(0, 4, n) * scale
        order = ingest.user_time_order(users, ts, int(users.max()) + 1)
        assert (order == np.lexsort((ts, users))).all()
