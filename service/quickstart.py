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


def _train(args: argparse.Namespace, checkpoint: Path) -> None:
    from model.commands import print_training_summary, run_training
    from udg_cli import build_parser

    argv = ["train", "--udg", "--cold-users", "0.1", "--data", args.data, "--epochs", str(args.epochs),
            "--meta-steps", str(args.meta_steps), "--out", str(checkpoint)]
    if args.synthetic_users:
        argv += ["--synthetic-users", str(args.synthetic_users)]
    train_args = build_parser().parse_args(argv)
    print(f"[1/4] data + training: udg {' '.join(argv)}", flush=True)
    path, metrics = run_training(train_args)
    print_training_summary(path, metrics)


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


def run_quickstart(args: argparse.Namespace) -> int:
    from repository import ModelRepository
    from service.local_redis import free_port, resolve_redis
    from service.publish import publish, sync_redis

    workdir = Path(args.workdir)
    checkpoint, repo = workdir / "checkpoint.pt", workdir / "model_repo"
    repository = ModelRepository(repo)
    version_dir = repository.path(args.version)
    trained = False
    if args.retrain or not checkpoint.is_file():
        _train(args, checkpoint)
        trained = True
    else:
        print(f"[1/4] data + training: reusing {checkpoint} (--retrain to train again)")

    if trained or not repository.has(args.version):
        from export.onnx_export import export_artifact

        print(f"[2/4] export: udg export {checkpoint} --version {args.version} --out {repo}", flush=True)
        export_artifact(checkpoint, args.version, repo, overwrite=True)
    else:
        print(f"[2/4] export: reusing {version_dir}")

    redis_url, private, how = resolve_redis()
    from service.settings import mask_url

    print(f"[3/4] publish: udg publish {version_dir}  (Redis: {how}, {mask_url(redis_url)})", flush=True)
    result = publish(version_dir, sync_redis(redis_url), progress=True)
    print(f"      {result.users:,d} users in {result.seconds:.2f} s")

    port = args.port
    if port == 0 or not _port_free(args.host, port):
        port = free_port(args.host)
    base = f"http://{args.host}:{port}"
    env = {**os.environ, "REDIS_URL": redis_url, "UDG_MODEL_REPO": str(repo), "UDG_MODEL_VERSION": args.version,
           "UDG_HOST": args.host, "UDG_PORT": str(port)}
    print(f"[4/4] serve: udg serve --model-repo {repo} --version {args.version} --port {port}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "udg_cli", "serve"], env=env,
                              cwd=str(Path(__file__).resolve().parents[1]))
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
        print(f"\nThe service is ready on {base}  (GET /healthz /readyz /metrics, POST /v1/score /v1/events)\n")
        for title, body in _demo_requests(version_dir):
            payload = json.dumps(body)
            print(f"# {title}")
            print(f"curl -s -X POST {base}/v1/score -H 'Content-Type: application/json' -d {shlex.quote(payload)}")
            status, answer = _http("POST", f"{base}/v1/score", body)
            print(f"# -> HTTP {status}")
            print(answer.decode())
            print()
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
