"""GPU check: parity and speed of the exported scorer on CUDA, with and without IO binding and CUDA graphs.

    .venv/bin/python -m loadtest.gpu_check [CHECKPOINT] [--kinds all] [--sizes 1,100,1000,5000] [--seconds 2]
        [--json results.json]

One command, installs nothing, a few minutes. Without CHECKPOINT it trains, for each of --kinds (default
pnn; "all" = the five), a tiny +UDG model on synthetic data for one epoch. Each model is exported to a
temporary MODEL_REPO, opened with `export.runtime`, and:
  1. parity: onnxruntime vs PyTorch (CPU reference) at N = 1, 7, 1000 with empty and full history and an
     unknown id, for each path (plain run, IO binding, CUDA graph); CUDA is opened with `use_tf32=0` so
     fp32 matmuls are not silently TF32 (a build without that option falls back to defaults, logged);
  2. benchmark: median / p99 latency and candidates/s per path and N, plus PyTorch eager (CPU, and CUDA
     when this torch has it);
  3. concurrency: calls/s with 1 and 4 threads calling `score` at once per path (N of --sizes up to 1000).
A path that cannot be opened, or one kind that breaks, is reported and the rest still run; the exit code
is 1 if any parity check failed. On a machine without a CUDA provider or GPU it says so and runs the same
checks on the CPU provider.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from loadtest.bench_model import ALL_KINDS

log = logging.getLogger("gpu_check")

PARITY_SIZES = (1, 7, 1000)
CONCURRENT_THREADS = (1, 4)


def gpu_status() -> tuple[bool, str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    smi = shutil.which("nvidia-smi")
    gpu = ""
    if smi:
        try:
            gpu = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            gpu = ""
    if "CUDAExecutionProvider" not in available:
        return False, (f"no CUDAExecutionProvider in this onnxruntime build ({ort.__version__}, "
                       f"providers {available}); GPU: {gpu or 'none found'} -> running the CPU path")
    if not gpu:
        return False, "CUDAExecutionProvider is built in but nvidia-smi finds no GPU -> running the CPU path"
    return True, f"GPU: {gpu}; onnxruntime {ort.__version__} providers {available}"


def tiny_data():
    """The small synthetic data every kind's tiny model is trained on (loaded once per check)."""
    from dataset.ingest import prepare
    from loadtest.bench_model import tiny_data_spec

    spec = tiny_data_spec(users=500, items=200, events_per_user=20).with_overrides(**{"behavior.max_length": 20})
    return prepare(spec)


def tiny_model(kind: str, data):
    """(model, Checkpoint): a +UDG model of `kind` fitted for one epoch on `data` (no meta generator)."""
    from loadtest.bench_model import train_tiny

    return train_tiny(kind, data, epochs=1)


def time_calls(fn, seconds: float, max_calls: int = 2000) -> list[float]:
    for _ in range(5):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(times) < max_calls and (len(times) < 20 or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_size(model, paths: dict, user_vec, udg_vec, history, candidates, on_gpu: bool, seconds: float) -> dict:
    """Per-call times of every path for one candidate count."""
    import torch

    from export.runtime import CUDA_GRAPH_BUCKETS

    cells = {}
    cpu = paths["cpu"]
    torch.set_num_threads(2)
    with torch.inference_mode():
        u = torch.as_tensor(user_vec[None])
        g = None if udg_vec is None else torch.as_tensor(udg_vec[None])
        h, c = torch.as_tensor(history[None]), torch.as_tensor(candidates)
        cells["torch eager cpu (2 thr)"] = time_calls(lambda: torch.sigmoid(model.score(u, g, h, c)), seconds)
        if on_gpu and torch.cuda.is_available():
            gpu_model = model.to("cuda")
            ug, gg, hg, cg = (None if t is None else t.to("cuda") for t in (u, g, h, c))
            cells["torch eager cuda"] = time_calls(lambda: torch.sigmoid(gpu_model.score(ug, gg, hg, cg)).cpu(),
                                                   seconds)
            model.to("cpu")
    cells["ort cpu (2 thr)"] = time_calls(lambda: cpu.score(user_vec, udg_vec, history, candidates), seconds)
    if "cuda" in paths:
        a = paths["cuda"]
        feeds = a.feeds(user_vec, udg_vec, history, candidates)
        cells["ort cuda, plain run"] = time_calls(lambda: a._scorer.run(None, feeds), seconds)
        cells["ort cuda, IO binding"] = time_calls(lambda: a.score(user_vec, udg_vec, history, candidates), seconds)
    if "cuda-graph" in paths:
        b = paths["cuda-graph"]
        if b._cuda_graph is None:
            label = "ort cuda, CUDA graph (capture failed: IO binding)"
        elif len(candidates) > CUDA_GRAPH_BUCKETS[-1]:
            label = "ort cuda, CUDA graph (N over the largest bucket: IO binding)"
        else:
            label = "ort cuda, CUDA graph + IO binding"
        cells[label] = time_calls(lambda: b.score(user_vec, udg_vec, history, candidates), seconds)
    return cells


def open_paths(path: Path, on_gpu: bool) -> tuple[dict, list[str]]:
    """{path name: Artifact} for the CPU reference path and, on a GPU, the CUDA and CUDA-graph paths;
    plus notes on any path that could not be opened (reported, not fatal: the others still run)."""
    from export.runtime import open_artifact

    paths, notes = {"cpu": open_artifact(path, providers=["CPUExecutionProvider"], threads=2)}, []
    if not on_gpu:
        return paths, notes
    strict = [("CUDAExecutionProvider", {"device_id": 0, "use_tf32": "0"}), "CPUExecutionProvider"]
    for name, kwargs in (("cuda", {}), ("cuda-graph", {"cuda_graph": True})):
        try:
            try:
                paths[name] = open_artifact(path, providers=strict, **kwargs)
            except Exception as error:  # an onnxruntime without use_tf32
                log.warning("%s with use_tf32=0 failed (%s); default CUDA options", name, error)
                paths[name] = open_artifact(path, **kwargs)
        except Exception as error:
            notes.append(f"{name}: could not open ({type(error).__name__}: {error})")
            continue
        if paths[name].provider != "CUDAExecutionProvider":
            notes.append(f"{name}: onnxruntime fell back to {paths[name].provider}")
        if name == "cuda-graph" and paths[name]._cuda_graph is None:
            notes.append("cuda-graph: no CUDA-graph session (IO binding only)")
    return paths, notes


def concurrent_throughput(artifact, user_vec, udg_vec, history, candidates, threads: int,
                          seconds: float) -> tuple[float, float]:
    """(calls/s, median s per call) with `threads` threads calling `score` at once, as a service's request
    threads do: the plain CUDA path runs sessions concurrently, the CUDA-graph path serialises per bucket."""
    stop = time.perf_counter() + seconds
    per_thread: list[list[float]] = [[] for _ in range(threads)]

    def worker(times: list[float]) -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            artifact.score(user_vec, udg_vec, history, candidates)
            times.append(time.perf_counter() - start)

    for _ in range(3):
        artifact.score(user_vec, udg_vec, history, candidates)
    started = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(times,)) for times in per_thread]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    elapsed = time.perf_counter() - started
    times = [t for chunk in per_thread for t in chunk]
    return len(times) / elapsed, statistics.median(times)


def check_parity(model, paths: dict, user_vec, udg_vec, history, rng) -> dict[str, list[float]]:
    """Per path: worst |ort - torch| at N = 1, 7, 1000 over empty and full history (an OOV candidate each)."""
    import torch

    cpu = paths["cpu"]

    def reference(hist, cand):
        with torch.no_grad():
            u = torch.as_tensor(user_vec[None])
            g = None if udg_vec is None else torch.as_tensor(udg_vec[None])
            h = torch.as_tensor(hist[None] if len(hist) else np.zeros((1, 1), np.int64))
            return torch.sigmoid(model.score(u, g, h, torch.as_tensor(cand))).numpy()

    worst_by_path = {}
    for name, artifact in paths.items():
        cells = []
        for n in PARITY_SIZES:
            candidates = rng.integers(2, cpu.n_items, n).astype(np.int64)
            candidates[n // 2] = cpu.oov_index
            worst = 0.0
            for hist in (np.zeros(0, np.int64), history):
                expected = reference(hist, candidates)
                outputs = [artifact.score(user_vec, udg_vec, hist, candidates)]
                if name != "cpu":  # the plain session.run path too, besides score()'s own path
                    outputs.append(artifact._scorer.run(None, artifact.feeds(user_vec, udg_vec, hist, candidates))[0])
                worst = max([worst] + [float(np.max(np.abs(got - expected))) for got in outputs])
            cells.append(worst)
        worst_by_path[name] = cells
    return worst_by_path


def check_kind(kind: str, checkpoint: str | None, data, on_gpu: bool, sizes: list[int], seconds: float) -> dict:
    """Train (or load), export, then parity and latency for one model kind; prints its tables."""
    from export.onnx_export import export_model

    if checkpoint:
        from model.checkpoint import Checkpoint

        loaded = Checkpoint.load(Path(checkpoint))
        model, kind = loaded.build_model(), loaded.model_config.kind
    else:
        model, loaded = tiny_model(kind, data)
    model.eval()
    result = {"kind": kind, "parity": {}, "latency": [], "concurrent": [], "notes": [], "failures": []}
    print(f"\n## {kind}")
    with tempfile.TemporaryDirectory() as repo:
        path = export_model(loaded, f"gpucheck-{kind}", Path(repo), model=model)
        paths, result["notes"] = open_paths(path, on_gpu)
        for note in result["notes"]:
            print(f"note: {note}")
        cpu = paths["cpu"]
        users = cpu.load_users()
        row = int(np.argmax(users["history_len"]))
        user_vec, udg_vec = users["user_vec"][row], users["udg_vec"][row] if cpu.udg_dim else None
        history = users["history_idx"][row]
        rng = np.random.default_rng(0)

        print("\nParity vs PyTorch on CPU (max abs diff over empty and full history; target 1e-5):")
        print("| path | " + " | ".join(f"N={n}" for n in PARITY_SIZES) + " | ok |")
        print("|---|" + "---:|" * len(PARITY_SIZES) + "---|")
        for name, cells in check_parity(model, paths, user_vec, udg_vec, history, rng).items():
            ok = max(cells) <= 1e-5
            if not ok:
                result["failures"].append(f"{kind}/{name}")
            result["parity"][name] = cells
            print(f"| {name} | " + " | ".join(f"{c:.1e}" for c in cells) + f" | {'yes' if ok else 'NO'} |")

        print("\nLatency per call (one user, N candidates):")
        print("| path | N | median µs | p99 µs | candidates/s |")
        print("|---|---:|---:|---:|---:|")
        for n in sizes:
            candidates = rng.integers(2, cpu.n_items, n).astype(np.int64)
            cells = bench_size(model, paths, user_vec, udg_vec, history, candidates, on_gpu, seconds)
            for label, times in cells.items():
                median, p99 = statistics.median(times), float(np.percentile(times, 99))
                result["latency"].append({"path": label, "n": n, "median_s": median, "p99_s": p99})
                print(f"| {label} | {n} | {median * 1e6:,.0f} | {p99 * 1e6:,.0f} | {n / median:,.0f} |")

        print("\nConcurrent callers (threads calling score at once, as a service worker's request threads):")
        print("| path | N | threads | calls/s | median µs |")
        print("|---|---:|---:|---:|---:|")
        for n in [n for n in sizes if 1 < n <= 1000]:
            candidates = rng.integers(2, cpu.n_items, n).astype(np.int64)
            for name, artifact in paths.items():
                for threads in CONCURRENT_THREADS:
                    rate, median = concurrent_throughput(artifact, user_vec, udg_vec, history, candidates,
                                                         threads, seconds)
                    result["concurrent"].append({"path": name, "n": n, "threads": threads, "calls_per_s": rate,
                                                 "median_s": median})
                    print(f"| {name} | {n} | {threads} | {rate:,.0f} | {median * 1e6:,.0f} |")
    return result


KIND_NAMES = {"pnn": "PNN", "deepfm": "DeepFM", "wide_deep": "Wide&Deep", "din": "DIN", "dien": "DIEN"}
TABLE_PATHS = ("ort cpu (2 thr)", "torch eager cuda", "ort cuda, plain run", "ort cuda, CUDA graph + IO binding")


def latency_table(journal: dict) -> str:
    """Median µs per call of one user and N candidates, per kind and path, from a --json journal."""
    from export.runtime import CUDA_GRAPH_BUCKETS

    lines = [journal.get("gpu", ""), "",
             "| model | N | ORT CPU 2 thr | PyTorch CUDA | ORT CUDA | ORT CUDA + graph | graph speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for result in journal["kinds"]:
        cells = {(row["path"], row["n"]): row["median_s"] * 1e6 for row in result.get("latency", [])}
        for n in sorted({row["n"] for row in result.get("latency", [])}):
            cpu, torch_cuda, plain, graph = (cells.get((path, n)) for path in TABLE_PATHS)
            if graph is None:  # N over the largest bucket: the graph path's IO-binding fallback
                graph = next((v for (path, size), v in cells.items() if size == n and path.startswith(
                    "ort cuda, CUDA graph")), None)
            speedup = f"{plain / graph:.1f}x" if plain and graph else "—"
            if n > CUDA_GRAPH_BUCKETS[-1]:
                speedup += " (no bucket)"
            values = " | ".join("—" if v is None else f"{v:,.0f}" for v in (cpu, torch_cuda, plain, graph))
            lines.append(f"| {KIND_NAMES.get(result['kind'], result['kind'])} | {n} | {values} | {speedup} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None)
    parser.add_argument("--kinds", default="pnn", help='comma list of model kinds, or "all" (no CHECKPOINT)')
    parser.add_argument("--sizes", default="1,100,1000,5000")
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per benchmark cell")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--report", default=None, help="print the latency table of a journal written by --json")
    args = parser.parse_args(argv)
    if args.report:
        print(latency_table(json.loads(Path(args.report).read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import onnxruntime as ort
    import torch

    on_gpu, why = gpu_status()
    print(("CUDA: " if on_gpu else "NO GPU: ") + why)
    print(f"torch {torch.__version__} (CUDA available: {torch.cuda.is_available()})")
    kinds = list(ALL_KINDS) if args.kinds == "all" else [k.strip() for k in args.kinds.split(",") if k.strip()]
    if args.checkpoint:
        kinds = kinds[:1]
    sizes = [int(s) for s in args.sizes.split(",")]
    torch.set_num_threads(2)
    data = None if args.checkpoint else tiny_data()
    results = []
    for kind in kinds:
        try:
            results.append(check_kind(kind, args.checkpoint, data, on_gpu, sizes, args.seconds))
        except Exception as error:  # one kind's breakage must not hide the others' figures
            log.exception("%s failed", kind)
            results.append({"kind": kind, "failures": [f"{kind}: {type(error).__name__}: {error}"]})
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": why, "onnxruntime": ort.__version__,
                                               "torch": torch.__version__, "kinds": results}, indent=1))
    failures = [f for r in results for f in r["failures"]]
    if failures:
        print(f"\nFAILED: {', '.join(failures)}")
        return 1
    print("\nparity ok on every path" + ("" if on_gpu else " (CPU only: no GPU on this machine)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
