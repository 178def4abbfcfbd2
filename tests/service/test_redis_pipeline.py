"""The score path's pipelined MGET client (service/redis_pipeline.py) against a real redis-server: replies paired
with their requests under concurrency, AUTH and SELECT, error replies, and the faults it must survive without
a restart (Redis killed and restarted, Redis paused past the timeout, a request cancelled mid-flight)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import redis
from redis.exceptions import AuthenticationError, ConnectionError, ResponseError, TimeoutError

from service.local_redis import RedisServer, free_port
from service.redis_client import pipelined_reader
from service.redis_pipeline import ClusterPipelinedReader, PipelinedReader
from tests.conftest import REDIS_BINARY


@pytest.fixture
def server():
    server = RedisServer(REDIS_BINARY, free_port()).start(move_on_clash=True)
    yield server
    if server.process is not None and server.process.poll() is None:
        os.kill(server.process.pid, signal.SIGCONT)  # a test that paused it
    server.cleanup()


def run(coroutine):
    return asyncio.run(coroutine)


def test_replies_are_paired_with_their_requests_under_concurrency(server):
    client = redis.Redis.from_url(server.url)
    client.mset({f"k{i}": f"v{i}".encode() * (1 + i % 7) for i in range(300)})
    client.set("binary", bytes(range(256)))

    async def main():
        reader = PipelinedReader(server.url, timeout_s=2.0)
        # 300 requests in flight on one connection, each asking for different keys (one of them absent)
        replies = await asyncio.gather(*(reader.mget(f"k{i}", "absent", f"k{(i * 7) % 300}") for i in range(300)))
        assert await reader.mget("binary") == [bytes(range(256))]
        readers = [c for c in client.client_list() if c["cmd"] == "mget"]  # before any MGET of the sync client
        await reader.aclose()
        return replies, readers

    replies, readers = run(main())
    for i, reply in enumerate(replies):
        assert reply == client.mget(f"k{i}", "absent", f"k{(i * 7) % 300}")
        assert reply[1] is None
    assert len(readers) == 1, f"one connection for all of them, not {readers}"


def test_auth_and_database_from_the_url():
    server = RedisServer(REDIS_BINARY, free_port(), password="s3cret").start(move_on_clash=True)
    try:
        base = f"redis://:s3cret@127.0.0.1:{server.port}"
        redis.Redis.from_url(base + "/3").set("where", b"db3")

        async def main():
            found = await PipelinedReader(base + "/3", timeout_s=2.0).mget("where")
            on_zero = await PipelinedReader(base + "/0", timeout_s=2.0).mget("where")
            with pytest.raises(AuthenticationError):
                await PipelinedReader(f"redis://:wrong@127.0.0.1:{server.port}/0", timeout_s=2.0).mget("where")
            return found, on_zero

        assert run(main()) == ([b"db3"], [None])
    finally:
        server.cleanup()


def test_an_error_reply_fails_that_request_only(server):
    redis.Redis.from_url(server.url).set("a", b"1")

    async def main():
        reader = PipelinedReader(server.url, timeout_s=2.0)
        good, bad, after = await asyncio.gather(reader.mget("a"), reader.execute("NO-SUCH-COMMAND"), reader.mget("a"),
                                                return_exceptions=True)
        return good, bad, after

    good, bad, after = run(main())
    assert good == [b"1"] and after == [b"1"]
    assert isinstance(bad, ResponseError) and "NO-SUCH-COMMAND" in str(bad).upper()


def test_a_cancelled_request_leaves_the_connection_in_step(server):
    redis.Redis.from_url(server.url).mset({"a": b"1", "b": b"2"})

    async def main():
        reader = PipelinedReader(server.url, timeout_s=2.0)
        await reader.mget("a")  # connected
        first = asyncio.ensure_future(reader.mget("a"))
        await asyncio.sleep(0)  # written
        first.cancel()
        second = await reader.mget("b")
        return first.cancelled(), second

    assert run(main()) == (True, [b"2"])


def test_redis_killed_then_restarted_on_the_same_port_recovers_without_a_new_client(server):
    redis.Redis.from_url(server.url).set("a", b"1")

    async def main():
        reader = PipelinedReader(server.url, timeout_s=1.0)
        assert await reader.mget("a") == [b"1"]
        server.process.kill()
        server.process.wait()
        with pytest.raises(ConnectionError):
            await reader.mget("a")
        with pytest.raises(ConnectionError):  # still down: refused at connect
            await reader.mget("a")
        server.start()
        redis.Redis.from_url(server.url).set("a", b"2")  # a fresh Redis (nothing persisted)
        return await reader.mget("a")

    assert run(main()) == [b"2"]


def test_an_idle_connection_the_server_closed_is_not_an_error(server):
    client = redis.Redis.from_url(server.url)
    client.set("a", b"1")

    async def main():
        reader = PipelinedReader(server.url, timeout_s=1.0)
        assert await reader.mget("a") == [b"1"]
        killed = client.client_kill_filter(_type="normal", skipme=True)  # as Redis's idle `timeout` does
        assert killed >= 1
        return await reader.mget("a")  # whether or not the close was seen first: retried on a new connection

    assert run(main()) == [b"1"]


def test_a_paused_redis_times_out_every_waiting_request_then_recovers_in_step(server):
    redis.Redis.from_url(server.url).mset({f"k{i}": str(i).encode() for i in range(20)})

    async def main():
        reader = PipelinedReader(server.url, timeout_s=0.3)
        await reader.mget("k0")
        os.kill(server.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        waiting = await asyncio.gather(*(reader.mget(f"k{i}") for i in range(10)), return_exceptions=True)
        elapsed = time.monotonic() - started
        os.kill(server.process.pid, signal.SIGCONT)
        # the late replies went to the aborted connection: the new one answers each request its own keys
        after = await asyncio.gather(*(reader.mget(f"k{i}") for i in range(10, 20)))
        return waiting, elapsed, after

    waiting, elapsed, after = run(main())
    assert all(isinstance(error, TimeoutError) for error in waiting), waiting
    assert elapsed < 1.5
    assert after == [[str(i).encode()] for i in range(10, 20)]


def test_a_write_on_a_transport_closed_under_it_is_a_connection_error_not_a_bug():
    """uvloop raises RuntimeError on a write to a closed transport; before connection_lost is delivered that can
    happen, and it must be the Redis outage it is (a 503, retried once), never a 500."""
    from service.redis_pipeline import _Connection

    class ClosedTransport:
        def write(self, data):
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

        def abort(self):
            pass

    async def main():
        connection = _Connection()
        connection.connection_made(ClosedTransport())
        with pytest.raises(ConnectionError):
            connection.send(b"*1\r\n$4\r\nPING\r\n", asyncio.get_running_loop())
        return connection.closed, len(connection.waiting)

    assert run(main()) == (True, 0)


def test_a_refused_connect_is_a_redis_connection_error():
    async def main():
        refused = PipelinedReader(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
        with pytest.raises(ConnectionError):
            await refused.mget("a")

    run(main())


def test_the_factory_keeps_redis_py_where_the_reader_would_change_the_meaning():
    assert isinstance(pipelined_reader("redis://127.0.0.1:6379/0", 0.25), PipelinedReader)
    assert isinstance(pipelined_reader("unix:///tmp/redis.sock?db=2", 0.25), PipelinedReader)
    assert isinstance(pipelined_reader("rediss://user:pw@cache.example:6380/1", 0.25), PipelinedReader)
    assert pipelined_reader("redis+cluster://127.0.0.1:7000,127.0.0.1:7001", 0.25) is None
    assert pipelined_reader("rediss://cache.example:6380/0?ssl_cert_reqs=none", 0.25) is None
    assert pipelined_reader("redis://127.0.0.1:6379/0?socket_keepalive=true", 0.25) is None


def test_on_a_cluster_each_read_goes_to_its_slot_owner_and_a_redirect_goes_to_redis_py(redis_cluster):
    """The cluster reader against the real local cluster: every read on the lean path (one reader per primary
    that owns a read slot, replies equal to redis-py's), and a read sent to the wrong primary (a MOVED reply)
    answered by redis-py's cluster client instead."""
    from redis.asyncio.cluster import RedisCluster

    from service.redis_client import async_client, sync_client

    sync = sync_client(redis_cluster.url)
    values = {f"{{u{i}}}:e": f"v{i}".encode() for i in range(60)}
    for key, value in values.items():
        sync.set(key, value)

    async def main():
        cluster = async_client(redis_cluster.url, 2.0, 8)
        reader = pipelined_reader(redis_cluster.url, 2.0, None, main_client=cluster)
        assert isinstance(reader, ClusterPipelinedReader) and isinstance(cluster, RedisCluster)
        await cluster.ping()  # the client learns the slot map
        lean = await asyncio.gather(*(reader.mget(key, "{" + key[1:key.index("}")] + "}:absent") for key in values))
        lean_nodes = len(reader._readers)
        handed = reader.handed_over
        # the reader's map says another primary owns the slot: that node answers MOVED, redis-py's client
        # (whose map is right) answers instead
        owner = reader._node_for("{u1}:e")
        other = next(n for n in cluster.nodes_manager.get_nodes_by_server_type("primary") if n.name != owner.name)
        reader._node_for = lambda key: other
        moved = await reader.mget("{u1}:e")
        await reader.aclose()
        await cluster.aclose()
        return lean, lean_nodes, handed, moved, reader.handed_over

    lean, lean_nodes, handed, moved, handed_after = run(main())
    assert lean == [[value, None] for value in values.values()]
    assert handed == 0 and lean_nodes == 3  # 60 users' slots spread over the 3 primaries
    assert moved == [values["{u1}:e"]] and handed_after == 1
