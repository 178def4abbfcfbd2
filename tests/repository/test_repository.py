"""repository/: the version layout, manifest reading and validation, file verification, listing order, version
names, and the atomic writer. No torch, no onnxruntime: versions here are hand-written directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from repository import (
    ARTIFACT_FORMAT,
    MANIFEST_FILE,
    SCORER_FILE,
    USERS_FILE,
    ArtifactError,
    AtomicVersionWriter,
    InvalidVersionName,
    ModelRepository,
    check_version_name,
    describe_files,
    list_versions,
    manifest_sha256,
    read_manifest,
    verify_files,
)

ROOT = Path(__file__).resolve().parents[2]


def write_version(root: Path, version: str, exported_at: str = "2024-01-01T00:00:00+00:00", **extra) -> Path:
    """A version directory with two small files and a manifest that lists them (through the writer)."""
    with AtomicVersionWriter(root, version) as tmp:
        (tmp / SCORER_FILE).write_bytes(b"graph bytes " * 100)
        (tmp / USERS_FILE).write_bytes(b"user table " * 50)
        manifest = {"format": ARTIFACT_FORMAT, "version": version, "exported_at": exported_at,
                    "files": describe_files(tmp, (SCORER_FILE, USERS_FILE)),
                    "graphs": {"scorer": {"file": SCORER_FILE}},
                    "dims": {"user_dim": 8, "udg_dim": 4, "max_history": 5},
                    "features": {}, "vocab": {}, "golden": {}, "model": {"kind": "pnn", "udg": True}, **extra}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest))
    return root / version


def test_atomic_write_leaves_nothing_half_written_on_error(tmp_path):
    repo = tmp_path / "repo"
    with pytest.raises(RuntimeError), AtomicVersionWriter(repo, "v1") as tmp:
        (tmp / SCORER_FILE).write_bytes(b"half")
        assert tmp.parent == repo and tmp.name.startswith(".")  # hidden while being written
        assert list_versions(repo) == []
        raise RuntimeError("crash mid-write")
    assert list(repo.iterdir()) == []  # neither the version nor a temp dir is left behind
    with AtomicVersionWriter(repo, "v1") as tmp:
        (tmp / "a").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b").write_text("nested")
    assert (repo / "v1" / "a").read_text() == "1" and (repo / "v1" / "sub" / "b").read_text() == "nested"
    assert oct((repo / "v1").stat().st_mode & 0o777) == oct(0o755)
    with pytest.raises(FileExistsError), AtomicVersionWriter(repo, "v1"):
        pass
    with pytest.raises(RuntimeError), AtomicVersionWriter(repo, "v1", overwrite=True) as tmp:
        (tmp / "a").write_text("replacement that fails")
        raise RuntimeError("crash mid-overwrite")
    assert (repo / "v1" / "a").read_text() == "1"  # a failed overwrite keeps the old version whole
    with ModelRepository(repo).writer("v1", overwrite=True) as tmp:
        (tmp / "a").write_text("2")
    assert (repo / "v1" / "a").read_text() == "2" and sorted(p.name for p in repo.iterdir()) == ["v1"]


@pytest.mark.parametrize("name", ["", ".hidden", "../escape", "a/b", "v1 ", "ü", "v:1", "{v1}", "x" * 65, None])
def test_bad_version_names_are_refused(tmp_path, name):
    with pytest.raises(InvalidVersionName):
        check_version_name(name)
    with pytest.raises(ValueError):  # InvalidVersionName is a ValueError: callers written for that still work
        AtomicVersionWriter(tmp_path, name)
    with pytest.raises(ValueError):
        ModelRepository(tmp_path).path(name)
    assert not ModelRepository(tmp_path).has(name)
    assert list(tmp_path.iterdir()) == []


def test_good_version_names(tmp_path):
    for name in ("v1", "2024-06-01a", "A.b_c-9", "x" * 64):
        assert check_version_name(name) == name
        assert ModelRepository(tmp_path).path(name) == tmp_path / name


def test_listing_is_oldest_first_and_skips_what_is_not_a_version(tmp_path):
    repo = ModelRepository(tmp_path / "repo")
    assert repo.versions() == [] and repo.newest() is None  # no directory yet
    write_version(repo.root, "b", exported_at="2024-03-01T00:00:00+00:00")
    write_version(repo.root, "c", exported_at="2024-01-01T00:00:00+00:00")
    write_version(repo.root, "a", exported_at="2024-03-01T00:00:00+00:00")  # same time as b: by name
    (repo.root / "empty").mkdir()  # no manifest
    (repo.root / ".v9.tmp-123").mkdir()  # a write in progress
    (repo.root / ".v9.tmp-123" / MANIFEST_FILE).write_text("{}")
    (repo.root / "broken").mkdir()
    (repo.root / "broken" / MANIFEST_FILE).write_text("{not json")  # listed (first), refused when read
    (repo.root / "notes.txt").write_text("not a directory")
    assert repo.versions() == ["broken", "c", "a", "b"] and repo.newest() == "b"
    assert repo.has("a") and not repo.has("empty") and not repo.has(".v9.tmp-123")
    summary = repo.summary("a")
    assert summary["version"] == "a" and summary["kind"] == "pnn" and summary["dims"]["user_dim"] == 8
    assert summary["files"] == {SCORER_FILE: 1200, USERS_FILE: 550}
    assert repo.summary("broken") is None and repo.summary("empty") is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "grow", "missing"])
def test_a_damaged_file_is_named_by_verify(tmp_path, damage):
    path = write_version(tmp_path, "v1")
    manifest = read_manifest(path)
    verify_files(path, manifest)  # intact
    file = path / SCORER_FILE
    blob = file.read_bytes()
    if damage == "flip":
        file.write_bytes(blob[:10] + bytes([blob[10] ^ 1]) + blob[11:])
    elif damage == "truncate":
        file.write_bytes(blob[:-1])
    elif damage == "grow":
        file.write_bytes(blob + b"x")
    else:
        file.unlink()
    expected = {"flip": "sha256 mismatch", "truncate": "truncated", "grow": "wrong size", "missing": "missing"}
    with pytest.raises(ArtifactError, match=rf"{SCORER_FILE}: {expected[damage]}"):
        ModelRepository(tmp_path).verify("v1")
    verify_files(path, manifest, skip=(SCORER_FILE,))  # a skipped file is not read


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: m.pop("files"), "manifest lacks 'files'"),
    (lambda m: m.pop("version"), "manifest lacks 'version'"),
    (lambda m: m.pop("features"), "manifest lacks 'features'"),  # udg-artifact/2: the feature schema
    (lambda m: m["dims"].pop("max_history"), "manifest lacks 'dims.max_history'"),
    (lambda m: m["files"][SCORER_FILE].pop("sha256"), f"manifest lacks 'files.{SCORER_FILE}.sha256'"),
    (lambda m: m["dims"].update(user_dim="eight"), "manifest field 'dims.user_dim'"),
    (lambda m: m.update(format="udg-artifact/0"), "format 'udg-artifact/0', expected 'udg-artifact/2'"),
    (lambda m: m.pop("format"), "format None"),
])
def test_a_manifest_missing_keys_is_refused_clearly(tmp_path, edit, message):
    path = write_version(tmp_path, "v1")
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    edit(manifest)
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message) as error:
        read_manifest(path)
    assert str(path / MANIFEST_FILE) in str(error.value)  # the message names the file
    assert read_manifest(path, validate=False) == manifest  # tools reading a few fields still can


@pytest.mark.parametrize(("content", "message"), [(None, "missing"), ('{"format": "udg-art', "corrupt or truncated"),
                                                  ("[1, 2]", "not an object"), (b"\xff\xfe", "corrupt")])
def test_an_unreadable_manifest_is_refused(tmp_path, content, message):
    path = tmp_path / "v1"
    path.mkdir()
    if isinstance(content, bytes):
        (path / MANIFEST_FILE).write_bytes(content)
    elif content is not None:
        (path / MANIFEST_FILE).write_text(content)
    with pytest.raises(ArtifactError, match=message):
        read_manifest(path, validate=False)


def test_manifest_is_returned_as_written_and_hashed(tmp_path):
    path = write_version(tmp_path, "v1", extra_section={"kept": [1, 2]})
    repo = ModelRepository(tmp_path)
    manifest = repo.manifest("v1")
    assert manifest == json.loads((path / MANIFEST_FILE).read_text())  # unknown sections kept, nothing added
    assert repo.manifest_sha256("v1") == manifest_sha256(path) and len(manifest_sha256(path)) == 64


def test_repository_imports_no_torch_and_no_service():
    code = ("import sys; sys.modules['torch'] = None; import repository; "
            "bad = [m for m in ('torch', 'onnxruntime', 'redis', 'fastapi', 'numpy', 'service', 'export', 'model') "
            "if sys.modules.get(m) is not None]; assert not bad, bad")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)


def test_the_trainer_script_leaves_the_repository_layout_to_the_repository():
    script = (ROOT / "docker" / "trainer.sh").read_text()
    assert MANIFEST_FILE not in script and "udg make-version" in script  # it asks `udg`, which reads through it
