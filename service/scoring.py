"""The score request, stage by stage: one Redis round trip, cold start if needed, one onnxruntime call.

Decisions recorded here:
- **Duplicated candidates** are a client bug (the ranking could not say which copy it ranks): 422 naming the
  second occurrence (`candidates.<j>`) and the first. Checking costs one set() of the ids.
- **Unknown item ids** (candidates the serving version never saw in training) are scored through the OOV
  id row, like unseen items in training, and listed in `unknown_candidates` of the response. Their item
  fields come from the version's item table (`udg publish-items` adds items that arrived after training),
  so a new item of a known category is scored as that category; an item the table lacks has no features.
- **Profiles** are checked against the serving version's feature schema: an unknown field is a 422 naming
  it; a value the version has no row for is scored through the field's OOV row (or hash bucket) and counted
  in `udg_profile_oov_values{field}`.
- **Unseen users** (no embeddings under the serving version): the base user embedding is the artifact's
  unseen-user vector (OOV user-id row + profile rows) and the UDG embedding comes from the meta generator,
  both from `meta.onnx`, for the profile in the request, else the profile stored in Redis, else — no profile
  at all — the all-OOV profile (every field "unknown": the generator's bias plus its OOV rows, i.e. an
  average new user). The user's history (version independent) is used if they already have one.
  A generated state is written back to Redis (`SET NX`, never replacing a published one) in a background
  task after the response is on its way; a fallback state without any profile is not written back, so a
  later request that brings a profile gets a proper embedding. Meta outputs are cached per distinct
  profile, so a cold start usually costs no extra onnxruntime call.
- **Generated state expires** (`UDG_GENERATED_TTL_S`, 30 days): the write-back sets the TTL; a request that
  hits a generated state refreshes it in the background (one EXPIRE pipeline off the request path, at most
  once per user per tenth of the TTL in this worker). At most `UDG_GENERATED_CAP` new users per
  `UDG_GENERATED_WINDOW_S` are written back; beyond, they are scored the same and not written
  (`udg_generated_users{outcome}`).
- `warmup_steps` in the response: the gradient steps `udg warmup` has taken on the user's UDG embedding under
  this version from their events (0: as published or generated; docs/warmup.md).
- `cold_start` in the response is true when the user's embeddings came from the meta generator (in this
  request or an earlier, written-back one) rather than from training.
"""

from __future__ import annotations

import asyncio
import logging
import time
from operator import itemgetter

import numpy as np

from service import metrics, tracing
from service.api.schemas import ScoreRequest
from service.batching import MicroBatcher
from service.errors import InvalidField, ServiceUnavailable
from service.feature_store import FeatureStore, FeatureStoreUnavailable
from service.ratelog import RateLimitedLog
from service.registry import ServingModel

log = logging.getLogger(__name__)
_WRITE_BACK_LOG = RateLimitedLog(log)
REFRESHED_KEEP = 65_536  # users whose generated TTL this worker refreshed recently (bounded memory)
STAGES = ("parse", "redis", "cold_start", "encode", "model", "respond")


class StageTimer:
    """Accumulates per-stage seconds of one request; flushed into udg_stage_seconds at the end (and, with
    tracing on, the sequence of marks becomes the request's stage spans: service/tracing.py)."""

    __slots__ = ("last", "spent", "marks")

    def __init__(self, started: float):
        self.last = started
        self.spent: dict[str, float] = {}
        self.marks = [("start", started)] if tracing.ENABLED else None

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.spent[stage] = self.spent.get(stage, 0.0) + now - self.last
        self.last = now
        if self.marks is not None:
            self.marks.append((stage, now))

    def flush(self) -> None:
        children = _stage_children()
        for stage, seconds in self.spent.items():
            children[stage].observe(seconds)
        if self.marks is not None:
            tracing.stage_spans(self.marks)


_CHILDREN: dict = {}


def _stage_children() -> dict:
    if not _CHILDREN:
        _CHILDREN.update({stage: metrics.STAGE_SECONDS.labels(stage) for stage in STAGES})
    return _CHILDREN


def check_candidates(candidates: list[str], limit: int) -> None:
    if len(candidates) > limit:
        raise InvalidField(f"candidates: {len(candidates)} candidates, at most {limit} per request",
                           field="candidates")
    if len(set(candidates)) != len(candidates):
        first: dict[str, int] = {}
        for j, item in enumerate(candidates):
            if item in first:
                raise InvalidField(f"candidates.{j}: duplicate of candidates.{first[item]} ({item!r}); each "
                                   "candidate must appear once", field=f"candidates.{j}")
            first[item] = j


def check_profile(model: ServingModel, profile: dict[str, str] | None) -> None:
    if profile:
        schema = model.artifact.schema
        fields = schema.profile_fields
        for key in profile:
            if key not in fields:
                raise InvalidField(f"profile.{key}: unknown profile field; version {model.version} has the "
                                   f"fields {fields}", field=f"profile.{key}")
        for name in schema.unknown_profile_fields(profile):
            metrics.PROFILE_OOV.labels(model.version, name).inc()


class Scorer:
    def __init__(self, store: FeatureStore, write_back: bool = True, batcher: MicroBatcher | None = None):
        self.store = store
        self.write_back = write_back
        self.batcher = batcher  # None: one model call per request
        self._tasks: set[asyncio.Task] = set()
        self._refreshed: dict[tuple[str, str], float] = {}  # (version, user) -> monotonic time of the refresh

    async def score(self, model: ServingModel, request: ScoreRequest, timer: StageTimer) -> dict:
        artifact = model.artifact
        check_profile(model, request.profile)
        state = self.store.cached(model.version, request.user_id)  # a hot user: no round trip, no task
        if state is None:
            # Send the MGET, then encode the candidates while Redis answers (the round trip overlaps CPU work).
            fetch = asyncio.get_running_loop().create_task(self.store.fetch(model.version, request.user_id))
            await asyncio.sleep(0)  # lets the task write the command before the CPU-bound encoding below
        candidates = request.candidates
        try:
            candidate_idx, unknown = artifact.encode_items(candidates)
        except BaseException:
            if state is None:
                fetch.cancel()
            raise
        timer.mark("encode")
        if state is None:
            state = await fetch
        timer.mark("redis")
        lost = self.store.state_lost()
        if lost:  # the epoch in this very MGET said the state is gone: no cold-start scores for known users
            raise ServiceUnavailable(lost, kind="state_lost", retry_after_s=5)

        unpacked, history, warmup_steps = self._decode(model, state)
        if unpacked is None:
            user_vec, udg_vec = self._cold_start(model, request, state.profile)
            cold = True
            timer.mark("cold_start")
        else:
            user_vec, udg_vec, cold = unpacked
            if cold and self.write_back:
                self._maybe_refresh(model.version, request.user_id)

        any_unknown = bool(unknown.any())
        new_items = model.new_items if any_unknown else None
        fields = artifact.candidate_fields(candidate_idx, candidates, new_items)
        timer.mark("encode")

        if self.batcher is None:
            probabilities = artifact.score(user_vec, udg_vec, history, candidate_idx, fields)
        else:
            probabilities = await self.batcher.score(artifact, user_vec, udg_vec, history, candidate_idx, fields)
        timer.mark("model")

        n = len(candidates)
        top_k = min(request.top_k or n, n)
        if top_k < n:
            part = np.argpartition(-probabilities, top_k - 1)[:top_k]
            order = part[np.argsort(-probabilities[part], kind="stable")]
        else:
            order = np.argsort(-probabilities, kind="stable")
        ranked = order.tolist()
        ranking = list(itemgetter(*ranked)(candidates)) if len(ranked) > 1 else [candidates[i] for i in ranked]
        unknown_ids = [candidates[i] for i in np.flatnonzero(unknown)] if any_unknown else []
        metrics.CANDIDATES.labels(model.version).inc(n)
        metrics.CANDIDATES_PER_REQUEST.observe(n)
        if unknown_ids:
            metrics.UNKNOWN_CANDIDATES.labels(model.version).inc(len(unknown_ids))
            if new_items:
                known_features = sum(1 for item in unknown_ids if item in new_items)
                if known_features:
                    metrics.NEW_ITEM_CANDIDATES.labels(model.version).inc(known_features)
        return {
            "model_version": model.version,
            "cold_start": bool(cold),
            "scores": probabilities,
            "ranking": ranking,
            "unknown_candidates": unknown_ids,
            "warmup_steps": warmup_steps,
        }

    def _decode(self, model: ServingModel, state) -> tuple:
        """(embeddings unpacked or None, history indices, warm-up steps) of a fetched state under `model`,
        memoised on the state object: a hot user's cached state is decoded once, not per request."""
        artifact = model.artifact
        done = state.decoded.get(artifact)
        if done is None:
            layout = self.store.layout
            unpacked = layout.unpack_embeddings(state.embeddings, model.user_dim, model.udg_dim)
            history, _ = artifact.encode_items(layout.split_history(state.history, model.max_history))
            done = state.decoded[artifact] = (unpacked, history,
                                              0 if unpacked is None else layout.warmup_steps(state.embeddings))
        return done

    def _cold_start(self, model: ServingModel, request: ScoreRequest, stored_profile: bytes | None):
        if request.profile is not None:
            profile, source = request.profile, "request"
        else:
            stored = self.store.layout.unpack_profile(stored_profile)
            fields = model.artifact.profile_fields
            profile = {k: v for k, v in stored.items() if k in fields} if stored else None
            source = "stored" if profile else "none"
        profile_idx = model.artifact.encode_profile(profile)
        user_vec, udg_vec, packed = model.cold_state(profile_idx)
        metrics.COLD_STARTS.labels(model.version, source).inc()
        if self.write_back and source != "none":
            self._spawn(self._write_back(model.version, request.user_id, packed,
                                         profile if source == "request" else None))
        return user_vec, udg_vec

    def _maybe_refresh(self, version: str, user_id: str) -> None:
        key, now = (version, user_id), time.monotonic()
        last = self._refreshed.get(key)
        if last is not None and now - last < self.store.layout.generated_ttl_s / 10:
            return
        if len(self._refreshed) >= REFRESHED_KEEP:
            self._refreshed.clear()
        self._refreshed[key] = now
        self._spawn(self._refresh(version, user_id))

    async def _refresh(self, version: str, user_id: str) -> None:
        try:
            await self.store.refresh_generated(version, user_id)
        except FeatureStoreUnavailable as error:
            _WRITE_BACK_LOG.warning("refresh", "TTL refresh of generated state failed: %s", error)

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_back(self, version: str, user_id: str, packed: bytes, profile: dict | None) -> None:
        try:
            written = await self.store.store_generated(version, user_id, packed, profile)
        except FeatureStoreUnavailable as error:
            metrics.WRITE_BACK_FAILURES.inc()
            _WRITE_BACK_LOG.warning("write_back", "cold-start write-back for user %r failed (it will be "
                                    "regenerated): %s", user_id, error)
            return
        metrics.GENERATED_USERS.labels("written" if written else "capped").inc()

    async def drain(self) -> None:
        """Wait for pending write-backs (shutdown, tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
