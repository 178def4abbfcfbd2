"""Writing a version: files go into a hidden temp dir beside MODEL_REPO/<version>, published by one rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from repository.layout import check_version_name


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicVersionWriter:
    """`with AtomicVersionWriter(repo, version) as tmp:` write files into `tmp`; on a clean exit they become
    MODEL_REPO/<version> with one rename, after an fsync of every file and directory.

    A reader never sees a half-written version: either the directory is absent or it is complete (the temp dir
    starts with '.', which no listing shows). On any error the temp dir is removed. An existing version is
    refused unless `overwrite=True` (versions are immutable otherwise). An invalid version name raises
    InvalidVersionName (a ValueError) before anything is written.
    """

    def __init__(self, repo: Path, version: str, overwrite: bool = False):
        self.repo, self.version, self.overwrite = Path(repo), check_version_name(version), overwrite
        self.target = self.repo / version
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.repo.mkdir(parents=True, exist_ok=True)
        if self.target.exists() and not self.overwrite:
            raise FileExistsError(f"{self.target} already exists (versions are immutable; pass --force)")
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.version}.tmp-", dir=self.repo))
        return self.tmp

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._flush(self.tmp)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it 0o700: readable by the service's user too
        old = None
        if self.target.exists():
            old = self.repo / f".{self.version}.old-{os.getpid()}"
            os.replace(self.target, old)
        os.replace(self.tmp, self.target)
        _fsync_dir(self.repo)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _flush(directory: Path) -> None:
        """Data on disk before the rename makes it visible (else a crash could publish empty files)."""
        for path in sorted(directory.rglob("*"), reverse=True):  # files before the directories holding them
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
            elif path.is_dir():
                _fsync_dir(path)
        _fsync_dir(directory)
