"""The two ways a model repository refuses something."""

from __future__ import annotations


class ArtifactError(RuntimeError):
    """A version is missing, corrupt, truncated or fails its golden check; the message names the file."""


class InvalidVersionName(ValueError):
    """A version name the repository does not accept (it would not be listed, served or safe as a path)."""
