"""ONNX export: onnxruntime vs PyTorch parity for every model kind (with and without UDG), the meta graph,
new items scored by their features, models sized from the schema (a multi-valued item field; several item and
user fields), the artifact files, and refusal of corrupted/truncated artifacts (the atomic writer:
tests/repository/test_repository.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.schema import OOV, PAD
from export.onnx_export import export_model
from export.quantize import INT8_AUC_EVENTS, INT8_AUC_TOLERANCE
from export.runtime import ArtifactError, open_artifact
from model.base import Items
from model.checkpoint import Checkpoint, MetaState
from model.meta import MetaConfig, choose_shrink, train_meta
from model.train import TrainConfig, train_model
from model.zoo import BASE_MODELS, base_of

CASES = [(kind, udg) for kind in BASE_MODELS for udg in (False, True)]
CASE_IDS = [f"{kind}{'+udg' if udg else ''}" for kind, udg in CASES]
MAX_HISTORY = 6  # parity_data's history length (tests/conftest.py)
ATOL = 1e-5
SYNTHETIC_PROFILE = ["cohort", "sex", "segment"]


def tiny_config(kind: str, udg: bool):
    from model.experiment import model_config, udg_preset

    # The preset `udg train --udg` ships for the kind, so the parity tests cover what is served.
    return model_config(kind, udg_preset(kind) if udg else "base", embed_dim=8, hidden=(32, 16), udg_dim=8,
                        gate_hidden=16, extra={"wide_hash_buckets": 1024})


class Zoo:
    """Tiny trained models of one data set and their exported artifacts, built on first use and shared by the
    session: (model, checkpoint, version directory, opened artifact)."""

    def __init__(self, data, root: Path):
        self.data, self.root = data, root
        self.cache: dict = {}

    def get(self, kind: str, udg: bool, meta: bool = True):
        key = (kind, udg, meta)
        if key not in self.cache:
            torch.set_num_threads(1)  # tiny models; robust when the other core is busy
            config = tiny_config(kind, udg)
            train_config = TrainConfig(epochs=1)
            model, metrics = train_model(self.data, config, train_config, progress=False)
            meta_state = None
            if udg and meta == "residual":  # the mean row + residual generator (shrinkage: none to choose)
                generator, info = choose_shrink(model, self.data, MetaConfig(steps=10, users_per_step=16,
                                                                             beta=1e-2), grid=(0.0,))
                meta_state = MetaState(generator.state_dict(), info)
            elif udg and meta:
                generator, info = train_meta(model, self.data, MetaConfig(steps=10, users_per_step=16),
                                             progress=False)
                meta_state = MetaState(generator.state_dict(), info)
            model.eval()
            checkpoint = Checkpoint.from_training(model, config, train_config, self.data, metrics, meta=meta_state)
            name = f"{kind}-{int(udg)}-{meta if isinstance(meta, str) else int(meta)}"
            path = export_model(checkpoint, name, self.root, model=model)
            self.cache[key] = (model, checkpoint, path, open_artifact(path, threads=1))
        return self.cache[key]


@pytest.fixture(scope="session")
def zoo(parity_data, tmp_path_factory):
    return Zoo(parity_data, tmp_path_factory.mktemp("model_repo"))


def torch_probs(model, user_vec, udg_vec, history, candidates, fields: dict | None = None) -> np.ndarray:
    """PyTorch's probabilities; `fields` ({candidate_<name>: tokens}) as the scorer's inputs, else the model's
    item table by id."""
    with torch.no_grad():
        u = torch.as_tensor(np.asarray(user_vec, np.float32).reshape(1, -1))
        g = None if udg_vec is None else torch.as_tensor(np.asarray(udg_vec, np.float32).reshape(1, -1))
        h = torch.as_tensor(np.asarray(history, np.int64).reshape(1, -1))
        if h.shape[1] == 0:
            h = torch.zeros(1, 1, dtype=torch.long)
        ids = torch.as_tensor(np.asarray(candidates, np.int64))
        items = ids if fields is None else Items(ids, [torch.as_tensor(np.asarray(v, np.int64))
                                                       for v in fields.values()])
        return torch.sigmoid(model.score(u, g, h, items)).numpy()


def known_user(artifact, udg: bool):
    users = artifact.load_users()
    row = int(np.argmax(users["history_len"]))
    return users, row, users["user_vec"][row], users["udg_vec"][row] if udg else None


def check_scorer_parity(model, artifact, udg: bool, sizes=(1, 7, 1000), full_history: int | None = None):
    users, row, user_vec, udg_vec = known_user(artifact, udg)
    full = users["history_idx"][row]
    if full_history is not None:
        assert (full != PAD).sum() == full_history, "the fixture should have a user with a full history"
    item_tokens = artifact.schema.items.tokens[2:]
    rng = np.random.default_rng(0)
    for n in sizes:
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
            assert diff <= ATOL, f"udg={udg} N={n} history={label}: max abs diff {diff:.3g}"


def check_new_items_by_features(model, artifact, udg: bool, n: int = 6) -> None:
    """Candidates with the OOV id but a known item's field tokens (an item that arrived after training, with
    known features) score like PyTorch given the same fields, and differently from featureless unknown ids."""
    users, row, user_vec, udg_vec = known_user(artifact, udg)
    history = users["history_idx"][row][:users["history_len"][row]]
    known, _ = artifact.encode_items(artifact.schema.items.tokens[2:2 + n])
    fields = artifact.candidate_fields(known)  # the known items' tokens from items.npz
    assert list(fields) == [f"candidate_{f.name}" for f in artifact.schema.item_fields]
    oov = np.full(len(known), OOV, np.int64)
    got = artifact.score(user_vec, udg_vec, history, oov, fields)
    expected = torch_probs(model, user_vec, udg_vec, history, oov, fields)
    assert float(np.max(np.abs(got - expected))) <= ATOL
    featureless = artifact.score(user_vec, udg_vec, history, oov)  # unknown ids without features: PAD fields
    np.testing.assert_allclose(featureless, torch_probs(model, user_vec, udg_vec, history, oov), rtol=0, atol=ATOL)
    assert float(np.max(np.abs(got - featureless))) > 1e-6, "the candidates' features should change the score"
    # The runtime builds the same inputs from raw ids of new items and their tokens (every field concatenated).
    raw = [f"new-item-{k}" for k in range(len(known))]
    idx, unknown = artifact.encode_items(raw)
    assert unknown.all()
    tokens = {raw[k]: np.concatenate([values[k] for values in fields.values()]) for k in range(len(raw))}
    built = artifact.candidate_fields(idx, raw, new_items=tokens)
    for name, values in fields.items():
        np.testing.assert_array_equal(built[name], values)
    np.testing.assert_array_equal(artifact.score(user_vec, udg_vec, history, idx, built), got)


def check_meta_parity(model, checkpoint, artifact, udg: bool, profiles: np.ndarray) -> None:
    user_vec, udg_vec = artifact.cold_start(profiles)
    with torch.no_grad():
        expected_user = base_of(model).unseen_user_vector(torch.as_tensor(profiles)).numpy()
    assert np.max(np.abs(user_vec - expected_user)) <= ATOL
    if not udg:
        assert udg_vec is None and artifact.udg_dim == 0
        return
    generator = checkpoint.meta_generator()
    with torch.no_grad():
        expected_udg = generator(torch.as_tensor(profiles)).numpy()
    assert np.max(np.abs(udg_vec - expected_udg)) <= ATOL
    single_user, single_udg = artifact.cold_start(profiles[0])
    assert single_user.shape == (artifact.user_dim,) and single_udg.shape == (artifact.udg_dim,)


@pytest.mark.parametrize(("kind", "udg"), CASES, ids=CASE_IDS)
def test_scorer_parity(zoo, kind, udg):
    model, _, _, artifact = zoo.get(kind, udg)
    check_scorer_parity(model, artifact, udg, full_history=MAX_HISTORY)


@pytest.mark.parametrize(("kind", "udg"), CASES, ids=CASE_IDS)
def test_new_item_with_known_features_scores_like_pytorch(zoo, kind, udg):
    model, _, _, artifact = zoo.get(kind, udg)
    check_new_items_by_features(model, artifact, udg)


@pytest.mark.parametrize(("kind", "udg"), CASES, ids=CASE_IDS)
def test_multi_user_graph_scores_each_user_as_a_call_of_their_own(zoo, kind, udg):
    """Several users' candidates in one call of scorer_multi.onnx (each candidate tagged with its user) give
    the one-user scores: users with full, empty and partial histories, different N, an unknown id."""
    model, _, _, artifact = zoo.get(kind, udg)
    assert artifact.can_batch
    users = artifact.load_users()
    rows = np.argsort(-users["history_len"])[:3]
    item_tokens = artifact.schema.items.tokens[2:]
    rng = np.random.default_rng(1)
    requests = []
    for k, (row, n, cut) in enumerate(zip(rows, (7, 1, 40), (None, 0, 3), strict=True)):
        raw = [item_tokens[i] for i in rng.integers(0, len(item_tokens), n)]
        raw[0] = "no-such-item" if k == 2 else raw[0]
        history = users["history_idx"][row][:cut]
        requests.append((users["user_vec"][row], users["udg_vec"][row] if udg else None, history,
                         artifact.encode_items(raw)[0], None))
    batched = artifact.score_many(requests)
    for request, got in zip(requests, batched, strict=True):
        alone = artifact.score(*request)
        assert got.shape == alone.shape
        assert float(np.max(np.abs(got - alone))) <= 1e-6
        assert float(np.max(np.abs(got - torch_probs(model, *request[:4])))) <= ATOL


def test_int8_scorer_is_optional_close_to_fp32_and_opened_on_request(zoo, tmp_path):
    """`--int8` adds scorer.int8.onnx (checksummed, its own golden bound); precision="int8" scores with it,
    close to the fp32 graph; a version without one is refused for int8, and fp32 stays the default."""
    model, checkpoint, fp32_path, fp32 = zoo.get("pnn", True)
    # A tiny 1-epoch model's scores spread little, so int8 reorders a few of its 200 validation events: the
    # default tolerance refuses it (the next test), a looser one admits it.
    path = export_model(checkpoint, "int8", tmp_path, model=model, int8=True, int8_auc_tolerance=0.05)
    manifest = json.loads((path / "manifest.json").read_text())
    assert "scorer.int8.onnx" in manifest["files"] and manifest["graphs"]["scorer_int8"]["atol"] > ATOL
    check = manifest["graphs"]["scorer_int8"]["validation"]  # both graphs scored on the validation events
    assert check["events"] == min(INT8_AUC_EVENTS, len(zoo.data.splits["valid"])) > 0
    assert 0.5 < check["auc_fp32"] < 1 and check["auc_delta"] == check["auc_int8"] - check["auc_fp32"]
    assert abs(check["auc_delta"]) <= check["tolerance"] == 0.05
    assert 0 < manifest["export_parity"]["scorer_int8_max_abs_diff"] <= manifest["graphs"]["scorer_int8"]["atol"]
    int8 = open_artifact(path, threads=1, precision="int8")
    users, row, user_vec, udg_vec = known_user(int8, True)
    candidates = np.arange(2, int8.schema.items.known_size, dtype=np.int64)
    history = users["history_idx"][row]
    got, reference = int8.score(user_vec, udg_vec, history, candidates), fp32.score(user_vec, udg_vec, history,
                                                                                 candidates)
    assert 0 < float(np.max(np.abs(got - reference))) <= 2e-2
    assert np.corrcoef(got, reference)[0, 1] > 0.9  # a tiny 1-epoch model: scores spread little
    with pytest.raises(ArtifactError, match="no int8 scorer"):
        open_artifact(fp32_path, threads=1, precision="int8")
    assert "scorer.int8.onnx" not in json.loads((fp32_path / "manifest.json").read_text())["files"]


def test_an_int8_scorer_that_moves_auc_too_far_is_refused_and_nothing_is_written(zoo, tmp_path, monkeypatch):
    from export import quantize

    model, checkpoint, _, _ = zoo.get("pnn", True)
    with pytest.raises(quantize.Int8Refused, match=r"moves validation AUC by [-+]0\.\d{5} .*more than 0.0005"):
        export_model(checkpoint, "tiny", tmp_path, model=model, int8=True)  # the tiny model above, measured
    assert not (tmp_path / "tiny").exists()
    moved = {"events": 100, "auc_fp32": 0.70, "auc_int8": 0.69, "auc_delta": -0.01}
    monkeypatch.setattr(quantize, "int8_validation", lambda *args, **kwargs: moved)
    with pytest.raises(quantize.Int8Refused, match=r"moves validation AUC by -0.01000 .*more than 0.0005"):
        export_model(checkpoint, "refused", tmp_path, model=model, int8=True)
    assert not (tmp_path / "refused").exists()
    # a looser tolerance admits it; unmeasurable data writes it with a warning and says so in the manifest
    path = export_model(checkpoint, "loose", tmp_path, model=model, int8=True, int8_auc_tolerance=0.02)
    assert json.loads((path / "manifest.json").read_text())["graphs"]["scorer_int8"]["validation"]["tolerance"] == 0.02
    monkeypatch.setattr(quantize, "int8_validation", lambda *args, **kwargs: {"events": 0, "reason": "no data"})
    path = export_model(checkpoint, "unmeasured", tmp_path, model=model, int8=True)
    assert json.loads((path / "manifest.json").read_text())["graphs"]["scorer_int8"]["validation"] == {
        "events": 0, "reason": "no data", "tolerance": INT8_AUC_TOLERANCE}


def test_per_kind_session_options_are_applied_to_the_scorer_sessions(zoo, monkeypatch):
    """The kind named in the manifest picks its row of SESSION_TUNING_BY_KIND for the scorer session; the meta
    graph and kinds without a row keep the defaults; an explicit spin overrides the row's; scores are unchanged."""
    import onnxruntime as ort

    from export import runtime

    model, checkpoint, path, default = zoo.get("pnn", True)
    tuned = runtime.SessionTuning(optimization="basic", execution="parallel", spin=False)
    monkeypatch.setattr(runtime, "SESSION_TUNING_BY_KIND", {"pnn": tuned})
    artifact = open_artifact(path, threads=2)
    options = artifact._scorer.get_session_options()
    assert artifact.session_tuning == tuned
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 2)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    meta_options = artifact._meta.get_session_options()
    assert meta_options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert meta_options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL

    spinning = open_artifact(path, threads=2, spin=True)._scorer.get_session_options()
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert spinning.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC

    users, row, user_vec, udg_vec = known_user(artifact, True)
    candidates = np.arange(2, artifact.schema.items.known_size, dtype=np.int64)
    history = users["history_idx"][row]
    np.testing.assert_allclose(artifact.score(user_vec, udg_vec, history, candidates),
                               default.score(user_vec, udg_vec, history, candidates), atol=1e-6)

    monkeypatch.setattr(runtime, "SESSION_TUNING_BY_KIND", {"din": tuned})
    untouched = open_artifact(path, threads=1)
    assert untouched.session_tuning == runtime.DEFAULT_TUNING
    assert untouched._scorer.get_session_options().execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    with pytest.raises(ValueError, match="unknown session tuning"):
        runtime.session_options(1, runtime.SessionTuning(optimization="max"))


def test_the_shipped_table_turns_spinning_off_for_din(zoo):
    """The measured row: a DIN version opens its scorer without intra-op spinning, a PNN one with the default."""
    din = zoo.get("din", True)[3]._scorer.get_session_options()
    assert din.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    pnn = zoo.get("pnn", True)[3]
    assert pnn.session_tuning.spin is None
    with pytest.raises(RuntimeError, match="does not have configuration"):  # onnxruntime's default: spinning
        pnn._scorer.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


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
    model, checkpoint, _, artifact = zoo.get(kind, udg)
    check_meta_parity(model, checkpoint, artifact, udg, np.array([[2, 2, 2], [OOV, OOV, OOV], [3, 2, 4]], np.int64))


def test_residual_generator_is_exported_and_warmed_alike(zoo):
    """The residual variant (mean row + profile residual) travels in meta.onnx and in warmup.pt: the served
    cold start, the checkpoint's generator and the warm-up worker's give the same row."""
    from repository import ModelRepository
    from warmup.model import WarmupModel

    model, checkpoint, path, artifact = zoo.get("pnn", True, meta="residual")
    assert checkpoint.meta_generator().variant == "residual"
    profiles = np.array([[2, 2, 2], [OOV, OOV, OOV], [3, 2, 4]], np.int64)
    check_meta_parity(model, checkpoint, artifact, True, profiles)
    warm = WarmupModel.load(ModelRepository(path.parent), path.name)
    assert warm.generator.variant == "residual"
    with torch.no_grad():
        assert torch.equal(warm.generator(torch.as_tensor(profiles)),
                           checkpoint.meta_generator()(torch.as_tensor(profiles)))
    _, warmed = warm.generated_state({})  # an empty profile: every field OOV
    _, served = artifact.cold_start(profiles[1:2])
    assert np.max(np.abs(warmed - served)) <= ATOL


def test_meta_without_generator_uses_mean_udg_row(zoo):
    model, checkpoint, _, artifact = zoo.get("pnn", True, meta=False)
    assert artifact.manifest["meta"]["udg_source"] == "mean_known_users"
    _, udg_vec = artifact.cold_start(np.array([[2, 2, 2], [3, 3, 3]], np.int64))
    known = zoo.data.schema.users.lookup_many(checkpoint.known_users.user_ids)
    expected = model.udg_emb.weight[torch.as_tensor(known)].mean(0).detach().numpy()
    assert np.max(np.abs(udg_vec - expected)) <= ATOL


def test_artifact_files(zoo):
    model, checkpoint, path, artifact = zoo.get("pnn", True)
    assert sorted(p.name for p in path.iterdir()) == ["items.npz", "manifest.json", "meta.onnx", "scorer.onnx",
                                                      "scorer_multi.onnx", "users.npz", "warmup.pt"]
    manifest = json.loads((path / "manifest.json").read_text())
    for key in ("version", "model", "dims", "vocab", "features", "graphs", "exporter", "files", "metrics",
                "exported_at", "golden"):
        assert key in manifest
    assert manifest["format"] == "udg-artifact/2"
    assert sorted(manifest["files"]) == ["items.npz", "meta.onnx", "scorer.onnx", "scorer_multi.onnx", "users.npz",
                                         "warmup.pt"]
    schema = checkpoint.schema.to_json()
    schema.pop("item_table")  # items.npz holds it
    assert manifest["features"] == schema
    assert manifest["vocab"]["oov_index"] == OOV and manifest["vocab"]["pad_index"] == PAD
    width = checkpoint.schema.item_fields[0].width
    assert [(s["name"], s["shape"]) for s in manifest["graphs"]["scorer"]["inputs"]] == [
        ("user_vec", [1, artifact.user_dim]), ("udg_vec", [1, artifact.udg_dim]), ("history", [1, "history_len"]),
        ("candidates", ["candidates"]), ("candidate_category", ["candidates", width])]
    assert manifest["exporter"]["opset"] >= 17
    # A golden case is a new item: the OOV id with the first candidate's fields.
    golden = manifest["golden"]["scorer"][0]["inputs"]
    assert golden["candidates"][-1] == OOV and golden["candidate_category"][-1] == golden["candidate_category"][0]
    known_users = checkpoint.known_users
    with np.load(path / "users.npz", allow_pickle=False) as users:
        n = len(users["user_ids"])
        assert n == len(known_users.user_ids) > 0
        assert users["user_vec"].shape == (n, artifact.user_dim) and users["user_vec"].dtype == np.float32
        assert users["udg_vec"].shape == (n, artifact.udg_dim)
        assert users["history"].shape == (n, MAX_HISTORY) and users["history"].dtype.kind == "U"
        assert list(users["profile_fields"]) == SYNTHETIC_PROFILE
        first = known_users.history[0][:known_users.history_len[0]].tolist()
        assert list(users["history"][0][:len(first)]) == first
        with torch.no_grad():
            u, g = model.user_state(torch.as_tensor(users["user_index"][:5]), torch.as_tensor(users["profile_idx"][:5]))
        assert np.allclose(users["user_vec"][:5], u.numpy()) and np.allclose(users["udg_vec"][:5], g.numpy())
    with np.load(path / "items.npz", allow_pickle=False) as items:  # the vocabulary's items come first
        assert {"field_category", "item_ids"} <= set(items.files)
        vocabulary = checkpoint.schema.items.tokens[2:]
        assert items["item_ids"][:len(vocabulary)].tolist() == vocabulary
        np.testing.assert_array_equal(items["field_category"][:len(vocabulary)],
                                      checkpoint.schema.item_table["category"][2:])


def test_encoding(zoo):
    artifact = zoo.get("pnn", True)[3]
    assert artifact.schema.items.known("i3")
    index, unknown = artifact.encode_items(["i3", "nope", 5])
    assert index.dtype == np.int64 and list(unknown) == [False, True, True] and index[1] == OOV
    profile = artifact.encode_profile({"sex": "M", "segment": "never-seen"})
    assert profile.dtype == np.int64 and profile.shape == (3,)
    assert profile[0] == OOV and profile[1] != OOV and profile[2] == OOV  # missing cohort, unknown segment
    from dataset.schema import UnknownField

    with pytest.raises(UnknownField, match="zodiac") as error:
        artifact.encode_profile({"zodiac": "leo"})
    assert isinstance(error.value, ValueError)
    # out-of-range indices never reach the graph: they score exactly as the OOV row they are mapped to
    user = np.linspace(-0.5, 0.5, artifact.user_dim)
    udg = np.linspace(0.3, -0.3, artifact.udg_dim)
    np.testing.assert_array_equal(artifact.score(user, udg, [10 ** 9], [-5, 10 ** 9]),
                                  artifact.score(user, udg, [OOV], [OOV, OOV]))
    assert artifact.score(user, udg, [], []).shape == (0,)
    fields = {"candidate_category": np.array([[10 ** 9], [-3]])}  # out-of-vocabulary field tokens too
    np.testing.assert_array_equal(artifact.score(user, udg, [], [2, 3], fields),
                                  artifact.score(user, udg, [], [2, 3], {"candidate_category": np.array([[OOV]] * 2)}))
    assert not np.array_equal(artifact.score(user, udg, [], [2, 3], fields), artifact.score(user, udg, [], [2, 3]))


# --- models sized from the schema: a multi-valued item field; several item and user fields ------------------
def write_grouplens(folder: Path, users: int = 120, items: int = 80, per_user: int = 24, seed: int = 0) -> Path:
    """A small MovieLens-100K in the original GroupLens layout: ages, genders, occupations; 0-3 genres per movie."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    occupations = ("artist", "doctor", "engineer", "student", "other")
    (folder / "u.user").write_text("".join(
        f"{u}|{rng.integers(10, 70)}|{'MF'[rng.integers(2)]}|{occupations[rng.integers(5)]}|00000\n"
        for u in range(1, users + 1)))
    lines = []
    for i in range(1, items + 1):
        flags = ["0"] * 19
        for genre in rng.choice(np.arange(1, 19), size=rng.integers(0, 4), replace=False):
            flags[genre] = "1"
        lines.append(f"{i}|Movie {i} (1995)|01-Jan-1995||http://x|" + "|".join(flags))
    (folder / "u.item").write_text("\n".join(lines) + "\n", encoding="latin-1")
    ratings = []
    for u in range(1, users + 1):
        for step, i in enumerate(rng.choice(np.arange(1, items + 1), size=per_user, replace=False)):
            ratings.append(f"{u}\t{i}\t{rng.integers(1, 6)}\t{880000000 + 100 * u + step}")
    (folder / "u.data").write_text("\n".join(ratings) + "\n")
    return folder


SMALL_SHOP = {"users": 300, "items": 80, "new_items": 6, "events_per_user": 20.0, "seed": 3}


@pytest.fixture(scope="session")
def schema_zoos(tmp_path_factory):
    """Per data set, a Zoo of its tiny models: "movielens-like" (the built-in MovieLens-100K spec on a small
    GroupLens log: numeric age, multi-valued genres) and "shop" (4 user fields, 4 item fields)."""
    from dataset.ingest import prepare
    from dataset.spec import load_spec

    grouplens = write_grouplens(tmp_path_factory.mktemp("grouplens"))
    specs = {
        "movielens-like": load_spec("movielens-100k").with_overrides(
            **{"generator.params.grouplens_dir": str(grouplens), "behavior.max_length": 8}),
        "shop": load_spec("shop").with_overrides(**{"generator.params": SMALL_SHOP, "behavior.max_length": 8}),
    }
    cache: dict = {}

    def get(name: str) -> Zoo:
        if name not in cache:
            cache[name] = Zoo(prepare(specs[name]), tmp_path_factory.mktemp(f"repo-{name}"))
        return cache[name]

    return get


SCHEMA_CASES = [(name, kind) for name in ("movielens-like", "shop") for kind in BASE_MODELS]


@pytest.mark.parametrize(("name", "kind"), SCHEMA_CASES, ids=[f"{n}-{k}" for n, k in SCHEMA_CASES])
def test_every_kind_sizes_itself_from_the_schema_and_exports(schema_zoos, name, kind):
    zoo = schema_zoos(name)
    schema = zoo.data.schema
    if name == "movielens-like":
        assert schema.profile_fields == ["age", "gender", "occupation"] and schema.item_field_names == ["genres"]
        genres = schema.item_fields[0]
        assert genres.kind == "multi" and genres.width == 3
        assert ((schema.item_table["genres"] != PAD).sum(1) >= 2).sum() > 5  # movies of several genres
        assert genres.vocab.known("unknown")  # a movie without genres gets the `empty` token
    else:
        assert len(schema.user_fields) >= 4 and len(schema.item_fields) >= 2
        assert {f.kind for f in schema.item_fields} == {"categorical", "numeric", "multi"}
    model, checkpoint, path, artifact = zoo.get(kind, True)
    base = base_of(model)
    d = model.config.embed_dim
    assert base.user_fields == 1 + len(schema.user_fields) and base.user_dim == base.user_fields * d
    assert base.item_field_count == 1 + len(schema.item_fields) and base.item_dim == base.item_field_count * d
    assert [e.num_embeddings for e in base.profile_embs] == [len(f.vocab) for f in schema.user_fields]
    assert [e.num_embeddings for e in base.item_field_embs] == [len(f.vocab) for f in schema.item_fields]
    inputs = artifact.manifest["graphs"]["scorer"]["inputs"]
    assert [(s["name"], s["shape"]) for s in inputs[-len(schema.item_fields):]] == [
        (f"candidate_{f.name}", ["candidates", f.width]) for f in schema.item_fields]
    assert artifact.manifest["dims"]["profile_fields"] == len(schema.user_fields)

    # Every known item (multi-valued candidates included) and an unknown id; empty, full and partial histories.
    check_scorer_parity(model, artifact, True, sizes=(1, len(schema.items.tokens) + 5))
    check_new_items_by_features(model, artifact, True)
    # Cold start from raw profiles: the first users' (numbers bucketed as in training) and an empty one.
    users = artifact.load_users()
    raw = [{f: v for f, v in zip(users["profile_fields"].tolist(), row, strict=True) if v}
           for row in users["profile"][:4].tolist()]
    profiles = np.stack([artifact.encode_profile(p) for p in [*raw, {}]])
    np.testing.assert_array_equal(profiles[:4], users["profile_idx"][:4])
    assert (profiles[-1] == OOV).all()
    check_meta_parity(model, checkpoint, artifact, True, profiles)


def test_numeric_profile_fields_take_raw_numbers(schema_zoos):
    artifact = schema_zoos("movielens-like").get("pnn", True)[3]
    by_label = artifact.encode_profile({"age": "25-34", "gender": "F", "occupation": "student"})
    assert by_label[0] > OOV
    for age in (25, 30, 34.5, "30"):
        np.testing.assert_array_equal(artifact.encode_profile({"age": age, "gender": "F", "occupation": "student"}),
                                      by_label)
    assert artifact.encode_profile({"age": 24})[0] != by_label[0]


def test_the_shops_new_catalogue_items_are_scored_by_their_features(schema_zoos):
    """The shop's catalogue has items no event mentions: no id embedding, but a category, brand, price and tags
    the model knows. Served with their tokens, they score as PyTorch scores them with the same fields."""
    import pyarrow.parquet as pq

    from dataset.shop import ShopParams, new_item_ids

    zoo = schema_zoos("shop")
    model, _, _, artifact = zoo.get("din", True)
    catalogue = pq.read_table(zoo.data.spec.source_dir() / "items.parquet").to_pylist()
    new = set(new_item_ids(ShopParams(**SMALL_SHOP)))
    rows = [row for row in catalogue if row["item_id"] in new]
    assert len(rows) == SMALL_SHOP["new_items"]
    schema = artifact.schema
    tokens = {}
    for row in rows:
        values = {f.name: row[f.source_column] for f in zoo.data.spec.item_fields}
        encoded = schema.encode_item_fields(values)
        assert encoded["category"][0] > OOV and encoded["brand"][0] > OOV  # known features…
        tokens[row["item_id"]] = np.concatenate([encoded[f.name] for f in schema.item_fields])
    raw = [row["item_id"] for row in rows]
    idx, unknown = artifact.encode_items(raw)
    assert unknown.all()  # …of unknown ids
    fields = artifact.candidate_fields(idx, raw, new_items=tokens)
    users, row, user_vec, udg_vec = known_user(artifact, True)
    history = users["history_idx"][row][:users["history_len"][row]]
    got = artifact.score(user_vec, udg_vec, history, idx, fields)
    np.testing.assert_allclose(got, torch_probs(model, user_vec, udg_vec, history, idx, fields), rtol=0, atol=ATOL)
    assert float(np.max(np.abs(got - artifact.score(user_vec, udg_vec, history, idx)))) > 1e-6


def _copy(path: Path, tmp_path: Path) -> Path:
    target = tmp_path / path.name
    shutil.copytree(path, target)
    return target


@pytest.mark.parametrize("damage", ["flip:scorer.onnx", "truncate:scorer.onnx", "truncate:meta.onnx",
                                    "flip:users.npz", "flip:items.npz", "truncate:items.npz",
                                    "truncate:manifest.json", "missing:meta.onnx"])
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
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


def test_cli_export_from_checkpoint(zoo, tmp_path):
    _, checkpoint, exported, _ = zoo.get("pnn", True)
    checkpoint = checkpoint.save(tmp_path / "checkpoint.pt")
    from udg_cli import main

    assert main(["export", str(checkpoint), "--version", "v1", "--out", str(tmp_path / "repo")]) == 0
    artifact = open_artifact(tmp_path / "repo" / "v1")
    assert artifact.version == "v1" and artifact.manifest["model"]["kind"] == "pnn"
    # The file round trip exports the same model as the in-memory checkpoint did.
    first = json.loads((exported / "manifest.json").read_text())
    # (outputs to float rounding: the command may run with another torch thread count)
    for case, again in zip(first["golden"]["scorer"], artifact.manifest["golden"]["scorer"], strict=True):
        assert again["inputs"] == case["inputs"]
        np.testing.assert_allclose(again["outputs"]["probabilities"], case["outputs"]["probabilities"], atol=1e-6)
    assert artifact.manifest["features"] == first["features"] and artifact.manifest["meta"] == first["meta"]
    with pytest.raises(FileExistsError):
        main(["export", str(checkpoint), "--version", "v1", "--out", str(tmp_path / "repo")])



def test_hashed_item_ids_map_to_their_training_bucket_at_serving(tmp_path):
    """With a vocabulary policy that hashes rare ids, the runtime maps an id without a row of its own to the
    same hash bucket training used (not to OOV), and lists it as unknown."""
    from dataset.ingest import prepare
    from tests.tiny import tiny_synthetic

    spec = tiny_synthetic(items=80, events_per_user=40, max_history=MAX_HISTORY).with_overrides(
        **{"vocabulary.min_count": 20, "vocabulary.hash_buckets": 8})
    data = prepare(spec)
    items = data.schema.items
    assert items.hash_buckets == 8 and len(items) == items.known_size + 8
    model, metrics = train_model(data, tiny_config("pnn", False), TrainConfig(epochs=1), progress=False)
    checkpoint = Checkpoint.from_training(model, model.config, TrainConfig(epochs=1), data, metrics)
    artifact = open_artifact(export_model(checkpoint, "hashed", tmp_path, model=model),
                             providers=["CPUExecutionProvider"])
    rare = [f"i{i}" for i in range(80) if not items.known(f"i{i}")][:3] + ["never-seen"]
    idx, unknown = artifact.encode_items(rare)
    assert idx.tolist() == [items.lookup(r) for r in rare] and (idx >= items.known_size).all() and unknown.all()
    users, row, user_vec, _ = known_user(artifact, False)
    got = artifact.score(user_vec, None, users["history_idx"][row], idx)
    np.testing.assert_allclose(got, torch_probs(model, user_vec, None, users["history_idx"][row], idx), atol=ATOL)


def test_a_version_without_known_users_exports_and_serves_cold(tmp_path):
    """Every user below the vocabulary's min count: no users.npz rows; the golden cases take the cold path."""
    from dataset.ingest import prepare
    from tests.tiny import tiny_synthetic

    data = prepare(tiny_synthetic(max_history=MAX_HISTORY).with_overrides(**{"vocabulary.min_count": 1000}))
    assert len(data.known_users) == 0
    model, metrics = train_model(data, tiny_config("pnn", True), TrainConfig(epochs=1), progress=False)
    checkpoint = Checkpoint.from_training(model, model.config, TrainConfig(epochs=1), data, metrics)
    artifact = open_artifact(export_model(checkpoint, "nobody", tmp_path, model=model),
                             providers=["CPUExecutionProvider"])
    assert len(artifact.load_users()["user_ids"]) == 0 and artifact.manifest["meta"]["udg_source"] == "mean_known_users"


def test_udg_export_int8_prints_the_auc_move_and_refuses_past_the_tolerance(zoo, tmp_path, capsys):
    from udg_cli import main

    _, checkpoint, _, _ = zoo.get("pnn", True)
    path = checkpoint.save(tmp_path / "checkpoint.pt")
    args = ["export", str(path), "--out", str(tmp_path / "repo"), "--int8", "--no-check", "--threads", "1"]
    assert main([*args, "--version", "strict"]) == 2
    assert "udg export: the int8 scorer moves validation AUC by" in capsys.readouterr().err
    assert main([*args, "--version", "loose", "--int8-auc-tolerance", "0.05"]) == 0
    assert re.search(r"int8 scorer: validation AUC 0\.\d{5} -> 0\.\d{5} \([-+]0\.\d{5}, tolerance 0\.05\) on [\d,]+ "
                     r"events", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main([*args, "--version", "bad", "--int8-auc-tolerance", "-1"])


@pytest.mark.parametrize("gate_input", ["paper", "official"])
@pytest.mark.parametrize("kind", ["pnn", "deepfm", "wide_deep"])
def test_the_multi_user_module_equals_one_user_modules_in_torch(parity_data, kind, gate_input):
    """The multi-user serving form (user side once per user, gathered) against the one-user form per user, in
    PyTorch, with random weights: both gate inputs, users with full, partial and empty histories."""
    from model.experiment import model_config
    from model.serving import MultiUserScorerModule, ScorerModule
    from model.zoo import build_model

    torch.manual_seed(3)
    model = build_model(model_config(kind, "udg", embed_dim=8, hidden=(32, 16), udg_dim=8, gate_hidden=16,
                                     gate_input=gate_input), parity_data.schema).eval()
    with torch.no_grad():  # the side parts' tables start at zero: randomise them so that they take part
        for parameter in model.parameters():
            if not parameter.abs().sum():
                parameter.normal_(std=0.05)
    train = parity_data.splits["train"]
    rows = np.argsort(-(train.history != PAD).sum(1))[:3]
    user, profile = torch.as_tensor(train.user[rows]), torch.as_tensor(train.profile[rows])
    history = torch.as_tensor(train.history[rows]).clone()
    history[1, 2:] = PAD
    history[2, :] = PAD
    with torch.no_grad():
        user_vec, udg_vec = model.user_state(user, profile)
        udg_vec = udg_vec + torch.randn_like(udg_vec)  # rows that differ, so that a wrong gather shows
        candidate_user = torch.tensor([0, 2, 1, 1, 0, 2, 2])
        candidates = torch.arange(2, 2 + len(candidate_user))
        fields = model.base_model.lookup_items(candidates).fields
        batched = MultiUserScorerModule(model)(user_vec, udg_vec, history, candidate_user, candidates, *fields)
        one = ScorerModule(model)
        for row in range(3):
            mine = candidate_user == row
            alone = one(user_vec[row:row + 1], udg_vec[row:row + 1], history[row:row + 1], candidates[mine],
                        *[f[mine] for f in fields])
            torch.testing.assert_close(batched[mine], alone, rtol=1e-5, atol=1e-6)
