"""`udg data | train | evaluate | meta | report` — the training side of the command line.

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
    group.add_argument("--data", default="movielens", choices=["movielens", "synthetic"])
    group.add_argument("--data-path", default=None, help="GroupLens (u.data…) or RecBole (ml-100k.inter…) dir")
    group.add_argument("--synthetic-users", type=int, default=None)
    group.add_argument("--synthetic-items", type=int, default=None)
    group.add_argument("--max-history", type=int, default=50)
    group.add_argument("--cold-users", type=float, default=0.0,
                       help="share of users held out of training entirely (cold-start evaluation)")
    group.add_argument("--split-seed", type=int, default=0)


def data_spec(args: argparse.Namespace):
    from model.experiment import DataSpec

    synthetic = {}
    if args.synthetic_users:
        synthetic["users"] = args.synthetic_users
    if args.synthetic_items:
        synthetic["items"] = args.synthetic_items
    return DataSpec(name=args.data, path=args.data_path, synthetic=synthetic, max_history=args.max_history,
                    cold_user_frac=args.cold_users, split_seed=args.split_seed)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default="pnn", help="pnn, deepfm, wide_deep, din, dien")
    group.add_argument("--preset", default=None, help="base, udg, udg-detach, udg-official (see model/experiment.py)")
    group.add_argument("--udg", action="store_true",
                       help="wrap the base model with UDG, in the gate preset shipped for --model (see README)")
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
    group.add_argument("--threads", type=int, default=2)
    group.add_argument("--device", default="cpu", help='torch device to train on, e.g. "cuda"')


def train_config_from(args: argparse.Namespace):
    from model.train import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, embed_weight_decay=args.embed_wd,
                       patience=args.patience, seed=args.seed, threads=args.threads, device=args.device)


def format_metrics(metrics: dict) -> str:
    return "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def cmd_data(args: argparse.Namespace) -> int:
    from model.datasets import cache_dir, fetch_movielens_100k

    if args.data == "movielens" and args.data_path is None:
        directory = fetch_movielens_100k()
        print(f"cache: {cache_dir()}  (set UDG_CACHE_DIR to move it)")
        for path in sorted(directory.iterdir()):
            print(f"  {path.name:16s} {path.stat().st_size:>10,d} bytes  sha256 verified")
    prepared = data_spec(args).load()
    print(json.dumps(prepared.raw.stats(), indent=2))
    print("splits:", {name: len(s) for name, s in prepared.splits.items()},
          f"vocab: users={len(prepared.space.users)} items={len(prepared.space.items)} "
          f"genres={len(prepared.space.genres)} (incl. pad and OOV rows)")
    return 0


def run_training(args: argparse.Namespace) -> tuple[Path, dict]:
    """Train a model (and, for UDG, its meta generator) and write the checkpoint; returns (path, metrics)."""
    import torch

    from model.meta import MetaConfig, cold_start_metrics, train_meta
    from model.train import save_checkpoint, train_model, user_snapshot

    torch.set_num_threads(args.threads)
    spec = data_spec(args)
    data = spec.load()
    model_config = model_config_from(args)
    train_config = train_config_from(args)
    log.info("training %s%s on %s (%d train events)", model_config.kind, "+UDG" if model_config.udg else "",
             spec.name, len(data.splits["train"]))
    model, metrics = train_model(data, model_config, train_config, progress=not args.quiet)
    meta = None
    if model_config.udg and not args.no_meta:
        generator, info = train_meta(model, data, MetaConfig(steps=args.meta_steps, seed=args.seed),
                                     progress=not args.quiet)
        meta = {"state_dict": generator.state_dict(), **info}
        if len(data.splits["cold"]):
            meta["cold_start"] = {
                "random_init": cold_start_metrics(model, None, data.splits["cold"], seed=args.seed),
                "meta": cold_start_metrics(model, generator, data.splits["cold"]),
            }
    out = Path(args.out)
    save_checkpoint(out, model, model_config, train_config, data.space, metrics, users=user_snapshot(data),
                    meta=meta, dataset=spec.to_json())
    metrics["meta"] = {k: v for k, v in (meta or {}).items() if k != "state_dict"}
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
    print_training_summary(path, metrics)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from model.experiment import DataSpec
    from model.train import evaluate, load_checkpoint

    torch.set_num_threads(args.threads)
    model, payload = load_checkpoint(Path(args.checkpoint))
    data = DataSpec(**payload["dataset"]).load()
    if data.space.items.tokens != payload["space_obj"].items.tokens:
        raise SystemExit("the data no longer matches the checkpoint's vocabulary; was the data set changed?")
    for split in args.split:
        if len(data.splits[split]) == 0:
            print(f"{split}: (empty)")
            continue
        if split == "cold":
            from model.meta import MetaGenerator, cold_start_metrics
            generator = None
            if payload.get("meta"):
                generator = MetaGenerator(data.space, payload["model_config_obj"].udg_dim)
                generator.load_state_dict(payload["meta"]["state_dict"])
            print(f"{split}:", format_metrics(cold_start_metrics(model, generator, data.splits[split])))
        else:
            print(f"{split}:", format_metrics(evaluate(model, data.splits[split])))
    return 0


def cmd_meta(args: argparse.Namespace) -> int:
    import torch

    from model.experiment import DataSpec
    from model.meta import MetaConfig, cold_start_metrics, train_meta
    from model.train import load_checkpoint

    torch.set_num_threads(args.threads)
    path = Path(args.checkpoint)
    model, payload = load_checkpoint(path)
    data = DataSpec(**payload["dataset"]).load()
    config = MetaConfig(steps=args.steps, alpha=args.alpha, beta=args.beta, gamma=args.gamma, seed=args.seed)
    generator, info = train_meta(model, data, config)
    meta = {"state_dict": generator.state_dict(), **info}
    if len(data.splits["cold"]):
        meta["cold_start"] = {"random_init": cold_start_metrics(model, None, data.splits["cold"], seed=args.seed),
                              "meta": cold_start_metrics(model, generator, data.splits["cold"])}
        for name, values in meta["cold_start"].items():
            print(f"cold-start users ({name}):", format_metrics(values))
    payload["meta"] = meta
    for key in ("model_config_obj", "space_obj"):
        payload.pop(key)
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    print(f"meta generator ({info['config']['steps']} steps, final loss {info['final_loss']:.4f}) saved in {path}")
    return 0


def cmd_gates(args: argparse.Namespace) -> int:
    from model.gate_stats import cmd_gates as run

    return run(args)


def cmd_report(args: argparse.Namespace) -> int:
    from model.report import run_report

    run_report(args)
    return 0


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="fetch/verify MovieLens-100K and print data statistics")
    add_data_arguments(data)
    data.set_defaults(handler=cmd_data)

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
