"""ONNX export: onnxruntime vs PyTorch parity for every model kind (with and without UDG), the meta graph,
the artifact files, and refusal of corrupted/truncated artifacts (the atomic writer: tests/test_repository.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from model.datasets import PROFILE_FIELDS, SyntheticSpec, make_synthetic
from model.features import OOV, PAD, prepare

from export.onnx_export import export_model
from export.runtime import ArtifactError, open_artifact
from model.meta import MetaConfig, train_meta
from model.train import TrainConfig, save_checkpoint, train_model, user_snapshot
from model.zoo import BASE_MODELS, base_of

CASES = [(kind, udg) for kind in BASE_MODELS for udg in (False, True)]
CASE_IDS = [f"{kind}{'+udg' if udg else ''}" for kind, udg in CASES]
MAX_HISTORY = 6
ATOL = 1e-5


@pytest.fixture(scope="session")
def data():
    raw = make_synthetic(SyntheticSpec(users=200, items=60, events_per_user=12))
    return prepare(raw, max_history=MAX_HISTORY)


def tiny_config(kind: str, udg: bool):
    from model.experiment import model_config, udg_preset

    # The preset `udg train --udg` ships for the kind, so the parity tests cover what is served.
    return model_config(kind, udg_preset(kind) if udg else "base", embed_dim=8, hidden=(32, 16), udg_dim=8,
                        gate_hidden=16, extra={"wide_hash_buckets": 1024})


class Zoo:
    """Tiny trained models and their exported artifacts, built on first use and shared by the session."""

    def __init__(self, data, root: Path):
        self.data, self.root = data, root
        self.cache: dict = {}

    def get(self, kind: str, udg: bool, meta: bool = True):
        key = (kind, udg, meta)
        if key not in self.cache:
            torch.set_num_threads(1)  # tiny models; robust when the other core is busy
            config = tiny_config(kind, udg)
            model, metrics = train_model(self.data, config, TrainConfig(epochs=1), progress=False)
            meta_payload = None
            if udg and meta:
                generator, info = train_meta(model, self.data, MetaConfig(steps=10, users_per_step=16),
                                             progress=False)
                meta_payload = {"state_dict": generator.state_dict(), **info}
            model.eval()
            payload = {"model_config_obj": config, "model_config": config.to_json(), "space_obj": self.data.space,
                       "metrics": metrics, "users": user_snapshot(self.data), "meta": meta_payload,
                       "parameters": sum(p.numel() for p in model.parameters()), "train_config": {},
                       "space": self.data.space.to_json(), "dataset": None}
            path = export_model(model, payload, f"{kind}-{int(udg)}-{int(meta)}", self.root)
            self.cache[key] = (model, payload, path, open_artifact(path, threads=1))
        return self.cache[key]


@pytest.fixture(scope="session")
def zoo(data, tmp_path_factory):
    return Zoo(data, tmp_path_factory.mktemp("model_repo"))


def torch_probs(model, user_vec, udg_vec, history, candidates) -> np.ndarray:
    with torch.no_grad():
        u = torch.as_tensor(np.asarray(user_vec, np.float32).reshape(1, -1))
        g = None if udg_vec is None else torch.as_tensor(np.asarray(udg_vec, np.float32).reshape(1, -1))
        h = torch.as_tensor(np.asarray(history, np.int64).reshape(1, -1))
        if h.shape[1] == 0:
            h = torch.zeros(1, 1, dtype=torch.long)
        return torch.sigmoid(model.score(u, g, h, torch.as_tensor(candidates))).numpy()


@pytest.mark.parametrize(("kind", "udg"), CASES, ids=CASE_IDS)
def test_scorer_parity(zoo, kind, udg):
    model, payload, _, artifact = zoo.get(kind, udg)
    users = artifact.load_users()
    row = int(np.argmax(users["history_len"]))
    user_vec, udg_vec = users["user_vec"][row], users["udg_vec"][row] if udg else None
    full = users["history_idx"][row]
    assert (full != PAD).sum() == MAX_HISTORY, "the fixture should have a user with a full history"
    item_tokens = list(artifact.manifest["vocab"]["items"]["index"])
    rng = np.random.default_rng(0)
    for n in (1, 7, 1000):
        raw = [item_tokens[i] for i in rng.integers(0, len(item_tokens), n)]
        raw[n // 2] = "no-such-item"  # an unknown id -> OOV
        candidates, unknown = artifact.encode_items(raw)
        assert unknown.sum() == 1 and candidates[n // 2] == OOV
        with_unknown_history = full.copy()
        with_unknown_history[0] = OOV
        for label, history in (("empty", np.zeros(0, np.int64)), ("full", full), ("partial", full[:3]),
                               ("unknown-in-history", with_unknown_history)):
            got = artifact.score(user_vec, udg_vec, history, candidates)
            expected = torch_probs(model, user_vec, udg_vec, history, candidates)
            assert got.dtype == np.float32 and got.shape == (n,)
            diff = float(np.max(np.abs(got - expected)))
            assert diff <= ATOL, f"{kind} udg={udg} N={n} history={label}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("kind", list(BASE_MODELS))
def test_scorer_keeps_integer_tensors_off_ops_without_cuda_kernels(zoo, kind):
    """onnxruntime's CUDA provider has no int64 Pad: such a node runs on the CPU with copies around it, and
    one CPU compute node rules out CUDA graphs for the whole scorer (seen on an H100 before DIEN padded its
    history with a Concat)."""
    import onnx

    _, _, path, _ = zoo.get(kind, True)
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path / "scorer.onnx"))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    integer = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    bad = [n.name for n in graph.node if n.op_type == "Pad" and types.get(n.input[0]) in integer]
    assert not bad, f"{kind}: Pad on integer tensors: {bad}"


@pytest.mark.parametrize(("kind", "udg"), CASES, ids=CASE_IDS)
def test_meta_parity(zoo, kind, udg):
    model, payload, _, artifact = zoo.get(kind, udg)
    profiles = np.array([[2, 2, 2], [OOV, OOV, OOV], [3, 2, 4]], np.int64)
    user_vec, udg_vec = artifact.cold_start(profiles)
    with torch.no_grad():
        expected_user = base_of(model).unseen_user_vector(torch.as_tensor(profiles)).numpy()
    assert np.max(np.abs(user_vec - expected_user)) <= ATOL
    if not udg:
        assert udg_vec is None and artifact.udg_dim == 0
        return
    from export.onnx_export import load_meta_generator

    generator = load_meta_generator(payload, zoo.data.space)
    with torch.no_grad():
        expected_udg = generator(torch.as_tensor(profiles)).numpy()
    assert np.max(np.abs(udg_vec - expected_udg)) <= ATOL
    single_user, single_udg = artifact.cold_start(profiles[0])
    assert single_user.shape == (artifact.user_dim,) and single_udg.shape == (artifact.udg_dim,)


def test_meta_without_generator_uses_mean_udg_row(zoo):
    model, payload, _, artifact = zoo.get("pnn", True, meta=False)
    assert artifact.manifest["meta"]["udg_source"] == "mean_known_users"
    _, udg_vec = artifact.cold_start(np.array([[2, 2, 2], [3, 3, 3]], np.int64))
    known = zoo.data.space.users.lookup_many(payload["users"]["users"])
    expected = model.udg_emb.weight[torch.as_tensor(known)].mean(0).detach().numpy()
    assert np.max(np.abs(udg_vec - expected)) <= ATOL


def test_artifact_files(zoo):
    model, payload, path, artifact = zoo.get("pnn", True)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "meta.onnx", "scorer.onnx", "users.npz"]
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("version", "model", "dims", "vocab", "profile_encoding", "graphs", "exporter", "files", "metrics",
                "exported_at", "golden"):
        assert key in manifest
    assert manifest["vocab"]["oov_index"] == OOV and manifest["vocab"]["pad_index"] == PAD
    assert [s["name"] for s in manifest["graphs"]["scorer"]["inputs"]] == ["user_vec", "udg_vec", "history",
                                                                           "candidates"]
    assert manifest["exporter"]["opset"] >= 17
    with np.load(path / "users.npz", allow_pickle=False) as users:
        n = len(users["user_ids"])
        assert n == len(payload["users"]["users"]) > 0
        assert users["user_vec"].shape == (n, artifact.user_dim) and users["user_vec"].dtype == np.float32
        assert users["udg_vec"].shape == (n, artifact.udg_dim)
        assert users["history"].shape == (n, MAX_HISTORY) and users["history"].dtype.kind == "U"
        assert list(users["profile_fields"]) == list(PROFILE_FIELDS)
        first = payload["users"]["histories"][0][:MAX_HISTORY]
        assert list(users["history"][0][:len(first)]) == first
        with torch.no_grad():
            u, g = model.user_state(torch.as_tensor(users["user_index"][:5]), torch.as_tensor(users["profile_idx"][:5]))
        assert np.allclose(users["user_vec"][:5], u.numpy()) and np.allclose(users["udg_vec"][:5], g.numpy())


def test_encoding(zoo):
    artifact = zoo.get("pnn", True)[3]
    index, unknown = artifact.encode_items(["i3", "nope", 5])
    assert index.dtype == np.int64 and list(unknown) == [False, True, True] and index[1] == OOV
    profile = artifact.encode_profile({"gender": "M", "occupation": "never-seen"})
    assert profile.dtype == np.int64 and profile.shape == (3,)
    assert profile[0] == OOV and profile[1] != OOV and profile[2] == OOV  # missing age, unknown occupation
    with pytest.raises(ValueError, match="zodiac"):
        artifact.encode_profile({"zodiac": "leo"})
    # out-of-range indices never reach the graph
    user, udg = np.zeros(artifact.user_dim), np.zeros(artifact.udg_dim)
    assert artifact.score(user, udg, [10 ** 9], [-5, 10 ** 9]).shape == (2,)
    assert artifact.score(user, udg, [], []).shape == (0,)


def _copy(path: Path, tmp_path: Path) -> Path:
    target = tmp_path / path.name
    shutil.copytree(path, target)
    return target


@pytest.mark.parametrize("damage", ["flip:scorer.onnx", "truncate:scorer.onnx", "truncate:meta.onnx",
                                    "flip:users.npz", "truncate:manifest.json", "missing:meta.onnx"])
def test_damaged_artifact_is_refused(zoo, tmp_path, damage):
    path = _copy(zoo.get("pnn", True)[2], tmp_path)
    how, name = damage.split(":")
    file = path / name
    blob = file.read_bytes()
    if how == "flip":
        middle = len(blob) // 2
        file.write_bytes(blob[:middle] + bytes([blob[middle] ^ 0xFF]) + blob[middle + 1:])
    elif how == "truncate":
        file.write_bytes(blob[:len(blob) // 3])
    else:
        file.unlink()
    with pytest.raises(ArtifactError, match=name.replace(".", r"\.")) as error:
        open_artifact(path)
    if how == "truncate" and name != "manifest.json":
        assert "truncated" in str(error.value)


def test_golden_mismatch_is_refused(zoo, tmp_path):
    path = _copy(zoo.get("pnn", False)[2], tmp_path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["golden"]["scorer"][0]["outputs"]["probabilities"][0] += 0.01
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"scorer\.onnx: golden"):
        open_artifact(path)


def test_runtime_imports_no_torch():
    code = "import sys, export.runtime; assert 'torch' not in sys.modules, 'export.runtime imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_cli_export_from_checkpoint(zoo, tmp_path):
    model, payload, _, _ = zoo.get("pnn", True)

    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", model, payload["model_config_obj"], TrainConfig(epochs=1),
                                 zoo.data.space, payload["metrics"], users=payload["users"], meta=payload["meta"])
    from udg_cli import main

    assert main(["export", str(checkpoint), "--version", "v1", "--out", str(tmp_path / "repo")]) == 0
    artifact = open_artifact(tmp_path / "repo" / "v1")
    assert artifact.version == "v1" and artifact.manifest["model"]["kind"] == "pnn"
    with pytest.raises(FileExistsError):
        main(["export", str(checkpoint), "--version", "v1", "--out", str(tmp_path / "repo")])
