"""`udg publish` at scale: N synthetic users (default 1,000,000) with a real version's dims -> a private
redis-server; prints the time, throughput and Redis memory (used_memory, per user).

    python -m loadtest.bench_publish [--users 1000000] [--model-repo runs/quickstart/model_repo] [--version V]
    python -m loadtest.bench_publish --cluster --users 200000 --journal docs/results/cluster/bench.json
    python -m loadtest.bench_publish --table docs/results/cluster/bench.json     # the table from a journal

`--cluster` measures, in one run, one redis-server and a local Redis Cluster (3 primaries + 3 replicas on this
machine): publish throughput, memory per user (used_memory summed over the primaries; the replicas hold as
much again), and the latency of one user's event write (the events endpoint's Redis call, one at a time)
with and without `WAIT 1` (UDG_EVENTS_WAIT_REPLICAS=1); `--journal` keeps the figures, `--table` prints them.
Without a model repository a small synthetic model is trained first (results/bench_publish/).

Synthetic users: random float32 embeddings of the version's sizes, a click history of uniform length
0..max_history over a 1,682-item catalogue (ids like "i1234"), a three-field profile.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def synthetic_users(n: int, user_dim: int, udg_dim: int, max_history: int, profile: dict[str, list[str]],
                    seed: int = 0) -> dict[str, np.ndarray]:
    """N users with random vectors and histories; each profile field's value drawn from its vocabulary."""
    rng = np.random.default_rng(seed)
    items = np.char.add("i", np.arange(1682).astype(str))
    history_len = rng.integers(0, max_history + 1, size=n)
    history = items[rng.integers(0, len(items), size=(n, max_history))]
    history[np.arange(max_history)[None, :] >= history_len[:, None]] = ""
    return {
        "user_ids": np.char.add("user", np.arange(n).astype(str)),
        "user_vec": rng.normal(0, 0.05, size=(n, user_dim)).astype(np.float32),
        "udg_vec": rng.normal(0, 0.05, size=(n, udg_dim)).astype(np.float32),
        "history": history,
        "history_len": history_len.astype(np.int64),
        "profile": np.stack([np.array(tokens or [""])[rng.integers(0, max(len(tokens), 1), n)]
                             for tokens in profile.values()], axis=1) if profile else np.zeros((n, 0), str),
        "profile_fields": np.array(list(profile), dtype=str),
    }


def event_latency(url: str, wait_replicas: int, n: int = 2000) -> dict:
    """p50/p99 (ms) of `n` single-user click writes (FeatureStore.append_clicks), one at a time."""
    import asyncio

    from service.feature_store import FeatureStore, create_redis
    from service.redis_layout import Click, RedisLayout

    async def run() -> list[float]:
        store = FeatureStore(create_redis(url, 2.0, 8), RedisLayout(wait_replicas=wait_replicas, wait_timeout_ms=500))
        seconds = []
        try:
            await store.ping()
            for i in range(n):
                started = time.perf_counter()
                await store.append_clicks({f"bench{i % 500}": ([Click(f"i{i}", event_id=f"b{i}")], None)})
                seconds.append(time.perf_counter() - started)
        finally:
            await store.close()
        return seconds

    seconds = np.array(asyncio.run(run())[n // 10:]) * 1000  # the first tenth warms the connections up
    p50, p99 = np.percentile(seconds, [50, 99])
    return {"p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3), "n": len(seconds)}


def backend_run(name: str, url: str, client, repo: Path, version: str, users: dict, chunk: int) -> dict:
    from service.publish import publish, redis_used_memory

    base = redis_used_memory(client)  # summed over the primaries on a cluster
    result = publish(repo / version, client, chunk=chunk, users=users, progress=False)
    used = redis_used_memory(client) - base
    row = {"backend": name, "users": result.users, "publish_s": round(result.seconds, 2),
           "users_per_s": round(result.users / result.seconds), "bytes_per_user": round(used / result.users),
           "events_no_wait": event_latency(url, 0)}
    if name == "cluster":
        row["events_wait_1"] = event_latency(url, 1)
    print(f"{name}: {row}", flush=True)
    return row


def print_table(journal: dict) -> None:
    print(f"{journal['users']:,d} synthetic users, dims {journal['dims']}, chunk {journal['chunk']}; "
          f"{journal['machine']}\n")
    print("| backend | publish (s) | users/s | bytes/user (primaries) | event write p50 / p99 (ms) | "
          "with WAIT 1 p50 / p99 (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in journal["rows"]:
        wait = row.get("events_wait_1")
        print(f"| {row['backend']} | {row['publish_s']} | {row['users_per_s']:,d} | {row['bytes_per_user']:,d} | "
              f"{row['events_no_wait']['p50_ms']} / {row['events_no_wait']['p99_ms']} | "
              + (f"{wait['p50_ms']} / {wait['p99_ms']} |" if wait else "— |"))
    single, cluster = journal["rows"][0], journal["rows"][-1]
    print(f"\ncluster / single: publish throughput x{cluster['users_per_s'] / single['users_per_s']:.2f}, event "
          f"write p50 x{cluster['events_no_wait']['p50_ms'] / single['events_no_wait']['p50_ms']:.2f}; WAIT 1 "
          f"adds {cluster['events_wait_1']['p50_ms'] - cluster['events_no_wait']['p50_ms']:.3f} ms at p50")


def cluster_main(args, repo: Path, version: str, users: dict, dims: dict) -> int:
    """One redis-server and a local cluster, the same users published to each: the table."""
    import json
    import os

    from service.local_redis import LocalCluster, RedisServer, free_port, redis_server_binary
    from service.publish import sync_redis

    binary = redis_server_binary()
    rows = []
    server = RedisServer(binary, free_port()).start()
    try:
        client = sync_redis(server.url, timeout_s=120)
        rows.append(backend_run("single", server.url, client, repo, version, users, args.chunk))
    finally:
        server.cleanup()
    cluster = LocalCluster(binary).start()
    try:
        client = sync_redis(cluster.url, timeout_s=120)
        rows.append(backend_run("cluster", cluster.url, client, repo, version, users, args.chunk))
    finally:
        cluster.cleanup()
    journal = {"users": args.users, "dims": {k: dims[k] for k in ("user_dim", "udg_dim", "max_history")},
               "chunk": args.chunk, "rows": rows, "machine": f"{os.cpu_count()} cores, shared (loaded) machine; "
               f"cluster = 3 primaries + 3 replicas on the same host"}
    if args.journal:
        Path(args.journal).parent.mkdir(parents=True, exist_ok=True)
        Path(args.journal).write_text(json.dumps(journal, indent=2) + "\n")
    print()
    print_table(journal)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--model-repo", default="runs/quickstart/model_repo")
    parser.add_argument("--version", default=None)
    parser.add_argument("--chunk", type=int, default=2000)
    parser.add_argument("--cluster", action="store_true", help="one redis-server next to a local Redis Cluster")
    parser.add_argument("--journal", default=None, help="with --cluster: write the figures to this JSON file")
    parser.add_argument("--table", default=None, metavar="JOURNAL", help="print the table of a --cluster journal")
    args = parser.parse_args(argv)
    if args.table:
        import json

        print_table(json.loads(Path(args.table).read_text()))
        return 0

    from repository import ModelRepository
    from service.local_redis import RedisServer, free_port, redis_server_binary
    from service.publish import publish, redis_used_memory, sync_redis, version_dir_info

    repo = Path(args.model_repo)
    if args.cluster and not repo.is_dir():
        from loadtest.stack import ensure_model

        repo = ensure_model(None, "v1", Path("results/bench_publish")).parent
    version = args.version or ModelRepository(repo).newest()
    _, manifest, _ = version_dir_info(repo / version)
    dims = manifest["dims"]
    started = time.perf_counter()
    profile = {f["name"]: f["vocab"]["tokens"] for f in manifest["features"]["user_fields"]}
    users = synthetic_users(args.users, dims["user_dim"], dims["udg_dim"], dims["max_history"], profile)
    print(f"generated {args.users:,d} synthetic users ({dims}) in {time.perf_counter() - started:.1f} s; mean "
          f"history {users['history_len'].mean():.1f} items", flush=True)
    if args.cluster:
        return cluster_main(args, repo, version, users, dims)
    binary = redis_server_binary()
    server = RedisServer(binary, free_port()).start()
    try:
        client = sync_redis(server.url, timeout_s=120)
        base = redis_used_memory(client)
        result = publish(repo / version, client, chunk=args.chunk, users=users)
        info = client.info("memory")
        keys = client.dbsize()
        used = info["used_memory"] - base
        print(f"\npublish of {result.users:,d} users: {result.seconds:.1f} s ({result.users / result.seconds:,.0f} "
              f"users/s), {keys:,d} keys")
        print(f"Redis ({binary}, {client.info('server')['redis_version']}): used_memory +{used / 2**20:,.0f} MiB "
              f"({used / result.users:,.0f} B/user), used_memory_rss {info['used_memory_rss'] / 2**20:,.0f} MiB")
        started = time.perf_counter()
        again = publish(repo / version, client, chunk=args.chunk, users=users, progress=False)
        print(f"republish (idempotent, same keys): {again.seconds:.1f} s, {client.dbsize():,d} keys, "
              f"used_memory +{(client.info('memory')['used_memory'] - base) / 2**20:,.0f} MiB")
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
