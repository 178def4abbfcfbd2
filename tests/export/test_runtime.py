"""The torch-free runtime (`export/runtime.py`) on the shared tiny version: what each input check, encoding rule
and code path promises, observed through `open_artifact` and real onnxruntime sessions (CPU)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from export import runtime
from export.runtime import ArtifactError, open_artifact
from tests.conftest import VERSION

CPU = ["CPUExecutionProvider"]


@pytest.fixture(scope="module")
def vectors(artifact):
    rng = np.random.default_rng(0)
    return (rng.normal(0, 0.5, artifact.user_dim).astype(np.float32),
            rng.normal(0, 0.5, artifact.udg_dim).astype(np.float32))


def copy_version(model_repo, tmp_path):
    target = tmp_path / VERSION
    shutil.copytree(model_repo / VERSION, target)
    return target


# --- providers and sessions ---------------------------------------------------------------------------------
def test_providers_prefer_tensorrt_then_cuda_then_cpu(monkeypatch):
    import onnxruntime as ort

    assert runtime.choose_providers(["X", ("Y", {})]) == (["X", ("Y", {})], "requested explicitly")
    gpu = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: gpu)
    assert runtime.choose_providers(tensorrt=True, device_id=3) == (
        [("TensorrtExecutionProvider", {"device_id": 3}), ("CUDAExecutionProvider", {"device_id": 3}),
         "CPUExecutionProvider"], "TensorRT requested and available")
    assert runtime.choose_providers(device_id=2) == (
        [("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"], "CUDA provider available")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["TensorrtExecutionProvider", "CPUExecutionProvider"])
    assert runtime.choose_providers(tensorrt=True)[0][0][0] == "TensorrtExecutionProvider"
    assert runtime.choose_providers()[0] == CPU  # TensorRT only when asked for
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    chosen, reason = runtime.choose_providers(tensorrt=True)
    assert chosen == CPU
    assert reason == "no CUDA provider in this onnxruntime build (available: ['CPUExecutionProvider'])"


def test_sessions_run_sequential_with_the_requested_threads(model_repo):
    scorer = model_repo / VERSION / "scorer.onnx"
    options = runtime._session(scorer, CPU, 3, spin=False).get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert runtime._session(scorer, CPU, 1, spin=True).get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "1"
    assert runtime._session(scorer, CPU, 0, spin=None).get_session_options().intra_op_num_threads == 1
    import onnxruntime as ort

    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_an_unloadable_graph_is_an_artifact_error_naming_the_file(tmp_path):
    bad = tmp_path / "scorer.onnx"
    bad.write_bytes(b"not an onnx graph")
    with pytest.raises(ArtifactError, match=r"scorer\.onnx: onnxruntime cannot load it"):
        runtime._session(bad, CPU, 1, None)


def test_open_reports_the_version_its_dims_and_the_provider(artifact, model_repo):
    manifest = json.loads((model_repo / VERSION / "manifest.json").read_text())
    assert (artifact.version, artifact.path) == (VERSION, model_repo / VERSION)
    assert (artifact.user_dim, artifact.udg_dim, artifact.max_history) == (
        manifest["dims"]["user_dim"], manifest["dims"]["udg_dim"], manifest["dims"]["max_history"])
    assert (artifact.pad_index, artifact.oov_index) == (0, 1)
    assert artifact.provider == "CPUExecutionProvider" and not artifact.on_gpu and artifact.can_batch
    assert artifact.n_items == len(artifact.schema.items) == manifest["vocab"]["items"]["size"]


def test_open_refuses_an_unknown_precision_and_a_missing_int8_graph(model_repo):
    with pytest.raises(ArtifactError, match="precision must be 'fp32' or 'int8', not 'fp16'"):
        open_artifact(model_repo / VERSION, providers=CPU, precision="fp16")
    with pytest.raises(ArtifactError, match="no int8 scorer in this version"):
        open_artifact(model_repo / VERSION, providers=CPU, precision="int8")


def test_verification_can_skip_the_users_file_or_everything(model_repo, tmp_path):
    version = copy_version(model_repo, tmp_path)
    users = version / "users.npz"
    users.write_bytes(users.read_bytes()[:-10])  # truncated
    with pytest.raises(ArtifactError, match="users.npz"):
        open_artifact(version, providers=CPU)
    assert open_artifact(version, providers=CPU, verify_users=False).version == VERSION
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["golden"]["scorer"][0]["outputs"]["probabilities"][0] += 0.5
    (version / "manifest.json").write_text(json.dumps(manifest))
    # verify=False: neither the files' hashes nor the golden outputs (the manifest changed: its hash is not
    # checked, the golden case would fail)
    assert open_artifact(version, providers=CPU, verify=False).version == VERSION
    with pytest.raises(ArtifactError, match=r"scorer\.onnx: golden outputs differ by 0\.5"):
        open_artifact(version, providers=CPU, verify_users=False)


def test_golden_checks_cover_every_graph(artifact, model_repo, tmp_path):
    assert 0.0 <= artifact.check_golden() <= 1e-4
    for graph, file in (("scorer_multi", "scorer_multi.onnx"), ("meta", "meta.onnx")):
        version = copy_version(model_repo, tmp_path / graph)
        manifest = json.loads((version / "manifest.json").read_text())
        outputs = manifest["golden"][graph][0]["outputs"]
        name = next(iter(outputs))
        outputs[name] = (np.asarray(outputs[name]) + 1e-3).tolist()
        (version / "manifest.json").write_text(json.dumps(manifest))
        opened = open_artifact(version, providers=CPU, verify=False)
        with pytest.raises(ArtifactError, match=rf"{file}: golden outputs differ by 0\.001"):
            opened.check_golden()
        manifest["golden"]["atol"] = 2e-3  # the manifest's own tolerance is the bound
        opened.manifest = manifest
        assert 1e-3 - 1e-6 < opened.check_golden() < 2e-3


def test_golden_shape_mismatch_names_both_shapes(tmp_path):
    with pytest.raises(ArtifactError, match=r"x.onnx: golden output shape \(2,\), expected \(3,\)"):
        runtime._check([0.1, 0.2], [0.1, 0.2, 0.3], 1e-4, tmp_path / "x.onnx")
    assert runtime._check([], [], 1e-4, tmp_path / "x.onnx") == 0.0
    with pytest.raises(ArtifactError, match="differ by nan"):  # NaN never passes (`not diff <= atol`)
        runtime._check([float("nan")], [0.5], 1e-4, tmp_path / "x.onnx")
    assert runtime._check([0.5], [0.5001], 2e-4, tmp_path / "x.onnx") == pytest.approx(1e-4, abs=1e-6)


# --- encoding -----------------------------------------------------------------------------------------------
def test_items_encode_to_their_rows_and_unknown_ones_to_oov(artifact):
    index, unknown = artifact.encode_items(["i3", "nope", "i7"])
    vocab = artifact.schema.items
    assert index.tolist() == [vocab.index["i3"], 1, vocab.index["i7"]] and unknown.tolist() == [False, True, False]
    empty, none = artifact.encode_items([])
    assert empty.shape == none.shape == (0,) and empty.dtype == np.int64


def test_candidate_fields_come_from_the_item_table_new_items_or_pad(artifact, model_repo):
    with np.load(model_repo / VERSION / "items.npz") as items:
        known_ids = items["item_ids"][items["known"]]
        table = items["field_category"][items["known"]]
    ids = [str(known_ids[0]), str(known_ids[5]), "new-a", "new-b"]
    idx, _ = artifact.encode_items(ids)
    plain = artifact.candidate_fields(idx)["candidate_category"]
    assert plain.tolist() == [table[idx[0] - 2].tolist(), table[idx[1] - 2].tolist(), [0], [0]]
    assert plain[:2].min() > 1  # known items have real tokens, not PAD/OOV
    with_new = artifact.candidate_fields(idx, ids, {"new-a": np.array([5])})["candidate_category"]
    assert with_new.tolist() == [*plain[:2].tolist(), [5], [0]]  # new-b has no row: PAD
    # an index past the vocabulary (a raw index from a caller) is treated like an unknown id
    past = artifact.candidate_fields(np.array([artifact.n_items + 3]), ["new-a"], {"new-a": np.array([7])})
    assert past["candidate_category"].tolist() == [[7]]
    assert artifact.candidate_fields(np.array([0, 1]))["candidate_category"].tolist() == [[0], [0]]


def test_multi_token_new_items_are_split_per_field(artifact, monkeypatch):
    """new_items rows are every field's tokens concatenated: each field takes its own slice."""
    from dataset.schema import FieldSchema

    category = artifact.schema.item_fields[0]
    second = FieldSchema(name="tags", kind="multi", vocab=category.vocab, width=2)
    monkeypatch.setattr(artifact.schema, "item_fields", [category, second])
    monkeypatch.setitem(artifact._item_tables, "tags", np.zeros((artifact.schema.items.known_size, 2), np.int64))
    out = artifact.candidate_fields(np.array([1]), ["n"], {"n": np.array([4, 6, 7])})
    assert out["candidate_category"].tolist() == [[4]]
    assert out["candidate_tags"].tolist() == [[6, 7]]


def test_feeds_check_the_vectors_and_shape_every_input(artifact, vectors):
    user, udg = vectors
    with pytest.raises(ValueError, match=f"user_vec has 3 values, the model expects {artifact.user_dim}"):
        artifact.feeds(user[:3], udg, [], [2])
    with pytest.raises(ValueError, match="this model uses UDG: udg_vec is required"):
        artifact.feeds(user, None, [], [2])
    with pytest.raises(ValueError, match=f"udg_vec has 2 values, the model expects {artifact.udg_dim}"):
        artifact.feeds(user, udg[:2], [], [2])
    long_history = np.arange(2, 2 + artifact.max_history + 5)
    feeds = artifact.feeds(user.reshape(1, -1), udg.reshape(1, -1), long_history, [[2, 3]])
    assert feeds["history"].tolist() == [long_history[:artifact.max_history].tolist()]  # most recent kept
    assert feeds["user_vec"].shape == (1, artifact.user_dim) and feeds["user_vec"].dtype == np.float32
    assert feeds["udg_vec"].shape == (1, artifact.udg_dim) and feeds["udg_vec"].dtype == np.float32
    assert feeds["candidates"].tolist() == [2, 3] and feeds["candidate_category"].shape == (2, 1)
    assert artifact.feeds(user, udg, [], [2])["history"].tolist() == [[0]]  # empty: one PAD slot
    out_of_range = artifact.feeds(user, udg, [-1, artifact.n_items], [artifact.n_items, -7, 2])
    assert out_of_range["history"].tolist() == [[1, 1]] and out_of_range["candidates"].tolist() == [1, 1, 2]
    vocab = len(artifact.schema.item_fields[0].vocab)
    fields = {"candidate_category": np.array([[vocab], [-1], [vocab - 1], [0]])}
    assert artifact.feeds(user, udg, [], [2, 3, 4, 5], fields)["candidate_category"].tolist() == [
        [1], [1], [vocab - 1], [0]]  # out of range -> OOV; the last row and PAD stay


def test_score_is_one_probability_per_candidate_and_none_for_none(artifact, vectors):
    user, udg = vectors
    probs = artifact.score(user, udg, [3, 4], [2, 3, 4, 5])
    assert probs.shape == (4,) and probs.dtype == np.float32 and ((probs > 0) & (probs < 1)).all()
    assert len(set(probs.tolist())) > 1
    empty = artifact.score(user, udg, [3], [])
    assert empty.shape == (0,) and empty.dtype == np.float32
    # the history is an input: a different one changes the scores
    assert not np.allclose(artifact.score(user, udg, [], [2, 3, 4, 5]), probs)


def test_score_many_equals_one_score_per_user(artifact, vectors):
    user, udg = vectors
    rng = np.random.default_rng(1)
    requests = [(user, udg, [3, 4, 5], [2, 3, 4], None),
                (rng.normal(0, 0.5, artifact.user_dim), rng.normal(0, 0.5, artifact.udg_dim), [], [6, 7], None),
                (user * -1, udg, [9], [8], {"candidate_category": np.array([[2]])}),
                (user, udg, [3], [], None)]
    many = artifact.score_many(requests)
    assert [m.shape for m in many] == [(3,), (2,), (1,), (0,)]
    for got, request in zip(many, requests, strict=True):
        np.testing.assert_allclose(got, artifact.score(*request), rtol=1e-5, atol=1e-6)
    assert [m.shape for m in artifact.score_many([(user, udg, [3], [], None)] * 2)] == [(0,), (0,)]


def test_score_many_without_the_multi_user_graph_is_refused(artifact, monkeypatch, vectors):
    monkeypatch.setattr(artifact, "_multi", None)
    with pytest.raises(ArtifactError, match=f"version {VERSION} has no multi-user scorer graph"):
        artifact.score_many([(*vectors, [], [2], None)])


def test_cold_start_one_profile_or_a_batch(artifact):
    profile = artifact.encode_profile({})
    user_vec, udg_vec = artifact.cold_start(profile)
    assert user_vec.shape == (artifact.user_dim,) and udg_vec.shape == (artifact.udg_dim,)
    batch = np.stack([profile, np.full_like(profile, 2)])
    users, udgs = artifact.cold_start(batch)
    assert users.shape == (2, artifact.user_dim) and udgs.shape == (2, artifact.udg_dim)
    np.testing.assert_allclose(users[0], user_vec, rtol=1e-6)
    assert not np.allclose(users[0], users[1])  # the profile is an input
    # a negative index (no row) is the OOV row, as for any unknown value
    np.testing.assert_array_equal(artifact.cold_start(np.full_like(profile, -4))[0],
                                  artifact.cold_start(np.full_like(profile, 1))[0])


def test_load_users_returns_every_array_of_users_npz(artifact, model_repo):
    with np.load(model_repo / VERSION / "users.npz") as data:
        expected = set(data.files)
    users = artifact.load_users()
    assert set(users) == expected and len(users["user_ids"]) == len(users["user_vec"]) > 0


def test_warmup_runs_both_graphs(artifact, monkeypatch):
    calls = {"score": [], "many": []}
    score, many = artifact.score, artifact.score_many
    monkeypatch.setattr(artifact, "score", lambda *a: calls["score"].append(len(a[3])) or score(*a))
    monkeypatch.setattr(artifact, "score_many", lambda r: calls["many"].append([len(x[3]) for x in r]) or many(r))
    artifact.warmup(sizes=(1, 5))
    assert calls["score"] == [1, 1, 5, 5] and calls["many"] == [[1, 1], [5, 5]]


def test_opening_logs_the_provider_threads_and_why(model_repo, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="export.runtime"):
        open_artifact(model_repo / VERSION, providers=CPU, threads=2)
    # (the session's shared artifact may be opened in this window too: with 1 thread)
    assert (f"artifact {VERSION}: onnxruntime CPUExecutionProvider, 2 intra-op thread(s) (requested explicitly)"
            in [r.getMessage() for r in caplog.records if r.name == "export.runtime"])
