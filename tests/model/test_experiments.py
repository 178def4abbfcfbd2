"""Named experiments (experiments/experiments.toml) and the training defaults: one source for each.

The CLI's training, meta and thread options default to the config dataclasses (TrainConfig, MetaConfig); a
named experiment fills what the command line leaves out; the committed result grids regenerate their
report.md from their journals byte for byte."""

import argparse
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from model.base import ModelConfig
from model.experiment import (
    PRESETS,
    TRAIN_OPTIONS,
    VARIANTS,
    ExperimentError,
    load_experiments,
    select_experiments,
    train_defaults,
)
from model.meta import MetaConfig
from model.train import TrainConfig
from udg_cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_cli_defaults_are_the_config_dataclass_defaults():
    from model.commands import train_config_from

    parser = build_parser()
    args = parser.parse_args(["train"])
    assert train_config_from(args) == TrainConfig()
    # Every option that fills a config field defaults to None (the dataclass decides) and names a real field
    # whose default its --help shows.
    checked = 0
    for command in ("train", "evaluate", "meta", "gates", "report"):
        sub = _subparser(parser, command)
        for action in sub._actions:
            source = getattr(action, "config_default", None)
            if source is None:
                continue
            module, cls, name = source
            config = {"TrainConfig": TrainConfig, "MetaConfig": MetaConfig}[cls]
            assert name in {f.name for f in dataclasses.fields(config)}, (command, action.dest)
            assert action.default is None, (command, action.dest)
            assert f"(default: {getattr(config(), name)})" in sub._get_formatter()._get_help_string(action)
            checked += 1
    assert checked >= 20
    # The options that mean the same thing everywhere are sourced, not typed: --threads in every command.
    for command in ("train", "evaluate", "meta", "gates", "report", "coldstart", "export"):
        threads = next(a for a in _subparser(parser, command)._actions if a.dest == "threads")
        assert threads.config_default[1:] == ("TrainConfig", "threads")


def test_coldstart_defaults_are_the_dataclass_defaults():
    """`udg coldstart` keeps literal defaults (they enter its journal's setup); they must equal the configs'."""
    from model.coldstart import WarmConfig

    args = build_parser().parse_args(["coldstart"])
    assert (args.epochs, args.embed_wd, args.meta_steps) == (TrainConfig().epochs, TrainConfig().embed_weight_decay,
                                                             MetaConfig().steps)
    warm = WarmConfig()
    assert (args.warm_batch_size, args.warm_epochs, args.warm_update) == (warm.batch_size, warm.epochs, warm.update)
    assert args.threads is None


def test_udg_parses_and_helps_without_torch():
    """The serving install has no torch: `udg` must still build its parser and print every command's help."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from udg_cli import build_parser\n"
            "parser = build_parser()\n"
            "for command in ('serve', 'train', 'report', 'experiments', 'docs', 'coldstart', 'export'):\n"
            "    try:\n"
            "        parser.parse_args([command, '--help'])\n"
            "    except SystemExit as done:\n"
            "        assert done.code == 0, command\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(default: TrainConfig.epochs)" in done.stdout


def test_meta_command_defaults_to_meta_config():
    args = build_parser().parse_args(["meta", "x.pt"])
    given = {k: getattr(args, k) for k in ("steps", "alpha", "beta", "gamma", "seed")}
    assert given == dict.fromkeys(given)  # all None: MetaConfig() decides
    assert train_defaults()["embed_wd"] == TrainConfig().embed_weight_decay
    assert set(TRAIN_OPTIONS) - {"embed_wd"} <= {f.name for f in dataclasses.fields(TrainConfig)}


def test_every_committed_experiment_resolves():
    experiments = load_experiments()
    assert len(experiments) >= 50
    for experiment in experiments.values():
        assert experiment.variant in VARIANTS and experiment.preset in PRESETS
        assert experiment.out, experiment.name
        experiment.model_config()  # builds
    grid = select_experiments("movielens/*")
    assert {(e.model, e.variant) for e in grid} == {(k, v) for k in ("pnn", "deepfm", "wide_deep", "din", "dien")
                                                    for v in ("base", "udg", "double")}
    assert select_experiments("shop/pnn/udg,shop/din/*")[0].name == "shop/pnn/udg"


def test_train_takes_the_experiment_and_options_override_it():
    from model.commands import model_config_from, train_config_from

    parser = build_parser()
    args = parser.parse_args(["train", "--experiment", "synthetic/din/udg-detach", "--epochs", "2"])
    model = model_config_from(args)
    assert (model.kind, model.udg, model.gate_detach, model.gate_scale) == ("din", True, True, 2.0)
    config = train_config_from(args)
    assert config.epochs == 2 and config.threads == 1  # the option given, and the grid's threads
    double = model_config_from(parser.parse_args(["train", "--experiment", "shop/pnn/double"]))
    assert double.embed_dim == 2 * ModelConfig().embed_dim
    preset = model_config_from(parser.parse_args(["train", "--experiment", "shop/pnn/double", "--preset", "udg"]))
    assert preset.udg and preset.embed_dim == 16  # an explicit preset replaces the experiment's variant
    with pytest.raises(SystemExit, match="no experiment 'nope'"):
        model_config_from(parser.parse_args(["train", "--experiment", "nope"]))


def test_bad_entries_name_the_entry_and_the_key(tmp_path):
    path = tmp_path / "experiments.toml"
    path.write_text('[grids.g]\nspec = "synthetic"\n[experiments]\n"a" = {grid = "g", model = "pnn", variant = "udg", '
                    'epoch = 3}\n')
    with pytest.raises(ExperimentError, match=r"experiment 'a': unknown key\(s\) \['epoch'\]"):
        load_experiments(path)
    path.write_text('[experiments]\n"a" = {grid = "missing", model = "pnn", variant = "udg"}\n')
    with pytest.raises(ExperimentError, match="grid 'missing' is not defined"):
        load_experiments(path)
    path.write_text('[experiments]\n"a" = {spec = "shop", model = "pnn", variant = "udg-x"}\n')
    with pytest.raises(ExperimentError, match="variant 'udg-x'"):
        load_experiments(path)
    path.write_text('[experiments]\n"a" = {spec = "shop", model = "pnn", variant = "udg"}\n')
    with pytest.raises(ExperimentError, match="no experiment matches 'b/\\*'"):
        select_experiments("b/*", path)


def test_committed_reports_regenerate_from_their_journals(monkeypatch):
    """Every grid with a committed report: the table rendered from its journal equals the committed file."""
    from model.report import grid_from_experiments, render

    monkeypatch.chdir(ROOT)  # the experiments' folders are relative to the repository

    grids = grid_from_experiments(e for e in load_experiments().values() if e.out.startswith("docs/results/"))
    assert len(grids) >= 5
    for grid in grids:
        committed = ROOT / grid.out / grid.report_name
        assert committed.exists(), committed
        rows = grid.rows()
        assert rows, grid.name
        assert render(grid, rows) + "\n" == committed.read_text(), (
            f"{committed} is stale: `udg report --experiments '{grid.name}/*' --summary-only` regenerates it")
