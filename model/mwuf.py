"""MWUF's warm-up networks (Zhu et al. 2021, "Learning to Warm Up Cold Item Embeddings"), adapted to new users'
UDG embeddings.

A new user's raw UDG row e (the protocol's `mwuf` arm starts it at the mean known-user row, and warm-up updates
it) is served transformed:

    e' = scale(profile) * e + shift(history)

- **meta scaling**: from the base model's embeddings of the user's profile fields; MWUF's scale is what lets
  a cold embedding, learned from few events, be stretched towards where a warm one sits. Its output is
  1 + MLP, so that it acts as a per-user, per-dimension step multiplier of the warm-up too (de'/de = scale).
- **meta shifting**: from the mean of the embeddings of the items in the user's behavior history so far (the
  base model's behavior feature, [item_dim]); empty history gives a learned constant. It updates as the
  history grows, with no gradient step.

Both last layers start at zero: scale = 1, shift = 0, which is the untransformed row exactly.

Training simulates a cold start on the active users with the base model and gates frozen (as MWUF, on old
items): each user starts at the same raw row (the mean row), their earlier half D^A is scored with the
transformed row (their real history), one α step on the raw row is taken, and their later half D^B is scored
with the transformed, stepped row; L = γ L_A + (1 − γ) L_B (Algorithm 1's loss and settings). Whether the
networks are worth keeping is chosen on held-out active users (`choose_mwuf`): the identity (no networks, the
mean row as it is) is a candidate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dataset.prepared import PreparedData
from model.meta import held_out_halves, mean_training_row, split_halves, validation_users
from model.udg import UDG


@dataclass(frozen=True)
class MwufConfig:
    steps: int = 1500
    hidden: int = 16  # width of each network's one hidden layer
    users_per_step: int = 64
    samples_per_user: int = 8  # events per user from D^A and from D^B
    alpha: float = 0.1  # the simulated warm-up step on the raw row
    beta: float = 1e-3  # Adam learning rate of the networks
    gamma: float = 0.1
    seed: int = 0
    # what the shift reads: "event", each scored event's own behavior history; "phase", the user's clicks sent
    # so far (none at cold start, then those of the batches seen), one shift per user per phase
    shift: str = "event"
    scale: bool = True  # False: the shift alone (scale fixed at 1, so warm-up moves e' as fast as e)


SHIFTS = ("event", "phase")


class WarmUpNets(nn.Module):
    """Meta scaling (profile field embeddings -> [udg_dim]) and meta shifting (behavior feature -> [udg_dim])."""

    def __init__(self, profile_dim: int, behavior_dim: int, udg_dim: int, hidden: int = 16, shift: str = "event",
                 scale: bool = True):
        super().__init__()
        self.scaled = scale
        if shift not in SHIFTS:
            raise ValueError(f"MWUF shift must read one of {SHIFTS}, not {shift!r}")
        self.shift_source = shift
        self.scale_hidden = nn.Linear(profile_dim, hidden)
        self.scale_out = nn.Linear(hidden, udg_dim)
        self.shift_hidden = nn.Linear(behavior_dim, hidden)
        self.shift_out = nn.Linear(hidden, udg_dim)
        for layer in (self.scale_out, self.shift_out):  # start at the identity: scale 1, shift 0
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    def for_model(cls, model: UDG, hidden: int = 16, shift: str = "event", scale: bool = True) -> WarmUpNets:
        base = model.base_model
        return cls((base.user_fields - 1) * base.config.embed_dim, base.item_dim, model.udg_dim, hidden, shift, scale)

    def scale(self, profile_vec: torch.Tensor) -> torch.Tensor:
        if not getattr(self, "scaled", True):
            return torch.ones(len(profile_vec), self.scale_out.out_features)
        return 1 + self.scale_out(torch.relu(self.scale_hidden(profile_vec)))

    def shift(self, behavior: torch.Tensor) -> torch.Tensor:
        return self.shift_out(torch.relu(self.shift_hidden(behavior)))

    def forward(self, udg: torch.Tensor, profile_vec: torch.Tensor, behavior: torch.Tensor) -> torch.Tensor:
        return self.scale(profile_vec) * udg + self.shift(behavior)

    def warm(self, model: UDG, udg: torch.Tensor, profile: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """e' of rows `udg` [B, udg_dim] for events with profile indices [B, F] and histories [B, L]; the
        networks' inputs come from the frozen model (no gradient into it)."""
        with torch.no_grad():
            profile_vec = model.unseen_user_vector(profile)[:, model.base_model.config.embed_dim:]
            behavior = model.base_model.behavior(history)
        return self(udg, profile_vec, behavior)


def _event_loss(model: UDG, nets: WarmUpNets | None, raw: torch.Tensor, owner: torch.Tensor, profile: torch.Tensor,
                history: torch.Tensor, items: torch.Tensor, labels: torch.Tensor,
                shift_history: torch.Tensor | None = None) -> torch.Tensor:
    """Each user's mean cross-entropy [U] of their events (`owner`: each event's user), rows `raw` [U, dim]
    transformed unless `nets` is None: the shift reads each event's history, or per user `shift_history`
    [U, L] (the "phase" networks)."""
    event_profile = profile[owner]
    shift_input = history if shift_history is None else shift_history[owner]
    udg = raw[owner] if nets is None else nets.warm(model, raw[owner], event_profile, shift_input)
    logits = model.score(model.unseen_user_vector(event_profile), udg, history, items)
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    totals = torch.zeros(len(raw)).index_add(0, owner, losses)
    counts = torch.zeros(len(raw)).index_add(0, owner, torch.ones_like(losses))
    return totals / counts.clamp(min=1)


def clicks_so_far(train, halves, users: np.ndarray, width: int) -> torch.Tensor:
    """Per user (positions of `halves`) [U, width]: the items they clicked in their earlier half D^A, most recent
    first, PAD-filled: the "phase" shift's input for their later half (what the service holds of them then)."""
    from dataset.schema import PAD

    out = np.full((len(users), width), PAD, np.int64)
    for row, u in enumerate(users):
        rows = halves.a_rows[u]
        clicked = train.item[rows][train.label[rows] > 0.5][::-1][:width]
        out[row, :len(clicked)] = clicked
    return torch.as_tensor(out)


def _shift_inputs(nets, train, halves, users):
    """The per-user shift histories of D^A (none: a cold start) and D^B (D^A's clicks) for "phase" networks;
    (None, None) for "event" ones, whose shift reads each event's history."""
    if nets is None or nets.shift_source == "event":
        return None, None
    width = train.histories.width
    return torch.zeros((len(users), width), dtype=torch.long), clicks_so_far(train, halves, users, width)


def mwuf_loss(model: UDG, nets: WarmUpNets, anchor: torch.Tensor, train, halves, chosen: np.ndarray,
              rng: np.random.Generator, config: MwufConfig) -> torch.Tensor:
    """One step's loss: users `chosen` (positions of `halves`) start at `anchor`, K events of D^A scored with the
    transformed row, one α step on the raw row, K events of D^B scored with the transformed stepped row;
    γ L_A + (1 − γ) L_B."""
    k = config.samples_per_user
    item, label = torch.as_tensor(train.item), torch.as_tensor(train.label)
    a_rows = np.concatenate([rng.choice(halves.a_rows[u], size=k) for u in chosen])
    b_rows = np.concatenate([rng.choice(halves.b_rows[u], size=k) for u in chosen])
    owner = torch.arange(len(chosen)).repeat_interleave(k)
    profile = torch.as_tensor(halves.profile[chosen])
    raw = anchor.expand(len(chosen), -1).clone().requires_grad_(True)
    shift_a, shift_b = _shift_inputs(nets, train, halves, chosen)
    loss_a = _event_loss(model, nets, raw, owner, profile, torch.as_tensor(train.histories.gather(a_rows)),
                         item[a_rows], label[a_rows], shift_a)
    grad = torch.autograd.grad(loss_a.sum(), raw, create_graph=True)[0]
    loss_b = _event_loss(model, nets, raw - config.alpha * grad, owner, profile,
                         torch.as_tensor(train.histories.gather(b_rows)), item[b_rows], label[b_rows], shift_b)
    return config.gamma * loss_a.mean() + (1 - config.gamma) * loss_b.mean()


def train_mwuf(model: UDG, data: PreparedData, config: MwufConfig | None = None,
               users: np.ndarray | None = None) -> tuple[WarmUpNets, dict]:
    """The networks trained on the active users' train split (positions `users` of `split_halves`, default
    all), the model frozen; -> (nets, info)."""
    config = config or MwufConfig()
    if not isinstance(model, UDG):
        raise TypeError("MWUF transforms UDG embeddings: train a model with --udg first")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    train = data.splits["train"]
    anchor = mean_training_row(model, train)
    nets = WarmUpNets.for_model(model, config.hidden, config.shift, config.scale)
    optimizer = torch.optim.Adam(nets.parameters(), lr=config.beta)  # unscaled: the scale's layers get no gradient
    halves = split_halves(train)
    pool = np.arange(len(halves.users)) if users is None else np.asarray(users)
    losses = []
    for _ in range(config.steps):
        chosen = rng.choice(pool, size=min(config.users_per_step, len(pool)), replace=False)
        loss = mwuf_loss(model, nets, anchor, train, halves, chosen, rng, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    nets.eval()
    for parameter in nets.parameters():
        parameter.requires_grad_(False)
    return nets, {"config": asdict(config), "final_loss": float(np.mean(losses[-50:])) if losses else None}


def mwuf_validation_loss(model: UDG, nets: WarmUpNets | None, data: PreparedData, users: np.ndarray,
                         alpha: float) -> dict:
    """On held-out active users, from the mean row: `cold`, the log loss of their later half with the
    transformed row; `warm`, the same after one α step on their earlier half; `score`, their mean (as
    `model.meta.meta_validation_loss` scores a generator). `nets` None: the identity."""
    train = data.splits["train"]
    h = held_out_halves(train, users)
    halves, a_rows, b_rows, owner_a, owner_b = h.halves, h.a_rows, h.b_rows, h.owner_a, h.owner_b
    profile, item, label, history_a, history_b = h.profile, h.item, h.label, h.history_a, h.history_b
    raw = mean_training_row(model, train).expand(len(users), -1).clone().requires_grad_(True)
    shift_a, shift_b = _shift_inputs(nets, train, halves, users)
    loss_a = _event_loss(model, nets, raw, owner_a, profile, history_a, item[a_rows], label[a_rows], shift_a)
    grad = torch.autograd.grad(loss_a.sum(), raw)[0]

    def pooled(rows: torch.Tensor) -> float:
        with torch.no_grad():
            per_user = _event_loss(model, nets, rows, owner_b, profile, history_b, item[b_rows], label[b_rows],
                                   shift_b)
            counts = torch.as_tensor([len(halves.b_rows[u]) for u in users], dtype=torch.float32)
            return float((per_user * counts).sum() / counts.sum())  # pooled over events

    cold, warm = pooled(raw.detach()), pooled((raw - alpha * grad).detach())
    return {"cold": cold, "warm": warm, "score": (cold + warm) / 2}


def choose_mwuf(model: UDG, data: PreparedData, config: MwufConfig | None = None,
                valid_frac: float = 0.2) -> tuple[WarmUpNets | None, dict]:
    """The networks fit on (1 − valid_frac) of the active users, kept only if they beat the identity on the
    others (`mwuf_validation_loss`); -> (nets, or None for the identity; info)."""
    config = config or MwufConfig()
    fit, held = validation_users(data, valid_frac, config.seed)
    nets, trained = train_mwuf(model, data, config, users=fit)
    scores = {"mwuf": mwuf_validation_loss(model, nets, data, held, config.alpha),
              "identity": mwuf_validation_loss(model, None, data, held, config.alpha)}
    chosen = min(scores, key=lambda k: scores[k]["score"])
    info = {"validation": scores, "chosen": chosen, "fit_users": len(fit), "valid_users": len(held), **trained}
    return (nets if chosen == "mwuf" else None), info
