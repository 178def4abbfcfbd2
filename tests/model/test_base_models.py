"""Every base model, with and without UDG: shapes, user-side broadcast parity, training, ONNX export."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dataset.schema import PAD
from model.base import ModelConfig
from model.train import TrainConfig, make_optimizer, to_tensors
from model.zoo import BASE_MODELS, base_of, build_model

KINDS = ["pnn", "deepfm", "wide_deep", "din", "dien"]
CASES = [(kind, udg) for kind in KINDS for udg in (False, True)]
CASE_IDS = [f"{kind}{'+udg' if udg else ''}" for kind, udg in CASES]
MAX_HISTORY = 6  # parity_data's history length (tests/conftest.py)


def make_model(data, kind: str, udg: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = ModelConfig(kind=kind, udg=udg, embed_dim=8, hidden=(32, 16), udg_dim=8, gate_hidden=16,
                         extra={"wide_hash_buckets": 1024})
    model = build_model(config, data.schema)
    # Scalar tables start at zero; randomise them so the side parts take part in the parity checks.
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(std=0.05)
    return model


def user_inputs(model: nn.Module, data, n: int, history_len: int):
    """One user (batch 1), their history with `history_len` clicks (rest padding), n candidates."""
    train = data.splits["train"]
    row = int(np.argmax((train.history != PAD).sum(1)))
    user = torch.as_tensor(train.user[row:row + 1])
    profile = torch.as_tensor(train.profile[row:row + 1])
    history = torch.as_tensor(train.history[row:row + 1]).clone()
    history[:, history_len:] = PAD
    items = torch.arange(2, 2 + n, dtype=torch.long) % len(data.schema.items)
    items = items.clamp(min=2)
    user_vec, udg_vec = model.user_state(user, profile)
    return user_vec, udg_vec, history, items


def test_registry_has_every_kind():
    assert set(KINDS) <= set(BASE_MODELS)


@pytest.mark.parametrize(("kind", "udg"), CASES, ids=CASE_IDS)
def test_forward_shapes_and_finite(parity_data, kind, udg):
    model = make_model(parity_data, kind, udg)
    model.eval()
    batch = {k: v[:64] for k, v in to_tensors(parity_data.splits["train"]).items()}
    with torch.no_grad():
        out = model(batch)
    assert out["logit"].shape == (64,)
    assert torch.isfinite(out["logit"]).all()


@pytest.mark.parametrize(("kind", "udg"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("history_len", [0, 3, MAX_HISTORY], ids=["empty", "partial", "full"])
def test_broadcast_parity(parity_data, kind, udg, history_len):
    """Scoring N candidates with the user side as batch 1 equals repeating it N times."""
    model = make_model(parity_data, kind, udg)
    model.eval()
    n = 9
    with torch.no_grad():
        user_vec, udg_vec, history, items = user_inputs(model, parity_data, n, history_len)
        assert (history != PAD).sum() == history_len
        single = model.score(user_vec, udg_vec, history, items)
        repeated = model.score(user_vec.expand(n, -1).contiguous(),
                               None if udg_vec is None else udg_vec.expand(n, -1).contiguous(),
                               history.expand(n, -1).contiguous(), items)
    assert single.shape == (n,)
    torch.testing.assert_close(single, repeated, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("kind", "udg"), CASES, ids=CASE_IDS)
def test_training_steps_reduce_loss(parity_data, kind, udg):
    model = make_model(parity_data, kind, udg)
    model.train()
    model.config.user_id_dropout = 0.0  # deterministic forward for the before/after comparison
    batch = {k: v[:256] for k, v in to_tensors(parity_data.splits["train"]).items()}
    optimizer = make_optimizer(model, TrainConfig(lr=1e-2))
    loss_fn = nn.BCEWithLogitsLoss()

    def loss_of(out):
        loss = loss_fn(out["logit"], batch["label"])
        return loss + out["aux_loss"] if "aux_loss" in out else loss

    torch.manual_seed(1)
    first = loss_of(model(batch))
    assert torch.isfinite(first)
    for _ in range(8):
        loss = loss_of(model(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.manual_seed(1)
    assert loss_of(model(batch)) < first


@pytest.mark.parametrize("udg", [False, True])
def test_dien_auxiliary_loss(parity_data, udg):
    model = make_model(parity_data, "dien", udg)
    model.train()
    batch = {k: v[:128] for k, v in to_tensors(parity_data.splits["train"]).items()}
    out = model(batch)
    assert "aux_loss" in out and out["aux_loss"].ndim == 0
    assert torch.isfinite(out["aux_loss"]) and out["aux_loss"] > 0
    out["aux_loss"].backward()
    assert base_of(model).extractor.hidden_proj.weight.grad.abs().sum() > 0
    # Without the cached states from scoring, the loss is computed from scratch.
    base = base_of(model)
    assert torch.isfinite(base.auxiliary_loss(None, batch["history"], base.lookup_items(batch["item"])))


class Scorer(nn.Module):
    """What the serving graph computes: one user's side (batch 1) against N candidates."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, user_vec, udg_vec, history, items):
        return self.model.score(user_vec, udg_vec, history, items)


class BaseScorer(Scorer):
    def forward(self, user_vec, history, items):
        return self.model.score(user_vec, None, history, items)


def export_onnx(model: nn.Module, example: tuple, names: list[str]) -> bytes:
    scorer = Scorer(model) if "udg_vec" in names else BaseScorer(model)
    dynamic = {"history": {1: "history_len"}, "items": {0: "candidates"}, "logit": {0: "candidates"}}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(scorer, example, buffer, dynamo=False, input_names=names, output_names=["logit"],
                          dynamic_axes=dynamic, opset_version=17)
    return buffer.getvalue()


@pytest.mark.parametrize(("kind", "udg"), CASES, ids=CASE_IDS)
def test_onnx_export_matches_torch(parity_data, kind, udg):
    ort = pytest.importorskip("onnxruntime")
    model = make_model(parity_data, kind, udg)
    model.eval()
    with torch.no_grad():
        user_vec, udg_vec, history, items = user_inputs(model, parity_data, 3, 2)
    names = ["user_vec", "udg_vec", "history", "items"] if udg else ["user_vec", "history", "items"]
    example = (user_vec, udg_vec, history[:, :4], items) if udg else (user_vec, history[:, :4], items)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(export_onnx(model, example, names), options,
                                   providers=["CPUExecutionProvider"])
    # all-padding history (the exportable form of "no clicks"), partial, full, and longer than the example
    for n, history_len, width in [(1, 0, 3), (7, 0, 5), (1, 2, 4), (7, 3, MAX_HISTORY), (7, MAX_HISTORY,
                                                                                       MAX_HISTORY)]:
        with torch.no_grad():
            user_vec, udg_vec, history, items = user_inputs(model, parity_data, n, history_len)
            history = history[:, :width].contiguous()
            expected = model.score(user_vec, udg_vec, history, items).numpy()
        feeds = {"user_vec": user_vec.numpy(), "history": history.numpy(), "items": items.numpy()}
        if udg:
            feeds["udg_vec"] = udg_vec.numpy()
        (got,) = session.run(None, feeds)
        assert got.shape == (n,)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5, err_msg=f"n={n} history={history_len}")


@pytest.mark.parametrize("kind", ["deepfm", "wide_deep"])
def test_per_field_weights_are_named_for_the_checkpoint(parity_data, kind):
    """Checkpoints hold these names: one first-order (and, Wide&Deep, one cross) table per item field and each
    item field's token table as a persistent buffer."""
    model = make_model(parity_data, kind, False)
    names = set(model.state_dict())
    fields = len(parity_data.schema.item_fields)
    assert {f"field_weights.{i}.weight" for i in range(fields)} <= names
    assert {f"item_field_table_{i}" for i in range(fields)} <= names
    if kind == "wide_deep":
        assert {f"field_cross_weights.{i}.weight" for i in range(fields)} <= names
    assert not any("genre" in name for name in names)
    for i, spec in enumerate(parity_data.schema.item_fields):
        np.testing.assert_array_equal(model.state_dict()[f"item_field_table_{i}"].numpy(),
                                      parity_data.schema.item_table[spec.name])
