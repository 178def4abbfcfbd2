"""A real `udg serve` child process for tests: started on a free port over a test's Redis and model
repository, waited for until /readyz answers 200, stopped with SIGTERM (SIGKILL after 15 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from service.local_redis import free_port

ROOT = Path(__file__).resolve().parents[1]


def wait_until(check, timeout_s: float, what: str, poll_s: float = 0.2):
    """Poll `check()` until it returns something truthy (-> it); transport errors count as not yet."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            result = check()
            if result:
                return result
        except (httpx.TransportError, KeyError, ValueError):  # not up yet, or a non-JSON answer while starting
            pass
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(poll_s)


def start_service(redis_url: str, model_repo: Path, tmp_path: Path, workers: int = 2, **env_extra):
    """-> (process, base URL, port, log path). Fast follower and readiness periods; `env_extra` adds UDG_* values."""
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "UDG_MODEL_REPO": str(model_repo), "UDG_MODEL_VERSION": "v1",
           "UDG_PORT": str(port), "UDG_WORKERS": str(workers), "UDG_ROUTING_FILE": str(tmp_path / "routing.json"),
           "UDG_READINESS_PERIOD_S": "0.5", "UDG_ACTIVATION_RETRY_S": "0.2", "UDG_CONTROL_POLL_S": "0.5",
           "UDG_REDIS_TIMEOUT_S": "0.3", **env_extra}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    log_path = tmp_path / f"serve-{port}.log"
    with log_path.open("wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "udg_cli", "serve"], env=env, cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"

    def ready():
        assert server.poll() is None, log_path.read_text()
        return httpx.get(base + "/readyz", timeout=2).status_code == 200

    wait_until(ready, 90, "udg serve ready")
    return server, base, port, log_path


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
