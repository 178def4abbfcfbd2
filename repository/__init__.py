"""The model repository: versioned, immutable model directories and their manifests.

Torch-free (the standard library, plus pydantic, a core dependency, for the manifest's top level), so that the
exporter, the service, publish, the load generators and the benchmarks all read and write versions through
this one package.

    from repository import ModelRepository

    repo = ModelRepository("runs/quickstart/model_repo")
    repo.versions()                 # ["v1", "v2"]: oldest first (manifest export time, then name)
    repo.newest()                   # "v2", or None for an empty repository
    repo.path("v2")                 # MODEL_REPO/v2 (InvalidVersionName for a bad name)
    repo.has("v2")                  # a version directory with a manifest?
    repo.manifest("v2")             # the parsed manifest (format and top level checked; ArtifactError)
    repo.manifest_sha256("v2")      # what the publish marker in Redis must match
    repo.summary("v2")              # the metadata a listing shows
    repo.verify("v2")               # manifest, after size + sha256 of every file (ArtifactError names it)
    with repo.writer("v3") as tmp:  # write files into tmp; they appear as MODEL_REPO/v3 in one rename
        ...

The same operations exist as functions of a version directory (`read_manifest`, `verify_files`,
`manifest_sha256`, `manifest_summary`) for callers handed a path, and `layout` names the files.
"""

from repository.errors import ArtifactError, InvalidVersionName
from repository.files import describe_files, sha256_file, verify_files
from repository.layout import (
    ARTIFACT_FORMAT,
    INT8_SCORER_FILE,
    ITEMS_FILE,
    MANIFEST_FILE,
    META_FILE,
    MULTI_SCORER_FILE,
    SCORER_FILE,
    USERS_FILE,
    VERSION_PATTERN,
    VERSION_RULE,
    WARMUP_FILE,
    check_version_name,
    is_version_name,
)
from repository.manifest import Manifest, manifest_sha256, manifest_summary, read_manifest
from repository.repo import ModelRepository, list_versions
from repository.writer import AtomicVersionWriter

__all__ = [
    "ARTIFACT_FORMAT", "ITEMS_FILE", "MANIFEST_FILE", "META_FILE", "SCORER_FILE", "USERS_FILE", "VERSION_PATTERN",
    "VERSION_RULE", "WARMUP_FILE", "MULTI_SCORER_FILE", "INT8_SCORER_FILE",
    "ArtifactError", "AtomicVersionWriter", "InvalidVersionName", "Manifest", "ModelRepository",
    "check_version_name", "describe_files", "is_version_name", "list_versions", "manifest_sha256",
    "manifest_summary", "read_manifest", "sha256_file", "verify_files",
]
