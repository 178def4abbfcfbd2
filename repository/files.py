"""sha256 and size of a version's files: what the manifest records at export and every reader checks."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from repository.errors import ArtifactError


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in blocks (files can be hundreds of MB)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def describe_files(directory: Path, names: Iterable[str]) -> dict[str, dict]:
    """The manifest's `files` section: {name: {"sha256", "bytes"}} of files in `directory`."""
    directory = Path(directory)
    return {name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
            for name in names}


def verify_files(path: Path, manifest: dict, skip: tuple[str, ...] = ()) -> None:
    """Size and sha256 of every file the manifest lists; raises ArtifactError naming the first bad one."""
    for name, info in manifest["files"].items():
        if name in skip:
            continue
        file = Path(path) / name
        if not file.is_file():
            raise ArtifactError(f"{file}: missing")
        size = file.stat().st_size
        if size != info["bytes"]:  # cheap, and says "truncated" where a hash could only say "differs"
            what = "truncated" if size < info["bytes"] else "wrong size"
            raise ArtifactError(f"{file}: {what} ({size} bytes, manifest says {info['bytes']})")
        if sha256_file(file) != info["sha256"]:
            raise ArtifactError(f"{file}: sha256 mismatch (corrupted?)")
