"""Latency benchmark: the in-process onnxruntime call vs the service end to end over HTTP on 127.0.0.1.

    python -m loadtest.bench_service [--model-repo runs/quickstart/model_repo] [--version V]
                                      [--sizes 100,500] [--concurrency 1,8] [--requests 2000] [--json PATH]
    python -m loadtest.bench_service --report docs/results/perf/bench-service.json   # its tables, no run

One run prints, for each N (candidates): the in-process `Artifact.score` latency (same onnxruntime threads as
the service), the service's latency at each concurrency (median, p90, p99, req/s), and the difference and
ratio of the medians; then where a request's time goes (per-stage timers scraped from /metrics) and, as a
floor, a bare FastAPI endpoint on the same uvicorn settings that only parses the same body.

It starts a private redis-server on a free port, publishes the version into it, and runs `udg serve` as a
child process (uvicorn, httptools, uvloop, access log off). The HTTP client is a minimal keep-alive client
on raw sockets (one connection per concurrent client, TCP_NODELAY), so that client overhead stays small —
but on a 2-core machine client and server still share the CPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from loadtest.stack import stop

ROOT = Path(__file__).resolve().parents[1]
_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)
TARGET_MS = 0.8  # the serving target: service median at N = 500, concurrency 1, above the in-process call


# --- a minimal HTTP/1.1 keep-alive client ----------------------------------------------------------------
class RawClient:
    def __init__(self, host: str, port: int):
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host = host

    def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        return self.send(head + body)

    def send(self, request: bytes) -> tuple[int, bytes]:
        self.sock.sendall(request)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buffer += chunk
        head, _, body = buffer.partition(b"\r\n\r\n")
        length = int(_LENGTH.search(head).group(1))
        while len(body) < length:
            body += self.sock.recv(1 << 16)
        return int(head[9:12]), body

    def close(self) -> None:
        self.sock.close()


def raw_request(host: str, path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def run_load(host: str, port: int, request: bytes, concurrency: int, total: int, warmup: int) -> dict:
    """`total` requests over `concurrency` keep-alive connections; per-request latency in seconds."""
    per_client = max(1, total // concurrency)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = []
    barrier = threading.Barrier(concurrency + 1)

    def worker(slot: int) -> None:
        client = RawClient(host, port)
        try:
            for _ in range(warmup):
                client.send(request)
            barrier.wait()
            out = latencies[slot]
            for _ in range(per_client):
                started = time.perf_counter()
                status, _ = client.send(request)
                out.append(time.perf_counter() - started)
                if status != 200:
                    errors.append(status)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    values = np.array([v for chunk in latencies for v in chunk])
    if errors:
        raise RuntimeError(f"{len(errors)} non-200 answers, e.g. {errors[:3]}")
    return {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
            "p99": float(np.percentile(values, 99)), "rps": len(values) / wall, "n": len(values)}


# --- processes ------------------------------------------------------------------------------------------
def wait_ready(host: str, port: int, path: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if http_get(host, port, path)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{path} not ready within {timeout_s} s")


try:  # module level: FastAPI resolves the string annotations of bare_app's routes here
    from fastapi import Request
except ImportError:  # the benchmark still imports without the web stack (it then fails when serving)
    Request = None


def bare_app():
    """The floor: FastAPI parsing the same body (pydantic, one pass) and answering a small JSON."""
    import orjson
    from fastapi import FastAPI
    from starlette.responses import Response

    from service.api.schemas import ScoreRequest

    app = FastAPI()

    @app.post("/v1/score")
    async def score(request: Request):
        payload = ScoreRequest.model_validate_json(await request.body())
        return Response(orjson.dumps({"n": len(payload.candidates)}), media_type="application/json")

    @app.get("/readyz")
    async def ready():
        return Response(b"{}", media_type="application/json")

    return app


def stage_histograms(metrics_text: str) -> dict[str, dict[float, float]]:
    """{stage: {upper bound: cumulative count}} of udg_stage_seconds and, as "handler_total", of
    udg_request_seconds for /v1/score (summed over workers)."""
    out: dict[str, dict[float, float]] = {}
    for line in metrics_text.splitlines():
        if not line.startswith(("udg_stage_seconds_bucket", "udg_request_seconds_bucket")):
            continue
        labels, value = line[line.index("{") + 1:line.rindex("}")], float(line.rsplit(" ", 1)[1])
        fields = dict(part.split("=", 1) for part in re.findall(r'\w+="[^"]*"', labels))
        fields = {k: v.strip('"') for k, v in fields.items()}
        if line.startswith("udg_request_seconds"):
            if fields.get("route") != "/v1/score":
                continue
            stage = "handler_total"
        else:
            stage = fields["stage"]
        bound = float("inf") if fields["le"] == "+Inf" else float(fields["le"])
        bucket = out.setdefault(stage, {})
        bucket[bound] = bucket.get(bound, 0.0) + value
    return out


def approx_median(after: dict[float, float], before: dict[float, float] | None) -> float:
    """Median from the histogram delta, linearly interpolated inside its bucket (a bucket-resolution estimate)."""
    before = before or {}
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return 0.0
    lower, previous = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= total / 2:
            if bound == float("inf"):
                return lower
            share = (total / 2 - previous) / max(cumulative - previous, 1e-12)
            return lower + share * (bound - lower)
        lower, previous = bound, cumulative
    return lower


def ensure_model(repo: Path, version: str | None) -> Path:
    """The version to measure: the given or newest one of `repo`, else a synthetic PNN+UDG (the default
    architecture, 1 epoch) made there first."""
    from loadtest.stack import model_train_args
    from pipeline import VersionPlan, make_version
    from repository import ModelRepository

    repository = ModelRepository(repo)
    newest = repository.newest()
    if version or newest:
        return repository.path(version or newest)
    print(f"no model in {repo}; training a synthetic PNN+UDG (default architecture, 1 epoch) first…", flush=True)
    plan = VersionPlan(repo=repo, version="bench", workdir=repo.parent / "bench_work",
                       train_args=model_train_args("synthetic", 2000, epochs=1, small=False))
    return make_version(plan).version_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-repo", default="runs/quickstart/model_repo")
    parser.add_argument("--version", default=None)
    parser.add_argument("--sizes", default="100,500")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per (N, concurrency)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (service and in-process)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-endpoint floor")
    parser.add_argument("--json", default=None, help="also write the results here (a journal)")
    parser.add_argument("--report", type=Path, default=None, metavar="JOURNAL",
                        help="print the Markdown tables of a journal written by --json, run nothing")
    args = parser.parse_args(argv)
    if args.report:
        print(markdown_report(json.loads(args.report.read_text())))
        return 0
    sizes = [int(x) for x in args.sizes.split(",")]
    levels = [int(x) for x in args.concurrency.split(",")]

    from export.runtime import open_artifact
    from service.local_redis import RedisServer, free_port, redis_server_binary
    from service.publish import publish, sync_redis

    version_dir = ensure_model(Path(args.model_repo), args.version)
    artifact = open_artifact(version_dir, providers=["CPUExecutionProvider"], threads=args.threads)
    users = artifact.load_users()
    row = int(np.argmax(users["history_len"]))
    user_id = str(users["user_ids"][row])
    items = artifact.schema.items.tokens[2:]  # the item vocabulary after <pad>, <oov>
    host = "127.0.0.1"
    redis = RedisServer(redis_server_binary(), free_port()).start()
    results: dict = {"command": " ".join(["python -m loadtest.bench_service",
                                          *(argv if argv is not None else sys.argv[1:])]),
                     "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "version": artifact.version,
                     "model": {"kind": artifact.manifest["model"]["kind"], "udg": artifact.manifest["model"]["udg"],
                               "dims": artifact.manifest["dims"], "items": len(items), "repo": str(version_dir)},
                     "workers": args.workers, "threads": args.threads, "cpus": os.cpu_count(),
                     "load_before": os.getloadavg()[0], "sizes": {}}
    server = bare = None
    try:
        publish(version_dir, sync_redis(redis.url), progress=False)
        port = free_port()
        env = {**os.environ, "REDIS_URL": redis.url, "UDG_MODEL_REPO": str(version_dir.parent),
               "UDG_MODEL_VERSION": version_dir.name, "UDG_PORT": str(port), "UDG_WORKERS": str(args.workers),
               "UDG_ORT_THREADS": str(args.threads), "UDG_LOG_LEVEL": "warning"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        server = subprocess.Popen([sys.executable, "-m", "udg_cli", "serve"], env=env, cwd=ROOT)
        wait_ready(host, port, "/readyz", server)
        bare_port = None
        if not args.no_bare:
            bare_port = free_port()
            bare = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "loadtest.bench_service:bare_app",
                                     "--port", str(bare_port), "--workers", str(args.workers), "--loop", "uvloop",
                                     "--http", "httptools", "--no-access-log", "--log-level", "warning"], cwd=ROOT)
            wait_ready(host, bare_port, "/readyz", bare)

        history = users["history_idx"][row][: users["history_len"][row]]
        for n in sizes:
            candidates = items[:n] + [f"bench-unknown-{i}" for i in range(max(0, n - len(items)))]
            cand_idx, _ = artifact.encode_items(candidates)
            user_vec, udg_vec = users["user_vec"][row], users["udg_vec"][row]
            body = json.dumps({"user_id": user_id, "candidates": candidates}).encode()
            request = raw_request(host, "/v1/score", body)
            entry = {"body_bytes": len(body), "service": {}}
            # In-process and service (c=1) in alternating blocks, so both see the same background load.
            client = RawClient(host, port)
            for _ in range(args.warmup):
                artifact.score(user_vec, udg_vec, history, cand_idx)
                client.send(request)
            before = stage_histograms(http_get(host, port, "/metrics")[1].decode())
            inproc_t, service_t, block = [], [], 50
            started = time.perf_counter()
            for _ in range(max(1, args.requests // block)):
                for _ in range(block):
                    t0 = time.perf_counter()
                    artifact.score(user_vec, udg_vec, history, cand_idx)
                    inproc_t.append(time.perf_counter() - t0)
                for _ in range(block):
                    t0 = time.perf_counter()
                    status, _ = client.send(request)
                    service_t.append(time.perf_counter() - t0)
                    if status != 200:
                        raise RuntimeError(f"service answered {status}")
            wall = time.perf_counter() - started
            client.close()
            after = stage_histograms(http_get(host, port, "/metrics")[1].decode())
            entry["stages_c1"] = {stage: approx_median(after[stage], before.get(stage)) for stage in after}
            entry["in_process"] = {"median": statistics.median(inproc_t), "p99": float(np.percentile(inproc_t, 99))}
            if 1 in levels:
                values = np.array(service_t)
                entry["service"][1] = {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
                                       "p99": float(np.percentile(values, 99)), "rps": len(values) / (wall / 2),
                                       "n": len(values)}
            for c in levels:
                if c != 1:
                    entry["service"][c] = run_load(host, port, request, c, args.requests, args.warmup)
            if bare_port:
                entry["bare_c1"] = run_load(host, bare_port, raw_request(host, "/v1/score", body), 1,
                                            args.requests, args.warmup)
            results["sizes"][n] = entry
    finally:
        for process in (server, bare):
            if process is not None:
                stop(process, grace_s=20)
        redis.cleanup()

    results["load_after"] = os.getloadavg()[0]
    print_report(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
        print("\n" + markdown_report(json.loads(Path(args.json).read_text())))
    return 0


def _model_words(results: dict) -> str:
    model = results.get("model")
    if not model:
        return ""
    return f" ({model['kind'].upper()}{'+UDG' if model['udg'] else ''}, {model['items']:,d} items)"


def markdown_report(results: dict) -> str:
    """The journal's latency table and where a request's time goes, as Markdown (docs/serving.md includes them)."""
    ms = 1e3
    lines = ["| N | concurrency | in-process median | service median | p90 | p99 | req/s | difference | ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, entry in results["sizes"].items():
        inproc = entry["in_process"]["median"]
        for c, svc in entry["service"].items():
            lines.append(f"| {n} | {c} | {inproc * ms:.3f} ms | {svc['median'] * ms:.3f} ms | {svc['p90'] * ms:.3f} | "
                         f"{svc['p99'] * ms:.3f} | {svc['rps']:.0f} | {(svc['median'] - inproc) * ms:.3f} ms | "
                         f"{svc['median'] / inproc:.2f} |")
    stages = list(dict.fromkeys(k for e in results["sizes"].values() for k in e.get("stages_c1", {})
                                if k != "handler_total"))  # in the request's order
    lines += ["", "| N | " + " | ".join(stages) + " | handler | outside the handler | bare FastAPI endpoint |",
              "|---:|" + "---:|" * (len(stages) + 3)]
    for n, entry in results["sizes"].items():
        timers = entry.get("stages_c1", {})
        svc = entry["service"].get("1") or entry["service"].get(1) or next(iter(entry["service"].values()))
        total = timers.get("handler_total", 0.0)
        bare = f"{entry['bare_c1']['median'] * ms:.3f}" if "bare_c1" in entry else "n/a"
        lines.append(f"| {n} | " + " | ".join(f"{timers.get(k, 0.0) * ms:.3f}" for k in stages)
                     + f" | {total * ms:.3f} | {(svc['median'] - total) * ms:.3f} | {bare} |")
    target = results["sizes"].get("500") or results["sizes"].get(500)
    svc = target and (target["service"].get("1") or target["service"].get(1))
    if svc:  # the serving target this benchmark was written for
        difference = (svc["median"] - target["in_process"]["median"]) * ms
        load = (f"{results['load_before']:.1f} / {results['load_after']:.1f}" if "load_before" in results
                else "not recorded")
        lines += ["", "| target | measured | met | load average before / after the run |", "|---|---|---|---|",
                  f"| service median within {TARGET_MS:g} ms of the in-process call (N = 500, concurrency 1) | "
                  f"{difference:.3f} ms | {'yes' if difference <= TARGET_MS else 'no'} | {load} |"]
    load = (f"load average {results['load_before']:.1f} before and {results['load_after']:.1f} after"
            if "load_before" in results else "load average not recorded")
    lines += ["", f"Median ms per request at concurrency 1 (server-side stage timers from the histograms; outside "
                  f"the handler: HTTP, uvicorn, the client). Model {results['version']}{_model_words(results)}; "
                  f"service "
                  f"{results['workers']} worker(s) x {results['threads']} onnxruntime thread(s), in-process "
                  f"{results['threads']} thread(s); {results['cpus']} CPUs shared with the client; {load}"
                  + (f" ({results['at']})" if "at" in results else "") + "."]
    return "\n".join(lines)


def print_report(results: dict) -> None:
    ms = 1e3
    print(f"\nmodel {results['version']}; service: {results['workers']} uvicorn worker(s) x "
          f"{results['threads']} onnxruntime thread(s); in-process: {results['threads']} thread(s); "
          f"{results['cpus']} CPUs (client on the same machine)\n")
    print(f"{'N':>5} {'conc':>4} | {'in-proc med':>11} | {'service med':>11} {'p90':>7} {'p99':>7} {'req/s':>7} | "
          f"{'diff ms':>7} {'ratio':>6}")
    print("-" * 86)
    for n, entry in results["sizes"].items():
        inproc = entry["in_process"]["median"]
        for c, svc in entry["service"].items():
            print(f"{n:>5} {c:>4} | {inproc * ms:>11.3f} | {svc['median'] * ms:>11.3f} {svc['p90'] * ms:>7.3f} "
                  f"{svc['p99'] * ms:>7.3f} {svc['rps']:>7.0f} | {(svc['median'] - inproc) * ms:>7.3f} "
                  f"{svc['median'] / inproc:>6.2f}")
    print("\nwhere a request's time goes at concurrency 1 (server-side stage timers, median ms per request "
          "estimated from the histograms):")
    for n, entry in results["sizes"].items():
        stages = entry.get("stages_c1", {})
        parts = "  ".join(f"{k}={v * ms:.3f}" for k, v in stages.items() if k != "handler_total")
        total = stages.get("handler_total", 0.0)
        svc = entry["service"].get(1) or next(iter(entry["service"].values()))
        line = f"  N={n}: {parts}  | handler total={total * ms:.3f}"
        line += f"; outside the handler (HTTP, uvicorn, FastAPI, client) ≈ {(svc['median'] - total) * ms:.3f}"
        print(line)
        if "bare_c1" in entry:
            print(f"         bare FastAPI endpoint parsing the same {entry['body_bytes']:,d}-byte body: median "
                  f"{entry['bare_c1']['median'] * ms:.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
