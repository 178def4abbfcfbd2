"""`udg coldstart`'s sweeps: the UDG table's own weight decay and the UDG-row diagnostic, the meta arm's
Algorithm 1 settings chosen on held-out active users, and the warm-up step chosen on a validation cut of the
new users."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from model.coldstart import (
    GeneratorOptions,
    Protocol,
    WarmConfig,
    build_split,
    diagnostics,
    new_user_cut,
    parse_meta_grid,
    run_arm,
    run_seed,
    setup_of,
    udg_dependence,
)
from model.train import TrainConfig
from tests.tiny import tiny_prepared

PROTOCOL = Protocol(k=6, band=(28, 40), active_min=34, new_user_frac=0.4)
TRAIN = TrainConfig(epochs=1, threads=1)
EVENT_SGD = WarmConfig(batch_size=32, update="embeddings", rule="event-sgd")


@pytest.fixture(scope="module")
def split():
    return build_split(tiny_prepared(users=90, items=30, events_per_user=40, cold_user_frac=0.4), PROTOCOL)


@pytest.fixture(scope="module")
def model(split):
    from model.experiment import model_config, udg_preset
    from model.train import train_model

    return train_model(split.active, model_config("pnn", udg_preset("pnn")), TRAIN, progress=False)[0]


def test_the_diagnostic_sees_no_dependence_when_every_row_is_the_mean(split, model):
    import copy

    import torch

    test = split.active.splits["test"]
    trained = udg_dependence(model, test)
    assert trained["row_spread"] > 0 and trained["gate_shift"] > 0 and trained["gate_std"] > 0
    same = copy.deepcopy(model)
    with torch.no_grad():
        rows = torch.as_tensor(np.unique(test.user))
        same.udg_emb.weight[rows] = same.udg_emb.weight[rows].mean(0)
    flat = udg_dependence(same, test)
    assert flat["row_spread"] == pytest.approx(0, abs=1e-6) and flat["gate_shift"] == pytest.approx(0, abs=1e-6)
    assert flat["auc_own_row"] == pytest.approx(flat["auc_mean_row"], abs=1e-9)


def test_the_udg_weight_decay_reaches_pretraining_and_the_journal_only_when_set(split):
    from model.experiment import model_config, udg_preset
    from model.train import make_optimizer
    from model.zoo import build_model

    udg = build_model(model_config("pnn", udg_preset("pnn")), split.active.schema)
    decays = {id(p): g["weight_decay"] for g in make_optimizer(udg, replace(TRAIN, udg_weight_decay=0.0)).param_groups
              for p in g["params"]}
    assert decays[id(udg.udg_emb.weight)] == 0.0
    assert decays[id(udg.base.embedding_tables()[0].weight)] == TRAIN.embed_weight_decay
    rows = run_seed(split, "pnn", 0, ["mean"], replace(TRAIN, udg_weight_decay=0.0), 3, EVENT_SGD)
    assert rows["mean"]["pretrain"]["udg_weight_decay"] == 0.0
    assert "udg_weight_decay" not in run_seed(split, "pnn", 0, ["mean"], TRAIN, 3, EVENT_SGD)["mean"]["pretrain"]


def test_the_meta_arm_takes_the_setting_validation_scores_best(split, model):
    from model.meta import MetaConfig, candidate_name, choose_meta

    grid = parse_meta_grid("0.1:0.1:0,0.5:0:1")
    assert grid == ((0.1, 0.1, False), (0.5, 0.0, True))
    generator, info = choose_meta(model, split.active, MetaConfig(steps=5, beta=1e-2), grid)
    names = [candidate_name(*c) for c in grid]
    assert list(info["validation"]) == names
    assert info["chosen"] == min(names, key=lambda n: info["validation"][n]["score"])
    chosen = grid[names.index(info["chosen"])]
    assert (info["config"]["alpha"], info["config"]["gamma"], info["config"]["phase_a_history"]) == chosen
    assert generator.variant == "tanh" and info["fit_users"] + info["valid_users"] > info["fit_users"] > 0
    with pytest.raises(SystemExit, match="ALPHA:GAMMA:HISTORY"):
        parse_meta_grid("0.1:0.1")
    assert "meta_grid" not in GeneratorOptions().changed()


def test_the_warm_up_step_is_chosen_on_new_users_the_tables_do_not_score(tmp_path, split):
    from model.coldstart import PretrainCache, initial_embeddings

    valid, test = new_user_cut(split, 0.3)
    users = {name: set(np.unique(s.batches["rest"].user_key).tolist()) for name, s in (("v", valid), ("t", test))}
    assert users["v"] and users["t"] and not users["v"] & users["t"]
    assert users["v"] | users["t"] == set(split.new_users.tolist())
    for name in ("a", "b", "c", "rest"):
        assert len(valid.batches[name]) + len(test.batches[name]) == len(split.batches[name])
    warm = replace(EVENT_SGD, lr_grid=(0.0, 3.0))
    cache = PretrainCache(tmp_path, {"test": 1})
    row = run_seed(split, "pnn", 0, ["mean"], TRAIN, 3, warm, cache=cache)["mean"]
    step = row["warm_step"]
    scores = {float(k): v["score"] for k, v in step["validation"].items()}
    assert step["chosen"] == max(scores, key=scores.get)
    assert (step["valid_users"], step["test_users"]) == (len(users["v"]), len(users["t"]))
    # a zero step leaves the validation AUC at its cold start
    assert len(set(step["validation"]["0"]["auc"].values())) == 1
    # the reported phases are the test users' alone, warmed with the chosen step
    model = cache.get("pnn-0")[0]
    init = initial_embeddings("mean", model, None, split, 0)
    assert run_arm(model, init, test, TRAIN, replace(warm, lr=step["chosen"]), 0)["phases"] == row["phases"]
    # without a grid the journal's warm setup is what it was before the option existed
    assert "lr_grid" not in setup_of(EVENT_SGD) and setup_of(warm)["lr_grid"] == (0.0, 3.0)
    # the report's extra tables come from these rows only: an older journal's rows add none
    text = diagnostics([row])
    assert "reads the UDG row" in text and "| mean known-user row | " in text and "step 3" in text
    older = {k: v for k, v in row.items() if k != "warm_step"}
    older["pretrain"] = {k: v for k, v in row["pretrain"].items() if k != "udg_dependence"}
    assert diagnostics([older]) == ""
