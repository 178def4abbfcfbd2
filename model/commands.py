"""`udg train | evaluate | meta | gates | report | coldstart` — the training side of the command line.

Handlers import torch lazily: this module is imported by every `udg` invocation, including on the serving
install.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("udg")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--spec", default="movielens-100k",
                       help="dataset spec: a built-in name (movielens-100k, synthetic, shop) or a TOML/YAML file")
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


def data_spec(args: argparse.Namespace):
    """The dataset spec these arguments name, with their overrides applied."""
    from dataset.spec import SpecError, load_spec

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = _value(value.strip())
    for option, key in (("synthetic_users", "generator.params.users"), ("synthetic_items", "generator.params.items"),
                        ("grouplens_dir", "generator.params.grouplens_dir"), ("max_history", "behavior.max_length"),
                        ("cold_users", "split.cold_user_frac"), ("split_seed", "split.seed")):
        value = getattr(args, option, None)
        if value is not None:
            overrides[key] = str(Path(value).resolve()) if option == "grouplens_dir" else value
    try:
        spec = load_spec(args.spec)
        if any(k.startswith("generator.") for k in overrides) and spec.generator is None:
            raise SystemExit(f"{args.spec}: generator options given, but this spec reads files (no generator)")
        return spec.with_overrides(**overrides) if overrides else spec
    except SpecError as error:
        raise SystemExit(str(error)) from None


def load_data(spec):
    """Ingest a spec; bad data ends the command with its message (file, column, row)."""
    from dataset.errors import DataError
    from dataset.ingest import prepare

    try:
        return prepare(spec)
    except DataError as error:
        raise SystemExit(f"bad data: {error}") from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="pnn", help="pnn, deepfm, wide_deep, din, dien")
    group.add_argument("--preset", default=None, help="base, udg, udg-detach, udg-official (see model/experiment.py)")
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
    from model.experiment import model_config, udg_preset

    preset = args.preset or (udg_preset(args.model) if args.udg else "base")
    overrides = {
        "embed_dim": args.embed_dim, "udg_dim": args.udg_dim, "gate_input": args.gate_input,
        "gate_scale": args.gate_scale, "gate_detach": args.gate_detach,
        "gate_output_layer": args.gate_output_layer, "dropout": args.dropout,
        "hidden": tuple(int(x) for x in args.hidden.split(",")) if args.hidden else None,
    }
    return model_config(args.model, preset, **{k: v for k, v in overrides.items() if v is not None})


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=30)
    group.add_argument("--batch-size", type=int, default=1024)
    group.add_argument("--lr", type=float, default=1e-3)
    group.add_argument("--embed-wd", type=float, default=3e-3, help="L2 weight decay on embedding tables")
    group.add_argument("--patience", type=int, default=3)
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--threads", type=int, default=None,
                       help="torch threads (default 2; under torchrun the node's cores shared among its ranks)")
    group.add_argument("--device", default="cpu", help='torch device to train on, e.g. "cuda"')
    group.add_argument("--dist-backend", choices=["gloo", "nccl"], default=None,
                       help="under torchrun: the DDP backend (default nccl on CUDA, gloo on CPU; docs/training.md)")


def train_config_from(args: argparse.Namespace):
    from model.train import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, embed_weight_decay=args.embed_wd,
                       patience=args.patience, seed=args.seed, threads=args.threads, device=args.device)


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def run_training(args: argparse.Namespace) -> tuple[Path, dict]:
    """Train a model (and, for UDG, its meta generator) and write the checkpoint; returns (path, metrics)."""
    import torch

    from model.checkpoint import Checkpoint, MetaState
    from model.distributed import Distributed
    from model.meta import MetaConfig, cold_start_metrics, train_meta
    from model.train import train_model

    dist = Distributed.from_environment(getattr(args, "dist_backend", None), args.device)
    args.threads, args.device = dist.threads(args.threads), dist.device(args.device)
    torch.set_num_threads(args.threads)
    spec = data_spec(args)
    dist.materialise_first(spec)
    data = load_data(spec)
    model_config = model_config_from(args)
    train_config = train_config_from(args)
    log.info("training %s%s on %s (%d train events)", model_config.kind, "+UDG" if model_config.udg else "",
             spec.name, len(data.splits["train"]))
    model, metrics = train_model(data, model_config, train_config, progress=not args.quiet and dist.is_main,
                                 dist=dist)
    meta = None
    # The meta generator and the checkpoint on rank 0 alone; the other ranks wait for the file at the barrier.
    if dist.is_main and model_config.udg and not args.no_meta:
        generator, info = train_meta(model, data, MetaConfig(steps=args.meta_steps, seed=args.seed),
                                     progress=not args.quiet)
        if len(data.splits["cold"]):
            info["cold_start"] = {
                "random_init": cold_start_metrics(model, None, data.splits["cold"], seed=args.seed),
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
    import torch

    from model.train import evaluate

    torch.set_num_threads(args.threads)
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
    import torch

    from model.checkpoint import MetaState
    from model.meta import MetaConfig, cold_start_metrics, train_meta

    torch.set_num_threads(args.threads)
    checkpoint, model, data = load_checkpoint_and_data(args.checkpoint)
    config = MetaConfig(steps=args.steps, alpha=args.alpha, beta=args.beta, gamma=args.gamma, seed=args.seed)
    try:
        generator, info = train_meta(model, data, config)
    except TypeError as error:
        raise SystemExit(f"{args.checkpoint}: {error}") from None
    if len(data.splits["cold"]):
        info["cold_start"] = {"random_init": cold_start_metrics(model, None, data.splits["cold"], seed=args.seed),
                              "meta": cold_start_metrics(model, generator, data.splits["cold"])}
        for name, values in info["cold_start"].items():
            print(f"cold-start users ({name}):", format_metrics(values))
    checkpoint.with_meta(MetaState(generator.state_dict(), info)).save(Path(args.checkpoint))
    print(f"meta generator ({info['config']['steps']} steps, final loss {info['final_loss']:.4f}) saved in "
          f"{args.checkpoint}")
    return 0


def cmd_gates(args: argparse.Namespace) -> int:
    from model.gate_stats import cmd_gates as run

    return run(args)


def cmd_report(args: argparse.Namespace) -> int:
    from model.report import run_report

    run_report(args)
    return 0


def cmd_coldstart(args: argparse.Namespace) -> int:
    from model.coldstart import run_coldstart

    run_coldstart(args)
    return 0


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a CTR model (and its meta generator with --udg)")
    add_data_arguments(train)
    add_model_arguments(train)
    add_train_arguments(train)
    train.add_argument("--meta-steps", type=int, default=1500)
    train.add_argument("--no-meta", action="store_true", help="skip the meta generator")
    train.add_argument("--out", default="runs/model/checkpoint.pt")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=cmd_train)

    evaluate = subparsers.add_parser("evaluate", help="AUC, log loss, RMSE and RIG of a checkpoint")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--split", nargs="+", default=["valid", "test", "cold"],
                          choices=["train", "valid", "test", "cold"])
    evaluate.add_argument("--threads", type=int, default=2)
    evaluate.set_defaults(handler=cmd_evaluate)

    meta = subparsers.add_parser("meta", help="(re)train the meta embedding generator of a UDG checkpoint")
    meta.add_argument("checkpoint")
    meta.add_argument("--steps", type=int, default=1500)
    meta.add_argument("--alpha", type=float, default=0.1)
    meta.add_argument("--beta", type=float, default=1e-3)
    meta.add_argument("--gamma", type=float, default=0.1)
    meta.add_argument("--seed", type=int, default=0)
    meta.add_argument("--threads", type=int, default=2)
    meta.set_defaults(handler=cmd_meta)

    gates = subparsers.add_parser("gates", help="what a +UDG checkpoint's gates learned: per-layer spread, "
                                                "between-user share, AUC without personalised gates")
    gates.add_argument("checkpoint")
    gates.add_argument("--split", default="test", choices=["train", "valid", "test"])
    gates.add_argument("--threads", type=int, default=2)
    gates.set_defaults(handler=cmd_gates)

    report = subparsers.add_parser("report", help="multi-seed comparison tables and plot (paper Tables 2-3)")
    add_data_arguments(report)
    report.add_argument("--models", default="pnn", help="comma-separated model kinds")
    report.add_argument("--variants", default="base,udg,double",
                        help="base, udg (the paper's gates), udg-detach, udg-official, double (2x embedding)")
    report.add_argument("--seeds", type=int, default=5)
    report.add_argument("--epochs", type=int, default=30)
    report.add_argument("--embed-wd", type=float, default=3e-3)
    report.add_argument("--threads", type=int, default=2)
    report.add_argument("--device", default="cpu",
                        help='torch device to train on, e.g. "cuda" (a separate setup in the journal: runs on '
                             'another device are not paired with CPU runs)')
    report.add_argument("--out", default="results/report")
    report.add_argument("--fresh", action="store_true",
                        help="discard the runs journal of --out instead of reusing its finished runs")
    report.add_argument("--summary-only", action="store_true",
                        help="train nothing: tables and plot from the journal's finished runs (a grid in progress)")
    report.set_defaults(handler=cmd_report)

    from model.coldstart import add_arguments as add_coldstart_arguments

    coldstart = subparsers.add_parser("coldstart", help="new users: cold start and warm-up a, b, c with meta, "
                                                        "random and mean-row UDG embeddings (paper Table 5, Fig. 4)")
    add_coldstart_arguments(coldstart)
    coldstart.set_defaults(handler=cmd_coldstart)
