"""Scoring-graph micro-benchmark: onnxruntime vs PyTorch eager, one user and N candidates per call.

    .venv/bin/python -m loadtest.bench_model [CHECKPOINT] [--sizes 1,100,500,1000,5000] [--threads 1,2]
    .venv/bin/python -m loadtest.bench_model --kinds all [--sizes 100,1000] [--threads 1,2] [--json J]
    .venv/bin/python -m loadtest.bench_model --report J     # the tables again, from a journal written by --json
    udg bench model [CHECKPOINT]

Prints, in one run (so the numbers are comparable):
  1. per-call latency median / p99 and candidates/s for each N, onnxruntime (the exported serving graph,
     `model.serving.ScorerModule`) vs PyTorch eager (`model.score` + sigmoid under inference_mode: the model as
     trained), 1 and 2 threads, with the ratio ort/torch;
  2. an sgemm baseline (torch.mm 1024^3, same thread counts) and the graph's achieved GFLOP/s, from the
     FLOPs per candidate counted on the model's layers (torch.utils.flop_counter at two N, differenced);
  3. variants: `ort-plain` (the graph `model.score` exports as it is: no one-user algebra, no stacked gate
     layers), `ort-per-cand` (the user side expanded to N rows first: every user-side layer run per
     candidate), int8 (onnxruntime dynamic quantisation of every weight matmul, Gemm nodes rewritten as MatMul
     first) and fp16 where the converter is installed: speed-up and validation AUC next to the fp32 graph's.
Without CHECKPOINT a tiny UDG-PNN is trained on synthetic data first.

With --kinds (a comma list of model kinds, or "all"), a per-kind table: for each kind a tiny +UDG model
(model_config(kind, "udg"), trained as the default tiny model is; DIEN for one epoch only) is exported to
ONNX and timed, ORT (serving graph, and the plain graph) vs PyTorch eager, at each N of --sizes (default there
100,1000) and each thread count, with kFLOP per candidate and the serving graph's GFLOP/s.
--kinds without CHECKPOINT prints only that table; with one, sections 1-3 for the checkpoint come first.
Not a test: it only prints tables (and the journal with --json).
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

from export.quantize import INT8_AUC_TOLERANCE, validation_auc

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


SGEMM_SIZE = 1024


def sgemm_times(threads: int, repeats: int = 10) -> list[float]:
    """Seconds per torch.mm of SGEMM_SIZE^3 on `threads` threads, `repeats` runs after warm-up."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(SGEMM_SIZE, SGEMM_SIZE), torch.randn(SGEMM_SIZE, SGEMM_SIZE)
    for _ in range(3):
        torch.mm(a, b)
    return [_timed(lambda: torch.mm(a, b)) for _ in range(repeats)]


def sgemm_gflops(times: list[float]) -> dict[str, float]:
    """{"best": GFLOP/s of the fastest run, "median": of their median, "runs"}. On a loaded machine the median
    is the one to compare a graph's median with."""
    flop = 2 * SGEMM_SIZE ** 3
    return {"best": flop / min(times) / 1e9, "median": flop / statistics.median(times) / 1e9, "runs": len(times)}


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


def ort_session(blob_or_path, threads: int, tuning=None):
    """A CPU session with the service's options (`export.runtime.session_options`), DEFAULT_TUNING unless
    `tuning` is given."""
    import onnxruntime as ort

    from export.runtime import DEFAULT_TUNING, session_options

    options = session_options(threads, tuning or DEFAULT_TUNING)
    return ort.InferenceSession(blob_or_path, options, providers=["CPUExecutionProvider"])


def tuning_variants() -> dict:
    """The session options measured against DEFAULT_TUNING by --session-options, each changing one thing."""
    from export.runtime import SessionTuning

    return {"spin-off": SessionTuning(spin=False), "opt-extended": SessionTuning(optimization="extended"),
            "opt-basic": SessionTuning(optimization="basic"), "parallel": SessionTuning(execution="parallel")}


def quantized_variants(blob: bytes, workdir: Path) -> dict[str, bytes]:
    """{"int8": ..., "fp16": ...} for whichever converters this install has."""
    out = {}
    try:
        from export.quantize import int8_scorer

        out["int8"] = int8_scorer(blob, workdir)
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
        self.eager_module = scorer_graph(model, schema, plain=True).module  # model.score + sigmoid
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
        return self.eager_module(*targs)


def calls_for(n: int, repeats: int) -> int:
    return max(20, repeats if n <= 1000 else repeats // 4)


def time_engines(requests: Requests, sessions: dict, targs: tuple, calls: int,
                 rounds: int = 1) -> dict[str, list[float]]:
    """{"torch": per-call seconds of PyTorch eager, name: ... of each onnxruntime session} on one request.
    With rounds > 1 the sessions are timed in that many rounds, in alternating order, so that a drift in the
    machine's load does not favour the session timed first."""
    import torch

    with torch.inference_mode():
        out = {"torch": time_calls(lambda: requests.eager(targs), calls)}
    time.sleep(0.3)  # let PyTorch's idle OpenMP threads stop spinning before onnxruntime is timed
    feeds = requests.feeds(targs)
    names = list(sessions)
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            times = time_calls(lambda session=sessions[name]: session.run(None, feeds), max(20, calls // rounds),
                               budget_s=3.0 / rounds)
            out.setdefault(name, []).extend(times)
    return out


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
    parser.add_argument("--kinds-from", default=None,
                        help="with --kinds: load DIR/<kind>.pt instead of training (trained, saved there if missing)")
    parser.add_argument("--session-options", action="store_true",
                        help="with --kinds: also time the serving graph under each onnxruntime session-option "
                             "variant (spinning off, lower optimisation levels, parallel execution)")
    parser.add_argument("--graph", action="append", default=[], metavar="NAME=FILE",
                        help="also time this ONNX graph (the serving graph's inputs; e.g. exported by an earlier "
                             "commit) as variant ort-NAME, in the same rounds (repeatable)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time the single model's graphs in this many rounds of alternating order (default 1)")
    parser.add_argument("--json", default=None, help="write the journal (every figure of the tables) here")
    parser.add_argument("--report", default=None, help="print the tables of a journal written by --json; no run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return 0

    try:
        kinds = parse_kinds(args.kinds) if args.kinds else []
    except ValueError as error:
        parser.error(str(error))
    graphs = {}
    for text in args.graph:
        name, _, file = text.partition("=")
        if not name or not file or not Path(file).is_file():
            parser.error(f"--graph {text!r}: expected NAME=FILE with an existing ONNX file")
        graphs[name] = file
    thread_counts = [int(t) for t in args.threads.split(",")]
    repeats = 30 if args.quick else args.repeats
    summary: dict = {"machine": machine_state()}
    if args.checkpoint or not kinds:
        sizes = [int(s) for s in (args.sizes or DEFAULT_SIZES).split(",")]
        summary.update(bench_single(args.checkpoint, sizes, thread_counts, repeats, args.quick, graphs,
                                    args.rounds))
    if kinds:
        sizes = [int(s) for s in (args.sizes or KIND_SIZES).split(",")]
        summary["kinds"] = bench_kinds(kinds, sizes, thread_counts, repeats, kinds_from=args.kinds_from,
                                       session_variants=args.session_options)
    summary["machine_after"] = machine_state()
    report(summary)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


def machine_state() -> dict:
    """CPU count, the CPU's model and the 1-minute load average (the machine may be shared)."""
    import os

    return {"cpus": os.cpu_count(), "cpu": cpu_model(), "load_1min": round(os.getloadavg()[0], 2)}


def cpu_model() -> str:
    """The CPU's model name and its widest vector extension, from /proc/cpuinfo ("" where unreadable): the
    sessions' machines differ, and absolute times compare only on the same CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else ""
    return ", ".join(part for part in (name, vector) if part)


def report(summary: dict) -> None:
    """Every table of a run, from its journal (what --json writes)."""
    before, after = summary.get("machine"), summary.get("machine_after")
    if before and after:
        cpu = f" ({before['cpu']})" if before.get("cpu") else ""
        print(f"machine: {before['cpus']} CPUs{cpu}, 1-min load average {before['load_1min']} before, "
              f"{after['load_1min']} after")
    if summary.get("rows"):
        print_tables(summary)
        if summary.get("variants"):
            print_variant_auc(summary["variants"])
    if summary.get("kinds"):
        print_kind_table(summary["kinds"])
        if any(k.startswith("ort[") for k in summary["kinds"][0]):
            print_tuning_table(summary["kinds"])


def bench_single(checkpoint: str | None, sizes: list[int], thread_counts: list[int], repeats: int,
                 quick: bool, graphs: dict[str, str] | None = None, rounds: int = 1) -> dict:
    """Sections 1-3 for one model (CHECKPOINT or the default tiny UDG-PNN); returns the journal's part.
    `graphs` ({name: ONNX file} with the serving graph's inputs, e.g. one exported by an earlier commit) are
    timed as variants beside the serving graph, in `rounds` alternating rounds."""
    import onnxruntime as ort
    import torch

    from export.onnx_export import export_scorer

    model, checkpoint_obj, valid = load_or_train(checkpoint)
    model.eval()
    schema = checkpoint_obj.schema
    udg = model.udg_dim > 0
    config = checkpoint_obj.model_config
    title = (f"{config.kind}{'+UDG' if udg else ''}  embed_dim={config.embed_dim} hidden={list(config.hidden)} "
             f"udg_dim={config.udg_dim if udg else 0} gate_hidden={config.gate_hidden if udg else 0}  "
             f"torch {torch.__version__}, onnxruntime {ort.__version__}")
    print(f"model: {title}")

    requests = Requests(model, schema)
    from model.serving import scorer_graph

    flops, per_request = flops_per_candidate(requests.eager_module, requests.torch_args)
    flops_naive, _ = flops_per_candidate(scorer_graph(model, schema, per_candidate=True).module, requests.torch_args)

    blob = export_scorer(model, schema)
    blobs = {"ort": blob, **{f"ort-{name}": Path(file).read_bytes() for name, file in (graphs or {}).items()}}
    if not quick:
        blobs["ort-plain"] = export_graph_bytes(model, schema, plain=True)
        blobs["ort-per-cand"] = export_scorer(model, schema, per_candidate=True)
        with tempfile.TemporaryDirectory() as tmp:
            blobs.update({f"ort-{name}": v for name, v in quantized_variants(blob, Path(tmp)).items()})

    results: dict = {"model": title, "flops_per_candidate": flops, "flops_per_request": per_request,
                     "flops_per_candidate_per_candidate_graph": flops_naive, "sgemm_gflops": {}, "rows": [],
                     "variants": []}
    inputs = {n: requests.torch_args(n) for n in sizes}
    for threads in thread_counts:
        sgemm = sgemm_times(threads)  # before and after the rows: the baseline spans the rows' time
        torch.set_num_threads(threads)
        sessions = {name: ort_session(b, threads) for name, b in blobs.items()}
        for n in sizes:
            row = {"threads": threads, "n": n,
                   **time_engines(requests, sessions, inputs[n], calls_for(n, repeats), rounds=rounds)}
            results["rows"].append(summarise_row(row))
        results["sgemm_gflops"][str(threads)] = sgemm_gflops(sgemm + sgemm_times(threads))
    torch.set_num_threads(max(thread_counts))
    if valid is not None and not quick and len(valid):
        for name, variant in blobs.items():
            if name in ("ort", "ort-int8", "ort-fp16"):
                session = ort_session(variant, 1)
                value = validation_auc(lambda f, session=session: session.run(None, f)[0], model, valid, udg,
                                       schema.item_table)
                results["variants"].append({"name": name, "auc": value, "events": len(valid)})
    return results


def export_graph_bytes(model, schema, plain: bool = False) -> bytes:
    from export.onnx_export import export_graph
    from model.serving import scorer_graph

    return export_graph(scorer_graph(model, schema, plain=plain))


def bench_kinds(kinds: list[str], sizes: list[int], thread_counts: list[int], repeats: int,
                data_spec=None, kinds_from: str | None = None, session_variants: bool = False) -> list[dict]:
    """Per kind: train a tiny +UDG model (`train_tiny`, with max(thread_counts) torch threads), export its
    serving graph and the plain one, then time both and PyTorch eager on the same requests at each N and
    thread count. Rows: {"kind", "n", "threads", "kflop_per_candidate", "sgemm_gflops", engine: summary}.
    With session_variants, also the serving graph under each of `tuning_variants()` ("ort[NAME]" engines),
    every engine timed in 3 rounds of alternating order."""
    import torch

    from dataset.ingest import prepare

    data = prepare(data_spec) if data_spec is not None else tiny_data()
    rows = []
    sgemm = {threads: sgemm_gflops(sgemm_times(threads))["median"] for threads in thread_counts}
    for kind in kinds:
        torch.set_num_threads(max(thread_counts))
        start = time.perf_counter()
        saved = Path(kinds_from) / f"{kind}.pt" if kinds_from else None
        if saved is not None and saved.exists():
            from model.checkpoint import Checkpoint

            checkpoint = Checkpoint.load(saved)
            model = checkpoint.build_model().eval()
        else:
            model, checkpoint = train_tiny(kind, data)
            if saved is not None:
                checkpoint.save(saved)
        log.info("%s+UDG: %d parameters, valid AUC %.4f, ready in %.0f s", kind, checkpoint.metrics["parameters"],
                 checkpoint.metrics["valid"]["auc"], time.perf_counter() - start)
        requests = Requests(model, data.schema)
        flops, _ = flops_per_candidate(requests.eager_module, requests.torch_args)
        blobs = {"ort": export_graph_bytes(model, data.schema), "ort-plain": export_graph_bytes(model, data.schema,
                                                                                                 plain=True)}
        sessions = {threads: {name: ort_session(b, threads) for name, b in blobs.items()} for threads in thread_counts}
        if session_variants:
            for threads in thread_counts:
                sessions[threads].update({f"ort[{name}]": ort_session(blobs["ort"], threads, tuning)
                                          for name, tuning in tuning_variants().items()})
        for n in sizes:
            targs = requests.torch_args(n)
            for threads in thread_counts:
                torch.set_num_threads(threads)
                timed = time_engines(requests, sessions[threads], targs, calls_for(n, repeats),
                                     rounds=3 if session_variants else 1)
                rows.append(summarise_row({"kind": kind, "n": n, "threads": threads, "kflop_per_candidate": flops / 1e3,
                                           "sgemm_gflops": sgemm[threads], **timed}))
    torch.set_num_threads(max(thread_counts))
    return rows


def summarise_row(row: dict) -> dict:
    """A timing row for JSON: each list of per-call seconds replaced by its summary."""
    return {k: (summarise(v) if isinstance(v, list) else v) for k, v in row.items()}


def summarise(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times) * 1e3, "p99_ms": percentile(times, 99) * 1e3, "calls": len(times)}


def print_tables(results: dict) -> None:
    rows = results["rows"]
    flops = results["flops_per_candidate"]
    sgemm = results["sgemm_gflops"]
    print(f"\nFLOPs per candidate (matmul-like ops of model.score): {flops / 1e3:.1f} k "
          f"({results['flops_per_candidate_per_candidate_graph'] / 1e3:.1f} k with the user side per candidate); "
          f"per request once: {results['flops_per_request'] / 1e3:.1f} k")
    runs = {g.get("runs", 10) for g in sgemm.values()}
    runs_text = f"{runs.pop()} runs" if len(runs) == 1 else "runs"
    if "runs" in next(iter(sgemm.values()), {}):
        runs_text += ", half before and half after the rows"
    print(f"sgemm baseline (torch.mm 1024x1024x1024, {runs_text}): " +
          ", ".join(f"{t} thread{'s' if int(t) > 1 else ''}: {g['median']:.1f} GFLOP/s median, {g['best']:.1f} best"
                    for t, g in sgemm.items()))
    print("\n| threads | N | PyTorch median µs | p99 µs | ORT median µs | p99 µs | ORT cand/s | ORT/torch | "
          "ORT GFLOP/s | % sgemm (median) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        t, o = row["torch"], row["ort"]
        tm, om = t["median_ms"] / 1e3, o["median_ms"] / 1e3
        gflops = flops * row["n"] / om / 1e9
        print(f"| {row['threads']} | {row['n']} | {tm * 1e6:,.0f} | {t['p99_ms'] * 1e3:,.0f} | {om * 1e6:,.0f} | "
              f"{o['p99_ms'] * 1e3:,.0f} | {row['n'] / om:,.0f} | {om / tm:.2f} | {gflops:.1f} | "
              f"{100 * gflops / sgemm[str(row['threads'])]['median']:.0f}% |")
    extra = [k for k in rows[0] if k.startswith("ort-")]
    if extra:
        print("\nVariants, median µs (in brackets: variant ÷ serving graph; > 1: the serving graph is faster):")
        print("| threads | N | ORT serving graph | " + " | ".join(extra) + " |")
        print("|---:|---:|---:|" + "---:|" * len(extra))
        for row in rows:
            om = row["ort"]["median_ms"]
            cells = [f"{row[k]['median_ms'] * 1e3:,.0f} ({row[k]['median_ms'] / om:.2f}x)" for k in extra]
            print(f"| {row['threads']} | {row['n']} | {om * 1e3:,.0f} | " + " | ".join(cells) + " |")
    print("\nTargets:")
    for row in rows:
        ratio = row["ort"]["median_ms"] / row["torch"]["median_ms"]
        if row["n"] in (100, 1000):
            print(f"  {row['threads']} thr N={row['n']}: ORT/torch {ratio:.2f} (target <= 1) "
                  f"{'OK' if ratio <= 1 else 'MISSED'}")
    for row in rows:
        if row["threads"] == 1 and row["n"] >= 500:
            gflops = flops * row["n"] / (row["ort"]["median_ms"] / 1e3) / 1e9
            share = gflops / sgemm["1"]["median"]
            print(f"  1 thr N={row['n']}: {gflops:.1f} GFLOP/s = {100 * share:.0f}% of the 1-thread sgemm median "
                  f"(target >= 60%) {'OK' if share >= 0.6 else 'MISSED'}")
    int8_delta = auc_delta(results.get("variants", []), "ort-int8")
    for row in rows:
        if row["threads"] == 1 and row["n"] >= 500 and "ort-int8" in row:
            # The issue admits the int8 graph where validation AUC moves <= 0.0005: its rate counts the fp32
            # graph's FLOPs, so it reads as "how fast the same scoring runs".
            gflops = flops * row["n"] / (row["ort-int8"]["median_ms"] / 1e3) / 1e9
            share = gflops / sgemm["1"]["median"]
            auc_text = "AUC not measured" if int8_delta is None else f"AUC {int8_delta:+.5f} vs fp32"
            met = share >= 0.6 and int8_delta is not None and abs(int8_delta) <= INT8_AUC_TOLERANCE
            print(f"  1 thr N={row['n']}, int8 graph: {gflops:.1f} GFLOP/s fp32-equivalent = {100 * share:.0f}% "
                  f"({auc_text}; target >= 60% with |AUC move| <= {INT8_AUC_TOLERANCE}) {'OK' if met else 'MISSED'}")


def auc_delta(variants: list[dict], name: str) -> float | None:
    """Validation AUC of graph `name` minus the fp32 serving graph's; None where either was not measured."""
    aucs = {v["name"]: v["auc"] for v in variants}
    return aucs[name] - aucs["ort"] if name in aucs and "ort" in aucs else None


def print_kind_table(rows: list[dict]) -> None:
    print("\nPer model kind (tiny +UDG, one user and N candidates per call; ORT serving graph and plain graph vs "
          "PyTorch eager model.score):")
    print("| kind | N | threads | ort median ms | ort p99 | torch median ms | torch p99 | ort/torch | ort plain ms | "
          "plain/serving | kFLOP/cand | ort GFLOP/s | % of sgemm |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        o, t, plain = row["ort"], row["torch"], row["ort-plain"]
        gflops = row["kflop_per_candidate"] * 1e3 * row["n"] / (o["median_ms"] / 1e3) / 1e9
        print(f"| {row['kind']} | {row['n']} | {row['threads']} | {o['median_ms']:.3f} | {o['p99_ms']:.3f} | "
              f"{t['median_ms']:.3f} | {t['p99_ms']:.3f} | {o['median_ms'] / t['median_ms']:.2f} | "
              f"{plain['median_ms']:.3f} | {plain['median_ms'] / o['median_ms']:.2f} | "
              f"{row['kflop_per_candidate']:.1f} | {gflops:.1f} | {100 * gflops / row['sgemm_gflops']:.0f} |")


def print_tuning_table(rows: list[dict]) -> None:
    variants = [k for k in rows[0] if k.startswith("ort[")]
    print("\nSession options per kind, serving graph median ms (in brackets: variant ÷ default options "
          "ENABLE_ALL, sequential, spinning on; < 1: the variant is faster):")
    print("| kind | N | threads | default ms | " + " | ".join(v[4:-1] for v in variants) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(variants))
    for row in rows:
        base = row["ort"]["median_ms"]
        cells = [f"{row[v]['median_ms']:.3f} ({row[v]['median_ms'] / base:.2f})" for v in variants]
        print(f"| {row['kind']} | {row['n']} | {row['threads']} | {base:.3f} | " + " | ".join(cells) + " |")


def print_variant_auc(variants: list[dict]) -> None:
    print(f"\nValidation AUC ({variants[0]['events']} events, one call per event, 1 thread):")
    print("| graph | AUC | Δ vs fp32 serving graph |")
    print("|---|---:|---:|")
    reference = next(v["auc"] for v in variants if v["name"] == "ort")
    for v in variants:
        print(f"| {v['name']} | {v['auc']:.4f} | {v['auc'] - reference:+.4f} |")


if __name__ == "__main__":
    raise SystemExit(main())
