"""pipeline.make_version: the reuse rules every entry point shares (quickstart, loadtest, benchmarks, the
trainer image), with the three steps recorded instead of run; one real run through `udg make-version`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from pipeline import VersionPlan, make_version

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def steps(monkeypatch):
    calls = []

    def train(plan, log_file=None, echo=print):
        calls.append("train")
        plan.checkpoint.write_bytes(b"checkpoint")

    def export(plan, log_file=None, echo=print):
        calls.append("export")
        version_dir = Path(plan.repo) / plan.version
        version_dir.mkdir(parents=True, exist_ok=True)
        (version_dir / "manifest.json").write_text(json.dumps({"version": plan.version}))

    def publish(version_dir, redis_url, progress=False):
        calls.append(f"publish {Path(version_dir).name} {redis_url}")
        return type("Result", (), {"version": Path(version_dir).name, "users": 0, "seconds": 0.0})()

    monkeypatch.setattr(pipeline, "train", train)
    monkeypatch.setattr(pipeline, "export", export)
    monkeypatch.setattr(pipeline, "publish", publish)
    return calls


def plan(tmp_path, **changes) -> VersionPlan:
    return VersionPlan(repo=tmp_path / "repo", version="v1", workdir=tmp_path / "work",
                       train_args=["--spec", "synthetic"], **changes)


def test_a_new_version_is_trained_exported_and_published(steps, tmp_path):
    result = make_version(plan(tmp_path, redis_url="redis://x"), echo=lambda line: None)
    assert steps == ["train", "export", "publish v1 redis://x"]
    assert result.trained and result.exported and result.version_dir == tmp_path / "repo" / "v1"


def test_an_existing_version_is_only_published_again(steps, tmp_path):
    make_version(plan(tmp_path), echo=lambda line: None)
    steps.clear()
    result = make_version(plan(tmp_path, redis_url="redis://x"), echo=lambda line: None)
    assert steps == ["publish v1 redis://x"] and not result.trained and not result.exported


def test_a_checkpoint_left_in_the_workdir_is_exported_without_training(steps, tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "checkpoint.pt").write_bytes(b"checkpoint")
    make_version(plan(tmp_path), echo=lambda line: None)
    assert steps == ["export"]


def test_retrain_replaces_everything(steps, tmp_path):
    make_version(plan(tmp_path), echo=lambda line: None)
    steps.clear()
    make_version(plan(tmp_path, retrain=True), echo=lambda line: None)
    assert steps == ["train", "export"]


def test_a_failed_step_names_the_command(tmp_path):
    bad = plan(tmp_path)
    bad.train_args = ["--spec", "no-such-spec"]
    with pytest.raises(pipeline.VersionError, match="udg train --spec no-such-spec"):
        make_version(bad, log_file=subprocess.DEVNULL, echo=lambda line: None)
    assert not (tmp_path / "repo" / "v1").exists()


@pytest.mark.slow
def test_udg_make_version_for_real(tmp_path, redis_server, redis_client):
    """The trainer image's command: a tiny synthetic version trained, exported and published."""
    result = subprocess.run(
        [sys.executable, "-m", "udg_cli", "make-version", "--repo", str(tmp_path / "repo"), "--version", "v1",
         "--workdir", str(tmp_path / "work"), "--redis-url", redis_server.url, "--", "--spec", "synthetic",
         "--synthetic-users", "120", "--set", "generator.params.events_per_user=10", "--udg", "--epochs", "1",
         "--meta-steps", "5", "--embed-dim", "4", "--udg-dim", "4", "--hidden", "8", "--quiet", "--threads", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "repo" / "v1" / "manifest.json").is_file()
    marker = json.loads(redis_client.get("udg:{ctl}:published:v1"))
    assert marker["version"] == "v1" and marker["users"] > 0
