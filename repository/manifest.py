"""Reading a version's manifest: parse, check the format and the top-level structure, summarise.

Only the top level is typed (`Manifest`): the keys every reader relies on. The sections below it
(vocabularies, graphs' I/O, golden cases, dataset) belong to the exporter and the runtime that read them, so
they stay plain JSON here and the file itself is never rewritten: readers get the parsed dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from repository.errors import ArtifactError
from repository.files import sha256_file
from repository.layout import ARTIFACT_FORMAT, MANIFEST_FILE


class FileEntry(BaseModel):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Dims(BaseModel):
    model_config = ConfigDict(extra="allow")

    user_dim: int = Field(ge=1)
    udg_dim: int = Field(ge=0)  # 0: a model without UDG
    max_history: int = Field(ge=1)


class Manifest(BaseModel):
    """The manifest's top level. Unknown keys are kept (a newer exporter may add sections)."""

    model_config = ConfigDict(extra="allow")

    format: str
    version: str
    exported_at: str = ""
    files: dict[str, FileEntry]
    graphs: dict[str, Any]
    dims: Dims
    features: dict[str, Any]  # the feature schema (dataset.schema.FeatureSchema without its item table)
    vocab: dict[str, Any]
    golden: dict[str, Any]


def _problem(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    if first["type"] == "missing":
        return f"manifest lacks {where!r}"
    return f"manifest field {where!r}: {first['msg']}"


def read_manifest(version_dir: Path, validate: bool = True) -> dict:
    """MODEL_REPO/<version>/manifest.json as a dict; ArtifactError naming the file if it is missing or corrupt,
    and (validate=True) if its format is not ARTIFACT_FORMAT or its top level lacks a key or has a bad value.
    validate=False is for tools that read a few optional fields (listings, load generators)."""
    file = Path(version_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{file}: missing (not an artifact version directory?)") from None
    except OSError as error:
        raise ArtifactError(f"{file}: unreadable ({error})") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{file}: corrupt or truncated manifest ({error})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{file}: corrupt manifest (a JSON {type(manifest).__name__}, not an object)")
    if not validate:
        return manifest
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{file}: format {manifest.get('format')!r}, expected {ARTIFACT_FORMAT!r}")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as error:
        raise ArtifactError(f"{file}: {_problem(error)}") from None
    return manifest


def manifest_sha256(version_dir: Path) -> str:
    """sha256 of the manifest file: the identity of a version's content (it lists every file's sha256)."""
    return sha256_file(Path(version_dir) / MANIFEST_FILE)


def manifest_summary(version_dir: Path) -> dict | None:
    """The metadata a listing shows (no vocabularies, no golden data); None if there is no readable manifest."""
    try:
        manifest = read_manifest(version_dir, validate=False)
    except ArtifactError:
        return None
    model = manifest.get("model", {})
    return {"version": manifest.get("version"), "exported_at": manifest.get("exported_at"),
            "kind": model.get("kind"), "udg": model.get("udg"), "dims": manifest.get("dims"),
            "metrics": {k: v for k, v in (manifest.get("metrics") or {}).items() if k in ("valid", "test")},
            "dataset": (manifest.get("dataset") or {}).get("name"),
            "files": {name: info.get("bytes") for name, info in (manifest.get("files") or {}).items()}}
