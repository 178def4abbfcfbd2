"""Model registry: which loaded version serves a request.

The seam for hot swap and A/B splits: `select(user_id)` is the one place that decides the version (today:
the active one), and `lease(user_id)` holds a reference to that `ServingModel` for the whole request, so a
swap (`activate`) never changes the model under a request that already started; an in-flight counter per
version tells when an old version may be released.

Loading a version (checksums, golden outputs, warm-up) runs in a worker thread, never on the request path.
Activation refuses a version whose `udg publish` completion marker is missing from Redis, or whose marker
was written for a different artifact (the sha256 of manifest.json must match).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from service.feature_store import TAG_META, FeatureStore, file_sha256, pack_embeddings

log = logging.getLogger(__name__)


class ActivationError(RuntimeError):
    pass


class ServingModel:
    """One loaded version: the onnxruntime artifact plus serving helpers (cold-start cache, in-flight count)."""

    COLD_CACHE_SIZE = 4096  # profiles are few (ages x genders x occupations): one meta run per distinct profile

    def __init__(self, artifact, manifest_sha256: str):
        self.artifact = artifact
        self.version: str = artifact.version
        self.user_dim: int = artifact.user_dim
        self.udg_dim: int = artifact.udg_dim
        self.max_history: int = artifact.max_history
        self.manifest_sha256 = manifest_sha256
        self.inflight = 0
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
        value = (user_vec, udg_vec, pack_embeddings(user_vec, udg_vec, TAG_META))
        with self._lock:
            self._cold[key] = value
            while len(self._cold) > self.COLD_CACHE_SIZE:
                self._cold.popitem(last=False)
        return value


def list_versions(repo: Path) -> list[str]:
    """Version directories of a model repository, oldest first (by the manifest's export time, then name)."""
    found = []
    for child in Path(repo).iterdir() if Path(repo).is_dir() else []:
        manifest = child / "manifest.json"
        if manifest.is_file():
            try:
                exported = json.loads(manifest.read_text()).get("exported_at", "")
            except ValueError:
                continue
            found.append((exported, child.name))
    return [name for _, name in sorted(found)]


class ModelRegistry:
    def __init__(self, repo: Path, store: FeatureStore, providers: list[str] | None = None, threads: int = 1,
                 require_marker: bool = True):
        self.repo = Path(repo)
        self.store = store
        self.providers = providers
        self.threads = threads
        self.require_marker = require_marker
        self.loaded: dict[str, ServingModel] = {}
        self.active: ServingModel | None = None
        self.last_error: str | None = "no version activated yet"

    # --- loading (off the request path) -----------------------------------------------------------------
    def load_blocking(self, version: str) -> ServingModel:
        from export.runtime import open_artifact

        path = self.repo / version
        artifact = open_artifact(path, providers=self.providers, threads=self.threads, verify_users=False)
        artifact.warmup()
        return ServingModel(artifact, file_sha256(path / "manifest.json"))

    async def load(self, version: str) -> ServingModel:
        model = self.loaded.get(version)
        if model is None:
            model = await asyncio.to_thread(self.load_blocking, version)
            self.loaded[version] = model
        return model

    async def check_marker(self, model: ServingModel) -> None:
        if not self.require_marker:
            return
        marker = await self.store.marker(model.version)
        if marker is None:
            raise ActivationError(f"version {model.version}: no publish marker in Redis; run "
                                  f"`udg publish {self.repo / model.version}` first")
        if marker.get("manifest_sha256") != model.manifest_sha256:
            raise ActivationError(f"version {model.version}: the state in Redis was published from a different "
                                  "artifact (manifest sha256 differs); publish this one again")

    async def activate(self, version: str | None = None) -> ServingModel:
        """Load (if needed), verify the publish marker, then switch with one reference assignment."""
        if version is None:
            versions = list_versions(self.repo)
            if not versions:
                raise ActivationError(f"no model versions in {self.repo}")
            version = versions[-1]
        model = await self.load(version)
        await self.check_marker(model)
        self.active = model
        self.last_error = None
        log.info("serving model version %s", version)
        return model

    # --- the request path -------------------------------------------------------------------------------
    def select(self, user_id: str) -> ServingModel | None:
        """Which version serves this user. Today: the active one (an A/B split by user-id hash goes here)."""
        return self.active

    @contextlib.contextmanager
    def lease(self, user_id: str):
        """Hold the selected version for the duration of a request (None when nothing is active)."""
        model = self.select(user_id)
        if model is None:
            yield None
            return
        model.inflight += 1
        try:
            yield model
        finally:
            model.inflight -= 1
