"""`udg report`'s run journal: finished runs are reused under the same setup, redone under another."""

from model.report import RunJournal, summarise


def _row(model: str, variant: str, seed: int, auc: float) -> dict:
    metrics = {"log_loss": 0.5, "auc": auc, "rmse": 0.4, "rig": 0.1}
    return {"model": model, "variant": variant, "seed": seed, "parameters": 10, "seconds_per_epoch": 1.0,
            "best_epoch": 1, "valid": metrics, "test": metrics}


def test_journal_reuses_runs_of_the_same_setup_only(tmp_path):
    path = tmp_path / "runs.jsonl"
    setup = {"data": {"name": "synthetic"}, "epochs": 3, "embed_wd": 0.003}
    first = RunJournal(path, setup)
    first.add(_row("pnn", "base", 0, 0.80))
    first.add(_row("pnn", "udg", 0, 0.81))
    # A second process appends to the same file; a killed run leaves a cut line behind.
    RunJournal(path, setup).add(_row("din", "base", 0, 0.79))
    with path.open("a") as handle:
        handle.write('{"setup": {"data"')

    reopened = RunJournal(path, setup)
    assert reopened.get("pnn", "udg", 0)["test"]["auc"] == 0.81
    assert reopened.get("din", "base", 0)["test"]["auc"] == 0.79
    assert reopened.get("pnn", "udg", 1) is None
    assert RunJournal(path, {**setup, "epochs": 4}).get("pnn", "base", 0) is None


def test_summary_pairs_gains_by_seed():
    rows = [_row("pnn", "base", 0, 0.80), _row("pnn", "base", 1, 0.70),
            _row("pnn", "udg", 0, 0.81), _row("pnn", "udg", 1, 0.73)]
    by_variant = {line["variant"]: line for line in summarise(rows)}
    mean, std = by_variant["udg"]["test_auc_gain"]
    assert abs(mean - 0.02) < 1e-9 and abs(std - 0.014142135) < 1e-6
    assert by_variant["udg"]["test_auc"][0] == 0.77


def test_processes_split_a_grid_through_claims(tmp_path):
    path = tmp_path / "runs.jsonl"
    setup = {"data": {"name": "synthetic"}, "epochs": 3, "embed_wd": 0.003}
    first, second = RunJournal(path, setup), RunJournal(path, setup)
    assert first.claim("pnn", "base", 0)
    assert not second.claim("pnn", "base", 0)  # being trained by the first
    assert second.claim("pnn", "base", 1)
    first.add(_row("pnn", "base", 0, 0.80))  # finishing releases the claim
    assert not (first.claims / "pnn-base-0").exists()
    assert not second.claim("pnn", "base", 0)  # finished: re-read from the file, not trained again
    assert second.get("pnn", "base", 0)["test"]["auc"] == 0.80
    second.release("pnn", "base", 1)  # a failed run gives its claim back
    assert first.claim("pnn", "base", 1)


def test_a_dead_process_claim_is_taken_over(tmp_path):
    import json
    import socket
    import subprocess
    import sys

    path = tmp_path / "runs.jsonl"
    journal = RunJournal(path, {"epochs": 3})
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    journal.claims.mkdir()
    (journal.claims / "din-udg-2").write_text(json.dumps({"host": socket.gethostname(),
                                                          "pid": int(finished.stdout), "since": 0}))
    assert journal.claim("din", "udg", 2)
    (journal.claims / "din-udg-3").write_text(json.dumps({"host": "another-host", "pid": 1, "since": 0}))
    assert not journal.claim("din", "udg", 3)  # another host's claim cannot be judged: left alone


def test_comparison_table_has_a_line_per_model_with_paired_gains():
    from model.report import PAPER_MOVIELENS_AUC, comparison

    rows = [_row("pnn", "base", 0, 0.80), _row("pnn", "base", 1, 0.70), _row("pnn", "udg", 0, 0.81),
            _row("pnn", "udg", 1, 0.73), _row("din", "base", 0, 0.75)]
    lines = comparison(summarise(rows), PAPER_MOVIELENS_AUC).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| model | seeds (base/+UDG)")
    pnn, din = lines[2].split(" | "), lines[3].split(" | ")
    assert pnn[1] == "2/2" and pnn[4] == "+0.0200 ± 0.0141" and "0.8264 → 0.8294 (+0.0030), 0.8259" in lines[2]
    assert din[1] == "1/0" and din[3] == "—"  # no +UDG run yet: shown as missing, not as zero


def test_gate_choice_picks_the_best_validation_gain_not_the_best_test_gain():
    from model.report import gate_choice

    def run(model, variant, seed, valid, test):
        row = _row(model, variant, seed, test)
        row["valid"] = {**row["valid"], "auc": valid}
        return row

    rows = [run("din", "base", 0, 0.70, 0.70), run("din", "base", 1, 0.72, 0.72),
            run("din", "udg", 0, 0.71, 0.75), run("din", "udg", 1, 0.73, 0.77),  # best on test, not valid
            run("din", "udg-detach", 0, 0.73, 0.71), run("din", "udg-detach", 1, 0.75, 0.73),
            run("pnn", "base", 0, 0.70, 0.70), run("pnn", "udg", 0, 0.71, 0.71)]  # one gated variant: no choice
    lines = gate_choice(summarise(rows)).splitlines()
    assert len(lines) == 3 and lines[2].startswith("| DIN | 2 |")
    cells = lines[2].split(" | ")
    assert cells[2] == "+0.0500 ± 0.0000 (+0.0100)" and cells[3] == "+0.0100 ± 0.0000 (+0.0300)"
    assert cells[4] == "+UDG (detached 2·sigmoid gates) → +0.0100 ± 0.0000"
    assert cells[-1] == "`udg-detach` |"
    assert gate_choice(summarise(rows[-2:])) == ""
