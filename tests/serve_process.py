"""`udg serve` as a child process: the one way tests start it.

`start_serve` picks a free port, starts the server there with its output in a log file, and returns once THIS
process listens on the port and answers the readiness path with 200 (polled, never slept for). A free port is
only free until someone binds it: if another process takes it first the server exits with "address already
in use" and is started again on another port (`start_listening`, which other listening children use too);
a stranger answering on the port is never taken for ours (the listening socket must be one of the child's
file descriptors)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import httpx

from service.local_redis import free_port

ROOT = Path(__file__).resolve().parents[1]
# Fast routing follower and readiness gauge: for tests that watch a change reach the workers or the metrics.
FAST_FOLLOW = {"UDG_READINESS_PERIOD_S": "0.5", "UDG_ACTIVATION_RETRY_S": "0.2", "UDG_CONTROL_POLL_S": "0.5",
               "UDG_REDIS_TIMEOUT_S": "0.3"}


def wait_until(check, timeout_s: float, what: str, poll_s: float = 0.1):
    """Poll `check()` until it returns something truthy (-> it); transport errors count as not yet. Fails with
    `what` after `timeout_s`."""
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


class Served(NamedTuple):
    process: subprocess.Popen
    base: str
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def serve_env(redis_url: str, model_repo: Path, tmp_path: Path, version: str | None = "v1", workers: int = 1,
              **extra) -> dict[str, str]:
    """The variables a test server needs (over os.environ): its Redis, repository, version and worker count, and
    a routing file of the test's own (the default lives in the repository, which tests share)."""
    env = {"REDIS_URL": redis_url, "UDG_MODEL_REPO": str(model_repo), "UDG_WORKERS": str(workers),
           "UDG_ROUTING_FILE": str(Path(tmp_path) / "routing.json"), **{k: str(v) for k, v in extra.items()}}
    if version is not None:
        env["UDG_MODEL_VERSION"] = version
    return env


def start_listening(launch, log_path: Path, timeout_s: float = 90.0, attempts: int = 3) -> tuple[subprocess.Popen, int]:
    """`launch(port, log)` -> a child process that listens on 127.0.0.1:`port`, its output to `log`; -> (process,
    port) once it does. A free port is only free until someone binds it: a child that exits saying "address
    already in use" is launched again on another port."""
    log_path = Path(log_path)
    for _ in range(attempts):
        port = free_port()
        with log_path.open("wb") as log:
            process = launch(port, log)
        deadline = time.monotonic() + timeout_s
        while process.poll() is None:
            if _listens(process.pid, port):
                return process, port
            if time.monotonic() > deadline:
                stop(process)
                raise AssertionError(f"{process.args[:3]} not listening on {port} within {timeout_s:.0f} s:\n"
                                     f"{log_path.read_text(errors='replace')[-4000:]}")
            time.sleep(0.05)
        output = log_path.read_text(errors="replace")
        if "address already in use" not in output.lower():
            raise AssertionError(f"{process.args[:3]} exited with {process.returncode}:\n{output[-4000:]}")
    raise AssertionError(f"no free port in {attempts} attempts")


def start_serve(env: dict[str, str], log_path: Path, ready_path: str = "/readyz", until=None,
                timeout_s: float = 90.0) -> Served:
    """`udg serve` with `env` over os.environ on a free 127.0.0.1 port, its output in `log_path`; returned once
    it listens and `ready_path` answers 200, and then `until(http)` is truthy if given (an httpx.Client on
    its base URL). Fails with the server's log if it exits or is not ready within `timeout_s`."""
    base_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}  # the server makes its own

    def launch(port: int, log) -> subprocess.Popen:
        # its own process group: `stop` ends the workers with it, even when the supervisor had to be killed
        return subprocess.Popen([sys.executable, "-m", "udg_cli", "serve"], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**base_env, **env, "UDG_HOST": "127.0.0.1", "UDG_PORT": str(port)})

    started = time.monotonic()
    process, port = start_listening(launch, log_path, timeout_s)
    served = Served(process, f"http://127.0.0.1:{port}", port, Path(log_path))
    try:
        _wait_ready(served, ready_path, until, started + timeout_s)
    except BaseException:
        stop(process)
        raise
    return served


def _wait_ready(served: Served, ready_path: str, until, deadline: float) -> None:
    last = "no answer"
    with httpx.Client(base_url=served.base, timeout=2) as http:
        while True:
            assert served.process.poll() is None, f"udg serve exited ({served.process.returncode}):\n{served.log()}"
            try:
                reply = http.get(ready_path)
                if reply.status_code == 200 and (until is None or until(http)):
                    return
                last = f"{ready_path} {reply.status_code}: {reply.text[:300]}"
            except (httpx.TransportError, KeyError, ValueError) as error:
                last = f"{type(error).__name__}: {error}"
            assert time.monotonic() < deadline, f"udg serve not ready ({last}):\n{served.log()[-4000:]}"
            time.sleep(0.05)


def _listens(pid: int, port: int) -> bool:
    """Whether process `pid` holds the socket listening on 127.0.0.1:`port` (Linux /proc; elsewhere assumed)."""
    if not os.path.exists("/proc/net/tcp"):  # no /proc: the exit-on-clash check alone
        return True
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if os.path.exists(table):
            with open(table) as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                        inodes.add(fields[9])
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:  # exited
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").removeprefix("socket:[").rstrip("]") in inodes:
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def stop(process: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGINT (uvicorn's graceful stop without the SIGTERM drain a test does not need), then SIGKILL after
    `grace_s`; then whatever is left of its process group (a `start_serve` child leads one). A worker that
    outlived a killed supervisor would go on heartbeating into the session's Redis and following (and
    restoring) routing documents there: every later test would see it."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if os.name == "posix" and os.getpgid(0) != process.pid:  # never this test run's own group
        with contextlib.suppress(ProcessLookupError, PermissionError):  # no group of that id: nothing left
            os.killpg(process.pid, signal.SIGKILL)
