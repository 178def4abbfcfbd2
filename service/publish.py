"""`udg publish MODEL_REPO/V`: bulk-load version V's per-user state into the Redis feature store.

It lives in `service/` rather than `export/` because it writes the feature store through its layout
(`service.redis_layout.RedisLayout`: the keys and codecs the service reads), and because it runs on the
serving install (numpy + redis, no torch): `export/` turns PyTorch into files, `service/` owns Redis.

What is written, per user of `users.npz` (read with `allow_pickle=False`):
- the version's embeddings `udg:e:V:{uid}`: always (re)written — they belong to this version;
- the click history and profile (version independent): only if absent (`SET NX`), so republishing, or
  publishing a second version, never rolls back clicks that arrived after the training snapshot
  (`--overwrite-shared` replaces them, e.g. to reset a test environment).

**State lost, then republished.** A publish into a Redis that holds no complete publish marker of any version
(fresh, or restarted empty / wiped) MERGES histories: a user's live clicks already there (received since the
loss, tagged as live entries) stay on top and the published snapshot goes below them, instead of the snapshot
being dropped (SET NX) — and a rerun after an interrupted run gives the same result. The first such publish
also creates the data epoch (`udg:{ctl}:epoch`, copied into every hash slot) the workers watch to detect a
loss (a publish that finds a slot's copy missing — a wiped cluster node — renews it and merges the same way);
every marker records the epoch it was written in, and a worker that detected a loss serves again once every
serving version has a marker of the current epoch (service/control.py). Clicks received between the training
snapshot and the loss are lost (they were only in Redis): that is what Redis persistence (AOF) is for, see
docs/serving.md.

**The version's name** is its directory's name (what the service, the routing and `udg gc` use); a manifest
naming another version (a copied folder) is refused: export it again under the new name.

Idempotent: a rerun writes the same values. The completion marker `udg:{ctl}:published:V` is deleted first and set
last (with the manifest's sha256 and the user count), so an interrupted publish leaves the version
unactivatable (the service refuses a version without a matching marker) until a rerun completes.
Pipelined: `chunk` users per round trip (`RedisLayout.write_batch`: two commands per chunk on one node, see
there why; on a Redis Cluster the commands are per hash slot and the pipeline sends each node its part).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from repository import MANIFEST_FILE, USERS_FILE, ArtifactError, manifest_sha256, read_manifest
from service.redis_layout import LAYOUT_FORMAT, LIVE_TAG, SEP, RedisLayout

log = logging.getLogger(__name__)
USERS_ARRAYS = ("user_ids", "user_vec", "udg_vec", "history", "history_len", "profile", "profile_fields")


class PublishError(RuntimeError):
    pass


@dataclass
class PublishResult:
    version: str
    users: int
    seconds: float
    marker: dict
    merged: int = 0  # histories merged (a publish into a Redis holding no complete publish)


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
    if n and (np.char.find(arrays["history"], SEP).max(initial=-1) >= 0 or
              np.char.find(arrays["history"], LIVE_TAG.decode()).max(initial=-1) >= 0):
        raise PublishError(f"{path}: an item id contains the history separator \\x1f or the live tag \\x1e")
    return arrays


def version_dir_info(path: Path) -> tuple[str, dict, str]:
    """MODEL_REPO/V -> (version, manifest, sha256 of the manifest file)."""
    if not (Path(path) / MANIFEST_FILE).is_file():
        raise PublishError(f"{path}: no {MANIFEST_FILE}; expected a version directory written by `udg export`")
    try:
        manifest = read_manifest(path, validate=False)  # the service validates it when it loads the version
    except ArtifactError as error:
        raise PublishError(str(error)) from None
    version = Path(path).resolve().name
    if manifest.get("version") not in (None, version):
        raise PublishError(f"{path}: the directory is named {version!r} but its manifest is version "
                           f"{manifest.get('version')!r} (a copied folder?); the service serves a directory "
                           "only under the name its manifest gives, so export the version again under that "
                           "name (`udg export ... --version NAME`) instead of copying it")
    return version, manifest, manifest_sha256(path)


def _chunks(arrays: dict[str, np.ndarray], chunk: int):
    n = len(arrays["user_ids"])
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def publish(path: Path, redis_client, layout: RedisLayout | None = None, chunk: int = 2000,
            overwrite_shared: bool = False, progress: bool = True,
            users: dict[str, np.ndarray] | None = None) -> PublishResult:
    """Load MODEL_REPO/V/users.npz into Redis (sync client); see the module docstring."""
    from tqdm import tqdm

    layout = layout or RedisLayout()
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
    had_marker = layout.any_marker(redis_client)  # before our own marker is cleared
    # Renewed: a part of the store (a wiped cluster node) lost its state although markers survived elsewhere.
    layout.clear_marker(redis_client, version)
    epoch, renewed = layout.ensure_epoch(redis_client, f"publish {version}")
    merge = not overwrite_shared and (not had_marker or renewed)
    merged = 0
    bar = tqdm(total=n, unit="users", desc=f"publish {version}", disable=not progress, unit_scale=True)
    for lo, hi in _chunks(arrays, chunk):
        # users.npz rows -> raw ids, histories cut to their length, {field: value} profiles ("" = missing)
        history_len = arrays["history_len"][lo:hi].tolist()
        histories = [row[:length] for row, length in zip(arrays["history"][lo:hi].tolist(), history_len, strict=True)]
        profiles = [dict(zip(fields, row, strict=True)) for row in arrays["profile"][lo:hi].tolist()]
        merged += layout.write_batch(redis_client, version, arrays["user_ids"][lo:hi].tolist(),
                                     arrays["user_vec"][lo:hi], arrays["udg_vec"][lo:hi], histories, profiles,
                                     overwrite_shared, merge_histories=merge)
        bar.update(hi - lo)
    bar.close()
    seconds = time.perf_counter() - started
    marker = {"version": version, "users": n, "manifest_sha256": manifest_sha, "user_dim": user_dim,
              "udg_dim": udg_dim, "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "seconds": round(seconds, 3), "epoch": epoch, "merged_histories": merged,
              "layout": LAYOUT_FORMAT}
    marker["items"] = publish_item_table(path, manifest, redis_client, layout)
    layout.write_marker(redis_client, version, marker)
    log.info("published %s: %d users in %.1f s", version, n, seconds)
    return PublishResult(version, n, seconds, marker, merged)


def publish_item_table(path: Path, manifest: dict, redis_client, layout: RedisLayout) -> int:
    """The items of items.npz the version was not trained on (catalogue items: known features, unknown id)
    into the version's item table in Redis; -> how many."""
    from repository import ITEMS_FILE

    fields = [f["name"] for f in manifest["features"]["item_fields"]]
    if not fields:
        return 0
    with np.load(Path(path) / ITEMS_FILE, allow_pickle=False) as items:
        new = ~items["known"]
        ids = items["item_ids"][new].tolist()
        tokens = np.concatenate([items[f"field_{name}"][new] for name in fields], axis=1)
    if ids:
        layout.write_items(redis_client, manifest["version"], ids, tokens)
    return len(ids)


def redis_used_memory(redis_client) -> int:
    """used_memory of the node, or summed over a cluster's primaries (its replicas hold as much again)."""
    from service.redis_client import primaries

    return sum(int(node.info("memory")["used_memory"]) for node in primaries(redis_client))


def sync_redis(url: str, timeout_s: float = 30.0, ca_certs: str | None = None):
    """A plain (blocking) redis-py client for bulk work: one node or a cluster (`service.redis_client`)."""
    from service.redis_client import sync_client

    return sync_client(url, timeout_s, ca_certs)


@dataclass
class ItemsResult:
    version: str
    written: int  # new items now in the version's item table
    known: int  # rows for items the version was trained on: their trained features stay (not written)
    generation: int


def publish_items(path: Path, file: Path, redis_client, layout: RedisLayout | None = None,
                  id_column: str | None = None) -> ItemsResult:
    """`udg publish-items MODEL_REPO/V FILE`: items that arrived after training (a Parquet, CSV or JSON Lines
    file with the item id and the item fields' columns, as the version's dataset spec declares them) into the
    version's item table, so the service scores them with their features; no retraining. Every row is
    validated before anything is written (a bad file raises DataError naming the file, column and row)."""
    from dataset.ingest import field_tokens, read_columns
    from dataset.schema import PAD, FeatureSchema
    from dataset.spec import DatasetSpec, Table

    layout = layout or RedisLayout()
    version, manifest, _ = version_dir_info(path)
    schema = FeatureSchema.from_json({**manifest["features"], "item_table": {}})
    spec = DatasetSpec.model_validate(manifest["dataset"]["spec"])
    id_column = id_column or (spec.items.id if spec.items is not None else spec.events.item)
    by_name = {f.name: f for f in spec.item_fields}
    columns = [id_column, *(by_name[f.name].source_column for f in schema.item_fields)]
    file = Path(file)
    table = read_columns(file, Table(path=str(file)), columns, {id_column})
    ids = [str(v) for v in table.column(id_column).to_pylist()]
    rows = np.zeros((len(ids), schema.item_width), np.int64)
    offset = 0
    for field in schema.item_fields:
        tokens = field_tokens(file, by_name[field.name], table.column(by_name[field.name].source_column))
        for row in range(len(ids)):
            values = tokens.values[tokens.offsets[row]:tokens.offsets[row + 1]].tolist()
            rows[row, offset:offset + field.width] = field.encode(values if field.kind == "multi" else
                                                                  (values[0] if values else None), missing=PAD)
        offset += field.width
    known = np.array([schema.items.known(i) for i in ids], bool)
    new_ids = [i for i, k in zip(ids, known.tolist(), strict=True) if not k]
    generation = layout.write_items(redis_client, version, new_ids, rows[~known]) if new_ids else \
        int(redis_client.get(layout.item_generation(version)) or 0)
    log.info("publish-items %s: %d new items written, %d known items kept their trained features", version,
             len(new_ids), int(known.sum()))
    return ItemsResult(version, len(new_ids), int(known.sum()), generation)
