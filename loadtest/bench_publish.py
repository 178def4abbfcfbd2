"""`udg publish` at scale: N synthetic users (default 1,000,000) with a real version's dims -> a private
redis-server; prints the time, throughput and Redis memory (used_memory, per user).

    python -m loadtest.bench_publish [--users 1000000] [--model-repo runs/quickstart/model_repo] [--version V]

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--model-repo", default="runs/quickstart/model_repo")
    parser.add_argument("--version", default=None)
    parser.add_argument("--chunk", type=int, default=2000)
    args = parser.parse_args(argv)

    from repository import ModelRepository
    from service.local_redis import RedisServer, free_port, redis_server_binary
    from service.publish import publish, redis_used_memory, sync_redis, version_dir_info

    repo = Path(args.model_repo)
    version = args.version or ModelRepository(repo).newest()
    _, manifest, _ = version_dir_info(repo / version)
    dims = manifest["dims"]
    started = time.perf_counter()
    profile = {f["name"]: f["vocab"]["tokens"] for f in manifest["features"]["user_fields"]}
    users = synthetic_users(args.users, dims["user_dim"], dims["udg_dim"], dims["max_history"], profile)
    print(f"generated {args.users:,d} synthetic users ({dims}) in {time.perf_counter() - started:.1f} s; mean "
          f"history {users['history_len'].mean():.1f} items", flush=True)
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
