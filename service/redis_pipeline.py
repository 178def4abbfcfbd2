"""The score path's read (one MGET per request) on ONE pipelined RESP2 connection per worker, parsed by hiredis.

Why: redis-py's asyncio client spends ~180 µs of CPU per MGET on this machine (command packing through its
encoder, the connection pool's checkout and release, the retry wrapper, the stream reader), against ~50 µs for
writing a pre-packed command on a protocol and reading the reply with hiredis (docs/performance.md, "The
score path's Redis read"). Every other command (writes, admin, Pub/Sub, scans) stays on redis-py.

How it behaves (`UDG_REDIS_PIPELINED_READS`, on by default; on a Redis Cluster, `ClusterPipelinedReader` below
keeps one such connection per primary and hands any failure to redis-py's cluster client):
- **Pipelining**: concurrent requests write their MGETs on the same connection; Redis answers a connection's
  commands in order, so the replies are handed to the waiting requests first in, first out.
- **Timeout**: a request whose reply has not come within `timeout_s` fails with redis-py's `TimeoutError`, and the
  connection is closed, failing every request still waiting on it: a reply that never came would leave every
  later reply paired with the wrong request. The next request connects again (a paused or slow Redis is
  answered 503 per request until it answers again; no restart).
- **Connection loss** (Redis killed or restarted, a proxy closing the socket): every waiting request is
  retried once on a new connection (a read is safe to repeat, and an idle connection the server closed is not
  an outage), and fails with redis-py's `ConnectionError` if that fails too. One connection attempt at a time:
  requests that arrive meanwhile wait for it (at most `timeout_s`).
- **URL**: what redis-py accepts for one node (redis://, rediss:// with `ca_certs`, unix://; user, password
  and db), parsed by redis-py itself; AUTH and SELECT are sent on connect.
- Errors are redis-py's exception classes, so `FeatureStore` answers them 503 as it does every Redis failure;
  an error reply (`-ERR ...`) is a `ResponseError` for that request only (the connection stays in step).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from urllib.parse import quote

import hiredis
from redis.connection import parse_url
from redis.crc import key_slot
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

_CLOSED = "connection closed"


class _Connection(asyncio.Protocol):
    """One RESP2 connection: `send(packed)` -> a future for the reply of that command (in write order)."""

    def __init__(self):
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[asyncio.Future] = deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, packed: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        if self.closed:
            raise RedisConnectionError(f"Redis {_CLOSED}")
        try:
            self.transport.write(packed)
        except RuntimeError as error:  # uvloop: the transport closed before connection_lost was delivered
            self.fail(RedisConnectionError(f"Redis {_CLOSED}: {error}"))
            raise RedisConnectionError(f"Redis {_CLOSED}: {error}") from None
        future = loop.create_future()
        self.waiting.append(future)  # after the write: no reply can arrive in between (one thread)
        return future

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            reply = self.reader.gets()
            while reply is not False:
                future = self.waiting.popleft()
                if not future.done():  # done: its request gave up (cancelled); the pairing stays in order
                    if isinstance(reply, ResponseError):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
                reply = self.reader.gets()
        except (hiredis.ProtocolError, IndexError) as error:  # garbage, or a reply nobody asked for
            self.fail(RedisConnectionError(f"Redis protocol error: {error or type(error).__name__}"))

    def connection_lost(self, exc) -> None:
        self.fail(RedisConnectionError(f"Redis {_CLOSED}" + (f": {exc}" if exc else " by the server")))

    def fail(self, error: Exception) -> None:
        """Close the connection and fail every request still waiting on it with `error`."""
        self.closed = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


class PipelinedReader:
    """`await reader.mget(*keys)` -> [bytes | None, ...], as redis-py's `mget` answers."""

    def __init__(self, url: str, timeout_s: float, ca_certs: str | None = None):
        options = parse_url(url)
        self.timeout_s = timeout_s
        self.path = options.get("path")  # unix:// socket
        self.host = options.get("host", "localhost")
        self.port = int(options.get("port", 6379))
        self.db = int(options.get("db", 0) or 0)
        self.username = options.get("username")
        self.password = options.get("password")
        self.ssl = None
        if url.startswith("rediss://"):
            self.ssl = ssl.create_default_context(cafile=ca_certs)
        self._connection: _Connection | None = None
        self._connecting: asyncio.Future | None = None

    async def mget(self, *keys) -> list:
        return await self.execute("MGET", *keys)

    async def execute(self, *command):
        """One command's reply (an error reply raises `ResponseError`), on the shared connection. A connection
        error on a connection opened before this call is retried once on a new one, as redis-py's client does:
        a server or proxy that closed an idle connection must not turn into a 503. A timeout is not retried."""
        packed = hiredis.pack_command(command)
        connection = self._connection
        if connection is None or connection.closed:
            return await self._send(await self._connect(), packed)
        try:
            return await self._send(connection, packed)
        except RedisConnectionError:
            return await self._send(await self._connect(), packed)

    async def _send(self, connection: _Connection, packed: bytes):
        loop = asyncio.get_running_loop()
        future = connection.send(packed, loop)
        timer = loop.call_later(self.timeout_s, self._timed_out, connection, future)
        try:
            return await future
        finally:
            timer.cancel()

    def _timed_out(self, connection: _Connection, future: asyncio.Future) -> None:
        if not future.done():
            connection.fail(RedisTimeoutError(f"Redis did not answer within {self.timeout_s:g} s"))
        if self._connection is connection:
            self._connection = None

    async def _connect(self) -> _Connection:
        if self._connecting is None:  # the first request opens it; the others wait for that attempt
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, attempt: asyncio.Future) -> None:
        self._connecting = None
        if not attempt.cancelled() and attempt.exception() is None:
            self._connection = attempt.result()
        elif not attempt.cancelled():
            attempt.exception()  # retrieved: each waiting request raises it; no "never retrieved" warning

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        connection = None
        try:
            async with asyncio.timeout(self.timeout_s):
                if self.path:
                    _, connection = await loop.create_unix_connection(_Connection, self.path)
                else:
                    _, connection = await loop.create_connection(_Connection, self.host, self.port, ssl=self.ssl)
                if self.password:
                    credentials = (self.username, self.password) if self.username else (self.password,)
                    await self._handshake(connection, ("AUTH", *credentials), AuthenticationError)
                if self.db:
                    await self._handshake(connection, ("SELECT", self.db), ResponseError)
        except TimeoutError:  # asyncio.timeout's
            if connection is not None:
                connection.fail(RedisConnectionError(_CLOSED))
            raise RedisTimeoutError(f"Redis connect did not finish within {self.timeout_s:g} s") from None
        except OSError as error:
            raise RedisConnectionError(f"Redis connect failed: {error}") from error
        return connection

    @staticmethod
    async def _handshake(connection: _Connection, command: tuple, error_class) -> None:
        try:
            await connection.send(hiredis.pack_command(command), asyncio.get_running_loop())
        except ResponseError as error:
            connection.fail(RedisConnectionError(_CLOSED))
            raise error_class(f"Redis {command[0]} failed: {error}") from None

    async def aclose(self) -> None:
        if self._connection is not None:
            self._connection.fail(RedisConnectionError(f"Redis {_CLOSED} (worker shutting down)"))
            self._connection = None


class ClusterPipelinedReader:
    """The pipelined MGET on a Redis Cluster: one `PipelinedReader` per primary, chosen by the keys' hash slot
    from the slot map that redis-py's cluster client keeps current. The score path's keys share one slot
    (`service.redis_layout`), so the MGET goes to one node, as with redis-py.

    Any failure of the lean path (a MOVED or ASK reply after a slot moved, CLUSTERDOWN, a node that refuses,
    resets or does not answer within `timeout_s`) hands that request to redis-py's cluster client, whose
    redirect, topology refresh and retry rules then apply as they did before this reader existed; its answer,
    or its error (a 503), is the request's. Before the client has learned the slot map, every read is its."""

    def __init__(self, cluster, timeout_s: float, ca_certs: str | None = None, username: str | None = None,
                 password: str | None = None, tls: bool = False):
        self.cluster = cluster
        self.timeout_s = timeout_s
        self.ca_certs = ca_certs
        scheme = "rediss" if tls else "redis"
        auth = ""
        if password:
            auth = f"{quote(username or '', safe='')}:{quote(password, safe='')}@"
        self._url = f"{scheme}://{auth}{{host}}:{{port}}/0"
        self._readers: dict[tuple[str, int], PipelinedReader] = {}
        self.handed_over = 0  # reads answered by redis-py's client after the lean path failed (tests read it)

    def _node_for(self, key):
        """The primary that owns `key`'s slot in redis-py's map, or None (no map yet, the slot uncovered now)."""
        try:
            return self.cluster.nodes_manager.get_node_from_slot(key_slot(key.encode() if isinstance(key, str)
                                                                          else key))
        except Exception:  # redis-py's client then decides, with its own rules
            return None

    def _reader_at(self, node) -> PipelinedReader:
        address = (node.host, int(node.port))
        reader = self._readers.get(address)
        if reader is None:
            host = f"[{node.host}]" if ":" in node.host else node.host
            reader = self._readers[address] = PipelinedReader(self._url.format(host=host, port=node.port),
                                                              self.timeout_s, self.ca_certs)
        return reader

    async def mget(self, *keys) -> list:
        node = self._node_for(keys[0])
        if node is not None:
            try:
                return await self._reader_at(node).mget(*keys)
            except RedisError:
                self.handed_over += 1
        return await self.cluster.mget(*keys)

    async def aclose(self) -> None:
        for reader in self._readers.values():
            await reader.aclose()
        self._readers.clear()
