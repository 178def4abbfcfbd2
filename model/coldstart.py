"""`udg coldstart`: the paper's offline new-user protocol (Section "Meta-Learning for Cold-start", Table 5,
Figure 4), over several seeds, with a resumable journal.

The protocol, built from one prepared data set (no change to ingestion):

- `split.cold_user_frac` of the users are held out by ingestion (the `cold` split): they are in no
  vocabulary row of their own (their user id is OOV, as for a real new user), while their profile values are
  tokens of the training users' vocabularies. Of those, the **new users** are the ones whose event count lies
  in the band [lo, hi]; each one's events, in time order, are cut into batches a, b, c of K events each and a
  held-out **rest** (>= lo - 3K events). The rests of all new users are the test set of every phase.
- The **active users** are the other users with >= T events: base+UDG is pre-trained on their train split
  (early stopping on their valid split), and the meta generator (Algorithm 1, `model.meta.train_meta`) on the
  same train split. Users that are neither (held out but outside the band, or below T) are not used.
- Phases: **cold** (nothing updated), then **a**, **b**, **c**: one pass (`warm_epochs`) over the batch's
  events of all new users, updating the new users' UDG embeddings and, as the paper does ("we continue to
  update these models and their user embeddings"), the model (`warm_update="model"`; `"embeddings"` updates
  the new users' embeddings only), with the pre-training's optimiser (Adam, its learning rate and weight
  decays). After each phase: AUC and log loss on the rests.
- Arms (the new users' initial UDG embedding): `meta` (the generator from the profile, Eq. 11), `residual`
  (the residual generator: the mean row plus a profile-dependent residual, its shrinkage weight chosen on
  held-out active users, `model.meta.choose_shrink`), `random` (a fresh N(0, 0.05²) row like the UDG table's
  init: the paper's "w/o Meta"), `mean` (the mean UDG row of the active users: a naive baseline that needs no
  training), `mwuf` (the mean row, transformed whenever scored by MWUF's meta scaling (profile) and shifting
  (behavior history so far) networks, `model.mwuf`, trained on the active users with the model frozen and kept
  only where they beat the identity on held-out active users); `mwuf-phase`, its shift reading the clicks sent
  so far (none at cold start) instead of each event's history; `mwuf-shift`, the shift alone (scale 1).
- `--warm-base-user` (`WarmConfig.base_user`): a new user's base user id is OOV, so every new user shares the
  OOV row; with it, each new user gets a base id row of their own (starting at the OOV row, so the cold phase
  is unchanged) that warm-up updates alongside their UDG row (`model.new_users`).

The arms of one (model, seed) share the pre-trained model, the generator and the order of the warm-up
minibatches, so they are compared paired by seed.

Defaults per data set (`PROTOCOLS`):

- MovieLens-100K (20–737 ratings per user): K = 10, band [40, 150], T = 40. K = 10 keeps the three
  warm-up batches (30 ratings) within what a light user gives (the median user has ~65 ratings; the
  smallest 20), and is about what MovieLens asks a new user for at sign-up. lo = 40 = 3K + 10 leaves every
  new user a held-out rest of >= 10 ratings; hi = 150 keeps the heaviest raters (up to 737 ratings) out of the
  new users so that a few of them do not dominate the pooled held-out AUC and the new users stay "new-ish",
  as the paper's new users (80–100 events) sit just below its active users (> 100). T = 40 (the paper's
  active-user threshold, scaled) gives every pre-training user >= 32 training events, so that the meta
  learner's D^A and D^B halves (Algorithm 1) hold >= 16 events each: more than the K-event batches the
  generator is meant to prepare for. With the 30% held out, ~115 new users and ~470 active users.
- synthetic (every user has 100 events): the paper's own K = 20 and band [80, 100] (batches of 20, a rest
  of 40), T = 100 (everyone else).
- shop (impressions with a ~16% click rate, 3–192 per user, median 23, p90 67): K = 5, band [25, 100],
  T = 25. Scaled from MovieLens by the median (65 -> 23 events): three batches of 5 impressions (~2.5 clicks
  in all) are what a light new user gives in a first session or two; lo = 25 = 3K + 10 leaves every new user
  a held-out rest of >= 10 impressions; hi = 100 (above p95) keeps the few heaviest users from dominating the
  pooled AUC. T = 25 gives every pre-training user >= 20 training impressions, so Algorithm 1's D^A and D^B
  halves hold >= 10 each, more than a batch. With the 30% held out: ~280 new users, ~630 active users.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from dataset.prepared import PreparedData, Samples
from model.report import MODEL_LABELS, RunJournal

log = logging.getLogger(__name__)

PHASES = ("cold", "a", "b", "c")
ARMS = ("meta", "residual", "random", "mean", "mwuf", "mwuf-phase", "mwuf-shift")
DEFAULT_ARMS = ("meta", "random", "mean")  # the first journals' arms; `residual` is asked for by --arms
# arms whose embedding comes from a learned network, compared with the baselines (and with the earlier ones)
GENERATED = ("meta", "residual", "mwuf", "mwuf-phase", "mwuf-shift")
# arm -> what its shift reads, and whether it has a scale (model/mwuf.py)
MWUF_ARMS = {"mwuf": ("event", True), "mwuf-phase": ("phase", True), "mwuf-shift": ("event", False)}
ARM_LABELS = {"meta": "Meta", "residual": "Meta (mean row + residual)", "random": "w/o Meta (random)",
              "mean": "mean known-user row", "mwuf": "MWUF (shift from each event's history)",
              "mwuf-phase": "MWUF (shift from the clicks sent so far)",
              "mwuf-shift": "MWUF's shift alone (no scale)"}
ARM_COLORS = {"meta": "tab:blue", "residual": "tab:purple", "random": "tab:orange", "mean": "tab:green",
              "mwuf": "tab:red", "mwuf-phase": "tab:brown", "mwuf-shift": "tab:pink"}
BATCHES = ("a", "b", "c")


@dataclass(frozen=True)
class Protocol:
    k: int = 10  # events per warm-up batch
    band: tuple[int, int] = (40, 150)  # new users: event count within [lo, hi]
    active_min: int = 40  # T: pre-training users have >= T events
    new_user_frac: float = 0.3  # split.cold_user_frac: the users held out, of which the band are new users


PROTOCOLS = {
    "movielens-100k": Protocol(k=10, band=(40, 150), active_min=40),
    "synthetic": Protocol(k=20, band=(80, 100), active_min=100),
    "shop": Protocol(k=5, band=(25, 100), active_min=25),
}


@dataclass(frozen=True)
class WarmConfig:
    batch_size: int = 64
    epochs: int = 1
    update: str = "model"  # "model": model and new users' embeddings (the paper); "embeddings": those only
    # "minibatch-adam": the passes above; "event-sgd" / "event-adam": the online worker's rule (model/warm_rule.py),
    # each user's events in time order, one step each, the model frozen (needs update="embeddings")
    rule: str = "minibatch-adam"
    lr: float | None = None  # the event rules' step: default α of the generator (sgd), pre-training lr (adam)
    # The event rules' step chosen on validation: `valid_frac` of the new users (a fixed draw) are warmed up with
    # each step of `lr_grid` and scored on their own rests; the others, with each arm's chosen step, are the
    # reported test users. Empty grid: no choice, every new user is a test user.
    lr_grid: tuple[float, ...] = ()
    valid_frac: float = 0.3
    # each new user gets their own base user-id row (from the OOV row they are served with), warmed with the UDG row
    base_user: bool = False


WARM_RULES = ("minibatch-adam", "event-sgd", "event-adam")


def event_rule(warm: WarmConfig, train_config):
    """The WarmRule of an event-* warm-up (the worker's defaults for its step size)."""
    from model.meta import MetaConfig
    from model.warm_rule import WarmRule

    name = warm.rule.removeprefix("event-")
    default = MetaConfig().alpha if name == "sgd" else train_config.lr
    return WarmRule(name, warm.lr if warm.lr is not None else default)


def setup_of(warm: WarmConfig) -> dict:
    """The journal's setup of `warm`: the rule's fields only when not the default (older journals match)."""
    setup = asdict(warm)
    if not warm.lr_grid:
        setup.pop("lr_grid")
        setup.pop("valid_frac")
    if warm.rule == "minibatch-adam" and warm.lr is None:
        setup.pop("rule")
        setup.pop("lr")
    if not warm.base_user:
        setup.pop("base_user")
    return setup


@dataclass(frozen=True)
class GeneratorOptions:
    """How the generators are trained (Algorithm 1's settings beyond the step count)."""

    phase_a_history: bool = False  # phase A sees the user's real behavior (the paper: none)
    alpha: float = 0.1
    gamma: float = 0.1
    shrink_grid: tuple[float, ...] = (0.1, 10.0)  # residual arm: weights tried on validation (+ the mean row)
    valid_frac: float = 0.2  # residual arm: share of the active users held out to choose the weight
    residual_steps: int = 500  # residual arm: Algorithm 1 steps of each fit
    # meta arm: (alpha, gamma, phase_a_history) candidates chosen on the held-out active users (`choose_meta`);
    # empty: the one setting above, on all the active users
    meta_grid: tuple[tuple[float, float, bool], ...] = ()

    def changed(self) -> dict:
        """The settings that differ from the defaults (only these enter the journal's setup, so the journals
        written before these options existed stay valid)."""
        default = GeneratorOptions()
        return {k: v for k, v in asdict(self).items() if v != getattr(default, k)}


@dataclass
class ColdStartSplit:
    """The protocol's users and events. `new_index[user number]` is a new user's row (-1 for the others)."""

    active: PreparedData  # train/valid/test of the active users only
    new_users: np.ndarray  # user numbers (Samples.user_key) of the new users
    new_index: np.ndarray  # int64 [all users]
    batches: dict[str, Samples]  # "a", "b", "c", "rest"
    info: dict


def user_event_counts(data: PreparedData) -> np.ndarray:
    """Events per user number over every split."""
    total = np.zeros(len(data.user_ids), np.int64)
    for samples in data.splits.values():
        total += np.bincount(samples.user_key, minlength=len(data.user_ids))
    return total


def positions_in_user(samples: Samples) -> np.ndarray:
    """Each event's rank among its user's events (0 = earliest); samples are in (user, time) order."""
    order = np.argsort(samples.user_key, kind="stable")
    keys = samples.user_key[order]
    first = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])) if len(keys) else np.zeros(0, int)
    starts = np.repeat(first, np.diff(np.concatenate([first, [len(keys)]])))
    position = np.empty(len(keys), np.int64)
    position[order] = np.arange(len(keys)) - starts
    return position


def build_split(data: PreparedData, protocol: Protocol) -> ColdStartSplit:
    """New users from the held-out (`cold`) users within the band, their events cut by time; active users from
    the others with >= T events. Raises ValueError when the data hold no new or no active user."""
    lo, hi = protocol.band
    if lo < 3 * protocol.k + 1:
        raise ValueError(f"band starts at {lo} events: a new user needs 3K = {3 * protocol.k} warm-up events "
                         "and at least one held-out event")
    counts = user_event_counts(data)
    cold = data.splits["cold"]
    held_out = np.zeros(len(counts), bool)
    held_out[cold.user_key] = True
    new = held_out & (counts >= lo) & (counts <= hi)
    active = ~held_out & (counts >= protocol.active_min)
    new_users = np.flatnonzero(new)
    if not len(new_users):
        raise ValueError(f"no held-out user has {lo}-{hi} events (split.cold_user_frac = "
                         f"{data.spec.split.cold_user_frac})")
    if not active.any():
        raise ValueError(f"no training user has >= {protocol.active_min} events")
    new_index = np.full(len(counts), -1, np.int64)
    new_index[new_users] = np.arange(len(new_users))
    events = cold.subset(new[cold.user_key])
    position = positions_in_user(events)
    k = protocol.k
    batches = {name: events.subset((position >= i * k) & (position < (i + 1) * k)) for i, name in enumerate(BATCHES)}
    batches["rest"] = events.subset(position >= 3 * k)
    splits = {name: samples.subset(active[samples.user_key]) for name, samples in data.splits.items()
              if name != "cold"}
    splits["cold"] = batches["rest"]
    info = {"new_users": int(len(new_users)), "active_users": int(active.sum()),
            "unused_users": int(len(counts) - len(new_users) - active.sum()),
            "active_train_events": int(len(splits["train"])),
            **{f"{name}_events": int(len(s)) for name, s in batches.items()},
            "rest_positive_rate": float(batches["rest"].label.mean())}
    return ColdStartSplit(replace(data, splits=splits), new_users, new_index, batches, info)


# --- one (model, seed): pre-train, meta-train, then every arm through the phases ---------------------------
def initial_embeddings(arm: str, model, generator, split: ColdStartSplit, seed: int):
    """`generator`: the arm's generator (meta and residual arms), or a dict {arm: generator}. The mwuf arm's raw
    rows are the mean row (its networks transform them when scored: `NewUserTable`)."""
    import torch

    n, dim = len(split.new_users), model.config.udg_dim
    if isinstance(generator, dict):
        generator = generator.get(arm)
    with torch.no_grad():
        if arm in ("meta", "residual"):
            return generator(torch.as_tensor(split.active.splits["train"].profiles[split.new_users])).clone()
        if arm == "random":
            return torch.randn(n, dim, generator=torch.Generator().manual_seed(10_000 + seed)) * 0.05
        if arm == "mean" or arm in MWUF_ARMS:
            from dataset.schema import OOV

            rows = np.unique(split.active.splits["train"].user)
            rows = rows[rows > OOV]
            return model.udg_emb.weight[torch.as_tensor(rows)].mean(0, keepdim=True).expand(n, dim).clone()
    raise ValueError(f"unknown arm {arm!r}; choose from {ARMS}")


def _inputs(samples: Samples, rows: np.ndarray, split: ColdStartSplit):
    import torch

    from model.train import to_tensors

    batch = to_tensors(samples, rows)
    return batch, torch.as_tensor(split.new_index[samples.user_key[rows]])


def _logits(model, table, batch, index):
    if hasattr(table, "vectors"):
        user_vec, udg = table.vectors(model, batch, index)
        return model.score(user_vec, udg, batch["history"], batch["item"])
    user_vec = model.unseen_user_vector(batch["profile"])  # OOV id row + profile rows, as served
    return model.score(user_vec, table(index), batch["history"], batch["item"])


def evaluate_new_users(model, table, samples: Samples, split: ColdStartSplit) -> dict:
    import torch

    from model.metrics import all_metrics

    model.eval()
    probs = []
    with torch.no_grad():
        for start in range(0, len(samples), 8192):
            batch, index = _inputs(samples, np.arange(start, min(start + 8192, len(samples))), split)
            probs.append(torch.sigmoid(_logits(model, table, batch, index)))
    return all_metrics(samples.label, torch.cat(probs).numpy())


def served_histories(split: ColdStartSplit, names: tuple[str, ...], width: int) -> np.ndarray:
    """Per new user [n_new, width]: their clicks in the batches `names`, most recent first, PAD-filled: the
    history the service holds when it scores their rest after those batches (the rest's own clicks were never
    sent), unlike the data's history of each rest event."""
    from dataset.schema import PAD

    history = np.full((len(split.new_users), width), PAD, np.int64)
    clicks: dict[int, list[int]] = {}
    for name in names:
        samples = split.batches[name]
        for key, item, label in zip(samples.user_key, samples.item, samples.label, strict=True):
            if label > 0.5:
                clicks.setdefault(int(split.new_index[key]), []).append(int(item))
    for row, items in clicks.items():
        recent = items[::-1][:width]
        history[row, :len(recent)] = recent
    return history


def evaluate_served_history(model, table, samples: Samples, split: ColdStartSplit, history: np.ndarray) -> dict:
    """`evaluate_new_users` with each rest event's behavior feature replaced by its user's `history` row."""
    import torch

    from model.metrics import all_metrics

    model.eval()
    probs = []
    with torch.no_grad():
        for start in range(0, len(samples), 8192):
            batch, index = _inputs(samples, np.arange(start, min(start + 8192, len(samples))), split)
            batch["history"] = torch.as_tensor(history[index.numpy()])
            probs.append(torch.sigmoid(_logits(model, table, batch, index)))
    return all_metrics(samples.label, torch.cat(probs).numpy())


def warm_up(model, table, samples: Samples, split: ColdStartSplit, train_config, warm: WarmConfig,
            seed: int, phase: int) -> None:
    """One phase: `warm.epochs` passes over the batch, minibatches of `warm.batch_size` in a seeded order (the
    same for every arm), Adam with the pre-training's learning rate and weight decays."""
    import torch
    from torch.nn import functional as F

    from model.train import make_optimizer

    decay = (train_config.embed_weight_decay if train_config.udg_weight_decay is None
             else train_config.udg_weight_decay)
    if warm.update == "model":
        model.train()
        optimizer = make_optimizer(model, train_config)
        optimizer.add_param_group({"params": [table.weight], "weight_decay": decay})
    elif warm.update == "embeddings":
        model.eval()
        optimizer = torch.optim.Adam([table.weight], lr=train_config.lr, weight_decay=decay)
    else:
        raise ValueError(f"warm update must be 'model' or 'embeddings', not {warm.update!r}")
    extra = table.extra_rows() if hasattr(table, "extra_rows") else []
    if extra:  # new users' own base id rows, with the base embeddings' weight decay
        optimizer.add_param_group({"params": extra, "weight_decay": train_config.embed_weight_decay})
    generator = torch.Generator().manual_seed(1000 * seed + phase)
    for _ in range(warm.epochs):
        order = torch.randperm(len(samples), generator=generator).numpy()
        for start in range(0, len(samples), warm.batch_size):
            batch, index = _inputs(samples, order[start:start + warm.batch_size], split)
            loss = F.binary_cross_entropy_with_logits(_logits(model, table, batch, index), batch["label"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    model.eval()


def run_arm(model, init, split: ColdStartSplit, train_config, warm: WarmConfig, seed: int, nets=None) -> dict:
    """Cold start, then warm-up a, b, c on a copy of `model`: metrics on the rests after each phase, and how far
    the new users' embeddings moved (mean L2 norm of the change since the cold start). Also, under
    `served_history`, each phase's metrics with the histories the service would hold (`served_histories`), of
    the warmed embeddings and of the initial ones (no warm-up): what a replay through the service measures.
    `nets`: MWUF's networks, transforming the rows whenever they are scored (the mwuf arm). With
    `warm.base_user`, each new user's base id row starts at the OOV row and is warmed too."""
    import torch

    from dataset.schema import OOV
    from model.new_users import new_user_table

    model = copy.deepcopy(model)
    for parameter in model.parameters():
        parameter.requires_grad_(warm.update == "model")
    base_init = None
    if warm.base_user:
        with torch.no_grad():
            oov = model.base_model.user_emb.weight[OOV]
        base_init = oov.expand(len(init), -1).clone()
    if (nets is not None or warm.base_user) and warm.rule != "minibatch-adam":
        raise ValueError(f"warm rule {warm.rule} updates UDG rows only: no mwuf arm or base user rows")
    table = new_user_table(init, False, nets, base_init)
    initial = new_user_table(init, True, nets, base_init)
    phase_shift = getattr(nets, "shift_source", None) == "phase"

    def clicks_sent(names: tuple[str, ...]) -> None:  # "phase" networks' shift: the clicks of these batches
        if phase_shift:
            table.shift_history = initial.shift_history = torch.as_tensor(served_histories(split, names, width))
    rest = split.batches["rest"]
    width = rest.histories.gather(np.arange(min(1, len(rest)))).shape[1] if len(rest) else 1
    clicks_sent(())
    phases = {"cold": evaluate_new_users(model, table, rest, split)}
    served = {"phases": {}, "no_warmup": {}}

    def served_phase(name: str, seen: tuple[str, ...]) -> None:
        history = served_histories(split, seen, width)
        served["phases"][name] = evaluate_served_history(model, table, rest, split, history)
        served["no_warmup"][name] = evaluate_served_history(model, initial, rest, split, history)

    served_phase("cold", ())
    moved = {"cold": 0.0}
    if warm.rule != "minibatch-adam":
        from model.warm_rule import warm_up_events

        if warm.update != "embeddings":
            raise ValueError(f"warm rule {warm.rule} freezes the model: it needs warm update 'embeddings'")
        rule = event_rule(warm, train_config)
        state = rule.initial_state(*init.shape)
    for i, name in enumerate(BATCHES, start=1):
        clicks_sent(BATCHES[:i - 1])  # warm-up on a batch knows the clicks sent before it
        if warm.rule == "minibatch-adam":
            warm_up(model, table, split.batches[name], split, train_config, warm, seed, i)
        else:
            warm_up_events(model, table, state, split.batches[name], split.new_index, rule)
        clicks_sent(BATCHES[:i])
        phases[name] = evaluate_new_users(model, table, split.batches["rest"], split)
        served_phase(name, BATCHES[:i])
        moved[name] = float((table.weight.detach() - init).norm(dim=1).mean())
    return {"phases": phases, "embedding_shift": moved, "served_history": served}


def udg_dependence(model, samples: Samples) -> dict:
    """How much a pre-trained model reads the UDG row, on known users' events (`samples`, e.g. the active
    users' test split): AUC and log loss with each user's own trained row and with every row replaced by the
    mean of these users' rows (about what the `mean` arm gives a new user), the rows' spread around that mean
    (RMS of the L2 distance) and the mean row's L2 norm, and how far the gates move under that replacement (mean
    absolute change over gates and events, against the gates' own std across events)."""
    import torch

    from dataset.schema import OOV
    from model.metrics import all_metrics
    from model.train import to_tensors

    model.eval()
    rows = np.unique(samples.user)
    rows = torch.as_tensor(rows[rows > OOV])
    table = model.udg_emb.weight.detach()
    mean = table[rows].mean(0, keepdim=True)
    probs = {"own": [], "mean": []}
    shift, spread, events = 0.0, [], 0
    with torch.no_grad():
        for start in range(0, len(samples), 8192):
            batch = to_tensors(samples, np.arange(start, min(start + 8192, len(samples))))
            user_vec, own = model.user_state(batch["user"], batch["profile"])
            replaced = mean.expand(len(own), -1)
            for name, udg in (("own", own), ("mean", replaced)):
                probs[name].append(torch.sigmoid(model.score(user_vec, udg, batch["history"], batch["item"])))
            before = model.gate_values(user_vec, own, batch["history"], batch["item"])
            after = model.gate_values(user_vec, replaced, batch["history"], batch["item"])
            n = len(own)
            shift += sum(float((b - a).abs().mean()) for b, a in zip(before, after, strict=True)) / len(before) * n
            spread.append(torch.cat([g.expand(n, -1) for g in before], 1))
            events += n
    gate_std = float(torch.cat(spread).std(0).mean()) if spread else 0.0
    own, replaced = (all_metrics(samples.label, torch.cat(probs[k]).numpy()) for k in ("own", "mean"))
    return {"auc_own_row": own["auc"], "auc_mean_row": replaced["auc"],
            "log_loss_own_row": own["log_loss"], "log_loss_mean_row": replaced["log_loss"],
            "row_spread": float((table[rows] - mean).norm(dim=1).pow(2).mean().sqrt()),
            "mean_row_norm": float(mean.norm()), "gate_shift": shift / max(events, 1), "gate_std": gate_std}


def new_user_cut(split: ColdStartSplit, frac: float) -> tuple[ColdStartSplit, ColdStartSplit]:
    """(validation, test): the protocol restricted to a fixed random `frac` of the new users and to the others.
    Both keep the full `new_index` and `new_users`, so an arm's initial rows serve either."""
    rng = np.random.default_rng(20_000)
    held = np.zeros(len(split.new_index), bool)
    chosen = rng.choice(split.new_users, size=max(1, int(round(frac * len(split.new_users)))), replace=False)
    held[chosen] = True

    def part(mask: np.ndarray) -> ColdStartSplit:
        batches = {name: samples.subset(mask[samples.user_key]) for name, samples in split.batches.items()}
        info = {**split.info, "new_users": int(mask[split.new_users].sum())}
        return replace(split, batches=batches, info=info)

    return part(held), part(~held)


def chosen_step(model, init, split: ColdStartSplit, train_config, warm: WarmConfig, seed: int) -> tuple[float, dict]:
    """The event rule's step of `warm.lr_grid` with the best mean AUC after a, b and c on the validation users'
    rests (`split` is the validation cut); -> (step, {step: {phase AUCs, log losses, score}})."""
    scores = {}
    for lr in warm.lr_grid:
        phases = run_arm(model, init, split, train_config, replace(warm, lr=lr), seed)["phases"]
        scores[f"{lr:g}"] = {"auc": {p: phases[p]["auc"] for p in PHASES},
                             "log_loss": {p: phases[p]["log_loss"] for p in PHASES},
                             "score": float(np.mean([phases[p]["auc"] for p in BATCHES]))}
    best = max(scores, key=lambda k: scores[k]["score"])
    return float(best), scores


def udg_headroom(model, split: ColdStartSplit) -> dict:
    """What a user's own rows are worth to the pre-trained model: on the active users' test events (later than
    everything it trained on), AUC and log loss with their own trained rows, and with the UDG row, the base id
    row or both replaced by what a new user is served (the mean known-user UDG row, the OOV id row). The gap
    between `own` and `mean_udg` is about the most a new user's UDG row could earn once fully warmed; from
    `mean_udg` to `new_user`, what their own base id row could (`--warm-base-user`)."""
    import torch

    from model.metrics import all_metrics
    from model.train import to_tensors

    samples = split.active.splits["test"]
    mean = initial_embeddings("mean", model, None, split, 0)[:1]
    model.eval()
    probs: dict[str, list] = {"own": [], "mean_udg": [], "oov_base": [], "new_user": []}
    with torch.no_grad():
        for start in range(0, len(samples), 8192):
            batch = to_tensors(samples, np.arange(start, min(start + 8192, len(samples))))
            own_base = model.base_model.user_vector(batch["user"], batch["profile"])
            oov_base = model.unseen_user_vector(batch["profile"])
            own_udg, mean_udg = model.udg_emb(batch["user"]), mean.expand(len(batch["user"]), -1)
            for name, (user_vec, udg) in {"own": (own_base, own_udg), "mean_udg": (own_base, mean_udg),
                                          "oov_base": (oov_base, own_udg), "new_user": (oov_base, mean_udg)}.items():
                probs[name].append(torch.sigmoid(model.score(user_vec, udg, batch["history"], batch["item"])))
    return {name: all_metrics(samples.label, torch.cat(p).numpy()) for name, p in probs.items()}


class PretrainCache:
    """Optional on-disk cache of a seed's pre-trained model and generators (`--cache DIR`), keyed by everything
    they depend on, so that further arms or warm-up settings over the same seeds skip the pre-training. The
    results are the same with or without it (the pre-training is seeded)."""

    def __init__(self, folder: Path | None, setup: dict):
        import hashlib
        import json

        self.folder = Path(folder) if folder else None
        self.key = hashlib.sha256(json.dumps(setup, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _path(self, what: str) -> Path:
        return self.folder / f"{self.key}-{what}.pt"

    def get(self, what: str):
        import torch

        if self.folder is None or not self._path(what).exists():
            return None
        return torch.load(self._path(what), weights_only=False)

    def put(self, what: str, value) -> None:
        import torch

        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self._path(what).with_suffix(".tmp")
        torch.save(value, tmp)
        tmp.replace(self._path(what))


def train_generators(model, split: ColdStartSplit, arms: list[str], meta_steps: int, seed: int,
                     options: GeneratorOptions, cache: PretrainCache | None = None) -> tuple[dict, dict]:
    """The generators the arms need: `meta` (Algorithm 1, Eq. 11; with a meta grid, its settings chosen on
    held-out active users), `residual` (the mean row plus a residual, shrinkage chosen on validation) and `mwuf`
    (MWUF's scale/shift networks, or None where validation keeps the identity); -> ({arm: generator}, {arm:
    training info})."""
    from model.meta import MetaConfig, choose_meta, choose_shrink, train_meta
    from model.mwuf import MwufConfig, choose_mwuf

    config = MetaConfig(steps=meta_steps, seed=seed, alpha=options.alpha, gamma=options.gamma,
                        phase_a_history=options.phase_a_history)
    generators, infos = {}, {}
    for arm in (a for a in GENERATED if a in arms):
        cached = cache.get(f"{arm}-{seed}") if cache else None
        if cached is None:
            if arm == "meta" and options.meta_grid:
                cached = choose_meta(model, split.active, config, options.meta_grid, valid_frac=options.valid_frac)
            elif arm == "meta":
                cached = train_meta(model, split.active, config, progress=False)
            elif arm in MWUF_ARMS:
                cached = choose_mwuf(model, split.active, MwufConfig(steps=meta_steps, seed=seed, alpha=options.alpha,
                                                                     gamma=options.gamma, shift=MWUF_ARMS[arm][0],
                                                                     scale=MWUF_ARMS[arm][1]),
                                     valid_frac=options.valid_frac)
            else:
                cached = choose_shrink(model, split.active, replace(config, steps=options.residual_steps),
                                       grid=options.shrink_grid, valid_frac=options.valid_frac)
            if cache:
                cache.put(f"{arm}-{seed}", cached)
        generators[arm], infos[arm] = cached
    return generators, infos


def run_seed(split: ColdStartSplit, kind: str, seed: int, arms: list[str], train_config, meta_steps: int,
             warm: WarmConfig, options: GeneratorOptions | None = None,
             cache: PretrainCache | None = None) -> dict[str, dict]:
    """Pre-train base+UDG and the generators on the active users, then run each arm; -> {arm: journal row}."""
    from model.experiment import model_config, udg_preset
    from model.train import train_model

    options = options or GeneratorOptions()
    started = time.perf_counter()
    cached = cache.get(f"{kind}-{seed}") if cache else None
    if cached is None:
        cached = train_model(split.active, model_config(kind, udg_preset(kind)), replace(train_config, seed=seed),
                             progress=False)
        if cache:
            cache.put(f"{kind}-{seed}", cached)
    model, metrics = cached
    generators, infos = train_generators(model, split, arms, meta_steps, seed, options,
                                         PretrainCache(cache.folder, {"key": cache.key, "kind": kind,
                                                                      "meta_steps": meta_steps,
                                                                      "generator": options.changed()})
                                         if cache else None)
    pretrain = {"best_epoch": metrics["best_epoch"], "valid": metrics["valid"], "test": metrics["test"],
                "meta_final_loss": infos["meta"]["final_loss"] if "meta" in infos else None,
                "seconds": time.perf_counter() - started, "headroom": udg_headroom(model, split)}
    if train_config.udg_weight_decay is not None:  # new journals only, so the old ones regenerate as they were
        pretrain["udg_weight_decay"] = train_config.udg_weight_decay
    pretrain["udg_dependence"] = udg_dependence(model, split.active.splits["test"])
    rows = {}
    valid, test = new_user_cut(split, warm.valid_frac) if warm.lr_grid else (None, split)
    for arm in arms:
        init = initial_embeddings(arm, model, generators, split, seed)
        nets = generators.get(arm) if arm in MWUF_ARMS else None
        step = None
        if warm.lr_grid:  # event rules only, which take no mwuf arm (refused in run_coldstart)
            lr, scores = chosen_step(model, init, valid, train_config, warm, seed)
            step = {"chosen": lr, "validation": scores, "valid_users": valid.info["new_users"],
                    "test_users": test.info["new_users"]}
        result = run_arm(model, init, test, train_config, replace(warm, lr=step["chosen"]) if step else warm, seed,
                         nets=nets)
        row = {"model": kind, "variant": arm, "seed": seed, "pretrain": pretrain, **result}
        if step:
            row["warm_step"] = step
        if arm == "residual" or arm in MWUF_ARMS or (arm == "meta" and "validation" in infos[arm]):
            row["generator"] = {k: v for k, v in infos[arm].items() if k in ("validation", "chosen", "fit_users",
                                                                              "valid_users", "final_loss")}
        rows[arm] = row
    return rows


def run_grid(split: ColdStartSplit, kinds: list[str], arms: list[str], seeds: int, train_config, meta_steps: int,
             warm: WarmConfig, journal: RunJournal | None = None, train_missing: bool = True,
             options: GeneratorOptions | None = None, cache: PretrainCache | None = None) -> list[dict]:
    """Every (model, arm, seed), seed-major; finished rows come from the journal, a seed's missing arms are run
    together (they share its pre-training)."""
    rows = []
    for seed in range(seeds):
        for kind in kinds:
            missing = [a for a in arms if not (journal and journal.get(kind, a, seed))]
            rows += [journal.get(kind, a, seed) for a in arms if a not in missing]
            if not missing or not train_missing:
                continue
            claimed = [a for a in missing if not journal or journal.claim(kind, a, seed)]
            if journal and len(claimed) < len(missing):  # another process has this seed
                for arm in claimed:
                    journal.release(kind, arm, seed)
                continue
            try:
                done = run_seed(split, kind, seed, claimed, train_config, meta_steps, warm, options, cache)
            except BaseException:
                for arm in claimed:
                    if journal:
                        journal.release(kind, arm, seed)
                raise
            for arm in claimed:
                if journal:
                    journal.add(done[arm])
                rows.append(done[arm])
            cold = {a: done[a]["phases"]["cold"]["auc"] for a in claimed}
            final = {a: done[a]["phases"]["c"]["auc"] for a in claimed}
            log.info("%s seed %d: cold AUC %s, after c %s (%.0f s)", kind, seed, cold, final,
                     done[claimed[0]]["pretrain"]["seconds"])
    return rows


# --- tables and the figure ---------------------------------------------------------------------------------
def _pm(values) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def rela_impr(auc: float, reference: float) -> float:
    """Relative AUC improvement (Table 5; RelaImpr of Meta-Embedding): (AUC - 0.5) / (AUC_ref - 0.5) - 1."""
    return (auc - 0.5) / (reference - 0.5) - 1


def summarise(rows: list[dict]) -> list[dict]:
    """Per (model, arm, phase): AUC and log loss (mean ± std over seeds) and, paired by seed, the relative AUC
    and log loss against the same seed's cold-start "w/o Meta" (random) arm, and the meta arm's AUC gain over
    this arm."""
    by = {(r["model"], r["variant"], r["seed"]): r for r in rows}
    out = []
    for kind in dict.fromkeys(r["model"] for r in rows):
        arms = [a for a in ARMS if any(r["model"] == kind and r["variant"] == a for r in rows)]
        for arm in arms:
            seeds = sorted(s for (k, a, s) in by if k == kind and a == arm)
            for phase in PHASES:
                auc = [by[(kind, arm, s)]["phases"][phase]["auc"] for s in seeds]
                loss = [by[(kind, arm, s)]["phases"][phase]["log_loss"] for s in seeds]
                paired = [s for s in seeds if (kind, "random", s) in by]
                ref = {s: by[(kind, "random", s)]["phases"]["cold"] for s in paired}
                meta = [s for s in seeds if (kind, "meta", s) in by]
                line = {"model": kind, "arm": arm, "phase": phase, "seeds": len(seeds), "auc": _pm(auc),
                        "log_loss": _pm(loss),
                        "rel_auc": _pm([rela_impr(by[(kind, arm, s)]["phases"][phase]["auc"], ref[s]["auc"])
                                        for s in paired]),
                        "rel_log_loss": _pm([by[(kind, arm, s)]["phases"][phase]["log_loss"]
                                             / ref[s]["log_loss"] - 1 for s in paired]),
                        "gains": {g: _pm([by[(kind, g, s)]["phases"][phase]["auc"]
                                          - by[(kind, arm, s)]["phases"][phase]["auc"]
                                          for s in seeds if (kind, g, s) in by]) for g in GENERATED},
                        "wins": {g: sum(by[(kind, g, s)]["phases"][phase]["auc"]
                                        > by[(kind, arm, s)]["phases"][phase]["auc"]
                                        for s in seeds if (kind, g, s) in by) for g in GENERATED},
                        "paired_with": {g: sum((kind, g, s) in by for s in seeds) for g in GENERATED},
                        "meta_gain": _pm([by[(kind, "meta", s)]["phases"][phase]["auc"]
                                          - by[(kind, arm, s)]["phases"][phase]["auc"] for s in meta]),
                        "vs_random": _pm([by[(kind, arm, s)]["phases"][phase]["auc"]
                                          - by[(kind, "random", s)]["phases"][phase]["auc"] for s in paired]),
                        "meta_wins": sum(by[(kind, "meta", s)]["phases"][phase]["auc"]
                                         > by[(kind, arm, s)]["phases"][phase]["auc"] for s in meta),
                        "meta_paired": len(meta)}
                out.append(line)
    return out


def validation_lines(rows: list[dict]) -> list[str]:
    """What validation on held-out active users chose for each mwuf row (its networks or the identity) and the
    validation scores' gap, per model (nothing for journals without the arm)."""
    lines = []
    for kind in dict.fromkeys(r["model"] for r in rows):
        for arm in MWUF_ARMS:
            mine = sorted((r for r in rows if r["model"] == kind and r["variant"] == arm and "generator" in r),
                          key=lambda r: r["seed"])
            if not mine:
                continue
            cells = []
            for r in mine:
                scores = r["generator"]["validation"]
                gain = scores["identity"]["score"] - scores["mwuf"]["score"]
                cells.append(f"seed {r['seed']} {r['generator']['chosen']} ({gain:+.4f})")
            lines += [f"Validation of {ARM_LABELS[arm]} ({MODEL_LABELS.get(kind, kind)}+UDG; held-out active users' "
                      "score, the mean of the cold and one-step log loss, of the identity minus the networks'): "
                      + ", ".join(cells) + ".", ""]
    return lines


HEADROOM_LABELS = {"own": "own base id row + own UDG row (as trained)",
                   "mean_udg": "own base id row + mean UDG row",
                   "oov_base": "OOV base id row + own UDG row",
                   "new_user": "OOV base id row + mean UDG row (as a new user)"}


def headroom_table(rows: list[dict]) -> list[str]:
    """The pre-trained models' `udg_headroom` over seeds (one per seed: every arm of a seed shares it), with the
    paired gaps; nothing for journals written before it was measured."""
    lines = []
    for kind in dict.fromkeys(r["model"] for r in rows):
        seeds = {r["seed"]: r["pretrain"]["headroom"] for r in sorted(rows, key=lambda r: r["seed"])
                 if r["model"] == kind and "headroom" in r.get("pretrain", {})}
        if not seeds:
            continue
        label = MODEL_LABELS.get(kind, kind)
        lines += ["", f"#### {label}+UDG: what a user's own rows are worth, on the active users' test events "
                      f"(mean ± std over {len(seeds)} seeds)", "",
                  "| rows | AUC | log loss |", "|---|---|---|"]
        for name, text in HEADROOM_LABELS.items():
            lines.append(f"| {text} | {_val(_pm([h[name]['auc'] for h in seeds.values()]))} | "
                         f"{_val(_pm([h[name]['log_loss'] for h in seeds.values()]))} |")
        for text, (a, b) in (("own UDG row − mean UDG row (own base id row)", ("own", "mean_udg")),
                             ("own base id row − OOV row (mean UDG row)", ("mean_udg", "new_user"))):
            auc = _pm([h[a]["auc"] - h[b]["auc"] for h in seeds.values()])
            loss = _pm([h[a]["log_loss"] - h[b]["log_loss"] for h in seeds.values()])
            lines.append(f"| gap: {text} | {auc[0]:+.4f} ± {auc[1]:.4f} | {loss[0]:+.4f} ± {loss[1]:.4f} |")
    return lines


def served_table(rows: list[dict]) -> list[str]:
    """For journals with an MWUF arm (its shift reads the history): each arm's AUC when every held-out event sees
    only the clicks sent so far (`served_histories`, what the service holds), and each generated arm's paired
    gain over the mean row and over random init there."""
    lines = []
    for kind in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == kind and "served_history" in r]
        if not any(r["variant"] in MWUF_ARMS for r in mine):
            continue
        by = {(r["variant"], r["seed"]): r["served_history"]["phases"] for r in mine}
        arms = [a for a in ARMS if any(v == a for v, _ in by)]
        label = MODEL_LABELS.get(kind, kind)
        lines += ["", f"#### {label}+UDG: AUC with the histories the service holds (each held-out event sees only "
                      "the clicks of the batches sent so far; mean ± std; gains paired by seed, seeds where higher)",
                  "", "| arm | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
        for arm in arms:
            seeds = sorted(s for a, s in by if a == arm)
            lines.append(f"| {ARM_LABELS[arm]} | "
                         + " | ".join(_val(_pm([by[(arm, s)][p]["auc"] for s in seeds])) for p in PHASES) + " |")
        for arm in (a for a in arms if a in GENERATED):
            for baseline in (b for b in ("mean", "random") if b in arms):
                seeds = sorted(s for a, s in by if a == arm and (baseline, s) in by)
                cells = []
                for p in PHASES:
                    gains = [by[(arm, s)][p]["auc"] - by[(baseline, s)][p]["auc"] for s in seeds]
                    mean, std = _pm(gains)
                    cells.append(f"{mean:+.4f} ± {std:.4f} ({sum(g > 0 for g in gains)}/{len(gains)})")
                lines.append(f"| {ARM_LABELS[arm]} − {ARM_LABELS[baseline]} | " + " | ".join(cells) + " |")
    return lines


def _pct(pair) -> str:
    return "—" if np.isnan(pair[0]) else f"{100 * pair[0]:+.2f}% ± {100 * pair[1]:.2f}"


def _val(pair) -> str:
    return "—" if np.isnan(pair[0]) else f"{pair[0]:.4f} ± {pair[1]:.4f}"


def tables(summary: list[dict]) -> str:
    """Table 5 (relative to cold-start w/o Meta), absolute metrics, and meta's paired gain over each baseline."""
    lines = []
    for kind in dict.fromkeys(s["model"] for s in summary):
        mine = [s for s in summary if s["model"] == kind]
        by = {(s["arm"], s["phase"]): s for s in mine}
        arms = list(dict.fromkeys(s["arm"] for s in mine))
        label = MODEL_LABELS.get(kind, kind)
        seeds = "/".join(str(by[(a, 'cold')]["seeds"]) for a in arms)
        lines += [f"#### {label}+UDG: relative to cold-start w/o Meta, paired by seed (as Table 5; seeds "
                  f"{'/'.join(arms)} = {seeds})", "",
                  "| target | arm | " + " | ".join(PHASES) + " |", "|---|---|" + "---|" * len(PHASES)]
        for target, key in (("AUC (RelaImpr)", "rel_auc"), ("log loss", "rel_log_loss")):
            for arm in arms:
                lines.append(f"| {target} | {ARM_LABELS[arm]} | "
                             + " | ".join(_pct(by[(arm, p)][key]) for p in PHASES) + " |")
        lines += ["", f"#### {label}+UDG: AUC and log loss on the new users' held-out rest (mean ± std)", "",
                  "| metric | arm | " + " | ".join(PHASES) + " |", "|---|---|" + "---|" * len(PHASES)]
        for metric in ("auc", "log_loss"):
            for arm in arms:
                lines.append(f"| {metric.replace('_', ' ')} | {ARM_LABELS[arm]} | "
                             + " | ".join(_val(by[(arm, p)][metric]) for p in PHASES) + " |")
        for generated in (g for g in GENERATED if g in arms):
            # the baselines, and for a later generator the earlier ones
            others = [a for a in arms if a not in GENERATED or GENERATED.index(a) < GENERATED.index(generated)]
            if not others:
                continue
            name = ARM_LABELS[generated]
            lines += ["", f"#### {label}+UDG: AUC of {name} minus each baseline, paired by seed (mean ± std; "
                          f"seeds where {name} is higher)", "",
                      "| baseline | " + " | ".join(PHASES) + " |", "|---|" + "---|" * len(PHASES)]
            for arm in others:
                cells = []
                for p in PHASES:
                    s = by[(arm, p)]
                    mean, std = s["gains"][generated]
                    cells.append(f"{mean:+.4f} ± {std:.4f} ({s['wins'][generated]}/{s['paired_with'][generated]})")
                lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines.append("RelaImpr = (AUC − 0.5) / (AUC of cold-start w/o Meta − 0.5) − 1; log loss relative = "
                 "log loss / that of cold-start w/o Meta − 1; both per seed, then mean ± sample std.")
    return "\n".join(lines)


def _one_per_seed(rows: list[dict], kind: str) -> list[dict]:
    seen, out = set(), []
    for row in rows:
        if row["model"] == kind and row["seed"] not in seen:
            seen.add(row["seed"])
            out.append(row)
    return out


def diagnostics(rows: list[dict]) -> str:
    """The tables of what a journal's newer rows carry (empty for the older journals, whose reports stay as
    they were): how much the pre-trained model reads the UDG row, the meta arm's settings on validation, and
    the warm-up step on validation."""
    lines = []
    for kind in dict.fromkeys(r["model"] for r in rows):
        label = MODEL_LABELS.get(kind, kind)
        seeded = [r for r in _one_per_seed(rows, kind) if "udg_dependence" in r["pretrain"]]
        if seeded:
            deps = [r["pretrain"]["udg_dependence"] for r in seeded]
            wd = {r["pretrain"].get("udg_weight_decay", "as --embed-wd") for r in seeded}
            lines += [f"#### {label}+UDG: how much the pre-trained model reads the UDG row (active users' test "
                      f"events; UDG weight decay {', '.join(str(w) for w in wd)}; mean ± std over "
                      f"{len(deps)} seeds)", "",
                      "| AUC, own row | AUC, mean row for all | drop | log loss, own row | log loss, mean row | "
                      "rows' RMS distance to the mean row | mean row's norm | gate change (mean abs) | "
                      "gates' std across events |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            deps = [{**d, "auc_drop": d["auc_own_row"] - d["auc_mean_row"]} for d in deps]
            cells = [_val(_pm([d[k] for d in deps])) for k in ("auc_own_row", "auc_mean_row", "auc_drop",
                                                                 "log_loss_own_row", "log_loss_mean_row",
                                                                 "row_spread", "mean_row_norm", "gate_shift",
                                                                 "gate_std")]
            lines += ["| " + " | ".join(cells) + " |", ""]
        swept = [r for r in rows
                 if r["model"] == kind and r["variant"] == "meta" and "validation" in r.get("generator", {})]
        if swept:
            names = list(swept[0]["generator"]["validation"])
            lines += [f"#### {label}+UDG: the meta arm's Algorithm 1 setting on validation (held-out active users' "
                      f"log loss, later half: cold = generated row, warm = after one α step on the earlier half; "
                      f"score = their mean; mean ± std over {len(swept)} seeds)", "",
                      "| setting | cold | warm | score | chosen |", "|---|---:|---:|---:|---:|"]
            for name in names:
                v = [r["generator"]["validation"][name] for r in swept]
                lines.append(f"| {name} | {_val(_pm([x['cold'] for x in v]))} | {_val(_pm([x['warm'] for x in v]))} | "
                             f"{_val(_pm([x['score'] for x in v]))} | "
                             f"{sum(r['generator']['chosen'] == name for r in swept)}/{len(swept)} |")
            lines.append("")
        stepped = [r for r in rows if r["model"] == kind and "warm_step" in r]
        if stepped:
            arms = list(dict.fromkeys(r["variant"] for r in stepped))
            steps = list(stepped[0]["warm_step"]["validation"])
            first = stepped[0]["warm_step"]
            lines += [f"#### {label}+UDG: the warm-up step on validation ({first['valid_users']} validation new users' "
                      f"rests, mean AUC after a, b, c; tables above: the other {first['test_users']}; mean ± std "
                      f"over seeds; in brackets, seeds that chose it)", "",
                      "| arm | " + " | ".join(f"step {x}" for x in steps) + " |", "|---|" + "---:|" * len(steps)]
            for arm in arms:
                mine = [r["warm_step"] for r in stepped if r["variant"] == arm]
                lines.append(f"| {ARM_LABELS[arm]} | " + " | ".join(
                    f"{_val(_pm([m['validation'][x]['score'] for m in mine]))} "
                    f"({sum(float(m['chosen']) == float(x) for m in mine)}/{len(mine)})" for x in steps) + " |")
            lines.append("")
    return "\n".join(lines)


def report_tables(rows: list[dict], summary: list[dict] | None = None) -> str:
    """Everything of a report after its head (what `udg docs check` compares with its journal): `tables`, the
    headroom and served-history tables, then the `diagnostics`; each only where the rows carry its figures, so
    the journals written before them render as they did."""
    text = tables(summary if summary is not None else summarise(rows))
    text += "".join("\n" + line for line in headroom_table(rows) + served_table(rows))
    extra = diagnostics(rows)
    return text + ("\n\n" + extra if extra else "")


def plot(summary: list[dict], path: Path, title: str) -> None:
    """Figure 4: AUC and log loss per phase, one line per arm (mean ± std over seeds), and the AUC of every arm
    minus the same seed's w/o Meta arm at that phase (paired: the seed-to-seed spread that all arms share
    cancels); one column per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(s["model"] for s in summary))
    fig, axes = plt.subplots(3, len(kinds), figsize=(4.4 * len(kinds), 9.0), squeeze=False)
    for j, kind in enumerate(kinds):
        arms = list(dict.fromkeys(s["arm"] for s in summary if s["model"] == kind))
        line = {(s["arm"], s["phase"]): s for s in summary if s["model"] == kind}
        for i, metric in enumerate(("auc", "log_loss", "vs_random")):
            ax = axes[i][j]
            for arm in arms:
                points = [line[(arm, p)] for p in PHASES]
                if metric == "vs_random" and (arm == "random" or "random" not in arms):
                    continue
                ax.errorbar(range(len(PHASES)), [p[metric][0] for p in points],
                            yerr=[p[metric][1] for p in points], marker="o", capsize=3, label=ARM_LABELS[arm],
                            color=ARM_COLORS[arm])
            ax.set_xticks(range(len(PHASES)), ["cold-start", "warm-up a", "warm-up b", "warm-up c"])
            ax.set_ylabel("AUC − w/o Meta AUC (paired)" if metric == "vs_random"
                          else f"held-out {metric.replace('_', ' ')}")
            if metric == "vs_random":
                ax.axhline(0, color="grey", lw=0.8)
            if i == 0:
                ax.set_title(f"{MODEL_LABELS.get(kind, kind)}+UDG")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title.replace(": ", ":\n", 1), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- the command ----------------------------------------------------------------------------------------------
def protocol_from(args: argparse.Namespace, spec_name: str) -> Protocol:
    base = PROTOCOLS.get(spec_name, Protocol())
    band = tuple(int(x) for x in args.band.split(",")) if args.band else base.band
    if len(band) != 2:
        raise SystemExit(f"--band {args.band!r}: expected LO,HI")
    return Protocol(k=args.k if args.k is not None else base.k, band=band,
                    active_min=args.active_min if args.active_min is not None else base.active_min,
                    new_user_frac=args.new_user_frac if args.new_user_frac is not None else base.new_user_frac)


def parse_meta_grid(text: str | None) -> tuple[tuple[float, float, bool], ...]:
    """'ALPHA:GAMMA:HISTORY,...' (HISTORY 0 or 1) -> candidates; SystemExit naming the bad item."""
    grid = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        parts = item.strip().split(":")
        try:
            if len(parts) != 3 or parts[2] not in ("0", "1"):
                raise ValueError
            grid.append((float(parts[0]), float(parts[1]), parts[2] == "1"))
        except ValueError:
            raise SystemExit(f"--meta-grid item {item!r}: expected ALPHA:GAMMA:HISTORY, HISTORY 0 or 1") from None
    return tuple(grid)


def run_coldstart(args: argparse.Namespace) -> str:
    from model.commands import data_spec, load_data, set_threads
    from model.train import TrainConfig

    set_threads(args)
    spec = data_spec(args)
    protocol = protocol_from(args, spec.name)
    spec = spec.with_overrides(**{"split.cold_user_frac": protocol.new_user_frac})
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    options = GeneratorOptions(phase_a_history=args.phase_a_history, alpha=args.meta_alpha, gamma=args.meta_gamma,
                               shrink_grid=tuple(float(x) for x in args.shrink_grid.split(",")),
                               valid_frac=args.meta_valid_frac, residual_steps=args.residual_steps,
                               meta_grid=parse_meta_grid(args.meta_grid))
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    warm = WarmConfig(batch_size=args.warm_batch_size, epochs=args.warm_epochs, update=args.warm_update,
                      rule=args.warm_rule, lr=args.warm_lr, base_user=args.warm_base_user,
                      lr_grid=tuple(float(x) for x in args.warm_lr_grid.split(",") if x.strip())
                      if args.warm_lr_grid else (), valid_frac=args.warm_valid_frac)
    if warm.lr_grid and (warm.rule == "minibatch-adam" or warm.lr is not None):
        raise SystemExit("--warm-lr-grid chooses the step of an event rule (--warm-rule event-sgd|event-adam) in "
                         "place of --warm-lr")
    if not 0 < warm.valid_frac < 1:
        raise SystemExit(f"--warm-valid-frac {warm.valid_frac}: expected a share strictly between 0 and 1")
    if warm.rule != "minibatch-adam" and warm.update != "embeddings":
        raise SystemExit(f"--warm-rule {warm.rule} freezes the model: use it with --warm-update embeddings")
    if warm.rule != "minibatch-adam" and (warm.base_user or any(a in MWUF_ARMS for a in arms)):
        raise SystemExit(f"--warm-rule {warm.rule} updates UDG rows only: no --warm-base-user or mwuf arm with it")
    train_config = TrainConfig(epochs=args.epochs, embed_weight_decay=args.embed_wd, udg_weight_decay=args.udg_wd,
                               threads=args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    journal_path = out / "runs.jsonl"
    if args.fresh and journal_path.exists():
        journal_path.unlink()
    setup = {"data": spec.fingerprint(), "protocol": asdict(protocol), "warm": setup_of(warm), "epochs": args.epochs,
             "embed_wd": args.embed_wd, "meta_steps": args.meta_steps}
    if args.udg_wd is not None:  # only when set, so that the journals written before the option stay valid
        setup["udg_wd"] = args.udg_wd
    cache = PretrainCache(args.cache, {k: setup[k] for k in ("data", "protocol", "epochs", "embed_wd", "udg_wd")
                                       if k in setup}
                          | {"threads": args.threads}) if args.cache else None
    if options.changed():
        setup["generator"] = options.changed()
    journal = RunJournal(journal_path, setup)
    split_info = None
    if args.summary_only:
        rows = run_grid(None, kinds, arms, args.seeds, train_config, args.meta_steps, warm, journal,
                        train_missing=False)
    else:
        try:
            split = build_split(load_data(spec), protocol)
        except ValueError as error:
            raise SystemExit(str(error)) from None
        split_info = split.info
        log.info("cold-start protocol: %s", split.info)
        rows = run_grid(split, kinds, arms, args.seeds, train_config, args.meta_steps, warm, journal,
                        options=options, cache=cache)
        journal.refresh()
        mine = {(r["model"], r["variant"], r["seed"]) for r in rows}
        rows += [journal.get(k, a, s) for s in range(args.seeds) for k in kinds for a in arms
                 if (k, a, s) not in mine and journal.get(k, a, s) is not None]
    rows = [r for r in rows if r is not None]
    if not rows:
        raise SystemExit(f"no finished runs for these models and arms in {journal_path}")
    summary = summarise(rows)
    title = f"{spec.name}: new users, K = {protocol.k}, band {protocol.band[0]}-{protocol.band[1]}, T = " \
            f"{protocol.active_min}"
    updated = "the model and the new users' UDG embeddings" if warm.update == "model" else \
        "the new users' UDG embeddings only"
    if warm.rule == "minibatch-adam":
        how = f"{warm.epochs} pass(es) per batch, minibatches of {warm.batch_size}, updating {updated}"
        if warm.base_user:
            how += " and each new user's own base user-id row (from the OOV row)"
    else:
        rule = event_rule(warm, train_config)
        step = (f"step chosen per arm and seed from {', '.join(f'{x:g}' for x in warm.lr_grid)} on a validation "
                f"cut of {warm.valid_frac:.0%} of the new users, the tables on the others" if warm.lr_grid
                else f"step {rule.lr:g}")
        how = (f"the online worker's rule ({rule.name}, {step}): each user's events in time order, one "
               f"step each, updating {updated}")
    head = [f"### {title}", "",
            f"Warm-up: {how}; pre-training {args.epochs} epochs at most, meta generator {args.meta_steps} steps.", ""]
    if split_info:
        head += ["Users and events: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in split_info.items()), ""]
    head += validation_lines(rows)
    text = "\n".join(head) + report_tables(rows, summary)
    (out / "report.md").write_text(text + "\n")
    plot(summary, out / "coldstart.png", title)
    print(text)
    print(f"\nwritten: {out / 'report.md'}, {out / 'coldstart.png'}")
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from model.commands import add_data_arguments, add_threads_argument

    add_data_arguments(parser)
    group = parser.add_argument_group("protocol (defaults per data set: model/coldstart.py PROTOCOLS)")
    group.add_argument("--k", type=int, default=None, help="events per warm-up batch (a, b, c)")
    group.add_argument("--band", default=None, metavar="LO,HI", help="new users' event counts, inclusive")
    group.add_argument("--active-min", type=int, default=None, metavar="T",
                       help="pre-training users have at least T events")
    group.add_argument("--new-user-frac", type=float, default=None,
                       help="share of users held out of training (split.cold_user_frac); the band of them "
                            "are the new users")
    parser.add_argument("--models", default="pnn", help="comma-separated model kinds (each with its UDG preset)")
    parser.add_argument("--arms", default=",".join(DEFAULT_ARMS),
                        help="meta (Eq. 11 generator), residual (mean row + residual generator), random (w/o Meta), "
                             "mean (known users), mwuf (mean row, MWUF's scale/shift networks; model/mwuf.py)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--embed-wd", type=float, default=3e-3)
    parser.add_argument("--udg-wd", type=float, default=None,
                        help="weight decay of the UDG user table in pre-training and warm-up (default: --embed-wd)")
    parser.add_argument("--meta-steps", type=int, default=1500)
    parser.add_argument("--warm-batch-size", type=int, default=64)
    parser.add_argument("--warm-epochs", type=int, default=1)
    parser.add_argument("--warm-update", choices=["model", "embeddings"], default="model",
                        help="model: the model and the new users' UDG embeddings (the paper); embeddings: "
                             "those only")
    parser.add_argument("--warm-rule", choices=WARM_RULES, default="minibatch-adam",
                        help="minibatch-adam: the passes of --warm-batch-size (the paper); event-sgd / event-adam: "
                             "the online worker's rule (`udg warmup --rule`), one step per event in time order")
    parser.add_argument("--warm-base-user", action="store_true",
                        help="give each new user a base user-id row of their own (from the OOV row they are served "
                             "with) and warm it with the UDG row (minibatch-adam only)")
    parser.add_argument("--warm-lr", type=float, default=None,
                        help="step of the event rules (default: the generator's α for sgd, the pre-training lr "
                             "for adam, as `udg warmup`)")
    parser.add_argument("--warm-lr-grid", default=None, metavar="STEP,...",
                        help="the event rule's steps to choose from, each arm's on a validation cut of the new users "
                             "(--warm-valid-frac); the others are the test users of the tables")
    parser.add_argument("--warm-valid-frac", type=float, default=WarmConfig.valid_frac,
                        help="with --warm-lr-grid: share of the new users (a fixed draw) that choose the step")
    group = parser.add_argument_group("generators (Algorithm 1)")
    group.add_argument("--meta-alpha", type=float, default=GeneratorOptions.alpha, help="inner step α")
    group.add_argument("--meta-gamma", type=float, default=GeneratorOptions.gamma,
                       help="γ: L_meta = γ L_A + (1 − γ) L_B")
    group.add_argument("--phase-a-history", action="store_true",
                       help="phase A sees the user's real behavior (default: none, as the paper)")
    group.add_argument("--meta-grid", default=None, metavar="ALPHA:GAMMA:HISTORY,...",
                       help="meta arm: Algorithm 1 settings (inner step α, γ, phase-A history 0/1) to choose from on "
                            "the held-out active users (--meta-valid-frac); the chosen one is kept as fit")
    group.add_argument("--shrink-grid", default=",".join(str(x) for x in GeneratorOptions.shrink_grid),
                       help="residual arm: shrinkage weights tried, the one chosen on held-out active users")
    group.add_argument("--residual-steps", type=int, default=GeneratorOptions.residual_steps,
                       help="residual arm: Algorithm 1 steps of each fit (the fit on the other users is kept)")
    group.add_argument("--meta-valid-frac", type=float, default=GeneratorOptions.valid_frac,
                       help="residual arm (and meta arm with --meta-grid): share of the active users held out "
                            "to choose the setting")
    add_threads_argument(parser)
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="keep each seed's pre-trained model and generators in DIR, so further arms or warm-up "
                             "settings on the same seeds skip pre-training (same results)")
    parser.add_argument("--out", default="results/coldstart")
    parser.add_argument("--fresh", action="store_true", help="discard the journal of --out")
    parser.add_argument("--summary-only", action="store_true",
                        help="train nothing: tables and plot from the journal's finished runs")
