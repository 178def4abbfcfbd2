"""`udg export` (checkpoint -> versioned ONNX artifact) and `udg bench model` (scoring-graph benchmark).

Handlers import torch lazily: this module is imported by every `udg` invocation, including on the serving
install.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    from export.onnx_export import export_artifact
    from export.quantize import Int8Refused
    from model.commands import set_threads
    from repository import read_manifest

    set_threads(args)
    try:
        path = export_artifact(Path(args.checkpoint), args.version, Path(args.out), overwrite=args.force,
                               int8=args.int8, int8_auc_tolerance=args.int8_auc_tolerance)
    except Int8Refused as error:
        print(f"udg export: {error}", file=sys.stderr)
        return 2
    manifest = read_manifest(path)
    print(f"version {manifest['version']}: {path}")
    for name, info in manifest["files"].items():
        print(f"  {name:14s} {info['bytes']:>12,d} bytes  sha256 {info['sha256'][:16]}…")
    print(f"  parity vs PyTorch (max abs diff): scorer {manifest['export_parity']['scorer_max_abs_diff']:.2e}, "
          f"meta {manifest['export_parity']['meta_max_abs_diff']:.2e}")
    check = manifest["graphs"].get("scorer_int8", {}).get("validation")
    if check:
        print(f"  int8 scorer: validation AUC {check['auc_fp32']:.5f} -> {check['auc_int8']:.5f} "
              f"({check['auc_delta']:+.5f}, tolerance {check['tolerance']}) on {check['events']:,} events"
              if check["events"] else f"  int8 scorer: validation AUC not measured ({check['reason']})")
    if args.check:
        from export.runtime import open_artifact

        artifact = open_artifact(path, providers=["CPUExecutionProvider"], threads=1)
        print(f"  reopened with export.runtime: checksums and golden outputs ok ({artifact.provider})")
    return 0


def cmd_bench_model(args: argparse.Namespace) -> int:
    from loadtest.bench_model import main as bench_main

    argv = [args.checkpoint] if args.checkpoint else []
    argv += ["--threads", args.threads, "--repeats", str(args.repeats)]
    if args.sizes:
        argv += ["--sizes", args.sizes]
    if args.kinds:
        argv += ["--kinds", args.kinds]
    if args.kinds_from:
        argv += ["--kinds-from", args.kinds_from]
    if args.session_options:
        argv.append("--session-options")
    if args.quick:
        argv.append("--quick")
    for graph in args.graph:
        argv += ["--graph", graph]
    if args.rounds != 1:
        argv += ["--rounds", str(args.rounds)]
    if args.json:
        argv += ["--json", args.json]
    if args.report:
        argv = ["--report", args.report]
    return bench_main(argv)


def _tolerance(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: an AUC move between 0 and 1")
    return value


def register(subparsers) -> None:
    from export.quantize import INT8_AUC_TOLERANCE
    from model.commands import add_threads_argument

    export = subparsers.add_parser("export", help="checkpoint -> MODEL_REPO/VERSION/ (ONNX graphs + manifest)")
    export.add_argument("checkpoint")
    export.add_argument("--version", required=True, help="version directory name, e.g. 2024-06-01a or v3")
    export.add_argument("--out", required=True, help="model repository directory (MODEL_REPO)")
    export.add_argument("--force", action="store_true", help="replace an existing version (atomically)")
    add_threads_argument(export)
    export.add_argument("--int8", action="store_true",
                        help="also write scorer.int8.onnx (int8 weight matmuls; served with UDG_SCORER_PRECISION=int8)")
    export.add_argument("--int8-auc-tolerance", type=_tolerance, default=INT8_AUC_TOLERANCE, metavar="DELTA",
                        help="with --int8: refuse the int8 scorer if it moves validation AUC by more (default "
                             f"{INT8_AUC_TOLERANCE})")
    export.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                        help="reopen the written version with export.runtime (default: on)")
    export.set_defaults(handler=cmd_export)

    bench = subparsers.add_parser("bench", help="micro-benchmarks that print tables")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    model = bench_sub.add_parser("model", help="scoring graph: onnxruntime vs PyTorch eager, latency and GFLOP/s")
    model.add_argument("checkpoint", nargs="?", default=None,
                       help="a UDG checkpoint (default: train a tiny synthetic model first)")
    model.add_argument("--sizes", default=None,
                       help="candidate counts (default 1,100,500,1000,5000; 100,1000 for --kinds)")
    model.add_argument("--kinds", default=None,
                       help="also a latency table per model kind: comma list or 'all' (trains tiny models)")
    model.add_argument("--kinds-from", default=None,
                       help="with --kinds: load DIR/<kind>.pt instead of training (trained, saved there if missing)")
    model.add_argument("--session-options", action="store_true",
                       help="with --kinds: also time each onnxruntime session-option variant per kind")
    model.add_argument("--threads", default="1,2")
    model.add_argument("--repeats", type=int, default=200)
    model.add_argument("--quick", action="store_true", help="fewer repeats, skip the variants")
    model.add_argument("--graph", action="append", default=[], metavar="NAME=FILE",
                       help="also time this ONNX graph (the serving graph's inputs) as variant ort-NAME (repeatable)")
    model.add_argument("--rounds", type=int, default=1,
                       help="time the single model's graphs in this many rounds of alternating order")
    model.add_argument("--json", default=None, help="also write the results here (the journal)")
    model.add_argument("--report", default=None, help="print the tables of a journal written by --json; no run")
    model.set_defaults(handler=cmd_bench_model)
