"""Tiny synthetic worlds for the tests: the built-in `synthetic` spec at a small size."""

from __future__ import annotations


def tiny_synthetic(users: int = 200, items: int = 60, events_per_user: int = 12, max_history: int = 50,
                   cold_user_frac: float = 0.0, **params):
    """The synthetic world's spec at a tiny size (`generator.params` overrides in `params`); the defaults of
    max_history and cold_user_frac are the spec's (50, none)."""
    from dataset.spec import load_spec

    overrides = {f"generator.params.{k}": v for k, v in
                 {"users": users, "items": items, "events_per_user": events_per_user, **params}.items()}
    return load_spec("synthetic").with_overrides(**overrides, **{"behavior.max_length": max_history,
                                                                 "split.cold_user_frac": cold_user_frac})


def tiny_prepared(**kwargs):
    from dataset.ingest import prepare

    return prepare(tiny_synthetic(**kwargs))


def tiny_untrained_udg():
    """(data, model): an untrained PNN+UDG model (seed 0) on a 60-user tiny world with 20 % cold users, for the
    meta generator's and MWUF's piece-by-piece tests (seconds, not a training run)."""
    import torch

    from model.experiment import model_config
    from model.zoo import build_model

    torch.set_num_threads(1)
    data = tiny_prepared(users=60, items=30, events_per_user=10, max_history=6, cold_user_frac=0.2)
    torch.manual_seed(0)
    model = build_model(model_config("pnn", "udg", embed_dim=8, hidden=(16,), udg_dim=4, gate_hidden=8), data.schema)
    return data, model
