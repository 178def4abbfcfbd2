"""Files written into the shared data cache: each written beside its target under a name private to this
process and thread, then renamed into place, so a reader never sees half a file and two writers generating
the same seeded data at once (the ranks of a distributed run) never rename each other's temporary away."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def write_atomically(target: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` fills a temporary beside `target`, which then replaces `target`; -> target."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        write(tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
