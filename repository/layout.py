"""What a version directory is called and holds: file names, the manifest format, valid version names.

    MODEL_REPO/
      <version>/            one immutable version, published by one rename (`repository.writer`)
        manifest.json       everything a reader needs besides the graphs, incl. sha256 + size of every file
        scorer.onnx         the scoring graph
        meta.onnx           the cold-start graph (profile -> user state)
        users.npz           per known user: what `udg publish` loads into Redis
        items.npz           the item table (item fields per item): what `udg publish` writes to the version's
                            item table in Redis
        warmup.pt           the PyTorch model and meta generator the graphs were exported from (a checkpoint
                            without the per-user and item tables): what `udg warmup` takes gradients with,
                            so an embedding written under this version is computed by this version's model
      .<version>.tmp-*      a version being written (hidden: never listed)
"""

from __future__ import annotations

import re

from repository.errors import InvalidVersionName

ARTIFACT_FORMAT = "udg-artifact/2"  # bump when a reader of the old format could misread the new one
MANIFEST_FILE = "manifest.json"
SCORER_FILE = "scorer.onnx"
INT8_SCORER_FILE = "scorer.int8.onnx"  # optional (`udg export --int8`): the int8 scorer
MULTI_SCORER_FILE = "scorer_multi.onnx"  # several users per call (the micro-batcher's); optional
META_FILE = "meta.onnx"
USERS_FILE = "users.npz"
ITEMS_FILE = "items.npz"
WARMUP_FILE = "warmup.pt"

# Also a safe path component and a safe Redis key part: no '/', no leading '.', no ':' or braces.
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VERSION_RULE = "a version is 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"


def is_version_name(name: str) -> bool:
    return isinstance(name, str) and VERSION_PATTERN.match(name) is not None


def check_version_name(name: str) -> str:
    """`name` if it is a valid version name, else InvalidVersionName (a ValueError) saying the rule."""
    if not is_version_name(name):
        raise InvalidVersionName(f"invalid version name {name!r}: {VERSION_RULE}")
    return name
