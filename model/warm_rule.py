"""The per-event update rule of a new user's UDG embedding, with the model frozen: one definition shared by the
online worker (`udg warmup`, warmup/model.py) and the offline protocol (`udg coldstart --warm-rule event-…`), so
a replay through the service is compared with the offline run of exactly the same rule.

Each event of a user, oldest first, takes `steps` gradient steps on that user's row alone (the gradient of the
event's own binary cross-entropy):

- `sgd`: θ ← θ − α g (Algorithm 1's α step; α the version's meta-training α by default).
- `adam`: Adam's step on the row, with the user's own moments (m, v) and step count t carried from event to
  event (the worker stores them next to the embedding, written in the same compare-and-set): θ ← θ − lr m̂ /
  (√v̂ + ε), as torch.optim.Adam without weight decay; lr the version's pre-training learning rate by default.
  Adam normalises the step per coordinate, so a user's first clicks move the row by about lr each whatever the
  gradient's scale: what the offline minibatch-Adam protocol does, per user.

State per user: nothing for sgd; [m (dim) | v (dim) | t] float32 for adam (`state_width`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

RULES = ("sgd", "adam")


@dataclass(frozen=True)
class WarmRule:
    name: str = "sgd"
    lr: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self):
        if self.name not in RULES:
            raise ValueError(f"warm-up rule must be one of {list(RULES)}, not {self.name!r}")
        if not self.lr >= 0:
            raise ValueError(f"warm-up step size must be >= 0, not {self.lr!r}")

    def state_width(self, dim: int) -> int:
        return 0 if self.name == "sgd" else 2 * dim + 1

    def initial_state(self, n: int, dim: int) -> torch.Tensor:
        return torch.zeros(n, self.state_width(dim))

    def update(self, theta: torch.Tensor, grad: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of each row: theta, grad [n, dim], state [n, state_width] -> (new theta, new state)."""
        if self.name == "sgd":
            return theta - self.lr * grad, state
        dim = theta.shape[1]
        m, v, t = state[:, :dim], state[:, dim:2 * dim], state[:, 2 * dim:] + 1
        m = self.beta1 * m + (1 - self.beta1) * grad
        v = self.beta2 * v + (1 - self.beta2) * grad * grad
        m_hat = m / (1 - self.beta1 ** t)
        v_hat = v / (1 - self.beta2 ** t)
        return theta - self.lr * m_hat / (v_hat.sqrt() + self.eps), torch.cat([m, v, t], dim=1)


def event_steps(model, rule: WarmRule, user: torch.Tensor, udg: torch.Tensor, state: torch.Tensor,
                history: torch.Tensor, item: torch.Tensor, label: torch.Tensor, lengths, steps: int = 1):
    """Every user's events in order on their UDG rows, the model frozen. user [n, user_dim], udg [n, udg_dim],
    state [n, width]; history [n, depth, max_history], item (ids [n, depth] or per-event Items via `item(k, rows)`),
    label [n, depth], lengths [n] events per user. The k-th events of all users share one forward and backward
    pass (rows are independent: the model is frozen, in eval mode, with no batch-coupled layer).
    -> (udg, state) after every user's events."""
    from torch.nn import functional as F

    udg, state = udg.clone(), state.clone()
    lengths = np.asarray(lengths)
    depth = int(lengths.max()) if len(lengths) else 0
    for k in range(depth):
        rows = torch.as_tensor(np.flatnonzero(lengths > k))
        for _ in range(steps):
            selected = udg[rows].requires_grad_(True)
            logits = model.score(user[rows], selected, history[rows, k], item[rows, k])
            loss = F.binary_cross_entropy_with_logits(logits, label[rows, k], reduction="sum")
            (grad,) = torch.autograd.grad(loss, selected)
            udg[rows], state[rows] = rule.update(selected.detach(), grad, state[rows])
    return udg, state


def warm_up_events(model, table, state: torch.Tensor, samples, new_index: np.ndarray, rule: WarmRule) -> None:
    """One phase of the offline protocol (model/coldstart.py) under this rule: each new user's events of the
    batch in time order, one step each on their row of `table` and their rule state `state` (carried across
    phases, as the worker stores it with the embedding), the model frozen; each event's behavior feature is
    its history from the data."""
    from model.coldstart import positions_in_user
    from model.train import to_tensors

    batch = to_tensors(samples)
    rows, inverse = np.unique(new_index[samples.user_key], return_inverse=True)
    position = positions_in_user(samples)
    lengths = np.bincount(inverse, minlength=len(rows))
    depth = int(position.max()) + 1 if len(position) else 0
    grid_rows, grid_cols = torch.as_tensor(inverse), torch.as_tensor(position)
    item = torch.zeros(len(rows), depth, dtype=torch.long)
    label = torch.zeros(len(rows), depth)
    history = torch.zeros(len(rows), depth, batch["history"].shape[1], dtype=torch.long)
    profile = torch.zeros(len(rows), batch["profile"].shape[1], dtype=torch.long)
    item[grid_rows, grid_cols] = batch["item"]
    label[grid_rows, grid_cols] = batch["label"]
    history[grid_rows, grid_cols] = batch["history"]
    profile[grid_rows] = batch["profile"]
    index = torch.as_tensor(rows)
    model.eval()
    with torch.no_grad():
        user = model.unseen_user_vector(profile)
    udg, new_state = event_steps(model, rule, user, table.weight.detach()[index], state[index], history, item,
                                 label, lengths)
    with torch.no_grad():
        table.weight[index] = udg
    state[index] = new_state
