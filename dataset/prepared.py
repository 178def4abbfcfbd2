"""What ingestion hands training: per split, model-ready event columns whose wide parts are gathered per batch.

No column holds a Python object per event. The two wide inputs are never materialised for a whole split:
- the behavior history of an event is `max_history` item indices, but it is a window of the user's click
  sequence: `HistoryIndex` keeps that sequence once (all users' clicks, by user then time) plus, per event,
  where its window ends and how long it is, and gathers `[batch, max_history]` on demand;
- the profile of an event is its user's profile: one row per user, gathered by the event's user number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dataset.schema import PAD, FeatureSchema
from dataset.spec import DatasetSpec

SPLITS = ("train", "valid", "test", "cold")


@dataclass
class HistoryIndex:
    """Per event, the items its user clicked strictly before it, most recent first, at most `width`.

    `clicks` holds every click's item index, grouped by user and in time order; an event's history is
    `clicks[end - 1], clicks[end - 2], …, clicks[end - length]` (PAD beyond `length`).
    """

    clicks: np.ndarray  # int64 [C]
    end: np.ndarray  # int64 [n]
    length: np.ndarray  # int64 [n], <= width
    width: int

    def __len__(self) -> int:
        return len(self.end)

    def gather(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        end = self.end if rows is None else self.end[rows]
        length = self.length if rows is None else self.length[rows]
        steps = np.arange(self.width, dtype=np.int64)
        position = end[:, None] - 1 - steps[None, :]
        inside = steps[None, :] < length[:, None]
        if not len(self.clicks):
            return np.full((len(end), self.width), PAD, np.int64)
        return np.where(inside, self.clicks[np.clip(position, 0, None)], PAD).astype(np.int64, copy=False)

    def take(self, rows: np.ndarray) -> HistoryIndex:
        return HistoryIndex(self.clicks, self.end[rows], self.length[rows], self.width)


@dataclass
class Samples:
    """Model-ready events of one split, in (user, time) order; ids are int64 vocabulary indices.

    `user_key` is the event's user number (over all users, cold ones included, in sorted raw-id order): it
    groups events by user and indexes `PreparedData.user_ids`.
    """

    user: np.ndarray  # int64 [n]
    item: np.ndarray  # int64 [n]
    label: np.ndarray  # float32 [n]
    user_key: np.ndarray  # int64 [n]
    profiles: np.ndarray  # int64 [users, len(user_fields)]: per user number, shared by every split
    histories: HistoryIndex

    def __len__(self) -> int:
        return len(self.label)

    @property
    def profile(self) -> np.ndarray:
        """[n, len(user_fields)], materialised (use `batch` for large splits)."""
        return self.profiles[self.user_key]

    @property
    def history(self) -> np.ndarray:
        """[n, max_history], materialised (use `batch` for large splits)."""
        return self.histories.gather()

    def batch(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The model inputs of the given rows: user, profile, item, history, label."""
        return {"user": self.user[rows], "profile": self.profiles[self.user_key[rows]], "item": self.item[rows],
                "history": self.histories.gather(rows), "label": self.label[rows]}

    def subset(self, rows: np.ndarray) -> Samples:
        """The events at `rows` (an index array or a boolean mask)."""
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        return Samples(self.user[rows], self.item[rows], self.label[rows], self.user_key[rows], self.profiles,
                       self.histories.take(rows))


@dataclass
class KnownUsers:
    """Per user of the user vocabulary: what `udg publish` loads into the feature store (raw values).

    `history` is the user's latest behavior after every event of the log (most recent first, `""` padding),
    `profile` the raw token of each user field (`""` = missing).
    """

    user_ids: np.ndarray  # str [U]
    profile: np.ndarray  # str [U, len(user_fields)]
    history: np.ndarray  # str [U, max_history]
    history_len: np.ndarray  # int64 [U]

    def __len__(self) -> int:
        return len(self.user_ids)


@dataclass
class PreparedData:
    spec: DatasetSpec
    schema: FeatureSchema
    splits: dict[str, Samples]
    user_ids: np.ndarray  # str [all users]: raw id per user number (`Samples.user_key`)
    known_users: KnownUsers
    stats: dict = field(default_factory=dict)
    # Columns of the user table that no field declares (e.g. the synthetic world's planted scale), per user
    # number; NaN where a user has no row.
    user_columns: dict[str, np.ndarray] = field(default_factory=dict)
    # Items of the item table that no event shows (a catalogue's new items): their ids are out of the
    # vocabulary, their fields are known. {"item_ids": str [K], <item field>: int64 [K, width] tokens}.
    item_catalogue: dict[str, np.ndarray] = field(default_factory=dict)
