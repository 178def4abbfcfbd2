"""Features as in the paper: labels, vocabularies with an OOV row, leak-free behavior histories, time splits.

Index conventions shared by training, export and serving: 0 = padding, 1 = out-of-vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.datasets import PROFILE_FIELDS, RawDataset

PAD, OOV = 0, 1
SPLITS = ("train", "valid", "test", "cold")


class Vocab:
    """Raw string id -> dense index; 0 is padding and 1 collects every unseen id."""

    def __init__(self, tokens):
        # str(): numpy string scalars would not survive torch.load(weights_only=True) of a checkpoint
        self.tokens = ["<pad>", "<oov>", *sorted({str(t) for t in tokens})]
        self.index = {token: i for i, token in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def lookup(self, token: str) -> int:
        return self.index.get(token, OOV)

    def lookup_many(self, tokens) -> np.ndarray:
        get = self.index.get
        return np.fromiter((get(t, OOV) for t in tokens), dtype=np.int64, count=len(tokens))

    def to_json(self) -> list[str]:
        return self.tokens[2:]

    @classmethod
    def from_json(cls, tokens: list[str]) -> Vocab:
        return cls(tokens)


@dataclass
class FeatureSpace:
    """Everything needed to turn raw ids into model inputs; travels in checkpoints and artifacts."""

    users: Vocab
    items: Vocab
    genres: Vocab
    profile: dict[str, Vocab]  # one vocabulary per PROFILE_FIELDS entry
    item_genres: np.ndarray  # [len(items), max_genres] genre indices, PAD-filled; rows PAD/OOV are empty
    max_history: int

    def encode_profile(self, profile: dict[str, str] | None) -> np.ndarray:
        profile = profile or {}
        return np.array([self.profile[f].lookup(str(profile.get(f, ""))) for f in PROFILE_FIELDS], np.int64)

    def to_json(self) -> dict:
        return {
            "users": self.users.to_json(),
            "items": self.items.to_json(),
            "genres": self.genres.to_json(),
            "profile": {f: v.to_json() for f, v in self.profile.items()},
            "item_genres": self.item_genres.tolist(),
            "max_history": self.max_history,
        }

    @classmethod
    def from_json(cls, data: dict) -> FeatureSpace:
        return cls(
            users=Vocab.from_json(data["users"]),
            items=Vocab.from_json(data["items"]),
            genres=Vocab.from_json(data["genres"]),
            profile={f: Vocab.from_json(v) for f, v in data["profile"].items()},
            item_genres=np.asarray(data["item_genres"], dtype=np.int64),
            max_history=int(data["max_history"]),
        )


@dataclass
class Samples:
    """Model-ready arrays for one split; ids are int64 end to end."""

    user: np.ndarray  # [n]
    profile: np.ndarray  # [n, len(PROFILE_FIELDS)]
    item: np.ndarray  # [n]
    history: np.ndarray  # [n, max_history], most recent first, PAD-filled
    label: np.ndarray  # [n] float32
    user_key: np.ndarray  # [n] raw user id (str), for per-user grouping

    def __len__(self) -> int:
        return len(self.label)

    def subset(self, mask: np.ndarray) -> Samples:
        return Samples(*(getattr(self, f)[mask] for f in self.__dataclass_fields__))


@dataclass
class PreparedData:
    space: FeatureSpace
    splits: dict[str, Samples]
    raw: RawDataset


def time_split_positions(n: int, valid_frac: float, test_frac: float) -> np.ndarray:
    """Split label per position of a user's time-ordered events: 0 train, 1 valid, 2 test."""
    n_test = max(1, int(round(n * test_frac))) if n >= 3 else 0
    n_valid = max(1, int(round(n * valid_frac))) if n >= 3 else 0
    labels = np.zeros(n, dtype=np.int8)
    labels[n - n_test - n_valid:n - n_test] = 1
    labels[n - n_test:] = 2
    return labels


def histories_for_user(items: np.ndarray, timestamps: np.ndarray, clicked: np.ndarray, max_len: int) -> np.ndarray:
    """Per event: the items clicked strictly earlier (equal timestamps never leak), most recent first.

    Inputs must be sorted by timestamp. Returns [n, max_len] PAD-filled.
    """
    click_items = items[clicked]
    click_ts = timestamps[clicked]
    prior = np.searchsorted(click_ts, timestamps, side="left")
    out = np.full((len(items), max_len), PAD, dtype=np.int64)
    for row, count in enumerate(prior):
        recent = click_items[max(0, count - max_len):count][::-1]
        out[row, :len(recent)] = recent
    return out


def last_history(items: np.ndarray, timestamps: np.ndarray, clicked: np.ndarray, max_len: int) -> np.ndarray:
    """The behavior a user carries after all given events (what the feature store holds), most recent first."""
    order = np.argsort(timestamps, kind="stable")
    click_items = items[order][clicked[order]]
    return click_items[::-1][:max_len]


def prepare(raw: RawDataset, max_history: int = 50, valid_frac: float = 0.1, test_frac: float = 0.1,
            cold_user_frac: float = 0.0, seed: int = 0) -> PreparedData:
    """Build vocabularies from the training split and model inputs for every split.

    `cold_user_frac` holds out whole users (never seen in training; their id maps to OOV) as the `cold`
    split, to evaluate the meta-learned embedding generator.
    """
    rng = np.random.default_rng(seed)
    labels = raw.labels()
    # Sort by user, then time; stable on ties so equal timestamps keep file order.
    order = np.lexsort((raw.timestamps, raw.users))
    users, items, ts, labels = raw.users[order], raw.items[order], raw.timestamps[order], labels[order]
    boundaries = np.flatnonzero(users[1:] != users[:-1]) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(users)]])
    unique_users = users[starts]

    cold = set()
    if cold_user_frac > 0:
        n_cold = int(round(len(unique_users) * cold_user_frac))
        cold = set(rng.choice(unique_users, size=n_cold, replace=False).tolist())

    split = np.zeros(len(users), dtype=np.int8)
    for user, lo, hi in zip(unique_users, starts, ends, strict=True):
        split[lo:hi] = 3 if user in cold else time_split_positions(hi - lo, valid_frac, test_frac)

    train = split == 0
    genres = {g for gs in raw.item_genres.values() for g in gs}
    space_items = Vocab(items[train])
    space = FeatureSpace(
        users=Vocab(users[train]),
        items=space_items,
        genres=Vocab(genres),
        profile={f: Vocab(p[f] for u, p in raw.profiles.items() if u not in cold) for f in PROFILE_FIELDS},
        item_genres=np.zeros((1, 1), dtype=np.int64),
        max_history=max_history,
    )
    max_genres = max((len(gs) for gs in raw.item_genres.values()), default=1)
    table = np.full((len(space_items), max_genres), PAD, dtype=np.int64)
    for token, index in space_items.index.items():
        for j, genre in enumerate(raw.item_genres.get(token, [])):
            table[index, j] = space.genres.lookup(genre)
    space.item_genres = table

    item_idx = space.items.lookup_many(items)
    history = np.zeros((len(users), max_history), dtype=np.int64)
    clicked = labels > 0.5
    for lo, hi in zip(starts, ends, strict=True):
        history[lo:hi] = histories_for_user(item_idx[lo:hi], ts[lo:hi], clicked[lo:hi], max_history)
    profile_rows = {u: space.encode_profile(raw.profiles.get(u)) for u in unique_users.tolist()}
    everything = Samples(
        user=space.users.lookup_many(users),
        profile=np.stack([profile_rows[u] for u in users.tolist()]) if len(users) else
        np.zeros((0, len(PROFILE_FIELDS)), np.int64),
        item=item_idx,
        history=history,
        label=labels.astype(np.float32),
        user_key=users,
    )
    splits = {name: everything.subset(split == code) for code, name in enumerate(SPLITS)}
    return PreparedData(space=space, splits=splits, raw=raw)
