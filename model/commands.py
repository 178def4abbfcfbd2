"""`udg train | evaluate | meta | gates | report | coldstart` — the training side of the command line.

Handlers import torch lazily: this module is imported by every `udg` invocation, including on the serving
install.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
from pathlib import Path

log = logging.getLogger("udg")


class ConfigDefaults(argparse.HelpFormatter):
    """Help that shows an option's default from the config dataclass it fills (`config_default` on the
    action: module, class, field). The option itself defaults to None, so that the dataclass decides, and an
    experiment's value is not hidden behind a command-line default; the class is imported only for --help."""

    def _get_help_string(self, action):
        text = action.help or ""
        source = getattr(action, "config_default", None)
        if source is None or "default:" in text:
            return text
        module, cls, name = source
        try:
            value = getattr(importlib.import_module(module).__dict__[cls](), name)
        except ImportError:  # the serving install: no torch, no training
            return f"{text} (default: {cls}.{name})".strip()
        return f"{text} (default: {value})".strip()


def config_option(group, *flags, source: tuple[str, str, str], **kwargs) -> argparse.Action:
    """An option whose default is the field `source` = (module, class, field) of a config dataclass."""
    action = group.add_argument(*flags, default=None, **kwargs)
    action.config_default = source
    return action


TRAIN_CONFIG = ("model.train", "TrainConfig")
META_CONFIG = ("model.meta", "MetaConfig")
# `udg train` / `udg report` option -> TrainConfig field (the rest are named alike).
TRAIN_FIELD = {"embed_wd": "embed_weight_decay"}


def resolved_threads(args: argparse.Namespace) -> int:
    """--threads, else TrainConfig's (0: leave torch's default)."""
    if args.threads is not None:
        return args.threads
    from model.train import TrainConfig

    return TrainConfig().threads


def set_threads(args: argparse.Namespace) -> None:
    import torch

    threads = resolved_threads(args)
    if threads:
        torch.set_num_threads(threads)
    args.threads = torch.get_num_threads()


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--spec", default=None,
                       help="dataset spec: a built-in name (movielens-100k, synthetic, shop) or a TOML/YAML file "
                            "(default: movielens-100k, or the experiment's)")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a spec value by its dotted key, e.g. split.cold_user_frac=0.1 or "
                            "generator.params.users=5000 (VALUE is parsed as JSON when it can be)")
    group.add_argument("--synthetic-users", type=int, default=None, help="= --set generator.params.users=N")
    group.add_argument("--synthetic-items", type=int, default=None, help="= --set generator.params.items=N")
    group.add_argument("--grouplens-dir", default=None,
                       help="MovieLens-100K from the original GroupLens files (u.data, u.user, u.item) in DIR")
    group.add_argument("--max-history", type=int, default=None, help="= --set behavior.max_length=N")
    group.add_argument("--cold-users", type=float, default=None,
                       help="share of users held out of training entirely (cold-start evaluation); "
                            "= --set split.cold_user_frac=F")
    group.add_argument("--split-seed", type=int, default=None, help="= --set split.seed=N")


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def spec_from(name: str, set_items: list[str], extra: dict | None = None):
    """A dataset spec by name or file, with `--set KEY=VALUE` items and `extra` dotted overrides applied."""
    from dataset.spec import SpecError, load_spec

    overrides = {}
    for item in set_items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = _value(value.strip())
    overrides.update(extra or {})
    try:
        spec = load_spec(name)
        if any(k.startswith("generator.") for k in overrides) and spec.generator is None:
            raise SystemExit(f"{name}: generator options given, but this spec reads files (no generator)")
        return spec.with_overrides(**overrides) if overrides else spec
    except SpecError as error:
        raise SystemExit(str(error)) from None


def data_spec(args: argparse.Namespace):
    """The dataset spec these arguments name, with their overrides applied."""
    from model.experiment import DEFAULT_SPEC

    overrides = {}
    for option, key in (("synthetic_users", "generator.params.users"), ("synthetic_items", "generator.params.items"),
                        ("grouplens_dir", "generator.params.grouplens_dir"), ("max_history", "behavior.max_length"),
                        ("cold_users", "split.cold_user_frac"), ("split_seed", "split.seed")):
        value = getattr(args, option, None)
        if value is not None:
            overrides[key] = str(Path(value).resolve()) if option == "grouplens_dir" else value
    return spec_from(args.spec or DEFAULT_SPEC, args.set, overrides)


def load_data(spec):
    """Ingest a spec; bad data ends the command with its message (file, column, row)."""
    from dataset.errors import DataError
    from dataset.ingest import prepare

    try:
        return prepare(spec)
    except DataError as error:
        raise SystemExit(f"bad data: {error}") from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from model.experiment import MODEL_KINDS, PRESETS

    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help=f"{', '.join(MODEL_KINDS)} (default: pnn, or the experiment's)")
    group.add_argument("--preset", default=None, help=f"{', '.join(PRESETS)} (see model/experiment.py)")
    group.add_argument("--udg", action="store_true",
                       help="wrap the base model with UDG, in the gate preset shipped for --model (docs/results.md)")
    group.add_argument("--embed-dim", type=int, default=None)
    group.add_argument("--udg-dim", type=int, default=None)
    group.add_argument("--hidden", default=None, help="comma-separated MLP sizes, e.g. 200,80")
    group.add_argument("--gate-input", choices=["paper", "official"], default=None)
    group.add_argument("--gate-scale", type=float, default=None, help="1: sigmoid gates, 2: 2*sigmoid")
    group.add_argument("--gate-detach", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--gate-output-layer", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--dropout", type=float, default=None)


def model_config_from(args: argparse.Namespace):
    """The model of --model/--preset/--udg and the single options; with --experiment, the experiment's model
    (kind, variant, model_options) with the options given here on top."""
    from dataclasses import replace

    from model.experiment import model_config, udg_preset

    chosen = experiment_of(args)
    kind = args.model or (chosen.model if chosen else "pnn")
    overrides = {
        "embed_dim": args.embed_dim, "udg_dim": args.udg_dim, "gate_input": args.gate_input,
        "gate_scale": args.gate_scale, "gate_detach": args.gate_detach,
        "gate_output_layer": args.gate_output_layer, "dropout": args.dropout,
        "hidden": tuple(int(x) for x in args.hidden.split(",")) if args.hidden else None,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if chosen and not args.preset and not args.udg and kind == chosen.model:
        return replace(chosen.model_config(), **overrides)
    preset = args.preset or (udg_preset(kind) if args.udg else "base")
    return model_config(kind, preset, **overrides)


def experiment_of(args: argparse.Namespace):
    """The named experiment of --experiment (None without one); a bad name ends the command."""
    name = getattr(args, "experiment", None)
    if not name:
        return None
    from model.experiment import ExperimentError, experiment

    try:
        return experiment(name)
    except ExperimentError as error:
        raise SystemExit(str(error)) from None


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (unset: the experiment's, else TrainConfig's)")
    config_option(group, "--epochs", type=int, help="most epochs (early stopping on valid AUC)",
                  source=(*TRAIN_CONFIG, "epochs"))
    config_option(group, "--batch-size", type=int, help="events per batch", source=(*TRAIN_CONFIG, "batch_size"))
    config_option(group, "--lr", type=float, help="Adam learning rate", source=(*TRAIN_CONFIG, "lr"))
    config_option(group, "--embed-wd", type=float, help="L2 weight decay on embedding tables",
                  source=(*TRAIN_CONFIG, "embed_weight_decay"))
    config_option(group, "--patience", type=int, help="epochs without a better valid AUC",
                  source=(*TRAIN_CONFIG, "patience"))
    config_option(group, "--seed", type=int, help="weights, shuffling, dropout", source=(*TRAIN_CONFIG, "seed"))
    add_threads_argument(group)
    config_option(group, "--device", help='torch device to train on, e.g. "cuda"', source=(*TRAIN_CONFIG, "device"))
    group.add_argument("--dist-backend", choices=["gloo", "nccl"], default=None,
                       help="under torchrun: the DDP backend (default nccl on CUDA, gloo on CPU; docs/training.md)")


def add_threads_argument(group) -> None:
    config_option(group, "--threads", type=int, help="torch threads; 0: torch's default (the machine's cores)",
                  source=(*TRAIN_CONFIG, "threads"))


def train_config_from(args: argparse.Namespace):
    """TrainConfig from the options given, then the experiment's (--experiment), then the dataclass defaults."""
    from model.train import TrainConfig

    chosen = experiment_of(args)
    options = dict(chosen.train) if chosen else {}
    for name in ("epochs", "batch_size", "lr", "embed_wd", "patience", "seed", "threads", "device"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return TrainConfig(**{TRAIN_FIELD.get(k, k): v for k, v in options.items()})


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def run_training(args: argparse.Namespace) -> tuple[Path, dict]:
    """Train a model (and, for UDG, its meta generator) and write the checkpoint; returns (path, metrics)."""
    import torch

    from model.checkpoint import Checkpoint, MetaState
    from model.distributed import Distributed
    from model.meta import MetaConfig, cold_start_metrics, fit_generator
    from model.train import train_model

    chosen = experiment_of(args)
    if chosen:
        args.spec = args.spec or chosen.spec
        args.set = list(chosen.spec_overrides) + args.set
    spec = data_spec(args)
    train_config = train_config_from(args)
    # Under torchrun: this rank's place in the job, its GPU and its share of the node's cores (docs/training.md).
    dist = Distributed.from_environment(getattr(args, "dist_backend", None), train_config.device)
    train_config = dataclasses.replace(train_config, device=dist.device(train_config.device),
                                       threads=dist.threads(args.threads, train_config.threads))
    dist.materialise_first(spec)
    data = load_data(spec)
    model_config = model_config_from(args)
    if train_config.threads:
        torch.set_num_threads(train_config.threads)
    log.info("training %s%s on %s (%d train events)", model_config.kind, "+UDG" if model_config.udg else "",
             spec.name, len(data.splits["train"]))
    model, metrics = train_model(data, model_config, train_config, progress=not args.quiet and dist.is_main,
                                 dist=dist)
    meta = None
    # The meta generator and the checkpoint on rank 0 alone; the other ranks wait for the file at the barrier.
    if dist.is_main and model_config.udg and not args.no_meta:
        meta_config = MetaConfig(seed=train_config.seed, **({"steps": args.meta_steps} if args.meta_steps else {}),
                                 **({"variant": args.meta_variant} if args.meta_variant else {}))
        generator, info = fit_generator(model, data, meta_config, progress=not args.quiet)
        if len(data.splits["cold"]):
            info["cold_start"] = {
                "random_init": cold_start_metrics(model, None, data.splits["cold"], seed=train_config.seed),
                "meta": cold_start_metrics(model, generator, data.splits["cold"]),
            }
        meta = MetaState(generator.state_dict(), info)
    out = Path(args.out)
    if dist.is_main:
        Checkpoint.from_training(model, model_config, train_config, data, metrics, meta).save(out)
    dist.barrier()
    dist.close()
    metrics["meta"] = dict(meta.info) if meta else {}
    metrics["rank"] = dist.rank
    return out, metrics


def print_training_summary(path: Path, metrics: dict) -> None:
    print(f"checkpoint: {path}")
    print(f"best epoch {metrics['best_epoch']}, {metrics['seconds_per_epoch']:.2f} s/epoch, "
          f"{metrics['parameters']:,d} parameters")
    print("valid:", format_metrics(metrics["valid"]))
    print("test: ", format_metrics(metrics["test"]))
    for name, values in metrics.get("meta", {}).get("cold_start", {}).items():
        print(f"cold-start users ({name}):", format_metrics(values))


def cmd_train(args: argparse.Namespace) -> int:
    path, metrics = run_training(args)
    if metrics["rank"] == 0:
        print_training_summary(path, metrics)
    return 0


def load_checkpoint_and_data(path: str):
    """A checkpoint, its model and the data it was trained on (the same splits, checked)."""
    from model.checkpoint import Checkpoint, CheckpointError

    try:
        checkpoint = Checkpoint.load(Path(path))
        model = checkpoint.build_model()
    except CheckpointError as error:
        raise SystemExit(str(error)) from None
    data = load_data(checkpoint.spec)
    if data.schema.items.tokens != checkpoint.schema.items.tokens:
        raise SystemExit("the data no longer matches the checkpoint's vocabulary; was the data set changed?")
    return checkpoint, model, data


def cmd_evaluate(args: argparse.Namespace) -> int:

    from model.train import evaluate

    set_threads(args)
    checkpoint, model, data = load_checkpoint_and_data(args.checkpoint)
    for split in args.split:
        if len(data.splits[split]) == 0:
            print(f"{split}: (empty)")
            continue
        if split == "cold":
            from model.meta import cold_start_metrics

            print(f"{split}:", format_metrics(cold_start_metrics(model, checkpoint.meta_generator(),
                                                                 data.splits[split])))
        else:
            print(f"{split}:", format_metrics(evaluate(model, data.splits[split])))
    return 0


def cmd_meta(args: argparse.Namespace) -> int:

    from model.checkpoint import MetaState
    from model.meta import MetaConfig, cold_start_metrics, fit_generator

    set_threads(args)
    checkpoint, model, data = load_checkpoint_and_data(args.checkpoint)
    config = MetaConfig(**{k: getattr(args, k) for k in ("steps", "alpha", "beta", "gamma", "seed", "variant")
                           if getattr(args, k) is not None})
    try:
        generator, info = fit_generator(model, data, config)
    except TypeError as error:
        raise SystemExit(f"{args.checkpoint}: {error}") from None
    if len(data.splits["cold"]):
        info["cold_start"] = {"random_init": cold_start_metrics(model, None, data.splits["cold"], seed=config.seed),
                              "meta": cold_start_metrics(model, generator, data.splits["cold"])}
        for name, values in info["cold_start"].items():
            print(f"cold-start users ({name}):", format_metrics(values))
    checkpoint.with_meta(MetaState(generator.state_dict(), info)).save(Path(args.checkpoint))
    final = "none: the mean row" if info.get("final_loss") is None else f"{info['final_loss']:.4f}"
    print(f"meta generator ({config.variant}, {info['config']['steps']} steps, final loss {final}) saved in "
          f"{args.checkpoint}")
    return 0


def cmd_gates(args: argparse.Namespace) -> int:
    from model.gate_stats import cmd_gates as run

    set_threads(args)
    return run(args)


def cmd_report(args: argparse.Namespace) -> int:
    from model.report import run_report

    run_report(args)
    return 0


def cmd_coldstart(args: argparse.Namespace) -> int:
    from model.coldstart import run_coldstart

    run_coldstart(args)
    return 0


def cmd_experiments(args: argparse.Namespace) -> int:
    from model.experiment import ExperimentError, load_experiments, select_experiments

    try:
        chosen = select_experiments(args.pattern) if args.pattern else list(load_experiments().values())
    except ExperimentError as error:
        raise SystemExit(str(error)) from None
    width = max((len(e.name) for e in chosen), default=4)
    for e in chosen:
        options = ", ".join(f"{k}={v}" for k, v in {**e.train, **e.model_options}.items())
        print(f"{e.name:<{width}}  {e.model:<9} {e.variant:<12} {e.spec:<15} seeds {e.seeds:<3} "
              f"{e.out or '-'}  {options}")
    return 0


def register(subparsers) -> None:
    from model.experiment import MODEL_KINDS, VARIANTS

    def add_parser(name: str, **kwargs) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, formatter_class=ConfigDefaults, **kwargs)

    train = add_parser("train", help="train a CTR model (and its meta generator with --udg)")
    train.add_argument("--experiment", metavar="NAME",
                       help="a named experiment of experiments/experiments.toml (model, variant, data spec, "
                            "training options); options given here override it")
    add_data_arguments(train)
    add_model_arguments(train)
    add_train_arguments(train)
    config_option(train, "--meta-steps", type=int, help="meta generator steps", source=(*META_CONFIG, "steps"))
    config_option(train, "--meta-variant", choices=["tanh", "residual"],
                  help="tanh: Eq. 11; residual: the mean training-user UDG row plus a profile residual, its "
                       "shrinkage chosen on held-out training users", source=(*META_CONFIG, "variant"))
    train.add_argument("--no-meta", action="store_true", help="skip the meta generator")
    train.add_argument("--out", default="runs/model/checkpoint.pt")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=cmd_train)

    evaluate = add_parser("evaluate", help="AUC, log loss, RMSE and RIG of a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--split", nargs="+", default=["valid", "test", "cold"],
                          choices=["train", "valid", "test", "cold"])
    add_threads_argument(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    meta = add_parser("meta", help="(re)train the meta embedding generator of a UDG checkpoint")
    meta.add_argument("checkpoint")
    for name, kind in (("steps", int), ("alpha", float), ("beta", float), ("gamma", float), ("seed", int)):
        config_option(meta, f"--{name}", type=kind, help=f"MetaConfig.{name}", source=(*META_CONFIG, name))
    config_option(meta, "--variant", choices=["tanh", "residual"],
                  help="tanh: Eq. 11; residual: the mean training-user UDG row plus a profile residual, its "
                       "shrinkage chosen on held-out training users", source=(*META_CONFIG, "variant"))
    add_threads_argument(meta)
    meta.set_defaults(handler=cmd_meta)

    gates = add_parser("gates", help="what a +UDG checkpoint's gates learned: per-layer spread, "
                                     "between-user share, AUC without personalised gates")
    gates.add_argument("checkpoint")
    gates.add_argument("--split", default="test", choices=["train", "valid", "test"])
    add_threads_argument(gates)
    gates.set_defaults(handler=cmd_gates)

    report = add_parser("report", help="multi-seed comparison tables and plot (paper Tables 2-3)")
    report.add_argument("--experiments", metavar="NAMES",
                        help="named experiments (comma-separated names or globs, e.g. 'movielens/*') of "
                             "experiments/experiments.toml: their grids' models, variants, data, seeds, options "
                             "and output folders; options given here override them")
    add_data_arguments(report)
    report.add_argument("--models", default=None, help=f"comma-separated model kinds of {', '.join(MODEL_KINDS)} "
                                                       "(default: pnn)")
    report.add_argument("--variants", default=None,
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: base,udg,double); "
                             "udg = the paper's gates, double = 2x embedding")
    report.add_argument("--seeds", type=int, default=None, help="seeds per run (default: 5, or the grid's)")
    config_option(report, "--epochs", type=int, help="most epochs per run", source=(*TRAIN_CONFIG, "epochs"))
    config_option(report, "--embed-wd", type=float, help="L2 weight decay on embedding tables",
                  source=(*TRAIN_CONFIG, "embed_weight_decay"))
    add_threads_argument(report)
    config_option(report, "--device", source=(*TRAIN_CONFIG, "device"),
                  help='torch device to train on, e.g. "cuda" (a separate setup in the journal: runs on another '
                       'device are not paired with CPU runs)')
    report.add_argument("--out", default=None, help="output folder (default: results/report, or the grid's)")
    report.add_argument("--fresh", action="store_true",
                        help="discard the runs journal of --out instead of reusing its finished runs")
    report.add_argument("--summary-only", action="store_true",
                        help="train nothing: tables and plot from the journal's finished runs (a grid in progress)")
    report.set_defaults(handler=cmd_report)

    experiments = add_parser("experiments", help="list the named experiments of experiments/experiments.toml")
    experiments.add_argument("pattern", nargs="?", help="comma-separated names or globs, e.g. 'shop/*'")
    experiments.set_defaults(handler=cmd_experiments)

    from model.coldstart import add_arguments as add_coldstart_arguments

    coldstart = add_parser("coldstart", help="new users: cold start and warm-up a, b, c with meta, "
                                             "random and mean-row UDG embeddings (paper Table 5, Fig. 4)")
    add_coldstart_arguments(coldstart)
    coldstart.set_defaults(handler=cmd_coldstart)
