"""GPU check: parity and speed of the exported scorer on CUDA, with and without IO binding and CUDA graphs.

    .venv/bin/python -m loadtest.gpu_check [CHECKPOINT] [--sizes 1,100,1000,5000] [--seconds 2]

One command, installs nothing, a few minutes. Without CHECKPOINT it trains a tiny UDG-PNN on synthetic
data (about 20 s). It exports the model to a temporary MODEL_REPO, opens it with `export.runtime`, and:
  1. parity: onnxruntime vs PyTorch (CPU reference) at N = 1, 7, 1000 with empty and full history and
     unknown ids, for each path (plain run, IO binding, CUDA graph); fp32 on CUDA may use TF32 unless
     `use_tf32=0` is accepted by this onnxruntime, so both are tried and reported;
  2. benchmark: median / p99 latency and candidates/s per path and N, plus PyTorch eager (CPU, and CUDA
     when this torch has it).
On a machine without a CUDA provider or GPU it says so and runs the same checks on the CPU provider.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("gpu_check")


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


def tiny_model():
    import torch

    from model.experiment import DataSpec, model_config
    from model.train import TrainConfig, train_model, user_snapshot

    torch.set_num_threads(2)
    data = DataSpec(name="synthetic", synthetic={"users": 500, "items": 200, "events_per_user": 20},
                    max_history=20).load()
    config = model_config("pnn", "udg")
    model, metrics = train_model(data, config, TrainConfig(epochs=1), progress=False)
    payload = {"model_config_obj": config, "space_obj": data.space, "metrics": metrics,
               "users": user_snapshot(data), "meta": None, "parameters": None}
    return model.eval(), payload


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
        label = "ort cuda, CUDA graph + IO binding" if b._cuda_graph is not None else \
            "ort cuda, CUDA graph (capture failed: IO binding)"
        cells[label] = time_calls(lambda: b.score(user_vec, udg_vec, history, candidates), seconds)
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None)
    parser.add_argument("--sizes", default="1,100,1000,5000")
    parser.add_argument("--seconds", type=float, default=2.0, help="time budget per benchmark cell")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from export.onnx_export import export_model
    from export.runtime import open_artifact

    on_gpu, why = gpu_status()
    print(("CUDA: " if on_gpu else "NO GPU: ") + why)
    if args.checkpoint:
        from model.train import load_checkpoint

        model, payload = load_checkpoint(Path(args.checkpoint))
    else:
        model, payload = tiny_model()
    model.eval()
    sizes = [int(s) for s in args.sizes.split(",")]
    failures = []
    with tempfile.TemporaryDirectory() as repo:
        path = export_model(model, payload, "gpucheck", Path(repo))
        cpu = open_artifact(path, providers=["CPUExecutionProvider"], threads=2)
        paths = {"cpu": cpu}
        if on_gpu:
            strict = [("CUDAExecutionProvider", {"device_id": 0, "use_tf32": "0"}), "CPUExecutionProvider"]
            for name, kwargs in (("cuda", {}), ("cuda-graph", {"cuda_graph": True})):
                try:
                    paths[name] = open_artifact(path, providers=strict, **kwargs)
                except Exception as error:  # older onnxruntime without use_tf32, or capture unsupported
                    log.warning("%s with use_tf32=0 failed (%s); default CUDA options", name, error)
                    paths[name] = open_artifact(path, **kwargs)
        users = cpu.load_users()
        row = int(np.argmax(users["history_len"]))
        user_vec, udg_vec = users["user_vec"][row], users["udg_vec"][row] if cpu.udg_dim else None
        history = users["history_idx"][row]
        rng = np.random.default_rng(0)

        def reference(hist, cand):
            with torch.no_grad():
                u = torch.as_tensor(user_vec[None])
                g = None if udg_vec is None else torch.as_tensor(udg_vec[None])
                h = torch.as_tensor(hist[None] if len(hist) else np.zeros((1, 1), np.int64))
                return torch.sigmoid(model.score(u, g, h, torch.as_tensor(cand))).numpy()

        print("\nParity vs PyTorch (max abs diff; fp32 target 1e-5):")
        print("| path | N=1 | N=7 | N=1000 | ok |")
        print("|---|---:|---:|---:|---|")
        for name, artifact in paths.items():
            modes = {"plain": lambda a, f: a._scorer.run(None, f)[0]} if name != "cpu" else {}
            cells = []
            for n in (1, 7, 1000):
                candidates = rng.integers(2, cpu.n_items, n).astype(np.int64)
                candidates[n // 2] = cpu.oov_index
                worst = 0.0
                for hist in (np.zeros(0, np.int64), history):
                    expected = reference(hist, candidates)
                    got = artifact.score(user_vec, udg_vec, hist, candidates)
                    worst = max(worst, float(np.max(np.abs(got - expected))))
                    for run in modes.values():
                        feeds = artifact.feeds(user_vec, udg_vec, hist, candidates)
                        worst = max(worst, float(np.max(np.abs(run(artifact, feeds) - expected))))
                cells.append(worst)
            ok = max(cells) <= 1e-5
            if not ok:
                failures.append(name)
            print(f"| {name} | " + " | ".join(f"{c:.1e}" for c in cells) + f" | {'yes' if ok else 'NO'} |")

        print("\nLatency per call (one user, N candidates):")
        print("| path | N | median µs | p99 µs | candidates/s |")
        print("|---|---:|---:|---:|---:|")
        for n in sizes:
            candidates = rng.integers(2, cpu.n_items, n).astype(np.int64)
            cells = bench_size(model, paths, user_vec, udg_vec, history, candidates, on_gpu, args.seconds)
            for label, times in cells.items():
                median = statistics.median(times)
                print(f"| {label} | {n} | {median * 1e6:,.0f} | {np.percentile(times, 99) * 1e6:,.0f} | "
                      f"{n / median:,.0f} |")
    if failures:
        print(f"\nPARITY FAILED on: {', '.join(failures)}")
        return 1
    print("\nparity ok on every path" + ("" if on_gpu else " (CPU only: no GPU on this machine)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
