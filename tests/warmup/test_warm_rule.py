"""The warm-up rule shared by `udg warmup` and the offline protocol: adam equals torch's Adam per row, the worker
keeps each user's moments in Redis across reads (written in the same compare-and-set), moments of a replaced
value restart, and the offline protocol's event rules step exactly as the worker does."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.conftest import VERSION

torch = pytest.importorskip("torch")


def test_adam_rule_equals_torch_adam_row_by_row():
    from model.warm_rule import WarmRule

    rule = WarmRule("adam", lr=0.01)
    target = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    theta, state = torch.zeros(2, 3), rule.initial_state(2, 3)
    reference = [torch.zeros(1, 3, requires_grad=True) for _ in range(2)]
    optimizers = [torch.optim.Adam([p], lr=0.01) for p in reference]
    for step in range(7):
        rows = [0, 1] if step % 3 else [1]  # row 0 skips some events: its moments wait, as a user's do
        grad = 2 * (theta[rows] - target[rows])
        theta[rows], state[rows] = rule.update(theta[rows], grad, state[rows])
        for row in rows:
            optimizers[row].zero_grad()
            ((reference[row] - target[row]) ** 2).sum().backward()
            optimizers[row].step()
    assert torch.allclose(theta, torch.cat([p.detach() for p in reference]), atol=1e-6)
    assert state[:, -1].tolist() == [4.0, 7.0]  # each row's own step count
    assert WarmRule("sgd", 0.1).update(theta, torch.ones(2, 3), state)[0].allclose(theta - 0.1)
    with pytest.raises(ValueError, match="rule"):
        WarmRule("rmsprop")


def _events(client, user, items, start, n, profile):
    events = [{"user_id": user, "item_id": items[(start + i) % len(items)], "clicked": False, "event_id": f"{user}-"
               f"{start + i}", "profile": profile} for i in range(n)]  # non-clicks: no history to track
    assert client.post("/v1/events/batch", json={"events": events}).status_code == 200
    return [e["item_id"] for e in events]


def test_adam_worker_keeps_the_moments_in_redis_across_reads(client, redis_client, model_repo, artifact, users):
    from repository import ModelRepository
    from service.redis_layout import TAG_META, RedisLayout
    from warmup.model import WarmupModel
    from warmup.worker import WarmupConfig, WarmupWorker

    layout = RedisLayout()
    items = list(artifact.manifest["features"]["items"]["tokens"])[2:10]
    profile = {f: str(v) for f, v in zip(users["profile_fields"].tolist(), users["profile"][0].tolist(), strict=True)
               if v}
    user = "adam-user"
    client.post("/v1/score", json={"user_id": user, "candidates": items, "profile": profile})
    worker = WarmupWorker(redis_client, ModelRepository(model_repo), layout,
                          WarmupConfig(rule="adam", block_ms=50, claim_every_s=3600), consumer="adam")
    model = WarmupModel.load(ModelRepository(model_repo), VERSION)
    rule = model.rule("adam")
    assert rule.lr == model.train_lr  # the version's pre-training learning rate
    key, state_key = layout.embeddings(VERSION, user), layout.warmup_rule_state(VERSION, user)
    for _ in range(100):  # the write-back runs after the response
        initial = redis_client.get(key)
        if initial:
            break
        time.sleep(0.02)
    assert initial is not None
    first = _events(client, user, items, 0, 3, profile)
    while worker.run_once():
        pass
    second = _events(client, user, items, 3, 4, profile)
    while worker.run_once():
        pass
    value = redis_client.get(key)
    assert layout.warmup_steps(value) == 7
    user_vec, udg_vec, _ = layout.unpack_embeddings(initial, model.user_dim, model.udg_dim)
    labels = [0.0] * 7
    (expected,), (state,) = model.apply_rule(rule, [user_vec], [udg_vec], None, [[[]] * 7], [first + second],
                                             [labels])
    _, got, _ = layout.unpack_embeddings(value, model.user_dim, model.udg_dim)
    assert np.allclose(got, expected, atol=1e-6)  # two reads = one run: the moments were carried in Redis
    (restarted,), _ = model.apply_rule(rule, [user_vec], [udg_vec], None, [[[]] * 3], [first], [labels[:3]])
    (restarted,), _ = model.apply_rule(rule, [user_vec], [restarted], None, [[[]] * 4], [second], [labels[3:]])
    assert not np.allclose(got, restarted, atol=1e-6)  # (and restarting them would differ)
    stored = layout.unpack_rule_state(redis_client.get(state_key), rule.state_width(model.udg_dim), value)
    assert np.allclose(stored, state) and stored[0, -1] == 7
    assert 0 < redis_client.pttl(state_key) <= redis_client.pttl(key) + 5  # the value's TTL (a generated one)

    # a value replaced under the worker (a republish, a new generated state): its moments restart
    replaced = layout.pack_warmed(user_vec, udg_vec + 0.01, 9, TAG_META)
    redis_client.set(key, replaced)
    assert layout.unpack_rule_state(redis_client.get(state_key), rule.state_width(model.udg_dim), replaced) is None
    third = _events(client, user, items, 7, 2, profile)
    while worker.run_once():
        pass
    (fresh,), _ = model.apply_rule(rule, [user_vec], [udg_vec + 0.01], None, [[[]] * 2], [third], [[0.0, 0.0]])
    _, got, _ = layout.unpack_embeddings(redis_client.get(key), model.user_dim, model.udg_dim)
    assert np.allclose(got, fresh, atol=1e-6)

    # an sgd worker's write removes the moments (they no longer go with the value)
    sgd = WarmupWorker(redis_client, ModelRepository(model_repo), layout, WarmupConfig(rule="sgd", block_ms=50,
                                                                                     claim_every_s=3600), "sgd")
    _events(client, user, items, 9, 1, profile)
    while sgd.run_once():
        pass
    assert redis_client.get(state_key) is None and layout.warmup_steps(redis_client.get(key)) == 12


def test_offline_event_rule_steps_as_the_worker_does(model_repo):
    """`udg coldstart --warm-rule event-…` (model/warm_rule.warm_up_events, on a protocol phase's samples)
    and the worker's `WarmupModel.apply_rule` (raw ids, as streamed) give the same rows."""
    from types import SimpleNamespace

    from model.warm_rule import warm_up_events
    from repository import ModelRepository
    from warmup.model import WarmupModel

    model = WarmupModel.load(ModelRepository(model_repo), VERSION)
    tokens = model.schema.items.tokens
    n_users, k, width = 3, 4, model.max_history
    user_key = np.repeat(np.arange(n_users), k)
    item = np.array([2 + (i * 5) % 30 for i in range(n_users * k)])
    label = np.array([float(i % 3 == 0) for i in range(n_users * k)], np.float32)
    histories = np.zeros((n_users * k, width), np.int64)
    histories[:, 0] = 3 + (np.arange(n_users * k) % 7)  # each event with a one-click history
    profile = np.zeros((n_users * k, len(model.schema.profile_fields)), np.int64)

    class Samples(SimpleNamespace):
        def __len__(self):
            return len(self.item)

        def batch(self, rows):
            return {"user": user_key[rows], "profile": profile[rows], "item": item[rows], "history": histories[rows],
                    "label": label[rows]}

    samples = Samples(user_key=user_key, item=item)
    for name in ("sgd", "adam"):
        rule = model.rule(name, 0.05)
        init = torch.randn(n_users, model.udg_dim) * 0.05
        table = torch.nn.Embedding.from_pretrained(init.clone(), freeze=False)
        state = rule.initial_state(n_users, model.udg_dim)
        warm_up_events(model.model, table, state, samples, np.arange(n_users), rule)
        with torch.no_grad():
            user_vec = model.model.unseen_user_vector(torch.as_tensor(profile[:1]))
        rows = [np.flatnonzero(user_key == u) for u in range(n_users)]
        expected, states = model.apply_rule(
            rule, [user_vec.numpy()] * n_users, [init[u:u + 1].numpy() for u in range(n_users)], None,
            [[[tokens[int(histories[r, 0])]] for r in rs] for rs in rows], [[tokens[int(item[r])] for r in rs]
                                                                             for rs in rows],
            [label[rs].tolist() for rs in rows])
        assert np.allclose(table.weight.detach().numpy(), np.concatenate(expected), atol=1e-6), name
        assert np.allclose(state.numpy(), np.concatenate(states), atol=1e-6), name
