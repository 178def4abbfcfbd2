"""The service runs on the serving install: every module of the `service` package imports with torch made
unimportable, and nothing in it reads pickles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import importlib, pkgutil, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is not available on the serving install ({name})")
        return None

sys.meta_path.insert(0, NoTorch())
import service
names = ["service"] + [m.name for m in pkgutil.walk_packages(service.__path__, "service.")]
for name in names:
    importlib.import_module(name)
from service.main import create_app
create_app()
assert "torch" not in sys.modules
print(len(names))
"""


def test_every_service_module_imports_without_torch():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.strip()) >= 10


def test_no_pickle_in_the_service():
    for path in (ROOT / "service").rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "torch.load" not in text, path
        assert "allow_pickle=True" not in text, path
