"""Every Redis client the project opens is made here, from `REDIS_URL`: one Redis node or a Redis Cluster.

    redis://[user:password@]host:port/db, rediss://…, unix:///path.sock   one node (redis-py's Redis)
    redis+cluster://[user:password@]host:port[,host:port…]                 a Redis Cluster (RedisCluster):
    rediss+cluster://…                                                      the listed nodes are seeds, the rest
                                                                            of the cluster is discovered from them

Both kinds of client take the same commands (`service.redis_layout.RedisLayout` keeps every multi-key
command inside one hash slot), so the rest of the code does not know which it has; the few places that must
(grouping bulk writes by slot, addressing WAIT to the node that took a write, listing hash-slot owners) ask
`is_cluster(client)`.

Pub/Sub: a classic PUBLISH on any node of a cluster is delivered to subscribers on every node (the cluster bus
broadcasts it), so a worker's listener is a plain connection to ONE node (`listener`), the next one after a
failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
SINGLE_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class RedisTarget:
    """What a REDIS_URL names. `nodes` are the cluster's seed nodes (empty for one node)."""

    url: str
    cluster: bool
    tls: bool
    nodes: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_redis_url(url: str) -> RedisTarget:
    """Check and split a REDIS_URL; ValueError names what is wrong."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in SINGLE_SCHEMES:
        return RedisTarget(url, False, scheme == "rediss")
    if scheme not in CLUSTER_SCHEMES:
        raise ValueError("REDIS_URL must start with redis://, rediss://, unix://, redis+cluster:// or "
                         "rediss+cluster://")
    rest = url.split("://", 1)[1]
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    username = password = None
    if "@" in netloc:
        credentials, netloc = netloc.rsplit("@", 1)
        user, _, secret = credentials.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    nodes = []
    for part in netloc.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"REDIS_URL: cluster node {part!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    query = parse_qs(urlsplit(url).query)
    if query.get("db", ["0"])[0] not in ("0", ""):
        raise ValueError("REDIS_URL: a Redis Cluster has only database 0")
    return RedisTarget(url, True, scheme == "rediss+cluster", tuple(nodes), username, password)


def is_cluster(client) -> bool:
    """Whether `client` (sync, asyncio, or one of their pipelines) talks to a Redis Cluster."""
    return hasattr(client, "get_node_from_key")


def _node_kwargs(target: RedisTarget, ca_certs: str | None) -> dict:
    kwargs = {"username": target.username, "password": target.password}
    if target.tls:
        kwargs["ssl"] = True
        if ca_certs:
            kwargs["ssl_ca_certs"] = ca_certs
    return kwargs


def sync_client(url: str, timeout_s: float = 30.0, ca_certs: str | None = None):
    """A blocking client for bulk work (`udg publish`, `udg gc`, tests, benchmarks)."""
    import redis

    target = parse_redis_url(url)
    kwargs = dict(socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 10.0))
    if not target.cluster:
        if ca_certs and target.tls:
            kwargs["ssl_ca_certs"] = ca_certs
        return redis.Redis.from_url(url, **kwargs)
    from redis.cluster import ClusterNode, RedisCluster

    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                        **_node_kwargs(target, ca_certs), **kwargs)


def async_client(url: str, timeout_s: float, pool_size: int, ca_certs: str | None = None):
    """The service's asyncio client: hiredis parser (if installed), bounded pool(s), per-call timeout.

    Retries: one immediate retry on a connection error only (a pooled connection that the server or a proxy
    closed while idle must not turn into a 503), none on a timeout — a slow Redis is answered 503 within
    `timeout_s` and the caller retries; hidden retries would multiply the time to that answer. The pool
    reconnects by itself on the next call once Redis is back. On a cluster the one retry also re-reads the
    slot map (after a failover the promoted replica owns the slots), and `pool_size` bounds each node's pool.
    """
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    target = parse_redis_url(url)
    retry = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    kwargs = dict(socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=retry,
                  health_check_interval=0)
    if not target.cluster:
        if ca_certs and target.tls:
            kwargs["ssl_ca_certs"] = ca_certs
        pool = aredis.BlockingConnectionPool.from_url(url, max_connections=pool_size, timeout=timeout_s, **kwargs)
        return aredis.Redis(connection_pool=pool)
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
                        max_connections=pool_size, **_node_kwargs(target, ca_certs), **kwargs)


_READER_OPTIONS = {"host", "port", "db", "username", "password", "path", "connection_class"}


def pipelined_reader(url: str, timeout_s: float, ca_certs: str | None = None, main_client=None):
    """The score path's MGET client (`service.redis_pipeline`): for one node a `PipelinedReader`; on a Redis
    Cluster a `ClusterPipelinedReader` over `main_client` (the service's cluster client, whose slot map it
    reads and to which it hands failures). None where redis-py must keep the read: a cluster without
    `main_client`, or URL options the reader does not apply (e.g. `?ssl_cert_reqs=`, `?socket_keepalive=`),
    so that a URL means the same to both clients."""
    from redis.connection import parse_url

    from service import redis_pipeline

    target = parse_redis_url(url)
    if target.cluster:
        if main_client is None or not is_cluster(main_client):
            return None
        return redis_pipeline.ClusterPipelinedReader(main_client, timeout_s, ca_certs, target.username,
                                                     target.password, target.tls)
    if set(parse_url(url)) - _READER_OPTIONS:
        return None
    return redis_pipeline.PipelinedReader(url, timeout_s, ca_certs)


def listener(url: str, timeout_s: float, ca_certs: str | None = None, main=None, attempt: int = 0):
    """An asyncio client for Pub/Sub (no read timeout: it waits for messages). On a cluster: a plain
    connection to one node — of the nodes `main` (the service's cluster client) knows, else the seeds —
    chosen by `attempt`, so that a reconnect after a node failure goes to the next one."""
    import redis.asyncio as aredis

    target = parse_redis_url(url)
    kwargs = dict(socket_connect_timeout=timeout_s, socket_timeout=None, health_check_interval=0)
    if not target.cluster:
        if ca_certs and target.tls:
            kwargs["ssl_ca_certs"] = ca_certs
        return aredis.Redis.from_url(url, **kwargs)
    nodes = list(target.nodes)
    if main is not None and is_cluster(main):
        known = sorted((node.host, int(node.port)) for node in main.get_nodes())
        nodes = known or nodes
    host, port = nodes[attempt % len(nodes)]
    return aredis.Redis(host=host, port=port, **_node_kwargs(target, ca_certs), **kwargs)


def primaries(client) -> list:
    """The nodes that hold data: every primary of a cluster, or [client] for one node (sync client)."""
    if not is_cluster(client):
        return [client]
    return [client.get_redis_connection(node) for node in client.get_primaries()]
