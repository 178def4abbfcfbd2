"""Model registry: the versions this worker holds, and which one serves a request.

States of a version in this worker: `available` (a directory of the model repository, not loaded), `loading`,
`ready` (loaded, verified, warmed up), `active` (serving: the active version or an arm of the split),
`failed` (with the reason; the previous routing keeps serving).

Swap semantics (after TF Serving's availability-preserving policy):
- **Load off the request path.** A version is loaded, verified (sha256 of every file, golden outputs, the
  `udg publish` marker in Redis matching this manifest) and warmed up on ONE dedicated loader thread, at
  lowered OS priority; the event loop only awaits it. A failure marks the version `failed` with the reason
  and changes nothing else.
- **One atomic reference swap.** What serves is one immutable `Routing` object (active version + split arms);
  a change builds a new one and assigns `self.routing` once. `lease()` reads it once per request, so a
  request holds the version it started with until it ends, whatever happens meanwhile.
- **Release after the last in-flight request.** Every lease counts in `ServingModel.inflight`; a version
  that is unloaded leaves the routing first, then its sessions are dropped once that count is 0.

A/B split: `bucket(user_id)` is a stable hash (blake2b, not Python's per-process `hash`) into 10,000
buckets; arms take consecutive bucket ranges in version-name order (whatever order the weights came in), so
every worker sends a user to the same arm, and with two arms growing one (10% -> 20%) moves users only into
it. With three or more arms no split computed from the weights alone can promise that for every change (a
shift between two arms may move users of an arm whose range lies between them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from repository import MANIFEST_FILE, ModelRepository, is_version_name
from service import metrics
from service.feature_store import FeatureStore, FeatureStoreUnavailable
from service.logs import MODEL_VERSION
from service.redis_layout import TAG_META, RedisLayout

log = logging.getLogger(__name__)
SPLIT_BUCKETS = 10_000
STATES = ("available", "loading", "ready", "active", "failed")
FAILED_RETRY_S = 30.0  # a version that failed here is retried by the follower at most this often


class ActivationError(RuntimeError):
    pass


class VersionRefused(ActivationError):
    """A version could not be loaded or verified; `reason` says why. The current routing keeps serving."""

    def __init__(self, version: str, reason: str):
        super().__init__(f"version {version} refused: {reason}")
        self.version, self.reason = version, reason


class VersionNotLoaded(LookupError):
    """A request pinned a version this worker does not hold."""


class ServingModel:
    """One loaded version: the onnxruntime artifact plus serving helpers (cold-start cache, in-flight count)."""

    COLD_CACHE_SIZE = 4096  # distinct profiles are few (a product of small vocabularies): one meta run each

    def __init__(self, artifact, manifest_sha256: str, load_seconds: float = 0.0):
        self.artifact = artifact
        self.version: str = artifact.version
        self.user_dim: int = artifact.user_dim
        self.udg_dim: int = artifact.udg_dim
        self.max_history: int = artifact.max_history
        self.manifest_sha256 = manifest_sha256
        self.load_seconds = load_seconds
        self.loaded_at = time.time()
        self.inflight = 0
        self.served = 0
        self.released = False
        # Items that arrived after training, with their fields ({raw id: tokens of every field, concatenated}),
        # from the version's item table in Redis; candidates with these ids are scored with their features.
        self.new_items: dict[str, np.ndarray] = {}
        self.items_generation = -1  # of the item table `new_items` was read at (-1: not read yet)
        self._cold: OrderedDict[bytes, tuple[np.ndarray, np.ndarray, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def cold_state(self, profile_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, bytes]:
        """(user_vec [1, u], udg_vec [1, g], packed value for Redis) of an unseen user with this profile."""
        key = profile_idx.tobytes()
        hit = self._cold.get(key)
        if hit is not None:
            return hit
        user_vec, udg_vec = self.artifact.cold_start(profile_idx)
        user_vec = np.asarray(user_vec, np.float32).reshape(1, self.user_dim)
        udg_vec = (np.zeros((1, 0), np.float32) if udg_vec is None
                   else np.asarray(udg_vec, np.float32).reshape(1, self.udg_dim))
        value = (user_vec, udg_vec, RedisLayout.pack_embeddings(user_vec, udg_vec, TAG_META))
        with self._lock:
            self._cold[key] = value
            while len(self._cold) > self.COLD_CACHE_SIZE:
                self._cold.popitem(last=False)
        return value

    def release(self) -> None:
        """Drop the onnxruntime sessions (only once nothing holds a lease on this version)."""
        self.released = True
        self.artifact = None
        self._cold.clear()


def bucket(user_id: str) -> int:
    """Stable split bucket of a user id in [0, SPLIT_BUCKETS): the same in every process and every run."""
    digest = hashlib.blake2b(user_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % SPLIT_BUCKETS


def split_bounds(weights: dict[str, float]) -> list[tuple[int, str]]:
    """{version: percent} -> [(exclusive upper bucket, version)] in version-name order, the last one closing.

    The order is canonical (sorted names), never the order the admin call sent the keys in: otherwise
    `{"v2": 20, "v1": 80}` after `{"v1": 90, "v2": 10}` would swap the ranges and move every v2 user."""
    total = sum(weights.values())
    bounds, acc = [], 0.0
    for version, weight in sorted(weights.items()):
        acc += weight
        bounds.append((round(acc / total * SPLIT_BUCKETS), version))
    if bounds:
        bounds[-1] = (SPLIT_BUCKETS, bounds[-1][1])
    return bounds


@dataclass(frozen=True)
class Routing:
    """What serves, as one immutable object swapped atomically. `generation` is the Redis routing document's."""

    generation: int = 0
    active: ServingModel | None = None
    arms: tuple[tuple[int, ServingModel], ...] = ()
    split: dict | None = None

    def select(self, user_id: str) -> tuple[ServingModel | None, str]:
        if self.arms:
            b = bucket(user_id)
            for upper, model in self.arms:
                if b < upper:
                    return model, "split"
        return self.active, "active"

    def versions(self) -> set[str]:
        found = {model.version for _, model in self.arms}
        if self.active is not None:
            found.add(self.active.version)
        return found


@dataclass
class Failure:
    reason: str
    at: float
    generation: int


def _lower_priority() -> None:
    """Loader thread: lower OS priority, so that loading yields the cores to request handling."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


@dataclass
class ModelRegistry:
    repo: Path
    store: FeatureStore
    providers: list[str] | None = None
    threads: int = 1
    require_marker: bool = True
    cuda_graph: bool = True  # only where the CUDA provider is active
    precision: str = "fp32"  # "int8": each version's scorer.int8.onnx (a version without one is refused)
    models: dict[str, ServingModel] = field(default_factory=dict)  # ready in this worker
    failed: dict[str, Failure] = field(default_factory=dict)
    routing: Routing = field(default_factory=Routing)
    wanted: dict | None = None  # the last routing document applied (from Redis)
    in_sync: bool = True
    sync_problems: list[str] = field(default_factory=list)
    last_error: str | None = "no version activated yet"
    state_lost: str | None = None  # why, while Redis has lost the published state (service/control.py)

    def __post_init__(self):
        self.repo = Path(self.repo)
        self._loading: dict[str, asyncio.Future] = {}
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="udg-loader", initializer=_lower_priority)
        self._apply_lock: asyncio.Lock | None = None
        self._releases: set[asyncio.Task] = set()

    @property
    def repository(self) -> ModelRepository:
        return ModelRepository(self.repo)

    @property
    def active(self) -> ServingModel | None:
        return self.routing.active

    def serving_models(self) -> list[ServingModel]:
        """The versions the routing serves (the active one and the split arms)."""
        routing = self.routing
        found = {m.version: m for m in (routing.active, *(m for _, m in routing.arms)) if m is not None}
        return list(found.values())

    # --- loading (off the request path) -----------------------------------------------------------------
    def load_blocking(self, version: str) -> ServingModel:
        """Open (sha256 of every file + golden outputs) and warm up; runs on the loader thread."""
        from export.runtime import ArtifactError, open_artifact

        repository = self.repository
        if not repository.has(version):
            raise VersionRefused(version, f"no version directory {repository.root / version} "
                                          f"(with a {MANIFEST_FILE})")
        path = repository.path(version)
        started = time.perf_counter()
        try:
            artifact = open_artifact(path, providers=self.providers, threads=self.threads, verify_users=False,
                                     cuda_graph=self.cuda_graph, precision=self.precision)
            if artifact.version != version:
                raise VersionRefused(version, f"its manifest names version {artifact.version!r}")
            artifact.warmup()
        except ArtifactError as error:
            raise VersionRefused(version, str(error)) from None
        except VersionRefused:
            raise
        except Exception as error:  # onnxruntime errors at run time (a graph that loads but cannot run)
            raise VersionRefused(version, f"{type(error).__name__}: {error}") from None
        return ServingModel(artifact, repository.manifest_sha256(version), time.perf_counter() - started)

    async def check_marker(self, version: str, manifest_sha256: str | None = None) -> None:
        if not self.require_marker:
            return
        marker = await self.store.marker(version)
        if marker is None:
            raise VersionRefused(version, f"no publish marker in Redis; run `udg publish {self.repo / version}` "
                                          "first")
        if manifest_sha256 is not None and marker.get("manifest_sha256") != manifest_sha256:
            raise VersionRefused(version, "the state in Redis was published from a different artifact "
                                          "(manifest sha256 differs); publish this one again")

    async def ensure_loaded(self, version: str, generation: int = 0) -> ServingModel:
        """The loaded version, loading it (once, however many callers wait) if needed. Raises VersionRefused."""
        if not is_version_name(version):
            raise VersionRefused(version, "not a valid version name")
        model = self.models.get(version)
        if model is not None:
            return model
        future = self._loading.get(version)
        if future is None:
            future = asyncio.ensure_future(self._load(version, generation))
            self._loading[version] = future
            future.add_done_callback(lambda _: self._loading.pop(version, None))
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no warning
        return await asyncio.shield(future)

    async def _load(self, version: str, generation: int) -> ServingModel:
        self._set_state_metric(version, "loading")
        try:
            await self.check_marker(version)  # cheap: refuse an unpublished version before the heavy work
            loop = asyncio.get_running_loop()
            model = await loop.run_in_executor(self._executor, self.load_blocking, version)
            await self.check_marker(version, model.manifest_sha256)
        except VersionRefused as error:
            self.failed[version] = Failure(error.reason, time.monotonic(), generation)
            self._set_state_metric(version, "failed")
            log.warning("%s", error)
            raise
        except FeatureStoreUnavailable as error:
            self.failed[version] = Failure(str(error), time.monotonic(), generation)
            self._set_state_metric(version, "failed")
            raise VersionRefused(version, str(error)) from None
        try:
            await self.load_items(model)
        except FeatureStoreUnavailable as error:  # served without new items until the next refresh
            log.warning("version %s: item table not read (%s); retried on the next sync", version, error)
        self.failed.pop(version, None)
        self.models[version] = model
        metrics.LOAD_SECONDS.observe(model.load_seconds)
        self._set_state_metric(version, "ready")
        log.info("version %s loaded, verified and warmed up in %.2f s", version, model.load_seconds)
        return model

    async def load_items(self, model: ServingModel, generation: int | None = None) -> None:
        """Read the version's item table from Redis: the items it was not trained on, with their fields."""
        if generation is None:
            generation = (await self.store.item_generations([model.version]))[0]
        artifact = model.artifact
        width = artifact.schema.item_width
        if not width:
            model.items_generation = generation
            return
        table = await self.store.items(model.version, width)
        known = artifact.schema.items.index
        model.new_items = {item: tokens for item, tokens in table.items() if item not in known}
        model.items_generation = generation
        log.info("version %s: %d new items in its item table (generation %d)", model.version,
                 len(model.new_items), generation)

    async def refresh_items(self) -> None:
        """Reload the item table of every loaded version whose generation moved (`udg publish-items`)."""
        models = [m for m in self.models.values() if not m.released]
        if not models:
            return
        generations = await self.store.item_generations([m.version for m in models])
        for model, generation in zip(models, generations, strict=True):
            if generation != model.items_generation and not model.released:
                await self.load_items(model, generation)

    # --- following the routing document -----------------------------------------------------------------
    def _retry_due(self, version: str, generation: int) -> bool:
        failure = self.failed.get(version)
        return failure is None or failure.generation != generation or \
            time.monotonic() - failure.at > FAILED_RETRY_S

    async def apply(self, doc: dict) -> None:
        """Make this worker serve the routing document: load what it needs (routing versions first), swap
        the routing in one assignment, then load the other wanted versions and release the unwanted ones.
        A version that cannot be loaded here leaves the current routing in place (reported, retried)."""
        if self._apply_lock is None:
            self._apply_lock = asyncio.Lock()
        async with self._apply_lock:
            generation = int(doc.get("generation", 0))
            active_v, split = doc.get("active"), doc.get("split") or None
            routing_versions = ([active_v] if active_v else []) + [v for v in (split or {}) if v != active_v]
            problems = []
            for version in routing_versions:
                if version not in self.models and self._retry_due(version, generation):
                    with contextlib.suppress(VersionRefused):
                        await self.ensure_loaded(version, generation)
            current = self.routing
            active = self.models.get(active_v) if active_v else None
            if active is None:
                active = current.active
                if active_v:
                    problems.append(f"cannot serve active version {active_v}: {self._why(active_v)}; "
                                    f"still serving {active.version if active else 'nothing'}")
            arms, split_applied = current.arms, current.split
            if split:
                missing = [v for v in split if v not in self.models]
                if missing:
                    problems.append(f"cannot apply split {split}: " + "; ".join(
                        f"{v}: {self._why(v)}" for v in missing))
                else:
                    arms = tuple((upper, self.models[v]) for upper, v in split_bounds(split))
                    split_applied = dict(split)
            else:
                arms, split_applied = (), None
            new = Routing(generation, active, arms, split_applied)
            if (new.active, new.arms) != (current.active, current.arms):
                metrics.ROUTING_CHANGES.inc()
                log.info("routing generation %d: active %s, split %s", generation,
                         active.version if active else None, split_applied)
            self.routing = new  # the one atomic swap
            if active is not None:
                self.last_error = None
            self.wanted = doc
            for version in doc.get("loaded") or []:
                if version not in self.models and self._retry_due(version, generation):
                    try:
                        await self.ensure_loaded(version, generation)
                    except VersionRefused as error:
                        problems.append(f"cannot load {version}: {error.reason}")
                elif version in self.failed and version not in self.models:
                    problems.append(f"cannot load {version}: {self.failed[version].reason}")
            keep = set(doc.get("loaded") or []) | set(routing_versions) | self.routing.versions()
            for version in [v for v in self.models if v not in keep]:
                self._release(self.models.pop(version))
            self.in_sync, self.sync_problems = not problems, problems
            self._publish_state_metrics(generation)

    def _why(self, version: str) -> str:
        failure = self.failed.get(version)
        if failure is not None:
            return failure.reason
        return "loading" if version in self._loading else "not loaded"

    def _release(self, model: ServingModel) -> None:
        async def release():
            while model.inflight:
                await asyncio.sleep(0.005)
            model.release()
            self._set_state_metric(model.version, "available")
            log.info("version %s released (its last in-flight request ended)", model.version)

        task = asyncio.get_running_loop().create_task(release())
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def drain(self) -> None:
        while self._releases:
            await asyncio.gather(*list(self._releases), return_exceptions=True)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # --- the request path -------------------------------------------------------------------------------
    def select(self, user_id: str) -> ServingModel | None:
        """Which version serves this user: a split arm (by user-id hash) or the active one."""
        return self.routing.select(user_id)[0]

    @contextlib.contextmanager
    def lease(self, user_id: str, pinned: str | None = None):
        """Hold the version serving this request until it ends: yields (model or None, arm), where arm is
        'active', 'split' or 'pinned'. A pinned version not held by this worker raises VersionNotLoaded."""
        if pinned is not None:
            model, arm = self.models.get(pinned), "pinned"
            if model is None:
                raise VersionNotLoaded(f"model_version: version {pinned!r} is not loaded in this worker "
                                       f"({self._why(pinned)}); load it with POST /v1/admin/versions/{pinned}/load")
        else:
            model, arm = self.routing.select(user_id)
        if model is None:
            yield None, arm
            return
        model.inflight += 1
        token = MODEL_VERSION.set(model.version)  # log lines of this request name the version (service/logs.py)
        try:
            yield model, arm
        except BaseException:
            raise  # the version stays set for the error handler's log line; the request's task ends with it
        else:
            MODEL_VERSION.reset(token)
        finally:
            model.inflight -= 1
            model.served += 1

    # --- reporting --------------------------------------------------------------------------------------
    def state_of(self, version: str) -> tuple[str, str | None]:
        if version in self.routing.versions():
            return "active", None
        if version in self.models:
            return "ready", None
        if version in self._loading:
            return "loading", None
        if version in self.failed:
            return "failed", self.failed[version].reason
        return "available", None

    def describe(self) -> list[dict]:
        names = self.repository.versions()
        names += [v for v in [*self.models, *self.failed, *self._loading] if v not in names]
        weights = self.routing.split or {}
        rows = []
        for version in names:
            state, reason = self.state_of(version)
            model = self.models.get(version)
            row = {"version": version, "state": state, "reason": reason,
                   "active": self.active is not None and self.active.version == version,
                   "split_weight": weights.get(version), "inflight": model.inflight if model else 0,
                   "served": model.served if model else 0,
                   "load_seconds": round(model.load_seconds, 3) if model else None,
                   "manifest": self.repository.summary(version) if is_version_name(version) else None}
            rows.append(row)
        return rows

    def _set_state_metric(self, version: str, state: str) -> None:
        for name in STATES:
            metrics.VERSION_STATE.labels(version, name).set(1 if name == state else 0)

    def _publish_state_metrics(self, generation: int) -> None:
        for version in {*self.models, *self.failed}:
            self._set_state_metric(version, self.state_of(version)[0])
        active = self.active.version if self.active else None
        for version in {*self.models, *([active] if active else [])}:
            metrics.MODEL_LOADED.labels(version).set(1 if version == active else 0)
        metrics.ROUTING_GENERATION.set(generation)
        metrics.WORKER_IN_SYNC.set(1 if self.in_sync else 0)
