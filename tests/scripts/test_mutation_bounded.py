"""The bounded mutation run that fits in CI (scripts/mutation.py --max-mutants/--time-budget): a deterministic
sample of one small module's mutants, mutated for real by mutmut against its direct tests, must reach the
recorded target score."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("mutation_script", ROOT / "scripts" / "mutation.py")
mutation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutation)


def test_the_sample_is_deterministic_spread_and_nested():
    names = [f"service.m.x_f{f}__mutmut_{k}" for f in range(5) for k in range(1, 30)]
    small, large = mutation.sample_mutants(names, 10), mutation.sample_mutants(names, 40)
    assert small == mutation.sample_mutants(list(reversed(names)), 10)  # the input order does not matter
    assert len(small) == 10 and set(small) <= set(large)  # a larger budget re-measures the same mutants
    assert len({name.split("__")[0] for name in large}) == 5  # drawn from every function
    assert mutation.sample_mutants(names[:3], 10) == sorted(names[:3])


@pytest.mark.slow
def test_a_bounded_run_of_the_feature_store_reaches_the_target(tmp_path):
    pytest.importorskip("mutmut")
    out = tmp_path / "result.json"
    script = str(ROOT / "scripts" / "mutation.py")
    done = subprocess.run([sys.executable, script, "--module", "service/feature_store.py",
                           "--tests", "tests/service/test_feature_store.py", "--max-mutants", "12",
                           "--time-budget", "90",
                           "--jobs", "1", "--label", "bounded-selftest", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    (result,) = json.loads(out.read_text())
    assert result["sample"] == 12 and result["population"] > 100 and result["scope"] == "sample of 12"
    assert result["mutants"] + result["unfinished"] == 12
    assert result["mutants"] >= 6, f"too few mutants finished within the budget: {result}"
    assert result["score"] >= mutation.MIN_SCORE, result["survivors"]
