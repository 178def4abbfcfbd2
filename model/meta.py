"""Meta-learned UDG embeddings for unseen users (Eq. 10-11, Algorithm 1).

f_meta(x_prof) = tanh(W x_prof + b). With x_prof the concatenated one-hots of the profile fields, W x is
the sum of one row per field, so the generator is a set of per-field tables plus a bias.

The `residual` variant is anchor + W x_prof + b, the anchor being the mean UDG row of the training users:
with a zero residual it is that mean row (a strong baseline the tanh generator does not reliably beat), and
a shrinkage weight (an L2 penalty on the residual, chosen on held-out training users by `choose_shrink`) keeps
it there unless the profile earns a departure.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

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


VARIANTS = ("tanh", "residual")


class MetaGenerator(nn.Module):
    """Profile indices [B, len(user_fields)] -> UDG user embedding [B, udg_dim].

    With no `anchor`, Eq. 11: tanh of per-field rows plus a bias. With an `anchor` [udg_dim] (a buffer, so it
    travels in the state dict and into the exported graph), the residual variant: anchor + per-field rows +
    bias, the residual starting at zero."""

    def __init__(self, schema: FeatureSchema, udg_dim: int, anchor: torch.Tensor | None = None):
        super().__init__()
        self.fields = nn.ModuleList(nn.Embedding(len(f.vocab), udg_dim) for f in schema.user_fields)
        self.bias = nn.Parameter(torch.zeros(udg_dim))
        self.register_buffer("anchor", None if anchor is None else anchor.detach().clone().reshape(udg_dim))
        if anchor is None:
            for table in self.fields:
                nn.init.normal_(table.weight, std=0.01)
        else:
            for table in self.fields:
                nn.init.zeros_(table.weight)

    @property
    def variant(self) -> str:
        return "tanh" if self.anchor is None else "residual"

    def _total(self, profile: torch.Tensor) -> torch.Tensor:
        total = self.bias
        for i, table in enumerate(self.fields):
            total = total + table(profile[:, i])
        return total if len(self.fields) else total.expand(len(profile), -1)

    def residual(self, profile: torch.Tensor) -> torch.Tensor:
        """The residual variant's departure from the anchor [B, udg_dim]."""
        return self._total(profile)

    def forward(self, profile: torch.Tensor) -> torch.Tensor:
        if self.anchor is None:
            return torch.tanh(self._total(profile))
        return self.anchor + self._total(profile)


@dataclass
class MetaConfig:
    steps: int = 1500
    users_per_step: int = 64  # users in a minibatch
    samples_per_user: int = 8  # K events per user from D^A and from D^B
    alpha: float = 0.1  # inner step on the generated embedding (line 6)
    beta: float = 1e-3  # outer step on the generator (Adam learning rate; line 10)
    gamma: float = 0.1  # L_meta = gamma L_A + (1 - gamma) L_B (Eq. 10)
    seed: int = 0
    variant: str = "tanh"  # "tanh" (Eq. 11) or "residual" (mean training-user UDG row + a learned residual)
    shrink: float = 0.0  # residual variant: + shrink * mean squared norm of the residual
    phase_a_history: bool = False  # phase A sees the user's real behavior (False: none, a brand-new user)


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


def mean_training_row(model: UDG, train: Samples) -> torch.Tensor:
    """The mean UDG row of the users with training events [udg_dim]: what a version without a generator
    serves, and the residual generator's anchor."""
    from dataset.schema import OOV

    rows = np.unique(train.user)
    rows = rows[rows > OOV]
    table = model.udg_emb.weight.detach()
    return table[torch.as_tensor(rows)].mean(0) if len(rows) else table[OOV]


def train_meta(model: UDG, data: PreparedData, config: MetaConfig | None = None,
               progress: bool = True, users: np.ndarray | None = None) -> tuple[MetaGenerator, dict]:
    """Algorithm 1 with the base model and gates frozen. Phase A sees no behavior (a brand-new user) unless
    `config.phase_a_history`; phase B sees the user's real behavior after one gradient step α on the generated
    embedding. `users`: positions in `split_halves(train)` to train on (default: all)."""
    config = config or MetaConfig()
    if not isinstance(model, UDG):
        raise TypeError("the meta generator produces UDG embeddings: train a model with --udg first")
    if config.variant not in VARIANTS:
        raise ValueError(f"meta variant must be one of {VARIANTS}, not {config.variant!r}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model.eval()  # frozen: no dropout, no user-id dropout
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    train = data.splits["train"]
    anchor = mean_training_row(model, train) if config.variant == "residual" else None
    generator = MetaGenerator(data.schema, model.config.udg_dim, anchor)
    optimizer = torch.optim.Adam(generator.parameters(), lr=config.beta)
    halves = split_halves(train)
    pool = np.arange(len(halves.users)) if users is None else np.asarray(users)
    tensors = {k: torch.as_tensor(getattr(train, k)) for k in ("item", "label")}
    width = train.histories.width
    k = config.samples_per_user
    losses = []
    for _ in tqdm(range(config.steps), desc="meta", leave=False, disable=not progress):
        chosen = rng.choice(pool, size=min(config.users_per_step, len(pool)), replace=False)
        a_rows = np.concatenate([rng.choice(halves.a_rows[u], size=k) for u in chosen])
        b_rows = np.concatenate([rng.choice(halves.b_rows[u], size=k) for u in chosen])
        owner = torch.arange(len(chosen)).repeat_interleave(k)
        profile = torch.as_tensor(halves.profile[chosen])
        generated = generator(profile)  # line 3
        history_a = (torch.as_tensor(train.histories.gather(a_rows)) if config.phase_a_history
                     else torch.zeros((len(a_rows), width), dtype=torch.long))
        loss_a = _per_user_loss(model, generated, profile, history_a, tensors["item"][a_rows],
                                tensors["label"][a_rows], owner)  # line 5
        grad = torch.autograd.grad(loss_a.sum(), generated, create_graph=True)[0]
        adapted = generated - config.alpha * grad  # line 6
        history_b = torch.as_tensor(train.histories.gather(b_rows))
        loss_b = _per_user_loss(model, adapted, profile, history_b, tensors["item"][b_rows],
                                tensors["label"][b_rows], owner)  # lines 7-8
        loss = config.gamma * loss_a.mean() + (1 - config.gamma) * loss_b.mean()  # line 9, Eq. 10
        if config.shrink and config.variant == "residual":
            loss = loss + config.shrink * generator.residual(profile).pow(2).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()  # line 10
        losses.append(float(loss.detach()))
    generator.eval()
    return generator, {"config": asdict(config), "final_loss": float(np.mean(losses[-50:]))}


def validation_users(data: PreparedData, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions in `split_halves(train)`: (users to fit on, held-out users to choose settings on)."""
    n = len(split_halves(data.splits["train"]).users)
    order = np.random.default_rng(10_000 + seed).permutation(n)
    held = max(1, int(round(frac * n)))
    return np.sort(order[held:]), np.sort(order[:held])


class HeldOutHalves(NamedTuple):
    """Validation users' events as Algorithm 1 splits them: D^A (`*_a`, earlier half) and D^B (`*_b`, later half)
    of each user, with the owner (index into the users) of every event; `item`/`label` are the whole split's."""
    halves: _UserHalves
    a_rows: np.ndarray
    b_rows: np.ndarray
    owner_a: torch.Tensor
    owner_b: torch.Tensor
    profile: torch.Tensor
    item: torch.Tensor
    label: torch.Tensor
    history_a: torch.Tensor
    history_b: torch.Tensor


def held_out_halves(train, users: np.ndarray) -> HeldOutHalves:
    """The tensors every validation score of a new user's row needs (generator, residual, MWUF)."""
    halves = split_halves(train)
    a_rows = np.concatenate([halves.a_rows[u] for u in users])
    b_rows = np.concatenate([halves.b_rows[u] for u in users])
    return HeldOutHalves(
        halves, a_rows, b_rows,
        torch.as_tensor(np.repeat(np.arange(len(users)), [len(halves.a_rows[u]) for u in users])),
        torch.as_tensor(np.repeat(np.arange(len(users)), [len(halves.b_rows[u]) for u in users])),
        torch.as_tensor(halves.profile[users]), torch.as_tensor(train.item), torch.as_tensor(train.label),
        torch.as_tensor(train.histories.gather(a_rows)), torch.as_tensor(train.histories.gather(b_rows)))


@torch.no_grad()
def meta_validation_loss(model: UDG, generator: MetaGenerator, data: PreparedData, users: np.ndarray,
                         alpha: float) -> dict:
    """On held-out training users, the two things a new user's embedding is for: `cold`, the log loss of
    their later half (D^B, real behavior) with the generated embedding; `warm`, the same after one α step on
    their earlier half (D^A, real behavior) from it. `score` is their mean."""
    train = data.splits["train"]
    h = held_out_halves(train, users)
    a_rows, b_rows, owner_a, owner_b = h.a_rows, h.b_rows, h.owner_a, h.owner_b
    profile, item, label, history_a, history_b = h.profile, h.item, h.label, h.history_a, h.history_b
    generated = generator(profile)
    with torch.enable_grad():
        start = generated.clone().requires_grad_(True)
        loss_a = _per_user_loss(model, start, profile, history_a, item[a_rows], label[a_rows], owner_a)
        grad = torch.autograd.grad(loss_a.sum(), start)[0]

    def event_loss(udg: torch.Tensor) -> float:
        logits = model.score(model.unseen_user_vector(profile)[owner_b], udg[owner_b], history_b, item[b_rows])
        return float(F.binary_cross_entropy_with_logits(logits, label[b_rows]))

    cold, warm = event_loss(generated), event_loss(generated - alpha * grad)
    return {"cold": cold, "warm": warm, "score": (cold + warm) / 2}


# The residual's scale: UDG rows and the loss's gradient on them are small (~1e-2), so weights below ~0.1 barely
# shrink; 10 holds the residual near zero unless the profile pays for it.
SHRINK_GRID = (0.1, 10.0)
RESIDUAL_STEPS = 500  # the residual is linear and starts at zero: it needs fewer steps than Eq. 11's 1,500


def choose_shrink(model: UDG, data: PreparedData, config: MetaConfig, grid=SHRINK_GRID, valid_frac: float = 0.2,
                  progress: bool = False, refit: bool = False) -> tuple[MetaGenerator, dict]:
    """The residual generator with its shrinkage weight chosen on validation: for each weight, a generator fit
    on (1 - valid_frac) of the training users and scored (`meta_validation_loss`) on the others; the zero
    residual (the mean row itself) is a candidate too. The best is returned: as fit (default; one training per
    weight), or, with `refit`, trained again on all the users. A zero residual comes back as the mean row."""
    config = replace(config, variant="residual")
    fit, held = validation_users(data, valid_frac, config.seed)
    scores, fitted = {}, {}
    for shrink in grid:
        fitted[shrink], _ = train_meta(model, data, replace(config, shrink=shrink), progress=progress, users=fit)
        scores[shrink] = meta_validation_loss(model, fitted[shrink], data, held, config.alpha)
    zero = MetaGenerator(data.schema, model.config.udg_dim, mean_training_row(model, data.splits["train"]))
    scores["mean row"] = meta_validation_loss(model, zero.eval(), data, held, config.alpha)
    best = min(scores, key=lambda k: scores[k]["score"])
    info = {"validation": {str(k): v for k, v in scores.items()}, "chosen": best, "fit_users": len(fit),
            "valid_users": len(held), "config": asdict(replace(config, shrink=0.0 if best == "mean row" else best)),
            "final_loss": None}
    if best == "mean row":
        return zero.eval(), info
    if not refit:
        return fitted[best], info
    generator, trained = train_meta(model, data, replace(config, shrink=best), progress=progress)
    return generator, {**info, **trained}


def candidate_name(alpha: float, gamma: float, phase_a_history: bool) -> str:
    return f"alpha={alpha:g} gamma={gamma:g} history={'on' if phase_a_history else 'off'}"


def choose_meta(model: UDG, data: PreparedData, config: MetaConfig, candidates, valid_frac: float = 0.2,
                progress: bool = False) -> tuple[MetaGenerator, dict]:
    """The Eq. 11 generator with its Algorithm 1 settings chosen on validation: for each candidate
    (alpha, gamma, phase_a_history), a generator fit on (1 - valid_frac) of the training users and scored by
    `meta_validation_loss` on the others, its warm step the same `config.alpha` for every candidate (so that a
    larger alpha is not scored with a larger step). The best one is returned as fit."""
    config = replace(config, variant="tanh", shrink=0.0)
    fit, held = validation_users(data, valid_frac, config.seed)
    scores, fitted = {}, {}
    for alpha, gamma, history in candidates:
        name = candidate_name(alpha, gamma, bool(history))
        setting = replace(config, alpha=float(alpha), gamma=float(gamma), phase_a_history=bool(history))
        fitted[name], trained = train_meta(model, data, setting, progress=progress, users=fit)
        scores[name] = {**meta_validation_loss(model, fitted[name], data, held, config.alpha),
                        "final_loss": trained["final_loss"], "config": asdict(setting)}
    if not scores:
        raise ValueError("no candidate settings to choose the meta generator from")
    best = min(scores, key=lambda k: scores[k]["score"])
    return fitted[best], {"validation": {k: {m: v[m] for m in ("cold", "warm", "score")} for k, v in scores.items()},
                          "chosen": best, "fit_users": len(fit), "valid_users": len(held),
                          "config": scores[best]["config"], "final_loss": scores[best]["final_loss"]}


def fit_generator(model: UDG, data: PreparedData, config: MetaConfig | None = None,
                  progress: bool = True) -> tuple[MetaGenerator, dict]:
    """The generator `config.variant` names: Eq. 11 (`train_meta`) or the residual one, its shrinkage chosen on
    held-out training users (`choose_shrink`)."""
    config = config or MetaConfig()
    if config.variant == "residual":
        if not isinstance(model, UDG):
            raise TypeError("the meta generator produces UDG embeddings: train a model with --udg first")
        return choose_shrink(model, data, config, progress=progress, refit=True)
    return train_meta(model, data, config, progress=progress)


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
