"""PyTorch checkpoint -> versioned ONNX artifact (`MODEL_REPO/<version>/`), written atomically.

Layout of a version directory (read without torch by `export.runtime`):

- `scorer.onnx`  ONE graph: base model + every gating network + item-side tables (item ids, genres).
    inputs  user_vec [1, user_dim] f32, udg_vec [1, udg_dim] f32 (UDG models only),
            history [1, L] int64 (PAD=0 filled, most recent first, L >= 1), candidates [N] int64
    output  probabilities [N] f32. N and L are dynamic; the user side (batch 1) is broadcast in the graph,
            and the user halves of the split first layers (model.layers.SplitLinear) run once per call.
- `meta.onnx`    profile [B, 3] int64 -> user_vec [B, user_dim] (the OOV user-id row + the profile rows:
    an unseen user's base embedding) and, for UDG models, udg_vec [B, udg_dim]: the meta generator
    f_meta(profile) (Eq. 11), or — for a UDG checkpoint without one — the mean UDG row of the known users
    (manifest `meta.udg_source` says which). Non-UDG models: user_vec only.
- `users.npz`    per known user (np.load(..., allow_pickle=False) works: no object arrays):
    user_ids <U [U] raw ids, user_index int64 [U], user_vec f32 [U, user_dim], udg_vec f32 [U, udg_dim]
    ([U, 0] without UDG), history <U [U, max_history] raw item ids most recent first ("" = padding),
    history_idx int64 [U, max_history], history_len int64 [U], profile <U [U, 3] raw values ("" = missing),
    profile_idx int64 [U, 3], profile_fields <U [3].
- `manifest.json` everything else (see `build_manifest`), including sha256 of every file and golden
    inputs/outputs computed with PyTorch.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.datasets import PROFILE_FIELDS
from model.features import OOV, PAD, FeatureSpace
from model.meta import MetaGenerator
from model.udg import UDG
from model.zoo import base_of
from repository import (
    ARTIFACT_FORMAT,
    MANIFEST_FILE,
    META_FILE,
    SCORER_FILE,
    USERS_FILE,
    AtomicVersionWriter,
    describe_files,
)

log = logging.getLogger(__name__)

OPSET = 17
GOLDEN_ATOL = 1e-4  # what `open_artifact` accepts (CPU/GPU kernels differ in the last bits)
# Age buckets of model.datasets.age_bucket (upper bound exclusive, label); lets the runtime bucket a raw age.
AGE_BUCKETS = [[18, "<18"], [25, "18-24"], [35, "25-34"], [45, "35-44"], [50, "45-49"], [56, "50-55"],
               [None, "56+"]]


# --- the exported modules --------------------------------------------------------------------------------
class UDGScorerGraph(nn.Module):
    """(user_vec [1, u], udg_vec [1, g], history [1, L], candidates [N]) -> probabilities [N].

    `per_candidate=True` expands the user side to N rows first: everything user-side then runs once per
    candidate. It exists only to measure what the broadcast saves (loadtest/bench_model.py).
    """

    def __init__(self, model: nn.Module, per_candidate: bool = False):
        super().__init__()
        self.model = model
        self.per_candidate = per_candidate

    def forward(self, user_vec, udg_vec, history, candidates):
        if self.per_candidate:
            n = candidates.shape[0]
            user_vec, udg_vec, history = (user_vec.expand(n, -1), udg_vec.expand(n, -1), history.expand(n, -1))
        return torch.sigmoid(self.model.score(user_vec, udg_vec, history, candidates))


class BaseScorerGraph(nn.Module):
    """(user_vec [1, u], history [1, L], candidates [N]) -> probabilities [N] for a model without UDG."""

    def __init__(self, model: nn.Module, per_candidate: bool = False):
        super().__init__()
        self.model = model
        self.per_candidate = per_candidate

    def forward(self, user_vec, history, candidates):
        if self.per_candidate:
            n = candidates.shape[0]
            user_vec, history = user_vec.expand(n, -1), history.expand(n, -1)
        return torch.sigmoid(self.model.score(user_vec, None, history, candidates))


class MetaGraph(nn.Module):
    """profile [B, 3] -> user_vec [B, user_dim] (unseen user) and, for UDG models, udg_vec [B, udg_dim]."""

    def __init__(self, model: nn.Module, generator: MetaGenerator | None, fallback_udg: torch.Tensor | None):
        super().__init__()
        self.base = base_of(model)
        self.generator = generator
        self.udg = isinstance(model, UDG)
        if fallback_udg is not None:
            self.register_buffer("fallback_udg", fallback_udg.reshape(1, -1).clone())
        else:
            self.fallback_udg = None

    def forward(self, profile):
        user_vec = self.base.unseen_user_vector(profile)
        if not self.udg:
            return user_vec
        if self.generator is not None:
            return user_vec, self.generator(profile)
        return user_vec, self.fallback_udg.expand(profile.shape[0], -1)


def scorer_graph(model: nn.Module, per_candidate: bool = False) -> nn.Module:
    graph = UDGScorerGraph(model, per_candidate) if isinstance(model, UDG) else BaseScorerGraph(model, per_candidate)
    return graph.eval()


def scorer_io(model: nn.Module) -> tuple[list[str], list[str]]:
    names = ["user_vec", "udg_vec", "history", "candidates"] if isinstance(model, UDG) else \
        ["user_vec", "history", "candidates"]
    return names, ["probabilities"]


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


def example_scorer_inputs(model: nn.Module, space: FeatureSpace, n: int = 3, history_len: int = 4):
    """Batch-1 user side, N >= 2 candidates and L >= 2 history (size-0/1 dims would be specialised)."""
    base = base_of(model)
    user_vec = torch.randn(1, base.user_dim) * 0.05
    history = torch.arange(2, 2 + history_len, dtype=torch.long).remainder(len(space.items)).clamp(min=2)[None]
    candidates = torch.arange(2, 2 + n, dtype=torch.long).remainder(len(space.items)).clamp(min=2)
    if isinstance(model, UDG):
        return user_vec, torch.randn(1, model.config.udg_dim) * 0.05, history, candidates
    return user_vec, history, candidates


def export_scorer(model: nn.Module, space: FeatureSpace, per_candidate: bool = False) -> bytes:
    inputs, outputs = scorer_io(model)
    dynamic = {"history": {1: "history_len"}, "candidates": {0: "candidates"}, "probabilities": {0: "candidates"}}
    return _export(scorer_graph(model, per_candidate), example_scorer_inputs(model, space), inputs, outputs,
                   dynamic)


def meta_outputs(model: nn.Module) -> list[str]:
    return ["user_vec", "udg_vec"] if isinstance(model, UDG) else ["user_vec"]


def export_meta(graph: MetaGraph, model: nn.Module) -> bytes:
    outputs = meta_outputs(model)
    example = torch.tensor([[2, 2, 2], [3, 2, 3]], dtype=torch.long)
    dynamic = {"profile": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    return _export(graph, (example,), ["profile"], outputs, dynamic)


# --- the artifact -------------------------------------------------------------------------------------------
def _fixed_str(rows: list[list[str]], width: int) -> np.ndarray:
    padded = [list(r[:width]) + [""] * (width - len(r[:width])) for r in rows]
    return np.array(padded, dtype=str).reshape(len(rows), width)


@torch.no_grad()
def user_table(model: nn.Module, space: FeatureSpace, users: dict | None) -> dict[str, np.ndarray]:
    """Per known user: raw ids and everything `udg publish` loads into the feature store."""
    users = users or {"users": [], "profiles": [], "histories": []}
    raw_ids = [str(u) for u in users["users"]]
    n, width = len(raw_ids), space.max_history
    profiles = [[str(p.get(f, "")) for f in PROFILE_FIELDS] for p in users["profiles"]]
    histories = [[str(i) for i in h][:width] for h in users["histories"]]
    user_index = space.users.lookup_many(raw_ids) if n else np.zeros(0, np.int64)
    profile_idx = np.stack([space.encode_profile(p) for p in users["profiles"]]) if n else \
        np.zeros((0, len(PROFILE_FIELDS)), np.int64)
    history = _fixed_str(histories, width) if n else np.zeros((0, width), dtype="<U1")
    history_idx = np.zeros((n, width), np.int64)
    for row, items in enumerate(histories):
        history_idx[row, :len(items)] = space.items.lookup_many(items)
    model.eval()
    udg_dim = model.config.udg_dim if isinstance(model, UDG) else 0
    user_vec = np.zeros((n, base_of(model).user_dim), np.float32)
    udg_vec = np.zeros((n, udg_dim), np.float32)
    for start in range(0, n, 65536):
        part = slice(start, start + 65536)
        u, g = model.user_state(torch.as_tensor(user_index[part]), torch.as_tensor(profile_idx[part]))
        user_vec[part] = u.numpy()
        if g is not None:
            udg_vec[part] = g.numpy()
    return {
        "user_ids": np.array(raw_ids, dtype=str).reshape(n),
        "user_index": user_index.astype(np.int64),
        "user_vec": user_vec,
        "udg_vec": udg_vec,
        "history": history,
        "history_idx": history_idx,
        "history_len": np.array([len(h) for h in histories], np.int64).reshape(n),
        "profile": _fixed_str(profiles, len(PROFILE_FIELDS)) if n else np.zeros((0, len(PROFILE_FIELDS)), "<U1"),
        "profile_idx": profile_idx.astype(np.int64),
        "profile_fields": np.array(PROFILE_FIELDS, dtype=str),
    }


def _tensor_spec(name: str, dtype: str, shape: list) -> dict:
    return {"name": name, "dtype": dtype, "shape": shape}


def io_schema(model: nn.Module) -> dict:
    base = base_of(model)
    udg = isinstance(model, UDG)
    scorer_inputs = [_tensor_spec("user_vec", "float32", [1, base.user_dim])]
    if udg:
        scorer_inputs.append(_tensor_spec("udg_vec", "float32", [1, model.config.udg_dim]))
    scorer_inputs += [_tensor_spec("history", "int64", [1, "history_len"]),
                      _tensor_spec("candidates", "int64", ["candidates"])]
    meta_out = [_tensor_spec("user_vec", "float32", ["batch", base.user_dim])]
    if udg:
        meta_out.append(_tensor_spec("udg_vec", "float32", ["batch", model.config.udg_dim]))
    return {
        "scorer": {"file": SCORER_FILE, "inputs": scorer_inputs,
                   "outputs": [_tensor_spec("probabilities", "float32", ["candidates"])]},
        "meta": {"file": META_FILE, "inputs": [_tensor_spec("profile", "int64", ["batch", len(PROFILE_FIELDS)])],
                 "outputs": meta_out},
    }


@torch.no_grad()
def golden_cases(model: nn.Module, meta_graph: MetaGraph, space: FeatureSpace, users: dict[str, np.ndarray]) -> dict:
    """A few inputs with their PyTorch outputs: full history with an unknown candidate, no history, cold start."""
    udg = isinstance(model, UDG)
    graph = scorer_graph(model)
    if len(users["user_ids"]):
        row = int(np.argmax(users["history_len"]))
        user_vec, udg_vec = users["user_vec"][row:row + 1], users["udg_vec"][row:row + 1]
        history = users["history_idx"][row:row + 1]
        profile = users["profile_idx"][row:row + 1]
    else:
        profile = np.full((1, len(PROFILE_FIELDS)), OOV, np.int64)
        outs = meta_graph(torch.as_tensor(profile))
        outs = outs if isinstance(outs, tuple) else (outs,)
        user_vec = outs[0].numpy()
        udg_vec = outs[1].numpy() if udg else np.zeros((1, 0), np.float32)
        history = np.zeros((1, space.max_history), np.int64)
    n_items = len(space.items)
    candidates = np.array([2 + (7 * i) % max(n_items - 2, 1) for i in range(6)] + [OOV], np.int64)
    scorer_cases = []
    for hist, cand in ((history, candidates), (np.zeros((1, 1), np.int64), candidates[:1])):
        feeds = {"user_vec": user_vec.astype(np.float32), "history": hist.astype(np.int64), "candidates": cand}
        if udg:
            feeds["udg_vec"] = udg_vec.astype(np.float32)
        args = [torch.as_tensor(feeds[name]) for name in scorer_io(model)[0]]
        expected = graph(*args).numpy()
        scorer_cases.append({"inputs": {k: v.tolist() for k, v in feeds.items()}, "outputs": {
            "probabilities": expected.tolist()}})
    meta_profile = np.concatenate([profile, np.full((1, len(PROFILE_FIELDS)), OOV, np.int64)]).astype(np.int64)
    outs = meta_graph(torch.as_tensor(meta_profile))
    outs = outs if isinstance(outs, tuple) else (outs,)
    meta_case = {"inputs": {"profile": meta_profile.tolist()},
                 "outputs": {name: o.numpy().tolist() for name, o in zip(meta_outputs(model), outs, strict=True)}}
    return {"atol": GOLDEN_ATOL, "scorer": scorer_cases, "meta": [meta_case]}


def build_manifest(version: str, model: nn.Module, payload: dict, space: FeatureSpace, golden: dict,
                   meta_info: dict, n_users: int) -> dict:
    config = payload["model_config_obj"]
    base = base_of(model)
    udg = isinstance(model, UDG)
    return {
        "format": ARTIFACT_FORMAT,
        "version": version,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "exporter": {"torch": torch.__version__, "opset": OPSET, "dynamo": False},
        "model": {"kind": config.kind, "udg": udg, "config": config.to_json(),
                  "parameters": payload.get("parameters")},
        "dims": {"user_dim": base.user_dim, "udg_dim": config.udg_dim if udg else 0,
                 "embed_dim": config.embed_dim, "max_history": space.max_history},
        "vocab": {
            "pad_index": PAD, "oov_index": OOV,
            "items": {"size": len(space.items), "index": {t: i for t, i in space.items.index.items() if i > OOV}},
            "profile": {f: {"size": len(space.profile[f]),
                            "index": {t: i for t, i in space.profile[f].index.items() if i > OOV}}
                        for f in PROFILE_FIELDS},
            "users": {"size": len(space.users), "known": n_users, "file": USERS_FILE},
        },
        "profile_encoding": {
            "fields": list(PROFILE_FIELDS),
            "unknown_value": "oov", "missing_value": "oov", "unknown_field": "error",
            "age_buckets": AGE_BUCKETS,
            "note": "values are strings; a numeric age not in the vocabulary is bucketed with age_buckets",
        },
        "graphs": io_schema(model),
        "meta": meta_info,
        "metrics": payload.get("metrics"),
        "dataset": payload.get("dataset"),
        "golden": golden,
    }


def load_meta_generator(payload: dict, space: FeatureSpace) -> MetaGenerator | None:
    if not payload.get("meta") or not payload["meta"].get("state_dict"):
        return None
    generator = MetaGenerator(space, payload["model_config_obj"].udg_dim)
    generator.load_state_dict(payload["meta"]["state_dict"])
    return generator.eval()


def build_meta_graph(model: nn.Module, payload: dict, space: FeatureSpace) -> tuple[MetaGraph, dict]:
    if not isinstance(model, UDG):
        return MetaGraph(model, None, None).eval(), {
            "udg_source": None, "outputs": ["user_vec"],
            "note": "no UDG: meta.onnx gives an unseen user's base embedding (OOV id row + profile rows)"}
    generator = load_meta_generator(payload, space) if isinstance(model, UDG) else None
    if generator is not None:
        info = {k: v for k, v in payload["meta"].items() if k != "state_dict"}
        return MetaGraph(model, generator, None).eval(), {"udg_source": "meta_generator", **info,
                                                          "outputs": ["user_vec", "udg_vec"]}
    known = space.users.lookup_many(list((payload.get("users") or {}).get("users", [])))
    rows = model.udg_emb.weight[torch.as_tensor(known)] if len(known) else model.udg_emb.weight[2:]
    fallback = rows.detach().mean(0)
    return MetaGraph(model, None, fallback).eval(), {
        "udg_source": "mean_known_users", "outputs": ["user_vec", "udg_vec"],
        "note": "checkpoint has no meta generator: udg_vec is the mean UDG row of the known users"}


def check_parity(path: Path, golden: dict, which: str) -> float:
    """Max abs difference between onnxruntime (CPU) and the PyTorch golden outputs; raises above tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for case in golden[which]:
        feeds = {k: np.asarray(v, dtype=np.int64 if k in ("history", "candidates", "profile") else np.float32)
                 for k, v in case["inputs"].items()}
        outputs = session.run(list(case["outputs"]), feeds)
        for name, got in zip(case["outputs"], outputs, strict=True):
            worst = max(worst, float(np.max(np.abs(got - np.asarray(case["outputs"][name], np.float32)))))
    if worst > 1e-5:
        raise RuntimeError(f"{path.name}: onnxruntime differs from PyTorch by {worst:.3g} (> 1e-5)")
    return worst


def export_artifact(checkpoint: Path, version: str, repo: Path, overwrite: bool = False) -> Path:
    """Checkpoint -> MODEL_REPO/<version>/ (scorer.onnx, meta.onnx, users.npz, manifest.json)."""
    from model.train import load_checkpoint

    model, payload = load_checkpoint(Path(checkpoint))
    return export_model(model, payload, version, repo, overwrite)


def export_model(model: nn.Module, payload: dict, version: str, repo: Path, overwrite: bool = False) -> Path:
    """Like `export_artifact` from an in-memory model and its checkpoint payload (as `load_checkpoint` gives)."""
    model.eval()
    repo = Path(repo)
    space: FeatureSpace = payload["space_obj"]
    meta_graph, meta_info = build_meta_graph(model, payload, space)
    users = user_table(model, space, payload.get("users"))
    golden = golden_cases(model, meta_graph, space, users)
    with AtomicVersionWriter(repo, version, overwrite) as tmp:
        (tmp / SCORER_FILE).write_bytes(export_scorer(model, space))
        (tmp / META_FILE).write_bytes(export_meta(meta_graph, model))
        with open(tmp / USERS_FILE, "wb") as handle:
            np.savez(handle, **users)
        scorer_diff = check_parity(tmp / SCORER_FILE, golden, "scorer")
        meta_diff = check_parity(tmp / META_FILE, golden, "meta")
        manifest = build_manifest(version, model, payload, space, golden, meta_info, len(users["user_ids"]))
        manifest["export_parity"] = {"scorer_max_abs_diff": scorer_diff, "meta_max_abs_diff": meta_diff}
        manifest["files"] = describe_files(tmp, (SCORER_FILE, META_FILE, USERS_FILE))
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
