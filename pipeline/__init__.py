"""Making a model version: train -> export -> publish, the one way every entry point does it.

`udg quickstart`, `udg loadtest`, the service benchmarks and the trainer image all call `make_version`, so a
version is always made by the same steps with the same reuse rules:

- a version already in the repository is reused (unless `retrain`): a restarted stack re-publishes it only;
- else a checkpoint already in `workdir` is exported (unless `retrain`);
- else `udg train TRAIN_ARGS --out workdir/checkpoint.pt` runs first;
- then, given a Redis URL, `udg publish` loads the version's state (idempotent).

Training runs in a child interpreter by default, which keeps torch out of the calling process (a load test's
driver, a benchmark); `in_process=True` trains in this one (the quickstart shows training's own output).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class VersionError(RuntimeError):
    """A step of making a version failed; the message says which command."""


@dataclass
class VersionPlan:
    repo: Path  # the model repository
    version: str
    workdir: Path  # where the checkpoint lives
    train_args: list[str] = field(default_factory=list)  # `udg train` arguments, without --out
    retrain: bool = False
    redis_url: str | None = None  # publish there; None: do not publish
    in_process: bool = False

    @property
    def checkpoint(self) -> Path:
        return Path(self.workdir) / "checkpoint.pt"


@dataclass
class VersionResult:
    version_dir: Path
    trained: bool
    exported: bool
    published: object | None  # service.publish.PublishResult


def _udg(argv: list[str], log_file=None, echo=print) -> None:
    echo("  $ udg " + " ".join(argv))
    result = subprocess.run([sys.executable, "-m", "udg_cli", *argv], cwd=ROOT, stdout=log_file,
                            stderr=subprocess.STDOUT if log_file else None)
    if result.returncode != 0:
        raise VersionError(f"`udg {' '.join(argv)}` failed with exit code {result.returncode}")


def train(plan: VersionPlan, log_file=None, echo=print) -> None:
    argv = ["train", *plan.train_args, "--out", str(plan.checkpoint)]
    if not plan.in_process:
        _udg(argv, log_file, echo)
        return
    from model.commands import print_training_summary, run_training
    from udg_cli import build_parser

    echo("  $ udg " + " ".join(argv))
    path, metrics = run_training(build_parser().parse_args(argv))
    print_training_summary(path, metrics)


def export(plan: VersionPlan, log_file=None, echo=print) -> None:
    argv = ["export", str(plan.checkpoint), "--version", plan.version, "--out", str(plan.repo), "--force"]
    if not plan.in_process:
        _udg(argv, log_file, echo)
        return
    from export.onnx_export import export_artifact

    echo("  $ udg " + " ".join(argv))
    export_artifact(plan.checkpoint, plan.version, Path(plan.repo), overwrite=True)


def publish(version_dir: Path, redis_url: str, progress: bool = False):
    from service.publish import publish as publish_version
    from service.publish import sync_redis

    client = sync_redis(redis_url)
    try:
        return publish_version(Path(version_dir), client, progress=progress)
    finally:
        client.close()


def make_version(plan: VersionPlan, log_file=None, echo=print) -> VersionResult:
    """Train (if needed), export (if needed) and publish (given a Redis URL) one version; see the module doc."""
    from repository import ModelRepository

    repository = ModelRepository(plan.repo)
    version_dir = repository.path(plan.version)
    trained = exported = False
    if plan.retrain or not repository.has(plan.version):
        if plan.retrain or not plan.checkpoint.is_file():
            Path(plan.workdir).mkdir(parents=True, exist_ok=True)
            echo(f"training: {plan.checkpoint}")
            train(plan, log_file, echo)
            trained = True
        else:
            echo(f"training: reusing {plan.checkpoint} (retrain to train again)")
        echo(f"export: {version_dir}")
        export(plan, log_file, echo)
        exported = True
    else:
        echo(f"export: reusing {version_dir}")
    published = None
    if plan.redis_url:
        published = publish(version_dir, plan.redis_url, progress=plan.in_process)
        echo(f"published {published.version}: {published.users:,d} users in {published.seconds:.2f} s")
    return VersionResult(version_dir, trained, exported, published)
