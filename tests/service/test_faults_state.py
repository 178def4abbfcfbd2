"""State-loss fault drill against real processes (loadtest/fault_drill.py): Redis SIGKILL + restart EMPTY
under a client scoring a known user, old-ts event retries, 2,000 unseen users. Prints the figures table."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_state_loss_drill(model_repo, tmp_path):
    from loadtest.fault_drill import _figures_table, drill

    figures = drill(model_repo / "v1", unseen=2000, generated_cap=500, log_path=tmp_path / "serve.log")
    print("\n" + _figures_table(figures))
    # lost state is detected and reported, never served
    assert any("state lost" in reason for reason in figures["ready_reasons"]), figures["ready_reasons"]
    assert figures["metric_state_lost"].endswith(" 1.0"), figures["metric_state_lost"]
    assert figures["cold_served"] == 0, figures["by_status"]
    assert figures["by_status"].get("503 state_lost", 0) > 0
    assert figures["detect_s"] < 1.5 and figures["recover_s"] < 2.0, figures
    assert figures["routing_active"] == "v1"  # restored from the worker, same version (not re-bootstrapped)
    # republish merged: the clicks received during the loss on top, then the published snapshot
    assert figures["live_kept"] == figures["live_sent"] == 2 and figures["history_head"][:2] == ["i4", "i3"]
    assert figures["snapshot_restored"] > 0
    # exactly once at any ts; ts-less retry by event_id
    assert figures["old_stored"] == figures["old_events"] and figures["event_id_dups"] == 0
    # bounded growth
    assert figures["generated"] == 500 and figures["capped"] == 1500 and figures["no_ttl"] == 0
    assert set(figures["by_status"]) <= {"200", "503 state_lost", "503 redis_unavailable"}
