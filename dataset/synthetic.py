"""The synthetic world: users with planted, user-dependent preferences, written as a Parquet click log.

    click logit = decisiveness_u * (taste_u . z_item + quality_item + w * sim(z_item, mean z of past clicks)
                                    - 0.2)

`taste_u` mixes a profile-group component (what a cold-start generator can learn from the profile fields
`cohort`, `sex`, `segment`) with a personal one. `decisiveness_u` (log-normal; personal unless
`decisiveness_profile_link` ties it to the segment) is how strictly a user follows the shared preference
function: some click almost at random, others almost deterministically. It scales every feature's effect,
including the nonlinear history term, per user: a multiplicative user-dependence that UDG's gates express
directly (they scale the MLP's inputs per user) and that an MLP fed the user embedding as one more input has
to approximate. The planted log-decisiveness is a column of the user table (`udg gates` compares against it).
Generation is vectorised over users, one time step at a time, so millions of users are feasible.
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class SyntheticParams:
    """Sizes and strength of the planted structure (the built-in spec's `generator.params`)."""

    users: int = 1000
    items: int = 500
    categories: int = 12
    events_per_user: int = 100  # 1,000 x 100: as many events as MovieLens-100K
    latent_dim: int = 8
    cohorts: int = 5
    segments: int = 8
    personal_weight: float = 1.5  # share of a user's taste not predictable from the profile
    history_weight: float = 2.5  # pull towards items like the user's past clicks
    decisiveness_spread: float = 1.2  # std of log decisiveness across users (0: everyone alike)
    decisiveness_profile_link: float = 0.0  # correlation of log decisiveness with the segment (0: personal)
    seed: int = 0


def item_world(rng: np.random.Generator, items: int, categories: int, dim: int):
    """(category, unit latent vector z, quality) per item: items of a category cluster around its centre."""
    centers = rng.normal(size=(categories, dim))
    item_category = rng.integers(0, categories, size=items)
    z = centers[item_category] + 0.5 * rng.normal(size=(items, dim))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    return item_category, z, 0.5 * rng.normal(size=items)


def generate(params: SyntheticParams) -> dict[str, dict[str, np.ndarray]]:
    """-> {"events": columns, "users": columns, "items": columns} (numpy arrays)."""
    spec = params
    rng = np.random.default_rng(spec.seed)
    n_u, n_i, dim = spec.users, spec.items, spec.latent_dim
    item_category, z, quality = item_world(rng, n_i, spec.categories, dim)

    cohort = rng.integers(0, spec.cohorts, size=n_u)
    sex = rng.integers(0, 2, size=n_u)
    segment = rng.integers(0, spec.segments, size=n_u)
    cohort_vec = rng.normal(size=(spec.cohorts, dim))
    sex_vec = rng.normal(size=(2, dim))
    segment_vec = rng.normal(size=(spec.segments, dim))
    taste = cohort_vec[cohort] + sex_vec[sex] + segment_vec[segment]
    taste += spec.personal_weight * rng.normal(size=(n_u, dim))
    taste *= 1.5 / np.sqrt(dim)
    link = spec.decisiveness_profile_link
    segment_decisiveness = rng.normal(size=spec.segments)
    log_decisiveness = link * segment_decisiveness[segment] + np.sqrt(1 - link ** 2) * rng.normal(size=n_u)
    decisiveness = np.exp(spec.decisiveness_spread * log_decisiveness)

    steps = spec.events_per_user
    items = rng.integers(0, n_i, size=(n_u, steps))
    clicks = np.zeros((n_u, steps), dtype=np.int8)
    clicked_sum = np.zeros((n_u, dim))
    clicked_count = np.zeros(n_u)
    for t in range(steps):
        z_t = z[items[:, t]]
        mean_hist = clicked_sum / np.maximum(clicked_count, 1)[:, None]
        similarity = np.einsum("ud,ud->u", z_t, mean_hist) * (clicked_count > 0)
        preference = np.einsum("ud,ud->u", taste, z_t) + quality[items[:, t]] + spec.history_weight * similarity
        logit = decisiveness * (preference - 0.2)
        clicked = rng.random(n_u) < 1.0 / (1.0 + np.exp(-logit))
        clicks[:, t] = clicked
        clicked_sum[clicked] += z_t[clicked]
        clicked_count += clicked

    user_ids = np.char.add("u", np.arange(n_u).astype(str))
    item_ids = np.char.add("i", np.arange(n_i).astype(str))
    start = rng.integers(0, 10_000, size=n_u)
    timestamps = (start[:, None] + np.arange(steps)[None, :] * 60).astype(np.int64)
    return {
        "events": {"user_id": np.repeat(user_ids, steps), "item_id": item_ids[items.reshape(-1)],
                   "timestamp": timestamps.reshape(-1), "click": clicks.reshape(-1)},
        "users": {"user_id": user_ids, "cohort": np.char.add("a", cohort.astype(str)),
                  "sex": np.array(list("MF"))[sex], "segment": np.char.add("o", segment.astype(str)),
                  "log_decisiveness": spec.decisiveness_spread * log_decisiveness},
        "items": {"item_id": item_ids, "category": np.char.add("c", item_category.astype(str))},
    }


def tmp_beside(target: Path) -> Path:
    """A temporary name beside `target`, of this process and thread: writers that make the same seeded source at
    once (every DDP rank prepares the log) must not rename each other's half-written file."""
    return target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.tmp")


def write_parquet(tables: dict[str, dict[str, np.ndarray]], folder: Path) -> Path:
    """Each table as `<name>.parquet` in `folder`, written beside and renamed into place (never half-written)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, columns in tables.items():
        tmp = tmp_beside(folder / f"{name}.parquet")
        pq.write_table(pa.table({k: pa.array(v) for k, v in columns.items()}), tmp)
        tmp.replace(folder / f"{name}.parquet")
    return folder


def materialise(params: dict, folder: Path) -> Path:
    """Generate the world of `params` into `folder` unless it is there already (generation is seeded)."""
    folder = Path(folder)
    if all((folder / f"{name}.parquet").exists() for name in ("events", "users", "items")):
        return folder
    return write_parquet(generate(SyntheticParams(**params)), folder)


def defaults() -> dict:
    return asdict(SyntheticParams())


@dataclass
class LogParams:
    """A large synthetic click log for benchmarks: the same planted model as `generate`, streamed to disk.

    Unlike `generate` (one array per column, grouped by user), the log is written the way a real one
    arrives: in time order, users interleaved, split over `files` Parquet files of row groups of at most
    `row_group` rows, items drawn with Zipf-like popularity (`popularity_exponent`). Memory stays at the
    per-user state (a few hundred bytes a user) plus one file's rows."""

    users: int = 100_000
    events_per_user: int = 100
    items: int = 50_000
    categories: int = 50
    latent_dim: int = 8
    cohorts: int = 5
    segments: int = 8
    personal_weight: float = 1.5
    history_weight: float = 2.5
    decisiveness_spread: float = 1.2
    popularity_exponent: float = 0.9
    files: int = 4
    row_group: int = 1_000_000
    seed: int = 0


def write_log(params: LogParams, folder: Path) -> Path:
    """`events-NNN.parquet`, `users.parquet` and `items.parquet` in `folder` (each written beside and renamed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = params
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(p.seed)
    n_u, n_i, dim = p.users, p.items, p.latent_dim
    item_category, z, quality = item_world(rng, n_i, p.categories, dim)
    popularity = 1.0 / np.arange(1, n_i + 1) ** p.popularity_exponent
    popularity_cdf = np.cumsum(rng.permutation(popularity))
    popularity_cdf /= popularity_cdf[-1]

    cohort = rng.integers(0, p.cohorts, size=n_u)
    sex = rng.integers(0, 2, size=n_u)
    segment = rng.integers(0, p.segments, size=n_u)
    taste = rng.normal(size=(p.cohorts, dim))[cohort] + rng.normal(size=(2, dim))[sex] + \
        rng.normal(size=(p.segments, dim))[segment]
    taste += p.personal_weight * rng.normal(size=(n_u, dim))
    taste *= 1.5 / np.sqrt(dim)
    log_decisiveness = p.decisiveness_spread * rng.normal(size=n_u)
    decisiveness = np.exp(log_decisiveness)
    start = rng.integers(1_700_000_000, 1_700_000_000 + 30 * 86_400, size=n_u)
    gap = rng.integers(30, 3_600, size=n_u)

    user_ids = pa.array(np.char.add("u", np.arange(n_u).astype(str)))
    item_ids = pa.array(np.char.add("i", np.arange(n_i).astype(str)))
    schema = pa.schema([("user_id", pa.string()), ("item_id", pa.string()), ("timestamp", pa.int64()),
                        ("click", pa.int8())])
    clicked_sum = np.zeros((n_u, dim))
    clicked_count = np.zeros(n_u)
    steps = p.events_per_user
    bounds = np.linspace(0, steps, max(1, min(p.files, steps)) + 1).round().astype(int)
    for number, (first, last) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        parts = []
        for t in range(first, last):
            item = np.minimum(np.searchsorted(popularity_cdf, rng.random(n_u)), n_i - 1)
            z_t = z[item]
            mean_hist = clicked_sum / np.maximum(clicked_count, 1)[:, None]
            similarity = np.einsum("ud,ud->u", z_t, mean_hist) * (clicked_count > 0)
            preference = np.einsum("ud,ud->u", taste, z_t) + quality[item] + p.history_weight * similarity
            with np.errstate(over="ignore"):  # exp overflows to inf for decisive users: probability 0
                clicked = rng.random(n_u) < 1.0 / (1.0 + np.exp(-decisiveness * (preference - 0.2)))
            clicked_sum[clicked] += z_t[clicked]
            clicked_count += clicked
            parts.append((item, start + t * gap, clicked.astype(np.int8)))
        item = np.concatenate([a for a, _, _ in parts])
        stamp = np.concatenate([b for _, b, _ in parts])
        click = np.concatenate([c for _, _, c in parts])
        user = np.tile(np.arange(n_u), len(parts))
        by_time = np.argsort(stamp, kind="stable")
        table = pa.table([user_ids.take(pa.array(user[by_time])), item_ids.take(pa.array(item[by_time])),
                          pa.array(stamp[by_time]), pa.array(click[by_time])], schema=schema)
        tmp = tmp_beside(folder / f"events-{number:03d}.parquet")
        pq.write_table(table, tmp, row_group_size=p.row_group)
        tmp.replace(folder / f"events-{number:03d}.parquet")
        del parts, item, stamp, click, user, by_time, table
    tables = {"users": {"user_id": user_ids, "cohort": pa.array(np.char.add("a", cohort.astype(str))),
                        "sex": pa.array(np.array(list("MF"))[sex]),
                        "segment": pa.array(np.char.add("o", segment.astype(str))),
                        "log_decisiveness": pa.array(log_decisiveness)},
              "items": {"item_id": item_ids, "category": pa.array(np.char.add("c", item_category.astype(str)))}}
    for name, columns in tables.items():
        tmp = tmp_beside(folder / f"{name}.parquet")
        pq.write_table(pa.table(columns), tmp)
        tmp.replace(folder / f"{name}.parquet")
    return folder
