"""The feature store's layout in Redis, owned by one class: `RedisLayout` names every key, encodes and decodes
every value, holds the scripts, and issues every command that touches per-user or per-version data — the
request path's reads and writes (asyncio client) and the bulk writes and deletes of `udg publish` / `udg gc`
(sync client). Nothing else builds these keys or packs these values. (The control plane's keys — routing
document, heartbeats — are `service.control.ControlKeys`, built with `control()`.)

Key layout, format 2 (`LAYOUT_FORMAT`; prefix `udg` by default). Redis Cluster hash tags decide which keys
share a slot: `{uid}` puts all of a user's keys, and the copy of the data epoch the user's request checks, in
one slot, so one MGET / one Lua call touches them all; `{ctl}` puts every control and version-wide key in ONE
slot, so a worker's poll reads the epoch and all markers in one MGET. On one Redis the braces are just bytes:
the same layout serves both.

    udg:e:<version>:{<uid>}   STRING  per version: float32 little-endian [user_vec | udg_vec] + 1 source byte
                                      (b"P" published from training, b"M" made by the meta generator)
    udg:h:{<uid>}             STRING  click history, raw item ids, most recent first, joined by \\x1f,
                                      at most `history_cap` entries (version independent); an entry
                                      written by an event ends with \\x1e (a LIVE click), one from a
                                      publish does not (the training SNAPSHOT). Values written before the
                                      tag existed are all untagged and read the same.
    udg:p:{<uid>}             STRING  profile, compact JSON {field: raw value} (version independent)
    udg:x:{<uid>}             ZSET    delivered event identities ("item\\x1fts", or "id\\x1f<event_id>"), scored by
                                      their ARRIVAL time (ms): retry deduplication, trimmed by arrival age
    udg:d:{<uid>}             ZSET    legacy (before udg:x): identities scored by event ts; still consulted,
                                      never written, until its own 7-day TTL removes it
    udg:{ctl}:epoch           STRING  the data epoch: created (SET NX) by the first `udg publish` into a Redis
                                      that has none; workers remember it and a change or disappearance means
                                      the state was lost (service/control.py)
    udg:epoch:{<tag>}         STRING  the epoch's copy in one hash slot, for each of the 16,384 slots (`slot_tags`:
                                      the tag of slot s is the smallest number whose slot is s; ~2 MB in all).
                                      A wiped cluster node loses only its slots' keys, these copies with them
    udg:ctl:generated:<n>     STRING  cold-start write-backs in generation window n (the cap on new users)
    udg:{ctl}:published:<v>   STRING  completion marker of `udg publish` (JSON: users, manifest sha256, epoch,
                                      layout format, …)
    udg:i:<version>:items     HASH    the version's item table for items it was not trained on: item id ->
                                      int32 little-endian token indices of every item field, concatenated
                                      (written by `udg publish` from items.npz and by `udg publish-items`);
                                      one key, so one node: read whole when a worker loads the version and
                                      cached in its memory, never on the request path
    udg:{ctl}:i:<v>:generation STRING a counter bumped by every write of the item table: workers reload it
                                      (read with the other versions' counters in one MGET per poll)
    udg:w:<version>:{<uid>}   ZSET    event identities the warm-up worker has applied to the user's embeddings
                                      under this version, scored by when (ms); written in the same Lua call as
                                      the embeddings (WARMUP_CAS), at most `warmup_applied_keep` kept
    udg:r:<version>:{<uid>}   STRING  the warm-up rule's per-user state under this version (`udg warmup --rule
                                      adam`: float32 [m | v | t]) + the 8-byte fingerprint of the embedding
                                      value it was computed with (`pack_rule_state`); written (or, for a
                                      stateless rule, deleted) in the same Lua call as the embeddings, its TTL
                                      theirs. A state whose fingerprint is not the current value's (a
                                      republish, an expired generated state) is ignored: the moments restart
    udg:warmup:events         STREAM  every accepted event (click or not), XADDed in the same MULTI/EXEC as the
                                      click append (one node, no WAIT), else right after it (`append_events`);
                                      read by `udg warmup` through the consumer group `warmup`
                                      (approximately bounded: MAXLEN ~ `warmup_stream_maxlen`)

A warmed embedding (`udg warmup`) is the same vectors + uint32 warm-up steps + the origin byte (P or M) +
b"W": 5 bytes longer than a published or generated one, so each format is told by its length and last byte.

Why this split. Embeddings live in different spaces per model version, so they are namespaced by version
and two versions coexist during a swap or an A/B split. The click history and the profile are facts about
the user, not about a model: they are kept once, as raw ids, so a click event is written once whatever the
number of live versions, and a new version starts from the user's current history rather than from its
training snapshot. Each version maps raw ids to its own vocabulary when it scores (unknown ids -> OOV row).
A version's namespace is every key of a kind in `VERSIONED_KINDS` (`e`, `i`, `w`, `r`), and `udg gc` removes it whole.
The item table is one hash per version rather than a key per item: the service reads it whole (HSCAN) when it
loads the version and again when its generation changes, never on the request path, where a candidate's
fields come from memory.

Why strings rather than a list and a hash. The request path then reads everything with ONE `MGET` of three
keys (one command, one round trip: ~35 us with hiredis, against ~60 us for a three-command pipeline, measured
on this machine with redis-py). Appending a click is a read-modify-write, done atomically server-side by a
Lua script (`APPEND_CLICKS`) that also bounds the history and drops retried deliveries.

History semantics follow `dataset.ingest`: every click, most recent first, repeats of an item kept (training
does not deduplicate either); what is deduplicated is a *delivery*: an event is stored once per identity —
its `event_id` if the client sent one, else (item, ts) if it carries `ts`, else a server-assigned event id
returned in the answer (a retry that sends it back is deduplicated too). Exactly once at ANY ts: identities
are remembered by when they ARRIVED, not by their ts (a late event with an old ts is remembered as long as a
new one), for `dedup_window_s` (default 7 days) after their first delivery, at most `dedup_cap` per user
(default 5,000 within the window). Past the cap a new event is refused (flag -1: not stored, the answer says
so; udg_events{outcome="refused"}) rather than an old identity being forgotten; a retry arriving more than
the window after its first delivery is taken as new. Memory: <= dedup_cap identities per user (~60-90 B
each), removed by age and by the key's TTL.

Generated (cold-start) state expires: the write-back sets `generated_ttl_s` on the embeddings and profile it
writes; a request that hits a generated state refreshes both TTLs in the background (EXPIRE ... XX, at most
once per user per tenth of the TTL per worker), never on the request path. At most `generated_cap` new users
per `generated_window_s` are written back (a counter key per window); past it they are still scored from the
meta generator, not written (udg_generated_users{outcome="capped"}).

Bulk writes are pipelined: one round trip per chunk of users, as two commands (an MSET of the embeddings and
one Lua call that does SET NX per shared key), which keeps the client's per-command cost out of the way (3
commands per user through redis-py ran at ~8k users/s here, client-bound). On a Redis Cluster a multi-key
command must stay in one slot, so the same commands are issued per hash slot of the chunk and redis-py's
cluster pipeline sends each node its share (one round trip per node); docs/cluster.md measures the cost.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import orjson

SEP = "\x1f"
SEP_BYTES = SEP.encode()
LIVE_TAG = b"\x1e"  # ends a history entry written by an event (a live click), not by a publish
TAG_PUBLISHED, TAG_META = b"P", b"M"
TAG_WARMED = b"W"  # ends a warmed value: [vectors | uint32 steps | origin tag | W]
WARM_TRAILER = 6
DEDUP_WINDOW_S = 7 * 24 * 3600  # defaults of Settings.dedup_window_s / dedup_cap
DEDUP_CAP = 5000
APPENDED, DUPLICATE, REFUSED = 1, 0, -1  # per-click flags of APPEND_CLICKS
VERSIONED_KINDS = ("e", "i", "w", "r")  # key kinds namespaced by model version: what `delete_version` removes
_EMPTY_PROFILE = b"{}"
# Bumped when key names or value formats change incompatibly: recorded in every publish marker. Format 2 moved
# the version-wide and control keys into one hash slot (`{ctl}`) and added the per-slot epoch sentinels; data
# published under format 1 is not read by format 2 (its markers are not found): republish every version.
LAYOUT_FORMAT = 2
CONTROL_TAG = "{ctl}"  # the hash tag of every control and version-wide key: one slot, one node of a cluster
SLOTS = 16384  # Redis Cluster hash slots


def key_slot(key: bytes) -> int:
    """The hash slot of a key, by Redis Cluster's rule (CRC16 of the first non-empty {tag}, else the key)."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1:end]
    return binascii.crc_hqx(key, 0) % SLOTS


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """For every hash slot s, a short hash tag whose slot is s (the smallest decimal number that lands there):
    the epoch sentinel of slot s is the key `<prefix>:epoch:{<tag>}`."""
    tags: list[str | None] = [None] * SLOTS
    missing, n = SLOTS, 0
    while missing:
        tag = str(n)
        slot = binascii.crc_hqx(tag.encode(), 0) % SLOTS
        if tags[slot] is None:
            tags[slot] = tag
            missing -= 1
        n += 1
    return tuple(tags)


def slot_target(client, slot: int) -> dict:
    """Routing of a bulk command whose keys are all in `slot`: none on one node; on a cluster the slot's
    primary named up front, which spares redis-py's pipeline a key lookup per command (for EVAL a COMMAND
    GETKEYS round trip each). Bulk work only: a slot that moves meanwhile fails the command, and the publish
    is rerun (it is idempotent)."""
    from service.redis_client import is_cluster

    return {"target_nodes": client.nodes_manager.get_node_from_slot(slot)} if is_cluster(client) else {}


class NotReplicated(RuntimeError):
    """A write stored on the primary was not acknowledged by the wanted replicas in time (WAIT): not durable
    against a failover, so the caller answers 503 and the client retries (deduplicated)."""

# Atomic append of clicks to one user's history (+ retry deduplication, + optional profile).
# KEYS: history, dedup, profile, legacy dedup. ARGV: cap, dedup_window_ms, dedup_cap, now_ms,
# profile_json_or_empty, then pairs (item, identity) oldest first. Returns one flag per pair: 1 appended,
# 0 duplicate delivery, -1 refused (the user's dedup window is full: not stored, nothing forgotten).
APPEND_CLICKS = r"""
local sep = "\31"
local cap, window, dcap, now = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call("ZREMRANGEBYSCORE", KEYS[2], "-inf", "(" .. (now - window))
local count = redis.call("ZCARD", KEYS[2])
local legacy = redis.call("EXISTS", KEYS[4]) == 1
local flags, added = {}, {}
for i = 6, #ARGV, 2 do
  local item, id = ARGV[i], ARGV[i + 1]
  local flag
  if redis.call("ZSCORE", KEYS[2], id) or (legacy and redis.call("ZSCORE", KEYS[4], id)) then
    flag = 0
  elseif count >= dcap then
    flag = -1
  else
    redis.call("ZADD", KEYS[2], now, id)
    count = count + 1
    flag = 1
    added[#added + 1] = item .. "\30"
  end
  flags[#flags + 1] = flag
end
if #added > 0 then
  local parts = {}
  for j = #added, 1, -1 do parts[#parts + 1] = added[j] end
  local value = table.concat(parts, sep)
  local old = redis.call("GET", KEYS[1])
  if old and #old > 0 then value = value .. sep .. old end
  local pos, n = 0, 0
  while true do
    local s = string.find(value, sep, pos + 1, true)
    if not s then break end
    n = n + 1
    if n >= cap then value = string.sub(value, 1, s - 1) break end
    pos = s
  end
  redis.call("SET", KEYS[1], value)
end
if count > 0 then redis.call("PEXPIRE", KEYS[2], window) end
if ARGV[5] ~= "" then redis.call("SET", KEYS[3], ARGV[5], "NX") end
return flags
"""
_APPEND_CLICKS_SHA = hashlib.sha1(APPEND_CLICKS.encode()).hexdigest()  # what EVALSHA names it by

# SET NX for many keys in one command (MSETNX is all-or-nothing, this is per key).
SET_NX_ALL = "for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i], 'NX') end return #KEYS"

# `udg publish` into a Redis that holds no complete publish (fresh, or wiped: its state was lost): per user,
# the LIVE clicks already there (received since; entries tagged \x1e, most recent first, in arrival order)
# stay on top, and the published snapshot replaces any snapshot part (from an interrupted earlier run: so a
# rerun is idempotent), capped at ARGV[1] entries. KEYS: histories; ARGV: cap, then the published values.
# -> how many existing histories were merged.
MERGE_HISTORIES = r"""
local sep, tag = "\31", "\30"
local cap, merged = tonumber(ARGV[1]), 0
for i = 1, #KEYS do
  local new = ARGV[i + 1]
  local old = redis.call("GET", KEYS[i])
  local entries = {}
  if old and #old > 0 then
    for e in string.gmatch(old, "[^\31]+") do
      if #entries >= cap then break end
      if string.sub(e, -1) == tag then entries[#entries + 1] = e end
    end
    merged = merged + 1
  end
  for e in string.gmatch(new, "[^\31]+") do
    if #entries >= cap then break end
    entries[#entries + 1] = e
  end
  redis.call("SET", KEYS[i], table.concat(entries, sep))
end
return merged
"""

# The warm-up worker's compare-and-set of one user's embeddings under one version, with the identities of the
# events it applied, atomically: written only if the value is still exactly what the worker read (so a
# republish, a cold-start write-back or another worker's newer update in between is never overwritten; the
# worker re-reads and recomputes). KEYS: embeddings, applied set, rule state. ARGV: expected value ("" =
# absent), new value, TTL ms for a value created from nothing, now ms, applied identities kept, rule state
# ("" = none: deleted), then identities. A value that existed keeps its TTL (a generated state's, or none for
# a published one); the applied set and the rule state get the value's. -> 1 written, 0 not.
WARMUP_CAS = r"""
local current = redis.call("GET", KEYS[1])
if (current or "") ~= ARGV[1] then return 0 end
if current then
  redis.call("SET", KEYS[1], ARGV[2], "KEEPTTL")
else
  redis.call("SET", KEYS[1], ARGV[2], "PX", ARGV[3])
end
for i = 7, #ARGV do redis.call("ZADD", KEYS[2], ARGV[4], ARGV[i]) end
local keep = tonumber(ARGV[5])
local n = redis.call("ZCARD", KEYS[2])
if n > keep then redis.call("ZREMRANGEBYRANK", KEYS[2], 0, n - keep - 1) end
if ARGV[6] == "" then redis.call("DEL", KEYS[3]) else redis.call("SET", KEYS[3], ARGV[6]) end
local ttl = redis.call("PTTL", KEYS[1])
for k = 2, 3 do
  if redis.call("EXISTS", KEYS[k]) == 1 then
    if ttl > 0 then redis.call("PEXPIRE", KEYS[k], ttl) else redis.call("PERSIST", KEYS[k]) end
  end
end
return 1
"""
_WARMUP_CAS_SHA = hashlib.sha1(WARMUP_CAS.encode()).hexdigest()


@dataclass
class WarmupState:
    """What the warm-up worker reads of one user under one version (one pipeline)."""

    embeddings: bytes | None
    applied: list[bool]  # per asked identity: already applied to these embeddings
    history: bytes | None
    profile: bytes | None
    rule_state: bytes | None = None  # `udg:r:…` as stored (check it with `unpack_rule_state`)


@dataclass
class UserState:
    """What one MGET returns for a user under one version (raw; decoding needs the version's dims)."""

    embeddings: bytes | None
    history: bytes | None
    profile: bytes | None
    epoch: bytes | None = None  # the data epoch, read in the same MGET (when asked for)
    # What a scorer decoded from these bytes, per artifact (the state cache hands the same object to every
    # request of a hot user, so the decoding is done once); never part of the value.
    decoded: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass
class Click:
    item_id: str
    ts: int | float | None = None
    event_id: str | None = None  # the client's idempotency key, or the server-assigned id of an event without ts

    @property
    def identity(self) -> str:
        """What deduplicates a delivery: the event id if any, else (item, ts). (A click with neither gets a
        server-assigned event id before it is stored.)"""
        if self.event_id is not None:
            return f"id{SEP}{self.event_id}"
        if self.ts is None:
            import os

            return f"id{SEP}anon-{os.urandom(8).hex()}"
        return f"{self.item_id}{SEP}{self.ts}"


class RedisLayout:
    """Keys, codecs and commands of the feature store under one prefix. Holds no client: request-path methods
    take the service's asyncio client, bulk methods a sync one, so both sides share one byte format."""

    def __init__(self, prefix: str = "udg", history_cap: int = 200, dedup_window_s: float = DEDUP_WINDOW_S,
                 dedup_cap: int = DEDUP_CAP, generated_ttl_s: int = 30 * 24 * 3600, generated_cap: int = 100_000,
                 generated_window_s: int = 3600, wait_replicas: int = 0, wait_timeout_ms: int = 100,
                 warmup_stream_maxlen: int = 1_000_000, warmup_applied_keep: int = 1000):
        self.prefix = prefix
        self.history_cap = history_cap  # clicks kept per user by `append_clicks`
        self.dedup_window_ms = int(dedup_window_s * 1000)
        self.dedup_cap = dedup_cap
        self.generated_ttl_s = int(generated_ttl_s)
        self.generated_cap = generated_cap
        self.generated_window_s = int(generated_window_s)
        self.wait_replicas = int(wait_replicas)  # append_clicks: WAIT for this many replicas (0: no WAIT)
        self.wait_timeout_ms = int(wait_timeout_ms)
        self.warmup_stream_maxlen = int(warmup_stream_maxlen)  # approximate (MAXLEN ~): trimmed per macro node
        self.warmup_applied_keep = int(warmup_applied_keep)

    @classmethod
    def from_settings(cls, settings) -> RedisLayout:
        return cls(settings.key_prefix, settings.history_cap, settings.dedup_window_s, settings.dedup_cap,
                   settings.generated_ttl_s, settings.generated_cap, settings.generated_window_s,
                   settings.events_wait_replicas, settings.events_wait_timeout_ms,
                   warmup_stream_maxlen=settings.warmup_stream_maxlen)

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
        return f"{self.prefix}:x:{{{user_id}}}"

    def legacy_dedup(self, user_id: str) -> str:
        return f"{self.prefix}:d:{{{user_id}}}"

    @property
    def epoch(self) -> str:
        return f"{self.prefix}:{CONTROL_TAG}:epoch"

    def control(self, name: str) -> str:
        """A control key (routing document, heartbeats, …): all in the control slot."""
        return f"{self.prefix}:{CONTROL_TAG}:{name}"

    def epoch_sentinel(self, user_id: str) -> str:
        """The copy of the data epoch in the hash slot of this user's keys (read in the user's MGET)."""
        return self.slot_sentinel(key_slot(self.history(user_id).encode()))

    def slot_sentinel(self, slot: int) -> str:
        return f"{self.prefix}:epoch:{{{slot_tags()[slot]}}}"

    def generated_counter(self, window: int) -> str:
        return f"{self.prefix}:ctl:generated:{window}"

    def marker(self, version: str) -> str:
        return f"{self.prefix}:{CONTROL_TAG}:published:{version}"

    def item_table(self, version: str) -> str:
        return f"{self.prefix}:i:{version}:items"

    def item_generation(self, version: str) -> str:
        return f"{self.prefix}:{CONTROL_TAG}:i:{version}:generation"

    def warmup_applied(self, version: str, user_id: str) -> str:
        return f"{self.prefix}:w:{version}:{{{user_id}}}"

    def warmup_rule_state(self, version: str, user_id: str) -> str:
        return f"{self.prefix}:r:{version}:{{{user_id}}}"

    @property
    def warmup_stream(self) -> str:
        return f"{self.prefix}:warmup:events"

    @property
    def warmup_group(self) -> str:
        """The consumer group of `udg warmup` on `warmup_stream` (its name, not a key)."""
        return "warmup"

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
        size = 4 * (user_dim + udg_dim) + 1
        if raw is None or len(raw) not in (size, size - 1 + WARM_TRAILER):
            return None
        values = np.frombuffer(raw, dtype="<f4", count=user_dim + udg_dim)
        origin = raw[-1:] if len(raw) == size else raw[-2:-1] if raw[-1:] == TAG_WARMED else None
        if origin is None:
            return None
        return (values[:user_dim].reshape(1, user_dim), values[user_dim:].reshape(1, udg_dim), origin == TAG_META)

    @staticmethod
    def pack_warmed(user_vec: np.ndarray, udg_vec: np.ndarray, steps: int, origin: bytes) -> bytes:
        """A warmed value: the vectors, the warm-up steps taken so far, the origin (P published, M generated)."""
        vectors = np.concatenate([np.asarray(user_vec, "<f4").reshape(-1), np.asarray(udg_vec, "<f4").reshape(-1)])
        return vectors.tobytes() + int(steps).to_bytes(4, "little") + origin[:1] + TAG_WARMED

    @staticmethod
    def warmup_steps(raw: bytes | None) -> int:
        """Warm-up steps a stored value has had (0 for a published or generated one, or none)."""
        if not raw or len(raw) <= WARM_TRAILER or raw[-1:] != TAG_WARMED:
            return 0
        return int.from_bytes(raw[-WARM_TRAILER:-2], "little")

    @staticmethod
    def pack_rule_state(state: np.ndarray, embeddings: bytes) -> bytes:
        """The warm-up rule's state of a user (float32) + the fingerprint of the embedding value it goes with."""
        return np.ascontiguousarray(state, "<f4").reshape(-1).tobytes() + hashlib.sha1(embeddings).digest()[:8]

    @staticmethod
    def unpack_rule_state(raw: bytes | None, width: int, embeddings: bytes | None) -> np.ndarray | None:
        """The state [1, width] if it was written with exactly `embeddings` (the value now stored), else None:
        absent, another rule's width, or the moments of a value since replaced."""
        if not raw or embeddings is None or len(raw) != 4 * width + 8:
            return None
        if raw[-8:] != hashlib.sha1(embeddings).digest()[:8]:
            return None
        return np.frombuffer(raw, "<f4", count=width).reshape(1, width).copy()

    @staticmethod
    def embedding_origin(raw: bytes | None) -> bytes | None:
        """P (published from training) or M (meta generator) for any stored format; None when absent."""
        if not raw:
            return None
        return raw[-2:-1] if raw[-1:] == TAG_WARMED and len(raw) > WARM_TRAILER else raw[-1:]

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
        """Raw item ids, most recent first (the live tags dropped: both kinds of entry score the same)."""
        if not raw:
            return []
        if LIVE_TAG in raw:
            raw = raw.replace(LIVE_TAG, b"")
        return raw.decode("utf-8", "replace").split(SEP, limit)[:limit]

    @staticmethod
    def split_entries(raw: bytes | None) -> list[tuple[str, bool]]:
        """Every entry as (item id, live): live entries came from events, the others from a publish."""
        if not raw:
            return []
        return [(e.rstrip("\x1e"), e.endswith("\x1e")) for e in raw.decode("utf-8", "replace").split(SEP)]

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
    async def fetch(self, redis, version: str, user_id: str, with_epoch: bool = False) -> UserState:
        """Embeddings under `version`, history and profile (+ the data epoch, as the sentinel copy in the
        user's own hash slot): ONE command (MGET) of keys in one slot, one round trip on a cluster too."""
        keys = [self.embeddings(version, user_id), self.history(user_id), self.profile(user_id)]
        if with_epoch:
            keys.append(self.epoch_sentinel(user_id))
        return UserState(*await redis.mget(*keys))

    async def write_generated(self, redis, version: str, user_id: str, packed: bytes, profile: dict | None,
                              now: float | None = None) -> bool:
        """Write back a cold-start state with the generated TTL, unless this window's cap on new users is
        reached (-> False: not written). NX: a published or concurrently written state is never replaced.
        Two round trips (count, then write): it runs in the background, after the response."""
        window = int((time.time() if now is None else now) // self.generated_window_s)
        counter = self.generated_counter(window)
        pipe = redis.pipeline(transaction=False)
        pipe.incr(counter)
        pipe.expire(counter, 2 * self.generated_window_s)
        count, _ = await pipe.execute()
        if int(count) > self.generated_cap:
            return False
        ttl = self.generated_ttl_s
        pipe = redis.pipeline(transaction=False)
        pipe.set(self.embeddings(version, user_id), packed, nx=True, ex=ttl)
        if profile:
            pipe.set(self.profile(user_id), self.pack_profile(profile), nx=True, ex=ttl)
        await pipe.execute()
        return True

    async def refresh_generated(self, redis, version: str, user_id: str) -> None:
        """Push back the expiry of a generated state that was just used (only keys that have a TTL: a published
        profile never gets one). The warm-up's applied set and rule state go with the embedding: outliving it
        is harmless, expiring first would let an event be applied twice."""
        ttl = self.generated_ttl_s
        pipe = redis.pipeline(transaction=False)
        for key in (self.embeddings(version, user_id), self.profile(user_id), self.warmup_applied(version, user_id),
                    self.warmup_rule_state(version, user_id)):
            pipe.execute_command("EXPIRE", key, ttl, "XX")
        await pipe.execute()

    def _click_call(self, user_id: str, clicks: list[Click], profile: dict | None, now_ms: int) -> tuple[list, list]:
        keys = [self.history(user_id), self.dedup(user_id), self.profile(user_id), self.legacy_dedup(user_id)]
        args = [self.history_cap, self.dedup_window_ms, self.dedup_cap, now_ms,
                self.pack_profile(profile) if profile else b""]
        for click in clicks:
            args += [click.item_id, click.identity]
        return keys, args

    async def append_clicks(self, redis, batches: dict[str, tuple[list[Click], dict | None]]) -> dict[str, list[int]]:
        """Per user: clicks oldest first (+ a profile to set if absent) -> per click 1 appended / 0 duplicate /
        -1 refused (dedup window full). A click without ts nor event id must have been given one (events.py).

        One user: one EVALSHA. Several: one pipeline of EVALSHA. Either way one round trip (on a cluster, one per
        node, in parallel), plus a SCRIPT LOAD and a rerun the first time (a new or restarted Redis answers
        NOSCRIPT, having run nothing). With `wait_replicas`, the pipeline ends with a WAIT on each node written
        (same connection, so it covers these writes); fewer acknowledgements than wanted raise NotReplicated.
        """
        from redis.exceptions import NoScriptError

        users = list(batches)
        now_ms = int(time.time() * 1000)
        calls = [self._click_call(user_id, *batches[user_id], now_ms) for user_id in users]
        for attempt in (0, 1):
            if len(calls) == 1 and not self.wait_replicas:
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
                for keys, args in calls:  # (a cluster pipeline refuses .evalsha(), not the command)
                    pipe.execute_command("EVALSHA", _APPEND_CLICKS_SHA, len(keys), *keys, *args)
                if self.wait_replicas:
                    self._queue_wait(redis, pipe, [keys[0] for keys, _ in calls])
                results = await pipe.execute(raise_on_error=False)
                if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                    await redis.script_load(APPEND_CLICKS)
                    continue
                for result in results:
                    if isinstance(result, Exception):
                        raise result
                results, acks = results[:len(calls)], results[len(calls):]
                if acks and min(int(a) for a in acks) < self.wait_replicas:
                    raise NotReplicated(f"the events were stored on the primary but only {min(int(a) for a in acks)}"
                                        f" of {self.wait_replicas} replica(s) acknowledged them within "
                                        f"{self.wait_timeout_ms} ms (UDG_EVENTS_WAIT_REPLICAS); retry: the retry "
                                        "is deduplicated")
            return {user_id: [int(f) for f in flags] for user_id, flags in zip(users, results, strict=True)}
        raise AssertionError("unreachable")

    @staticmethod
    def warmup_entry(user_id: str, item_id: str, clicked: bool, identity: str, ts, profile: dict | None) -> dict:
        """One event as a stream entry of `warmup_stream` (what `udg warmup` parses)."""
        return {"u": user_id, "i": item_id, "c": "1" if clicked else "0", "id": identity,
                "t": "" if ts is None else str(ts), "p": RedisLayout.pack_profile(profile) if profile else b""}

    async def append_events(self, redis, batches: dict[str, tuple[list[Click], dict | None]],
                            entries: list[dict]) -> dict[str, list[int]]:
        """`append_clicks` plus the events' XADDs to the warm-up stream. -> as `append_clicks`.

        On one node without WAIT: ONE round trip, one MULTI/EXEC, so the clicks are stored and the events
        streamed together, or neither. A NOSCRIPT (new or restarted Redis) fails only the EVALSHAs inside the
        transaction: the XADDs went through, so only the clicks are rerun (`append_clicks`).
        On a cluster (the stream is in another slot than the users' keys, and a transaction spans one slot) or
        with WAIT (which a transaction cannot hold): the clicks first, as `append_clicks`, then the XADDs. A
        failure between the two answers 503; the client's retry is deduplicated for the clicks and streams the
        events again, and the warm-up worker applies each event identity once (`warmup_applied`)."""
        from redis.exceptions import NoScriptError

        from service.redis_client import is_cluster

        if self.wait_replicas or is_cluster(redis):
            flags = await self.append_clicks(redis, batches)
            if entries:
                pipe = redis.pipeline(transaction=False)
                for entry in entries:
                    pipe.xadd(self.warmup_stream, entry, maxlen=self.warmup_stream_maxlen, approximate=True)
                await pipe.execute()
            return flags
        users = list(batches)
        now_ms = int(time.time() * 1000)
        calls = [self._click_call(user_id, *batches[user_id], now_ms) for user_id in users]
        pipe = redis.pipeline(transaction=True)
        for keys, args in calls:
            pipe.evalsha(_APPEND_CLICKS_SHA, len(keys), *keys, *args)
        for entry in entries:
            pipe.xadd(self.warmup_stream, entry, maxlen=self.warmup_stream_maxlen, approximate=True)
        results = (await pipe.execute(raise_on_error=False))[:len(calls)]
        if any(isinstance(r, NoScriptError) for r in results):
            return await self.append_clicks(redis, batches)
        for result in results:
            if isinstance(result, Exception):
                raise result
        return {user_id: [int(f) for f in flags] for user_id, flags in zip(users, results, strict=True)}

    def _queue_wait(self, redis, pipe, keys: list[str]) -> None:
        """WAIT on the connection(s) that carry the writes: one node's, or each written cluster node's."""
        from service.redis_client import is_cluster

        args = ("WAIT", self.wait_replicas, self.wait_timeout_ms)
        if not is_cluster(redis):
            pipe.execute_command(*args)
            return
        nodes = {}
        for key in keys:
            node = redis.get_node_from_key(key)
            nodes[node.name] = node
        for node in nodes.values():
            pipe.execute_command(*args, target_nodes=node)

    async def read_state(self, redis, versions: list[str]) -> tuple[bytes | None, list[dict | None]]:
        """The epoch and the publish markers of `versions`: ONE MGET (what a worker checks every poll)."""
        values = await redis.mget(self.epoch, *[self.marker(v) for v in versions])
        return values[0], [self.unpack_marker(v) for v in values[1:]]

    @staticmethod
    def sentinel_sample(redis) -> list[int]:
        """The hash slots whose sentinels a worker's poll reads: the first slot of each primary of a cluster
        (a wiped node loses the sentinels of all its slots, so one per node detects it without traffic to
        it); slot 0 on one node (where the epoch itself already tells)."""
        from service.redis_client import is_cluster

        if not is_cluster(redis):
            return [0]
        first: dict[str, int] = {}
        for slot, nodes in sorted(redis.nodes_manager.slots_cache.items()):
            if nodes:
                first.setdefault(nodes[0].name, slot)
        return sorted(first.values())

    async def read_sentinels(self, redis, slots: list[int]) -> dict[int, bytes | None]:
        """The epoch sentinels of `slots` (one pipeline: a round trip per node, in parallel)."""
        pipe = redis.pipeline(transaction=False)
        for slot in slots:
            pipe.get(self.slot_sentinel(slot))
        return dict(zip(slots, await pipe.execute(), strict=True))

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

    # --- the warm-up worker (sync client) --------------------------------------------------------------------
    def ensure_warmup_group(self, client) -> bool:
        """Create the consumer group (and the stream) if absent, reading from the stream's start: an event
        streamed before any worker existed is not lost. -> created."""
        from redis.exceptions import ResponseError

        try:
            client.xgroup_create(self.warmup_stream, self.warmup_group, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
            return False
        return True

    def read_warmup_events(self, client, consumer: str, count: int, block_ms: int) -> list[tuple[bytes, dict]]:
        """New entries for `consumer` (XREADGROUP >): [(entry id, fields)]. They stay pending until acked."""
        reply = client.xreadgroup(self.warmup_group, consumer, {self.warmup_stream: ">"}, count=count,
                                  block=block_ms)
        return [(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries if fields]

    def read_own_pending(self, client, consumer: str, count: int) -> list[tuple[bytes, dict]]:
        """This consumer's own pending entries (XREADGROUP 0): what a restarted worker of the same name left."""
        reply = client.xreadgroup(self.warmup_group, consumer, {self.warmup_stream: "0"}, count=count)
        return [(entry_id, fields) for _, entries in reply or [] for entry_id, fields in entries if fields]

    def claim_warmup_events(self, client, consumer: str, min_idle_ms: int, count: int,
                            start: str = "0-0") -> tuple[str, list[tuple[bytes, dict]], list[bytes]]:
        """XAUTOCLAIM: entries pending longer than `min_idle_ms` (their consumer is dead or stuck) become this
        consumer's. -> (next start, claimed entries, ids of entries deleted from the stream meanwhile)."""
        reply = client.xautoclaim(self.warmup_stream, self.warmup_group, consumer, min_idle_ms, start, count=count)
        next_start, entries = reply[0], reply[1]
        deleted = reply[2] if len(reply) > 2 else []
        next_start = next_start.decode() if isinstance(next_start, bytes) else str(next_start)
        return next_start, [(entry_id, fields) for entry_id, fields in entries if fields], list(deleted)

    def warmup_deliveries(self, client, entry_ids: list[bytes]) -> dict[bytes, int]:
        """How many times each pending entry has been delivered (XPENDING, one call per id range)."""
        if not entry_ids:
            return {}
        ids = sorted(entry_ids, key=lambda e: tuple(int(x) for x in e.split(b"-")))
        rows = client.xpending_range(self.warmup_stream, self.warmup_group, min=ids[0], max=ids[-1],
                                     count=len(ids) * 4 + 16)
        wanted = set(entry_ids)
        return {row["message_id"]: int(row["times_delivered"]) for row in rows if row["message_id"] in wanted}

    def ack_warmup_events(self, client, entry_ids: list[bytes]) -> int:
        return int(client.xack(self.warmup_stream, self.warmup_group, *entry_ids)) if entry_ids else 0

    def warmup_backlog(self, client) -> dict:
        """The group's lag and pending count, and the stream's length (what an operator watches)."""
        groups = {g["name"]: g for g in client.xinfo_groups(self.warmup_stream)}
        group = groups.get(self.warmup_group.encode()) or groups.get(self.warmup_group) or {}
        return {"length": int(client.xlen(self.warmup_stream)), "pending": int(group.get("pending", 0)),
                "lag": group.get("lag")}

    def read_warmup_states(self, client, version: str, user_ids: list[str],
                           identities: list[list[str]]) -> list[WarmupState]:
        """Per user: the embeddings under `version`, which of their `identities` were already applied to them,
        the history, the profile and the rule state. One pipeline for all users, one round trip (each user's
        five keys in their own slot)."""
        pipe = client.pipeline(transaction=False)
        for user_id, ids in zip(user_ids, identities, strict=True):
            pipe.get(self.embeddings(version, user_id))
            pipe.execute_command("ZMSCORE", self.warmup_applied(version, user_id), *ids)
            pipe.get(self.history(user_id))
            pipe.get(self.profile(user_id))
            pipe.get(self.warmup_rule_state(version, user_id))
        replies = pipe.execute()
        return [WarmupState(replies[i], [s is not None for s in replies[i + 1]], replies[i + 2], replies[i + 3],
                            replies[i + 4]) for i in range(0, len(replies), 5)]

    def write_warmed(self, client, version: str, user_id: str, expected: bytes | None, value: bytes,
                     identities: list[str], now_ms: int | None = None, rule_state: bytes = b"") -> bool:
        """Compare-and-set of the user's embeddings (WARMUP_CAS) with the applied identities and the rule state
        (b"": none, any stored one deleted). -> written."""
        from redis.exceptions import NoScriptError

        keys = self._warmup_keys(version, user_id)
        args = [expected or b"", value, self.generated_ttl_s * 1000,
                int(time.time() * 1000) if now_ms is None else now_ms, self.warmup_applied_keep, rule_state,
                *identities]
        try:
            return bool(client.evalsha(_WARMUP_CAS_SHA, len(keys), *keys, *args))
        except NoScriptError:
            client.script_load(WARMUP_CAS)
            return bool(client.evalsha(_WARMUP_CAS_SHA, len(keys), *keys, *args))

    def _warmup_keys(self, version: str, user_id: str) -> list[str]:
        return [self.embeddings(version, user_id), self.warmup_applied(version, user_id),
                self.warmup_rule_state(version, user_id)]

    def write_warmed_many(self, client, version: str, writes: list[tuple], now_ms: int | None = None) -> list[bool]:
        """`write_warmed` for several users [(user, expected, value, identities[, rule state])], one pipeline:
        each user's compare-and-set is its own Lua call (its own slot). -> written, per user."""
        from redis.exceptions import NoScriptError

        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        for attempt in (0, 1):
            pipe = client.pipeline(transaction=False)
            for user_id, expected, value, identities, *rest in writes:
                keys = self._warmup_keys(version, user_id)
                # (a cluster pipeline refuses .evalsha(), not the command)
                pipe.execute_command("EVALSHA", _WARMUP_CAS_SHA, len(keys), *keys, expected or b"", value,
                                     self.generated_ttl_s * 1000, now_ms, self.warmup_applied_keep,
                                     rest[0] if rest else b"", *identities)
            results = pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in results):
                client.script_load(WARMUP_CAS)  # nothing ran: NOSCRIPT executes no part of the script
                continue
            for result in results:
                if isinstance(result, Exception):
                    raise result
            return [bool(r) for r in results]
        raise AssertionError("unreachable")

    # --- bulk: `udg publish` and `udg gc` (sync client) ---------------------------------------------------
    def write_batch(self, client, version: str, user_ids: list[str], user_vec: np.ndarray, udg_vec: np.ndarray,
                    histories: list[list[str]], profiles: list[dict[str, str]], overwrite_shared: bool = False,
                    merge_histories: bool = False) -> int:
        """One chunk of users in one round trip: their embeddings under `version` (always written: they belong
        to this version) and their history and profile (version independent: only where absent, unless
        `overwrite_shared`, so a publish never rolls back clicks that arrived after the training snapshot).
        `merge_histories` (a publish into a Redis holding no complete publish: fresh or wiped): the live clicks
        of a history already there (received since) stay on top and the published snapshot goes below them
        (MERGE_HISTORIES) instead of being dropped. An empty history or profile writes nothing. -> histories merged."""
        packed = self.pack_embedding_rows(user_vec, udg_vec)
        merge = merge_histories and not overwrite_shared
        pipe = client.pipeline(transaction=False)
        queued, merge_at = 0, []
        for rows, target in self._slot_groups(client, user_ids):
            embeddings, shared, merged = [], [], []
            for row in rows:
                user_id = user_ids[row]
                embeddings += (self.embeddings(version, user_id), packed[row].tobytes())
                if histories[row]:
                    (merged if merge else shared).extend((self.history(user_id),
                                                          self.join_history(histories[row])))
                profile = self.pack_profile(profiles[row])
                if profile != _EMPTY_PROFILE:
                    shared += (self.profile(user_id), profile)
            pipe.execute_command("MSET", *embeddings, **target)
            queued += 1
            if shared:
                if overwrite_shared:
                    pipe.execute_command("MSET", *shared, **target)
                else:
                    pipe.execute_command("EVAL", SET_NX_ALL, len(shared) // 2, *shared[0::2], *shared[1::2],
                                         **target)
                queued += 1
            if merged:
                pipe.execute_command("EVAL", MERGE_HISTORIES, len(merged) // 2, *merged[0::2], self.history_cap,
                                     *merged[1::2], **target)
                merge_at.append(queued)
                queued += 1
        results = pipe.execute()
        return sum(int(results[i]) for i in merge_at)

    def _slot_groups(self, client, user_ids: list[str]) -> list[tuple[list[int], dict]]:
        """Rows of a chunk that one multi-key command may cover, with the routing of their commands: all of
        them on one node; per hash slot on a cluster (its pipeline then sends each node's commands in one
        round trip, the nodes in parallel)."""
        from service.redis_client import is_cluster

        if not is_cluster(client):
            return [(list(range(len(user_ids))), {})]
        groups: dict[int, list[int]] = {}
        for row, user_id in enumerate(user_ids):
            groups.setdefault(key_slot(self.history(user_id).encode()), []).append(row)
        return [(rows, slot_target(client, slot)) for slot, rows in groups.items()]

    def any_marker(self, client) -> bool:
        """Whether Redis holds the completion marker of any version (SCAN of the marker names only)."""
        return next(iter(client.scan_iter(match=self.marker("") + "*", count=10_000)), None) is not None

    def ensure_epoch(self, client, by: str) -> tuple[str, bool]:
        """The data epoch, created now if Redis has none, renewed if any hash slot's sentinel copy of it is
        missing or different (that slot's node lost its keys: a wiped cluster node, or data of an older
        layout) -> (epoch, created or renewed). Created or renewed means part or all of the store held no
        published state: whatever per-user state it holds there arrived since. Every slot's sentinel then
        holds the epoch."""
        import uuid

        value = f"{uuid.uuid4().hex[:12]}@{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by {by}"
        created = bool(client.set(self.epoch, value, nx=True))
        epoch = value if created else client.get(self.epoch).decode()
        stale = SLOTS if created else self.stale_sentinels(client, epoch)
        if stale and not created:
            client.set(self.epoch, value)
            epoch, created = value, True
        if stale:
            self.write_sentinels(client, epoch)
        return epoch, created

    def stale_sentinels(self, client, epoch: str) -> int:
        """How many hash slots' sentinels do not hold `epoch` (a pipeline of GETs: one round trip per node)."""
        pipe = client.pipeline(transaction=False)
        for slot in range(SLOTS):
            pipe.execute_command("GET", self.slot_sentinel(slot), **slot_target(client, slot))
        expected = epoch.encode()
        return sum(value != expected for value in pipe.execute())

    def write_sentinels(self, client, epoch: str) -> None:
        pipe = client.pipeline(transaction=False)
        for slot in range(SLOTS):
            pipe.execute_command("SET", self.slot_sentinel(slot), epoch, **slot_target(client, slot))
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
        client.execute_command("DEL", self.marker(version))  # one key: straight to its node (no cluster split)

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
        return deleted + int(client.unlink(self.item_generation(version)))
