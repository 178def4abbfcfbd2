"""Hot users' state in the worker (`UDG_STATE_CACHE`, off by default), kept coherent with Redis by server-assisted
client-side caching: a repeated user's MGET reply (embeddings, history, profile, epoch copy) is served from
memory, without a round trip.

How it stays correct:
- **Invalidation**: one dedicated connection per worker runs `CLIENT TRACKING ON REDIRECT <itself> BCAST PREFIX
  <p>:e: PREFIX <p>:h: PREFIX <p>:p: PREFIX <p>:epoch:` and then SUBSCRIBEs to `__redis__:invalidate` (RESP2).
  Redis then sends it the name of every key under those prefixes that anyone changes — an event's history
  append, `udg warmup`'s embedding update, a publish, a cold-start write-back, a TTL refresh, `udg gc`, an
  expiry or an eviction. A user's key drops that user's entries; an epoch copy (a publish into a wiped or new
  Redis) or a FLUSHALL/FLUSHDB (a message without keys) drops everything.
- **In-flight reads**: a reply is stored only if no invalidation for its user (and no flush) arrived since its
  MGET was sent, so a read that raced a write cannot re-insert the old value after the write's invalidation.
- **The worker's own writes** (events, write-backs, refreshes) also drop their users locally once acknowledged,
  without waiting for the message.
- **Connection loss**: when the invalidation connection fails, or stops answering the PING sent every
  `ping_s` (silent for 2 periods), the whole cache is emptied and bypassed — every request reads Redis — until
  a new connection is tracking again (writes during the gap were never announced, so nothing from before is
  kept). A stalled connection can thus leave the cache serving old state for at most about 2 x `ping_s`.
- **Bounds**: at most `max_users` users (least recently used dropped first), and an entry older than
  `max_age_s` is read again (a safety net, not the mechanism).

The contract is Redis's: a write is seen by this worker once its invalidation message has arrived (typically
tens of microseconds on one host), not at the instant the writer's reply returns.

On a Redis Cluster the cache is disabled (logged at start): BCAST tracking is per node, so it would need one
tracking connection per primary, kept in step with failovers and slot moves; not built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict

from service.ratelog import RateLimitedLog

log = logging.getLogger("udg.state_cache")
_LOG = RateLimitedLog(log)  # a Redis outage retries every second: one line per interval, with a count
INVALIDATE_CHANNEL = b"__redis__:invalidate"
CLIENT_NAME = "udg-state-cache"  # the invalidation connection's name (CLIENT LIST shows it; tests kill it by name)


class StateCache:
    """`lookup` / `begin` + `store` for the request path; `run()` is the invalidation listener (a task)."""

    def __init__(self, prefix: str, max_users: int = 100_000, max_age_s: float = 30.0, ping_s: float = 1.0,
                 on_active=None):
        self.prefix = prefix
        self._on_active = on_active or (lambda value: None)  # told 1 / 0 when the cache turns on / off
        self.max_users = max_users
        self.max_age_s = max_age_s
        self.ping_s = ping_s
        self.active = False  # True only while the invalidation connection is subscribed and answering
        self._users: OrderedDict[str, dict] = OrderedDict()  # user -> {(version, with_epoch): (state, stored)}
        self._counter = 0  # bumped by every invalidation (of a user, or a flush)
        self._floor = 0  # replies of reads begun before this counter value are not stored (a flush, a loss)
        self._stamps: dict[str, int] = {}  # user -> counter at its last invalidation (bounded: see _invalidate)
        self._epoch_prefix = f"{prefix}:epoch:".encode()
        self.prefixes = [f"{prefix}:{kind}:" for kind in ("e", "h", "p", "epoch")]
        self.stats = {"hits": 0, "misses": 0, "invalidations": 0, "flushes": 0, "connects": 0}
        self._connection: InvalidationConnection | None = None

    # --- the request path ---------------------------------------------------------------------------------
    def lookup(self, version: str, user_id: str, with_epoch: bool):
        if not self.active:
            return None
        entries = self._users.get(user_id)
        if entries is not None:
            hit = entries.get((version, with_epoch))
            if hit is not None and time.monotonic() - hit[1] < self.max_age_s:
                self._users.move_to_end(user_id)
                self.stats["hits"] += 1
                return hit[0]
        self.stats["misses"] += 1
        return None

    def begin(self) -> int | None:
        """Before sending a read: the token `store` needs (None: the cache is off, do not store)."""
        return self._counter if self.active else None

    def store(self, version: str, user_id: str, with_epoch: bool, state, token: int | None) -> None:
        """Keep the reply of a read begun at `token`, unless its user (or everything) was invalidated since."""
        if token is None or not self.active or token < self._floor or self._stamps.get(user_id, -1) > token:
            return
        entries = self._users.get(user_id)
        if entries is None:
            if len(self._users) >= self.max_users:
                self._users.popitem(last=False)
            entries = self._users[user_id] = {}
        entries[(version, with_epoch)] = (state, time.monotonic())

    def invalidate_user(self, user_id: str) -> None:
        self._counter += 1
        self._users.pop(user_id, None)
        if len(self._stamps) >= 4 * self.max_users:  # bounded: forget the stamps, refuse every read in flight
            self._stamps.clear()
            self._floor = self._counter
        self._stamps[user_id] = self._counter

    def flush(self) -> None:
        self._counter += 1
        self._floor = self._counter
        self._users.clear()
        self._stamps.clear()
        self.stats["flushes"] += 1

    def __len__(self) -> int:
        return len(self._users)

    # --- invalidation messages --------------------------------------------------------------------------------
    def invalidated(self, keys) -> None:
        """One invalidation message: the keys changed, or None (FLUSHALL / FLUSHDB): everything."""
        self.stats["invalidations"] += 1
        if keys is None:
            self.flush()
            return
        for key in keys:
            if key.startswith(self._epoch_prefix):  # the data epoch was (re)written: a publish after a wipe
                self.flush()
                return
            # every per-user key ends with the user's hash tag "{<uid>}"; prefix and version hold no brace
            start = key.find(b"{")
            if start >= 0 and key.endswith(b"}"):
                self.invalidate_user(key[start + 1:-1].decode("utf-8", "surrogateescape"))
            else:  # not a key this cache knows how to map: be safe
                self.flush()
                return

    def _lost(self, why: str) -> None:
        _LOG.warning("lost", "state cache off until the invalidation connection is back: %s", why)
        self.active = False
        self.flush()
        self._on_active(0)

    async def run(self, url: str, connect_timeout_s: float, ca_certs: str | None = None,
                  retry_s: float = 1.0) -> None:
        """Keep an invalidation connection to `url` (one node) tracking; the cache is active only while one is."""
        while True:
            try:
                await self._session(url, connect_timeout_s, ca_certs)
            except asyncio.CancelledError:
                self._lost("stopped")
                self._close()
                raise
            except Exception as error:  # any failure of the connection: flush, bypass, reconnect
                self._lost(f"{type(error).__name__}: {error}")
            self._close()
            await asyncio.sleep(retry_s)

    async def _session(self, url: str, connect_timeout_s: float, ca_certs: str | None) -> None:
        connection = self._connection = await asyncio.wait_for(
            InvalidationConnection.open(url, ca_certs), connect_timeout_s)
        await asyncio.wait_for(connection.handshake(url), connect_timeout_s)
        own_id = await connection.call("CLIENT", "ID")
        await connection.call("CLIENT", "SETNAME", CLIENT_NAME)
        args = ["CLIENT", "TRACKING", "ON", "REDIRECT", own_id, "BCAST"]
        for prefix in self.prefixes:
            args += ["PREFIX", prefix]
        await connection.call(*args)
        reply = await connection.call("SUBSCRIBE", INVALIDATE_CHANNEL)
        if not (isinstance(reply, list) and reply and reply[0] == b"subscribe"):
            raise ConnectionError(f"unexpected answer to SUBSCRIBE: {reply!r}")
        self.flush()  # anything written before tracking began was never announced
        self.active = True
        self._on_active(1)
        self.stats["connects"] += 1
        log.info("state cache on: invalidations of %s", ", ".join(self.prefixes))
        heard = [time.monotonic()]
        pinger = asyncio.get_running_loop().create_task(self._ping(connection, heard))
        try:
            while True:
                message = await connection.read()
                heard[0] = time.monotonic()
                if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
                    self.invalidated(message[2])
        finally:
            pinger.cancel()

    async def _ping(self, connection: InvalidationConnection, heard: list[float]) -> None:
        """PING every `ping_s`; no message at all for 2 periods: the connection counts as lost."""
        try:
            while True:
                await asyncio.sleep(self.ping_s)
                if time.monotonic() - heard[0] > 2 * self.ping_s:
                    raise TimeoutError(f"no answer on the invalidation connection for {2 * self.ping_s:g} s")
                connection.send("PING")
        except Exception as error:
            self._lost(f"{type(error).__name__}: {error}")
            connection.close()  # the reader fails and the session restarts

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()


class InvalidationConnection:
    """A plain RESP2 connection of our own for the tracking subscription (redis-py's connections reconnect and
    resubscribe by themselves, which would resume the subscription without the tracking; its parsers also
    route pub/sub replies differently from version to version). Speaks only what this needs: commands out,
    simple/error/integer/bulk/array replies in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str, ca_certs: str | None) -> InvalidationConnection:
        from redis.connection import parse_url

        target = parse_url(url)
        if "path" in target:
            reader, writer = await asyncio.open_unix_connection(target["path"])
        else:
            context = None
            if url.startswith("rediss://"):
                import ssl

                context = ssl.create_default_context(cafile=ca_certs)
            reader, writer = await asyncio.open_connection(target.get("host", "localhost"),
                                                           int(target.get("port", 6379)), ssl=context)
        return cls(reader, writer)

    async def handshake(self, url: str) -> None:
        from redis.connection import parse_url

        target = parse_url(url)
        if target.get("password") is not None:
            await self.call("AUTH", *([target["username"]] if target.get("username") else []), target["password"])
        if int(target.get("db", 0) or 0):
            await self.call("SELECT", int(target["db"]))

    def send(self, *args) -> None:
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.writer.write(b"".join(out))

    async def call(self, *args):
        self.send(*args)
        return await self.read()

    async def read(self):
        line = await self.reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("the invalidation connection was closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else (await self.reader.readexactly(size + 2))[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [await self.read() for _ in range(size)]
        if kind == b"-":
            raise ConnectionError(f"Redis refused: {rest.decode(errors='replace')}")
        raise ConnectionError(f"unexpected reply {line[:40]!r}")

    def close(self) -> None:
        with contextlib.suppress(Exception):  # already gone
            self.writer.close()
