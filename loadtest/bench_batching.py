"""Cross-request batching, model only: U users' requests as U one-user calls vs ONE multi-user call.

    python -m loadtest.bench_batching MODEL_DIR [--users 1,2,4,8,16] [--sizes 100,500] [--threads 1]
                                      [--json J] [--report J]

For each N (candidates per request) and U (requests batched together): per-request cost of U back-to-back
`Artifact.score` calls and of one `Artifact.score_many` call over the same U requests (known users with their
histories, random candidates), medians of interleaved blocks, and the speed-up. Candidates/s = U * N / time.
No torch: it measures what the service's micro-batcher calls. Not a test: it prints a table (and a journal).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np


def build_requests(artifact, users: dict, count: int, n: int, rng) -> list[tuple]:
    rows = rng.choice(len(users["user_ids"]), size=count, replace=count > len(users["user_ids"]))
    known = np.arange(2, artifact.schema.items.known_size)
    out = []
    for row in rows:
        candidates = rng.choice(known, size=min(n, len(known)), replace=False).astype(np.int64)
        history = users["history_idx"][row][:users["history_len"][row]]
        out.append((users["user_vec"][row], users["udg_vec"][row] if artifact.udg_dim else None, history,
                    candidates, None))
    return out


def measure(artifact, requests: list[tuple], blocks: int, per_block: int) -> dict[str, float]:
    """Median seconds per batch of U requests: one call each ("single") and one multi-user call ("batched")."""
    single, batched = [], []
    for _ in range(3):  # warm both sessions at this shape
        artifact.score_many(requests)
        for request in requests:
            artifact.score(*request)
    for _ in range(blocks):
        for _ in range(per_block):
            started = time.perf_counter()
            for request in requests:
                artifact.score(*request)
            single.append(time.perf_counter() - started)
        for _ in range(per_block):
            started = time.perf_counter()
            artifact.score_many(requests)
            batched.append(time.perf_counter() - started)
    return {"single_s": statistics.median(single), "batched_s": statistics.median(batched)}


def report(journal: dict) -> None:
    cpu = f" ({journal['cpu']})" if journal.get("cpu") else ""
    print(f"model {journal['version']}, {journal['threads']} onnxruntime thread(s); machine: {journal['cpus']} "
          f"CPUs{cpu}, "
          f"1-min load average {journal['load_before']} before, {journal['load_after']} after")
    print("\n| N | users per call | one call per user ms | one multi-user call ms | speed-up | cand/s single | "
          "cand/s batched |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in journal["rows"]:
        total = row["users"] * row["n"]
        print(f"| {row['n']} | {row['users']} | {row['single_s'] * 1e3:.3f} | {row['batched_s'] * 1e3:.3f} | "
              f"{row['single_s'] / row['batched_s']:.2f} | {total / row['single_s']:,.0f} | "
              f"{total / row['batched_s']:,.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?")
    parser.add_argument("--users", default="1,2,4,8,16")
    parser.add_argument("--sizes", default="100,500")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--per-block", type=int, default=10)
    parser.add_argument("--json", default=None)
    parser.add_argument("--report", default=None, help="print the table of a journal written by --json; no run")
    args = parser.parse_args(argv)
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return 0
    if not args.model_dir:
        parser.error("MODEL_DIR is required (or --report)")

    from export.runtime import open_artifact

    artifact = open_artifact(args.model_dir, providers=["CPUExecutionProvider"], threads=args.threads)
    if not artifact.can_batch:
        parser.error(f"{args.model_dir} has no multi-user graph (export it again)")
    users = artifact.load_users()
    rng = np.random.default_rng(0)
    from loadtest.bench_model import cpu_model

    journal = {"version": artifact.version, "threads": args.threads, "cpus": os.cpu_count(), "cpu": cpu_model(),
               "load_before": round(os.getloadavg()[0], 2), "rows": []}
    for n in [int(x) for x in args.sizes.split(",")]:
        for count in [int(x) for x in args.users.split(",")]:
            requests = build_requests(artifact, users, count, n, rng)
            journal["rows"].append({"n": n, "users": count, **measure(artifact, requests, args.blocks,
                                                                       args.per_block)})
    journal["load_after"] = round(os.getloadavg()[0], 2)
    report(journal)
    if args.json:
        Path(args.json).write_text(json.dumps(journal, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
