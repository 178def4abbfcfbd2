"""Where a saturated worker's time goes: `udg serve` (1 worker) under the bench-compare load, sampled by py-spy.

    python -m loadtest.profile_service [--workdir runs/bench_compare] [--env UDG_STATE_CACHE=true] \\
        [--body msgpack] [--concurrency 4] [--seconds 15] [--json JOURNAL] | --report JOURNAL

Uses bench compare's model (trained into --workdir once), request bodies and load generator; py-spy (`pip install
py-spy`) records the worker process with native frames off, and the summary prints the share of samples whose
stack contains each of a few markers (onnxruntime, the socket writes, the Redis client, ...), plus the top
leaf functions. Shares, not times: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

MARKERS = {  # label -> substrings of a frame ("function (file)", no line numbers) that put a sample in that bucket
    "the score route, all of it": ["score (service/api/score.py)", "FastScore._score (service/fast_score.py)"],
    "Scorer.score, all of it": ["Scorer.score (service/scoring.py)"],
    "onnxruntime run": ["run (onnxruntime/"],
    "Redis client": ["(redis/"],
    "state cache lookup/store": ["(service/state_cache.py)"],
    "metrics": ["(prometheus_client/"],
    "response encode (orjson / msgpack)": ["encode (service/api/bodies.py)"],
    "request parse (pydantic, msgpack)": ["decode (service/api/bodies.py)"],
    "id encoding": ["encode_items"],
    "FastAPI dependency solving": ["solve_dependencies (fastapi/"],
    "uvicorn's response send, all of it": ["RequestResponseCycle.send (uvicorn/"],
    "HTTP parsing (httptools callbacks, uvicorn)": ["data_received (service/http_server.py)"],
    "the request-id layer, outside the route": ["RequestContext.__call__ (service/request_context.py)"],
}
# The socket writes of the response are C calls: a sample inside one ends in the Python frame that made it.
LEAF_MARKERS = {"socket write of the response (leaf)": ["write (service/http_server.py)",
                                                        "send (uvicorn/protocols/http/httptools_impl.py)"]}


def summarise(raw: Path, top: int = 25) -> dict:
    """py-spy's --format raw (collapsed stacks: "frame;frame;... count") -> sample counts per bucket and the top
    leaf frames (the journal: small, and `render` prints it)."""
    total, buckets, leaves = 0, Counter(), Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        leaf = stack.split(";")[-1]
        for label, needles in MARKERS.items():
            if any(needle in stack for needle in needles):
                buckets[label] += n
        for label, needles in LEAF_MARKERS.items():
            if any(needle in leaf for needle in needles):
                buckets[label] += n
        leaves[leaf] += n
    return {"samples": total, "buckets": {label: buckets[label] for label in [*MARKERS, *LEAF_MARKERS]},
            "leaves": leaves.most_common(top)}


def render(journal: dict) -> str:
    total = max(journal["samples"], 1)
    lines = [f"{journal['samples']} samples of one saturated worker ({journal.get('setup', '')}); 1-min load average "
             f"{journal['load'][0]:.2f} before, {journal['load'][1]:.2f} after.", "",
             "| where (a sample counts in every bucket its stack touches) | share of samples |", "|---|---:|"]
    lines += [f"| {label} | {100 * n / total:.1f} % |" for label, n in journal["buckets"].items()]
    lines += ["", "| top leaf frames | share |", "|---|---:|"]
    lines += [f"| `{frame}` | {100 * n / total:.1f} % |" for frame, n in journal["leaves"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from loadtest import bench_compare, stack

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="runs/bench_compare")
    parser.add_argument("--version", default="bench")
    parser.add_argument("--candidates", type=int, default=500)
    parser.add_argument("--bodies", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--env", action="append", default=[], help="ENV=VALUE for the service; repeatable")
    parser.add_argument("--body", choices=("json", "msgpack"), default="json", help="score request bodies")
    parser.add_argument("--json", default=None, help="also write the summary here (the journal)")
    parser.add_argument("--report", default=None, help="print the tables of a journal written by --json; no run")
    args = parser.parse_args(argv)
    if args.report:
        print(render(json.loads(Path(args.report).read_text())))
        return 0
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2

    from export.runtime import open_artifact

    version_dir = stack.ensure_model(None, args.version, Path(args.workdir), small=False)
    artifact = open_artifact(version_dir, providers=["CPUExecutionProvider"], threads=1)
    inputs = bench_compare.make_inputs(artifact, args.candidates, args.bodies)
    requests = bench_compare.score_requests(inputs, args.body)
    env = dict(item.split("=", 1) for item in args.env)
    load_before = os.getloadavg()[0]
    redis = stack.start_redis()
    try:
        stack.publish_version(version_dir, redis.url)
        process, base = stack.start_service(version_dir, redis.url, 1, 1, Path(args.workdir) / "profile.log",
                                            extra_env=env)
        port = int(base.rsplit(":", 1)[1])
        try:
            import psutil

            workers = psutil.Process(process.pid).children(recursive=True)
            pid = workers[0].pid if workers else process.pid
            raw = Path(args.workdir) / "profile.raw"
            bench_compare.run_load(port, requests, args.concurrency, 2.0, 0.5, 10**6)  # warm
            load = threading.Thread(target=bench_compare.run_load,
                                    args=(port, requests, args.concurrency, args.seconds + 2, 0.0, 10**7))
            load.start()
            subprocess.run([py_spy, "record", "--pid", str(pid), "--duration", str(int(args.seconds)), "--rate",
                            str(args.rate), "--format", "raw", "--output", str(raw), "--nonblocking", "--nolineno"],
                           check=True, stdout=subprocess.DEVNULL)
            load.join()
        finally:
            stack.stop(process)
    finally:
        redis.cleanup()
    journal = summarise(raw)
    journal["load"] = [load_before, os.getloadavg()[0]]
    journal["setup"] = (f"1 worker, N = {args.candidates}, {args.bodies} users cycled, concurrency {args.concurrency}, "
                        f"{args.seconds:g} s at {args.rate} Hz" + "".join(f", {k}={v}" for k, v in env.items())
                        + (f", {args.body} bodies" if args.body != "json" else ""))
    print(render(journal))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(journal, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
