"""`udg serve | publish | quickstart` — the serving side of the command line.

Handlers import their dependencies lazily: this module is imported by every `udg` invocation. `serve` and
`publish` need only the serving install (no torch); `quickstart` trains, so it needs the full install.
"""

from __future__ import annotations

import argparse
import logging
import os

log = logging.getLogger("udg")


def _apply_overrides(args: argparse.Namespace) -> None:
    """CLI flags -> environment, so that every uvicorn worker process builds the same Settings."""
    mapping = {"redis_url": "REDIS_URL", "model_repo": "UDG_MODEL_REPO", "model_version": "UDG_MODEL_VERSION",
               "host": "UDG_HOST", "port": "UDG_PORT", "workers": "UDG_WORKERS", "ort_threads": "UDG_ORT_THREADS"}
    for attr, env in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            os.environ[env] = str(value)


def run_server(settings) -> None:
    """uvicorn with the app factory; workers and host/port from settings. Blocks until stopped."""
    import shutil
    import tempfile

    import uvicorn

    multiproc_dir = None
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiproc_dir = tempfile.mkdtemp(prefix="udg-prometheus-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = multiproc_dir
    try:
        uvicorn.run("service.main:create_app", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level=settings.log_level, access_log=settings.access_log,
                    loop="uvloop", http="httptools", timeout_graceful_shutdown=10)
    finally:
        if multiproc_dir:
            shutil.rmtree(multiproc_dir, ignore_errors=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from service.settings import Settings

    _apply_overrides(args)
    settings = Settings()
    log.info("serving %s version %s on %s:%d (%d worker(s), %d onnxruntime thread(s) each), Redis %s",
             settings.model_repo, settings.model_version or "<newest>", settings.host, settings.port,
             settings.workers, settings.ort_threads, settings.redis_url_for_logs())
    run_server(settings)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.feature_store import Keys
    from service.publish import publish, redis_used_memory, sync_redis
    from service.settings import Settings, mask_url

    _apply_overrides(args)
    settings = Settings()
    client = sync_redis(settings.redis_url, ca_certs=settings.redis_ca_certs)
    before = redis_used_memory(client)
    result = publish(Path(args.version_dir), client, Keys(settings.key_prefix), chunk=args.chunk,
                     overwrite_shared=args.overwrite_shared, progress=not args.quiet)
    after = redis_used_memory(client)
    print(f"published version {result.version}: {result.users:,d} users in {result.seconds:.1f} s "
          f"({result.users / max(result.seconds, 1e-9):,.0f} users/s) to {mask_url(settings.redis_url)}; "
          f"Redis used_memory {before / 2**20:,.1f} -> {after / 2**20:,.1f} MiB")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from service.quickstart import run_quickstart

    return run_quickstart(args)


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the scoring service (FastAPI on uvicorn; settings from env)")
    serve.add_argument("--model-repo", default=None, help="model repository (env UDG_MODEL_REPO)")
    serve.add_argument("--version", dest="model_version", default=None,
                       help="version to serve (env UDG_MODEL_VERSION; default: the newest)")
    serve.add_argument("--redis-url", default=None, help="env REDIS_URL")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--workers", type=int, default=None)
    serve.add_argument("--ort-threads", type=int, default=None)
    serve.set_defaults(handler=cmd_serve)

    publish = subparsers.add_parser("publish", help="bulk-load a version's per-user state into Redis")
    publish.add_argument("version_dir", help="MODEL_REPO/VERSION (written by `udg export`)")
    publish.add_argument("--redis-url", default=None, help="env REDIS_URL")
    publish.add_argument("--chunk", type=int, default=2000, help="users per pipelined round trip")
    publish.add_argument("--overwrite-shared", action="store_true",
                         help="also replace existing click histories and profiles (default: keep them)")
    publish.add_argument("--quiet", action="store_true", help="no progress bar")
    publish.set_defaults(handler=cmd_publish)

    quick = subparsers.add_parser("quickstart", help="fresh machine -> trained, exported, published, serving")
    quick.add_argument("--workdir", default="runs/quickstart", help="checkpoint and model repository go here")
    quick.add_argument("--version", default="v1", help="model version name")
    quick.add_argument("--retrain", action="store_true", help="train again even if a checkpoint exists")
    quick.add_argument("--data", default="movielens", choices=["movielens", "synthetic"])
    quick.add_argument("--synthetic-users", type=int, default=None)
    quick.add_argument("--epochs", type=int, default=30)
    quick.add_argument("--meta-steps", type=int, default=1500)
    quick.add_argument("--host", default="127.0.0.1")
    quick.add_argument("--port", type=int, default=8000, help="0: a free port")
    quick.add_argument("--exit-after-demo", action="store_true",
                       help="stop the service (and a private Redis) after printing the example")
    quick.set_defaults(handler=cmd_quickstart)
