"""Schemathesis (dev extra) against a real `udg serve` process: every operation of /openapi.json, all checks
(server errors, status codes, content types, response schemas, negative/positive data), bounded examples; score
bodies in JSON and msgpack (tests/service/schemathesis_msgpack.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.serve_process import serve_env, start_serve, stop

HOOKS = Path(__file__).with_name("schemathesis_msgpack.py")  # msgpack bodies both ways
# The admin run: the version operations get the served version (random names would only ever meet a 404), and
# a split's weights must name loaded versions and sum to 100, a rule JSON Schema cannot state, so a body the
# schema accepts may be refused with a 422 that names the field.
ADMIN_CONFIG = """
[[operations]]
include-path-regex = "^/v1/admin/versions/"
parameters = { version = "v1" }

[[operations]]
include-path = "/v1/admin/split"
checks.positive_data_acceptance.expected-statuses = ["2xx", 404, 409, 422]
"""


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


@pytest.mark.slow
def test_schemathesis_admin_operations_with_the_token(published, redis_server, model_repo, artifact, users,
                                                     tmp_path):
    """The admin operations with their bearer token: every answer documented, no 500, bad input a 4xx; and the
    service still serves its version afterwards (the fuzzer loaded, activated and tried to unload it)."""
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    token = "schemathesis-admin-token"
    (tmp_path / "schemathesis.toml").write_text(ADMIN_CONFIG)  # st reads it from its working directory
    env = serve_env(redis_server.url, model_repo, tmp_path, UDG_LOG_LEVEL="warning", UDG_ADMIN_TOKEN=token)
    server, base, _, _ = start_serve(env, tmp_path / "serve.log")
    try:
        run = subprocess.run([st, "run", base + "/openapi.json", "--include-tag", "admin", "--checks", "all",
                              "--max-examples", "12", "--seed", "1", "--workers", "1",
                              "--generation-database", "none", "--report-dir", str(tmp_path),
                              "-H", f"Authorization: Bearer {token}"],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
        assert "Missing test data" not in run.stdout  # the version operations reached past their 404
        with httpx.Client(base_url=base, timeout=5) as http:
            assert http.get("/readyz").status_code == 200
            reply = http.post("/v1/score", json={"user_id": str(users["user_ids"][0]),
                                                 "candidates": artifact.schema.items.tokens[2:12]})
            assert reply.status_code == 200 and reply.json()["model_version"] == "v1", reply.text
        assert "Traceback" not in (tmp_path / "serve.log").read_text(errors="replace")
    finally:
        stop(server, grace_s=10)
