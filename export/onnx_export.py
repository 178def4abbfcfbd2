"""Checkpoint -> versioned model (`MODEL_REPO/<version>/`), written atomically.

What the model hands over (`model.serving`: its scorer and meta modules with their I/O metadata) becomes two
ONNX graphs; the rest of a version directory (read without torch by `export.runtime`):

- `scorer.onnx`  ONE graph: base model + every gating network + the item tables the history needs.
    inputs  user_vec [1, user_dim] f32, udg_vec [1, udg_dim] f32 (UDG models only),
            history [1, L] int64 (PAD=0 filled, most recent first, L >= 1), candidates [N] int64,
            candidate_<field> [N, width] int64 per item field (the candidates' feature tokens)
    output  probabilities [N] f32. N and L are dynamic; the user side (batch 1) is broadcast in the graph,
            and the user halves of the split first layers (model.layers.SplitLinear) run once per call.
- `scorer_multi.onnx` the scorer for several users per call (the service's opt-in micro-batcher): user_vec
    [U, user_dim], udg_vec [U, udg_dim], history [U, L] and candidate_user [N] int64 (each candidate's user
    row) besides the scorer's candidate inputs -> probabilities [N]; same values as one call per user.
- `scorer.int8.onnx` (with `int8=True`, `udg export --int8`) the scorer with int8 weight matmuls
    (export/quantize.py), same I/O; opened instead of scorer.onnx with `open_artifact(..., precision="int8")`
    (service: `UDG_SCORER_PRECISION=int8`). Not parity-checked against PyTorch: its golden bound is INT8_ATOL,
    and its acceptance is validation AUC (`udg bench model` reports it beside the fp32 graph's).
- `meta.onnx`    profile [B, user fields] int64 -> user_vec [B, user_dim] and, for UDG models, udg_vec
    [B, udg_dim] (see `model.serving`; manifest `meta.udg_source` says where udg_vec comes from).
- `users.npz`    per known user (np.load(..., allow_pickle=False) works: no object arrays):
    user_ids <U [U] raw ids, user_index int64 [U], user_vec f32 [U, user_dim], udg_vec f32 [U, udg_dim]
    ([U, 0] without UDG), history <U [U, max_history] raw item ids most recent first ("" = padding),
    history_idx int64 [U, max_history], history_len int64 [U], profile <U [U, P] raw values ("" = missing),
    profile_idx int64 [U, P], profile_fields <U [P].
- `items.npz`    the item table: item_ids <U [K] raw ids, and per item field `field_<name>` int64 [K, width]
    token indices: every item of the vocabulary (what `udg publish` writes to the version's item table in
    Redis, where `udg publish-items` adds items that arrive later).
- `warmup.pt`    the checkpoint without its per-user and item tables (model + meta generator weights, config,
    schema): the online warm-up (`udg warmup`) needs gradients, which the ONNX graphs do not give, and takes
    them with the very weights these graphs were exported from (sha256 in the manifest like every file).
- `manifest.json` everything else (see `build_manifest`): the feature schema with every field's vocabulary,
    dims, the graphs' I/O, sha256 of every file, and golden inputs/outputs computed with PyTorch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dataset.prepared import KnownUsers
from dataset.schema import OOV, PAD, FeatureSchema
from export.quantize import INT8_AUC_TOLERANCE, Int8Refused
from model.checkpoint import Checkpoint
from model.serving import ServingGraph, ServingModules, candidate_input, scorer_graph, serving_modules
from repository import (
    ARTIFACT_FORMAT,
    INT8_SCORER_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    META_FILE,
    MULTI_SCORER_FILE,
    SCORER_FILE,
    USERS_FILE,
    WARMUP_FILE,
    AtomicVersionWriter,
    describe_files,
)

log = logging.getLogger(__name__)

OPSET = 17
GOLDEN_ATOL = 1e-4  # what `open_artifact` accepts (CPU/GPU kernels differ in the last bits)
INT8_ATOL = 2e-2  # the int8 scorer's bound on the golden probabilities (a sanity bound; AUC is its acceptance)


def _export(module: nn.Module, args: tuple, input_names: list[str], output_names: list[str],
            dynamic_axes: dict[str, dict[int, str]]) -> bytes:
    """torch.onnx.export with `dynamo=` explicit: the TorchScript exporter (dynamo=False) is the one whose
    graphs we test; the dynamo exporter is the fallback should the former be removed."""
    module.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, buffer, dynamo=False, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes, opset_version=OPSET,
                              do_constant_folding=True)
        except (RuntimeError, TypeError, NotImplementedError) as error:  # pragma: no cover - legacy removed
            log.warning("TorchScript ONNX exporter failed (%s); retrying with dynamo=True", error)
            from torch.export import Dim

            dims = {axis_name: Dim(axis_name, min=1) for axes in dynamic_axes.values() for axis_name in axes.values()}
            shapes = tuple({axis: dims[name] for axis, name in dynamic_axes.get(n, {}).items()} or None
                           for n in input_names)
            program = torch.onnx.export(module, args, dynamo=True, input_names=input_names,
                                        output_names=output_names, dynamic_shapes=shapes, opset_version=18)
            buffer = io.BytesIO()
            program.save(buffer)
    return buffer.getvalue()


def export_graph(graph: ServingGraph) -> bytes:
    return _export(graph.module, graph.example, graph.input_names, graph.output_names, graph.dynamic_axes)


def export_scorer(model: nn.Module, schema: FeatureSchema, per_candidate: bool = False) -> bytes:
    """The scorer graph alone (benchmarks export the per-candidate variant this way)."""
    return export_graph(scorer_graph(model, schema, per_candidate))


# --- the tables ---------------------------------------------------------------------------------------------
@torch.no_grad()
def user_table(model: nn.Module, schema: FeatureSchema, users: KnownUsers | None) -> dict[str, np.ndarray]:
    """Per known user: raw ids and everything `udg publish` loads into the feature store."""
    width, fields = schema.max_history, len(schema.user_fields)
    if users is None:
        users = KnownUsers(np.zeros(0, str), np.zeros((0, fields), str), np.zeros((0, width), str),
                           np.zeros(0, np.int64))
    n = len(users)
    raw_ids = users.user_ids.astype(str)
    user_index = schema.users.lookup_many(raw_ids) if n else np.zeros(0, np.int64)
    profile_idx = np.stack([schema.encode_profile({f.name: v for f, v in zip(schema.user_fields, row, strict=True)
                                                   if v != ""}) for row in users.profile.tolist()]) if n else \
        np.zeros((0, fields), np.int64)
    history = users.history.astype(str).reshape(n, users.history.shape[-1] if users.history.ndim == 2 else width)
    history = history[:, :width]
    if history.shape[1] < width:
        history = np.concatenate([history, np.full((n, width - history.shape[1]), "", dtype=history.dtype)], 1)
    history_len = np.minimum(users.history_len.astype(np.int64), width)
    history_idx = np.where(np.arange(width)[None, :] < history_len[:, None],
                           schema.items.lookup_many(history) if n else np.zeros((0, width), np.int64), PAD)
    model.eval()
    user_vec = np.zeros((n, model.base_model.user_dim), np.float32)
    udg_vec = np.zeros((n, model.udg_dim), np.float32)
    for start in range(0, n, 65536):
        part = slice(start, start + 65536)
        u, g = model.user_state(torch.as_tensor(user_index[part]), torch.as_tensor(profile_idx[part]))
        user_vec[part] = u.numpy()
        if g is not None:
            udg_vec[part] = g.numpy()
    return {
        "user_ids": raw_ids.reshape(n),
        "user_index": user_index.astype(np.int64),
        "user_vec": user_vec,
        "udg_vec": udg_vec,
        "history": history if n else np.zeros((0, width), dtype="<U1"),
        "history_idx": history_idx.astype(np.int64),
        "history_len": history_len.reshape(n),
        "profile": users.profile.astype(str).reshape(n, fields) if n else np.zeros((0, fields), "<U1"),
        "profile_idx": profile_idx.astype(np.int64),
        "profile_fields": np.array(schema.profile_fields, dtype=str),
    }


def item_table(schema: FeatureSchema, catalogue: dict | None = None) -> dict[str, np.ndarray]:
    """Every item of the vocabulary with its field tokens, first in vocabulary order (`known`), then the
    catalogue's items the model never saw (their ids are OOV; `udg publish` puts them in the version's item
    table in Redis, so they are scored with their features)."""
    rows = np.arange(2, schema.items.known_size)
    table = {"item_ids": np.array(schema.items.tokens[2:], dtype=str).reshape(len(rows)),
             "known": np.ones(len(rows), bool)}
    for spec in schema.item_fields:
        table[f"field_{spec.name}"] = schema.item_table[spec.name][rows].astype(np.int64)
    new_ids = np.asarray((catalogue or {}).get("item_ids", np.zeros(0, str))).astype(str)
    if len(new_ids):
        table["item_ids"] = np.concatenate([table["item_ids"], new_ids])
        table["known"] = np.concatenate([table["known"], np.zeros(len(new_ids), bool)])
        for spec in schema.item_fields:
            name = f"field_{spec.name}"
            table[name] = np.concatenate([table[name], np.asarray(catalogue[spec.name], np.int64)])
    return table


# --- golden cases, parity -----------------------------------------------------------------------------------
@torch.no_grad()
def golden_cases(modules: ServingModules, schema: FeatureSchema, users: dict[str, np.ndarray]) -> dict:
    """A few inputs with their PyTorch outputs: full history with an unknown candidate, no history, cold start,
    and a candidate whose fields are given while its id is unknown (an item that arrived after training)."""
    udg = modules.udg
    scorer, meta = modules.scorer.module, modules.meta.module
    fields = len(schema.user_fields)
    if len(users["user_ids"]):
        row = int(np.argmax(users["history_len"]))
        user_vec, udg_vec = users["user_vec"][row:row + 1], users["udg_vec"][row:row + 1]
        history = users["history_idx"][row:row + 1]
        profile = users["profile_idx"][row:row + 1]
    else:
        profile = np.full((1, fields), OOV, np.int64)
        outs = meta(torch.as_tensor(profile))
        outs = outs if isinstance(outs, tuple) else (outs,)
        user_vec = outs[0].numpy()
        udg_vec = outs[1].numpy() if udg else np.zeros((1, 0), np.float32)
        history = np.zeros((1, schema.max_history), np.int64)
    n_items = schema.items.known_size
    candidates = np.array([2 + (7 * i) % max(n_items - 2, 1) if n_items > 2 else OOV for i in range(6)] + [OOV],
                          np.int64)
    base = scorer.model.base_model
    tokens = [t.numpy() for t in base.lookup_items(torch.as_tensor(candidates)).fields]
    if tokens:  # the OOV candidate carries the first candidate's fields: a new item with known features
        tokens = [np.concatenate([t[:-1], t[:1]]) for t in tokens]
    cases = []
    for hist, count in ((history, len(candidates)), (np.zeros((1, 1), np.int64), 1)):
        feeds = {"user_vec": user_vec.astype(np.float32), "history": hist.astype(np.int64),
                 "candidates": candidates[:count]}
        if udg:
            feeds["udg_vec"] = udg_vec.astype(np.float32)
        for spec, values in zip(schema.item_fields, tokens, strict=True):
            feeds[candidate_input(spec.name)] = values[:count]
        args = [torch.as_tensor(feeds[name]) for name in modules.scorer.input_names]
        cases.append({"inputs": {k: v.tolist() for k, v in feeds.items()},
                      "outputs": {"probabilities": scorer(*args).numpy().tolist()}})
    golden = {"scorer_multi": [multi_case(modules, cases)]} if modules.multi_scorer is not None else {}
    meta_profile = np.concatenate([profile, np.full((1, fields), OOV, np.int64)]).astype(np.int64)
    outs = meta(torch.as_tensor(meta_profile))
    outs = outs if isinstance(outs, tuple) else (outs,)
    meta_case = {"inputs": {"profile": meta_profile.tolist()},
                 "outputs": {name: o.numpy().tolist() for name, o in zip(modules.meta.output_names, outs,
                                                                         strict=True)}}
    return {"atol": GOLDEN_ATOL, "scorer": cases, "meta": [meta_case], **golden}


@torch.no_grad()
def multi_case(modules: ServingModules, cases: list[dict]) -> dict:
    """The one-user golden cases as ONE multi-user call (histories PAD-filled to the longest), PyTorch outputs."""
    graph = modules.multi_scorer
    length = max(len(c["inputs"]["history"][0]) for c in cases)
    feeds: dict[str, list] = {"history": [], "candidate_user": []}
    for user, case in enumerate(cases):
        i = case["inputs"]
        feeds["history"].append(list(i["history"][0]) + [PAD] * (length - len(i["history"][0])))
        feeds["candidate_user"] += [user] * len(i["candidates"])
        for name in ("user_vec", "udg_vec"):
            if name in i:
                feeds.setdefault(name, []).append(i[name][0])
        for name, value in i.items():
            if name.startswith("candidate"):
                feeds.setdefault(name, []).extend(value)
    args = [torch.as_tensor(np.asarray(feeds[spec.name], np.float32 if spec.dtype == "float32" else np.int64))
            for spec in graph.inputs]
    return {"inputs": feeds, "outputs": {"probabilities": graph.module(*args).numpy().tolist()}}


def check_parity(path: Path, golden: dict, which: str, graph: ServingGraph, limit: float = 1e-5) -> float:
    """Max abs difference between onnxruntime (CPU) and the PyTorch golden outputs; raises above `limit`."""
    import onnxruntime as ort

    dtypes = {spec.name: np.int64 if spec.dtype == "int64" else np.float32 for spec in graph.inputs}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for case in golden[which]:
        feeds = {k: np.asarray(v, dtype=dtypes[k]) for k, v in case["inputs"].items()}
        outputs = session.run(list(case["outputs"]), feeds)
        for name, got in zip(case["outputs"], outputs, strict=True):
            worst = max(worst, float(np.max(np.abs(got - np.asarray(case["outputs"][name], np.float32)))))
    if worst > limit:
        raise RuntimeError(f"{path.name}: onnxruntime differs from PyTorch by {worst:.3g} (> {limit:g})")
    return worst


# --- the manifest -------------------------------------------------------------------------------------------
def build_manifest(version: str, checkpoint: Checkpoint, modules: ServingModules, golden: dict,
                   n_users: int, n_items: int, n_catalogue: int = 0) -> dict:
    config = checkpoint.model_config
    schema = checkpoint.schema
    features = schema.to_json()
    features.pop("item_table")  # the item table is items.npz (and, once published, Redis)
    return {
        "format": ARTIFACT_FORMAT,
        "version": version,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "exporter": {"torch": torch.__version__, "opset": OPSET, "dynamo": False},
        "model": {"kind": config.kind, "udg": modules.udg, "config": config.to_json(),
                  "parameters": checkpoint.parameters},
        "dims": modules.dims,
        "features": features,
        "vocab": {
            "pad_index": PAD, "oov_index": OOV,
            "items": {"size": len(schema.items), "known": n_items, "catalogue": n_catalogue, "file": ITEMS_FILE},
            "users": {"size": len(schema.users), "known": n_users, "file": USERS_FILE},
        },
        "graphs": {"scorer": modules.scorer.io_json(SCORER_FILE), "meta": modules.meta.io_json(META_FILE),
                   **({"scorer_multi": modules.multi_scorer.io_json(MULTI_SCORER_FILE)}
                      if modules.multi_scorer is not None else {})},
        "meta": {**modules.meta_info, **(checkpoint.meta.info if checkpoint.meta else {})},
        "metrics": checkpoint.metrics,
        "dataset": {"name": checkpoint.spec.name, "spec": checkpoint.spec.fingerprint()},
        "golden": golden,
    }


def export_artifact(checkpoint: Path, version: str, repo: Path, overwrite: bool = False, int8: bool = False,
                    int8_auc_tolerance: float = INT8_AUC_TOLERANCE) -> Path:
    """Checkpoint file -> MODEL_REPO/<version>/ (scorer.onnx, scorer_multi.onnx, meta.onnx, users.npz, items.npz,
    manifest.json; scorer.int8.onnx too with `int8`)."""
    return export_model(Checkpoint.load(Path(checkpoint)), version, repo, overwrite, int8=int8,
                        int8_auc_tolerance=int8_auc_tolerance)


def export_model(checkpoint: Checkpoint, version: str, repo: Path, overwrite: bool = False,
                 model: nn.Module | None = None, int8: bool = False,
                 int8_auc_tolerance: float = INT8_AUC_TOLERANCE, valid=None) -> Path:
    """Like `export_artifact` from an in-memory checkpoint (and, optionally, its already built model). With
    `int8`, the int8 scorer is scored against the fp32 one on validation events (`valid`, or prepared from the
    checkpoint's spec) and refused (`Int8Refused`, nothing written) if its AUC moves by more than
    `int8_auc_tolerance`; where no validation events can be had it is written with a warning, and the
    manifest says it was not measured."""
    model = (model or checkpoint.build_model()).eval()
    repo = Path(repo)
    schema = checkpoint.schema
    users = user_table(model, schema, checkpoint.known_users)
    items = item_table(schema, checkpoint.item_catalogue)
    generator = checkpoint.meta_generator() if model.udg_dim else None
    modules = serving_modules(model, schema, generator, torch.as_tensor(users["user_index"]))
    golden = golden_cases(modules, schema, users)
    with AtomicVersionWriter(repo, version, overwrite) as tmp:
        (tmp / SCORER_FILE).write_bytes(export_graph(modules.scorer))
        (tmp / META_FILE).write_bytes(export_graph(modules.meta))
        files = (SCORER_FILE, META_FILE, USERS_FILE, ITEMS_FILE)
        if modules.multi_scorer is not None:
            (tmp / MULTI_SCORER_FILE).write_bytes(export_graph(modules.multi_scorer))
            files += (MULTI_SCORER_FILE,)
        for name, arrays in ((USERS_FILE, users), (ITEMS_FILE, items)):
            with open(tmp / name, "wb") as handle:
                np.savez(handle, **arrays)
        if model.udg_dim:  # what `udg warmup` differentiates (model and generator: no user or item tables)
            weights = {name: value.detach().cpu() for name, value in model.state_dict().items()}
            dataclasses.replace(checkpoint, state_dict=weights, known_users=None, item_catalogue={}).save(
                tmp / WARMUP_FILE)
        scorer_diff = check_parity(tmp / SCORER_FILE, golden, "scorer", modules.scorer)
        int8_diff = int8_check = None
        if int8:  # same I/O as scorer.onnx; its golden bound is INT8_ATOL (quantisation error), not parity
            from export.quantize import int8_scorer, int8_validation

            (tmp / INT8_SCORER_FILE).write_bytes(int8_scorer((tmp / SCORER_FILE).read_bytes(), tmp))
            files += (INT8_SCORER_FILE,)
            int8_diff = check_parity(tmp / INT8_SCORER_FILE, golden, "scorer", modules.scorer, limit=INT8_ATOL)
            int8_check = {**int8_validation(tmp / SCORER_FILE, tmp / INT8_SCORER_FILE, model, checkpoint, valid),
                          "tolerance": int8_auc_tolerance}
            if not int8_check["events"]:
                log.warning("int8 scorer written unmeasured: %s", int8_check["reason"])
            elif abs(int8_check["auc_delta"]) > int8_auc_tolerance:
                raise Int8Refused(f"the int8 scorer moves validation AUC by {int8_check['auc_delta']:+.5f} "
                                  f"({int8_check['auc_fp32']:.5f} -> {int8_check['auc_int8']:.5f} on "
                                  f"{int8_check['events']:,} events), more than {int8_auc_tolerance}: not "
                                  f"exported; export without --int8 or allow more with --int8-auc-tolerance")
        meta_diff = check_parity(tmp / META_FILE, golden, "meta", modules.meta)
        multi_diff = (check_parity(tmp / MULTI_SCORER_FILE, golden, "scorer_multi", modules.multi_scorer)
                      if modules.multi_scorer is not None else None)
        manifest = build_manifest(version, checkpoint, modules, golden, len(users["user_ids"]),
                                  int(items["known"].sum()), int((~items["known"]).sum()))
        manifest["export_parity"] = {"scorer_max_abs_diff": scorer_diff, "meta_max_abs_diff": meta_diff,
                                     "scorer_multi_max_abs_diff": multi_diff, "scorer_int8_max_abs_diff": int8_diff}
        if int8:
            manifest["graphs"]["scorer_int8"] = {**modules.scorer.io_json(INT8_SCORER_FILE), "atol": INT8_ATOL,
                                                 "validation": int8_check}
        manifest["files"] = describe_files(tmp, files + ((WARMUP_FILE,) if model.udg_dim else ()))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, default=_json_default) + "\n")
    log.info("exported %s (%s%s) to %s", version, manifest["model"]["kind"], "+UDG" if manifest["model"]["udg"]
             else "", repo / version)
    return Path(repo) / version


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
