"""The unchanged service serves every model kind: a tiny model of each kind is exported, published to a real
redis-server and scored over the HTTP API (known user, cold-start user, after a click), and the served scores
equal PyTorch's."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model.zoo import BASE_MODELS  # noqa: E402

# Every kind with UDG, and one kind without it (the service's no-UDG path: udg_dim == 0).
CASES = [(kind, True) for kind in BASE_MODELS] + [("din", False)]
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny_data():
    from tests.tiny import tiny_prepared

    return tiny_prepared(users=150, items=50, events_per_user=12, max_history=8, cold_user_frac=0.1)


def export_tiny(kind: str, udg: bool, data, repo):
    from export.onnx_export import export_model
    from model.checkpoint import Checkpoint, MetaState
    from model.experiment import model_config, udg_preset
    from model.meta import MetaConfig, train_meta
    from model.train import TrainConfig, train_model

    torch.set_num_threads(1)
    config = model_config(kind, udg_preset(kind) if udg else "base", embed_dim=8, hidden=(16, 8), udg_dim=8,
                          gate_hidden=8)
    train_config = TrainConfig(epochs=1)
    model, metrics = train_model(data, config, train_config, progress=False)
    meta = None
    if udg:
        generator, info = train_meta(model, data, MetaConfig(steps=10, users_per_step=16), progress=False)
        meta = MetaState(generator.state_dict(), info)
    checkpoint = Checkpoint.from_training(model, config, train_config, data, metrics, meta=meta)
    export_model(checkpoint, "v1", repo, model=model.eval())
    return model


def torch_scores(model, user_vec, udg_vec, history, candidates) -> np.ndarray:
    with torch.no_grad():
        u = torch.as_tensor(np.asarray(user_vec, np.float32)[None])
        g = None if udg_vec is None else torch.as_tensor(np.asarray(udg_vec, np.float32)[None])
        h = torch.as_tensor(np.asarray(history, np.int64)[None] if len(history) else np.zeros((1, 1), np.int64))
        return torch.sigmoid(model.score(u, g, h, torch.as_tensor(candidates))).numpy()


@pytest.mark.parametrize(("kind", "udg"), CASES, ids=[f"{k}{'+udg' if u else ''}" for k, u in CASES])
def test_service_scores_every_kind_like_pytorch(kind, udg, tiny_data, tmp_path, redis_client, make_client):
    from export.runtime import open_artifact
    from service.publish import publish

    repo = tmp_path / "repo"
    model = export_tiny(kind, udg, tiny_data, repo)
    artifact = open_artifact(repo / "v1", providers=["CPUExecutionProvider"])
    assert artifact.manifest["model"]["kind"] == kind and (artifact.udg_dim > 0) == udg
    assert publish(repo / "v1", redis_client, progress=False).users > 0
    client = make_client(repo=repo)
    users = artifact.load_users()
    row = int(np.argmax(users["history_len"]))
    user_id = str(users["user_ids"][row])
    candidates = artifact.schema.items.tokens[2:14]  # the item vocabulary after <pad>, <oov>
    idx, _ = artifact.encode_items(candidates)
    history = users["history_idx"][row][: users["history_len"][row]]
    udg_vec = users["udg_vec"][row] if udg else None

    body = client.post("/v1/score", json={"user_id": user_id, "candidates": candidates}).json()
    assert body["model_version"] == "v1" and body["cold_start"] is False, body
    np.testing.assert_allclose(body["scores"], torch_scores(model, users["user_vec"][row], udg_vec, history, idx),
                               atol=ATOL)

    # A click lands in the user's history in Redis and the next score sees it.
    clicked = candidates[0]
    assert client.post("/v1/events", json={"user_id": user_id, "item_id": clicked, "clicked": True}).status_code == 200
    after = client.post("/v1/score", json={"user_id": user_id, "candidates": candidates}).json()
    new_history = np.concatenate([idx[:1], history])[: artifact.max_history]
    np.testing.assert_allclose(after["scores"],
                               torch_scores(model, users["user_vec"][row], udg_vec, new_history, idx), atol=ATOL)

    # An unseen user with a profile: base embedding from the profile, UDG embedding from the meta generator.
    profile = {"cohort": "a1", "sex": "F", "segment": "o3"}  # the synthetic world's profile fields
    assert (artifact.encode_profile(profile) > artifact.oov_index).all()
    cold = client.post("/v1/score", json={"user_id": "someone-new", "candidates": candidates,
                                          "profile": profile}).json()
    assert cold["cold_start"] is True
    user_vec, cold_udg = artifact.cold_start(artifact.encode_profile(profile))
    np.testing.assert_allclose(cold["scores"], torch_scores(model, user_vec, cold_udg, np.zeros(0, np.int64), idx),
                               atol=ATOL)
