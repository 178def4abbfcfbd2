"""The dataset spec: one declared schema from a click log to a served request.

A spec is a TOML (or YAML) file validated by pydantic; `docs/dataset-spec.schema.json` is its JSON Schema
(`udg data schema` writes it). It declares:

- `events`: the log (a path or glob of Parquet, CSV or JSON Lines files), its user, item and timestamp
  columns, and the label: a 0/1 click column (impressions with negatives) or a rating above a threshold;
- `users` / `items`: optional tables joined by id that carry the fields (or the fields are event columns);
- `user_fields` (the profile) and `item_fields`: any number; categorical, numeric with bucket edges, or
  multi-valued (a list column or a separated string);
- `behavior`: which events count as clicks, the cap, and the strictly-before rule;
- `split`: per-user time split or global time cut-offs, and the share of users held out as cold users;
- `vocabulary`: min count, max size, and the hash buckets that ids beyond the vocabulary fall into.

Relative paths resolve against the spec file's folder; `{cache}` expands to the data cache
(`UDG_CACHE_DIR`). Built-in specs (`--spec movielens-100k`, `--spec synthetic`) live in `dataset/specs/`;
a spec with a `generator` is produced by that generator (into the cache) before it is read.

Nothing here imports torch or pyarrow: the serving install validates requests against the same schema.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

BUILTIN_DIR = Path(__file__).with_name("specs")
FIELD_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"


class SpecError(ValueError):
    """A dataset spec is missing or invalid; the message names the file and the key."""


def cache_dir() -> Path:
    """Where fetched and generated data lives; `UDG_CACHE_DIR` moves it (default: ~/.cache/udg)."""
    return Path(os.environ.get("UDG_CACHE_DIR", Path.home() / ".cache" / "udg")).expanduser()


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VocabularyPolicy(Strict):
    """Which raw values get their own embedding row. Index 0 is padding and 1 out-of-vocabulary.

    Values seen fewer than `min_count` times, or beyond the `max_size` most frequent, do not get a row of
    their own: with `hash_buckets` > 0 they (and values never seen in training) share one of that many
    hashed rows; with 0 they all share the out-of-vocabulary row.
    """

    min_count: Annotated[int, Field(ge=1)] = 1
    max_size: Annotated[int, Field(ge=1)] | None = None
    hash_buckets: Annotated[int, Field(ge=0)] = 0


class Table(Strict):
    """A set of files of one format: `path` is a file or a glob (`logs/*.parquet`)."""

    path: str
    format: Literal["parquet", "csv", "jsonl"] | None = None  # default: from the file extension
    delimiter: str = ","  # CSV only ("\t" for tab-separated)

    def file_format(self) -> str:
        if self.format:
            return self.format
        suffix = self.path.rsplit(".", 1)[-1].lower() if "." in self.path else ""
        by_suffix = {"parquet": "parquet", "pq": "parquet", "csv": "csv", "tsv": "csv", "jsonl": "jsonl",
                     "ndjson": "jsonl", "json": "jsonl"}
        if suffix not in by_suffix:
            raise SpecError(f"{self.path}: cannot tell the format from the extension; set format = "
                            "\"parquet\", \"csv\" or \"jsonl\"")
        return by_suffix[suffix]


class Label(Strict):
    """Exactly one of: `click` (a 0/1 column) or `rating` with `threshold` (label = rating > threshold)."""

    click: str | None = None
    rating: str | None = None
    threshold: float | None = None

    @model_validator(mode="after")
    def _one_rule(self) -> Label:
        if (self.click is None) == (self.rating is None):
            raise ValueError("set either `click` (a 0/1 column) or `rating` with `threshold`")
        if self.rating is not None and self.threshold is None:
            raise ValueError("`rating` needs a `threshold` (label = rating > threshold)")
        return self

    def columns(self) -> list[str]:
        return [self.click] if self.click is not None else [self.rating]


class Events(Table):
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    # For string timestamps: a strptime format, or "iso" for ISO 8601. Numbers are seconds since the epoch.
    timestamp_format: str | None = None
    label: Label
    # Rows with the same (user, item, timestamp): "error" stops with the first one named; "drop" keeps the
    # first of each group (a logged impression re-sent); "keep" keeps them all as separate events.
    duplicates: Literal["error", "drop", "keep"] = "error"


class KeyedTable(Table):
    id: str  # the column joined with the events' user (or item) column


class FieldSpec(Strict):
    """One user (profile) or item feature field. Every value becomes a token with its own embedding row.

    - categorical: the value as a string;
    - numeric: bucketed by `buckets` (ascending edges, lower edge inclusive); bucket i is labelled
      `labels[i]` (default "<e0", "[e0,e1)", …, ">=en"); a missing value is out-of-vocabulary;
    - multi: several values (a list column, or a string split on `separator`), pooled by their mean;
      `empty` names the token of an empty list (default: none, i.e. a zero vector).
    """

    name: Annotated[str, Field(pattern=FIELD_NAME)]
    column: str | None = None  # default: `name`
    source: Literal["users", "items", "events"] | None = None  # default: the side's table if declared
    kind: Literal["categorical", "numeric", "multi"] = "categorical"
    buckets: list[float] | None = None
    labels: list[str] | None = None
    separator: str | None = None
    empty: str | None = None
    vocabulary: VocabularyPolicy | None = None  # default: the spec's `vocabulary`

    @model_validator(mode="after")
    def _consistent(self) -> FieldSpec:
        if self.kind == "numeric":
            if not self.buckets:
                raise ValueError(f"field {self.name!r}: a numeric field needs `buckets` (ascending edges)")
            if any(b <= a for a, b in zip(self.buckets, self.buckets[1:], strict=False)):
                raise ValueError(f"field {self.name!r}: `buckets` must be strictly ascending")
            if self.labels is not None and len(self.labels) != len(self.buckets) + 1:
                raise ValueError(f"field {self.name!r}: {len(self.buckets)} bucket edges need "
                                 f"{len(self.buckets) + 1} labels, not {len(self.labels)}")
        else:
            if self.buckets is not None or self.labels is not None:
                raise ValueError(f"field {self.name!r}: `buckets`/`labels` apply to numeric fields only")
        if self.kind != "multi" and (self.separator is not None or self.empty is not None):
            raise ValueError(f"field {self.name!r}: `separator`/`empty` apply to multi-valued fields only")
        return self

    @property
    def source_column(self) -> str:
        return self.column or self.name

    def bucket_labels(self) -> list[str]:
        """The token of each numeric bucket, below the first edge to at or above the last."""
        if self.labels is not None:
            return list(self.labels)
        edges = [_number(e) for e in self.buckets or []]
        if not edges:
            return []
        inner = [f"[{a},{b})" for a, b in zip(edges, edges[1:], strict=False)]
        return [f"<{edges[0]}", *inner, f">={edges[-1]}"]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class ClickRule(Strict):
    """Events that count as clicks for the behavior feature: those whose `column` holds one of `values`."""

    column: str
    values: list[str | int | float | bool]


class Behavior(Strict):
    """The behavior feature: each event sees the items its user clicked strictly before it, most recent
    first, at most `max_length` of them. Clicks with the same timestamp never see each other."""

    clicks: Literal["label"] | ClickRule = "label"  # default: the events labelled positive
    max_length: Annotated[int, Field(ge=1, le=1000)] = 50
    strictly_before: Literal[True] = True


class Split(Strict):
    """per_user_time: the last `test_frac` of each user's events are test, the `valid_frac` before them
    validation. global_time: events at or after `valid_from` are validation, at or after `test_from` test.
    `cold_user_frac` of users are held out entirely (the `cold` split, for the meta generator)."""

    kind: Literal["per_user_time", "global_time"] = "per_user_time"
    valid_frac: Annotated[float, Field(ge=0, lt=1)] = 0.1
    test_frac: Annotated[float, Field(ge=0, lt=1)] = 0.1
    valid_from: int | float | str | None = None
    test_from: int | float | str | None = None
    cold_user_frac: Annotated[float, Field(ge=0, lt=1)] = 0.0
    seed: int = 0

    @model_validator(mode="after")
    def _cutoffs(self) -> Split:
        if self.kind == "global_time" and (self.valid_from is None or self.test_from is None):
            raise ValueError("a global_time split needs `valid_from` and `test_from` (timestamps)")
        if self.kind == "per_user_time" and self.valid_frac + self.test_frac >= 1:
            raise ValueError("valid_frac + test_frac must be below 1")
        return self


# Generators whose parameters have defaults: a spec records them all, so that a result keeps describing
# its world even after a default changes.
GENERATOR_DEFAULTS = {"synthetic": "dataset.synthetic", "shop": "dataset.shop"}


class Generator(Strict):
    """A built-in source the files come from: `movielens-100k` (fetched and verified) or a synthetic world
    (`synthetic`, `shop`) generated with `params`, both into the cache; `{source}` in paths is its folder."""

    kind: Literal["movielens-100k", "synthetic", "shop"]
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _complete(self) -> Generator:
        module_name = GENERATOR_DEFAULTS.get(self.kind)
        if module_name is None:
            return self
        import importlib

        try:
            defaults = importlib.import_module(module_name).defaults()
        except ModuleNotFoundError:  # pragma: no cover - a generator missing from this install
            return self
        unknown = sorted(set(self.params) - set(defaults))
        if unknown:
            raise ValueError(f"unknown {self.kind} generator parameter(s) {unknown}; known: {sorted(defaults)}")
        self.params = {**defaults, **self.params}
        return self


class DatasetSpec(Strict):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    events: Events
    users: KeyedTable | None = None
    items: KeyedTable | None = None
    user_fields: list[FieldSpec] = Field(default_factory=list)
    item_fields: list[FieldSpec] = Field(default_factory=list)
    behavior: Behavior = Field(default_factory=Behavior)
    split: Split = Field(default_factory=Split)
    vocabulary: VocabularyPolicy = Field(default_factory=VocabularyPolicy)
    generator: Generator | None = None
    # Where relative paths resolve (the spec file's folder); set by `load_spec`, not written by users.
    base_dir: str | None = None

    @field_validator("user_fields", "item_fields")
    @classmethod
    def _unique_names(cls, fields: list[FieldSpec]) -> list[FieldSpec]:
        seen: set[str] = set()
        for spec in fields:
            if spec.name in seen:
                raise ValueError(f"field {spec.name!r} is declared twice")
            seen.add(spec.name)
        return fields

    @model_validator(mode="after")
    def _sources(self) -> DatasetSpec:
        for side, table, fields in (("users", self.users, self.user_fields), ("items", self.items, self.item_fields)):
            for spec in fields:
                if spec.source is None:
                    spec.source = side if table is not None else "events"
                if spec.source not in (side, "events"):
                    raise ValueError(f"field {spec.name!r}: source {spec.source!r} (expected {side!r} or 'events')")
                if spec.source == side and table is None:
                    raise ValueError(f"field {spec.name!r} reads the {side} table, but no [{side}] table is declared")
        names = [f.name for f in self.user_fields]
        clash = set(names) & {f.name for f in self.item_fields}
        if clash:
            raise ValueError(f"fields {sorted(clash)} are declared both as user and as item fields")
        return self

    # --- derived ------------------------------------------------------------------------------------------
    def resolve(self, path: str) -> str:
        """A declared path with `{cache}` and `{source}` expanded, relative to the spec's folder."""
        expanded = path.replace("{cache}", str(cache_dir())).replace("{source}", str(self.source_dir()))
        if not os.path.isabs(expanded) and self.base_dir:
            expanded = os.path.join(self.base_dir, expanded)
        return expanded

    def source_dir(self) -> Path:
        """The cache folder of a generated or fetched source (one per generator kind and parameters)."""
        if self.generator is None:
            return Path(self.base_dir or ".")
        params = json.dumps(self.generator.params, sort_keys=True, default=str)
        digest = hashlib.sha256(params.encode()).hexdigest()[:12]
        return cache_dir() / "sources" / f"{self.generator.kind}-{digest}"

    def fingerprint(self) -> dict:
        """The spec as JSON without where it was read from: what a checkpoint and a journal record."""
        return self.model_dump(mode="json", exclude={"base_dir"})

    def with_overrides(self, **changes: Any) -> DatasetSpec:
        """A copy with dotted keys replaced (`split.cold_user_frac=0.1`, `behavior.max_length=20`)."""
        data = self.model_dump(mode="json")
        for dotted, value in changes.items():
            node = data
            *parents, leaf = dotted.split(".")
            for key in parents:
                if node.get(key) is None:
                    node[key] = {}
                node = node[key]
            node[leaf] = value
        return validate_spec(data, origin="overrides")


def validate_spec(data: dict, origin: str = "<spec>") -> DatasetSpec:
    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise SpecError(f"{origin}: {where}: {first['msg']}"
                        + (f" ({len(error.errors()) - 1} more)" if len(error.errors()) > 1 else "")) from None


def builtin_specs() -> dict[str, Path]:
    return {path.stem: path for path in sorted(BUILTIN_DIR.glob("*.toml"))}


def load_spec(name_or_path: str | os.PathLike) -> DatasetSpec:
    """A built-in spec by name (`movielens-100k`, `synthetic`, `shop`) or a TOML/YAML file."""
    text = str(name_or_path)
    builtins = builtin_specs()
    path = builtins.get(text, Path(text))
    if not path.is_file():
        raise SpecError(f"{text}: no such spec file (built-in specs: {', '.join(builtins)})")
    raw = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(raw)
        else:
            data = tomllib.loads(raw)
    except Exception as error:  # tomllib / yaml raise their own types
        raise SpecError(f"{path}: not valid {'YAML' if path.suffix in ('.yaml', '.yml') else 'TOML'} ({error})") \
            from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a table of keys at the top level")
    data.setdefault("base_dir", str(path.resolve().parent))
    return validate_spec(data, origin=str(path))


def json_schema() -> dict:
    schema = DatasetSpec.model_json_schema()
    schema["properties"].pop("base_dir", None)
    schema["title"] = "UDG dataset spec"
    return schema
