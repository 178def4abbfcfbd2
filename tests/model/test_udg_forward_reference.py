"""The UDG forward written again by hand from Eq. 6-9 (numpy, from the model's parameters) and compared with
the model's `score` for every base model kind and gate variant, with gates far from constant; and every
layer's gate is shown to move the output (a forward that gated only some layers would not match).

Only the base model's embedding layer and middle layer (Eq. 1-3: `item_fields`, `behavior`, `mlp_input`,
`side_logit`) are reused; the gating networks and the gated MLP are recomputed here, not called.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dataset.schema import PAD
from model.base import Items
from model.experiment import model_config
from model.train import seed_everything, to_tensors
from model.zoo import BASE_MODELS, build_model

PRESETS = ("udg", "udg-detach", "udg-official")


@pytest.fixture(scope="module")
def request_batch(warm_data):
    """One user with a non-empty history and 12 candidates: the serving shape (user side batch 1)."""
    tensors = to_tensors(warm_data.splits["train"])
    row = int(torch.nonzero((tensors["history"] != 0).sum(1) >= 2)[0])
    return {"user": tensors["user"][row:row + 1], "profile": tensors["profile"][row:row + 1],
            "history": tensors["history"][row:row + 1], "items": torch.arange(2, 14)}


def numpy_of(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().numpy()


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def spread_gates(model) -> None:
    """Gate output layers with large weights and biases: sigmoid outputs spread over (0, 1), far from 1/2;
    embeddings and MLP weights large enough that every layer's input carries signal."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for table in model.embedding_tables():
            table.weight.normal_(0.0, 0.5, generator=generator)
        for table in model.base.padded_tables().values():  # the model's invariant: padding embeds to zero
            table.weight[PAD].zero_()
        for layer in model.base.mlp.hidden:
            layer.weight.normal_(0.0, 0.5, generator=generator)
        for gate in model.gates:
            gate.third.weight.normal_(0.0, 3.0, generator=generator)
            gate.third.bias.normal_(0.0, 2.0, generator=generator)
            gate.second.weight.normal_(0.0, 0.7, generator=generator)
            for layer in (gate.first.user, *([gate.first.candidate] if gate.first.candidate is not None else [])):
                layer.weight.normal_(0.0, 1.0, generator=generator)


def gate_net(gate, gate_input: np.ndarray) -> np.ndarray:
    """Eq. 6: GN^(l) = three FC layers (ReLU, ReLU, sigmoid) on Concat(item, behavior, UDG user embedding)."""
    first = gate.first
    w1 = numpy_of(first.user.weight) if first.candidate is None else \
        np.concatenate([numpy_of(first.candidate.weight), numpy_of(first.user.weight)], axis=1)
    h = relu(gate_input @ w1.T + numpy_of(first.user.bias))
    h = relu(h @ numpy_of(gate.second.weight).T + numpy_of(gate.second.bias))
    return gate.scale * sigmoid(h @ numpy_of(gate.third.weight).T + numpy_of(gate.third.bias))


def reference_forward(model, batch, replace_gate: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(logits [N], gates per layer) from Eq. 6-9. `replace_gate=l` sets g^(l) to ones (that layer ungated)."""
    base, config = model.base, model.config
    n = len(batch["items"])
    items = base.lookup_items(batch["items"])
    user_vec = base.user_vector(batch["user"], batch["profile"])
    udg_vec = numpy_of(model.udg_emb.weight)[batch["user"].numpy()]  # E^UDG looked up by user id (Eq. 1)
    if config.gate_input == "paper":
        item = numpy_of(base.item_fields(items).flatten(-2))  # [N, item_dim]
        behavior = numpy_of(base.behavior(batch["history"]))  # [1, item_dim]
        gate_input = np.concatenate([item, np.repeat(behavior, n, 0), np.repeat(udg_vec, n, 0)], axis=1)
    else:  # the authors' code: UDG embedding and the profile embeddings, no item features
        profile = numpy_of(user_vec)[:, config.embed_dim:]
        gate_input = np.repeat(np.concatenate([udg_vec, profile], axis=1), n, 0)
    gates = [gate_net(gate, gate_input) for gate in model.gates]
    if replace_gate is not None:
        gates[replace_gate] = np.ones_like(gates[replace_gate])

    h = numpy_of(base.mlp_input(user_vec, batch["history"], Items(items.ids, items.fields)))  # h^(0), Eq. 3
    for layer_index, layer in enumerate(base.mlp.hidden):
        weight, bias = numpy_of(layer.weight), numpy_of(layer.bias)
        dynamic = weight[None, :, :] * gates[layer_index][:, None, :]  # Eq. 8: W_uit = W ⊙ [g]_(×d_l)^T
        h = relu(np.einsum("noi,ni->no", dynamic, h) + bias)  # Eq. 9
    if len(gates) > len(base.mlp.hidden):  # the variant that also gates the last hidden output
        h = gates[-1] * h
    logit = h @ numpy_of(base.mlp.out.weight)[0] + numpy_of(base.mlp.out.bias)[0]
    side = base.side_logit(user_vec, batch["history"], items)
    return (logit if side is None else logit + numpy_of(side)), gates


def model_score(model, batch) -> np.ndarray:
    user_vec, udg_vec = model.user_state(batch["user"], batch["profile"])
    return numpy_of(model.score(user_vec, udg_vec, batch["history"], batch["items"]))


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("kind", sorted(BASE_MODELS))
def test_hand_written_forward_equals_the_model_and_every_gate_matters(warm_data, request_batch, kind, preset):
    seed_everything(11)
    config = model_config(kind, preset, embed_dim=8, hidden=(16, 12), udg_dim=8, gate_hidden=10)
    model = build_model(config, warm_data.schema).eval()
    spread_gates(model)
    with torch.no_grad():
        expected, gates = reference_forward(model, request_batch)
        got = model_score(model, request_batch)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

        assert len(gates) == len(config.hidden) + (1 if config.gate_output_layer else 0)
        for layer, gate in enumerate(gates):
            # non-trivial: values far from any constant, per element and across candidates
            assert gate.std() > 0.15 and gate.min() < 0.2 * config.gate_scale and \
                gate.max() > 0.8 * config.gate_scale, (layer, gate.min(), gate.max(), gate.std())
            if config.gate_input == "paper":
                assert np.abs(np.diff(gate, axis=0)).max() > 0.05  # item-dependent: differs across candidates
            ungated, _ = reference_forward(model, request_batch, replace_gate=layer)
            assert np.abs(ungated - got).max() > 1e-2, f"the gate of layer {layer} does not move the output"


def test_masked_mean_is_the_mean_of_the_unmasked_rows_and_zero_for_an_empty_history():
    from model.layers import masked_mean

    generator = torch.Generator().manual_seed(3)
    values = torch.randn(5, 4, 3, generator=generator)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 1, 0], [1, 1, 0, 0]])
    expected = np.zeros((5, 3))
    for row in range(5):
        kept = numpy_of(values[row])[mask[row].numpy() == 1]
        if len(kept):
            expected[row] = kept.mean(0)
    np.testing.assert_allclose(numpy_of(masked_mean(values, mask)), expected, rtol=1e-6, atol=1e-7)


def test_padded_mean_equals_the_masked_mean_where_padding_rows_are_zero():
    from model.layers import masked_mean, padded_mean

    generator = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 1, 0]])
    values = torch.randn(4, 4, 3, generator=generator) * mask.unsqueeze(-1)
    torch.testing.assert_close(padded_mean(values, mask), masked_mean(values, mask), rtol=0, atol=0)


def test_behavior_ignores_padding_positions(warm_data):
    """A history padded with PAD has the behavior feature of its clicks alone: the mean of their rows."""
    torch.manual_seed(0)
    base = build_model(model_config("pnn", "udg", embed_dim=8, hidden=(16,), udg_dim=4, gate_hidden=8),
                       warm_data.schema).base
    clicks = torch.tensor([3, 5, 7])
    padded = torch.cat([clicks, torch.full((3,), PAD)])[None]
    rows = base.item_fields(clicks).flatten(-2)  # [3, item_dim]
    torch.testing.assert_close(base.behavior(padded), rows.mean(0, keepdim=True))
    assert not base.behavior(torch.full((1, 4), PAD)).any()  # an empty history: zeros


def test_mlp_dropout_acts_in_training_only():
    from model.layers import MLP

    torch.manual_seed(0)
    mlp = MLP(6, (32, 16), dropout=0.5)
    x = torch.randn(64, 6)
    mlp.train()
    assert not torch.equal(mlp(x), mlp(x))  # a fresh mask each call
    mlp.eval()
    h = x
    for layer in mlp.hidden:  # no dropout at all in eval mode
        h = torch.relu(layer(h))
    torch.testing.assert_close(mlp(x), mlp.out(h).squeeze(-1))


def test_official_gates_with_detached_inputs_match_the_reference(warm_data, request_batch):
    seed_everything(12)
    config = model_config("deepfm", "udg-official", gate_detach=True, embed_dim=8, hidden=(16, 12), udg_dim=8,
                          gate_hidden=10)
    model = build_model(config, warm_data.schema).eval()
    spread_gates(model)
    with torch.no_grad():
        np.testing.assert_allclose(model_score(model, request_batch), reference_forward(model, request_batch)[0],
                                   rtol=1e-4, atol=1e-4)


def test_training_forward_and_unseen_users_go_through_the_same_parts(warm_data):
    seed_everything(13)
    model = build_model(model_config("pnn", "udg", embed_dim=8, hidden=(16, 12), udg_dim=8, gate_hidden=10),
                        warm_data.schema).eval()
    batch = {k: v[:16] for k, v in to_tensors(warm_data.splits["train"]).items()}
    with torch.no_grad():
        user_vec, udg_vec = model.user_state(batch["user"], batch["profile"])
        expected = model.score(user_vec, udg_vec, batch["history"], batch["item"])
        torch.testing.assert_close(model(batch)["logit"], expected)
        torch.testing.assert_close(model.unseen_user_vector(batch["profile"]),
                                   model.base.unseen_user_vector(batch["profile"]))
    with pytest.raises(ValueError, match="gate_input must be 'paper' or 'official', not 'items'"):
        build_model(model_config("pnn", "udg", gate_input="items"), warm_data.schema)
