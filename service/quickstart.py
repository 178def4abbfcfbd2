"""`udg quickstart`: the main job. Fresh machine -> data, training, export, publish, service, example curl.

Reuses what an earlier run left in `--workdir` (checkpoint, exported version) unless `--retrain`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def train_args(args: argparse.Namespace) -> list[str]:
    """What the quickstart trains: the shipped PNN+UDG preset with its meta generator, 10% cold users."""
    argv = ["--udg", "--cold-users", "0.1", "--spec", args.spec, "--epochs", str(args.epochs),
            "--meta-steps", str(args.meta_steps)]
    if args.synthetic_users:
        argv += ["--synthetic-users", str(args.synthetic_users)]
    return argv


def _http(method: str, url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _demo_requests(version_dir: Path) -> list[tuple[str, dict]]:
    import numpy as np

    from repository import USERS_FILE, read_manifest

    manifest = read_manifest(version_dir)
    items = list(manifest["features"]["items"]["tokens"])[:8]
    with np.load(version_dir / USERS_FILE, allow_pickle=False) as users:
        row = int(np.argmax(users["history_len"])) if len(users["user_ids"]) else None
        known = str(users["user_ids"][row]) if row is not None else "demo-user"
        profile = {f: str(v) for f, v in zip(users["profile_fields"].tolist(), users["profile"][row].tolist(),
                                             strict=True) if v} if row is not None else {}
    return [
        ("a known user (state published from training)", {"user_id": known, "candidates": items, "top_k": 3}),
        ("a new user with a profile (cold start: meta generator)",
         {"user_id": "quickstart-new-user", "candidates": items[:5] + ["never-seen-item"], "profile": profile}),
    ]


def _warmup_demo(base: str, version_dir: Path, timeout_s: float = 60.0) -> None:
    """A new user's scores, then a few clicks (and skips) through POST /v1/events, then — once `udg warmup` has
    taken its steps on their UDG embedding — the same request again."""
    request = _demo_requests(version_dir)[1][1]
    user = "quickstart-warm-user"
    body = {"user_id": user, "candidates": request["candidates"][:4], "profile": request["profile"]}
    status, answer = _http("POST", f"{base}/v1/score", body)
    if status != 200:
        print(f"# warm-up demo skipped: HTTP {status} {answer[:200]!r}")
        return
    before = json.loads(answer)
    clicked, skipped = body["candidates"][:2], body["candidates"][2:4]
    events = [{"user_id": user, "item_id": item, "clicked": item in clicked, "ts": 1_000 + i}
              for i, item in enumerate(clicked * 3 + skipped * 3)]
    print(f"# a new user clicks {clicked} three times each and skips {skipped} three times each "
          f"(POST {base}/v1/events/batch: {len(events)} events); `udg warmup` takes a step per event")
    _http("POST", f"{base}/v1/events/batch", {"events": events})
    deadline, after = time.monotonic() + timeout_s, before
    while time.monotonic() < deadline:
        status, answer = _http("POST", f"{base}/v1/score", body)
        after = json.loads(answer) if status == 200 else after
        if after.get("warmup_steps", 0) >= len(events):
            break
        time.sleep(0.2)
    print(f"# warm-up steps on this user's UDG embedding: {before.get('warmup_steps', 0)} -> "
          f"{after.get('warmup_steps', 0)}")
    print(f"# {'candidate':<24} {'before':>9} {'after':>9} {'change':>9}")
    for item, old, new in zip(body["candidates"], before["scores"], after["scores"], strict=True):
        mark = "clicked" if item in clicked else "skipped"
        print(f"# {item:<24} {old:9.4f} {new:9.4f} {new - old:+9.4f}  ({mark})")
    print("# (the change is the UDG steps and the clicked items now in the behavior history together; a skipped item")
    print("#  can still rise, since the new history moves every candidate's score)")
    print()


def _start_warmup(env: dict) -> subprocess.Popen | None:
    """`udg warmup` beside the service (a training install has torch; the serving install does not)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        print("# (no torch in this install: `udg warmup` not started, clicks only feed the behavior history)")
        return None
    return subprocess.Popen([sys.executable, "-m", "udg_cli", "warmup", "--block-ms", "200",
                             "--consumer", "quickstart"], env=env, cwd=str(Path(__file__).resolve().parents[1]))


def run_quickstart(args: argparse.Namespace) -> int:
    from pipeline import VersionPlan, make_version
    from service.local_redis import free_port, resolve_redis
    from service.settings import mask_url

    workdir = Path(args.workdir)
    repo = workdir / "model_repo"
    redis_url, private, how = resolve_redis()
    print(f"[1/3] version {args.version}: train -> export -> publish (Redis: {how}, {mask_url(redis_url)})",
          flush=True)
    plan = VersionPlan(repo=repo, version=args.version, workdir=workdir, train_args=train_args(args),
                       retrain=args.retrain, redis_url=redis_url, in_process=True)
    version_dir = make_version(plan, echo=lambda line: print(f"      {line}", flush=True)).version_dir

    port = args.port
    if port == 0 or not _port_free(args.host, port):
        port = free_port(args.host)
    base = f"http://{args.host}:{port}"
    env = {**os.environ, "REDIS_URL": redis_url, "UDG_MODEL_REPO": str(repo), "UDG_MODEL_VERSION": args.version,
           "UDG_HOST": args.host, "UDG_PORT": str(port)}
    print(f"[2/3] serve: udg serve --model-repo {repo} --version {args.version} --port {port}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "udg_cli", "serve"], env=env,
                              cwd=str(Path(__file__).resolve().parents[1]))
    print("      and the online warm-up worker: udg warmup (docs/warmup.md)", flush=True)
    warmup = _start_warmup(env)
    stop = {"now": False}

    def _signal(signum, frame):
        stop["now"] = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _signal)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                print(f"the service exited with code {server.returncode}", file=sys.stderr)
                return 1
            try:
                status, _ = _http("GET", f"{base}/readyz", timeout=1.0)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                print("the service did not become ready within 120 s", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print(f"\n[3/3] The service is ready on {base}  (GET /healthz /readyz /metrics, POST /v1/score /v1/events)\n")
        for title, body in _demo_requests(version_dir):
            payload = json.dumps(body)
            print(f"# {title}")
            print(f"curl -s -X POST {base}/v1/score -H 'Content-Type: application/json' -d {shlex.quote(payload)}")
            status, answer = _http("POST", f"{base}/v1/score", body)
            print(f"# -> HTTP {status}")
            print(answer.decode())
            print()
        if warmup is not None:
            _warmup_demo(base, version_dir)
        sys.stdout.flush()
        if args.exit_after_demo:
            return 0
        print("Serving until Ctrl-C.", flush=True)
        server.wait()
        return server.returncode or 0
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if warmup is not None and warmup.poll() is None:
            warmup.terminate()
            try:
                warmup.wait(10)
            except subprocess.TimeoutExpired:
                warmup.kill()
                warmup.wait()
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if private is not None:
            private.cleanup()
            print(f"stopped the private redis-server on port {private.port}")
