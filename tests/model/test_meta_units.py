"""The meta generator (model/meta.py) piece by piece, on a tiny untrained UDG model (seconds, not a training
run): the generator is tanh(bias + one row per profile field); D^A / D^B are each user's earlier and later
halves; one step of `train_meta` equals Algorithm 1 written out here; the cold-start metrics score what they
say (the generator's rows, or one random row per user)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model import meta  # noqa: E402
from model.meta import MetaConfig, MetaGenerator, cold_start_metrics, split_halves, train_meta  # noqa: E402
from model.metrics import all_metrics  # noqa: E402


@pytest.fixture(scope="module")
def world():
    from tests.tiny import tiny_untrained_udg

    return tiny_untrained_udg()


def test_the_generator_is_tanh_of_the_bias_plus_one_row_per_field(world):
    data, _ = world
    torch.manual_seed(1)
    generator = MetaGenerator(data.schema, 4)
    assert [table.num_embeddings for table in generator.fields] == [len(f.vocab) for f in data.schema.user_fields]
    assert torch.equal(generator.bias, torch.zeros(4))
    weights = torch.cat([table.weight.detach().reshape(-1) for table in generator.fields])
    assert 0.005 < float(weights.std()) < 0.02  # N(0, 0.01): small, not the default N(0, 1)
    with torch.no_grad():
        generator.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
        profile = torch.as_tensor(data.splits["train"].profile[:5])
        expected = torch.tanh(generator.bias + sum(table.weight[profile[:, i]]
                                                   for i, table in enumerate(generator.fields)))
        torch.testing.assert_close(generator(profile), expected)


def test_each_user_is_split_into_an_earlier_and_a_later_half(world):
    data, _ = world
    train = data.splits["train"]
    halves = split_halves(train)
    rows_of = {}
    for row, key in enumerate(train.user_key.tolist()):
        rows_of.setdefault(key, []).append(row)
    kept = [key for key, rows in sorted(rows_of.items()) if len(rows) >= 2]
    assert halves.users.tolist() == kept
    for u, key in enumerate(kept):
        rows = rows_of[key]
        assert halves.a_rows[u].tolist() == rows[:len(rows) // 2] and halves.b_rows[u].tolist() == rows[len(rows) // 2:]
        assert halves.profile[u].tolist() == train.profiles[key].tolist()
    one_each = train.__class__(**{**train.__dict__, "user_key": np.arange(len(train.user_key))})
    empty = split_halves(one_each)  # nobody with two events: no users, a [0, fields] profile
    assert len(empty.users) == 0 and empty.profile.shape == (0, train.profiles.shape[1])
    assert empty.profile.dtype == np.int64  # indices, like every profile


def test_the_per_user_loss_is_each_users_mean_cross_entropy(world):
    data, model = world
    model.eval()
    train = data.splits["train"]
    rows = np.arange(12)
    owner = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3])
    profile = torch.as_tensor(train.profile[[0, 3, 5, 10]])
    udg = torch.randn(4, 4) * 0.1
    history = torch.as_tensor(train.histories.gather(rows))
    items, labels = torch.as_tensor(train.item[rows]), torch.as_tensor(train.label[rows])
    got = meta._per_user_loss(model, udg, profile, history, items, labels, owner)
    with torch.no_grad():
        logits = model.score(model.unseen_user_vector(profile)[owner], udg[owner], history, items)
        each = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        expected = torch.stack([each[owner == u].mean() for u in range(4)])
    torch.testing.assert_close(got, expected)
    # a user without samples has loss 0, not NaN
    assert meta._per_user_loss(model, torch.zeros(5, 4), torch.as_tensor(train.profile[[0, 3, 5, 10, 11]]), history,
                               items, labels, owner)[4] == 0


def reference_step(model, data, config: MetaConfig) -> MetaGenerator:
    """Algorithm 1, one outer step, written from the paper: generate, a loss without behaviour (A), one inner
    gradient step alpha on the generated row, a loss with behaviour (B), Adam on gamma L_A + (1 - gamma) L_B."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = MetaGenerator(data.schema, model.config.udg_dim)
    optimizer = torch.optim.Adam(generator.parameters(), lr=config.beta)
    train = data.splits["train"]
    halves = split_halves(train)
    k = config.samples_per_user
    chosen = rng.choice(len(halves.users), size=min(config.users_per_step, len(halves.users)), replace=False)
    a_rows = [rng.choice(halves.a_rows[u], size=k) for u in chosen]
    b_rows = [rng.choice(halves.b_rows[u], size=k) for u in chosen]
    profile = torch.as_tensor(halves.profile[chosen])
    generated = generator(profile)
    user_vec = model.unseen_user_vector(profile)

    def loss_of(udg_row, user, rows, history):
        items, labels = torch.as_tensor(train.item[rows]), torch.as_tensor(train.label[rows])
        logits = model.score(user.expand(k, -1), udg_row.expand(k, -1), history, items)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)

    losses_a, losses_b = [], []
    for j in range(len(chosen)):
        empty = torch.zeros((k, train.histories.width), dtype=torch.long)
        loss_a = loss_of(generated[j:j + 1], user_vec[j:j + 1], a_rows[j], empty)
        (grad,) = torch.autograd.grad(loss_a, generated, create_graph=True)
        adapted = generated[j:j + 1] - config.alpha * grad[j:j + 1]
        history = torch.as_tensor(train.histories.gather(b_rows[j]))
        losses_a.append(loss_a)
        losses_b.append(loss_of(adapted, user_vec[j:j + 1], b_rows[j], history))
    loss = config.gamma * torch.stack(losses_a).mean() + (1 - config.gamma) * torch.stack(losses_b).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return generator


def test_one_step_of_train_meta_is_algorithm_1(world):
    data, model = world
    config = MetaConfig(steps=1, users_per_step=6, samples_per_user=3, alpha=0.7, beta=0.05, gamma=0.3, seed=4)
    generator, info = train_meta(model, data, config, progress=False)
    expected = reference_step(model, data, config)
    for got, want in zip(generator.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not generator.training and info["config"] == asdict(config)
    # and the step moved the generator: the comparison is not between two untouched initialisations
    torch.manual_seed(config.seed)
    untouched = MetaGenerator(data.schema, model.config.udg_dim)
    assert not torch.allclose(untouched.bias, generator.bias)


def test_training_freezes_the_model_and_reports_the_last_losses(world, monkeypatch):
    data, model = world
    before = [p.detach().clone() for p in model.parameters()]
    config = MetaConfig(steps=60, users_per_step=4, samples_per_user=2, seed=1)
    seen = []
    original = torch.optim.Adam.step

    def step(self, *args, **kwargs):
        seen.append(1)
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    generator, info = train_meta(model, data, config, progress=False)
    assert len(seen) == 60 and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert 0.1 < info["final_loss"] < 2.0
    again, _ = train_meta(model, data, config, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(generator.parameters(), again.parameters(), strict=True))
    other, _ = train_meta(model, data, MetaConfig(steps=2, users_per_step=4, samples_per_user=2, seed=2),
                          progress=False)
    assert not torch.equal(other.bias, generator.bias)


def test_only_a_udg_model_has_a_meta_generator(world):
    data, _ = world
    with pytest.raises(TypeError, match="the meta generator produces UDG embeddings: train a model with --udg first"):
        train_meta(torch.nn.Linear(2, 2), data, MetaConfig(steps=1), progress=False)


def test_cold_start_metrics_score_the_generators_rows_or_one_random_row_per_user(world):
    data, model = world
    samples = data.splits["test"] if len(data.splits["test"]) else data.splits["valid"]
    torch.manual_seed(3)
    generator = MetaGenerator(data.schema, model.config.udg_dim)
    profile = torch.as_tensor(samples.profile)
    history = torch.as_tensor(samples.histories.gather(np.arange(len(samples))))
    items = torch.as_tensor(samples.item)

    def metrics(udg, hist):
        with torch.no_grad():
            probs = torch.sigmoid(model.score(model.unseen_user_vector(profile), udg, hist, items))
        return all_metrics(samples.label, probs.numpy())

    with torch.no_grad():
        assert cold_start_metrics(model, generator, samples) == pytest.approx(metrics(generator(profile), history))
        assert cold_start_metrics(model, generator, samples, with_history=False) == pytest.approx(
            metrics(generator(profile), torch.zeros_like(history)))
    torch.manual_seed(9)
    rows = torch.randn(len(samples), model.config.udg_dim) * 0.05
    _, first = np.unique(samples.user_key, return_inverse=True)
    assert cold_start_metrics(model, None, samples, seed=9) == pytest.approx(metrics(rows[torch.as_tensor(first)],
                                                                                     history))
