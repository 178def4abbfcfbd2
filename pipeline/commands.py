"""`udg make-version`: train -> export -> publish one version (`pipeline.make_version`); the trainer image's
entry point."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def cmd_make_version(args: argparse.Namespace) -> int:
    from pipeline import VersionError, VersionPlan, make_version

    redis_url = None
    if args.publish:
        redis_url = args.redis_url or os.environ.get("REDIS_URL")
        if not redis_url:
            raise SystemExit("--publish needs --redis-url or REDIS_URL")
    train_args = list(args.train_args)
    if train_args[:1] == ["--"]:
        train_args = train_args[1:]
    plan = VersionPlan(repo=Path(args.repo), version=args.version, workdir=Path(args.workdir),
                       train_args=train_args, retrain=args.retrain, redis_url=redis_url)
    try:
        result = make_version(plan, echo=lambda line: print(f"udg make-version: {line}", flush=True))
    except VersionError as error:
        raise SystemExit(str(error)) from None
    print(f"udg make-version: done: {result.version_dir}", flush=True)
    return 0


def register(subparsers) -> None:
    make = subparsers.add_parser("make-version", help="train -> export -> publish one model version (reusing "
                                                      "what exists; the trainer image runs this)")
    make.add_argument("--repo", required=True, help="model repository (MODEL_REPO)")
    make.add_argument("--version", required=True)
    make.add_argument("--workdir", required=True, help="where the checkpoint is written (and reused)")
    make.add_argument("--retrain", action="store_true", help="train and export again even if the version exists")
    make.add_argument("--publish", action=argparse.BooleanOptionalAction, default=True,
                      help="publish to --redis-url / REDIS_URL (default: on)")
    make.add_argument("--redis-url", default=None)
    make.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then the `udg train` arguments")
    make.set_defaults(handler=cmd_make_version)
