"""Locust scenarios for the UDG scoring service: a realistic mix drawn from what was published.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000                  # web UI on :8089
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 -t 1m --tags score

Tasks (each tagged, so `--tags score`, `--tags cold`, `--tags events` or any combination runs a part alone):
- `score`  a known (published) user scores a candidate list; list sizes follow UDG_LOADTEST_CANDIDATES;
- `cold`   a user never seen before scores a candidate list, sending a profile drawn from the published users'
           profiles (so the mix of profile values is the real one);
- `events` a known user sends an event (a click with probability UDG_LOADTEST_CLICK_RATE) on a catalogue item.

The population is read from the model artifact, the way the service sees it: MODEL_REPO/V/manifest.json
(item vocabulary, profile vocabularies) and MODEL_REPO/V/users.npz (the published users and their profiles).

Environment (all optional):
  UDG_LOADTEST_MODEL_DIR   the version directory to read; default $UDG_MODEL_REPO/$UDG_MODEL_VERSION, or the
                           newest version directory in $UDG_MODEL_REPO when UDG_MODEL_VERSION is unset
  UDG_LOADTEST_USERS       comma-separated known user ids: used instead of users.npz (or without an artifact)
  UDG_LOADTEST_ITEMS       comma-separated item ids: used instead of the manifest's vocabulary
  UDG_LOADTEST_CANDIDATES  candidate-list size distribution (default loguniform:50:1000):
                           "loguniform:LO:HI", "uniform:LO:HI" (or "LO-HI"), "fixed:N" (or "N"), "choice:A,B,C"
  UDG_LOADTEST_WEIGHTS     task weights, default "score=8,cold=1,events=3" (0 disables a task)
  UDG_LOADTEST_USER_SKEW   Zipf exponent of user popularity: 0 (default) uniform, 1 a few heavy users
  UDG_LOADTEST_TOP_K       send top_k with every score request (default 0: not sent, every score returned)
  UDG_LOADTEST_CLICK_RATE  share of events that are clicks (default 0.3)
  UDG_LOADTEST_UNKNOWN_ITEMS  share of candidates that are ids outside the vocabulary (default 0.01)
  UDG_LOADTEST_WAIT        think time per locust user in seconds, "0" (default, closed loop) or "MIN:MAX"
  UDG_LOADTEST_SEED        base seed (default 0): each locust user gets its own reproducible stream
  UDG_LOADTEST_BODY        score request and response bodies: json (default) or msgpack (application/msgpack)
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import msgpack
from locust import FastHttpUser, between, constant, events, tag, task

from repository import MANIFEST_FILE, USERS_FILE, ArtifactError, ModelRepository, read_manifest

log = logging.getLogger("udg.locust")

TASKS = ("score", "cold", "events")
DEFAULT_WEIGHTS = {"score": 8, "cold": 1, "events": 3}
DEFAULT_SIZES = "loguniform:50:1000"
# When nothing says which profile fields a version has: cold users send no profile (the all-OOV profile).
FALLBACK_PROFILES: tuple[dict[str, str], ...] = ({},)
SCORE_PATH, EVENTS_PATH = "/v1/score", "/v1/events"
BODY_FORMATS = ("json", "msgpack")
MSGPACK_HEADERS = {"Content-Type": "application/msgpack", "Accept": "application/msgpack"}


class ConfigError(ValueError):
    pass


# --- configuration ---------------------------------------------------------------------------------------

def parse_sizes(spec: str) -> Callable[[random.Random], int]:
    """A candidate-list size sampler from a spec such as "loguniform:50:1000", "50-1000", "500", "choice:50,500"."""
    text = spec.strip().lower()
    try:
        if ":" not in text:
            if "-" in text:
                lo, hi = (int(v) for v in text.split("-", 1))
                return _checked(lo, hi, lambda rng: rng.randint(lo, hi))
            n = int(text)
            return _checked(n, n, lambda rng: n)
        kind, _, rest = text.partition(":")
        if kind == "fixed":
            n = int(rest)
            return _checked(n, n, lambda rng: n)
        if kind == "choice":
            values = [int(v) for v in rest.split(",") if v.strip()]
            if not values:
                raise ConfigError("choice needs at least one size")
            _checked(min(values), max(values), None)
            return lambda rng: rng.choice(values)
        lo, hi = (int(v) for v in rest.split(":"))
        if kind == "uniform":
            return _checked(lo, hi, lambda rng: rng.randint(lo, hi))
        if kind == "loguniform":
            log_lo, log_hi = math.log(lo), math.log(hi + 1)
            return _checked(lo, hi, lambda rng: min(hi, int(math.exp(rng.uniform(log_lo, log_hi)))))
    except (TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"UDG_LOADTEST_CANDIDATES={spec!r}: {error}") from None
    raise ConfigError(f"UDG_LOADTEST_CANDIDATES={spec!r}: unknown distribution {kind!r} "
                      "(loguniform, uniform, fixed, choice)")


def _checked(lo: int, hi: int, sampler):
    if not 1 <= lo <= hi:
        raise ConfigError(f"candidate sizes need 1 <= low <= high, got {lo}..{hi}")
    return sampler


def parse_weights(spec: str | None) -> dict[str, int]:
    """"score=8,cold=1,events=3" -> {task: weight}; tasks left out keep their default weight."""
    weights = dict(DEFAULT_WEIGHTS)
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in TASKS:
            raise ConfigError(f"UDG_LOADTEST_WEIGHTS: {part!r} is not TASK=WEIGHT with TASK one of {TASKS}")
        try:
            weights[name] = int(value)
        except ValueError:
            raise ConfigError(f"UDG_LOADTEST_WEIGHTS: weight of {name} must be an integer, got {value!r}") from None
        if weights[name] < 0:
            raise ConfigError(f"UDG_LOADTEST_WEIGHTS: weight of {name} must be >= 0")
    return weights


def parse_wait(spec: str | None):
    text = (spec or "0").strip()
    if ":" in text:
        lo, hi = (float(v) for v in text.split(":", 1))
        return between(lo, hi)
    return constant(float(text))


def _env_list(env: Mapping[str, str], name: str) -> list[str]:
    return [v.strip() for v in env.get(name, "").split(",") if v.strip()]


def _env_float(env: Mapping[str, str], name: str, default: float, lo: float, hi: float) -> float:
    try:
        value = float(env.get(name, default))
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {env.get(name)!r}") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


@dataclass(frozen=True)
class Config:
    sizes_spec: str = DEFAULT_SIZES
    user_skew: float = 0.0
    top_k: int = 0
    click_rate: float = 0.3
    unknown_item_rate: float = 0.01
    seed: int = 0
    body: str = "json"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Config:
        config = cls(
            sizes_spec=env.get("UDG_LOADTEST_CANDIDATES", DEFAULT_SIZES),
            user_skew=_env_float(env, "UDG_LOADTEST_USER_SKEW", 0.0, 0.0, 10.0),
            top_k=int(_env_float(env, "UDG_LOADTEST_TOP_K", 0, 0, 1e6)),
            click_rate=_env_float(env, "UDG_LOADTEST_CLICK_RATE", 0.3, 0.0, 1.0),
            unknown_item_rate=_env_float(env, "UDG_LOADTEST_UNKNOWN_ITEMS", 0.01, 0.0, 1.0),
            seed=int(_env_float(env, "UDG_LOADTEST_SEED", 0, 0, 2**63)),
            body=env.get("UDG_LOADTEST_BODY", "json").strip().lower(),
        )
        if config.body not in BODY_FORMATS:
            raise ConfigError(f"UDG_LOADTEST_BODY must be one of {', '.join(BODY_FORMATS)}, got {config.body!r}")
        parse_sizes(config.sizes_spec)  # fail at start-up, not in the first task
        return config


# --- the population: who and what the requests are about --------------------------------------------------

@dataclass(frozen=True)
class Population:
    users: list[str]
    items: list[str]
    profiles: list[dict[str, str]] = field(default_factory=list)
    source: str = "env"
    version: str | None = None

    def describe(self) -> str:
        return (f"{len(self.users):,d} known users, {len(self.items):,d} items, {len(self.profiles):,d} profiles "
                f"from {self.source}" + (f" (version {self.version})" if self.version else ""))


def model_dir(env: Mapping[str, str] = os.environ) -> Path | None:
    """The version directory to read: UDG_LOADTEST_MODEL_DIR, else UDG_MODEL_REPO/UDG_MODEL_VERSION (or newest,
    as the service picks it)."""
    if env.get("UDG_LOADTEST_MODEL_DIR"):
        return Path(env["UDG_LOADTEST_MODEL_DIR"])
    repo = env.get("UDG_MODEL_REPO")
    if not repo:
        return None
    if env.get("UDG_MODEL_VERSION"):
        return Path(repo) / env["UDG_MODEL_VERSION"]
    newest = ModelRepository(repo).newest()
    return Path(repo) / newest if newest else None


def _vocab_tokens(vocab: Mapping) -> list[str]:
    """A feature schema vocabulary ({"tokens": [...], ...}) -> its tokens."""
    return [str(t) for t in vocab.get("tokens", [])] if isinstance(vocab, Mapping) else []


def read_artifact(path: Path) -> Population:
    """Users, items and profiles from MODEL_REPO/V: manifest.json (vocabularies) and users.npz (published users)."""
    manifest = read_manifest(path, validate=False)  # only the vocabularies are needed
    vocab = manifest.get("vocab", {})
    features = manifest.get("features", {})
    items = _vocab_tokens(features.get("items", {}))
    user_fields = {f["name"]: f for f in features.get("user_fields", [])}
    fields = list(user_fields)
    users: list[str] = []
    profiles: list[dict[str, str]] = []
    users_file = path / vocab.get("users", {}).get("file", USERS_FILE)
    if users_file.exists():
        import numpy as np  # a core dependency of the project; only needed here

        with np.load(users_file, allow_pickle=False) as data:
            users = [str(u) for u in data["user_ids"].tolist()]
            if "profile" in data.files:
                names = [str(f) for f in data["profile_fields"].tolist()] if "profile_fields" in data.files else fields
                profiles = [{f: str(v) for f, v in zip(names, row, strict=False) if str(v)}
                            for row in data["profile"].tolist()]
                profiles = [p for p in profiles if p]
    if not profiles and fields:  # no published profiles: combine the profile vocabularies independently
        values = {f: _vocab_tokens(user_fields[f].get("vocab", {})) for f in fields}
        if all(values.values()):
            rng = random.Random(0)
            profiles = [{f: rng.choice(v) for f, v in values.items()} for _ in range(1000)]
    return Population(users=users, items=items, profiles=profiles, source=str(path), version=manifest.get("version"))


def load_population(env: Mapping[str, str] = os.environ) -> Population:
    """The artifact's population, with UDG_LOADTEST_USERS / UDG_LOADTEST_ITEMS taking precedence when set."""
    path = model_dir(env)
    population = Population(users=[], items=[])
    if path is not None:
        if not (path / MANIFEST_FILE).exists():
            raise ConfigError(f"{path} holds no {MANIFEST_FILE}: set UDG_LOADTEST_MODEL_DIR to MODEL_REPO/VERSION, "
                              "or give ids in UDG_LOADTEST_USERS and UDG_LOADTEST_ITEMS")
        population = read_artifact(path)
    users, items = _env_list(env, "UDG_LOADTEST_USERS"), _env_list(env, "UDG_LOADTEST_ITEMS")
    if users or items:
        population = Population(users=users or population.users, items=items or population.items,
                                profiles=population.profiles,
                                source=population.source if path else "UDG_LOADTEST_USERS/ITEMS",
                                version=population.version)
    if not population.items:
        raise ConfigError("no items to score: publish a model version (UDG_MODEL_REPO / UDG_LOADTEST_MODEL_DIR) "
                          "or list item ids in UDG_LOADTEST_ITEMS")
    return population


# --- the workload: one request body at a time ---------------------------------------------------------------

class Workload:
    """Request bodies for the three tasks, drawn from a population with one random stream (reproducible)."""

    def __init__(self, population: Population, config: Config, rng: random.Random):
        self.population, self.config, self.rng = population, config, rng
        self.sizes = parse_sizes(config.sizes_spec)
        self.profiles = population.profiles or list(FALLBACK_PROFILES)
        n = len(population.users)
        # Zipf-like popularity over a fixed random permutation of users (rank r has weight 1 / r^skew).
        self._cum_weights = None
        if n and config.user_skew > 0:
            order = list(range(n))
            random.Random(config.seed).shuffle(order)
            weights = [0.0] * n
            for rank, user in enumerate(order, start=1):
                weights[user] = rank ** -config.user_skew
            self._cum_weights = list(itertools.accumulate(weights))

    def known_user(self) -> str:
        users = self.population.users
        if not users:
            raise ConfigError("the score and events tasks need known users: publish users.npz or set "
                              "UDG_LOADTEST_USERS (or run only `--tags cold`)")
        if self._cum_weights is None:
            return users[self.rng.randrange(len(users))]
        x = self.rng.random() * self._cum_weights[-1]
        return users[min(bisect.bisect_right(self._cum_weights, x), len(users) - 1)]

    def candidates(self) -> list[str]:
        items = self.population.items
        # The service rejects repeated candidates, so a list never exceeds the catalogue.
        n = min(self.sizes(self.rng), len(items))
        chosen = self.rng.sample(items, n)
        if self.config.unknown_item_rate > 0:
            for i in range(n):
                if self.rng.random() < self.config.unknown_item_rate:
                    chosen[i] = f"unknown-item-{self.rng.getrandbits(32):08x}"
        return chosen

    def _score_body(self, user_id: str, profile: dict[str, str] | None) -> dict:
        body: dict = {"user_id": user_id, "candidates": self.candidates()}
        if profile is not None:
            body["profile"] = profile
        if self.config.top_k:
            body["top_k"] = self.config.top_k
        return body

    def score_request(self) -> dict:
        return self._score_body(self.known_user(), None)

    def cold_request(self) -> dict:
        user_id = f"loadtest-new-{self.rng.getrandbits(64):016x}"
        return self._score_body(user_id, dict(self.rng.choice(self.profiles)))

    def event(self) -> dict:
        return {"user_id": self.known_user(), "item_id": self.rng.choice(self.population.items),
                "clicked": self.rng.random() < self.config.click_rate, "ts": round(time.time(), 3)}


@lru_cache(maxsize=1)
def shared_population() -> Population:
    population = load_population()
    log.info("load test population: %s", population.describe())
    return population


@lru_cache(maxsize=1)
def shared_config() -> Config:
    return Config.from_env()


@events.test_start.add_listener
def _on_test_start(environment, **_kwargs) -> None:
    """Read the population once, before the first user starts, so a misconfiguration stops the run early."""
    try:
        shared_population()
        shared_config()
    except (ConfigError, ArtifactError, OSError, ValueError) as error:
        log.error("load test configuration: %s", error)
        if environment.runner is not None:
            environment.runner.quit()
        raise


# --- the locust user ----------------------------------------------------------------------------------------

WEIGHTS = parse_weights(os.environ.get("UDG_LOADTEST_WEIGHTS"))
_user_numbers = itertools.count()


class ScoringUser(FastHttpUser):
    """One simulated frontend connection: closed loop by default (no think time), tasks picked by weight."""

    wait_time = parse_wait(os.environ.get("UDG_LOADTEST_WAIT"))

    def on_start(self) -> None:
        config = shared_config()
        self.workload = Workload(shared_population(), config, random.Random(config.seed * 1_000_003
                                                                            + next(_user_numbers)))

    def _score(self, body: dict, name: str) -> None:
        n = len(body["candidates"])
        packed = self.workload.config.body == "msgpack"
        sent = {"data": msgpack.packb(body), "headers": MSGPACK_HEADERS} if packed else {"json": body}
        with self.client.post(SCORE_PATH, name=name, catch_response=True, **sent) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {str(response.text)[:200]}")
                return
            try:
                scores = (msgpack.unpackb(response.content) if packed else response.json())["scores"]
            except (ValueError, KeyError, TypeError, msgpack.UnpackException) as error:
                response.failure(f"bad score response: {error!r}")
                return
            expected = min(self.workload.config.top_k or n, n)
            if len(scores) not in (n, expected):
                response.failure(f"{len(scores)} scores for {n} candidates")

    @tag("score")
    @task(WEIGHTS["score"])
    def score(self) -> None:
        self._score(self.workload.score_request(), f"{SCORE_PATH} known")

    @tag("cold")
    @task(WEIGHTS["cold"])
    def cold(self) -> None:
        self._score(self.workload.cold_request(), f"{SCORE_PATH} cold")

    @tag("events")
    @task(WEIGHTS["events"])
    def send_event(self) -> None:
        with self.client.post(EVENTS_PATH, json=self.workload.event(), name=EVENTS_PATH,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {str(response.text)[:200]}")
