"""`udg serve | publish | quickstart | models | gc` — the serving side of the command line.

Handlers import their dependencies lazily: this module is imported by every `udg` invocation. `serve` and
`publish` need only the serving install (no torch); `quickstart` trains, so it needs the full install.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

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
    from service.http_server import protocol_factory
    from service.logs import log_config

    try:
        # httptools with the service's HTTP limits (head size and count, head/body timeouts, connection cap,
        # lingering close after an early answer): service/http_server.py.
        uvicorn.run("service.main:create_app", factory=True, host=settings.host, port=settings.port,
                    workers=settings.workers, log_level=settings.log_level, access_log=False,  # ours: UDG_ACCESS_LOG
                    log_config=log_config(settings.log_format, settings.log_level),
                    loop="uvloop", http=protocol_factory(settings), timeout_keep_alive=settings.http_keep_alive_s,
                    timeout_graceful_shutdown=settings.shutdown_timeout_s)
    finally:
        if multiproc_dir:
            shutil.rmtree(multiproc_dir, ignore_errors=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from service.logs import configure
    from service.settings import Settings

    _apply_overrides(args)
    settings = Settings()
    configure(settings.log_format, settings.log_level)
    log.info("serving %s version %s on %s:%d (%d worker(s), %d onnxruntime thread(s) each), Redis %s",
             settings.model_repo, settings.model_version or "<newest>", settings.host, settings.port,
             settings.workers, settings.ort_threads, settings.redis_url_for_logs())
    run_server(settings)
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.publish import PublishError, publish, redis_used_memory, sync_redis
    from service.redis_layout import RedisLayout
    from service.settings import Settings, mask_url

    _apply_overrides(args)
    settings = Settings()
    client = sync_redis(settings.redis_url, ca_certs=settings.redis_ca_certs)
    before = redis_used_memory(client)
    try:
        result = publish(Path(args.version_dir), client, RedisLayout(settings.key_prefix, settings.history_cap),
                         chunk=args.chunk, overwrite_shared=args.overwrite_shared, progress=not args.quiet)
    except PublishError as error:
        raise SystemExit(f"udg publish: nothing published: {error}") from None
    if result.merged:
        print(f"Redis held no complete publish (fresh or wiped): {result.merged:,d} histories there were merged "
              "(their clicks received since stay on top of the published snapshot)")
    after = redis_used_memory(client)
    print(f"published version {result.version}: {result.users:,d} users in {result.seconds:.1f} s "
          f"({result.users / max(result.seconds, 1e-9):,.0f} users/s) to {mask_url(settings.redis_url)}; "
          f"Redis used_memory {before / 2**20:,.1f} -> {after / 2**20:,.1f} MiB")
    return 0


def cmd_publish_items(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dataset.errors import DataError
    from service.publish import PublishError, publish_items, sync_redis
    from service.redis_layout import RedisLayout
    from service.settings import Settings, mask_url

    _apply_overrides(args)
    settings = Settings()
    client = sync_redis(settings.redis_url, ca_certs=settings.redis_ca_certs)
    try:
        result = publish_items(Path(args.version_dir), Path(args.file), client,
                               RedisLayout(settings.key_prefix, settings.history_cap), id_column=args.id_column)
    except (DataError, PublishError) as error:
        raise SystemExit(f"nothing written: {error}") from None
    print(f"version {result.version}: {result.written:,d} new items in its item table (generation "
          f"{result.generation}) at {mask_url(settings.redis_url)}; {result.known:,d} rows were items the version "
          "was trained on (they keep their trained features)")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from service.quickstart import run_quickstart

    return run_quickstart(args)


def _admin_call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> int:
    """One admin API call with httpx; prints the JSON answer. Exit 0 on 2xx, 1 otherwise."""
    import json

    import httpx

    token = args.token or os.environ.get("UDG_ADMIN_TOKEN", "")
    if not token:
        print("no admin token: pass --token or set UDG_ADMIN_TOKEN", file=sys.stderr)
        return 2
    try:
        reply = httpx.request(method, args.url.rstrip("/") + "/v1/admin" + path, json=body,
                              headers={"Authorization": f"Bearer {token}"}, timeout=args.timeout)
    except httpx.HTTPError as error:
        print(f"{args.url}: {error}", file=sys.stderr)
        return 1
    try:
        answer = reply.json()
    except ValueError:
        answer = {"status": reply.status_code, "text": reply.text}
    if args.command_models == "list" and reply.is_success and not args.json:
        _print_versions(answer)
    else:
        print(json.dumps(answer, indent=1))
    if not reply.is_success:
        print(f"HTTP {reply.status_code}: {answer.get('message', '') if isinstance(answer, dict) else ''}",
              file=sys.stderr)
        return 1
    return 0


def _print_versions(answer: dict) -> None:
    routing = answer.get("routing") or {}
    print(f"routing generation {routing.get('generation')}: active {routing.get('active')}, "
          f"split {routing.get('split')}, loaded {routing.get('loaded')}")
    print(f"{'VERSION':<16} {'STATE':<10} {'KIND':<10} {'EXPORTED':<26} REASON")
    for row in answer.get("versions", []):
        manifest = row.get("manifest") or {}
        state = row["state"] + (f" {row['split_weight']:g}%" if row.get("split_weight") else "")
        print(f"{row['version']:<16} {state:<10} {str(manifest.get('kind')):<10} "
              f"{str(manifest.get('exported_at')):<26} {row.get('reason') or ''}")
    for worker in answer.get("workers", []):
        flag = "in sync" if worker.get("in_sync") else "OUT OF SYNC: " + "; ".join(worker.get("problems", []))
        print(f"worker {worker['worker']}: generation {worker['generation']}, serves {worker.get('active')}"
              f"{' split ' + str(worker['split']) if worker.get('split') else ''}, ready {worker['ready']}, {flag}")


def _parse_weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        version, sep, weight = item.partition("=")
        if not sep:
            raise SystemExit(f"{item!r}: expected VERSION=PERCENT, e.g. v1=90 v2=10")
        weights[version] = float(weight)
    return weights


def cmd_models(args: argparse.Namespace) -> int:
    action = args.command_models
    if action == "list":
        return _admin_call(args, "GET", "/versions")
    if action == "split":
        return _admin_call(args, "POST", "/split", {"weights": _parse_weights(args.weights)})
    if action == "rollback":
        return _admin_call(args, "POST", "/rollback")
    return _admin_call(args, "POST", f"/versions/{args.version}/{action}")


def cmd_gc(args: argparse.Namespace) -> int:
    import json

    from service.control import Conflict, garbage_collect
    from service.publish import sync_redis
    from service.settings import Settings

    _apply_overrides(args)
    settings = Settings()
    client = sync_redis(settings.redis_url, ca_certs=settings.redis_ca_certs)
    try:
        result = garbage_collect(client, settings.key_prefix, dry_run=args.dry_run, min_age_s=args.min_age_s,
                                 force=args.force)
    except Conflict as error:
        print(f"udg gc: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=1))
    return 0


SERVE_EPILOG = """HTTP limits, per worker process (environment; answers are the JSON error body):
  UDG_HTTP_MAX_HEADER_BYTES=32768    request line + headers, bytes; larger: 431 header_too_large
  UDG_HTTP_MAX_HEADERS=100           header fields per request; more: 431 header_too_large
  UDG_HTTP_HEADER_TIMEOUT_S=10       the head must arrive within this (from connect, or from its first byte
                                     on a kept-alive connection); else 408 header_timeout (or a silent close
                                     of a connection that sent nothing)
  UDG_HTTP_BODY_TIMEOUT_S=30         the body must arrive within this of the head; else 408 body_timeout
  UDG_HTTP_KEEP_ALIVE_S=5            idle kept-alive connections are closed after this
  UDG_HTTP_MAX_CONNECTIONS=1000      open connections; a request on one beyond: 503 overloaded + Retry-After
  UDG_MAX_BODY_BYTES=1048576         request body; larger: 413 body_too_large
  UDG_HTTP_DRAIN_BYTES=16777216      after an early answer (413, 431) the unread body is read and dropped
  UDG_HTTP_DRAIN_TIMEOUT_S=5         up to this much / this long, so clients get the answer, not a reset

Hot-user state cache (service/state_cache.py; one Redis node, not a cluster):
  UDG_STATE_CACHE=false              repeated users scored from the worker's memory, invalidated by Redis
                                     client tracking (BCAST); a lost tracking connection empties it
  UDG_STATE_CACHE_USERS=100000       users kept per worker (least recently used dropped)
  UDG_STATE_CACHE_MAX_AGE_S=30       an entry older than this is read again
  UDG_STATE_CACHE_PING_S=1           tracking connection pinged this often; silent 2 periods: cache off

Graceful shutdown (service/shutdown.py):
  UDG_SHUTDOWN_DRAIN_S=5             after SIGTERM: /readyz 503 this long while requests are still served
  UDG_SHUTDOWN_TIMEOUT_S=10          then: stop accepting; in-flight requests get this long to complete

Logs and traces (docs/observability.md):
  UDG_LOG_FORMAT=auto                json | text | auto (text on a terminal, else JSON)
  UDG_ACCESS_LOG=false               one line per request on logger udg.access
  UDG_LOG_REPEAT_S=10                a repeated failure is logged once per this, with the count of the others
  UDG_OTLP_ENDPOINT=                 OTLP/HTTP collector (http://host:4318): traces on (the `otel` extra)
  UDG_TRACE_SAMPLE_RATIO=1.0         share of the traces kept
"""


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="run the scoring service (FastAPI on uvicorn; settings from env)",
                                  epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    items = subparsers.add_parser("publish-items", help="items that arrived after training (with their fields) "
                                                        "into a version's item table: scored by their features")
    items.add_argument("version_dir", help="MODEL_REPO/VERSION")
    items.add_argument("file", help="Parquet, CSV or JSON Lines: the item id and the item fields' columns")
    items.add_argument("--id-column", default=None, help="default: the dataset spec's item id column")
    items.add_argument("--redis-url", default=None, help="env REDIS_URL")
    items.set_defaults(handler=cmd_publish_items)

    quick = subparsers.add_parser("quickstart", help="fresh machine -> trained, exported, published, serving")
    quick.add_argument("--workdir", default="runs/quickstart", help="checkpoint and model repository go here")
    quick.add_argument("--version", default="v1", help="model version name")
    quick.add_argument("--retrain", action="store_true", help="train again even if a checkpoint exists")
    quick.add_argument("--spec", default="movielens-100k",
                       help="dataset spec: a built-in name (movielens-100k, synthetic, shop) or a TOML/YAML file")
    quick.add_argument("--synthetic-users", type=int, default=None, help="users of a generated (synthetic) spec")
    quick.add_argument("--epochs", type=int, default=30)
    quick.add_argument("--meta-steps", type=int, default=1500)
    quick.add_argument("--host", default="127.0.0.1")
    quick.add_argument("--port", type=int, default=8000, help="0: a free port")
    quick.add_argument("--exit-after-demo", action="store_true",
                       help="stop the service (and a private Redis) after printing the example")
    quick.set_defaults(handler=cmd_quickstart)

    models = subparsers.add_parser("models", help="model versions of a running service (admin API)")
    models.add_argument("--url", default=os.environ.get("UDG_URL", "http://127.0.0.1:8000"),
                        help="service base URL (env UDG_URL)")
    models.add_argument("--token", default=None, help="admin bearer token (default: env UDG_ADMIN_TOKEN)")
    models.add_argument("--timeout", type=float, default=120.0, help="seconds (loading a large version takes time)")
    actions = models.add_subparsers(dest="command_models", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="versions, states, routing and workers")
    listing.add_argument("--json", action="store_true", help="the raw JSON answer")
    for name, text in (("load", "load, verify and warm up VERSION in every worker"),
                       ("activate", "serve VERSION to every user (loads it first if needed)"),
                       ("unload", "release VERSION in every worker (refused while it serves)")):
        action = actions.add_parser(name, help=text)
        action.add_argument("version")
    split = actions.add_parser("split", help="A/B split by user-id hash: udg models split v1=90 v2=10")
    split.add_argument("weights", nargs="+", metavar="VERSION=PERCENT")
    actions.add_parser("rollback", help="back to the routing before the last activate/split/rollback")
    models.set_defaults(handler=cmd_models)

    gc = subparsers.add_parser("gc", help="delete Redis namespaces of versions no worker holds (never the active)")
    gc.add_argument("--redis-url", default=None, help="env REDIS_URL")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    gc.add_argument("--min-age-s", type=float, default=300.0,
                    help="keep versions published less than this long ago (not loaded yet)")
    gc.add_argument("--force", action="store_true", help="run even without a routing document in Redis")
    gc.set_defaults(handler=cmd_gc)
