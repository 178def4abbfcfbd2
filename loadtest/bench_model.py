"""Scoring-graph micro-benchmark: onnxruntime vs PyTorch eager, one user and N candidates per call.

    .venv/bin/python -m loadtest.bench_model [CHECKPOINT] [--sizes 1,100,500,1000,5000] [--threads 1,2]
    .venv/bin/python -m loadtest.bench_model --kinds all [--sizes 100,1000] [--threads 1,2]
    udg bench model [CHECKPOINT]

Prints, in one run (so the numbers are comparable):
  1. per-call latency median / p99 and candidates/s for each N, onnxruntime (fp32 fused graph) vs PyTorch
     eager (`model.score` + sigmoid under inference_mode), 1 and 2 threads, with the ratio ort/torch;
  2. an sgemm baseline (torch.mm 1024^3, same thread counts) and the graph's achieved GFLOP/s, from the
     FLOPs per candidate counted on the model's layers (torch.utils.flop_counter at two N, differenced);
  3. what broadcasting the user side saves: the same graph with the user side expanded to N rows first
     (every user-side layer, incl. the user halves of the split first gate/MLP layers, run per candidate);
  4. quantised variants (onnxruntime dynamic int8; fp16 where the converter is installed): speed-up and
     validation AUC next to the fp32 graph's.
Without CHECKPOINT a tiny UDG-PNN is trained on synthetic data first.

With --kinds (a comma list of model kinds, or "all"), a per-kind table: for each kind a tiny +UDG model
(model_config(kind, "udg"), trained as the default tiny model is; DIEN for one epoch only) is exported to
ONNX and timed, ORT vs PyTorch eager, at each N of --sizes (default there 100,1000) and each thread count.
--kinds without CHECKPOINT prints only that table; with one, sections 1-4 for the checkpoint come first.
Not a test: it only prints tables.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_model")

DEFAULT_SIZES = "1,100,500,1000,5000"
KIND_SIZES = "100,1000"  # the per-kind section's default --sizes
ALL_KINDS = ("pnn", "deepfm", "wide_deep", "din", "dien")
TINY_SYNTHETIC = {"users": 1000, "items": 300, "events_per_user": 30}
TINY_EPOCHS = {"dien": 1}  # default 3; DIEN's GRU + AUGRU over the history dominate CPU training time


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_calls(fn, n_calls: int, budget_s: float = 3.0) -> list[float]:
    """Per-call wall times in seconds, after warm-up; stops early when the time budget is spent."""
    for _ in range(5):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for _ in range(n_calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if len(times) >= 20 and time.perf_counter() > deadline:
            break
    return times


def sgemm_gflops(threads: int, size: int = 1024, repeats: int = 10) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops_per_candidate(module, args_for_n) -> tuple[float, float]:
    """(FLOPs per candidate, per-request FLOPs) of matmul-like ops, from two candidate counts."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for n in (1000, 2000):
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            module(*args_for_n(n))
        counts.append(counter.get_total_flops())
    per_candidate = (counts[1] - counts[0]) / 1000
    return per_candidate, counts[0] - 1000 * per_candidate


def ort_session(blob_or_path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(blob_or_path, options, providers=["CPUExecutionProvider"])


def quantized_variants(blob: bytes, workdir: Path) -> dict[str, bytes]:
    """{"int8": ..., "fp16": ...} for whichever converters this install has."""
    out = {}
    source = workdir / "scorer.onnx"
    source.write_bytes(blob)
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        target = workdir / "scorer.int8.onnx"
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
        out["int8"] = target.read_bytes()
    except Exception as error:  # pragma: no cover - depends on the install
        log.warning("int8 quantisation unavailable: %s", error)
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load_from_string(blob), keep_io_types=True)
        out["fp16"] = model.SerializeToString()
    except Exception as error:  # pragma: no cover - depends on the install
        log.warning("fp16 conversion unavailable: %s", error)
    return out


def tiny_data_spec(**params):
    """The synthetic world the tiny benchmark models are trained on (`generator.params` overrides)."""
    from dataset.spec import load_spec

    overrides = {f"generator.params.{k}": v for k, v in {**TINY_SYNTHETIC, **params}.items()}
    return load_spec("synthetic").with_overrides(**overrides)


def tiny_data(**params):
    """The tiny benchmark data, ingested (see `tiny_data_spec`)."""
    from dataset.ingest import prepare

    return prepare(tiny_data_spec(**params))


def train_tiny(kind: str, data, epochs: int | None = None):
    """(model in eval mode, Checkpoint): a +UDG model of `kind` (model_config(kind, "udg")) fitted on `data`."""
    from model.checkpoint import Checkpoint
    from model.experiment import model_config
    from model.train import TrainConfig, train_model

    config = model_config(kind, "udg")
    epochs = epochs if epochs is not None else TINY_EPOCHS.get(kind, 3)
    train_config = TrainConfig(epochs=epochs)
    model, metrics = train_model(data, config, train_config, progress=False)
    return model.eval(), Checkpoint.from_training(model, config, train_config, data, metrics)


def load_or_train(checkpoint: str | None):
    """(model, Checkpoint, validation Samples or None)."""
    import torch

    if checkpoint:
        from dataset.ingest import prepare
        from model.checkpoint import Checkpoint

        loaded = Checkpoint.load(Path(checkpoint))
        valid = None
        try:
            valid = prepare(loaded.spec).splits["valid"]
        except Exception as error:  # data not available here: skip the AUC columns
            log.warning("validation data unavailable (%s): AUC columns skipped", error)
        return loaded.build_model(), loaded, valid
    torch.set_num_threads(2)
    data = tiny_data()
    model, checkpoint = train_tiny("pnn", data)
    return model, checkpoint, data.splits["valid"]


class Requests:
    """One user (id 2, profile all 2s), one random full-length history and N random candidates (with their
    item fields) per call: the scoring graph's torch arguments, its onnxruntime feeds, and the eager call."""

    def __init__(self, model, schema, seed: int = 0):
        import torch

        from model.serving import scorer_graph

        self.model = model
        self.udg = model.udg_dim > 0
        self.graph = scorer_graph(model, schema)
        self.names = self.graph.input_names
        self.rng = np.random.default_rng(seed)
        self.n_items = schema.items.known_size
        profile = torch.full((1, len(schema.user_fields)), 2, dtype=torch.long)
        with torch.inference_mode():
            self.user_vec, self.udg_vec = model.user_state(torch.tensor([2]), profile)
        self.history = torch.as_tensor(self.rng.integers(2, self.n_items, size=(1, schema.max_history)),
                                       dtype=torch.long)

    def torch_args(self, n: int) -> tuple:
        import torch

        candidates = torch.as_tensor(self.rng.integers(2, self.n_items, size=n), dtype=torch.long)
        fields = self.model.base_model.lookup_items(candidates).fields
        user = (self.user_vec, self.udg_vec) if self.udg else (self.user_vec,)
        return (*user, self.history, candidates, *fields)

    def feeds(self, targs: tuple) -> dict:
        return {name: t.numpy() for name, t in zip(self.names, targs, strict=True)}

    def eager(self, targs: tuple):
        return self.graph.module(*targs)


def calls_for(n: int, repeats: int) -> int:
    return max(20, repeats if n <= 1000 else repeats // 4)


def time_engines(requests: Requests, sessions: dict, targs: tuple, calls: int) -> dict[str, list[float]]:
    """{"torch": per-call seconds of PyTorch eager, name: ... of each onnxruntime session} on one request."""
    import torch

    with torch.inference_mode():
        out = {"torch": time_calls(lambda: requests.eager(targs), calls)}
    feeds = requests.feeds(targs)
    for name, session in sessions.items():
        out[name] = time_calls(lambda session=session: session.run(None, feeds), calls)
    return out


def validation_auc(run_row, model, valid, udg: bool, tables: dict) -> float:
    """AUC of a graph on the validation split, one call per event (each event has its own history)."""
    import torch

    from model.metrics import auc

    with torch.inference_mode():
        user_vec, udg_vec = model.user_state(torch.as_tensor(valid.user), torch.as_tensor(valid.profile))
    user_vec = user_vec.numpy()
    udg_vec = udg_vec.numpy() if udg_vec is not None else None
    fields = {f"candidate_{name}": table for name, table in tables.items()}
    history = valid.history
    scores = np.empty(len(valid), np.float32)
    for i in range(len(valid)):
        feeds = {"user_vec": user_vec[i:i + 1], "history": history[i:i + 1],
                 "candidates": valid.item[i:i + 1],
                 **{name: table[valid.item[i:i + 1]] for name, table in fields.items()}}
        if udg:
            feeds["udg_vec"] = udg_vec[i:i + 1]
        scores[i] = run_row(feeds)[0]
    return auc(valid.label, scores)


def parse_kinds(text: str) -> list[str]:
    if text.strip() == "all":
        return list(ALL_KINDS)
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ALL_KINDS]
    if unknown or not kinds:
        raise ValueError(f"--kinds: unknown {unknown or text!r}; choose from {', '.join(ALL_KINDS)} or 'all'")
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None)
    parser.add_argument("--sizes", default=None,
                        help=f"candidates per call (default {DEFAULT_SIZES}; with --kinds {KIND_SIZES})")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="fewer repeats; skip variants and AUC")
    parser.add_argument("--kinds", default=None,
                        help=f"per-kind table for tiny +UDG models of these kinds ({','.join(ALL_KINDS)} or all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        kinds = parse_kinds(args.kinds) if args.kinds else []
    except ValueError as error:
        parser.error(str(error))
    thread_counts = [int(t) for t in args.threads.split(",")]
    repeats = 30 if args.quick else args.repeats
    summary: dict = {}
    if args.checkpoint or not kinds:
        sizes = [int(s) for s in (args.sizes or DEFAULT_SIZES).split(",")]
        summary = bench_single(args.checkpoint, sizes, thread_counts, repeats, args.quick)
    if kinds:
        sizes = [int(s) for s in (args.sizes or KIND_SIZES).split(",")]
        rows = bench_kinds(kinds, sizes, thread_counts, repeats)
        print_kind_table(rows)
        summary["kinds"] = [summarise_row(row) for row in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


def bench_single(checkpoint: str | None, sizes: list[int], thread_counts: list[int], repeats: int,
                 quick: bool) -> dict:
    """Sections 1-4 for one model (CHECKPOINT or the default tiny UDG-PNN); returns the JSON summary."""
    import onnxruntime as ort
    import torch

    from export.onnx_export import export_scorer
    from model.serving import scorer_graph

    model, checkpoint_obj, valid = load_or_train(checkpoint)
    model.eval()
    schema = checkpoint_obj.schema
    udg = model.udg_dim > 0
    config = checkpoint_obj.model_config
    print(f"model: {config.kind}{'+UDG' if udg else ''}  embed_dim={config.embed_dim} hidden={list(config.hidden)} "
          f"udg_dim={config.udg_dim if udg else 0} gate_hidden={config.gate_hidden if udg else 0}  "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}")

    requests = Requests(model, schema)
    graph = requests.graph.module
    per_candidate_graph = scorer_graph(model, schema, per_candidate=True).module
    flops, per_request = flops_per_candidate(graph, requests.torch_args)
    flops_naive, _ = flops_per_candidate(per_candidate_graph, requests.torch_args)
    print(f"FLOPs per candidate (matmul-like ops): {flops / 1e3:.1f} k broadcast graph, {flops_naive / 1e3:.1f} k "
          f"with the user side per candidate; per request once: {per_request / 1e3:.1f} k")

    blob = export_scorer(model, schema)
    naive_blob = export_scorer(model, schema, per_candidate=True)
    variants: dict[str, bytes] = {}
    if not quick:
        with tempfile.TemporaryDirectory() as tmp:
            variants = quantized_variants(blob, Path(tmp))

    results: dict = {"flops_per_candidate": flops, "flops_per_candidate_per_candidate_graph": flops_naive,
                     "sgemm_gflops": {}, "rows": [], "variants": []}
    inputs = {n: requests.torch_args(n) for n in sizes}
    for threads in thread_counts:
        results["sgemm_gflops"][threads] = sgemm_gflops(threads)
        torch.set_num_threads(threads)
        sessions = {"ort": ort_session(blob, threads)}
        if not quick:
            sessions["ort-per-cand"] = ort_session(naive_blob, threads)
            for name, variant in variants.items():
                sessions[f"ort-{name}"] = ort_session(variant, threads)
        for n in sizes:
            row = {"threads": threads, "n": n, **time_engines(requests, sessions, inputs[n], calls_for(n, repeats))}
            results["rows"].append(row)
    torch.set_num_threads(max(thread_counts))

    print_tables(results, sizes, thread_counts, flops)
    if valid is not None and not quick and len(valid):
        print_variant_auc(results, blob, variants, model, valid, udg, torch, schema.item_table)
    return {**results, "rows": [summarise_row(row) for row in results["rows"]]}


def bench_kinds(kinds: list[str], sizes: list[int], thread_counts: list[int], repeats: int,
                data_spec=None) -> list[dict]:
    """Per kind: train a tiny +UDG model (`train_tiny`, with max(thread_counts) torch threads), export its
    scorer graph, then time ORT and PyTorch eager on the same requests at each N and thread count.
    Rows: {"kind", "n", "threads", "torch": [s], "ort": [s]}."""
    import torch

    from dataset.ingest import prepare
    from export.onnx_export import export_scorer

    data = prepare(data_spec) if data_spec is not None else tiny_data()
    rows = []
    for kind in kinds:
        torch.set_num_threads(max(thread_counts))
        start = time.perf_counter()
        model, checkpoint = train_tiny(kind, data)
        log.info("%s+UDG: %d parameters, valid AUC %.4f, trained in %.0f s", kind, checkpoint.metrics["parameters"],
                 checkpoint.metrics["valid"]["auc"], time.perf_counter() - start)
        blob = export_scorer(model, data.schema)
        requests = Requests(model, data.schema)
        sessions = {threads: ort_session(blob, threads) for threads in thread_counts}
        for n in sizes:
            targs = requests.torch_args(n)
            for threads in thread_counts:
                torch.set_num_threads(threads)
                timed = time_engines(requests, {"ort": sessions[threads]}, targs, calls_for(n, repeats))
                rows.append({"kind": kind, "n": n, "threads": threads, **timed})
    torch.set_num_threads(max(thread_counts))
    return rows


def summarise_row(row: dict) -> dict:
    """A timing row for JSON: each list of per-call seconds replaced by its summary."""
    return {k: (summarise(v) if isinstance(v, list) else v) for k, v in row.items()}


def summarise(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times) * 1e3, "p99_ms": percentile(times, 99) * 1e3, "calls": len(times)}


def print_tables(results: dict, sizes, thread_counts, flops: float) -> None:
    rows = results["rows"]
    sgemm = results["sgemm_gflops"]
    print("\nsgemm baseline (torch.mm 1024x1024x1024, best of 10): " +
          ", ".join(f"{t} thread{'s' if t > 1 else ''}: {g:.1f} GFLOP/s" for t, g in sgemm.items()))
    print("\n| threads | N | PyTorch median µs | p99 µs | ORT median µs | p99 µs | ORT cand/s | ORT/torch | "
          "ORT GFLOP/s | % sgemm |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        t, o = row["torch"], row["ort"]
        tm, om = statistics.median(t), statistics.median(o)
        gflops = flops * row["n"] / om / 1e9
        print(f"| {row['threads']} | {row['n']} | {tm * 1e6:,.0f} | {percentile(t, 99) * 1e6:,.0f} | {om * 1e6:,.0f} | "
              f"{percentile(o, 99) * 1e6:,.0f} | {row['n'] / om:,.0f} | {om / tm:.2f} | {gflops:.1f} | "
              f"{100 * gflops / sgemm[row['threads']]:.0f}% |")
    extra = [k for k in rows[0] if k.startswith("ort-")]
    if extra:
        print("\nVariants, median µs (speed-up vs the fp32 fused graph):")
        print("| threads | N | ORT fp32 | " + " | ".join(extra) + " |")
        print("|---:|---:|---:|" + "---:|" * len(extra))
        for row in rows:
            om = statistics.median(row["ort"])
            cells = [f"{statistics.median(row[k]) * 1e6:,.0f} ({om / statistics.median(row[k]):.2f}x)" for k in extra]
            print(f"| {row['threads']} | {row['n']} | {om * 1e6:,.0f} | " + " | ".join(cells) + " |")
    print("\nTargets (issue 3):")
    for threads in thread_counts:
        for n, limit in ((1, 0.25), (1000, 0.7)):
            row = next((r for r in rows if r["threads"] == threads and r["n"] == n), None)
            if row:
                ratio = statistics.median(row["ort"]) / statistics.median(row["torch"])
                print(f"  {threads} thr N={n}: ORT/torch {ratio:.2f} (target <= {limit}) "
                      f"{'OK' if ratio <= limit else 'MISSED'}")
        for row in rows:
            if row["threads"] == threads and row["n"] >= 1000:
                gflops = flops * row["n"] / statistics.median(row["ort"]) / 1e9
                share = gflops / sgemm[threads]
                print(f"  {threads} thr N={row['n']}: {gflops:.1f} GFLOP/s = {100 * share:.0f}% of sgemm "
                      f"(target >= 50%) {'OK' if share >= 0.5 else 'MISSED'}")


def print_kind_table(rows: list[dict]) -> None:
    print("\nPer model kind (tiny +UDG, one user and N candidates per call; ORT fp32 graph vs PyTorch eager):")
    print("| kind | N | threads | ort median ms | ort p99 | torch median ms | torch p99 | ort/torch |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        o, t = row["ort"], row["torch"]
        om, tm = statistics.median(o), statistics.median(t)
        print(f"| {row['kind']} | {row['n']} | {row['threads']} | {om * 1e3:.3f} | {percentile(o, 99) * 1e3:.3f} | "
              f"{tm * 1e3:.3f} | {percentile(t, 99) * 1e3:.3f} | {om / tm:.2f} |")


def print_variant_auc(results, blob, variants, model, valid, udg, torch, tables: dict) -> None:
    print(f"\nValidation AUC ({len(valid)} events, one call per event):")
    print("| graph | AUC | Δ vs fp32 |")
    print("|---|---:|---:|")
    session = ort_session(blob, 1)
    reference = validation_auc(lambda f: session.run(None, f)[0], model, valid, udg, tables)
    print(f"| ORT fp32 | {reference:.4f} | — |")
    results["variants"].append({"name": "fp32", "auc": reference})
    for name, variant in variants.items():
        session = ort_session(variant, 1)
        value = validation_auc(lambda f, session=session: session.run(None, f)[0], model, valid, udg, tables)
        results["variants"].append({"name": name, "auc": value})
        print(f"| ORT {name} | {value:.4f} | {value - reference:+.4f} |")


if __name__ == "__main__":
    raise SystemExit(main())
