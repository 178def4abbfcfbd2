"""Meta-learned UDG embeddings for unseen users (Eq. 10-11, Algorithm 1).

f_meta(x_prof) = tanh(W x_prof + b). With x_prof the concatenated one-hots of the profile fields, W x is
the sum of one row per field, so the generator is a set of per-field tables plus a bias.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from dataset.prepared import PreparedData, Samples
from dataset.schema import FeatureSchema
from model.metrics import all_metrics
from model.udg import UDG

log = logging.getLogger(__name__)


class MetaGenerator(nn.Module):
    """Profile indices [B, len(user_fields)] -> UDG user embedding [B, udg_dim]."""

    def __init__(self, schema: FeatureSchema, udg_dim: int):
        super().__init__()
        self.fields = nn.ModuleList(nn.Embedding(len(f.vocab), udg_dim) for f in schema.user_fields)
        self.bias = nn.Parameter(torch.zeros(udg_dim))
        for table in self.fields:
            nn.init.normal_(table.weight, std=0.01)

    def forward(self, profile: torch.Tensor) -> torch.Tensor:
        total = self.bias
        for i, table in enumerate(self.fields):
            total = total + table(profile[:, i])
        return torch.tanh(total)


@dataclass
class MetaConfig:
    steps: int = 1500
    users_per_step: int = 64  # users in a minibatch
    samples_per_user: int = 8  # K events per user from D^A and from D^B
    alpha: float = 0.1  # inner step on the generated embedding (line 6)
    beta: float = 1e-3  # outer step on the generator (Adam learning rate; line 10)
    gamma: float = 0.1  # L_meta = gamma L_A + (1 - gamma) L_B (Eq. 10)
    seed: int = 0


@dataclass
class _UserHalves:
    """Per training user: row indices into the train split for D^A (earlier half) and D^B (later half)."""

    users: np.ndarray  # user numbers (Samples.user_key)
    profile: np.ndarray  # [U, F]
    a_rows: list[np.ndarray]
    b_rows: list[np.ndarray]


def split_halves(train: Samples) -> _UserHalves:
    """D^A and D^B: each user's training events cut in two by time, so both halves cover the same users."""
    order = np.argsort(train.user_key, kind="stable")  # train split is already time-ordered per user
    keys = train.user_key[order]
    profile_rows = train.profiles
    boundaries = np.flatnonzero(keys[1:] != keys[:-1]) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(keys)]])
    users, profiles, a_rows, b_rows = [], [], [], []
    for lo, hi in zip(starts, ends, strict=True):
        if hi - lo < 2:
            continue
        rows = order[lo:hi]
        middle = (hi - lo) // 2
        users.append(keys[lo])
        profiles.append(profile_rows[keys[lo]])
        a_rows.append(rows[:middle])
        b_rows.append(rows[middle:])
    return _UserHalves(np.array(users), np.stack(profiles) if profiles else np.zeros((0, profile_rows.shape[1]),
                                                                                  np.int64), a_rows, b_rows)


def _per_user_loss(model: UDG, udg: torch.Tensor, profile: torch.Tensor, history: torch.Tensor,
                   items: torch.Tensor, labels: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """Mean CE of each user's samples -> [U]; `owner` maps each sample row to its user."""
    user_vec = model.unseen_user_vector(profile)  # a new user's base embedding, as served
    logits = model.score(user_vec[owner], udg[owner], history, items)
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    totals = torch.zeros(len(udg)).index_add(0, owner, losses)
    counts = torch.zeros(len(udg)).index_add(0, owner, torch.ones_like(losses))
    return totals / counts.clamp(min=1)


def train_meta(model: UDG, data: PreparedData, config: MetaConfig | None = None,
               progress: bool = True) -> tuple[MetaGenerator, dict]:
    """Algorithm 1 with the base model and gates frozen. Phase A sees no behavior (a brand-new user);
    phase B sees the user's real behavior after one gradient step α on the generated embedding."""
    config = config or MetaConfig()
    if not isinstance(model, UDG):
        raise TypeError("the meta generator produces UDG embeddings: train a model with --udg first")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model.eval()  # frozen: no dropout, no user-id dropout
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    generator = MetaGenerator(data.schema, model.config.udg_dim)
    optimizer = torch.optim.Adam(generator.parameters(), lr=config.beta)
    train = data.splits["train"]
    halves = split_halves(train)
    tensors = {k: torch.as_tensor(getattr(train, k)) for k in ("item", "label")}
    width = train.histories.width
    k = config.samples_per_user
    losses = []
    for _ in tqdm(range(config.steps), desc="meta", leave=False, disable=not progress):
        chosen = rng.choice(len(halves.users), size=min(config.users_per_step, len(halves.users)), replace=False)
        a_rows = np.concatenate([rng.choice(halves.a_rows[u], size=k) for u in chosen])
        b_rows = np.concatenate([rng.choice(halves.b_rows[u], size=k) for u in chosen])
        owner = torch.arange(len(chosen)).repeat_interleave(k)
        profile = torch.as_tensor(halves.profile[chosen])
        generated = generator(profile)  # line 3
        empty = torch.zeros((len(a_rows), width), dtype=torch.long)
        loss_a = _per_user_loss(model, generated, profile, empty, tensors["item"][a_rows],
                                tensors["label"][a_rows], owner)  # line 5
        grad = torch.autograd.grad(loss_a.sum(), generated, create_graph=True)[0]
        adapted = generated - config.alpha * grad  # line 6
        history_b = torch.as_tensor(train.histories.gather(b_rows))
        loss_b = _per_user_loss(model, adapted, profile, history_b, tensors["item"][b_rows],
                                tensors["label"][b_rows], owner)  # lines 7-8
        loss = config.gamma * loss_a.mean() + (1 - config.gamma) * loss_b.mean()  # line 9, Eq. 10
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # line 10
        losses.append(float(loss.detach()))
    generator.eval()
    return generator, {"config": asdict(config), "final_loss": float(np.mean(losses[-50:]))}


@torch.no_grad()
def cold_start_metrics(model: UDG, generator: MetaGenerator | None, samples: Samples, seed: int = 0,
                       with_history: bool = True) -> dict:
    """Metrics on users unseen in training, their UDG embedding from the generator or, with no generator,
    random-initialised like a fresh row of the UDG table (the paper's 'w/o Meta')."""
    model.eval()
    profile = torch.as_tensor(samples.profile)
    if generator is not None:
        udg = generator(profile)
    else:
        torch.manual_seed(seed)
        udg = torch.randn(len(samples), model.config.udg_dim) * 0.05
        # one random vector per user, not per event
        _, first = np.unique(samples.user_key, return_inverse=True)
        udg = udg[torch.as_tensor(first)]
    probs = []
    for start in range(0, len(samples), 8192):
        part = slice(start, start + 8192)
        rows = np.arange(start, min(start + 8192, len(samples)))
        history = torch.as_tensor(samples.histories.gather(rows))
        if not with_history:
            history = torch.zeros_like(history)
        user_vec = model.unseen_user_vector(profile[part])
        probs.append(torch.sigmoid(model.score(user_vec, udg[part], history,
                                               torch.as_tensor(samples.item[part]))))
    return all_metrics(samples.label, torch.cat(probs).numpy() if probs else np.zeros(0, np.float32))
