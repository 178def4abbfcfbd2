"""The feature store's layout in Redis, owned by one class: `RedisLayout` names every key, encodes and decodes
every value, holds the scripts, and issues every command that touches per-user or per-version data — the
request path's reads and writes (asyncio client) and the bulk writes and deletes of `udg publish` / `udg gc`
(sync client). Nothing else builds these keys or packs these values. (The control plane's keys — routing
document, heartbeats — are `service.control.ControlKeys`.)

Key layout (prefix `udg` by default; `{uid}` is a Redis Cluster hash tag, so all of a user's keys share a
slot and one MGET / one Lua call can touch them all):

    udg:e:<version>:{<uid>}   STRING  per version: float32 little-endian [user_vec | udg_vec] + 1 source byte
                                      (b"P" published from training, b"M" made by the meta generator)
    udg:h:{<uid>}             STRING  click history, raw item ids, most recent first, joined by \\x1f,
                                      at most `history_cap` entries (version independent)
    udg:p:{<uid>}             STRING  profile, compact JSON {field: raw value} (version independent)
    udg:d:{<uid>}             ZSET    recent event identities "item\\x1fts" (score ts): retry deduplication
    udg:published:<version>   STRING  completion marker of `udg publish` (JSON: users, manifest sha256, …)
    udg:i:<version>:items     HASH    the version's item table for items it was not trained on: item id ->
                                      int32 little-endian token indices of every item field, concatenated
                                      (written by `udg publish` from items.npz and by `udg publish-items`)
    udg:i:<version>:generation STRING a counter bumped by every write of the item table: workers reload it

Why this split. Embeddings live in different spaces per model version, so they are namespaced by version
and two versions coexist during a swap or an A/B split. The click history and the profile are facts about
the user, not about a model: they are kept once, as raw ids, so a click event is written once whatever the
number of live versions, and a new version starts from the user's current history rather than from its
training snapshot. Each version maps raw ids to its own vocabulary when it scores (unknown ids -> OOV row).
A version's namespace is every key of a kind in `VERSIONED_KINDS` (`e`, `i`), and `udg gc` removes it whole.
The item table is one hash per version rather than a key per item: the service reads it whole (HSCAN) when it
loads the version and again when its generation changes, never on the request path, where a candidate's
fields come from memory.

Why strings rather than a list and a hash. The request path then reads everything with ONE `MGET` of three
keys (one command, one round trip: ~35 us with hiredis, against ~60 us for a three-command pipeline, measured
on this machine with redis-py). Appending a click is a read-modify-write, done atomically server-side by a
Lua script (`APPEND_CLICKS`) that also bounds the history and drops retried deliveries.

History semantics follow `dataset.ingest`: every click, most recent first, repeats of an item kept (training
does not deduplicate either); what is deduplicated is a *delivery*: an event carrying `ts` is stored once per
(item, ts), so a client retrying after a 503 cannot double-count a click. Events without `ts` are taken as
new clicks at arrival time.

Bulk writes are pipelined: one round trip per chunk of users, as two commands (an MSET of the embeddings and
one Lua call that does SET NX per shared key), which keeps the client's per-command cost out of the way (3
commands per user through redis-py ran at ~8k users/s here, client-bound). These multi-key commands assume one
Redis node (on a Cluster, keys would have to be grouped by slot first); the per-user ones are cluster-safe.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import orjson

SEP = "\x1f"
SEP_BYTES = SEP.encode()
TAG_PUBLISHED, TAG_META = b"P", b"M"
DEDUP_KEEP = 256  # event identities remembered per user
DEDUP_TTL_S = 7 * 24 * 3600
VERSIONED_KINDS = ("e", "i")  # key kinds namespaced by model version: what `delete_version` removes
_EMPTY_PROFILE = b"{}"

# Atomic append of clicks to one user's history (+ retry deduplication, + optional profile).
# KEYS: history, dedup, profile. ARGV: cap, dedup_keep, dedup_ttl_s, profile_json_or_empty, then pairs
# (item, ts_or_empty) oldest first. Returns one flag per pair: 1 appended, 0 duplicate delivery.
APPEND_CLICKS = r"""
local sep = "\31"
local cap = tonumber(ARGV[1])
local flags, added, dedup_used = {}, {}, false
for i = 5, #ARGV, 2 do
  local item, ts = ARGV[i], ARGV[i + 1]
  local fresh = 1
  if ts ~= "" then
    fresh = redis.call("ZADD", KEYS[2], "NX", ts, item .. sep .. ts)
    dedup_used = true
  end
  if fresh == 1 then added[#added + 1] = item end
  flags[#flags + 1] = fresh
end
if #added > 0 then
  local parts = {}
  for j = #added, 1, -1 do parts[#parts + 1] = added[j] end
  local value = table.concat(parts, sep)
  local old = redis.call("GET", KEYS[1])
  if old and #old > 0 then value = value .. sep .. old end
  local pos, count = 0, 0
  while true do
    local s = string.find(value, sep, pos + 1, true)
    if not s then break end
    count = count + 1
    if count >= cap then value = string.sub(value, 1, s - 1) break end
    pos = s
  end
  redis.call("SET", KEYS[1], value)
end
if dedup_used then
  redis.call("ZREMRANGEBYRANK", KEYS[2], 0, -(tonumber(ARGV[2]) + 1))
  redis.call("EXPIRE", KEYS[2], tonumber(ARGV[3]))
end
if ARGV[4] ~= "" then redis.call("SET", KEYS[3], ARGV[4], "NX") end
return flags
"""
_APPEND_CLICKS_SHA = hashlib.sha1(APPEND_CLICKS.encode()).hexdigest()  # what EVALSHA names it by

# SET NX for many keys in one command (MSETNX is all-or-nothing, this is per key).
SET_NX_ALL = "for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i], 'NX') end return #KEYS"


@dataclass
class UserState:
    """What one MGET returns for a user under one version (raw; decoding needs the version's dims)."""

    embeddings: bytes | None
    history: bytes | None
    profile: bytes | None


@dataclass
class Click:
    item_id: str
    ts: int | None = None


class RedisLayout:
    """Keys, codecs and commands of the feature store under one prefix. Holds no client: request-path methods
    take the service's asyncio client, bulk methods a sync one, so both sides share one byte format."""

    def __init__(self, prefix: str = "udg", history_cap: int = 200):
        self.prefix = prefix
        self.history_cap = history_cap  # clicks kept per user by `append_clicks`

    def __repr__(self) -> str:
        return f"RedisLayout(prefix={self.prefix!r}, history_cap={self.history_cap})"

    # --- keys ---------------------------------------------------------------------------------------------
    def embeddings(self, version: str, user_id: str) -> str:
        return f"{self.prefix}:e:{version}:{{{user_id}}}"

    def history(self, user_id: str) -> str:
        return f"{self.prefix}:h:{{{user_id}}}"

    def profile(self, user_id: str) -> str:
        return f"{self.prefix}:p:{{{user_id}}}"

    def dedup(self, user_id: str) -> str:
        return f"{self.prefix}:d:{{{user_id}}}"

    def marker(self, version: str) -> str:
        return f"{self.prefix}:published:{version}"

    def item_table(self, version: str) -> str:
        return f"{self.prefix}:i:{version}:items"

    def item_generation(self, version: str) -> str:
        return f"{self.prefix}:i:{version}:generation"

    def embeddings_pattern(self, version: str) -> str:
        """SCAN pattern of a version's embeddings (version names hold no ':' or glob characters)."""
        return f"{self.prefix}:e:{version}:*"

    def version_patterns(self, version: str) -> tuple[str, ...]:
        """SCAN patterns of every key in a version's namespace (the marker aside)."""
        return tuple(f"{self.prefix}:{kind}:{version}:*" for kind in VERSIONED_KINDS)

    # --- codecs -------------------------------------------------------------------------------------------
    @staticmethod
    def pack_embeddings(user_vec: np.ndarray, udg_vec: np.ndarray | None, tag: bytes = TAG_PUBLISHED) -> bytes:
        parts = [np.ascontiguousarray(user_vec, dtype="<f4").reshape(-1)]
        if udg_vec is not None and udg_vec.size:
            parts.append(np.ascontiguousarray(udg_vec, dtype="<f4").reshape(-1))
        return np.concatenate(parts).tobytes() + tag

    @staticmethod
    def pack_embedding_rows(user_vec: np.ndarray, udg_vec: np.ndarray, tag: bytes = TAG_PUBLISHED) -> np.ndarray:
        """[U, user_dim], [U, udg_dim] -> uint8 [U, 4 * (user_dim + udg_dim) + 1], one packed value per row
        (byte-identical to `pack_embeddings` of each row, without a Python call per user)."""
        vectors = np.concatenate([np.asarray(user_vec, "<f4"),
                                  np.asarray(udg_vec, "<f4").reshape(len(user_vec), -1)], axis=1)
        rows = np.empty((len(vectors), vectors.shape[1] * 4 + 1), np.uint8)
        rows[:, :-1] = np.ascontiguousarray(vectors).view(np.uint8)
        rows[:, -1] = tag[0]
        return rows

    @staticmethod
    def unpack_embeddings(raw: bytes | None, user_dim: int,
                          udg_dim: int) -> tuple[np.ndarray, np.ndarray, bool] | None:
        """-> (user_vec [1, user_dim], udg_vec [1, udg_dim], made_by_meta) or None if absent or malformed."""
        if raw is None or len(raw) != 4 * (user_dim + udg_dim) + 1:
            return None
        values = np.frombuffer(raw, dtype="<f4", count=user_dim + udg_dim)
        return (values[:user_dim].reshape(1, user_dim), values[user_dim:].reshape(1, udg_dim),
                raw[-1:] == TAG_META)

    @staticmethod
    def pack_item_tokens(tokens: np.ndarray) -> bytes:
        return np.ascontiguousarray(tokens, dtype="<i4").reshape(-1).tobytes()

    @staticmethod
    def unpack_item_tokens(raw: bytes, width: int) -> np.ndarray | None:
        """-> int64 [width] token indices, or None for a value of another width (another schema's)."""
        if raw is None or len(raw) != 4 * width:
            return None
        return np.frombuffer(raw, dtype="<i4").astype(np.int64)

    @staticmethod
    def join_history(items) -> str:
        return SEP.join(items)

    @staticmethod
    def split_history(raw: bytes | None, limit: int) -> list[str]:
        if not raw:
            return []
        return raw.decode("utf-8", "replace").split(SEP, limit)[:limit]

    @staticmethod
    def pack_profile(profile: dict[str, str]) -> bytes:
        return orjson.dumps({k: v for k, v in profile.items() if v != ""}, option=orjson.OPT_SORT_KEYS)

    @staticmethod
    def unpack_profile(raw: bytes | None) -> dict[str, str] | None:
        if not raw:
            return None
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else None

    @staticmethod
    def pack_marker(marker: dict) -> bytes:
        return orjson.dumps(marker)

    @staticmethod
    def unpack_marker(raw: bytes | None) -> dict | None:
        return orjson.loads(raw) if raw else None

    # --- the request path (asyncio client) ------------------------------------------------------------------
    async def fetch(self, redis, version: str, user_id: str) -> UserState:
        """Embeddings under `version`, history and profile: ONE command (MGET), one round trip."""
        raw = await redis.mget(self.embeddings(version, user_id), self.history(user_id), self.profile(user_id))
        return UserState(*raw)

    async def write_generated(self, redis, version: str, user_id: str, packed: bytes, profile: dict | None) -> None:
        """Write back a cold-start state. NX: a published or concurrently written state is never replaced."""
        pipe = redis.pipeline(transaction=False)
        pipe.set(self.embeddings(version, user_id), packed, nx=True)
        if profile:
            pipe.set(self.profile(user_id), self.pack_profile(profile), nx=True)
        await pipe.execute()

    def _click_call(self, user_id: str, clicks: list[Click], profile: dict | None) -> tuple[list, list]:
        keys = [self.history(user_id), self.dedup(user_id), self.profile(user_id)]
        args = [self.history_cap, DEDUP_KEEP, DEDUP_TTL_S, self.pack_profile(profile) if profile else b""]
        for click in clicks:
            args += [click.item_id, "" if click.ts is None else str(click.ts)]
        return keys, args

    async def append_clicks(self, redis, batches: dict[str, tuple[list[Click], dict | None]]) -> dict[str, list[int]]:
        """Per user: clicks oldest first (+ a profile to set if absent) -> per click 1 appended / 0 duplicate.

        One user: one EVALSHA. Several: one pipeline of EVALSHA. Either way one round trip, plus a SCRIPT LOAD
        and a rerun the first time (a new or restarted Redis answers NOSCRIPT, having run nothing).
        """
        from redis.exceptions import NoScriptError

        users = list(batches)
        calls = [self._click_call(user_id, *batches[user_id]) for user_id in users]
        for attempt in (0, 1):
            if len(calls) == 1:
                keys, args = calls[0]
                try:
                    results = [await redis.evalsha(_APPEND_CLICKS_SHA, len(keys), *keys, *args)]
                except NoScriptError:
                    if attempt:
                        raise
                    await redis.script_load(APPEND_CLICKS)
                    continue
            else:
                pipe = redis.pipeline(transaction=False)
                for keys, args in calls:
                    pipe.evalsha(_APPEND_CLICKS_SHA, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
                if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                    await redis.script_load(APPEND_CLICKS)
                    continue
                for result in results:
                    if isinstance(result, Exception):
                        raise result
            return {user_id: [int(f) for f in flags] for user_id, flags in zip(users, results, strict=True)}
        raise AssertionError("unreachable")

    async def read_marker(self, redis, version: str) -> dict | None:
        return self.unpack_marker(await redis.get(self.marker(version)))

    async def read_item_generations(self, redis, versions: list[str]) -> list[int]:
        """Each version's item-table generation (0: never written): ONE MGET for all of them."""
        if not versions:
            return []
        values = await redis.mget([self.item_generation(v) for v in versions])
        return [int(v) if v else 0 for v in values]

    async def read_items(self, redis, version: str, width: int) -> dict[str, np.ndarray]:
        """The version's item table {item id: int64 [width] tokens}, read with HSCAN (never one huge reply);
        values of another width are skipped."""
        table: dict[str, np.ndarray] = {}
        async for item, raw in redis.hscan_iter(self.item_table(version), count=10_000):
            tokens = self.unpack_item_tokens(raw, width)
            if tokens is not None:
                table[item.decode("utf-8", "surrogateescape")] = tokens
        return table

    # --- bulk: `udg publish` and `udg gc` (sync client) ---------------------------------------------------
    def write_batch(self, client, version: str, user_ids: list[str], user_vec: np.ndarray, udg_vec: np.ndarray,
                    histories: list[list[str]], profiles: list[dict[str, str]], overwrite_shared: bool = False) -> None:
        """One chunk of users in one round trip: their embeddings under `version` (always written: they belong
        to this version) and their history and profile (version independent: only where absent, unless
        `overwrite_shared`, so a publish never rolls back clicks that arrived after the training snapshot).
        An empty history or profile writes nothing."""
        packed = self.pack_embedding_rows(user_vec, udg_vec)
        embeddings, shared = [], []
        for row, user_id in enumerate(user_ids):
            embeddings += (self.embeddings(version, user_id), packed[row].tobytes())
            if histories[row]:
                shared += (self.history(user_id), self.join_history(histories[row]))
            profile = self.pack_profile(profiles[row])
            if profile != _EMPTY_PROFILE:
                shared += (self.profile(user_id), profile)
        pipe = client.pipeline(transaction=False)
        pipe.execute_command("MSET", *embeddings)
        if shared:
            if overwrite_shared:
                pipe.execute_command("MSET", *shared)
            else:
                pipe.execute_command("EVAL", SET_NX_ALL, len(shared) // 2, *shared[0::2], *shared[1::2])
        pipe.execute()

    def write_items(self, client, version: str, item_ids: list[str], tokens: np.ndarray, chunk: int = 5000) -> int:
        """Item rows (tokens [n, total width]) into the version's item table, pipelined in chunks, then one bump
        of its generation so that every worker reloads it. -> the generation."""
        table = self.item_table(version)
        for start in range(0, len(item_ids), chunk):
            mapping = {}
            for item, row in zip(item_ids[start:start + chunk], tokens[start:start + chunk], strict=True):
                mapping[item] = self.pack_item_tokens(row)
            client.hset(table, mapping=mapping)
        return int(client.incr(self.item_generation(version)))

    def write_marker(self, client, version: str, marker: dict) -> None:
        client.set(self.marker(version), self.pack_marker(marker))

    def clear_marker(self, client, version: str) -> None:
        client.delete(self.marker(version))

    def stored_versions(self, client) -> dict[str, dict | None]:
        """Every version with a marker or a namespace in Redis -> its marker (None: no complete publish)."""
        versions: dict[str, dict | None] = {}
        marker_prefix = self.marker("")
        for key in client.scan_iter(match=marker_prefix + "*", count=1000):
            versions[key.decode()[len(marker_prefix):]] = self.unpack_marker(client.get(key))
        for kind in VERSIONED_KINDS:  # namespaces without a marker too (an interrupted publish)
            kind_prefix = f"{self.prefix}:{kind}:"
            for key in client.scan_iter(match=kind_prefix + "*", count=10_000):
                versions.setdefault(key.decode()[len(kind_prefix):].split(":", 1)[0], None)
        return versions

    def delete_version(self, client, version: str, batch: int = 1000) -> int:
        """Remove a version's marker (first: it can no longer be activated) and namespace; -> keys unlinked
        from the namespace. SCAN + UNLINK in batches: never a blocking KEYS, the memory freed off-thread."""
        self.clear_marker(client, version)
        deleted, pending = 0, []
        for pattern in self.version_patterns(version):
            for key in client.scan_iter(match=pattern, count=10_000):
                pending.append(key)
                if len(pending) >= batch:
                    deleted += client.unlink(*pending)
                    pending = []
        if pending:
            deleted += client.unlink(*pending)
        return deleted
