"""`udg warmup`: run the online warm-up worker (settings from the service's environment: REDIS_URL,
UDG_MODEL_REPO, UDG_KEY_PREFIX, ...; flags for the worker's own)."""

from __future__ import annotations

import argparse
import logging
import signal

log = logging.getLogger(__name__)


def cmd_warmup(args: argparse.Namespace) -> int:
    import torch

    from repository import ModelRepository
    from service.publish import sync_redis
    from service.redis_layout import RedisLayout
    from service.settings import Settings
    from warmup.worker import Metrics, WarmupConfig, WarmupWorker

    torch.set_num_threads(args.threads)
    settings = Settings(**{k: v for k, v in (("model_repo", args.model_repo), ("redis_url", args.redis_url))
                           if v is not None})
    client = sync_redis(settings.redis_url, timeout_s=max(5.0, args.block_ms / 1000 + 5))
    config = WarmupConfig(alpha=args.alpha, rule=args.rule, steps=args.steps, users=args.users, count=args.count,
                          block_ms=args.block_ms, claim_idle_ms=args.claim_idle_ms, claim_every_s=args.claim_every_s,
                          max_deliveries=args.max_deliveries, users_per_pass=args.users_per_pass)
    metrics = Metrics()
    if args.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(args.metrics_port, addr=args.metrics_host, registry=metrics.registry)
    worker = WarmupWorker(client, ModelRepository(settings.model_repo), RedisLayout.from_settings(settings), config,
                          args.consumer, metrics)
    stopping = {"now": False}

    def _stop(signum, frame):
        stopping["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info("udg warmup: consumer %s of group %s on %s (Redis %s, repository %s)", worker.consumer,
             worker.layout.warmup_group, worker.layout.warmup_stream, settings.redis_url_for_logs(),
             settings.model_repo)
    worker.run(stop=lambda: stopping["now"], idle_exit_s=args.exit_when_idle_s)
    log.info("udg warmup: stopped after %d entries", worker.processed)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("warmup", help="online warm-up worker: new users' UDG embeddings from their events")
    parser.add_argument("--model-repo", default=None, help="model repository (default UDG_MODEL_REPO)")
    parser.add_argument("--redis-url", default=None, help="default REDIS_URL")
    parser.add_argument("--consumer", default=None, help="consumer name in the group (default host:pid); a "
                        "restarted worker of the same name resumes its own pending entries at once")
    parser.add_argument("--users", choices=["cold", "all"], default="cold",
                        help="cold: users whose embedding came from the meta generator; all: published users too")
    parser.add_argument("--rule", choices=["sgd", "adam"], default="sgd",
                        help="sgd: Algorithm 1's α step per event; adam: Adam's step with the user's own moments, "
                             "stored next to the embedding (model/warm_rule.py; which to choose: docs/warmup.md)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="the rule's step size (default: the version's own: its meta-training α for sgd, its "
                             "pre-training learning rate for adam)")
    parser.add_argument("--steps", type=int, default=1, help="gradient steps per event")
    parser.add_argument("--count", type=int, default=256, help="entries per read")
    parser.add_argument("--block-ms", type=int, default=1000)
    parser.add_argument("--claim-idle-ms", type=int, default=30_000,
                        help="claim entries pending this long on another (dead) consumer")
    parser.add_argument("--claim-every-s", type=float, default=5.0)
    parser.add_argument("--max-deliveries", type=int, default=5, help="an entry delivered more often is dropped")
    parser.add_argument("--users-per-pass", type=int, default=64,
                        help="users stepped together in one batched forward/backward and written in one pipeline")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one worker per core scales out)")
    parser.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics on METRICS_HOST:PORT")
    parser.add_argument("--metrics-host", default="127.0.0.1",
                        help="address of /metrics (0.0.0.0 in a container, for ops/prometheus/prometheus.yml)")
    parser.add_argument("--exit-when-idle-s", type=float, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(handler=cmd_warmup)
