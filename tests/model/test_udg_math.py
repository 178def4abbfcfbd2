"""UDG model math: gates at 1 give the base model, Eq. 7 equals Eq. 8-9, broadcasting the user side."""

from __future__ import annotations

import pytest
import torch

from model.experiment import model_config
from model.layers import SplitLinear
from model.train import seed_everything, to_tensors
from model.udg import UDG
from model.zoo import build_model


@pytest.fixture(scope="module")
def batch(warm_data):
    tensors = to_tensors(warm_data.splits["train"])
    return {k: v[:32] for k, v in tensors.items()}


def test_gates_fixed_at_one_equal_the_base_model(warm_data, batch):
    seed_everything(0)
    udg = build_model(model_config("pnn", "udg"), warm_data.schema).eval()
    user_vec, udg_vec = udg.user_state(batch["user"], batch["profile"])
    udg.gate_values = lambda *args: [torch.ones(1, d) for d in udg.base.mlp.layer_input_dims[:len(udg.gates)]]
    gated = udg.score(user_vec, udg_vec, batch["history"], batch["item"])
    plain = udg.base.score(user_vec, None, batch["history"], batch["item"])
    torch.testing.assert_close(gated, plain, rtol=0, atol=1e-6)


def test_equation_7_equals_dynamic_weights_of_equations_8_and_9(warm_data, batch):
    """ReLU(W (g ⊙ h) + b) == ReLU(W_uit h + b) with W_uit = W ⊙ [g]_(×d_l)^T, per sample."""
    seed_everything(1)
    udg = build_model(model_config("pnn", "udg"), warm_data.schema).eval()
    user_vec, udg_vec = udg.user_state(batch["user"], batch["profile"])
    h = udg.base.mlp_input(user_vec, batch["history"], batch["item"])
    gates = udg.gate_values(user_vec, udg_vec, batch["history"], batch["item"])
    for layer, gate in zip(udg.base.mlp.hidden, gates, strict=False):
        eq7 = torch.relu(layer(gate * h))
        dynamic = layer.weight.unsqueeze(0) * gate.unsqueeze(1)  # [B, d_l, d_{l-1}]: W ⊙ g broadcast over rows
        eq9 = torch.relu(torch.einsum("boi,bi->bo", dynamic, h) + layer.bias)
        torch.testing.assert_close(eq7, eq9, rtol=1e-5, atol=1e-5)
        h = eq7
    assert len(gates) == len(udg.base.mlp.hidden)


@pytest.mark.parametrize("preset", ["base", "udg", "udg-detach", "udg-official"])
def test_one_user_broadcast_equals_repeated_user(warm_data, batch, preset):
    seed_everything(2)
    model = build_model(model_config("pnn", preset), warm_data.schema).eval()
    user_vec, udg_vec = model.user_state(batch["user"][:1], batch["profile"][:1])
    history = batch["history"][:1]
    items = batch["item"][:9]
    once = model.score(user_vec, udg_vec, history, items)
    n = len(items)
    repeated = model.score(user_vec.expand(n, -1), None if udg_vec is None else udg_vec.expand(n, -1),
                           history.expand(n, -1), items)
    torch.testing.assert_close(once, repeated, rtol=0, atol=1e-6)


def test_split_linear_equals_linear_on_concatenation():
    torch.manual_seed(0)
    split = SplitLinear(3, 5, 4)
    c, u = torch.randn(7, 3), torch.randn(1, 5)
    weight = torch.cat([split.candidate.weight, split.user.weight], dim=1)
    expected = torch.cat([c, u.expand(7, -1)], dim=1) @ weight.T + split.user.bias
    torch.testing.assert_close(split(c, u), expected)


def test_gate_options_shape_the_network(warm_data):
    official = build_model(model_config("pnn", "udg-official"), warm_data.schema)
    assert isinstance(official, UDG)
    assert len(official.gates) == len(official.config.hidden) + 1  # the last hidden output is gated too
    assert official.gates[0].first.candidate is None  # official gates see no item features
    scaled = build_model(model_config("pnn", "udg-detach"), warm_data.schema)
    assert scaled.config.gate_scale == 2.0 and scaled.config.gate_detach


def test_gate_detach_stops_gradients_into_main_tables(warm_data, batch):
    seed_everything(3)
    model = build_model(model_config("pnn", "udg-detach"), warm_data.schema)
    model.train()
    user_vec, udg_vec = model.user_state(batch["user"], batch["profile"])
    gates = model.gate_values(user_vec, udg_vec, batch["history"], batch["item"])
    sum(g.sum() for g in gates).backward()
    assert model.base.item_emb.weight.grad is None or model.base.item_emb.weight.grad.abs().sum() == 0
    assert model.udg_emb.weight.grad.abs().sum() > 0
