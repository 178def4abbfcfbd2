"""`udg gates`: gate statistics of a +UDG model are consistent with the model's own predictions."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def trained():
    from model.experiment import model_config
    from model.train import TrainConfig, train_model
    from tests.tiny import tiny_prepared

    torch.set_num_threads(1)
    data = tiny_prepared(users=120, items=40, events_per_user=15, max_history=6)
    config = model_config("pnn", "udg", embed_dim=8, hidden=(16, 8), udg_dim=8, gate_hidden=8)
    model, _ = train_model(data, config, TrainConfig(epochs=2), progress=False)
    return model, data


def test_gate_report_matches_the_model_and_reads_the_planted_truth(trained):
    from model.gate_stats import format_report, gate_report
    from model.train import evaluate

    model, data = trained
    samples = data.splits["test"]
    planted = data.user_columns["log_decisiveness"]  # the synthetic world's planted scale, per user number
    assert planted.shape == (len(data.user_ids),) and np.isfinite(planted).all()
    report = gate_report(model, samples, planted)
    assert [layer["width"] for layer in report["layers"]] == [g.third.out_features for g in model.gates]
    # each layer's statistics are those of the model's own gate values on these events, recomputed here
    from model.train import to_tensors

    batch = to_tensors(samples)
    with torch.no_grad():
        user_vec, udg_vec = model.user_state(batch["user"], batch["profile"])
        gates = [g.expand(len(samples), -1).numpy() for g in
                 model.gate_values(user_vec, udg_vec, batch["history"], batch["item"])]
    for layer, values in zip(report["layers"], gates, strict=True):
        assert layer["mean"] == pytest.approx(float(values.mean()), abs=1e-6)
        assert layer["std"] == pytest.approx(float(values.std()), abs=1e-6) and layer["std"] > 1e-3
        assert 0.0 <= layer["between_user_share"] <= 1.0 + 1e-9
    # Scoring through the extracted gates is the model itself.
    assert abs(report["auc"]["trained gates"] - evaluate(model, samples)["auc"]) < 1e-6
    assert set(report["auc"]) == {"trained gates", "each user's mean gate", "mean gate over all events"}
    planted = report["planted"]
    assert planted["users"] == len(np.unique(samples.user)) and "UDG embedding" in planted
    text = format_report(report)
    assert "between-user share" in text and "Planted log decisiveness" in text


def test_base_model_has_no_gates(trained):
    from model.experiment import model_config
    from model.gate_stats import gate_report
    from model.zoo import build_model

    _, data = trained
    base = build_model(model_config("pnn", "base", embed_dim=8, hidden=(16, 8)), data.schema)
    with pytest.raises(ValueError, match="no UDG gates"):
        gate_report(base, data.splits["test"])
