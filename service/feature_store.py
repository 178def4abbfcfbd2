"""The service's handle on the feature store: the asyncio Redis client, and `FeatureStore`, which runs the
request path's commands of `service.redis_layout.RedisLayout` (the one owner of keys, codecs and commands)
with the service's rules: every Redis failure is `FeatureStoreUnavailable` (answered 503), every call timed.
"""

from __future__ import annotations

import os
import time

from service.redis_layout import Click, NotReplicated, RedisLayout, UserState, slot_tags


class FeatureStoreUnavailable(RuntimeError):
    """Redis could not be reached, timed out, or refused the command; the caller answers 503."""


def create_redis(url: str, timeout_s: float, pool_size: int, ca_certs: str | None = None):
    """The service's asyncio client for REDIS_URL (one node or a cluster): see `service.redis_client`."""
    from service.redis_client import async_client

    return async_client(url, timeout_s, pool_size, ca_certs)


def raised_in_client(error: BaseException) -> bool:
    """Whether `error` came from inside redis-py (a frame of the `redis` package on its traceback). When a cluster
    node dies, redis-py closes that node's connections while other requests are still writing on them, and the
    write fails with an AttributeError (its writer already None) or the event loop's RuntimeError ("unable to
    perform operation on <TCPTransport closed=True>"), not a RedisError: the same outage, answered 503 (the
    failover test saw both as 500s). A bug in this project's own code has no such frame and stays a 500."""
    traceback = error.__traceback__
    while traceback is not None:
        if f"{os.sep}redis{os.sep}" in traceback.tb_frame.f_code.co_filename:
            return True
        traceback = traceback.tb_next
    return False


class FeatureStore:
    """Async access to per-user state through `layout`. Every failure of Redis surfaces as
    `FeatureStoreUnavailable`; `observe(op, seconds)` sees the duration of every call."""

    def __init__(self, redis, layout: RedisLayout | None = None, observe=None, reader=None):
        from redis.exceptions import RedisError

        self.redis = redis
        # the score path's MGET: a service.redis_pipeline.PipelinedReader (one node), else redis-py's client
        self.reader = reader or redis
        self.layout = layout or RedisLayout()
        from redis.exceptions import RedisClusterException

        # RedisClusterException: e.g. no node known for a slot in the middle of a failover
        self._errors = (RedisError, RedisClusterException, OSError, TimeoutError, NotReplicated)
        slot_tags()  # the per-slot sentinel names, computed once per process here rather than on a request
        self._observe = observe or (lambda op, seconds: None)
        # The data epoch this worker serves under (set by service.control): every fetch reads it in the same
        # MGET, and a fetch that sees another one calls `on_epoch_mismatch` before anything is scored.
        self.expected_epoch: bytes | None = None
        self.on_epoch_mismatch = None
        self.state_lost = lambda: None  # -> why the state is lost, or None (service.control sets it)
        self.cache = None  # service.state_cache.StateCache when UDG_STATE_CACHE is on (one node only)

    async def _run(self, op: str, awaitable):
        started = time.perf_counter()
        try:
            return await awaitable
        except Exception as error:
            if not isinstance(error, self._errors) and not raised_in_client(error):
                raise
            raise FeatureStoreUnavailable(f"Redis {op} failed: {type(error).__name__}: {error}") from error
        finally:
            self._observe(op, time.perf_counter() - started)

    def cached(self, version: str, user_id: str) -> UserState | None:
        """The user's state from the worker's state cache (no round trip), or None: call `fetch`."""
        cache = self.cache
        if cache is None:
            return None
        expected = self.expected_epoch
        state = cache.lookup(version, user_id, expected is not None)
        if state is not None:
            self._cache_counts["hit"].inc()
            self._check_epoch(expected, state)
        else:
            self._cache_counts["miss" if cache.active else "off"].inc()
        return state

    def use_cache(self, cache) -> None:
        """Serve repeated users from `cache` (a service.state_cache.StateCache); counted per lookup."""
        from service import metrics

        self.cache = cache
        self._cache_counts = {outcome: metrics.STATE_CACHE_LOOKUPS.labels(outcome)
                              for outcome in ("hit", "miss", "off")}

    async def fetch(self, version: str, user_id: str) -> UserState:
        """Embeddings under `version`, history and profile: ONE command (MGET), one round trip. If the data
        epoch in the same reply is not the expected one, `on_epoch_mismatch(seen)` runs first (state lost)."""
        expected = self.expected_epoch
        cache = self.cache
        token = cache.begin() if cache is not None else None
        state = await self._run("fetch", self.layout.fetch(self.reader, version, user_id, expected is not None))
        if token is not None:
            cache.store(version, user_id, expected is not None, state, token)
        self._check_epoch(expected, state)
        return state

    def _check_epoch(self, expected: bytes | None, state: UserState) -> None:
        if expected is not None and state.epoch != expected and self.on_epoch_mismatch is not None:
            self.on_epoch_mismatch(state.epoch)

    def _wrote(self, user_ids) -> None:
        """This worker changed these users' keys: drop them from the state cache now (the invalidation message
        follows; a read in flight is not stored). Called whatever the outcome: a timed-out write may have run."""
        if self.cache is not None:
            for user_id in user_ids:
                self.cache.invalidate_user(user_id)

    async def store_generated(self, version: str, user_id: str, packed: bytes, profile: dict | None) -> bool:
        """Write back a cold-start state (never replacing a published or concurrently written one), with the
        generated TTL; False when this window's cap on new generated users is reached (not written)."""
        try:
            return await self._run("write_back",
                                   self.layout.write_generated(self.redis, version, user_id, packed, profile))
        finally:
            self._wrote((user_id,))

    async def refresh_generated(self, version: str, user_id: str) -> None:
        try:
            await self._run("refresh", self.layout.refresh_generated(self.redis, version, user_id))
        finally:
            self._wrote((user_id,))

    async def state(self, versions: list[str]) -> tuple[bytes | None, list[dict | None]]:
        """The data epoch and the publish markers of `versions` (one MGET)."""
        return await self._run("state", self.layout.read_state(self.redis, versions))

    async def sentinels(self) -> dict[int, bytes | None]:
        """The epoch sentinels of one hash slot per node (what a wipe of one cluster node loses)."""
        layout = self.layout
        return await self._run("sentinels", layout.read_sentinels(self.redis, layout.sentinel_sample(self.redis)))

    async def append_clicks(self, batches: dict[str, tuple[list[Click], dict | None]]) -> dict[str, list[int]]:
        """Per user: clicks oldest first (+ a profile to set if absent) -> per click 1 appended / 0 duplicate,
        in one round trip. Raises FeatureStoreUnavailable when nothing can be promised to have been stored."""
        try:
            return await self._run("append", self.layout.append_clicks(self.redis, batches))
        finally:
            self._wrote(batches)

    async def append_events(self, batches: dict[str, tuple[list[Click], dict | None]],
                            entries: list[dict]) -> dict[str, list[int]]:
        """`append_clicks` plus the events into the warm-up stream, in one transaction (one round trip)."""
        try:
            return await self._run("append", self.layout.append_events(self.redis, batches, entries))
        finally:
            self._wrote(batches)

    async def item_generations(self, versions: list[str]) -> list[int]:
        return await self._run("item_generations", self.layout.read_item_generations(self.redis, versions))

    async def items(self, version: str, width: int) -> dict:
        return await self._run("items", self.layout.read_items(self.redis, version, width))

    async def marker(self, version: str) -> dict | None:
        return await self._run("marker", self.layout.read_marker(self.redis, version))

    async def ping(self) -> bool:
        return bool(await self._run("ping", self.redis.ping()))

    async def close(self) -> None:
        if self.reader is not self.redis:
            await self.reader.aclose()
        await self.redis.aclose()
