"""The feature schema: every field's vocabulary and encoding, learned from the training split.

It is what a checkpoint, a model version's manifest and the service share: models size their tables from
it, export writes it into the manifest, and the service encodes requests with it (numpy only: no torch, no
pyarrow). Index conventions, for every vocabulary: 0 = padding, 1 = out-of-vocabulary, then the tokens in
sorted order, then the hash buckets (if the vocabulary policy declares any).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

PAD, OOV = 0, 1
SCHEMA_FORMAT = "udg-features/1"


class UnknownField(ValueError):
    """A profile (or item) names a field the schema does not have."""

    def __init__(self, name: str, expected: list[str], side: str = "profile"):
        super().__init__(f"unknown {side} field {name!r}; expected some of {expected}")
        self.name, self.expected, self.side = name, expected, side


def stable_hash(token: str) -> int:
    """A 64-bit hash that is the same in every process and every run (Python's `hash` is salted)."""
    return int.from_bytes(hashlib.blake2b(token.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class Vocab:
    """Raw token -> dense index. Tokens beyond the vocabulary go to a hash bucket, or to OOV without any."""

    def __init__(self, tokens, hash_buckets: int = 0):
        # str(): numpy string scalars would not survive torch.load(weights_only=True) of a checkpoint
        self.tokens = ["<pad>", "<oov>", *sorted({str(t) for t in tokens})]
        # the reserved rows are not tokens: a raw value spelled "<pad>" is unknown, never padding
        self.index = {token: i for i, token in enumerate(self.tokens) if i > OOV}
        self.hash_buckets = int(hash_buckets)

    def __len__(self) -> int:
        return len(self.tokens) + self.hash_buckets

    @property
    def known_size(self) -> int:
        """Rows of explicit tokens, padding and OOV included (hash buckets follow them)."""
        return len(self.tokens)

    def _fallback(self, token: str) -> int:
        if self.hash_buckets:
            return len(self.tokens) + stable_hash(token) % self.hash_buckets
        return OOV

    def lookup(self, token: str) -> int:
        index = self.index.get(token)
        return self._fallback(token) if index is None else index

    def lookup_many(self, tokens) -> np.ndarray:
        """Vectorised over the distinct tokens: one dict lookup (and hash) per distinct value."""
        values = np.asarray(tokens, dtype=object) if isinstance(tokens, list) else np.asarray(tokens)
        if values.size == 0:
            return np.zeros(values.shape, np.int64)
        if values.dtype == object:  # str() per value, not a numpy str array, which drops trailing NULs ("a\0")
            values = np.array([str(t) for t in values.ravel().tolist()], dtype=object).reshape(values.shape)
        else:
            values = values.astype(str)
        distinct, inverse = np.unique(values, return_inverse=True)
        codes = np.fromiter((self.lookup(t) for t in distinct.tolist()), np.int64, count=len(distinct))
        return codes[inverse.reshape(values.shape)]

    def known(self, token: str) -> bool:
        return token in self.index and self.index[token] > OOV

    def to_json(self) -> dict:
        return {"tokens": self.tokens[2:], "hash_buckets": self.hash_buckets}

    @classmethod
    def from_json(cls, data) -> Vocab:
        if isinstance(data, list):  # a plain token list (no hash buckets)
            return cls(data)
        return cls(data["tokens"], data.get("hash_buckets", 0))

    @classmethod
    def from_counts(cls, tokens: np.ndarray, counts: np.ndarray, min_count: int = 1, max_size: int | None = None,
                    hash_buckets: int = 0) -> Vocab:
        """The vocabulary a policy keeps: tokens seen at least `min_count` times, the `max_size` most frequent
        (ties broken by token), in sorted order."""
        tokens = np.asarray(tokens)
        # str() per value for objects: a numpy str array drops trailing NULs ("a\0" would become "a")
        tokens = (np.array([str(t) for t in tokens.tolist()], dtype=object) if tokens.dtype == object
                  else tokens.astype(str))
        counts = np.asarray(counts)
        keep = counts >= min_count
        tokens, counts = tokens[keep], counts[keep]
        if max_size is not None and len(tokens) > max_size:
            order = np.lexsort((tokens, -counts))[:max_size]
            tokens = tokens[order]
        return cls(tokens.tolist(), hash_buckets)


@dataclass
class FieldSchema:
    """One user or item field: how a raw value becomes token(s), and the tokens' vocabulary.

    `width` is how many token slots a row holds: 1, or the longest list of a multi-valued field.
    """

    name: str
    kind: str  # "categorical", "numeric" or "multi"
    vocab: Vocab
    buckets: list[float] | None = None
    labels: list[str] | None = None
    separator: str | None = None
    empty: str | None = None
    width: int = 1

    def tokens(self, value) -> list[str]:
        """A raw value (as a request or a table gives it) -> the tokens it stands for ([] = missing)."""
        if value is None:
            return []
        if self.kind == "numeric":
            label = self.bucket(value)
            return [] if label is None else [label]
        if self.kind == "multi":
            if isinstance(value, list | tuple | np.ndarray):
                items = [str(v) for v in value]
            else:
                text = str(value)
                items = text.split(self.separator) if self.separator else text.split()
            items = [t for t in items if t != ""]
            if not items and self.empty is not None:
                items = [self.empty]
            return items
        text = str(value)
        return [] if text == "" else [text]

    def bucket(self, value) -> str | None:
        """The bucket label of a numeric value; a label itself is accepted as it is."""
        if isinstance(value, str):
            if self.labels and value in self.labels:
                return value
            try:
                value = float(value)
            except ValueError:
                return None
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            return None
        position = int(np.searchsorted(np.asarray(self.buckets, dtype=np.float64), float(value), side="right"))
        return self.labels[position]

    def encode(self, value, missing: int = OOV) -> np.ndarray:
        """Raw value -> int64 [width] token indices, PAD-filled; a missing value is one `missing` slot: OOV for
        a profile field (as in training), PAD for an item field (an item without the field has no row of it)."""
        out = np.full(self.width, PAD, np.int64)
        tokens = self.tokens(value)[:self.width]
        if not tokens:
            out[0] = missing
            return out
        for slot, token in enumerate(tokens):
            out[slot] = self.vocab.lookup(token)
        return out

    def known_value(self, value) -> bool:
        """Whether every token of the value has its own row (False: OOV or a hash bucket)."""
        tokens = self.tokens(value)
        return bool(tokens) and all(self.vocab.known(t) for t in tokens)

    def to_json(self) -> dict:
        data = {"name": self.name, "kind": self.kind, "width": self.width, "vocab": self.vocab.to_json()}
        for key in ("buckets", "labels", "separator", "empty"):
            if getattr(self, key) is not None:
                data[key] = getattr(self, key)
        return data

    @classmethod
    def from_json(cls, data: dict) -> FieldSchema:
        return cls(name=data["name"], kind=data["kind"], vocab=Vocab.from_json(data["vocab"]),
                   buckets=data.get("buckets"), labels=data.get("labels"), separator=data.get("separator"),
                   empty=data.get("empty"), width=int(data.get("width", 1)))


@dataclass
class FeatureSchema:
    """Users, items, their fields and the behavior cap: everything between raw ids and model inputs.

    `item_table[name]` is the item field's token indices per item row, int64 [len(items), width]: what the
    model looks up for an item id (rows PAD and OOV are empty).
    """

    users: Vocab
    items: Vocab
    user_fields: list[FieldSchema]
    item_fields: list[FieldSchema]
    max_history: int
    item_table: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def profile_fields(self) -> list[str]:
        return [f.name for f in self.user_fields]

    @property
    def item_width(self) -> int:
        """Tokens of one item row with every item field's slots concatenated (the item table's value)."""
        return sum(f.width for f in self.item_fields)

    @property
    def item_field_names(self) -> list[str]:
        return [f.name for f in self.item_fields]

    def user_field(self, name: str) -> FieldSchema:
        for spec in self.user_fields:
            if spec.name == name:
                return spec
        raise UnknownField(name, self.profile_fields)

    def check_profile(self, profile: dict | None) -> None:
        for key in profile or {}:
            if key not in self.profile_fields:
                raise UnknownField(key, self.profile_fields)

    def encode_profile(self, profile: dict | None) -> np.ndarray:
        """{field: raw value} -> int64 [len(user_fields)], one token per field (a multi-valued profile field
        keeps its first). Missing or unknown values -> OOV (or a hash bucket); an unknown field raises."""
        profile = profile or {}
        self.check_profile(profile)
        return np.array([spec.encode(profile.get(spec.name))[0] for spec in self.user_fields], np.int64)

    def unknown_profile_fields(self, profile: dict | None) -> list[str]:
        """The fields whose given value has no row of its own (what the service counts as OOV)."""
        return [name for name, value in (profile or {}).items()
                if name in self.profile_fields and not self.user_field(name).known_value(value)]

    def encode_item_fields(self, values: dict | None) -> dict[str, np.ndarray]:
        """{item field: raw value} of one item -> per field int64 [width] (a missing field: PAD, no features,
        as in the item table training used)."""
        values = values or {}
        names = self.item_field_names
        for key in values:
            if key not in names:
                raise UnknownField(key, names, side="item")
        return {spec.name: spec.encode(values.get(spec.name), missing=PAD) for spec in self.item_fields}

    def to_json(self) -> dict:
        return {
            "format": SCHEMA_FORMAT,
            "users": self.users.to_json(),
            "items": self.items.to_json(),
            "user_fields": [f.to_json() for f in self.user_fields],
            "item_fields": [f.to_json() for f in self.item_fields],
            "max_history": self.max_history,
            "item_table": {name: table.tolist() for name, table in self.item_table.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> FeatureSchema:
        item_fields = [FieldSchema.from_json(f) for f in data["item_fields"]]
        n_items = 2 + len(data["items"]["tokens"] if isinstance(data["items"], dict) else data["items"])
        tables = {}
        for spec in item_fields:
            rows = data.get("item_table", {}).get(spec.name)
            tables[spec.name] = (np.asarray(rows, dtype=np.int64).reshape(-1, spec.width) if rows is not None
                                 else np.zeros((n_items, spec.width), np.int64))
        return cls(users=Vocab.from_json(data["users"]), items=Vocab.from_json(data["items"]),
                   user_fields=[FieldSchema.from_json(f) for f in data["user_fields"]], item_fields=item_fields,
                   max_history=int(data["max_history"]), item_table=tables)
