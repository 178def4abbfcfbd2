"""`ModelRepository`: one model repository directory, its versions and their manifests."""

from __future__ import annotations

from pathlib import Path

from repository.errors import ArtifactError
from repository.files import verify_files
from repository.layout import MANIFEST_FILE, check_version_name, is_version_name
from repository.manifest import manifest_sha256, manifest_summary, read_manifest
from repository.writer import AtomicVersionWriter


def list_versions(root: Path) -> list[str]:
    """Version directories of a model repository, oldest first (by the manifest's export time, then name).

    A version is a directory with a valid version name holding a manifest; temp dirs of a write in progress
    start with '.' and never qualify. An unreadable manifest sorts as exported at "" (first).
    """
    root = Path(root)
    found = []
    for child in root.iterdir() if root.is_dir() else []:
        if is_version_name(child.name) and (child / MANIFEST_FILE).is_file():
            try:
                exported = str(read_manifest(child, validate=False).get("exported_at") or "")
            except ArtifactError:  # a listing must not fail on one broken version; loading it says why
                exported = ""
            found.append((exported, child.name))
    return [name for _, name in sorted(found)]


class ModelRepository:
    """MODEL_REPO as a set of immutable versions: list, locate, read and verify them, write a new one."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelRepository({str(self.root)!r})"

    def versions(self) -> list[str]:
        return list_versions(self.root)

    def newest(self) -> str | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def path(self, version: str) -> Path:
        """MODEL_REPO/<version>; InvalidVersionName (a ValueError) for a name that is not a version's."""
        return self.root / check_version_name(version)

    def has(self, version: str) -> bool:
        return is_version_name(version) and (self.root / version / MANIFEST_FILE).is_file()

    def manifest(self, version: str, validate: bool = True) -> dict:
        return read_manifest(self.path(version), validate)

    def manifest_sha256(self, version: str) -> str:
        return manifest_sha256(self.path(version))

    def summary(self, version: str) -> dict | None:
        return manifest_summary(self.path(version))

    def verify(self, version: str, skip: tuple[str, ...] = ()) -> dict:
        """The validated manifest, after checking size and sha256 of every file it lists (ArtifactError)."""
        path = self.path(version)
        manifest = read_manifest(path)
        verify_files(path, manifest, skip)
        return manifest

    def writer(self, version: str, overwrite: bool = False) -> AtomicVersionWriter:
        return AtomicVersionWriter(self.root, version, overwrite)
