"""A model repository of several versions built from the session's tiny exported model (no extra training):
v1, v2, v3 are valid copies (each manifest names its own version); the broken ones fail one check each."""

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


def build(model_repo: Path, repo: Path) -> Path:
    repo.mkdir(parents=True, exist_ok=True)
    source = model_repo / "v1"
    for version in VALID:
        copy_version(source, repo, version)
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
