"""A model repository of several versions built from the session's tiny model (no extra training): v1 is its
export; v2 and v3 are exports of the same model with perturbed weights, so they differ in every graph and in
the embeddings they publish (a version answering with another's session or namespace shows); the broken ones
are copies of v1 that fail one check each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from repository import sha256_file

VALID = ("v1", "v2", "v3")
# version -> the words its refusal must contain
BROKEN = {"bad-checksum": "sha256 mismatch", "bad-graph": "onnxruntime cannot load",
          "bad-golden": "golden outputs differ", "no-marker": "no publish marker"}


def copy_version(source: Path, repo: Path, version: str) -> Path:
    target = repo / version
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["version"] = version
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def _edit_manifest(target: Path, edit) -> None:
    manifest = json.loads((target / "manifest.json").read_text())
    edit(manifest)
    (target / "manifest.json").write_text(json.dumps(manifest))


def export_perturbed(checkpoint_path: Path, repo: Path, version: str, seed: int) -> Path:
    """The checkpoint's model with every parameter scaled by (1 + 0.3 noise), exported as `version`."""
    import torch

    from export.onnx_export import export_model
    from model.checkpoint import Checkpoint

    checkpoint = Checkpoint.load(checkpoint_path)
    model = checkpoint.build_model().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1 + 0.3 * torch.randn(parameter.shape, generator=generator))
    return export_model(checkpoint, version, repo, model=model)


def build(model_repo: Path, repo: Path) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    source = model_repo / "v1"
    copy_version(source, repo, "v1")
    for seed, version in enumerate(VALID[1:], start=1):
        export_perturbed(model_repo.parent / "checkpoint.pt", repo, version, seed)
    target = copy_version(source, repo, "bad-checksum")
    data = bytearray((target / "scorer.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (target / "scorer.onnx").write_bytes(bytes(data))

    target = copy_version(source, repo, "bad-graph")
    (target / "scorer.onnx").write_bytes(b"this is not an onnx graph" * 100)

    def rehash(manifest):
        manifest["files"]["scorer.onnx"] = {"sha256": sha256_file(target / "scorer.onnx"),
                                            "bytes": (target / "scorer.onnx").stat().st_size}

    _edit_manifest(target, rehash)

    target = copy_version(source, repo, "bad-golden")

    def shift(manifest):
        for case in manifest["golden"]["scorer"]:
            case["outputs"]["probabilities"] = [p + 0.5 for p in case["outputs"]["probabilities"]]

    _edit_manifest(target, shift)
    copy_version(source, repo, "no-marker")
    return repo


def publish_all(repo: Path, client) -> None:
    from service.publish import publish

    for version in (*VALID, *(b for b in BROKEN if b != "no-marker")):
        publish(repo / version, client, progress=False)


class Expected:
    """What each version must answer, from that version's own artifact: a known user's published state and
    history, an unknown one's cold start (no profile, no history)."""

    def __init__(self, repo: Path):
        self.repo, self._artifacts, self._users = Path(repo), {}, {}

    def artifact(self, version: str):
        if version not in self._artifacts:
            from export.runtime import open_artifact

            artifact = open_artifact(self.repo / version, providers=["CPUExecutionProvider"], threads=1)
            users = artifact.load_users()
            self._artifacts[version] = artifact
            self._users[version] = (users, {str(u): i for i, u in enumerate(users["user_ids"])})
        return self._artifacts[version]

    def scores(self, version: str, user: str, candidates: list[str]):
        artifact = self.artifact(version)
        users, rows = self._users[version]
        items, _ = artifact.encode_items(candidates)
        row = rows.get(user)
        if row is None:
            user_vec, udg_vec = artifact.cold_start(artifact.encode_profile(None))
            return artifact.score(user_vec, udg_vec, [], items)
        history = users["history_idx"][row][:users["history_len"][row]]
        return artifact.score(users["user_vec"][row], users["udg_vec"][row], history, items)
