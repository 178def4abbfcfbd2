"""`udg quickstart` shows the online warm-up: a new user's scores before and after a few clicks, with the
warm-up steps the service reports."""

from __future__ import annotations

import re

import pytest

from tests.service.test_service_cli import run_quickstart

pytest.importorskip("torch")


@pytest.mark.slow
def test_quickstart_demo_shows_scores_before_and_after_clicks(redis_client, redis_server, model_repo, tmp_path):
    out = run_quickstart(redis_server, model_repo, tmp_path / "quickstart")
    assert "udg warmup" in out
    steps = re.search(r"warm-up steps on this user's UDG embedding: (\d+) -> (\d+)", out)
    assert steps and steps.group(1) == "0" and int(steps.group(2)) == 12, out[-3000:]
    rows = re.findall(r"^# (\S+)\s+([\d.]+)\s+([\d.]+)\s+([+-][\d.]+)\s+\((clicked|skipped)\)$", out, re.M)
    assert len(rows) == 4 and {r[4] for r in rows} == {"clicked", "skipped"}
    assert any(float(r[3]) != 0.0 for r in rows)  # the scores moved
    assert redis_client.xlen("udg:warmup:events") == 12
