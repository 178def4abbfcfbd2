"""Schemathesis (dev extra) against a real `udg serve` process: every operation of /openapi.json, all checks
(server errors, status codes, content types, response schemas, negative/positive data), bounded examples; score
bodies in JSON and msgpack (tests/service/schemathesis_msgpack.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.serve_process import serve_env, start_serve, stop

HOOKS = Path(__file__).with_name("schemathesis_msgpack.py")  # msgpack bodies both ways


@pytest.mark.slow
def test_schemathesis_all_checks_against_udg_serve(published, redis_server, model_repo, tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    env = serve_env(redis_server.url, model_repo, tmp_path, UDG_MAX_CANDIDATES=50, UDG_LOG_LEVEL="warning")
    server, base, _, _ = start_serve(env, tmp_path / "serve.log")
    try:
        # One worker thread: on CPython 3.11 before 3.11.8, two threads in hypothesis' ast.parse can fail with
        # "SystemError: AST constructor recursion depth mismatch" (cpython gh-106905), which failed a CI run.
        run = subprocess.run([st, "run", base + "/openapi.json", "--checks", "all", "--max-examples", "12",
                              "--seed", "1", "--workers", "1", "--generation-database", "none",
                              "--report-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)})
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    finally:
        stop(server, grace_s=10)
