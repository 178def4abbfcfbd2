"""`udg loadtest` (headless locust run + report) and `udg bench compare` (service vs floor vs naive baseline).

`udg loadtest` starts the stack on 127.0.0.1 — a private redis-server on a free port (unless REDIS_URL or
--redis-url is given), a published model version (--model-repo/--version, else a small synthetic model
trained once into --workdir), `udg serve` with --workers — or targets a running one with --host (loopback
only); runs locust headless for a bounded time and user count; writes into --out:

    locust_stats.csv, locust_stats_history.csv, locust_failures.csv, locust_exceptions.csv   (locust --csv)
    report.html            locust's HTML report
    latency_throughput.png latency percentiles and throughput over time (swaps marked)
    summary.md             RPS, p50/p95/p99 per request type, failures
    service.log, locust.log, swaps.json (with --swap)

Exit code: 0 when no request failed, 1 when some did, 2 when the run could not be set up.
Handlers import their dependencies lazily (this module is imported by every `udg` invocation).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MAX_USERS, MAX_RUN_TIME_S = 512, 3600


def _parse_swap(text: str) -> tuple[str, float]:
    version, sep, at = text.rpartition("@")
    if not sep or not version:
        raise argparse.ArgumentTypeError(f"{text!r}: expected VERSION@SECONDS, e.g. v2@30")
    try:
        seconds = float(at)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: SECONDS must be a number") from None
    return version, seconds


def admin_swap_route(base: str) -> str | None:
    """The admin route that activates a model version, if this service offers one (the versions issue adds
    `/v1/admin/...`): a POST path under /v1/admin/ naming activation or a swap, from the OpenAPI schema."""
    from loadtest.stack import http

    status, body = http("GET", base + "/openapi.json")
    if status != 200:
        return None
    paths = json.loads(body).get("paths", {})
    routes = [p for p, ops in paths.items() if p.startswith("/v1/admin/") and "post" in ops]
    for word in ("activate", "swap", "active"):
        for path in routes:
            if word in path:
                return path
    return None


def swap_version(base: str, route: str, version: str) -> tuple[bool, str]:
    from loadtest.stack import http

    token = os.environ.get("UDG_ADMIN_TOKEN", "")  # cmd_loadtest sets one for a service it starts
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if "{" in route:  # e.g. /v1/admin/versions/{version}/activate
        path, body = route.split("{", 1)[0] + version + route.split("}", 1)[1], b"{}"
    else:
        path, body = route, json.dumps({"version": version}).encode()
    status, answer = http("POST", base + path, body, timeout=60.0, headers=headers)
    return status == 200, f"HTTP {status}: {answer[:200].decode(errors='replace')}"


def _schedule_swaps(base: str, route: str, swaps: list[tuple[str, float]], started: float,
                    out_dir: Path, stop: threading.Event) -> threading.Thread:
    record: list[dict] = []

    def run() -> None:
        for version, at in sorted(swaps, key=lambda s: s[1]):
            if stop.wait(max(0.0, started + at - time.time())):
                return
            when = time.time()
            try:
                ok, result = swap_version(base, route, version)
            except OSError as error:
                ok, result = False, str(error)
            print(f"swap to {version} at t={when - started:.1f} s: {result}", flush=True)
            record.append({"at": when, "version": version, "ok": ok, "result": result})
            (out_dir / "swaps.json").write_text(json.dumps(record, indent=1))

    thread = threading.Thread(target=run, name="swaps", daemon=True)
    thread.start()
    return thread


def cmd_loadtest(args: argparse.Namespace) -> int:
    from loadtest import report, stack

    if not 1 <= args.users <= MAX_USERS:
        print(f"--users must be within 1..{MAX_USERS}", file=sys.stderr)
        return 2
    if not 1 <= args.run_time <= MAX_RUN_TIME_S:
        print(f"--run-time must be within 1..{MAX_RUN_TIME_S} seconds", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("locust_*.csv"):
        stale.unlink()
    for name in ("swaps.json", report.PLOT_FILE, report.SUMMARY_FILE, "report.html"):
        (out_dir / name).unlink(missing_ok=True)
    redis = server = None
    load_before = os.getloadavg()[0]
    try:
        version_dir: Path | None = None
        if args.host:
            base = stack.check_local(args.host)
            if args.model_repo:
                version_dir = Path(args.model_repo) / args.version
            stack.wait_ready(base, timeout_s=10)
        else:
            with open(out_dir / "setup.log", "ab") as setup_log:
                version_dir = stack.ensure_model(Path(args.model_repo) if args.model_repo else None, args.version,
                                                 Path(args.workdir), spec=args.spec,
                                                 synthetic_users=args.synthetic_users, epochs=args.epochs,
                                                 small=not args.full_model, log_file=setup_log)
            redis_url = args.redis_url or os.environ.get("REDIS_URL")
            if not redis_url:
                redis = stack.start_redis()
                redis_url = redis.url
                print(f"redis: private redis-server on 127.0.0.1:{redis.port}", flush=True)
            stack.publish_version(version_dir, redis_url)
            for version in dict.fromkeys(v for v, _ in args.swap if v != version_dir.name):
                stack.publish_version(version_dir.parent / version, redis_url)
            print(f"service: udg serve, {args.workers} worker(s) x {args.ort_threads} onnxruntime thread(s)",
                  flush=True)
            extra_env = {}
            if args.swap:  # the admin API is disabled without a token: give the service we start a random one
                import secrets

                os.environ.setdefault("UDG_ADMIN_TOKEN", secrets.token_urlsafe(24))
                extra_env["UDG_ADMIN_TOKEN"] = os.environ["UDG_ADMIN_TOKEN"]
            server, base = stack.start_service(version_dir, redis_url, args.workers, args.ort_threads,
                                               out_dir / "service.log", extra_env)
        route = None
        if args.swap:
            route = admin_swap_route(base)
            if route is None:
                print("--swap: not available — this service has no model-version admin API (POST /v1/admin/...; "
                      "it comes with the versions issue). Run without --swap.", file=sys.stderr)
                return 2
        code = _run_locust(args, base, version_dir, out_dir, route)
    except stack.StackError as error:
        print(f"udg loadtest: {error}", file=sys.stderr)
        return 2
    finally:
        stack.stop(server)
        if redis is not None:
            redis.cleanup()
    if code is None:
        return 2
    context = {"target": base if args.host else f"{base} (started here: {args.workers} uvicorn worker(s) x "
                                                   f"{args.ort_threads} onnxruntime thread(s), private Redis)",
               "model": str(version_dir) if version_dir else "(from the environment)",
               "locust": f"{args.users} users, spawn rate {args.spawn_rate or args.users}/s, {args.run_time} s"
                         + (f", tags {args.tags}" if args.tags else ""),
               "machine": f"{os.cpu_count()} CPUs; 1-min load average {load_before:.2f} before, "
                          f"{os.getloadavg()[0]:.2f} after (load generator on the same machine)"}
    stats_file = out_dir / report.STATS_FILE
    if not stats_file.is_file():
        print(f"locust wrote no {stats_file} (see {out_dir / 'locust.log'})", file=sys.stderr)
        return 2
    rows, plot_file, summary_file = report.build(out_dir, context)
    print(summary_file.read_text())
    print(f"report: {summary_file}, {plot_file}, {out_dir / 'report.html'}")
    total = next((r for r in rows if r.name == "Aggregated"), None)
    if total is None or total.requests == 0:
        print("no request completed", file=sys.stderr)
        return 1
    return 1 if total.failures else 0


def _run_locust(args: argparse.Namespace, base: str, version_dir: Path | None, out_dir: Path,
                route: str | None) -> int | None:
    from loadtest.stack import ROOT

    env = dict(os.environ)
    if version_dir is not None:
        env["UDG_LOADTEST_MODEL_DIR"] = str(Path(version_dir).resolve())
        sizes = candidate_sizes(Path(version_dir))
        if sizes and "UDG_LOADTEST_CANDIDATES" not in env:
            env["UDG_LOADTEST_CANDIDATES"] = sizes
            print(f"candidate lists: {sizes} (the catalogue is smaller than the locustfile's default range)")
    command = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), "--headless",
               "--users", str(args.users), "--spawn-rate", str(args.spawn_rate or args.users),
               "--run-time", f"{args.run_time}s", "--host", base, "--stop-timeout", "5",
               "--csv", str(out_dir / "locust"), "--csv-full-history", "--html", str(out_dir / "report.html"),
               "--only-summary", "--loglevel", "WARNING", "--logfile", str(out_dir / "locust.log")]
    if args.tags:
        command += ["--tags", *args.tags.replace(",", " ").split()]
    print(f"locust: {args.users} users for {args.run_time} s against {base}", flush=True)
    stop = threading.Event()
    started = time.time()
    if route is not None:
        _schedule_swaps(base, route, args.swap, started, out_dir, stop)
    try:
        with open(out_dir / "locust.out", "wb") as output:
            process = subprocess.run(command, env=env, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT,
                                     timeout=args.run_time + 120)
    except subprocess.TimeoutExpired:
        print("locust did not finish in time (killed)", file=sys.stderr)
        return None
    finally:
        stop.set()
    return process.returncode


def candidate_sizes(version_dir: Path) -> str | None:
    """A candidate-size spec within the catalogue, when it holds fewer items than the locustfile's default
    upper bound (1000): beyond the catalogue the locustfile would repeat ids, which the service refuses (422)."""
    from repository import ArtifactError, read_manifest

    try:
        index = read_manifest(version_dir, validate=False)["features"]["items"]["tokens"]
    except (ArtifactError, KeyError, TypeError):
        return None
    items = sum(1 for token in index if not str(token).startswith("<"))
    if items >= 1000 or items < 1:
        return None
    # The locustfile also swaps ~1% of candidates for unknown ids; stay a little below the catalogue size.
    high = max(1, int(items * 0.95))
    return f"loguniform:{min(50, high)}:{high}"


def cmd_bench_compare(args: argparse.Namespace) -> int:
    from loadtest.bench_compare import run

    return run(args)


def register(subparsers) -> None:
    load = subparsers.add_parser("loadtest", help="headless locust run against the service; CSV, HTML, PNG, summary",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    load.add_argument("--out", default="results/loadtest", help="output directory (default: results/loadtest)")
    load.add_argument("--run-time", type=int, default=60, help=f"seconds of load (default 60, max {MAX_RUN_TIME_S})")
    load.add_argument("--users", type=int, default=16, help=f"concurrent locust users (default 16, max {MAX_USERS})")
    load.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all at once)")
    load.add_argument("--tags", default=None, help="locust task tags to run, e.g. score or score,events (default: all)")
    load.add_argument("--host", default=None,
                      help="target a running service (http://127.0.0.1:PORT) instead of starting one")
    load.add_argument("--model-repo", default=None,
                      help="model repository holding --version (default: a small synthetic model in --workdir)")
    load.add_argument("--version", default="v1", help="model version to serve (default v1)")
    load.add_argument("--workdir", default="runs/loadtest", help="where the synthetic model is trained once")
    load.add_argument("--spec", default="synthetic",
                      help="dataset spec of the model trained into --workdir: a built-in name (synthetic, shop, "
                           "movielens-100k) or a TOML/YAML file")
    load.add_argument("--synthetic-users", type=int, default=2000,
                      help="users of a generated spec (synthetic, shop); ignored for a spec that reads files")
    load.add_argument("--epochs", type=int, default=1)
    load.add_argument("--full-model", action="store_true",
                      help="train the shipped architecture instead of the small one (slower to train)")
    load.add_argument("--redis-url", default=None, help="use this Redis (default: env REDIS_URL, else a private one)")
    load.add_argument("--workers", type=int, default=2, help="uvicorn workers (default 2)")
    load.add_argument("--ort-threads", type=int, default=1, help="onnxruntime threads per worker (default 1)")
    load.add_argument("--swap", type=_parse_swap, action="append", default=[], metavar="VERSION@SECONDS",
                      help="activate VERSION (from the same model repository; published before the run) SECONDS "
                           "into the run through the admin API (POST /v1/admin/versions/VERSION/activate, bearer "
                           "UDG_ADMIN_TOKEN; a service started here gets a random token), marked on the plot; "
                           "repeatable")
    load.set_defaults(handler=cmd_loadtest)

    from loadtest.bench_compare import add_arguments

    bench = subparsers.choices.get("bench")
    if bench is None:
        bench = subparsers.add_parser("bench", help="micro-benchmarks that print tables")
        bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    else:  # export.commands registered `udg bench` first: add a subcommand to it (argparse keeps no public handle)
        bench_sub = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    compare = bench_sub.add_parser("compare", help="N=500: in-process floor and ceiling vs the service vs a naive "
                                                   "FastAPI+PyTorch baseline, one table")
    add_arguments(compare)
    compare.set_defaults(handler=cmd_bench_compare)
