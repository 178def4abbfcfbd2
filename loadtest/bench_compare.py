"""Side-by-side benchmark at N candidates (default 500), every number measured in one run on this machine:

    udg bench compare [--model-repo REPO --version V --checkpoint CKPT] [--workers 1,2] [--concurrency 1,16]
    python -m loadtest.bench_compare ...

  (a)  floor:   the in-process onnxruntime call (`Artifact.score`, the service's thread setting), back to back;
  (a') ceiling: W processes each running that call back to back — the model-only throughput of W workers;
  (b)  service: `udg serve` with W uvicorn workers, end to end over HTTP on 127.0.0.1 (Redis MGET, cold-start
                check, id encoding, onnxruntime, JSON response with scores and ranking);
  (c)  naive:   loadtest/naive_app.py — FastAPI + PyTorch eager per request, one Redis GET per feature (JSON),
                default thread settings — with W uvicorn workers;
for W in --workers and concurrency C in --concurrency, and the ratios b/a (latency) and c/b (latency,
throughput). Each cell is measured in --rounds short blocks, round-robin with the other cells of the same W
(floor, ceiling, service and naive at each C), so that a change in the machine's background load hits all of
them alike; the servers and the ceiling processes of one W stay up, idle, while the others are measured.
The load generator is a small asyncio HTTP/1.1 keep-alive client (one connection per concurrent client,
precomputed request bytes, bounded by --duration and --max-requests) running on the same CPUs.

Without --model-repo, the shipped architecture (PNN+UDG preset) is trained for one epoch on synthetic data into
--workdir (once; reused later). Redis is a private redis-server on a free 127.0.0.1 port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from loadtest.bench_model import cpu_model

NAIVE_KEY = "naive:{user_id}:{feature}"  # loadtest/naive_app.py reads these: one JSON string per user and feature
TARGETS = {"service_vs_naive_rps": 2.0, "service_vs_ceiling_rps": 0.75, "service_p99_vs_floor_p99": 3.0,
           "cpu_vs_model": 1.3, "p50_above_floor_ms": 0.5}


# Variant settings for the load generator, not the server: body=msgpack sends msgpack score requests
# (Content-Type and Accept application/msgpack) instead of JSON.
CLIENT_SETTINGS = {"body": ("json", "msgpack")}


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    """"cache:UDG_STATE_CACHE=true,UDG_X=1" -> ("cache", {...}); the name must not clash with a system.
    Lower-case keys are the client's (CLIENT_SETTINGS), the others the server's environment."""
    name, _, assignments = text.partition(":")
    env = dict(item.split("=", 1) for item in assignments.split(",") if "=" in item)
    if not name or name in ("service", "naive") or not env:
        raise SystemExit(f"--variant {text!r}: expected NAME:ENV=VALUE[,ENV=VALUE] (NAME not service/naive)")
    for key, value in env.items():
        if key.islower() and value not in CLIENT_SETTINGS.get(key, ()):
            raise SystemExit(f"--variant {text!r}: client setting {key}={value!r} is not one of "
                             + ", ".join(f"{k}={'|'.join(v)}" for k, v in CLIENT_SETTINGS.items()))
    return name, env


def server_env(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if not key.islower()}


def score_requests(inputs: list[dict], body: str = "json") -> list[bytes]:
    """The raw score requests of the load generator: one per input, JSON or msgpack both ways."""
    if body == "msgpack":
        import msgpack

        return [raw_post("/v1/score", msgpack.packb({"user_id": x["user_id"], "candidates": x["candidates"]}),
                         "application/msgpack", accept="application/msgpack") for x in inputs]
    return [raw_post("/v1/score", json.dumps({"user_id": x["user_id"], "candidates": x["candidates"]}).encode())
            for x in inputs]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-repo", default=None, help="model repository (default: train into --workdir)")
    parser.add_argument("--version", default="bench", help="version in --model-repo (default bench)")
    parser.add_argument("--checkpoint", default=None,
                        help="that version's PyTorch checkpoint, for the naive baseline (needed with --model-repo)")
    parser.add_argument("--workdir", default="runs/bench_compare")
    parser.add_argument("--candidates", type=int, default=500, help="N, candidates per request (default 500)")
    parser.add_argument("--workers", default="1,2", help="uvicorn worker counts (default 1,2)")
    parser.add_argument("--concurrency", default="1,16", help="concurrent clients (default 1,16)")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per cell (default 8)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="each cell is measured in this many blocks, round-robin with the others (default 4)")
    parser.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before a cell's first block")
    parser.add_argument("--max-requests", type=int, default=50_000, help="cap per cell")
    parser.add_argument("--ort-threads", type=int, default=1, help="onnxruntime threads per worker (service default 1)")
    parser.add_argument("--bodies", type=int, default=64, help="distinct (user, candidate list) requests cycled")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:ENV=VALUE[,ENV=VALUE]",
                        help="also measure the service with these environment settings, in the same rounds "
                             "(an A/B of a toggle), e.g. cache:UDG_STATE_CACHE=true; lower-case keys set the "
                             "client: body=msgpack sends msgpack score requests; repeatable")
    parser.add_argument("--json", default=None, help="also write the raw results here (the journal)")
    parser.add_argument("--report", default=None, help="print the tables of a journal written by --json; no run")
    parser.add_argument("--ceiling-worker", default=None, help=argparse.SUPPRESS)


# --- inputs ------------------------------------------------------------------------------------------------
def make_inputs(artifact, n: int, count: int, seed: int = 0) -> list[dict]:
    """`count` requests: a published user with a history and `n` distinct catalogue items each."""
    import numpy as np

    users = artifact.load_users()
    items = list(artifact.schema.items.tokens[2:])  # the vocabulary's items (rows 0 and 1: PAD and OOV)
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(users["history_len"] > 0)
    rows = rows if len(rows) else np.arange(len(users["user_ids"]))
    rows = rng.choice(rows, size=min(count, len(rows)), replace=False)
    out = []
    for row in rows.tolist():
        chosen = rng.choice(len(items), size=min(n, len(items)), replace=False).tolist()
        candidates = [items[i] for i in chosen] + [f"bench-extra-{j}" for j in range(max(0, n - len(items)))]
        out.append({"user_id": str(users["user_ids"][row]), "candidates": candidates, "row": row,
                    "user_vec": users["user_vec"][row], "udg_vec": users["udg_vec"][row],
                    "history": artifact.encode_items([str(i) for i in
                                                      users["history"][row][: users["history_len"][row]]])[0],
                    "candidate_idx": artifact.encode_items(candidates)[0]})
    return out


def time_model(artifact, inputs: list[dict], duration: float, warmup: float) -> dict:
    """Back-to-back `Artifact.score` calls cycling over `inputs`: count, seconds, per-call latencies."""
    start = time.perf_counter()
    i = 0
    while time.perf_counter() - start < warmup:
        x = inputs[i % len(inputs)]
        artifact.score(x["user_vec"], x["udg_vec"], x["history"], x["candidate_idx"])
        i += 1
    latencies = []
    begin = time.perf_counter()
    while True:
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        artifact.score(x["user_vec"], x["udg_vec"], x["history"], x["candidate_idx"])
        t1 = time.perf_counter()
        latencies.append(t1 - t0)
        i += 1
        if t1 - begin >= duration:
            break
    return {"calls": len(latencies), "seconds": time.perf_counter() - begin, "latencies": latencies}


def ceiling_worker(args: argparse.Namespace) -> int:
    """Child of the ceiling measurement: load, say "ready", then per "go SECONDS WARMUP" line run the model back
    to back and print {"calls", "seconds"} as JSON; "exit" ends it."""
    from export.runtime import open_artifact

    artifact = open_artifact(Path(args.ceiling_worker), providers=["CPUExecutionProvider"], threads=args.ort_threads)
    inputs = make_inputs(artifact, args.candidates, args.bodies)
    for x in inputs[:4]:
        artifact.score(x["user_vec"], x["udg_vec"], x["history"], x["candidate_idx"])
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "go":
            break
        result = time_model(artifact, inputs, float(words[1]), float(words[2]))
        print(json.dumps({"calls": result["calls"], "seconds": result["seconds"]}), flush=True)
    return 0


class Ceiling:
    """W persistent child processes, each running the in-process model back to back when told to (no HTTP)."""

    def __init__(self, version_dir: Path, workers: int, args: argparse.Namespace):
        from loadtest.stack import ROOT

        command = [sys.executable, "-m", "loadtest.bench_compare", "--ceiling-worker", str(version_dir),
                   "--ort-threads", str(args.ort_threads), "--candidates", str(args.candidates), "--bodies",
                   str(args.bodies)]
        self.children = [subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          text=True) for _ in range(workers)]
        for child in self.children:
            if child.stdout.readline().strip() != "ready":
                self.close()
                raise RuntimeError("a ceiling worker failed to start")

    def block(self, seconds: float, warmup: float) -> tuple[int, float]:
        """Run all workers at once for `seconds`: (calls summed over workers, mean seconds per worker)."""
        for child in self.children:
            child.stdin.write(f"go {seconds} {warmup}\n")
            child.stdin.flush()
        results = [json.loads(child.stdout.readline()) for child in self.children]
        return sum(r["calls"] for r in results), sum(r["seconds"] for r in results) / len(results)

    def cpu(self) -> float:
        return cpu_seconds([child.pid for child in self.children])

    def close(self) -> None:
        for child in self.children:
            if child.poll() is None:
                try:
                    child.stdin.write("exit\n")
                    child.stdin.close()
                except OSError:
                    pass
                try:
                    child.wait(30)
                except subprocess.TimeoutExpired:
                    child.kill()


# --- the HTTP load generator ------------------------------------------------------------------------------
READ_TIMEOUT_S = 30.0


def raw_post(path: str, body: bytes, content_type: str = "application/json", accept: str | None = None) -> bytes:
    accept_line = f"Accept: {accept}\r\n" if accept else ""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{accept_line}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _load(port: int, requests: list[bytes], concurrency: int, duration: float, warmup: float,
                max_requests: int) -> dict:
    import socket

    loop_start = time.perf_counter()
    measure_from = loop_start + warmup
    stop_at = measure_from + duration
    latencies: list[float] = []
    errors: list[str] = []
    last_done = [measure_from]
    completed = [0]

    async def client(slot: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        i = slot
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at or len(latencies) >= max_requests:
                    return
                writer.write(requests[i % len(requests)])
                i += 1
                # bounded: a server that stops answering ends the run instead of hanging it
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
                lower = head.lower()
                at = lower.find(b"content-length:")
                if at < 0:
                    raise RuntimeError("response without Content-Length")
                length = int(lower[at + 15: lower.find(b"\r\n", at)])
                body = await reader.readexactly(length)
                t1 = time.perf_counter()
                completed[0] += 1
                if t0 >= measure_from:
                    latencies.append(t1 - t0)
                    last_done[0] = max(last_done[0], t1)
                    status = int(head[9:12])
                    if status != 200:
                        errors.append(f"HTTP {status}: {body[:120]!r}")
        finally:
            writer.close()

    await asyncio.gather(*(client(slot) for slot in range(concurrency)))
    return {"latencies": latencies, "seconds": max(last_done[0] - measure_from, 1e-9), "errors": errors,
            "completed": completed[0]}


def run_load(port: int, requests: list[bytes], concurrency: int, duration: float, warmup: float,
             max_requests: int) -> dict:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        runner = asyncio.run
    return runner(_load(port, requests, concurrency, duration, warmup, max_requests))


def summarise(latencies: list[float], seconds: float, errors: list[str] | None = None) -> dict:
    import numpy as np

    values = np.asarray(latencies)
    return {"n": len(values), "rps": len(values) / seconds, "p50_ms": float(np.percentile(values, 50)) * 1e3,
            "p99_ms": float(np.percentile(values, 99)) * 1e3, "errors": len(errors or []),
            "error_examples": (errors or [])[:3]}


def cpu_seconds(pids) -> float:
    """User + system CPU seconds of these processes and all their descendants (psutil comes with locust)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


# --- servers ------------------------------------------------------------------------------------------------
def start_naive(checkpoint: Path, redis_url: str, workers: int, log_path: Path) -> tuple[subprocess.Popen, int]:
    from loadtest.stack import ROOT, stop, wait_ready
    from service.local_redis import free_port

    port = free_port()
    env = {**os.environ, "NAIVE_CHECKPOINT": str(Path(checkpoint).resolve()), "REDIS_URL": redis_url}
    # uvicorn's defaults (auto loop and HTTP parser, i.e. uvloop + httptools here) except the access log, which
    # is off as in the service, so that the comparison is not about logging.
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "uvicorn", "loadtest.naive_app:app", "--host", "127.0.0.1",
                                    "--port", str(port), "--workers", str(workers), "--no-access-log",
                                    "--log-level", "warning"], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        wait_ready(f"http://127.0.0.1:{port}", process, timeout_s=300)
    except BaseException:
        stop(process)
        raise
    return process, port


# --- the run ------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    if args.ceiling_worker:
        return ceiling_worker(args)
    if getattr(args, "report", None):
        results = json.loads(Path(args.report).read_text())
        results["ceiling"] = {int(k): v for k, v in results["ceiling"].items()}  # JSON keys are strings
        print(format_table(results))
        return 0
    from export.runtime import open_artifact
    from loadtest import stack

    workers_list = [int(x) for x in args.workers.split(",")]
    levels = [int(x) for x in args.concurrency.split(",")]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.model_repo:
        version_dir = stack.ensure_model(Path(args.model_repo), args.version, workdir)
        checkpoint = Path(args.checkpoint) if args.checkpoint else None
        if checkpoint is None and not args.skip_naive:
            print("--checkpoint is needed with --model-repo for the naive baseline (or --skip-naive)", file=sys.stderr)
            return 2
    else:
        with open(workdir / "setup.log", "ab") as setup_log:
            version_dir = stack.ensure_model(None, args.version, workdir, small=False, log_file=setup_log)
        checkpoint = workdir / "checkpoint.pt"

    load = {"before": os.getloadavg()}
    artifact = open_artifact(version_dir, providers=["CPUExecutionProvider"], threads=args.ort_threads)
    inputs = make_inputs(artifact, args.candidates, args.bodies)
    results: dict = {"candidates": args.candidates, "version": str(version_dir), "cpus": os.cpu_count(),
                     "cpu": cpu_model(),
                     "ort_threads": args.ort_threads, "duration_s": args.duration, "rounds": args.rounds,
                     "cells": {}, "ceiling": {}}
    block = args.duration / args.rounds
    floor: dict = {"latencies": [], "seconds": 0.0}
    variants = dict(parse_variant(text) for text in args.variant)
    results["variants"] = variants
    systems = ["service", *variants] + ([] if args.skip_naive else ["naive"])
    requests_of = {system: score_requests(inputs, variants.get(system, {}).get("body", "json")) for system in systems}
    redis = stack.start_redis()
    try:
        stack.publish_version(version_dir, redis.url)
        if not args.skip_naive:
            from service.publish import sync_redis

            client = sync_redis(redis.url)
            write_naive_features(client, _users_for(version_dir, inputs))
            client.close()
        for workers in workers_list:
            print(f"{workers} worker(s): starting the model-only ceiling processes, the service and the naive app",
                  flush=True)
            ceiling = Ceiling(version_dir, workers, args)
            servers: dict = {}
            try:
                process, base = stack.start_service(version_dir, redis.url, workers, args.ort_threads,
                                                    workdir / "service.log")
                servers["service"] = (process, int(base.rsplit(":", 1)[1]))
                for name, env in variants.items():
                    process, base = stack.start_service(version_dir, redis.url, workers, args.ort_threads,
                                                        workdir / f"service-{name}.log", extra_env=server_env(env))
                    servers[name] = (process, int(base.rsplit(":", 1)[1]))
                if not args.skip_naive:
                    servers["naive"] = start_naive(checkpoint, redis.url, workers, workdir / "naive.log")
                calls = seconds = ceiling_cpu = 0.0
                ceiling_calls = 0
                samples = {(system, c): {"latencies": [], "seconds": 0.0, "errors": [], "cpu": 0.0,
                                         "client_cpu": 0.0, "completed": 0} for system in systems for c in levels}
                # Every measurement in short blocks, round-robin, so that each sees the same background load.
                for round_ in range(args.rounds):
                    warm = args.warmup if round_ == 0 else min(args.warmup, 0.3)
                    print(f"  round {round_ + 1}/{args.rounds}: floor, ceiling, "
                          + ", ".join(f"{s} at {c}" for c in levels for s in systems), flush=True)
                    if workers == workers_list[0]:
                        out = time_model(artifact, inputs, block, warm)
                        floor["latencies"] += out["latencies"]
                        floor["seconds"] += out["seconds"]
                    cpu_before = ceiling.cpu()
                    n, secs = ceiling.block(block, warm)
                    calls, seconds = calls + n, seconds + secs
                    ceiling_cpu += ceiling.cpu() - cpu_before  # warm-up calls included on both sides:
                    ceiling_calls += n + _warm_calls(n, secs, warm)  # estimated from the measured rate
                    for c in levels:
                        for system in systems:
                            time.sleep(0.3)  # let idle PyTorch/OpenMP threads stop spinning
                            pids = [servers[system][0].pid, redis.process.pid]
                            server_before, client_before = cpu_seconds(pids), time.process_time()
                            out = run_load(servers[system][1], requests_of[system], c, block, warm,
                                           args.max_requests)
                            cell = samples[(system, c)]
                            cell["cpu"] += cpu_seconds(pids) - server_before
                            cell["client_cpu"] += time.process_time() - client_before
                            cell["completed"] += out["completed"]
                            cell["latencies"] += out["latencies"]
                            cell["seconds"] += out["seconds"]
                            cell["errors"] += out["errors"]
                results["ceiling"][workers] = {"rps": calls / seconds,
                                               "cpu_ms_per_call": 1e3 * ceiling_cpu / max(ceiling_calls, 1)}
                for (system, c), cell in samples.items():
                    entry = summarise(cell["latencies"], cell["seconds"], cell["errors"])
                    entry["cpu_ms_per_request"] = 1e3 * cell["cpu"] / max(cell["completed"], 1)
                    entry["client_cpu_ms_per_request"] = 1e3 * cell["client_cpu"] / max(cell["completed"], 1)
                    results["cells"].setdefault(f"{workers}/{c}", {})[system] = entry
            finally:
                ceiling.close()
                for process, _ in servers.values():
                    stack.stop(process)
    finally:
        redis.cleanup()
    results["floor"] = summarise(floor["latencies"], floor["seconds"])
    load["after"] = os.getloadavg()
    results["load"] = load
    print()
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    failures = sum(cell[s]["errors"] for cell in results["cells"].values() for s in cell)
    return 1 if failures else 0


def _warm_calls(measured: int, seconds: float, warmup: float) -> int:
    return int(round(measured / max(seconds, 1e-9) * warmup))


def write_naive_features(client, users: dict) -> None:
    """users.npz rows -> the naive baseline's store: one JSON string per user and feature."""
    pipe = client.pipeline(transaction=False)
    for row in range(len(users["user_ids"])):
        uid, length = str(users["user_ids"][row]), int(users["history_len"][row])
        history = [str(i) for i in users["history"][row][:length].tolist()]
        for feature, value in (("user_vec", users["user_vec"][row].tolist()),
                               ("udg_vec", users["udg_vec"][row].tolist()), ("history", history)):
            pipe.set(NAIVE_KEY.format(user_id=uid, feature=feature), json.dumps(value))
    pipe.execute()


def _users_for(version_dir: Path, inputs: list[dict]) -> dict:
    """The users.npz rows of the benchmark's users (the naive store holds only those)."""
    import numpy as np

    from repository import USERS_FILE

    with np.load(Path(version_dir) / USERS_FILE, allow_pickle=False) as npz:
        rows = np.asarray([x["row"] for x in inputs])
        return {k: npz[k][rows] for k in ("user_ids", "user_vec", "udg_vec", "history", "history_len")}


def format_table(results: dict) -> str:
    floor = results["floor"]
    cpu = f" ({results['cpu']})" if results.get("cpu") else ""
    lines = [f"N = {results['candidates']} candidates; {results['cpus']} CPUs{cpu} shared by client, servers and "
             f"Redis; "
             f"onnxruntime {results['ort_threads']} thread(s) per worker; {results['duration_s']:.0f} s per cell; "
             f"1-min load average {results['load']['before'][0]:.2f} before, {results['load']['after'][0]:.2f} after.",
             f"(a) in-process onnxruntime floor: p50 {floor['p50_ms']:.2f} ms, p99 {floor['p99_ms']:.2f} ms, "
             f"{floor['rps']:,.0f} calls/s (one process, back to back).", "",
             "| workers | conc | (a') ceiling req/s | (b) service p50 / p99 ms | (b) req/s | (c) naive p50 / p99 ms "
             "| (c) req/s | b/a p50 | b/a p99 | c/b p50 | b÷c req/s | b÷a' req/s | errors b / c |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, cell in results["cells"].items():
        workers, c = (int(v) for v in key.split("/"))
        ceiling = results["ceiling"][workers]["rps"]
        b, n = cell["service"], cell.get("naive")
        naive_cells = (f"{n['p50_ms']:.2f} / {n['p99_ms']:.2f}", f"{n['rps']:,.0f}",
                       f"{n['p50_ms'] / b['p50_ms']:.2f}", f"{b['rps'] / n['rps']:.2f}") if n else ("—",) * 4
        lines.append(f"| {workers} | {c} | {ceiling:,.0f} | {b['p50_ms']:.2f} / {b['p99_ms']:.2f} | {b['rps']:,.0f} | "
                     f"{naive_cells[0]} | {naive_cells[1]} | {b['p50_ms'] / floor['p50_ms']:.2f} | "
                     f"{b['p99_ms'] / floor['p99_ms']:.2f} | {naive_cells[2]} | {naive_cells[3]} | "
                     f"{b['rps'] / ceiling:.2f} | {b['errors']} / {n['errors'] if n else '—'} |")
    lines += ["", "CPU per request (ms; user + system, from /proc; independent of how the kernel shared the CPUs):", "",
              "| workers | conc | (a') model per call | (b) service + Redis | client | (c) naive + Redis | client | "
              "b ÷ a' CPU | projected b÷a' req/s on idle CPUs |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, cell in results["cells"].items():
        workers, c = (int(v) for v in key.split("/"))
        model = results["ceiling"][workers].get("cpu_ms_per_call")
        b, n = cell["service"], cell.get("naive")
        if model is None or "cpu_ms_per_request" not in b:
            continue
        naive = (f"{n['cpu_ms_per_request']:.2f}", f"{n['client_cpu_ms_per_request']:.2f}") if n else ("—", "—")
        lines.append(f"| {workers} | {c} | {model:.2f} | {b['cpu_ms_per_request']:.2f} | "
                     f"{b['client_cpu_ms_per_request']:.2f} | {naive[0]} | {naive[1]} | "
                     f"{b['cpu_ms_per_request'] / model:.2f} | "
                     f"{model / (b['cpu_ms_per_request'] + b['client_cpu_ms_per_request']):.2f} |")
    lines += variant_table(results)
    workers = 2 if 2 in results["ceiling"] else max(results["ceiling"])
    lines += ["", f"Targets ({workers} worker{'s' if workers > 1 else ''}):"]
    busiest = max((int(k.split("/")[1]) for k in results["cells"] if int(k.split("/")[0]) == workers), default=None)
    calmest = min((int(k.split("/")[1]) for k in results["cells"] if int(k.split("/")[0]) == workers), default=None)
    if busiest is not None:
        cell = results["cells"][f"{workers}/{busiest}"]
        b = cell["service"]
        checks = []
        if "naive" in cell:
            checks.append((f"service req/s >= {TARGETS['service_vs_naive_rps']:g}x naive (conc {busiest})",
                           b["rps"] / cell["naive"]["rps"], TARGETS["service_vs_naive_rps"], True))
        checks.append((f"service req/s >= {TARGETS['service_vs_ceiling_rps']:.0%} of the model-only ceiling "
                       f"(conc {busiest})", b["rps"] / results["ceiling"][workers]["rps"],
                       TARGETS["service_vs_ceiling_rps"], True))
        b1 = results["cells"][f"{workers}/{calmest}"]["service"]
        checks.append((f"service p99 <= {TARGETS['service_p99_vs_floor_p99']:g}x the floor's p99 (conc {calmest})",
                       b1["p99_ms"] / floor["p99_ms"], TARGETS["service_p99_vs_floor_p99"], False))
        model_cpu = results["ceiling"][workers].get("cpu_ms_per_call")
        if model_cpu and "cpu_ms_per_request" in b:
            # The same targets from CPU per request, which background load does not skew: what the ratios
            # would be with the CPUs to ourselves (client included, as in the measured run).
            service_cpu = b["cpu_ms_per_request"] + b["client_cpu_ms_per_request"]
            if "naive" in cell:
                naive_cpu = cell["naive"]["cpu_ms_per_request"] + cell["naive"]["client_cpu_ms_per_request"]
                checks.append((f"CPU-based: service req/s per CPU >= {TARGETS['service_vs_naive_rps']:g}x naive's "
                               f"(conc {busiest})", naive_cpu / service_cpu, TARGETS["service_vs_naive_rps"], True))
            checks.append((f"CPU-based: service >= {TARGETS['service_vs_ceiling_rps']:.0%} of the ceiling on idle CPUs "
                           f"(conc {busiest})", model_cpu / service_cpu, TARGETS["service_vs_ceiling_rps"], True))
        for name in ["service", *results.get("variants", {})]:
            checks += serving_checks(results, workers, calmest, busiest, name)
        errors = sum(cell[s]["errors"] for cell in results["cells"].values() for s in cell)
        for text, value, target, higher in checks:
            ok = value >= target if higher else value <= target
            lines.append(f"- {text}: {value:.2f} — {'met' if ok else 'MISSED'}")
        lines.append(f"- failures: {errors} — {'met' if errors == 0 else 'MISSED'}")
    return "\n".join(lines)


def variant_table(results: dict) -> list[str]:
    """With --variant: the service and each variant side by side, per cell (same rounds, same load)."""
    variants = results.get("variants") or {}
    if not variants:
        return []
    floor = results["floor"]
    lines = ["", "Service variants, measured in the same rounds (" + "; ".join(
                 f"{name}: {', '.join(f'{k}={v}' for k, v in env.items())}" for name, env in variants.items()) + "):",
             "", "| workers | conc | service | p50 / p99 ms | req/s | ÷ service req/s | p50 − floor p50 ms | "
             "CPU ms / request | ÷ model CPU | projected ÷ ceiling on idle CPUs |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, cell in results["cells"].items():
        workers, c = (int(v) for v in key.split("/"))
        model = results["ceiling"][workers]["cpu_ms_per_call"]
        base = cell["service"]
        for name in ["service", *variants]:
            b = cell[name]
            cpu = b["cpu_ms_per_request"]
            lines.append(f"| {workers} | {c} | {name} | {b['p50_ms']:.2f} / {b['p99_ms']:.2f} | {b['rps']:,.0f} | "
                         f"{b['rps'] / base['rps']:.2f} | {b['p50_ms'] - floor['p50_ms']:.2f} | {cpu:.2f} | "
                         f"{cpu / model:.2f} | {model / (cpu + b['client_cpu_ms_per_request']):.2f} |")
    return lines


def serving_checks(results: dict, workers: int, calmest: int, busiest: int, name: str) -> list[tuple]:
    """The serving path's own targets for one service system: CPU per request against the model call
    (busiest cell), the median above the in-process call (calmest), throughput against the ceiling from CPU."""
    if "variants" not in results:  # journals written before these checks were printed
        return []
    model = results["ceiling"][workers]["cpu_ms_per_call"]
    busy, calm = results["cells"][f"{workers}/{busiest}"][name], results["cells"][f"{workers}/{calmest}"][name]
    return [(f"{name}: CPU per request <= {TARGETS['cpu_vs_model']:g}x the model call (conc {busiest})",
             busy["cpu_ms_per_request"] / model, TARGETS["cpu_vs_model"], False),
            (f"{name}: p50 <= floor p50 + {TARGETS['p50_above_floor_ms']:g} ms (conc {calmest}), ms above",
             calm["p50_ms"] - results["floor"]["p50_ms"], TARGETS["p50_above_floor_ms"], False),
            (f"{name}: CPU-based >= {TARGETS['service_vs_ceiling_rps']:.0%} of the ceiling (conc {busiest})",
             model / (busy["cpu_ms_per_request"] + busy["client_cpu_ms_per_request"]),
             TARGETS["service_vs_ceiling_rps"], True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
