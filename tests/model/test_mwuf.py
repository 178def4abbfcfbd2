"""MWUF's warm-up networks for new users (model/mwuf.py) on a tiny untrained UDG model: at their start (scale 1,
shift 0) they are the untransformed row; the shift reads the history and the scale the profile; a training
step lowers the loss it takes; validation keeps the identity unless the networks beat it."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model.meta import mean_training_row, split_halves  # noqa: E402
from model.mwuf import MwufConfig, WarmUpNets, choose_mwuf, clicks_so_far, mwuf_loss, train_mwuf  # noqa: E402


@pytest.fixture(scope="module")
def world():
    from tests.tiny import tiny_untrained_udg

    data, model = tiny_untrained_udg()
    model.eval()
    with torch.no_grad():  # an untrained model's gates hardly read the UDG row: make them, so that the loss moves
        for parameter in model.gates.parameters():
            parameter.normal_(std=1.0)
    return data, model


def events(data, n=12):
    train = data.splits["train"]
    rows = np.arange(n)
    return (torch.as_tensor(train.profile[rows]), torch.as_tensor(train.histories.gather(rows)),
            torch.randn(n, 4, generator=torch.Generator().manual_seed(1)))


def test_fresh_networks_are_the_identity_and_read_profile_and_history(world):
    data, model = world
    profile, history, udg = events(data)
    nets = WarmUpNets.for_model(model)
    assert torch.equal(nets.warm(model, udg, profile, history), udg)  # scale exactly 1, shift exactly 0
    # once the last layers are not zero, the shift follows the history and the scale the profile
    with torch.no_grad():
        for layer in (nets.scale_out, nets.shift_out):
            layer.weight.normal_(std=0.5)
    assert (history != 0).any(dim=1).any() and not (history != 0).any(dim=1).all()
    empty = torch.zeros_like(history)
    assert not torch.allclose(nets.warm(model, udg, profile, history), nets.warm(model, udg, profile, empty))
    other = profile.roll(1, dims=0)
    assert not torch.allclose(nets.warm(model, udg, profile, empty) - nets.warm(model, udg, other, empty),
                              torch.zeros_like(udg))


@pytest.mark.parametrize("shift", ["event", "phase"])
def test_a_training_step_lowers_the_loss_of_its_batch(world, shift):
    data, model = world
    train = data.splits["train"]
    halves = split_halves(train)
    anchor = mean_training_row(model, train)
    config = MwufConfig(users_per_step=16, samples_per_user=4, alpha=0.5, gamma=0.3, shift=shift)
    nets = WarmUpNets.for_model(model, hidden=8, shift=shift)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    chosen = np.arange(16)
    loss = mwuf_loss(model, nets, anchor, train, halves, chosen, np.random.default_rng(3), config)
    optimizer = torch.optim.SGD(nets.parameters(), lr=5.0)
    optimizer.zero_grad()
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in nets.parameters())
    optimizer.step()
    after = mwuf_loss(model, nets, anchor, train, halves, chosen, np.random.default_rng(3), config)  # same events
    assert float(after.detach()) < float(loss.detach())


def test_training_freezes_model_and_networks_and_validation_may_keep_the_identity(world):
    data, model = world
    before = {k: v.clone() for k, v in model.state_dict().items()}
    nets, info = train_mwuf(model, data, MwufConfig(steps=3, hidden=8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not nets.training and not any(p.requires_grad for p in nets.parameters())
    assert info["config"]["steps"] == 3 and info["final_loss"] > 0
    chosen, info = choose_mwuf(model, data, MwufConfig(steps=3, hidden=8))
    assert set(info["validation"]) == {"mwuf", "identity"}
    scores = {k: v["score"] for k, v in info["validation"].items()}
    assert info["chosen"] == min(scores, key=scores.get)
    assert (chosen is None) == (info["chosen"] == "identity")
    # fresh networks score as the identity does (the same rows), trained ones do not
    from model.meta import validation_users
    from model.mwuf import mwuf_validation_loss

    _, held = validation_users(data, 0.2, 0)
    fresh = mwuf_validation_loss(model, WarmUpNets.for_model(model, 8), data, held, 0.1)
    assert fresh == pytest.approx(info["validation"]["identity"], abs=1e-6)
    assert info["validation"]["mwuf"]["cold"] != pytest.approx(fresh["cold"], abs=1e-6)


def test_the_phase_shift_reads_the_clicks_of_the_earlier_half_most_recent_first(world):
    data, _ = world
    train = data.splits["train"]
    halves = split_halves(train)
    users = np.arange(5)
    got = clicks_so_far(train, halves, users, width=3).numpy()
    for row, u in enumerate(users):
        rows = halves.a_rows[u]  # in time order
        clicked = [int(train.item[r]) for r in rows if train.label[r] > 0.5][::-1][:3]
        assert got[row].tolist() == clicked + [0] * (3 - len(clicked))
    with pytest.raises(ValueError, match="shift must read"):
        WarmUpNets(2, 2, 2, shift="later")


def test_the_shift_alone_keeps_the_scale_at_one(world):
    data, model = world
    profile, history, udg = events(data)
    nets, _ = train_mwuf(model, data, MwufConfig(steps=3, hidden=8, scale=False, beta=0.05))
    with torch.no_grad():
        torch.testing.assert_close(nets.warm(model, udg, profile, history),
                                   udg + nets.shift(model.base_model.behavior(history)))
        assert torch.equal(nets.scale(torch.randn(len(udg), 24)), torch.ones_like(udg))
        assert not torch.equal(nets.shift(model.base_model.behavior(history)), torch.zeros_like(udg))
