"""Schemathesis (dev extra) against a real `udg serve` process: every operation of /openapi.json, all checks
(server errors, status codes, content types, response schemas, negative/positive data), bounded examples."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.stack import stop, wait_ready
from service.local_redis import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_schemathesis_all_checks_against_udg_serve(published, redis_server, model_repo, tmp_path):
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_server.url, "UDG_MODEL_REPO": str(model_repo), "UDG_MODEL_VERSION": "v1",
           "UDG_PORT": str(port), "UDG_WORKERS": "1", "UDG_MAX_CANDIDATES": "50", "UDG_LOG_LEVEL": "warning"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    server = subprocess.Popen([sys.executable, "-m", "udg_cli", "serve"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, server, timeout_s=60)
        run = subprocess.run([st, "run", base + "/openapi.json", "--checks", "all", "--max-examples", "12",
                              "--seed", "1", "--workers", "2", "--generation-database", "none",
                              "--report-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    finally:
        stop(server, grace_s=10)
