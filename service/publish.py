"""`udg publish MODEL_REPO/V`: bulk-load version V's per-user state into the Redis feature store.

It lives in `service/` rather than `export/` because it writes the feature store's key layout and codecs
(`service.feature_store`), which must stay byte-identical to what the service reads, and because it runs on
the serving install (numpy + redis, no torch): `export/` turns PyTorch into files, `service/` owns Redis.

What is written, per user of `users.npz` (read with `allow_pickle=False`):
- the version's embeddings `udg:e:V:{uid}`: always (re)written — they belong to this version;
- the click history and profile (version independent): only if absent (`SET NX`), so republishing, or
  publishing a second version, never rolls back clicks that arrived after the training snapshot
  (`--overwrite-shared` replaces them, e.g. to reset a test environment).

Idempotent: a rerun writes the same values. The completion marker `udg:published:V` is deleted first and set
last (with the manifest's sha256 and the user count), so an interrupted publish leaves the version
unactivatable (the service refuses a version without a matching marker) until a rerun completes.
Pipelined: `chunk` users per round trip, as two commands (an MSET of the embeddings and one Lua call that does
SET NX per shared key), which keeps the client's per-command cost out of the way (3 commands per user through
redis-py ran at ~8k users/s here, client-bound). Multi-key commands assume one Redis (not a Cluster: there,
keys would have to be grouped by slot first).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

from repository import MANIFEST_FILE, USERS_FILE, ArtifactError, manifest_sha256, read_manifest
from service.feature_store import SEP, Keys, pack_embedding_rows

log = logging.getLogger(__name__)
# SET NX for many keys in one command (MSETNX is all-or-nothing, this is per key).
SET_NX_ALL = "for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i], 'NX') end return #KEYS"
USERS_ARRAYS = ("user_ids", "user_vec", "udg_vec", "history", "history_len", "profile", "profile_fields")


class PublishError(RuntimeError):
    pass


@dataclass
class PublishResult:
    version: str
    users: int
    seconds: float
    marker: dict


def load_users(path: Path) -> dict[str, np.ndarray]:
    """users.npz -> arrays, checked (no pickles, consistent lengths, ids free of the history separator)."""
    with np.load(path, allow_pickle=False) as npz:
        missing = [name for name in USERS_ARRAYS if name not in npz.files]
        if missing:
            raise PublishError(f"{path}: missing arrays {missing}")
        arrays = {name: npz[name] for name in USERS_ARRAYS}
    n = len(arrays["user_ids"])
    for name in ("user_vec", "udg_vec", "history", "history_len", "profile"):
        if len(arrays[name]) != n:
            raise PublishError(f"{path}: {name} has {len(arrays[name])} rows for {n} users")
    if n and (np.char.str_len(arrays["user_ids"]) == 0).any():
        raise PublishError(f"{path}: empty user id")
    if n and np.char.find(arrays["history"], SEP).max(initial=-1) >= 0:
        raise PublishError(f"{path}: an item id contains the history separator \\x1f")
    return arrays


def version_dir_info(path: Path) -> tuple[str, dict, str]:
    """MODEL_REPO/V -> (version, manifest, sha256 of the manifest file)."""
    if not (Path(path) / MANIFEST_FILE).is_file():
        raise PublishError(f"{path}: no {MANIFEST_FILE}; expected a version directory written by `udg export`")
    try:
        manifest = read_manifest(path, validate=False)  # the service validates it when it loads the version
    except ArtifactError as error:
        raise PublishError(str(error)) from None
    version = str(manifest.get("version") or Path(path).name)
    return version, manifest, manifest_sha256(path)


def _chunks(arrays: dict[str, np.ndarray], chunk: int):
    n = len(arrays["user_ids"])
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def publish(path: Path, redis_client, keys: Keys | None = None, chunk: int = 2000, overwrite_shared: bool = False,
            progress: bool = True, users: dict[str, np.ndarray] | None = None) -> PublishResult:
    """Load MODEL_REPO/V/users.npz into Redis (sync client); see the module docstring."""
    from tqdm import tqdm

    keys = keys or Keys()
    path = Path(path)
    version, manifest, manifest_sha = version_dir_info(path)
    arrays = users if users is not None else load_users(path / USERS_FILE)
    dims = manifest.get("dims", {})
    user_dim, udg_dim = arrays["user_vec"].shape[1], arrays["udg_vec"].shape[1]
    if dims and (dims.get("user_dim"), dims.get("udg_dim")) != (user_dim, udg_dim):
        raise PublishError(f"{path}: {USERS_FILE} dims ({user_dim}, {udg_dim}) differ from the manifest's "
                           f"({dims.get('user_dim')}, {dims.get('udg_dim')})")
    fields = [str(f) for f in arrays["profile_fields"].tolist()]
    n = len(arrays["user_ids"])
    started = time.perf_counter()
    redis_client.delete(keys.marker(version))
    nx = not overwrite_shared
    bar = tqdm(total=n, unit="users", desc=f"publish {version}", disable=not progress, unit_scale=True)
    for lo, hi in _chunks(arrays, chunk):
        ids = arrays["user_ids"][lo:hi].tolist()
        packed = pack_embedding_rows(arrays["user_vec"][lo:hi], arrays["udg_vec"][lo:hi])
        history = arrays["history"][lo:hi].tolist()
        history_len = arrays["history_len"][lo:hi].tolist()
        profiles = arrays["profile"][lo:hi].tolist()
        embeddings, shared = [], []
        for row, uid in enumerate(ids):
            embeddings += (keys.embeddings(version, uid), packed[row].tobytes())
            length = history_len[row]
            if length:
                shared += (keys.history(uid), SEP.join(history[row][:length]))
            profile = {f: v for f, v in zip(fields, profiles[row], strict=True) if v != ""}
            if profile:
                shared += (keys.profile(uid), orjson.dumps(profile, option=orjson.OPT_SORT_KEYS))
        pipe = redis_client.pipeline(transaction=False)
        pipe.execute_command("MSET", *embeddings)
        if shared:
            if nx:
                pipe.execute_command("EVAL", SET_NX_ALL, len(shared) // 2, *shared[0::2], *shared[1::2])
            else:
                pipe.execute_command("MSET", *shared)
        pipe.execute()
        bar.update(hi - lo)
    bar.close()
    seconds = time.perf_counter() - started
    marker = {"version": version, "users": n, "manifest_sha256": manifest_sha, "user_dim": user_dim,
              "udg_dim": udg_dim, "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "seconds": round(seconds, 3)}
    redis_client.set(keys.marker(version), orjson.dumps(marker))
    log.info("published %s: %d users in %.1f s", version, n, seconds)
    return PublishResult(version, n, seconds, marker)


def redis_used_memory(redis_client) -> int:
    return int(redis_client.info("memory")["used_memory"])


def sync_redis(url: str, timeout_s: float = 30.0, ca_certs: str | None = None):
    """A plain (blocking) redis-py client for bulk work."""
    import redis

    kwargs = dict(socket_timeout=timeout_s, socket_connect_timeout=min(timeout_s, 10.0))
    if ca_certs and url.startswith("rediss://"):
        kwargs["ssl_ca_certs"] = ca_certs
    return redis.Redis.from_url(url, **kwargs)
