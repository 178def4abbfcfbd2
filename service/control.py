"""Workers agree through Redis: the routing document, change notifications, worker heartbeats, and `udg gc`.

Keys (prefix `udg` by default; `{ctl}` is the hash tag that keeps every control key, the data epoch and the
publish markers in ONE slot of a Redis Cluster, so each read below is one command on one node):

    udg:{ctl}:routing        STRING  the routing document (JSON), the one source of truth of every worker:
                                     {generation, active, split: {version: percent} | null, loaded: [...],
                                      history: [{active, split}, ...] (for rollback), updated_at, action}
    udg:{ctl}:changed        CHANNEL  a message (the new generation) after every change (a classic PUBLISH:
                                     on a cluster it reaches subscribers on every node)
    udg:{ctl}:worker:<id>    STRING  heartbeat of one worker (JSON: applied generation and when, versions ready
                                     and failed, what it serves), with a TTL: `udg gc` keeps what any live
                                     worker holds; admin calls wait on these to report propagation

A change is a compare-and-set (Lua: the document is replaced only if unchanged since it was read; retried
otherwise) that also publishes on the channel. Every worker subscribes and re-reads the document on each
message, and polls it every `UDG_CONTROL_POLL_S` (1 s) as the safety net for a lost message or a dropped
subscription; then it applies the document (`ModelRegistry.apply`) and writes its heartbeat.

`udg gc` decides here which versions no one holds; what a version's data is in Redis, and deleting it, is
`service.redis_layout.RedisLayout`'s.

**The routing survives a wipe.** Every worker writes each generation of the document it applies to the
routing file (`UDG_ROUTING_FILE`, default MODEL_REPO/routing.json; atomically: temp file, fsync, rename).
A worker that finds no document in Redis RESTORES it (SET NX) — from the document it last applied (memory),
else from the routing file, whichever has the higher generation — and bootstraps from `UDG_MODEL_VERSION`
(default: the newest version of the repository) only when neither exists: the first start of a deployment.
So an admin-activated v2 stays active after Redis restarts empty; it is not silently replaced by v1.

**Lost state is detected, reported, and not served.** The data epoch `udg:{ctl}:epoch` is created by the first
`udg publish` into a Redis without one (or, for a deployment published before epochs existed, by a worker
that finds its serving versions' markers and no epoch). Every poll (`UDG_CONTROL_POLL_S`, and at once after
a reconnect) each worker reads, in ONE MGET, the epoch and the publish markers of the versions it serves.
The epoch it saw first and the one now differ, or it vanished: Redis lost the published state (restarted
without persistence, flushed, failed over to an empty replica). Why the epoch and not the markers alone: a
marker legitimately disappears during every republish (publish clears it first), the epoch only with the
data. Then, until every serving version has a publish marker of the current epoch matching the loaded
artifact (i.e. it was republished): `/readyz` is 503 with the reason, `udg_state_lost` is 1 (and
`udg_state_losses` counted), ONE error line is logged (and one when it recovers), score requests get 503
`state_lost` instead of cold-start scores for users whose state is gone, and the routing is not
re-bootstrapped. Events are still accepted (the republish merges them under the snapshot, service/publish.py).
It recovers by itself, without a restart, on the first poll after the republish.

**A cluster loses state one node at a time.** A wiped primary of a Redis Cluster loses only its own slots'
keys, and the epoch (in the control slot) may well survive it. So every hash slot holds a sentinel copy of
the epoch (`udg:epoch:{<tag>}`, written by `udg publish`): a score request reads its user's slot's sentinel
in its one MGET, and every poll reads the sentinel of one slot per primary (`RedisLayout.sentinel_sample`).
A sentinel missing or different is a loss like the epoch's, reported the same way; the republish renews the
epoch and rewrites every sentinel, and recovery also waits for the sampled sentinels to match.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
import os
import socket
import time
import uuid
from pathlib import Path

import orjson

from service import metrics
from service.feature_store import FeatureStoreUnavailable, raised_in_client
from service.redis_layout import RedisLayout
from service.registry import ModelRegistry, VersionRefused

log = logging.getLogger(__name__)
HISTORY_KEEP = 20

# KEYS[1] the document. ARGV: expected current value ("" = absent), new value, channel, message.
CAS = """
local current = redis.call('GET', KEYS[1])
if (current or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""


class ControlKeys:
    def __init__(self, prefix: str = "udg"):
        self.prefix = prefix
        self._layout = RedisLayout(prefix)
        self.routing = self._layout.control("routing")
        self.channel = self._layout.control("changed")

    def worker(self, worker_id: str) -> str:
        return self._layout.control(f"worker:{worker_id}")

    @property
    def workers_index(self) -> str:
        """ZSET of heartbeat keys scored by their expiry (ms): listing the workers is one ZRANGEBYSCORE in the
        control slot, not a SCAN over a node's whole keyspace (which holds every user's keys)."""
        return self._layout.control("workers")


    def queue_heartbeat(self, pipe, worker_id: str, body: bytes, ttl_ms: int, now_ms: int) -> None:
        """Queue a heartbeat on a pipeline (async or sync): the worker's key with its TTL, its entry in the
        index, and the index pruned of workers gone for a TTL. All in the control slot: one node."""
        key = self.worker(worker_id)
        pipe.set(key, body, px=ttl_ms)
        pipe.zadd(self.workers_index, {key: now_ms + ttl_ms})
        pipe.zremrangebyscore(self.workers_index, "-inf", now_ms - ttl_ms)


def live_worker_keys(client, keys: ControlKeys, now_ms: int):
    """(async or sync client) The heartbeat keys whose expiry has not passed, from the workers index."""
    return client.zrangebyscore(keys.workers_index, now_ms, "+inf")


class Conflict(RuntimeError):
    """An admin request that contradicts the routing (e.g. unloading the active version): 409."""


def new_document(active: str) -> dict:
    return {"generation": 1, "active": active, "split": None, "loaded": [active], "history": [],
            "updated_at": time.time(), "action": f"bootstrap {active}"}


class Control:
    """One per worker: follows the routing document, writes the heartbeat, performs admin changes."""

    def __init__(self, settings, registry: ModelRegistry, redis):
        self.settings = settings
        self.registry = registry
        self.redis = redis  # the service's asyncio client (short timeouts)
        self.keys = ControlKeys(settings.key_prefix)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stopping = False  # set by stop(): the follower's loops end
        self._listener = None  # the follower's pub/sub connection (dropped by stop() if a read hangs)
        self._cas = redis.register_script(CAS)
        self._last_heartbeat = 0.0
        self.applied_at = 0.0
        self.listening = False
        self.follow_error: str | None = None
        self.routing_path = Path(settings.routing_path)
        self.routing_file_error: str | None = None
        self._saved_generation: int | None = None
        self.epoch: str | None = None  # the data epoch this worker has seen (None: none seen yet)
        self.lost_at: float | None = None  # wall time the current loss was detected
        registry.store.on_epoch_mismatch = self._epoch_mismatch
        registry.store.state_lost = lambda: registry.state_lost

    # --- the document -----------------------------------------------------------------------------------
    async def _call(self, what: str, awaitable):
        """A Redis call; failures surface as FeatureStoreUnavailable (503 on the admin API)."""
        from redis.exceptions import RedisError

        try:
            return await awaitable
        except Exception as error:
            if not isinstance(error, (RedisError, OSError, TimeoutError)) and not raised_in_client(error):
                raise
            raise FeatureStoreUnavailable(f"Redis {what} failed: {type(error).__name__}: {error}") from error

    async def read_raw(self) -> bytes | None:
        return await self._call("GET routing", self.redis.get(self.keys.routing))

    async def read(self) -> dict | None:
        raw = await self.read_raw()
        return orjson.loads(raw) if raw else None

    async def update(self, mutate, action: str) -> dict:
        """Compare-and-set the document: `mutate(doc)` edits a copy (raising Conflict to refuse)."""
        for _ in range(50):
            raw = await self.read_raw()
            doc = orjson.loads(raw) if raw else None
            if doc is None:
                raise Conflict("no routing document in Redis yet (no worker has activated a version)")
            mutate(doc)
            doc["generation"] = int(doc["generation"]) + 1
            doc["updated_at"] = time.time()
            doc["action"] = action
            doc["by"] = self.worker_id
            new = orjson.dumps(doc)
            if await self._call("routing CAS", self._cas(keys=[self.keys.routing], args=[
                    raw or b"", new, self.keys.channel, str(doc["generation"])])):
                log.info("routing generation %d: %s", doc["generation"], action)
                return doc
            await asyncio.sleep(0.005)
        raise Conflict("the routing document kept changing; try again")

    # --- following ----------------------------------------------------------------------------------------
    def load_routing_file(self) -> dict | None:
        try:
            doc = orjson.loads(self.routing_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as error:
            log.error("routing file %s unreadable (%s): not used", self.routing_path, error)
            return None
        return doc if isinstance(doc, dict) and doc.get("active") else None

    def save_routing_file(self, doc: dict) -> None:
        """The document as the routing file, atomically (temp file in the same directory, fsync, rename)."""
        if self._saved_generation == doc.get("generation"):
            return
        tmp = self.routing_path.with_name(f".{self.routing_path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as out:
                out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.routing_path)
        except OSError as error:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if self.routing_file_error is None:
                log.error("routing file %s not written (%s): a Redis wipe could not restore this routing",
                          self.routing_path, error)
            self.routing_file_error = f"{type(error).__name__}: {error}"
            return
        self._saved_generation = doc.get("generation")
        self.routing_file_error = None

    async def bootstrap(self) -> None:
        """No document in Redis: restore the last one (memory or routing file), else — the first start of a
        deployment — activate the configured (or newest) version here and create the document."""
        known = [d for d in (self.registry.wanted, self.load_routing_file()) if d]
        if known:
            doc = dict(max(known, key=lambda d: int(d.get("generation", 0))))
            source = "this worker's memory" if doc == self.registry.wanted else f"the routing file {self.routing_path}"
            doc["restored"] = {"from": source, "at": time.time(), "by": self.worker_id}
            if await self._call("SET routing", self.redis.set(self.keys.routing, orjson.dumps(doc), nx=True)):
                log.warning("no routing document in Redis: restored generation %s (active %s, split %s) from %s",
                            doc.get("generation"), doc.get("active"), doc.get("split"), source)
            await self.sync()
            return
        version = self.settings.model_version
        if version is None:
            version = self.registry.repository.newest()
            if version is None:
                self.registry.last_error = f"no model versions in {self.registry.repo}"
                return
        try:
            await self.registry.ensure_loaded(version)
        except VersionRefused as error:
            self.registry.last_error = str(error)
            return
        await self.redis.set(self.keys.routing, orjson.dumps(new_document(version)), nx=True)
        await self.sync()

    async def sync(self) -> None:
        """Read the document; apply it if it changed (or a failed version is due for a retry); heartbeat;
        check the data epoch (state loss)."""
        doc = await self.read()
        if doc is None:
            await self.bootstrap()
            return
        registry = self.registry
        wanted = registry.wanted
        if wanted is None or wanted.get("generation") != doc.get("generation") or not registry.in_sync:
            await registry.apply(doc)
            self.applied_at = time.time()
            self.save_routing_file(doc)
            await self.check_state()
            await self.heartbeat()
        else:
            await self.check_state()
            if time.monotonic() - self._last_heartbeat > self.settings.heartbeat_s:
                await self.heartbeat()
        await registry.refresh_items()  # one MGET per sync: reload item tables that `udg publish-items` changed

    def _adopt(self, epoch: str | None) -> None:
        self.epoch = epoch
        self.registry.store.expected_epoch = epoch.encode() if epoch else None

    def _mark_lost(self, why: str) -> None:
        registry = self.registry
        if registry.state_lost is not None:
            return
        versions = sorted(m.version for m in registry.serving_models())
        registry.state_lost = (f"Redis lost the published state: {why} (restarted without persistence, flushed, "
                               f"or failed over to an empty replica); republish the serving version(s) "
                               f"{versions} with `udg publish`")
        self.lost_at = time.time()
        metrics.STATE_LOST.set(1)
        metrics.STATE_LOSSES.inc()
        log.error("STATE LOST: %s; score requests are refused (503 state_lost) until then", registry.state_lost)

    def _epoch_mismatch(self, seen: bytes | None) -> None:
        """A score request's MGET saw another epoch (or none) in its user's hash slot: mark the loss at once,
        before it is scored."""
        self._mark_lost("the data epoch's copy in a user's hash slot vanished" if seen is None else
                        f"the data epoch changed ({self.epoch} -> {seen.decode(errors='replace')})")

    async def check_state(self) -> None:
        """Detect a loss of the published state (the epoch changed or vanished) and the recovery from it
        (every serving version republished in the current epoch); see the module docstring."""
        registry = self.registry
        models = {m.version: m for m in registry.serving_models()}
        raw, markers = await registry.store.state(sorted(models))
        epoch = raw.decode() if raw else None
        # Sentinels of the epoch in one hash slot per node that differ from it: that node lost its keys.
        stale = sorted(s for s, v in (await registry.store.sentinels()).items() if v != raw) if raw else []
        if self.epoch is None and registry.state_lost is None:
            if epoch is None and models and all(markers):  # published before epochs existed: start one now
                value = f"{uuid.uuid4().hex[:12]}@{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by " \
                        f"worker {self.worker_id} (markers present, no epoch)"
                await self.redis.set(registry.store.layout.epoch, value, nx=True)
                epoch = (await self.redis.get(registry.store.layout.epoch) or b"").decode() or None
            self._adopt(epoch)
            return
        if registry.state_lost is None and epoch != self.epoch:
            self._mark_lost("the data epoch vanished" if epoch is None else
                            f"the data epoch changed ({self.epoch} -> {epoch})")
        if registry.state_lost is None and stale and models:
            self._mark_lost(f"the data epoch's copy in hash slot(s) {stale} vanished (the node holding them lost "
                            "its keys)")
        if registry.state_lost is not None and epoch is not None and not stale and all(
                marker is not None and marker.get("epoch") == epoch and
                marker.get("manifest_sha256") == models[version].manifest_sha256
                for version, marker in zip(sorted(models), markers, strict=True)):
            log.warning("state restored: %s republished in epoch %s, %.1f s after the loss was detected; serving "
                        "again", sorted(models), epoch, time.time() - (self.lost_at or time.time()))
            self._adopt(epoch)
            registry.state_lost, self.lost_at = None, None
            metrics.STATE_LOST.set(0)

    async def follow(self) -> None:
        """The follower task: subscribe, sync on every message and every poll period, reconnect on errors.
        Ends when `stop()` is called (it does not rely on cancellation alone: redis-py's pub/sub read can
        swallow a CancelledError that lands inside it, which would leave shutdown waiting forever)."""
        from service.redis_client import listener as pubsub_client

        settings = self.settings
        attempt = 0
        while not self._stopping:
            # On a cluster: one node's connection (a PUBLISH reaches every node); the next node after a failure.
            listener = pubsub_client(settings.redis_url, settings.redis_timeout_s, settings.redis_ca_certs,
                                     main=self.redis, attempt=attempt)
            pubsub = listener.pubsub(ignore_subscribe_messages=True)
            self._listener = listener
            try:
                if settings.control_pubsub:
                    await pubsub.subscribe(self.keys.channel)
                    self.listening = True
                while not self._stopping:
                    await self.sync()
                    self.follow_error = None
                    wait = settings.control_poll_s if self.registry.active else settings.activation_retry_s
                    if settings.control_pubsub:
                        await pubsub.get_message(timeout=wait)
                    else:
                        await asyncio.sleep(wait)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Redis down or flaky: keep serving what we have, retry
                if self._stopping:
                    break
                self.follow_error = f"{type(error).__name__}: {error}"
                if self.registry.active is None:
                    self.registry.last_error = self.follow_error
                log.debug("routing follower: %s", self.follow_error)
                attempt += 1
                await asyncio.sleep(settings.activation_retry_s)
            finally:
                self.listening = False
                self._listener = None
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(pubsub.aclose(), timeout=1.0)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(listener.aclose(), timeout=1.0)

    async def stop(self, follower: asyncio.Task, timeout_s: float = 2.0) -> None:
        """End the follower task: flag, cancel, and — if a Redis read swallowed the cancel — drop its
        connection so that the read fails and the flag is seen. Bounded: shutdown never waits on Redis."""
        self._stopping = True
        follower.cancel()
        done, _ = await asyncio.wait({follower}, timeout=timeout_s)
        if not done:
            log.warning("routing follower did not stop within %.0f s; closing its Redis connection", timeout_s)
            listener = getattr(self, "_listener", None)
            if listener is not None:
                with contextlib.suppress(Exception):
                    await listener.connection_pool.disconnect()
            follower.cancel()
            await asyncio.wait({follower}, timeout=timeout_s)

    # --- heartbeats ---------------------------------------------------------------------------------------
    def heartbeat_body(self) -> dict:
        registry = self.registry
        routing = registry.routing
        return {"worker": self.worker_id, "pid": os.getpid(), "host": socket.gethostname(),
                "generation": routing.generation, "applied_at": self.applied_at,
                "active": routing.active.version if routing.active else None, "split": routing.split,
                "ready": sorted(registry.models), "failed": {v: f.reason for v, f in registry.failed.items()},
                "in_sync": registry.in_sync, "problems": registry.sync_problems, "at": time.time(),
                "state_lost": registry.state_lost, "epoch": self.epoch, "routing_file_error": self.routing_file_error}

    async def heartbeat(self) -> None:
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        pipe = self.redis.pipeline(transaction=False)  # one round trip
        self.keys.queue_heartbeat(pipe, self.worker_id, orjson.dumps(self.heartbeat_body()), ttl_ms,
                                  int(time.time() * 1000))
        await pipe.execute()
        self._last_heartbeat = time.monotonic()

    async def forget(self) -> None:
        with contextlib.suppress(Exception):
            await self.redis.delete(self.keys.worker(self.worker_id))
            await self.redis.zrem(self.keys.workers_index, self.keys.worker(self.worker_id))

    async def workers(self) -> list[dict]:
        keys = await self._call("ZRANGEBYSCORE workers", live_worker_keys(self.redis, self.keys,
                                                                          int(time.time() * 1000)))
        values = await self._call("MGET workers", self.redis.mget(keys)) if keys else []
        return sorted((orjson.loads(v) for v in values if v), key=lambda w: w["worker"])

    async def wait_applied(self, doc: dict, timeout_s: float, check=None) -> dict:
        """Wait until every live worker's heartbeat reports `doc`'s generation (and `check(worker)` holds);
        -> {workers, applied, complete, propagation_s (last worker's apply time - the change's time)}."""
        generation = doc["generation"]
        deadline = time.monotonic() + timeout_s
        while True:
            workers = await self.workers()
            done = [w for w in workers if w["generation"] >= generation and (check is None or check(w))]
            if len(done) == len(workers) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        applied = [w["applied_at"] for w in done if w["generation"] == generation]
        problems = {w["worker"]: w["problems"] for w in workers if w.get("problems")}
        return {"workers": len(workers), "applied": len(done), "complete": len(done) == len(workers),
                "propagation_s": round(max(applied) - doc["updated_at"], 4) if applied else None,
                "problems": problems}


# --- udg gc (sync client) ----------------------------------------------------------------------------------
def _published_age_s(marker: dict) -> float | None:
    try:
        return time.time() - calendar.timegm(time.strptime(marker["published_at"], "%Y-%m-%dT%H:%M:%SZ"))
    except (KeyError, TypeError, ValueError):
        return None


def garbage_collect(client, prefix: str = "udg", dry_run: bool = False, min_age_s: float = 300.0,
                    force: bool = False, batch: int = 1000) -> dict:
    """Delete the Redis namespaces (and publish markers) of versions that no live worker holds and the routing
    document does not name (active, split arms, wanted loaded). Versions published less than `min_age_s` ago
    are kept (a publish that has not been loaded yet). -> {kept, removed, keys_deleted, dry_run}."""
    keys, layout = ControlKeys(prefix), RedisLayout(prefix)
    raw = client.get(keys.routing)
    if raw is None and not force:
        raise Conflict("no routing document in Redis: the active version is unknown, nothing removed "
                       "(start the service first, or pass --force)")
    doc = orjson.loads(raw) if raw else {}
    protected: dict[str, str] = {}
    if doc.get("active"):
        protected[doc["active"]] = "active"
    for version in doc.get("split") or {}:
        protected.setdefault(version, "split arm")
    for version in doc.get("loaded") or []:
        protected.setdefault(version, "loaded (routing document)")
    for key in live_worker_keys(client, keys, int(time.time() * 1000)):
        value = client.get(key)
        if value:
            worker = orjson.loads(value)
            for version in [*worker.get("ready", []), *([worker["active"]] if worker.get("active") else [])]:
                protected.setdefault(version, f"loaded by worker {worker['worker']}")
    kept, removed, deleted = {}, [], 0
    for version, marker in sorted(layout.stored_versions(client).items()):
        if version in protected:
            kept[version] = protected[version]
            continue
        since = _published_age_s(marker) if marker else None
        if since is not None and since < min_age_s:
            kept[version] = f"published {since:.0f} s ago (< {min_age_s:.0f} s)"
            continue
        removed.append(version)
        if not dry_run:
            deleted += layout.delete_version(client, version, batch)
    return {"kept": kept, "removed": removed, "keys_deleted": deleted, "dry_run": dry_run}
