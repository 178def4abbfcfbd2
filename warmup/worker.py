"""`udg warmup`: the online warm-up worker. Reads the events `POST /v1/events` streams (consumer group, at least
once), takes the warm-up rule's step(s) per event on each user's UDG embedding with the model frozen (adam with
the user's own moments, or Algorithm 1's α step: model/warm_rule.py), and writes it back under each serving
version with a compare-and-set, every event applied once per version.

One pass (`WarmupWorker.run_once`):

1. Follow the routing document (`udg:ctl:routing`, owned by service/control.py): the active version and the
   split arms are the versions warmed (no document yet, e.g. Redis restarted empty and no service has
   restored it: the worker waits and reads nothing, so no event is consumed without being applied); each
   is loaded from the model repository with its own weights
   (`warmup.model.WarmupModel`), and reloaded when its publish marker names another manifest. A version that
   cannot be warmed (no warmup.pt) is skipped: its events are acked for it and counted, never warmed with
   another version's model.
2. Entries: first those pending longer than `claim_idle_ms` in the group (XAUTOCLAIM: a dead or stuck
   worker's, this one's after a restart), else new ones (XREADGROUP >). An entry delivered more than
   `max_deliveries` times is acked and counted `dead` (it cannot stop the stream forever).
3. Per user and version: read (one pipeline) the embeddings, which of the events were already applied, the
   history, the profile, the rule's state; drop applied ones (`duplicate`), unknown items (`unknown_item`),
   published users unless `users="all"` (`not_cold`); take the steps; write value + applied identities + rule
   state with WARMUP_CAS. The
   CAS fails if the value changed since the read (a republish, a write-back, another worker): re-read, redo.
4. XACK the entries once every version's write succeeded; a Redis error leaves them pending (retried, and
   claimed by another worker if this one dies). A malformed entry is acked at once and counted `malformed`.

Exactly once per (event, version): the applied identities are written in the same Lua call as the embedding,
so a redelivered entry (a worker killed after its write, before its ack) finds itself applied and is skipped;
a client's retry of the same event (same event_id or item+ts) too.

The behavior feature of an event is the user's stored history at processing time without the clicks of that
event and of the later events of the same user in the same read (they are on top, most recent first): the
history the event saw, as long as no later click of that user arrived before the worker read it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

import numpy as np
import orjson

from model.checkpoint import CheckpointError
from repository import ArtifactError, ModelRepository
from service.redis_layout import TAG_META, TAG_PUBLISHED, RedisLayout
from warmup.model import NotWarmable, WarmEvent, WarmupModel

log = logging.getLogger(__name__)
OUTCOMES = ("applied", "duplicate", "malformed", "unknown_item", "not_cold", "not_warmable", "bad_state", "dead")


@dataclass
class WarmupConfig:
    alpha: float | None = None  # the rule's step; None: the version's own (WarmupModel.rule)
    # model/warm_rule.py: "sgd" (Algorithm 1's α step: the higher held-out AUC on MovieLens-100K, docs/warmup.md)
    # or "adam" (per-user moments in Redis: ahead on the synthetic world)
    rule: str = "sgd"
    steps: int = 1  # gradient steps per event
    users: str = "cold"  # "cold": users whose embedding came from the meta generator; "all": published too
    count: int = 256  # entries per read
    block_ms: int = 1000
    claim_idle_ms: int = 30_000  # a pending entry idle this long is claimed from its consumer
    claim_every_s: float = 5.0
    max_deliveries: int = 5
    routing_poll_s: float = 1.0
    cas_attempts: int = 20
    users_per_pass: int = 64  # users stepped together (one forward/backward per event position) and written


class Metrics:
    """The worker's Prometheus metrics (its own registry: exposed by `--metrics-port`)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.events = Counter("udg_warmup_events", "Stream events by outcome, per version where one applies",
                              ["outcome"], registry=self.registry)
        self.steps = Counter("udg_warmup_steps", "Gradient steps taken", ["model_version"], registry=self.registry)
        self.writes = Counter("udg_warmup_writes", "Embedding writes (compare-and-set)", ["result"],
                              registry=self.registry)
        self.claimed = Counter("udg_warmup_claimed", "Entries claimed from idle consumers", registry=self.registry)
        self.staleness = Histogram("udg_warmup_staleness_seconds", "Event arrival (stream id) to embedding written",
                                   buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                            30, 60), registry=self.registry)
        self.versions = Gauge("udg_warmup_versions", "Versions being warmed", registry=self.registry)
        for outcome in OUTCOMES:
            self.events.labels(outcome)

    def count(self, outcome: str, n: int = 1) -> None:
        if n:
            self.events.labels(outcome).inc(n)


def parse_entry(entry_id: bytes, fields: dict) -> WarmEvent | None:
    """A stream entry -> WarmEvent, or None when it is malformed (missing field, bad flag, bad profile)."""
    try:
        user, item, clicked, identity = (fields[k].decode() for k in (b"u", b"i", b"c", b"id"))
        if not user or not item or clicked not in ("0", "1") or not identity:
            return None
        raw_profile = fields.get(b"p") or b""
        profile = orjson.loads(raw_profile) if raw_profile else None
        if profile is not None and not isinstance(profile, dict):
            return None
        return WarmEvent(entry_id, user, item, clicked == "1", identity,
                         {str(k): str(v) for k, v in profile.items()} if profile else None)
    except (KeyError, UnicodeDecodeError, AttributeError, orjson.JSONDecodeError):
        return None


def arrival_s(entry_id: bytes) -> float:
    return int(entry_id.split(b"-")[0]) / 1000.0


@dataclass
class WritePlan:
    """One user's pending write under one version: from what was read, the events to apply."""

    user_id: str
    expected: bytes | None  # the value read (the compare-and-set's expectation)
    origin: bytes
    steps_before: int
    user_vec: np.ndarray
    udg_vec: np.ndarray
    histories: list[list[str]]
    known: list[WarmEvent]
    unknown: int
    identities: list[str]
    rule_state: np.ndarray | None = None  # the user's stored rule state (None: fresh)
    value: bytes = b""
    rule_value: bytes = b""  # the rule state to store with `value` (b"": none)


class CasConflict(RuntimeError):
    """A user's embedding kept changing between read and compare-and-set."""


class WarmupWorker:
    def __init__(self, client, repo: ModelRepository, layout: RedisLayout | None = None,
                 config: WarmupConfig | None = None, consumer: str | None = None, metrics: Metrics | None = None):
        from service.control import ControlKeys

        self.client = client  # sync redis client
        self.repo = repo
        self.layout = layout or RedisLayout()
        self.config = config or WarmupConfig()
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.metrics = metrics or Metrics()
        self.routing_key = ControlKeys(self.layout.prefix).routing
        self.models: dict[str, WarmupModel] = {}  # the versions warmed now
        self.refused: dict[str, str] = {}  # version -> why it is not warmed
        self._routing_at = 0.0
        self._claimed_at = 0.0
        self._claim_start = "0-0"
        self._group_ready = False
        self._own_done = False  # this consumer's own pending entries read back (after a restart)
        self.processed = 0

    # --- versions ---------------------------------------------------------------------------------------
    def serving_versions(self) -> list[str]:
        raw = self.client.get(self.routing_key)
        if not raw:
            return []
        doc = orjson.loads(raw)
        versions = [doc["active"]] if doc.get("active") else []
        return versions + [v for v in (doc.get("split") or {}) if v not in versions]

    def refresh_versions(self, force: bool = False) -> None:
        """Load the serving versions' models (once each, and again if the publish marker names another
        manifest: the version directory was re-exported); drop the others."""
        if not force and time.monotonic() - self._routing_at < self.config.routing_poll_s:
            return
        versions = self.serving_versions()
        markers = self.client.mget([self.layout.marker(v) for v in versions]) if versions else []
        models = {}
        for version, raw in zip(versions, markers, strict=True):
            marker = self.layout.unpack_marker(raw) or {}
            loaded = self.models.get(version)
            if loaded is not None and marker.get("manifest_sha256") in (None, loaded.manifest_sha256):
                models[version] = loaded
                continue
            try:
                loaded = WarmupModel.load(self.repo, version)
            except (NotWarmable, ArtifactError, CheckpointError, OSError, ValueError) as error:
                # a version it cannot warm: say why once, never warm it with anything else
                if self.refused.get(version) != str(error):
                    log.error("version %s is not warmed: %s", version, error)
                self.refused[version] = str(error)
                continue
            if marker.get("manifest_sha256") not in (None, loaded.manifest_sha256):
                self.refused[version] = "the publish marker names another manifest than the repository's"
                log.error("version %s is not warmed: %s", version, self.refused[version])
                continue
            self.refused.pop(version, None)
            log.info("warming version %s (rule %s, step %.3g, %d step(s) per event, users: %s)", version,
                     self.config.rule, self.rule(loaded).lr, self.config.steps, self.config.users)
            models[version] = loaded
        self.models = models
        self.refused = {v: why for v, why in self.refused.items() if v in versions}
        self.metrics.versions.set(len(models))
        self._routing_at = time.monotonic()

    def rule(self, model: WarmupModel):
        return model.rule(self.config.rule, self.config.alpha)

    # --- the loop ----------------------------------------------------------------------------------------
    def ensure_group(self) -> None:
        if not self._group_ready:
            self.layout.ensure_warmup_group(self.client)
            self._group_ready = True

    def fetch(self) -> list[tuple[bytes, dict]]:
        """This consumer's own pending entries first (a restarted worker of the same name resumes them at
        once), then idle pending entries of others (every `claim_every_s`), else new ones."""
        config = self.config
        if not self._own_done:
            entries = self.layout.read_own_pending(self.client, self.consumer, config.count)
            if entries:
                return self.drop_dead(entries)
            self._own_done = True
        if time.monotonic() - self._claimed_at >= config.claim_every_s:
            start, entries, _ = self.layout.claim_warmup_events(self.client, self.consumer, config.claim_idle_ms,
                                                                config.count, self._claim_start)
            self._claim_start = start
            if start == "0-0":
                self._claimed_at = time.monotonic()
            if entries:
                self.metrics.claimed.inc(len(entries))
                return self.drop_dead(entries)
        return self.layout.read_warmup_events(self.client, self.consumer, config.count, config.block_ms)

    def drop_dead(self, entries: list[tuple[bytes, dict]]) -> list[tuple[bytes, dict]]:
        """Ack and count the claimed entries delivered too often (a poison entry must not loop forever)."""
        deliveries = self.layout.warmup_deliveries(self.client, [e for e, _ in entries])
        dead = [e for e, _ in entries if deliveries.get(e, 0) > self.config.max_deliveries]
        if dead:
            log.error("%d stream entries delivered more than %d times: dropped", len(dead), self.config.max_deliveries)
            self.layout.ack_warmup_events(self.client, dead)
            self.metrics.count("dead", len(dead))
        return [(e, f) for e, f in entries if e not in set(dead)]

    def run_once(self) -> int:
        """One read and its processing -> entries handled. Redis errors propagate (nothing acked)."""
        from redis.exceptions import ResponseError

        self.ensure_group()
        self.refresh_versions()
        if not self.models and not self.refused:  # no routing yet (or Redis restarted empty): keep the events
            time.sleep(min(self.config.block_ms / 1000, self.config.routing_poll_s))
            return 0
        try:
            entries = self.fetch()
        except ResponseError as error:
            if "NOGROUP" in str(error):  # the stream or group vanished (Redis restarted empty): recreate
                self._group_ready = False
                self._own_done = False
                self._claim_start = "0-0"
                return 0
            raise
        if entries:
            self.process(entries)
        return len(entries)

    def process(self, entries: list[tuple[bytes, dict]]) -> None:
        """Apply the entries to every warmed version, then ack them; a user whose write kept conflicting is
        left pending (retried, or claimed by another worker)."""
        events: dict[str, list[WarmEvent]] = {}
        malformed = []
        for entry_id, fields in entries:
            event = parse_entry(entry_id, fields)
            if event is None:
                malformed.append(entry_id)
            else:
                events.setdefault(event.user_id, []).append(event)
        valid = len(entries) - len(malformed)
        self.metrics.count("malformed", len(malformed))
        self.metrics.count("not_warmable", valid * len(self.refused))
        failed: set[str] = set()
        users = list(events)
        for start in range(0, len(users), self.config.users_per_pass):
            chunk = {u: events[u] for u in users[start:start + self.config.users_per_pass]}
            for model in self.models.values():
                failed |= self.apply_users(model, {u: e for u, e in chunk.items() if u not in failed})
        done = list(malformed) + [e.entry_id for u, user_events in events.items() if u not in failed
                                  for e in user_events]
        self.layout.ack_warmup_events(self.client, done)
        self.processed += len(done)

    def apply_users(self, model: WarmupModel, events: dict[str, list[WarmEvent]]) -> set[str]:
        """Every user's events (oldest first) on their embedding under `model.version`: one pipelined read,
        the steps of all users in shared passes (`WarmupModel.step_many`), one pipelined compare-and-set;
        a user whose value changed in between is redone alone (`apply_user`). -> users left pending."""
        layout, version = self.layout, model.version
        users = list(events)
        states = layout.read_warmup_states(self.client, version, users, [[e.identity for e in events[u]]
                                                                          for u in users])
        plans = [plan for plan in (self.plan(model, u, events[u], state) for u, state in zip(users, states,
                                                                                            strict=True)) if plan]
        if not plans:
            return set()
        self.step_plans(model, plans)
        written = layout.write_warmed_many(self.client, version, [(p.user_id, p.expected, p.value, p.identities,
                                                                   p.rule_value) for p in plans])
        failed = set()
        for plan, ok in zip(plans, written, strict=True):
            if ok:
                self.committed(model, plan)
                continue
            self.metrics.writes.labels("conflict").inc()
            try:
                self.apply_user(model, plan.user_id, events[plan.user_id])
            except CasConflict as error:
                log.warning("%s", error)
                failed.add(plan.user_id)
        return failed

    def apply_user(self, model: WarmupModel, user_id: str, events: list[WarmEvent]) -> None:
        """One user's events under `model.version`, compare-and-set, re-read and redone on a conflict."""
        layout = self.layout
        for _ in range(self.config.cas_attempts):
            state = layout.read_warmup_states(self.client, model.version, [user_id],
                                              [[e.identity for e in events]])[0]
            plan = self.plan(model, user_id, events, state)
            if plan is None:
                return
            self.step_plans(model, [plan])
            if layout.write_warmed(self.client, model.version, user_id, plan.expected, plan.value, plan.identities,
                                   rule_state=plan.rule_value):
                self.committed(model, plan)
                return
            self.metrics.writes.labels("conflict").inc()
        raise CasConflict(f"user {user_id!r} under {model.version}: the embedding kept changing "
                          f"({self.config.cas_attempts} compare-and-set conflicts); left pending")

    def plan(self, model: WarmupModel, user_id: str, events: list[WarmEvent], state) -> WritePlan | None:
        """What to learn from the user's not yet applied events, from the state read; None (counted) when
        there is nothing to write."""
        layout, metrics = self.layout, self.metrics
        todo = [e for e, done in zip(events, state.applied, strict=True) if not done]
        duplicates = len(events) - len(todo)
        metrics.count("duplicate", duplicates)
        if not todo:
            return None
        unpacked = layout.unpack_embeddings(state.embeddings, model.user_dim, model.udg_dim)
        if state.embeddings is not None and unpacked is None:
            metrics.count("bad_state", len(todo))  # another version's dims under this name: not touched
            return None
        origin = layout.embedding_origin(state.embeddings) or TAG_META
        if origin == TAG_PUBLISHED and self.config.users != "all":
            metrics.count("not_cold", len(todo))
            return None
        known = [e for e in todo if model.knows_item(e.item_id)]
        if not known:  # nothing to learn from: the state is left as it is
            metrics.count("unknown_item", len(todo))
            return None
        if unpacked is None:  # never scored yet: start from what the service would generate
            profile = next((e.profile for e in reversed(todo) if e.profile), None)
            user_vec, udg_vec = model.generated_state(profile or layout.unpack_profile(state.profile))
        else:
            user_vec, udg_vec = unpacked[0], unpacked[1]
        width = self.rule(model).state_width(model.udg_dim)
        # the moments only go with the value they were computed on (else they restart, as for a new value)
        rule_state = layout.unpack_rule_state(state.rule_state, width, state.embeddings) if width else None
        return WritePlan(user_id, state.embeddings, origin, layout.warmup_steps(state.embeddings), user_vec, udg_vec,
                         self.histories(layout.split_history(state.history, layout.history_cap), todo, known),
                         known, len(todo) - len(known), [e.identity for e in todo], rule_state)

    def step_plans(self, model: WarmupModel, plans: list[WritePlan]) -> None:
        steps, rule = self.config.steps, self.rule(model)
        udgs, states = model.apply_rule(rule, [p.user_vec for p in plans], [p.udg_vec for p in plans],
                                        [p.rule_state for p in plans], [p.histories for p in plans],
                                        [[e.item_id for e in p.known] for p in plans],
                                        [[1.0 if e.clicked else 0.0 for e in p.known] for p in plans], steps)
        stateful = rule.state_width(model.udg_dim) > 0
        for plan, udg, state in zip(plans, udgs, states, strict=True):
            plan.value = self.layout.pack_warmed(plan.user_vec, udg, plan.steps_before + len(plan.known) * steps,
                                                 plan.origin)
            plan.rule_value = self.layout.pack_rule_state(state, plan.value) if stateful else b""

    def committed(self, model: WarmupModel, plan: WritePlan) -> None:
        metrics = self.metrics
        metrics.writes.labels("written").inc()
        metrics.count("applied", len(plan.known))
        metrics.count("unknown_item", plan.unknown)
        metrics.steps.labels(model.version).inc(len(plan.known) * self.config.steps)
        now = time.time()
        for event in plan.known:
            metrics.staleness.observe(max(0.0, now - arrival_s(event.entry_id)))

    @staticmethod
    def histories(stored: list[str], todo: list[WarmEvent], known: list[WarmEvent]) -> list[list[str]]:
        """Per known event, the history it saw: the stored one without the clicks of it and of the later
        events of this read (the top `later clicks` entries)."""
        clicked = np.array([e.clicked for e in todo], np.int64)
        later = np.cumsum(clicked[::-1])[::-1]  # clicks at or after each position
        position = {id(e): i for i, e in enumerate(todo)}
        return [stored[int(later[position[id(e)]]):] for e in known]

    def run(self, stop=lambda: False, idle_exit_s: float | None = None) -> None:
        """Until `stop()`: passes, Redis failures retried with backoff (the worker outlives a Redis restart)."""
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError

        backoff, idle_since = 0.1, time.monotonic()
        while not stop():
            try:
                handled = self.run_once()
                backoff = 0.1
            except (RedisConnectionError, TimeoutError, OSError) as error:
                log.warning("Redis unavailable (%s); retrying in %.1f s", error, backoff)
                self._group_ready = False
                self._own_done = False  # a persistent Redis kept this consumer's unacked entries: resume them
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except RedisError as error:
                log.error("warm-up pass failed (entries left pending): %s", error)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if handled:
                idle_since = time.monotonic()
            elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                return
