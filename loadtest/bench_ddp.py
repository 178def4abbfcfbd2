"""Data-parallel training benchmark: one process against two DDP ranks (gloo, CPU), and where replicated
embedding tables stop working.

    .venv/bin/python -m loadtest.bench_ddp [--users 2000] [--vocab 10000,100000,1000000,2000000]
    .venv/bin/python -m loadtest.bench_ddp --from-journal docs/results/ddp/bench.json   # tables only

Prints, from one run (so the numbers are comparable), and writes the journal (`--journal`):
  1. throughput of `udg train` (PNN+UDG, no meta generator, 2 epochs, global batch 1024) as one process with
     2 and with 1 torch threads and under `torchrun --nproc_per_node 2` with 1 thread a rank: training
     events/s (from the checkpoint's seconds per epoch), the command's wall time, validation AUC/log loss;
  2. what it costs that every rank reads the whole event log: `prepare` alone, one process against two at
     once (seconds and peak RSS each);
  3. the replicated tables: the same model with its user vocabulary (the user-id and UDG tables) grown to
     each --vocab size, one training step (forward, backward, all-reduce, Adam) as one process and as two
     spawned ranks: median step time, bytes handed to the all-reduce per step (counted by a DDP
     communication hook), peak RSS per rank; and the memory arithmetic at 100 M users.
Not a test: it only prints tables. The machine is shared (2 cores, other jobs): each table gives the load
average, and ratios are only meaningful within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JOURNAL = REPO / "docs" / "results" / "ddp" / "bench.json"
USER_DIMS = 16 + 16  # the base user-id row and the UDG row at the default dims
BYTES_PER_PARAMETER = 4 * 4  # fp32 weight + gradient + Adam's two moments


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _spec_args(users: int) -> list[str]:
    return ["--spec", "synthetic", "--synthetic-users", str(users), "--synthetic-items", "300",
            "--set", "generator.params.events_per_user=50"]


# --- 1. throughput of udg train --------------------------------------------------------------------------
def train_run(name: str, launcher: list[str], threads: int, users: int, folder: Path, env: dict) -> dict:
    from model.checkpoint import Checkpoint

    out = folder / name / "checkpoint.pt"
    command = [*launcher, "-m", "udg_cli", "train", *_spec_args(users), "--udg", "--no-meta", "--epochs", "2",
               "--patience", "9", "--batch-size", "1024", "--threads", str(threads), "--quiet", "--out", str(out)]
    started, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # every waited-for descendant: torchrun's ranks too
    cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    metrics = Checkpoint.load(out).metrics
    # "training pnn+UDG on synthetic (N train events)", logged by every rank
    events = next(int(line.rsplit("(", 1)[1].split()[0]) for line in done.stderr.splitlines()
                  if "train events" in line)
    return {"name": name, "threads_per_rank": threads, "ranks": 2 if "torchrun" in launcher[0] else 1,
            "train_events": events, "seconds_per_epoch": metrics["seconds_per_epoch"],
            "events_per_s": events / metrics["seconds_per_epoch"], "wall_s": wall, "cpu_s": cpu,
            "valid_auc": metrics["valid"]["auc"], "valid_log_loss": metrics["valid"]["log_loss"]}


def throughput(users: int, folder: Path, env: dict) -> list[dict]:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    runs = [("1 process, 2 threads", [sys.executable], 2), ("1 process, 1 thread", [sys.executable], 1),
            ("torchrun 2 ranks, 1 thread each", [torchrun, "--nproc_per_node", "2", "--master_port",
                                                  str(_free_port())], 1)]
    return [train_run(name, launcher, threads, users, folder, env) for name, launcher, threads in runs]


def _free_port() -> int:
    from service.local_redis import free_port

    return free_port()


# --- 2. every rank reads the whole log -------------------------------------------------------------------
PREPARE_CHILD = """
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from model.commands import data_spec
from udg_cli import build_parser
from dataset.ingest import prepare
args = build_parser().parse_args(["train", *json.loads(sys.argv[1])])
spec = data_spec(args)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
started = time.perf_counter()
data = prepare(spec)
print(json.dumps({"seconds": time.perf_counter() - started, "events": sum(len(s) for s in data.splits.values()),
                  "prepare_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before}))
"""


def ingest_cost(users: int, env: dict) -> list[dict]:
    code = PREPARE_CHILD
    argv = json.dumps(_spec_args(users))
    rows = []
    for processes in (1, 2):
        started = time.perf_counter()
        children = [subprocess.Popen([sys.executable, "-c", code, argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for _ in range(processes)]
        results = [json.loads(child.communicate()[0].strip().splitlines()[-1]) for child in children]
        rows.append({"processes": processes, "wall_s": time.perf_counter() - started,
                     "seconds_each": [r["seconds"] for r in results], "events": results[0]["events"],
                     "prepare_rss_mib_each": [r["prepare_rss_mib"] for r in results]})
    return rows


# --- 3. replicated embedding tables ----------------------------------------------------------------------
def _grown_model(data, vocab: int):
    """PNN+UDG (the shipped preset) whose user vocabulary has `vocab` rows: the user-id and UDG tables grow,
    the events still name the data's users (so the rows a batch touches stay few, as in a large log)."""
    import dataclasses

    from dataset.schema import Vocab
    from model.experiment import model_config, udg_preset
    from model.zoo import build_model

    known = data.schema.users.tokens[2:]
    users = Vocab(known, hash_buckets=max(0, vocab - len(known) - 2))
    torch.manual_seed(0)
    return build_model(model_config("pnn", udg_preset("pnn")), dataclasses.replace(data.schema, users=users))


def _sparse_user_tables(model) -> list:
    """Switch the user-id and UDG tables to sparse gradients (rows touched by the batch only); returns them."""
    tables = [model.base.user_emb, model.udg_emb]
    for table in tables:
        table.sparse = True
    return tables


def _step_times(data, vocab: int, dist, steps: int, batch_size: int, sparse: bool = False) -> dict:
    """Median time of one training step and the bytes it hands to the all-reduce. Dense: every gradient,
    counted by a DDP communication hook. Sparse (user tables only, SparseAdam for them: it has no L2, so
    it is not the shipped training): the tables' sparse gradients (indices + rows, which DDP all-reduces
    outside its buckets and hooks) plus the dense rest."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    from model.train import TrainConfig, make_optimizer, rank_batches, shard_loss

    model = _grown_model(data, vocab)
    sent = {"bytes": 0}
    if sparse:
        tables = _sparse_user_tables(model)
        table_ids = {id(t.weight) for t in tables}
        dense = [p for p in model.parameters() if id(p) not in table_ids]
        optimizers = [torch.optim.Adam(dense, lr=1e-3), torch.optim.SparseAdam([t.weight for t in tables], lr=1e-3)]
        dense_bytes = sum(p.numel() * p.element_size() for p in dense)
        for table in tables:
            table.weight.register_hook(lambda g: sent.__setitem__(
                "bytes", sent["bytes"] + g._indices().numel() * 8 + g._values().numel() * g.element_size()))
    else:
        optimizers, dense_bytes = [make_optimizer(model, TrainConfig())], 0
    net = dist.wrap(model)
    if dist.active and not sparse:
        def counting_hook(state, bucket):
            sent["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
            return allreduce_hook(None, bucket)

        net.register_comm_hook(None, counting_hook)
    world = max(dist.world, 1)
    generator = torch.Generator().manual_seed(0)
    times, cpu_times = [], []
    for step, (batch, size, weight) in enumerate(rank_batches(data.splits["train"], batch_size, generator, dist)):
        if step >= steps + 2:
            break
        if step == 2:
            sent["bytes"] = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        loss, _ = shard_loss(net(batch), batch["label"], size, weight, 1.0, world)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        if step >= 2:  # the first steps allocate Adam's moments and DDP's buckets
            times.append(time.perf_counter() - started)
            cpu_times.append(time.process_time() - cpu_started)
    parameters = sum(p.numel() for p in model.parameters())
    sent_per_step = sent["bytes"] / len(times) + (dense_bytes if dist.active else 0)
    return {"vocab": vocab, "parameters": parameters, "step_ms": 1000 * statistics.median(times),
            "cpu_ms": 1000 * statistics.median(cpu_times),
            "allreduce_mib_per_step": sent_per_step / 2**20 if dist.active else 0.0,
            "peak_rss_mib": _peak_rss_mib()}


def _spawned_rank(rank: int, world: int, port: int, users: int, vocab: int, steps: int, sparse: bool,
                  out: str) -> None:
    from model.distributed import Distributed, spawn_environment

    os.environ.update(spawn_environment(rank, world, port))
    torch.set_num_threads(1)
    dist = Distributed.from_environment()
    result = _step_times(_bench_data(users), vocab, dist, steps, 1024, sparse)
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    dist.close()


def _bench_data(users: int):
    from dataset.ingest import prepare
    from model.commands import data_spec
    from udg_cli import build_parser

    return prepare(data_spec(build_parser().parse_args(["train", *_spec_args(users)])))


def _single_child(users: int, vocab: int, steps: int, out: str) -> None:
    from model.distributed import SINGLE

    torch.set_num_threads(1)
    Path(out).write_text(json.dumps(_step_times(_bench_data(users), vocab, SINGLE, steps, 1024)))


def table_sweep(users: int, vocabs: list[int], steps: int, folder: Path) -> list[dict]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rows = []
    for vocab in vocabs:
        single_out = str(folder / f"single-{vocab}.json")
        child = context.Process(target=_single_child, args=(users, vocab, steps, single_out))
        child.start()
        child.join()
        one = json.loads(Path(single_out).read_text())
        two = {}
        for kind, sparse in (("dense", False), ("sparse", True)):
            out = str(folder / f"ddp-{kind}-{vocab}")
            torch.multiprocessing.spawn(_spawned_rank, args=(2, _free_port(), users, vocab, steps, sparse, out),
                                        nprocs=2)
            two[kind] = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
        rows.append({"vocab": vocab, "parameters": one["parameters"], "one_step_ms": one["step_ms"],
                     "one_cpu_ms": one["cpu_ms"], "two_step_ms": max(r["step_ms"] for r in two["dense"]),
                     "two_cpu_ms": max(r["cpu_ms"] for r in two["dense"]),
                     "sparse_cpu_ms": max(r["cpu_ms"] for r in two["sparse"]),
                     "allreduce_mib_per_step": two["dense"][0]["allreduce_mib_per_step"],
                     "sparse_step_ms": max(r["step_ms"] for r in two["sparse"]),
                     "sparse_allreduce_mib_per_step": max(r["allreduce_mib_per_step"] for r in two["sparse"]),
                     "one_peak_rss_mib": one["peak_rss_mib"],
                     "rank_peak_rss_mib": max(r["peak_rss_mib"] for r in two["dense"])})
        print(f"  vocab {vocab:,}: {rows[-1]}", file=sys.stderr)
    return rows


# --- the tables -------------------------------------------------------------------------------------------
def arithmetic(users: int = 100_000_000) -> dict:
    table_bytes = users * USER_DIMS * 4
    return {"users": users, "user_dims": USER_DIMS, "weights_gb": table_bytes / 1e9,
            "per_rank_gb": users * USER_DIMS * BYTES_PER_PARAMETER / 1e9,
            "ddp_bucket_copy_gb": table_bytes / 1e9,  # DDP's gradient buckets: one more gradient-sized copy
            "allreduce_gb_per_step": table_bytes / 1e9,
            "ring_gb_sent_per_rank_per_step_8": 2 * 7 / 8 * table_bytes / 1e9}


def format_tables(journal: dict) -> str:
    lines = [f"machine: {journal['machine']}", "",
             "1. udg train, PNN+UDG, 2 epochs, global batch 1024 "
             f"({journal['throughput'][0]['train_events']:,} training events)", "",
             "| run | ranks | threads/rank | train events/s | vs 1 process 2 threads | s/epoch | wall s | "
             "CPU s (all ranks) | valid AUC | valid log loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = journal["throughput"][0]["events_per_s"]
    for r in journal["throughput"]:
        lines.append(f"| {r['name']} | {r['ranks']} | {r['threads_per_rank']} | {r['events_per_s']:,.0f} | "
                     f"{r['events_per_s'] / base:.2f}x | {r['seconds_per_epoch']:.2f} | {r['wall_s']:.1f} | "
                     f"{r.get('cpu_s', float('nan')):.1f} | "
                     f"{r['valid_auc']:.4f} | {r['valid_log_loss']:.4f} |")
    lines += ["", "2. every rank reads the whole log: `prepare` alone", "",
              "| processes at once | wall s (with imports) | prepare s each | peak RSS growth in prepare, each (MiB) | "
              "events |", "|---|---|---|---|---|"]
    for r in journal["ingest"]:
        lines.append(f"| {r['processes']} | {r['wall_s']:.1f} | {', '.join(f'{s:.1f}' for s in r['seconds_each'])} | "
                     f"{', '.join(f'{m:.0f}' for m in r['prepare_rss_mib_each'])} | {r['events']:,} |")
    lines += ["", "3. replicated tables: one training step (global batch 1024) vs user vocabulary", "",
              "Step time as wall ms / CPU ms of the process (CPU time is what the step costs; wall time what this "
              "loaded machine gave it). 2 ranks: the slower rank.", "",
              "| user vocabulary | parameters | 1 process step | 2 ranks step | all-reduce MiB/step | "
              "2 ranks, sparse user tables: step | sparse: MiB/step | peak RSS 1 process (MiB) | "
              "peak RSS per rank (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in journal["tables"]:
        lines.append(f"| {r['vocab']:,} | {r['parameters']:,} | {r['one_step_ms']:.0f} / {r['one_cpu_ms']:.0f} | "
                     f"{r['two_step_ms']:.0f} / {r['two_cpu_ms']:.0f} | "
                     f"{r['allreduce_mib_per_step']:.1f} | {r['sparse_step_ms']:.0f} / {r['sparse_cpu_ms']:.0f} | "
                     f"{r['sparse_allreduce_mib_per_step']:.1f} | {r['one_peak_rss_mib']:.0f} | "
                     f"{r['rank_peak_rss_mib']:.0f} |")
    a = journal["arithmetic"]
    lines += ["", f"At {a['users']:,} users x {a['user_dims']} fp32 (user-id + UDG rows): {a['weights_gb']:.1f} GB "
              f"of weights, {a['per_rank_gb']:.1f} GB per rank with gradients and Adam's two moments (+"
              f"{a['ddp_bucket_copy_gb']:.1f} GB of DDP gradient buckets); {a['allreduce_gb_per_step']:.1f} GB "
              f"handed to the all-reduce every step, {a['ring_gb_sent_per_rank_per_step_8']:.1f} GB sent per rank "
              "per step by a ring all-reduce over 8 ranks."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=2000, help="synthetic users (50 events each)")
    parser.add_argument("--vocab", default="10000,100000,1000000,2000000", help="user vocabulary sizes")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per vocabulary size")
    parser.add_argument("--journal", default=str(DEFAULT_JOURNAL))
    parser.add_argument("--from-journal", default=None, help="print the tables of a journal; run nothing")
    args = parser.parse_args(argv)
    if args.from_journal:
        print(format_tables(json.loads(Path(args.from_journal).read_text())))
        return 0
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-ddp-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, "PYTHONPATH": str(REPO), "UDG_CACHE_DIR": str(folder / "cache"), "OMP_NUM_THREADS": "1"}
        cache_before = os.environ.get("UDG_CACHE_DIR")
        os.environ["UDG_CACHE_DIR"] = env["UDG_CACHE_DIR"]  # the in-process table sweep generates its world here
        try:
            print("throughput ...", file=sys.stderr)
            runs = throughput(args.users, folder, env)
            print("ingest ...", file=sys.stderr)
            ingest = ingest_cost(args.users, env)
            print("tables ...", file=sys.stderr)
            tables = table_sweep(args.users, [int(v) for v in args.vocab.split(",")], args.steps, folder)
        finally:  # an in-process caller keeps its own cache, not a path to the deleted temporary folder
            if cache_before is None:
                os.environ.pop("UDG_CACHE_DIR", None)
            else:
                os.environ["UDG_CACHE_DIR"] = cache_before
    journal = {"machine": f"{os.cpu_count()} CPUs, shared with other jobs; 1-min load average {load_before:.1f} "
                          f"before, {os.getloadavg()[0]:.1f} after; torch {torch.__version__}, gloo",
               "users": args.users, "throughput": runs, "ingest": ingest, "tables": tables,
               "arithmetic": arithmetic()}
    Path(args.journal).parent.mkdir(parents=True, exist_ok=True)
    Path(args.journal).write_text(json.dumps(journal, indent=1) + "\n")
    print(format_tables(journal))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
