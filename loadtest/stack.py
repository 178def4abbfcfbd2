"""Start the pieces a load test or a benchmark needs, on 127.0.0.1 only: a model version, Redis, `udg serve`.

Shared by `udg loadtest` (loadtest/commands.py) and `udg bench compare` (loadtest/bench_compare.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# A small synthetic model: trains in seconds and exercises the same service code as the shipped preset.
SMALL_MODEL_ARGS = ("--embed-dim", "8", "--udg-dim", "8", "--hidden", "64,32")


class StackError(RuntimeError):
    pass


def check_local(url: str) -> str:
    """`url` with its host checked to be a loopback address (load is only ever sent to this machine)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOCAL_HOSTS:
        raise StackError(f"{url}: load tests only target http://127.0.0.1:PORT (or localhost) on this machine")
    return url.rstrip("/")


def http(method: str, url: str, body: bytes | None = None, timeout: float = 5.0,
         headers: dict | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def wait_ready(base: str, process: subprocess.Popen | None = None, timeout_s: float = 120.0,
               path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise StackError(f"the server exited with code {process.returncode} before it was ready")
        try:
            status, body = http("GET", base + path, timeout=2.0)
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]!r}"
        except OSError as error:
            last = str(error)
        time.sleep(0.2)
    raise StackError(f"{base}{path} not ready within {timeout_s:.0f} s ({last})")


def stop(process: subprocess.Popen | None, grace_s: float = 15.0) -> None:
    """SIGINT (uvicorn's graceful stop), then SIGKILL after `grace_s`."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def run_udg(argv: list[str], log_file=None) -> None:
    """`udg ARGV` in a child interpreter (training keeps torch out of this process)."""
    command = [sys.executable, "-m", "udg_cli", *argv]
    print("  $ udg " + " ".join(argv), flush=True)
    result = subprocess.run(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT if log_file else None)
    if result.returncode != 0:
        raise StackError(f"`udg {' '.join(argv)}` failed with exit code {result.returncode}")


def model_train_args(spec: str = "synthetic", synthetic_users: int = 2000, epochs: int = 1, small: bool = True,
                     meta_steps: int = 50) -> list[str]:
    """`udg train` arguments of the model a load test trains when given none: PNN+UDG with its meta generator."""
    argv = ["--udg", "--cold-users", "0.1", "--spec", spec, "--epochs", str(epochs), "--meta-steps", str(meta_steps),
            "--quiet"]
    from dataset.spec import load_spec

    generator = load_spec(spec).generator
    if generator is not None and generator.kind != "movielens-100k":
        argv += ["--synthetic-users", str(synthetic_users)]
    return argv + (list(SMALL_MODEL_ARGS) if small else [])


def add_model_arguments(parser) -> None:
    """--repo / --version / --workdir: what `ensure_model` serves (a given model, else the small synthetic one)."""
    parser.add_argument("--repo", type=Path, default=None,
                        help="model repository holding --version (default: a small synthetic model in --workdir)")
    parser.add_argument("--version", default="v1")
    parser.add_argument("--workdir", type=Path, default=Path("runs/loadtest"),
                        help="where the synthetic model is trained once (as `udg loadtest` does)")


def ensure_model(repo: Path | None, version: str, workdir: Path, spec: str = "synthetic",
                 synthetic_users: int = 2000, epochs: int = 1, small: bool = True, meta_steps: int = 50,
                 log_file=None) -> Path:
    """MODEL_REPO/VERSION to serve: `repo`/`version` if given, else `workdir`/model_repo/`version`, made there
    first if absent (`pipeline.make_version`; reused by later runs; delete `workdir` to retrain)."""
    from pipeline import VersionError, VersionPlan, make_version
    from repository import ModelRepository

    if repo is not None:
        repository = ModelRepository(repo)
        if not repository.has(version):
            raise StackError(f"{repository.root / version}: no exported version there (run `udg export` or "
                             "`udg quickstart`)")
        return repository.path(version)
    workdir = Path(workdir)
    plan = VersionPlan(repo=workdir / "model_repo", version=version, workdir=workdir,
                       train_args=model_train_args(spec, synthetic_users, epochs, small, meta_steps))
    try:
        return make_version(plan, log_file, echo=lambda line: print(f"model: {line}", flush=True)).version_dir
    except VersionError as error:
        raise StackError(str(error)) from None


def publish_version(version_dir: Path, redis_url: str) -> None:
    from pipeline import publish

    result = publish(Path(version_dir), redis_url)
    print(f"published {result.version}: {result.users:,d} users in {result.seconds:.2f} s", flush=True)


def start_redis():
    """A private redis-server on a free 127.0.0.1 port (persistence off); call .cleanup() when done."""
    from service.local_redis import RedisServer, free_port, redis_server_binary

    return RedisServer(redis_server_binary(), free_port()).start()


def start_service(version_dir: Path, redis_url: str, workers: int = 2, ort_threads: int = 1,
                  log_path: Path | None = None, extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`udg serve` on a free 127.0.0.1 port serving `version_dir`; returns (process, base URL) once ready."""
    from service.local_redis import free_port

    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "UDG_MODEL_REPO": str(Path(version_dir).parent.resolve()),
           "UDG_MODEL_VERSION": Path(version_dir).name, "UDG_HOST": "127.0.0.1", "UDG_PORT": str(port),
           "UDG_WORKERS": str(workers), "UDG_ORT_THREADS": str(ort_threads), "UDG_LOG_LEVEL": "warning",
           **(extra_env or {})}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
    process = subprocess.Popen([sys.executable, "-m", "udg_cli", "serve"], env=env, cwd=ROOT, stdout=out,
                               stderr=subprocess.STDOUT)
    if log_path:
        out.close()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process)
    except BaseException:
        stop(process)
        raise
    return process, base
