"""`udg coldstart`: the new-user protocol's split, its phases and arms, the journal, and the command."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dataset.schema import OOV
from model.coldstart import (
    ARMS,
    DEFAULT_ARMS,
    PHASES,
    PretrainCache,
    Protocol,
    WarmConfig,
    build_split,
    run_grid,
    run_seed,
    user_event_counts,
)
from model.report import RunJournal
from model.train import TrainConfig
from tests.tiny import tiny_prepared

PROTOCOL = Protocol(k=6, band=(28, 36), active_min=34, new_user_frac=0.4)
TRAIN = TrainConfig(epochs=1, threads=1)
WARM = WarmConfig(batch_size=32)


@pytest.fixture(scope="module")
def data():
    """Every user has 40 events; the held-out users lose 0-15 of their latest, and some training users their
    valid and test events, so that event counts spread over and beyond the band and T."""
    data = tiny_prepared(users=90, items=30, events_per_user=40, cold_user_frac=PROTOCOL.new_user_frac)
    cold = data.splits["cold"]
    rng = np.random.default_rng(0)
    cut = rng.integers(0, 16, size=len(data.user_ids))
    position = np.zeros(len(cold), np.int64)
    for key in np.unique(cold.user_key):
        rows = np.flatnonzero(cold.user_key == key)
        position[rows] = np.arange(len(rows))
    splits = dict(data.splits, cold=cold.subset(position < 40 - cut[cold.user_key]))
    light = np.zeros(len(data.user_ids), bool)
    light[rng.choice(len(light), size=20, replace=False)] = True
    for name in ("valid", "test"):
        splits[name] = splits[name].subset(~light[splits[name].user_key])
    return replace(data, splits=splits)


@pytest.fixture(scope="module")
def split(data):
    return build_split(data, PROTOCOL)


@pytest.fixture(scope="module")
def seed_rows(split):
    return run_seed(split, "pnn", 0, list(ARMS), TRAIN, meta_steps=5, warm=WARM)


def test_users_are_split_as_specified(data, split):
    counts = user_event_counts(data)
    cold_users = set(np.unique(data.splits["cold"].user_key))
    new = set(split.new_users.tolist())
    active = set(np.unique(split.active.splits["train"].user_key).tolist())
    assert new and active and not new & active
    assert new <= cold_users and not active & cold_users
    lo, hi = PROTOCOL.band
    assert all(lo <= counts[u] <= hi for u in new)
    # the band is respected: held-out users outside it are no new users
    assert {u for u in cold_users if lo <= counts[u] <= hi} == new
    assert any(counts[u] < lo for u in cold_users)
    assert all(counts[u] >= PROTOCOL.active_min for u in active)
    assert any(counts[u] < PROTOCOL.active_min for u in set(range(len(counts))) - cold_users)
    for name in ("valid", "test"):
        assert set(np.unique(split.active.splits[name].user_key).tolist()) <= active
    assert split.info["new_users"] == len(new)


def test_batches_are_k_events_each_in_time_order(data, split):
    k = PROTOCOL.k
    cold = data.splits["cold"]
    for user in split.new_users:
        own = cold.histories.end[cold.user_key == user]
        parts = {name: split.batches[name].user_key == user for name in ("a", "b", "c", "rest")}
        assert [int(parts[n].sum()) for n in ("a", "b", "c")] == [k, k, k]
        assert sum(int(m.sum()) for m in parts.values()) == len(own)
        # clicks before an event only grow with time: each batch's events come after the previous batch's
        ends = [split.batches[n].histories.end[parts[n]] for n in ("a", "b", "c", "rest")]
        lengths = [split.batches[n].histories.length[parts[n]] for n in ("a", "b", "c", "rest")]
        for earlier, later in zip(ends, ends[1:], strict=False):
            assert earlier.max() <= later.min()
        assert np.all(np.diff(np.concatenate(lengths)) >= 0)


def test_new_users_are_in_no_vocabulary(data, split):
    vocab = split.active.schema.users
    assert not any(vocab.known(str(raw)) for raw in data.user_ids[split.new_users])
    for name in ("a", "b", "c", "rest"):
        assert np.all(split.batches[name].user == OOV)
        # their profile values are known tokens of the training users' vocabularies
        assert np.all(split.batches[name].profile > OOV)


def test_every_arm_is_evaluated_at_every_phase_and_warm_up_moves_embeddings(seed_rows):
    assert set(seed_rows) == set(ARMS)
    for arm, row in seed_rows.items():
        assert (row["model"], row["variant"], row["seed"]) == ("pnn", arm, 0)
        assert list(row["phases"]) == list(PHASES)
        for metrics in row["phases"].values():
            assert 0 < metrics["auc"] < 1 and metrics["log_loss"] > 0
        shift = row["embedding_shift"]
        assert shift["cold"] == 0 and shift["a"] > 0 and shift["c"] > 0
    # the arms start apart
    assert seed_rows["meta"]["phases"]["cold"] != seed_rows["random"]["phases"]["cold"]


def test_warm_up_of_embeddings_only_leaves_the_model_alone(split, seed_rows):
    import torch
    from torch import nn

    from model.coldstart import initial_embeddings, warm_up
    from model.experiment import model_config
    from model.zoo import build_model

    model = build_model(model_config("pnn", "udg"), split.active.schema)
    for update in ("embeddings", "model"):
        before = [p.detach().clone() for p in model.parameters()]
        init = initial_embeddings("random", model, None, split, 0)
        table = nn.Embedding.from_pretrained(init.clone(), freeze=False)
        warm_up(model, table, split.batches["a"], split, TRAIN, replace(WARM, update=update), 0, 1)
        assert not torch.equal(table.weight.detach(), init)
        unchanged = all(torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
        assert unchanged == (update == "embeddings")


def test_the_journal_resumes(tmp_path, split, seed_rows, monkeypatch):
    import model.coldstart as coldstart

    journal = RunJournal(tmp_path / "runs.jsonl", {"setup": 1})
    for row in seed_rows.values():
        journal.add(row)
    calls = []

    def fake_seed(split, kind, seed, arms, *args):
        calls.append((kind, seed, tuple(arms)))
        return {arm: {**seed_rows[arm], "seed": seed} for arm in arms}

    monkeypatch.setattr(coldstart, "run_seed", fake_seed)
    reopened = RunJournal(tmp_path / "runs.jsonl", {"setup": 1})
    rows = run_grid(split, ["pnn"], list(ARMS), 2, TRAIN, 5, WARM, reopened)
    assert calls == [("pnn", 1, ARMS)]  # seed 0 came from the journal
    assert sorted((r["variant"], r["seed"]) for r in rows) == sorted((a, s) for a in ARMS for s in (0, 1))
    assert run_grid(split, ["pnn"], list(ARMS), 2, TRAIN, 5, WARM, RunJournal(tmp_path / "runs.jsonl",
                                                                           {"setup": 1})) and len(calls) == 1
    # another setup redoes the runs
    assert RunJournal(tmp_path / "runs.jsonl", {"setup": 2}).get("pnn", "meta", 0) is None


def test_the_command_runs_end_to_end(tmp_path, capsys):
    from udg_cli import main

    out = tmp_path / "coldstart"
    args = ["coldstart", "--spec", "synthetic", "--synthetic-users", "60", "--synthetic-items", "30",
            "--set", "generator.params.events_per_user=24", "--k", "5", "--band", "16,24", "--active-min", "10",
            "--new-user-frac", "0.4", "--seeds", "1", "--epochs", "1", "--meta-steps", "3", "--threads", "1",
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "RelaImpr" in printed and "w/o Meta" in printed
    assert (out / "report.md").exists() and (out / "coldstart.png").stat().st_size > 0
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(DEFAULT_ARMS)
    (out / "report.md").unlink()
    assert main([*args, "--summary-only"]) == 0
    assert (out / "report.md").read_text().count("| auc |") == len(DEFAULT_ARMS)
    # the residual arm joins the same journal (the same setup), compared with Meta and the baselines
    assert main([*args, "--arms", ",".join(ARMS), "--cache", str(tmp_path / "cache")]) == 0
    report = (out / "report.md").read_text()
    assert report.count("| auc |") == len(ARMS) and "AUC of Meta (mean row + residual) minus" in report
    # other generator settings are another setup: the earlier runs are not reused
    with pytest.raises(SystemExit, match="no finished runs"):
        main([*args, "--arms", "meta", "--phase-a-history", "--summary-only"])


def test_residual_generator_starts_at_the_mean_row_and_survives_a_checkpoint(split):
    import torch

    from model.checkpoint import MetaState
    from model.coldstart import initial_embeddings
    from model.experiment import model_config
    from model.meta import MetaConfig, MetaGenerator, choose_shrink, mean_training_row
    from model.zoo import build_model

    torch.manual_seed(0)
    model = build_model(model_config("pnn", "udg"), split.active.schema)
    mean = initial_embeddings("mean", model, None, split, 0)
    anchor = mean_training_row(model, split.active.splits["train"])
    zero = MetaGenerator(split.active.schema, model.config.udg_dim, anchor)
    assert zero.variant == "residual"
    assert torch.equal(initial_embeddings("residual", model, zero, split, 0), mean)
    # nothing to choose from: validation keeps the mean row
    generator, info = choose_shrink(model, split.active, MetaConfig(steps=3), grid=())
    assert info["chosen"] == "mean row" and torch.equal(initial_embeddings("residual", model, generator, split, 0),
                                                        mean)
    # a trained residual moves away from it, and a checkpoint's generator is the same function
    generator, info = choose_shrink(model, split.active, MetaConfig(steps=20, beta=1e-2), grid=(0.0,))
    profiles = torch.as_tensor(split.active.splits["train"].profiles[split.new_users])
    if info["chosen"] != "mean row":
        assert not torch.equal(generator(profiles), mean)
    restored = MetaState(generator.state_dict()).generator(split.active.schema, model.config.udg_dim)
    assert restored.variant == "residual" and torch.equal(restored(profiles), generator(profiles).detach())
    assert "anchor" not in MetaGenerator(split.active.schema, model.config.udg_dim).state_dict()


def test_the_pretrain_cache_gives_the_same_rows(tmp_path, split):
    cache = PretrainCache(tmp_path / "cache", {"test": 1})
    first = run_seed(split, "pnn", 0, ["residual", "mean"], TRAIN, meta_steps=5, warm=WARM, cache=cache)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # the model and the residual generator
    again = run_seed(split, "pnn", 0, ["residual", "mean"], TRAIN, meta_steps=5, warm=WARM, cache=cache)
    for arm in ("residual", "mean"):
        assert again[arm]["phases"] == first[arm]["phases"]


@pytest.fixture(scope="module")
def pretrained(split):
    from model.experiment import model_config, udg_preset
    from model.train import train_model

    model, _ = train_model(split.active, model_config("pnn", udg_preset("pnn")), TRAIN, progress=False)
    return model


def test_mwuf_arm_with_fresh_networks_is_the_mean_arm(split, pretrained, seed_rows):
    import torch

    from model.coldstart import initial_embeddings, run_arm
    from model.mwuf import WarmUpNets

    init = initial_embeddings("mwuf", pretrained, None, split, 0)
    assert torch.equal(init, initial_embeddings("mean", pretrained, None, split, 0))
    plain = run_arm(pretrained, init, split, TRAIN, WARM, 0)
    for shift in ("event", "phase"):
        nets = WarmUpNets.for_model(pretrained, shift=shift)
        identity = run_arm(pretrained, init, split, TRAIN, WARM, 0, nets=nets)
        for phase in PHASES:  # scale exactly 1 and shift exactly 0: the same rows, gradients and steps
            assert identity["phases"][phase] == pytest.approx(plain["phases"][phase], abs=1e-6)
    # the grid's mwuf arms ran their networks (or validation's identity) through every phase
    for arm in ("mwuf", "mwuf-phase"):
        assert set(seed_rows[arm]["phases"]) == set(PHASES)
        assert seed_rows[arm]["generator"]["chosen"] in ("mwuf", "identity")


def test_warm_base_user_rows_start_at_the_oov_row_and_are_warmed(split, pretrained):
    import torch

    from model.coldstart import initial_embeddings, run_arm
    from model.new_users import NewUserTable

    init = initial_embeddings("mean", pretrained, None, split, 0)
    embeddings_only = replace(WARM, update="embeddings")
    plain = run_arm(pretrained, init, split, TRAIN, embeddings_only, 0)
    warmed = run_arm(pretrained, init, split, TRAIN, replace(embeddings_only, base_user=True), 0)
    # the cold phase serves the OOV row either way; warm-up then moves the users' own rows
    assert warmed["phases"]["cold"] == pytest.approx(plain["phases"]["cold"], abs=1e-6)
    assert warmed["phases"]["c"]["log_loss"] != pytest.approx(plain["phases"]["c"]["log_loss"], abs=1e-6)
    oov = pretrained.base_model.user_emb.weight[OOV].detach()
    table = NewUserTable(init, False, base_init=oov.expand(len(init), -1).clone())
    assert table.extra_rows() == [table.base.weight]
    batch = {"profile": torch.as_tensor(split.batches["a"].profile[:4])}
    user_vec, _ = table.vectors(pretrained, batch, torch.zeros(4, dtype=torch.long))
    assert torch.equal(user_vec, pretrained.unseen_user_vector(batch["profile"]))
