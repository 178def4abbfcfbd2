"""The command line: `udg publish` prints time and memory; `udg quickstart` (reusing a trained checkpoint)
exports, publishes, serves, prints an example curl with its answer, and stops the service."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def udg(*args: str, env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "udg_cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_udg_publish_command(redis_client, redis_server, model_repo):
    env = {**os.environ, "REDIS_URL": redis_server.url}
    result = udg("publish", str(model_repo / "v1"), "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    assert "published version v1" in result.stdout and "used_memory" in result.stdout
    assert redis_client.exists("udg:{ctl}:published:v1")


def run_quickstart(redis_server, model_repo, workdir: Path) -> str:
    """`udg quickstart --exit-after-demo` reusing the session's checkpoint -> its standard output."""
    workdir.mkdir()
    (workdir / "checkpoint.pt").symlink_to(model_repo.parent / "checkpoint.pt")
    env = {**os.environ, "REDIS_URL": redis_server.url}
    result = udg("quickstart", "--workdir", str(workdir), "--port", "0", "--exit-after-demo", env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_udg_quickstart_reusing_a_checkpoint(redis_client, redis_server, model_repo, tmp_path):
    workdir = tmp_path / "quickstart"
    out = run_quickstart(redis_server, model_repo, workdir)
    assert "training: reusing" in out and "export: " in out and "published v1" in out and "[2/3] serve" in out
    assert out.count("curl -s -X POST") == 2 and out.count("# -> HTTP 200") == 2
    assert '"cold_start":true' in out and '"unknown_candidates":["never-seen-item"]' in out
    assert (workdir / "model_repo" / "v1" / "manifest.json").is_file()
