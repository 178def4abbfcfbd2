"""Where a score request's CPU beyond the model call goes, in three measurements of one run on this machine:

    python -m loadtest.bench_overhead [--workdir runs/bench_compare] [--json JOURNAL] | --report JOURNAL

1. **The route's own Python work** (parse and validate the body, check and encode the candidates, their item
   features, the ranking, the JSON answer, the mean for the metrics: what `POST /v1/score` does around the model
   call), timed per request in one process, first with nothing in between (warm caches), then with the model
   call (`Artifact.score`) between consecutive requests, as in a worker. The ratio is what the model's pass
   over its weights and activations does to the rest of the request's cache footprint.
2. **The Redis read**: CPU of the client per MGET (the score path's three keys), redis-py's asyncio client
   against the pipelined reader (`service/redis_pipeline.py`), one request at a time, on a private
   redis-server and on a private local Redis Cluster (3 primaries, 3 replicas).
3. **The HTTP floor**: uvicorn (httptools, uvloop, one worker) answering a canned body of the service's answer
   size, driven by bench compare's load generator: the CPU per request of the server process, which is the
   part of a request no application code can remove.

Uses bench compare's model, inputs and load generator (the model is trained into --workdir once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from operator import itemgetter
from pathlib import Path

CANNED_APP = "loadtest.bench_overhead:canned_app"
_CANNED = {"body": b"{}"}  # the canned server's answer, set from UDG_BENCH_CANNED_BYTES in its process


async def canned_app(scope, receive, send):
    """The HTTP floor's ASGI app: reads the request body, answers the canned body."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    body = _CANNED["body"]
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


if os.environ.get("UDG_BENCH_CANNED_BYTES"):
    size = int(os.environ["UDG_BENCH_CANNED_BYTES"])
    _CANNED["body"] = b'{"x":"' + b"a" * max(0, size - 8) + b'"}'


def route_work(artifact, inputs: list[dict], requests: int, with_model: bool) -> list[float]:
    """Seconds of the route's own work per request (the model call, when made, is not counted)."""
    import numpy as np

    from service.api import bodies
    from service.scoring import check_candidates

    raw = [json.dumps({"user_id": x["user_id"], "candidates": x["candidates"]}).encode() for x in inputs]
    first = inputs[0]
    fixed = artifact.score(first["user_vec"], first["udg_vec"], first["history"], first["candidate_idx"])
    spent = []
    for i in range(requests):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        request = bodies.decode(bodies.JSON, raw[i % len(raw)])
        check_candidates(request.candidates, 1_000_000)
        index, unknown = artifact.encode_items(request.candidates)
        bool(unknown.any())
        fields = artifact.candidate_fields(index, request.candidates, None)
        t1 = time.perf_counter()
        scores = artifact.score(x["user_vec"], x["udg_vec"], x["history"], index, fields) if with_model else fixed
        t2 = time.perf_counter()
        ranked = np.argsort(-scores, kind="stable").tolist()
        answer = {"model_version": artifact.version, "cold_start": False, "scores": scores,
                  "ranking": list(itemgetter(*ranked)(request.candidates)), "unknown_candidates": []}
        bodies.encode(bodies.JSON, answer)
        float(scores.mean())
        spent.append((t1 - t0) + (time.perf_counter() - t2))
    return spent[len(spent) // 10:]  # the first tenth warms up


def redis_read(url: str, keys: list[bytes], calls: int) -> dict:
    """Client CPU µs per MGET of `keys`: the service's redis-py asyncio client, then its pipelined reader (both
    made by `service.redis_client` for `url`: one node, or a Redis Cluster)."""
    import uvloop

    from service.redis_client import async_client, pipelined_reader

    async def measure(client) -> float:
        for _ in range(calls // 10):
            await client.mget(*keys)
        start = time.process_time()
        for _ in range(calls):
            await client.mget(*keys)
        return 1e6 * (time.process_time() - start) / calls

    async def main() -> dict:
        client = async_client(url, 1.0, 64)
        reader = pipelined_reader(url, 1.0, main_client=client)
        await client.ping()  # a cluster client learns the slot map
        out = {"redis-py": [], "pipelined": []}
        for _ in range(3):  # alternated, so that a change in background load hits both
            out["redis-py"].append(await measure(client))
            out["pipelined"].append(await measure(reader))
        if getattr(reader, "handed_over", 0):
            raise RuntimeError(f"{reader.handed_over} reads left the pipelined path: the figure would mix both")
        await reader.aclose()
        await client.aclose()
        return out

    return uvloop.run(main())


def cluster_read(single_url: str, keys: list[bytes], calls: int) -> dict:
    """`redis_read` on a local Redis Cluster (3 primaries, 3 replicas) holding the same keys' values."""
    from service.local_redis import LocalCluster, redis_server_binary
    from service.redis_client import sync_client

    cluster = LocalCluster(redis_server_binary()).start()
    try:
        values = sync_client(single_url).mget(*keys)
        target = sync_client(cluster.url)
        for key, value in zip(keys, values, strict=True):
            if value is not None:
                target.set(key, value)
        target.close()
        return redis_read(cluster.url, keys, calls)
    finally:
        cluster.cleanup()


def http_floor(answer_bytes: int, request: bytes, seconds: float, levels: list[int]) -> dict:
    """CPU ms per request of a uvicorn process answering a canned body, at each concurrency."""
    from loadtest.bench_compare import cpu_seconds, run_load, summarise
    from loadtest.stack import ROOT
    from service.local_redis import free_port

    port = free_port()
    env = {**os.environ, "UDG_BENCH_CANNED_BYTES": str(answer_bytes)}
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", CANNED_APP, "--host", "127.0.0.1", "--port",
                                str(port), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
                                "--log-level", "warning"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                run_load(port, [request], 1, 0.2, 0.0, 10)
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("the canned uvicorn server did not start") from None
                time.sleep(0.2)
        out = {}
        for c in levels:
            run_load(port, [request], c, 0.5, 0.0, 10**6)
            before = cpu_seconds([process.pid])
            result = run_load(port, [request], c, seconds, 0.0, 10**6)
            cpu = cpu_seconds([process.pid]) - before
            entry = summarise(result["latencies"], result["seconds"], result["errors"])
            entry["cpu_ms_per_request"] = 1e3 * cpu / max(result["completed"], 1)
            out[str(c)] = entry
        return out
    finally:
        process.terminate()
        process.wait(10)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from export.runtime import open_artifact
    from loadtest import bench_compare, stack
    from service.api import bodies

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "setup.log", "ab") as setup_log:
        version_dir = stack.ensure_model(None, "bench", workdir, small=False, log_file=setup_log)
    load = {"before": os.getloadavg()}
    artifact = open_artifact(version_dir, providers=["CPUExecutionProvider"], threads=1)
    inputs = bench_compare.make_inputs(artifact, args.candidates, 64)
    results: dict = {"candidates": args.candidates, "cpus": os.cpu_count(), "route": {}}
    for _ in range(args.rounds):  # alternated, as above
        for with_model in (False, True):
            spent = route_work(artifact, inputs, args.requests, with_model)
            results["route"].setdefault("with_model" if with_model else "alone", []).append(
                1e6 * float(np.median(spent)))
    x = inputs[0]
    answer = {"model_version": artifact.version, "cold_start": False,
              "scores": artifact.score(x["user_vec"], x["udg_vec"], x["history"], x["candidate_idx"]),
              "ranking": x["candidates"], "unknown_candidates": []}
    answer_bytes = len(bodies.encode(bodies.JSON, answer))
    results["answer_bytes"] = answer_bytes
    redis = stack.start_redis()
    try:
        stack.publish_version(version_dir, redis.url)
        from service.redis_layout import RedisLayout

        layout = RedisLayout()
        user = x["user_id"]
        keys = [layout.embeddings(version_dir.name, user).encode(), layout.history(user).encode(),
                layout.profile(user).encode()]
        results["redis_read_us"] = redis_read(redis.url, keys, args.redis_calls)
        results["cluster_read_us"] = cluster_read(redis.url, keys, args.redis_calls)
    finally:
        redis.cleanup()
    request = bench_compare.score_requests(inputs[:1])[0]
    results["http_floor"] = http_floor(answer_bytes, request, args.seconds, [1, 16])
    results["load"] = {**load, "after": os.getloadavg()}
    print(format_report(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def format_report(results: dict) -> str:
    import numpy as np

    load = results["load"]
    route = {k: float(np.median(v)) for k, v in results["route"].items()}
    redis = {k: float(np.median(v)) for k, v in results["redis_read_us"].items()}
    lines = [f"N = {results['candidates']} candidates; {results['cpus']} CPUs; 1-min load average "
             f"{load['before'][0]:.2f} before, {load['after'][0]:.2f} after.", "",
             "| measurement | µs per request (median) | ratio |", "|---|---:|---:|",
             f"| the route's own work, requests back to back | {route['alone']:.0f} | 1.00 |",
             f"| the same work with the model call between requests | {route['with_model']:.0f} | "
             f"{route['with_model'] / route['alone']:.2f} |",
             f"| Redis read, client CPU: redis-py asyncio MGET | {redis['redis-py']:.0f} | 1.00 |",
             f"| Redis read, client CPU: pipelined reader MGET | {redis['pipelined']:.0f} | "
             f"{redis['pipelined'] / redis['redis-py']:.2f} |"]
    if "cluster_read_us" in results:  # journals from before the cluster reader have no such line
        cluster = {k: float(np.median(v)) for k, v in results["cluster_read_us"].items()}
        lines += ["| Redis Cluster read, client CPU: redis-py cluster client MGET | "
                  f"{cluster['redis-py']:.0f} | 1.00 |",
                  "| Redis Cluster read, client CPU: pipelined reader MGET (slot owner) | "
                  f"{cluster['pipelined']:.0f} | {cluster['pipelined'] / cluster['redis-py']:.2f} |"]
    for c, entry in results["http_floor"].items():
        lines.append(f"| HTTP floor: uvicorn, canned {results['answer_bytes']:,}-byte answer, concurrency {c}, "
                     f"server CPU | {1e3 * entry['cpu_ms_per_request']:.0f} | |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/bench_compare")
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--requests", type=int, default=400, help="requests per route-work block (default 400)")
    parser.add_argument("--rounds", type=int, default=3, help="blocks of each kind, alternated (default 3)")
    parser.add_argument("--redis-calls", type=int, default=3000, help="MGETs per client block (default 3000)")
    parser.add_argument("--seconds", type=float, default=5.0, help="HTTP-floor seconds per concurrency")
    parser.add_argument("--json", default=None, help="also write the raw results here (the journal)")
    parser.add_argument("--report", default=None, help="print the table of a journal written by --json; no run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.report:
        print(format_report(json.loads(Path(args.report).read_text())))
        return 0
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())

