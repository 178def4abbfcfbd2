"""End to end on synthetic data: training beats a constant predictor; meta generator beats random init;
checkpoints round-trip; the CLI trains and evaluates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.checkpoint import Checkpoint, CheckpointError, MetaState
from model.experiment import model_config
from model.meta import MetaConfig, cold_start_metrics, train_meta
from model.metrics import all_metrics, auc, log_loss, rig
from model.train import TrainConfig, predict, train_model
from tests.tiny import tiny_prepared


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)  # robust when the other core is busy (CI neighbours)
    # Decisiveness mostly set by the segment: the part of the UDG embedding a profile can predict.
    return tiny_prepared(users=1500, items=120, events_per_user=40, decisiveness_profile_link=0.9, seed=1,
                         max_history=20, cold_user_frac=0.25)


@pytest.fixture(scope="module")
def trained(data):
    config = TrainConfig(epochs=6, patience=2, lr=3e-3)
    return train_model(data, model_config("pnn", "udg"), config, progress=False)


def test_metrics_against_hand_computed_values():
    y = np.array([0, 0, 1, 1])
    assert auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert log_loss(y, np.full(4, 0.5)) == pytest.approx(np.log(2))
    assert rig(y, np.full(4, 0.5)) == pytest.approx(0.0, abs=1e-9)  # the base rate carries no information
    assert all_metrics(y, y.astype(float))["rmse"] == pytest.approx(0.0)


def test_training_beats_a_constant_predictor(data, trained):
    _, metrics = trained
    test = data.splits["test"]
    constant = log_loss(test.label, np.full(len(test), data.splits["train"].label.mean()))
    assert metrics["test"]["auc"] > 0.6
    assert metrics["test"]["log_loss"] < constant - 0.02
    assert metrics["test"]["rig"] > 0.03


def test_meta_generator_beats_random_init_on_unseen_users(data, trained):
    model, _ = trained
    generator, info = train_meta(model, data, MetaConfig(steps=300, seed=0), progress=False)
    cold = data.splits["cold"]
    random_losses = [cold_start_metrics(model, None, cold, seed=s)["log_loss"] for s in range(3)]
    meta = cold_start_metrics(model, generator, cold)
    assert meta["log_loss"] < min(random_losses)
    # the base model stayed frozen
    assert all(not p.requires_grad for p in model.parameters())
    assert np.isfinite(info["final_loss"])


def test_checkpoint_round_trip(tmp_path, data, trained):
    model, metrics = trained
    generator, info = train_meta(model, data, MetaConfig(steps=5, seed=0), progress=False)
    path = Checkpoint.from_training(model, model.config, TrainConfig(), data, metrics,
                                    meta=MetaState(generator.state_dict(), info)).save(tmp_path / "ck.pt")
    loaded = Checkpoint.load(path)
    restored = loaded.build_model()
    np.testing.assert_allclose(predict(restored, data.splits["test"]), predict(model, data.splits["test"]),
                               atol=1e-6)
    assert loaded.model_config == model.config and loaded.metrics["test"] == metrics["test"]
    assert loaded.spec.fingerprint() == data.spec.fingerprint()
    assert loaded.schema.to_json() == data.schema.to_json()
    users = loaded.known_users
    assert len(users.user_ids) == len(users.history) == len(users.profile) > 0
    assert (users.history_len <= loaded.schema.max_history).all()
    np.testing.assert_array_equal(users.user_ids, data.known_users.user_ids)
    np.testing.assert_array_equal(users.profile, data.known_users.profile)
    np.testing.assert_array_equal(users.history_len, data.known_users.history_len)
    np.testing.assert_array_equal(users.history, data.known_users.history)
    profile = torch.as_tensor(data.splits["cold"].profile[:16])
    with torch.no_grad():
        torch.testing.assert_close(loaded.meta_generator()(profile), generator(profile))


def test_training_keeps_padding_rows_zero_and_loading_checks_them(tmp_path, data, trained):
    """Pooling relies on row PAD of the item tables being zero: training leaves it so (padding_idx gives it
    no gradient, weight decay keeps a zero at zero), and weights where it is not are refused."""
    model, metrics = trained
    assert model.base_model.nonzero_padding_rows() == []
    checkpoint = Checkpoint.from_training(model, model.config, TrainConfig(), data, metrics)
    name = "base.item_field_embs.0.weight"
    checkpoint.state_dict = {**checkpoint.state_dict, name: checkpoint.state_dict[name].clone()}
    checkpoint.state_dict[name][0, 0] = 0.5
    with pytest.raises(CheckpointError, match=r"row 0 \(padding\) of item_field_embs.0 is not zero"):
        checkpoint.build_model()


def test_checkpoint_load_refuses_other_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Checkpoint.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        Checkpoint.load(tmp_path / "junk.pt")
    torch.save({"format": "udg-checkpoint/1"}, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="retrain"):
        Checkpoint.load(tmp_path / "old.pt")


def test_cli_trains_evaluates_and_retrains_meta(tmp_path, capsys):
    from udg_cli import main

    out = tmp_path / "run" / "checkpoint.pt"
    args = ["train", "--spec", "synthetic", "--synthetic-users", "150", "--synthetic-items", "40", "--udg",
            "--epochs", "1", "--meta-steps", "5", "--cold-users", "0.2", "--quiet", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "test:  auc=" in printed and "cold-start users (meta)" in printed
    assert main(["evaluate", str(out), "--split", "test", "cold"]) == 0
    assert "test: auc=" in capsys.readouterr().out
    assert main(["meta", str(out), "--steps", "5"]) == 0
    assert "meta generator" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["pnn", "deepfm", "wide_deep", "din", "dien"])
def test_udg_flag_takes_the_preset_shipped_for_the_kind(kind):
    import argparse

    from model.commands import add_model_arguments, model_config_from
    from model.experiment import PRESETS, UDG_PRESET_BY_KIND

    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    config = model_config_from(parser.parse_args(["--model", kind, "--udg"]))
    shipped = PRESETS[UDG_PRESET_BY_KIND[kind]]
    assert config.udg and config.kind == kind
    assert (config.gate_detach, config.gate_scale) == (shipped.get("gate_detach", False),
                                                       shipped.get("gate_scale", 1.0))
    # --preset and the single gate options still override the shipped choice
    explicit = model_config_from(parser.parse_args(["--model", kind, "--udg", "--preset", "udg-official"]))
    assert explicit.gate_input == "official"
    assert model_config_from(parser.parse_args(["--model", kind, "--udg", "--gate-scale", "1"])).gate_scale == 1.0
