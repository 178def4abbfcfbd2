"""Rolling-restart drill: two `udg serve` instances behind a round-robin proxy that health-checks /readyz, load
running the whole time; instance A is restarted (SIGTERM, wait for its exit, start it again, wait until the
proxy routes to it again), then B. Counts failed requests (the graceful drain of service/shutdown.py makes it
0) and prints the figures as a table.

    python -m loadtest.rolling_restart [--repo MODEL_REPO --version v1] [--workers 1] [--drain-s 2] [--clients 4]

runs the drill twice, first without the drain (UDG_SHUTDOWN_DRAIN_S=0: the baseline), then with it, and prints
both columns; `--json FILE` keeps the figures (docs/results/rolling_restart.json), `--table FILE` prints them again.

It starts its own redis-server and publishes the version there (or uses --redis-url). The proxy is the part a
Kubernetes Service plays: it forwards each TCP connection to the next backend whose /readyz answered 200 at its
last check (every --check-s), so a backend that says 503 gets no new connection; like kube-proxy it never
retries. The clients keep their connections alive; a draining instance answers `Connection: close`, so they
reconnect through the proxy to the other one. tests/service/test_graceful_shutdown.py runs it on the tests' tiny model.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Backend:
    host: str
    port: int
    healthy: bool = False
    connections: int = 0
    changes: list = field(default_factory=list)  # (time.monotonic(), healthy) at every change


class RoundRobinProxy:
    """An asyncio TCP proxy on 127.0.0.1 in a thread of its own: connection-level round robin over the backends
    whose GET /readyz answered 200 at the last health check."""

    def __init__(self, backends: list[tuple[str, int]], check_s: float = 0.1, check_timeout_s: float = 0.5):
        self.backends = [Backend(host, port) for host, port in backends]
        self.check_s, self.check_timeout_s = check_s, check_timeout_s
        self.refused = 0  # client connections closed because no backend was ready or the chosen one refused
        self.port = 0
        self._next = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="proxy", daemon=True)
        self._server = None

    def start(self) -> RoundRobinProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        self._loop.create_task(self._check_loop())

    def stop(self) -> None:
        async def close():
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:  # the health checker and the connections still open
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self, index: int) -> bool:
        return self.backends[index].healthy

    # --- health checks ------------------------------------------------------------------------------------
    async def _ready(self, backend: Backend) -> bool:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(backend.host, backend.port),
                                                    self.check_timeout_s)
        except (TimeoutError, OSError):
            return False
        try:
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n\r\n")
            line = await asyncio.wait_for(reader.readline(), self.check_timeout_s)
            return line.split(b" ", 2)[1:2] == [b"200"]
        except (TimeoutError, OSError, IndexError):
            return False
        finally:
            writer.close()

    async def _check_loop(self) -> None:
        while True:
            results = await asyncio.gather(*(self._ready(b) for b in self.backends))
            now = time.monotonic()
            for backend, ok in zip(self.backends, results, strict=True):
                if ok != backend.healthy:
                    backend.healthy = ok
                    backend.changes.append((now, ok))
            await asyncio.sleep(self.check_s)

    # --- forwarding -----------------------------------------------------------------------------------------
    def _pick(self) -> Backend | None:
        ready = [b for b in self.backends if b.healthy]
        if not ready:
            return None
        self._next += 1
        return ready[self._next % len(ready)]

    async def _handle(self, client_reader, client_writer) -> None:
        backend = self._pick()
        try:
            if backend is None:
                raise ConnectionRefusedError("no ready backend")
            backend_reader, backend_writer = await asyncio.open_connection(backend.host, backend.port)
        except OSError:
            self.refused += 1
            client_writer.close()
            return
        backend.connections += 1

        async def pipe(reader, writer):
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()

        await asyncio.gather(pipe(client_reader, backend_writer), pipe(backend_reader, client_writer))
        backend_writer.close()
        client_writer.close()


# --- instances ----------------------------------------------------------------------------------------------
def start_instance(version_dir: Path, redis_url: str, port: int, workers: int, drain_s: float,
                   log_file) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": redis_url, "UDG_MODEL_REPO": str(Path(version_dir).parent.resolve()),
           "UDG_MODEL_VERSION": Path(version_dir).name, "UDG_HOST": "127.0.0.1", "UDG_PORT": str(port),
           "UDG_WORKERS": str(workers), "UDG_ORT_THREADS": "1", "UDG_SHUTDOWN_DRAIN_S": str(drain_s),
           "UDG_LOG_LEVEL": "warning"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return subprocess.Popen([sys.executable, "-m", "udg_cli", "serve"], env=env, cwd=ROOT, stdout=log_file,
                            stderr=subprocess.STDOUT)


def wait_until(predicate, timeout_s: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.02)
    return time.monotonic() - started


class Load:
    """`clients` threads, each with one kept-alive httpx client, scoring known users through the proxy (one
    request in ten is a click event) as fast as answers come; every request is recorded."""

    def __init__(self, url: str, users: list[str], items: list[str], clients: int = 4):
        self.url, self.users, self.items, self.clients = url, users, items, clients
        self.log: list[tuple[float, float, str]] = []  # (start, seconds, outcome: "200" | status | error)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, seed: int) -> None:
        import httpx

        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=10) as http:
            n = 0
            while not self._stop.is_set():
                n += 1
                user = rng.choice(self.users)
                started = time.monotonic()
                try:
                    if n % 10 == 0:
                        reply = http.post("/v1/events", json={"user_id": user, "item_id": rng.choice(self.items),
                                                              "clicked": True})
                    else:
                        reply = http.post("/v1/score", json={"user_id": user, "candidates": self.items})
                    outcome = str(reply.status_code)
                except httpx.HTTPError as error:
                    outcome = type(error).__name__
                self.log.append((started, time.monotonic() - started, outcome))

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


def _percentile_ms(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] * 1000


def drill(version_dir: Path, redis_url: str | None = None, workers: int = 1, drain_s: float = 2.0,
          clients: int = 4, check_s: float = 0.1, warmup_s: float = 1.5, log_path: Path | None = None) -> dict:
    import numpy as np

    from loadtest.stack import start_redis, wait_ready
    from repository import USERS_FILE, read_manifest
    from service.local_redis import free_port
    from service.publish import publish, sync_redis

    version_dir = Path(version_dir)
    with np.load(version_dir / USERS_FILE, allow_pickle=False) as arrays:
        users = [str(u) for u in arrays["user_ids"][:200]]
    vocabulary = read_manifest(version_dir, validate=False)["features"]["items"]["tokens"]
    items = [str(t) for t in vocabulary[2:22]]  # after <pad>, <oov>
    redis = None
    if redis_url is None:
        redis = start_redis()
        redis_url = redis.url
    log_file = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed below
    ports = [free_port(), free_port()]
    processes: list[subprocess.Popen | None] = [None, None]
    proxy = load = None
    try:
        publish(version_dir, sync_redis(redis_url, timeout_s=5), progress=False)
        for i, port in enumerate(ports):
            processes[i] = start_instance(version_dir, redis_url, port, workers, drain_s, log_file)
        for i, port in enumerate(ports):
            wait_ready(f"http://127.0.0.1:{port}", processes[i], timeout_s=120)
        proxy = RoundRobinProxy([("127.0.0.1", p) for p in ports], check_s=check_s).start()
        wait_until(lambda: all(b.healthy for b in proxy.backends), 10, "the proxy sees both instances ready")
        load = Load(proxy.url, users, items, clients).start()
        time.sleep(warmup_s)
        phases = []
        restart_started = time.monotonic()
        for i, name in enumerate(("A", "B")):
            sigterm = time.monotonic()
            processes[i].send_signal(signal.SIGTERM)
            out_of_rotation = wait_until(lambda i=i: not proxy.healthy(i), drain_s + 10, f"{name} out of rotation")
            processes[i].wait(drain_s + 30)
            exited = time.monotonic() - sigterm
            code = processes[i].returncode
            processes[i] = start_instance(version_dir, redis_url, ports[i], workers, drain_s, log_file)
            back = wait_until(lambda i=i: proxy.healthy(i), 120, f"{name} back in rotation")
            phases.append({"instance": name, "out_of_rotation_s": out_of_rotation, "exit_s": exited,
                           "exit_code": code, "back_in_rotation_s": back})
        restart_ended = time.monotonic()
        time.sleep(1.0)
        load.stop()
        log = list(load.log)
        window = [seconds for started, seconds, _ in log if restart_started <= started <= restart_ended]
        outcomes = collections.Counter(outcome for _, _, outcome in log)
        span = (log[-1][0] - log[0][0]) if log else 0.0
        return {"requests": len(log), "failed": sum(n for o, n in outcomes.items() if o != "200"),
                "outcomes": dict(outcomes), "rps": len(log) / span if span else 0.0,
                "restart_s": restart_ended - restart_started, "restart_requests": len(window),
                "p50_ms": _percentile_ms([s for _, s, _ in log], 50),
                "p99_ms": _percentile_ms([s for _, s, _ in log], 99),
                "restart_p99_ms": _percentile_ms(window, 99), "restart_max_ms": max(window) * 1000 if window else 0,
                "connections": [b.connections for b in proxy.backends], "proxy_refused": proxy.refused,
                "phases": phases, "workers": workers, "drain_s": drain_s, "clients": clients}
    finally:
        if load is not None:
            load.stop()
        if proxy is not None:
            proxy.stop()
        for process in processes:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        if log_path:
            log_file.close()
        if redis is not None:
            redis.cleanup()


def figures_table(runs: list[dict]) -> str:
    """One column per run (e.g. without the drain, then with it)."""
    def rows(f: dict) -> list[tuple[str, str]]:
        out = [("instances x workers, clients", f"2 x {f['workers']}, {f['clients']} kept-alive"),
               ("requests served (score + 1 in 10 events)", f"{f['requests']:,d} ({f['rps']:.0f}/s)"),
               ("failed requests", f"{f['failed']} (" + ", ".join(f"{k}: {v}" for k, v in
                                                            sorted(f["outcomes"].items())) + ")"),
               ("requests during the rolling restart", f"{f['restart_requests']:,d} in {f['restart_s']:.1f} s"),
               ("latency p50 / p99, whole run", f"{f['p50_ms']:.1f} / {f['p99_ms']:.1f} ms"),
               ("latency p99 / max during the restart", f"{f['restart_p99_ms']:.1f} / {f['restart_max_ms']:.1f} ms"),
               ("proxy connections to A / B", " / ".join(str(c) for c in f["connections"])),
               ("connections the proxy could not place", str(f["proxy_refused"]))]
        for phase in f["phases"]:
            out.append((f"{phase['instance']}: SIGTERM -> out of rotation / exit (code) / back in rotation",
                        f"{phase['out_of_rotation_s'] * 1000:.0f} ms / {phase['exit_s']:.2f} s "
                        f"({phase['exit_code']}) / {phase['back_in_rotation_s']:.2f} s"))
        return out

    columns = [rows(f) for f in runs]
    names = [name for name, _ in columns[0]]
    width = max(len(n) for n in names)
    header = [f"drain {f['drain_s']:g} s" for f in runs]
    lines = [f"| {'figure':<{width}} | " + " | ".join(header) + " |",
             f"|{'-' * (width + 2)}|" + "|".join("-" * (len(h) + 2) for h in header) + "|"]
    lines += [f"| {name:<{width}} | " + " | ".join(col[i][1] for col in columns) + " |"
              for i, name in enumerate(names)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from loadtest.stack import add_model_arguments, ensure_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--redis-url", default=None, help="default: a private redis-server")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers per instance")
    parser.add_argument("--drain-s", type=float, default=2.0, help="UDG_SHUTDOWN_DRAIN_S of the instances")
    parser.add_argument("--clients", type=int, default=4, help="concurrent load clients")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the first run without a drain (UDG_SHUTDOWN_DRAIN_S=0)")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs here (a journal)")
    parser.add_argument("--table", type=Path, default=None, metavar="JOURNAL",
                        help="print the table of a journal written by --json, run nothing")
    args = parser.parse_args(argv)
    if args.table:
        print(figures_table(json.loads(args.table.read_text())["runs"]))
        return 0
    version_dir = ensure_model(args.repo, args.version, args.workdir)
    drains = [args.drain_s] if args.no_baseline else [0.0, args.drain_s]
    load_before = os.getloadavg()[0]
    runs = [drill(version_dir, args.redis_url, args.workers, d, args.clients) for d in drains]
    print(figures_table(runs))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "command": "python -m loadtest.rolling_restart " + " ".join(argv if argv is not None else sys.argv[1:]),
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpus": os.cpu_count(),
            "load_average_before_after": [load_before, os.getloadavg()[0]], "runs": runs}, indent=1) + "\n")
    return 0 if runs[-1]["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
