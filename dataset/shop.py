"""The shop: a synthetic online-shop click log (impressions with real negatives), written as Parquet.

Three tables, the layout a shop's own export would have:

- `events.parquet`: `user_id`, `item_id`, `timestamp` (seconds since the epoch, strictly increasing per
  user), `click` (0/1), sorted by time like a log;
- `users.parquet`: `user_id`, `country`, `device` (a few missing), `tier` (membership), `age_years` (raw years:
  the spec buckets it into `age_band`), and the planted `log_decisiveness`;
- `items.parquet`: `item_id`, `category`, `brand`, `price` (the spec buckets it into `price_band`), `tags`
  (a list column: 0 to `max_tags` tags). The last `new_items` items are in the catalogue but in no event
  (new items, each of a brand and category that shown items have: serving one uses its category, brand,
  price and tags, not an id embedding).

    click logit = base + tier_bias[tier] + decisiveness_u * (taste_u[category] + brand_u[brand]
                                                             + quality_item + tag_quality . tags - price_u * log price)

`taste_u` mixes a profile component (country and age band, from the raw `age_years`) with a personal one,
`brand_u` is personal, and
`decisiveness_u` (log-normal) is how strongly a user acts on their preferences: a per-user scale on the
logit, the user-dependence UDG's gates model. Impressions follow item popularity; each user sees a
geometric number of them (at least `min_events`). Generation is vectorised (no loop over users or events):
100,000 users take seconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from dataset.synthetic import tmp_beside

COUNTRIES = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "PL", "SE", "JP", "BR", "IN", "CA", "AU", "MX", "KR")
DEVICES = ("mobile", "desktop", "tablet")
TIERS = ("free", "silver", "gold", "platinum")
CATEGORIES = ("electronics", "books", "fashion", "home", "beauty", "sports", "toys", "grocery", "garden",
              "auto", "music", "pets", "office", "health", "games", "jewelry")
TABLES = ("events", "users", "items")
EPOCH = 1_700_000_000  # 2023-11-14: the log starts here


@dataclass
class ShopParams:
    """Sizes and strength of the planted structure (the built-in spec's `generator.params`; `udg data
    make-shop` takes each as an option). The defaults make a log that prepares in a fraction of a second."""

    users: int = 2000
    items: int = 400
    new_items: int = 10  # catalogue items that appear in no event
    categories: int = 10
    brands: int = 40
    tags: int = 24
    max_tags: int = 3
    countries: int = 8
    events_per_user: float = 30.0  # mean impressions per user (geometric, at least min_events)
    min_events: int = 3
    days: int = 60  # users start within the first `days` days
    base_logit: float = -2.2  # with the other defaults: a click rate of about 15%
    taste_weight: float = 1.0  # category taste (profile + personal)
    profile_weight: float = 0.6  # share of the category taste predictable from country and age band
    brand_weight: float = 0.7
    decisiveness_spread: float = 0.7  # std of log decisiveness (0: every user alike)
    missing_device: float = 0.02  # share of users without a device value
    seed: int = 0


def _names(prefix: str, n: int) -> np.ndarray:
    width = len(str(max(n - 1, 0)))
    return np.char.add(prefix, np.char.zfill(np.arange(n).astype(str), width))


def _labels(preset: tuple[str, ...], n: int, prefix: str) -> np.ndarray:
    return np.array([*preset[:n], *(f"{prefix}{k}" for k in range(len(preset), n))])


def _zipf(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    return weights / weights.sum()


def generate(params: ShopParams) -> dict[str, dict[str, object]]:
    """-> {"events": columns, "users": columns, "items": columns} (numpy arrays; `tags` as (offsets, values))."""
    p = params
    if p.users < 1 or p.items < 1 or p.categories < 1 or p.brands < 1 or p.tags < 1 or p.countries < 1:
        raise ValueError("users, items, categories, brands, tags and countries must be at least 1")
    if p.min_events < 1 or p.events_per_user < p.min_events:
        raise ValueError("need 1 <= min_events <= events_per_user")
    rng = np.random.default_rng(p.seed)
    n_u, n_shown = p.users, p.items
    n_i = n_shown + p.new_items

    # --- items: a brand belongs to one category; price by category; tags leaning on the category ----------
    brand_category = rng.permutation(np.arange(p.brands) % p.categories)
    brand = rng.choice(p.brands, size=n_i, p=_zipf(p.brands, 0.6))
    brand[n_shown:] = brand[rng.integers(0, n_shown, size=p.new_items)]  # new items: a brand (category) on show
    category = brand_category[brand]
    price_level = rng.normal(3.3, 0.8, size=p.categories)  # e^3.3 ~ 27
    price = np.floor(np.exp(price_level[category] + 0.6 * rng.normal(size=n_i))) + 0.99  # 26.99
    n_tags = rng.integers(0, p.max_tags + 1, size=n_i)
    affinity = rng.random((p.categories, p.tags)) < min(1.0, 3.0 / p.tags)
    keys = rng.random((n_i, p.tags)) - affinity[category]  # the category's own tags first
    ranked = np.argsort(keys, axis=1)[:, :p.max_tags]
    has = np.arange(ranked.shape[1])[None, :] < n_tags[:, None]
    tag_values = ranked[has]  # row-major: each item's tags in order
    tag_offsets = np.concatenate([[0], np.cumsum(has.sum(axis=1))]).astype(np.int32)
    quality = 0.5 * rng.normal(size=n_i)
    tag_quality = 0.3 * rng.normal(size=p.tags)
    item_tag_effect = np.zeros(n_i)
    np.add.at(item_tag_effect, np.repeat(np.arange(n_i), has.sum(axis=1)), tag_quality[tag_values])

    # --- users: profile, tastes, decisiveness --------------------------------------------------------------
    country = rng.choice(p.countries, size=n_u, p=_zipf(p.countries, 1.0))
    device = rng.choice(len(DEVICES), size=n_u, p=[0.6, 0.3, 0.1])
    device_missing = rng.random(n_u) < p.missing_device
    tier = rng.choice(len(TIERS), size=n_u, p=[0.6, 0.25, 0.1, 0.05])
    years = np.clip(np.round(rng.normal(38, 13, size=n_u)), 16, 90).astype(np.int64)
    age_group = np.clip((years - 16) // 12, 0, 5)
    country_taste = rng.normal(size=(p.countries, p.categories))
    age_taste = rng.normal(size=(6, p.categories))
    profile_taste = (country_taste[country] + age_taste[age_group]) / np.sqrt(2)
    link = p.profile_weight
    taste = p.taste_weight * (link * profile_taste + np.sqrt(1 - link ** 2) * rng.normal(size=(n_u, p.categories)))
    brand_taste = p.brand_weight * rng.normal(size=(n_u, p.brands)).astype(np.float32)
    price_sensitivity = 0.3 * rng.gamma(2.0, 0.5, size=n_u) * np.array([1.0, 0.8, 0.5, 0.3])[tier]
    log_decisiveness = p.decisiveness_spread * rng.normal(size=n_u)
    decisiveness = np.exp(log_decisiveness)
    tier_bias = np.array([0.0, 0.2, 0.4, 0.6])

    # --- impressions: a geometric number per user, items by popularity, gaps exponential -------------------
    extra = p.events_per_user - p.min_events
    counts = p.min_events + (rng.geometric(1.0 / (extra + 1.0), size=n_u) - 1 if extra > 0 else 0)
    counts = np.asarray(counts, np.int64)
    owner = np.repeat(np.arange(n_u), counts)
    n = len(owner)
    popularity = _zipf(n_shown, 0.9)[rng.permutation(n_shown)]
    item = rng.choice(n_shown, size=n, p=popularity)
    gaps = 1 + np.floor(rng.exponential(3 * 3600.0, size=n)).astype(np.int64)  # >= 1 s: no equal timestamps
    start = EPOCH + rng.integers(0, p.days * 86_400, size=n_u)
    cumulative = np.cumsum(gaps)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    before = np.concatenate([[0], cumulative])[first]  # gaps before each user's first event
    timestamp = start[owner] + cumulative - before[owner]

    preference = (taste[owner, category[item]] + brand_taste[owner, brand[item]] + quality[item]
                  + item_tag_effect[item] - price_sensitivity[owner] * (np.log(price[item]) - 3.3))
    logit = p.base_logit + tier_bias[tier][owner] + decisiveness[owner] * preference
    click = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)

    by_time = np.argsort(timestamp, kind="stable")
    user_ids, item_ids = _names("u", n_u), _names("p", n_i)
    tag_names = _names("t", p.tags)
    return {
        "events": {"user_id": user_ids[owner][by_time], "item_id": item_ids[item][by_time],
                   "timestamp": timestamp[by_time].astype(np.int64), "click": click[by_time]},
        "users": {"user_id": user_ids, "country": _labels(COUNTRIES, p.countries, "C")[country],
                  "device": np.where(device_missing, None, np.array(DEVICES, dtype=object)[device]),
                  "tier": np.array(TIERS)[tier], "age_years": years, "log_decisiveness": log_decisiveness},
        "items": {"item_id": item_ids, "category": _labels(CATEGORIES, p.categories, "category")[category],
                  "brand": _names("b", p.brands)[brand], "price": price,
                  "tags": (tag_offsets, tag_names[tag_values])},
    }


def new_item_ids(params: ShopParams) -> list[str]:
    """The catalogue items no event mentions (the last `new_items` item ids)."""
    return _names("p", params.items + params.new_items)[params.items:].tolist()


def write_parquet(tables: dict[str, dict[str, object]], folder: Path) -> Path:
    """Each table as `<name>.parquet`, written beside and renamed into place (never half-written)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, columns in tables.items():
        arrays = {}
        for key, values in columns.items():
            if isinstance(values, tuple):  # (offsets, values): a list column
                offsets, flat = values
                arrays[key] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat, pa.string()))
            elif values.dtype == object:
                arrays[key] = pa.array(values.tolist(), pa.string())
            else:
                arrays[key] = pa.array(values)
        tmp = tmp_beside(folder / f"{name}.parquet")
        pq.write_table(pa.table(arrays), tmp)
        tmp.replace(folder / f"{name}.parquet")
    return folder


def params_from(values: dict) -> ShopParams:
    known = {f.name for f in fields(ShopParams)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown shop parameters {unknown}; expected some of {sorted(known)}")
    return ShopParams(**values)


def materialise(params: dict, folder: Path) -> Path:
    """Generate the shop of `params` into `folder` unless it is there already (generation is seeded)."""
    folder = Path(folder)
    if all((folder / f"{name}.parquet").exists() for name in TABLES):
        return folder
    return write_parquet(generate(params_from(params)), folder)


def defaults() -> dict:
    return asdict(ShopParams())
