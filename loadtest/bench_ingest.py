"""Ingestion benchmark: Parquet click logs -> `dataset.ingest.prepare` (vocabularies, histories, splits).

    .venv/bin/python -m loadtest.bench_ingest [--sizes 1000000,10000000] [--repeats 3] [--json PATH]
    .venv/bin/python -m loadtest.bench_ingest --render PATH   # the table of a saved run, as it was printed

For each size it writes a synthetic log (`dataset.synthetic.write_log`: events/100 users x 100 events,
events/200 items with Zipf-like popularity, in time order over 4 Parquet files, plus a users and an items
table; reused from --data-dir when already there), then runs `prepare` on it in a fresh subprocess per
repeat, so that the peak RSS (`ru_maxrss` of the child) is that of ingestion alone (interpreter, numpy and
pyarrow included). The child also times the first training step's input: `Samples.batch` of 1024 random
rows of the train split (a split is never materialised whole: histories and profiles are gathered per batch).

The baseline is the first version of the ingestion (`git archive <commit> dataset/`, default c41d538),
extracted into a temporary folder and run the same way, in the same run, up to --baseline-max-events.
`--legacy COMMIT` (default 2273c4e, the last commit before `dataset/`) also runs the pre-refactor
`model.features.prepare` up to --legacy-max-events: its loaders read MovieLens TSV only, so the child reads the
same Parquet files into its `RawDataset` untimed (in its favour) and times its `prepare`; its peak RSS is the
whole child's, as for the others.
`--check` also fingerprints the whole output (schema, every split's model inputs, known users) in both and
reports whether they agree. Seconds are the median of --repeats; events/s is events / that median.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SIZES = "1000000,10000000"
BASELINE_COMMIT = "c41d538"
LEGACY_COMMIT = "2273c4e"
EVENTS_PER_USER = 100
BATCH = 1024
COLUMNS = ("events", "implementation", "seconds (median)", "CPU seconds", "events/s", "peak RSS (GiB)",
           f"batch of {BATCH} (ms)", "train / valid / test rows")

SPEC = """# Written by loadtest/bench_ingest.py: the synthetic world's spec over a generated multi-file log.
name = "bench-{events}"

[events]
path = "events-*.parquet"
user = "user_id"
item = "item_id"
timestamp = "timestamp"
label = {{ click = "click" }}

[users]
path = "users.parquet"
id = "user_id"

[items]
path = "items.parquet"
id = "item_id"

[[user_fields]]
name = "cohort"

[[user_fields]]
name = "sex"

[[user_fields]]
name = "segment"

[[item_fields]]
name = "category"

[behavior]
max_length = 50
"""


# --- data ------------------------------------------------------------------------------------------------
def log_params(events: int) -> dict:
    users = max(1, events // EVENTS_PER_USER)
    return {"users": users, "events_per_user": max(1, events // users), "items": max(200, events // 200),
            "files": 4, "seed": 0}


def make_data(events: int, root: Path) -> tuple[Path, float]:
    """The folder's spec path (generating the log unless the same parameters are there) and the seconds
    generation took (0 when reused)."""
    from dataset.synthetic import LogParams, write_log

    params = log_params(events)
    folder = Path(root) / f"log-{events}"
    marker = folder / "params.json"
    spec = folder / "spec.toml"
    if marker.exists() and json.loads(marker.read_text()) == params and spec.exists():
        return spec, 0.0
    start = time.perf_counter()
    write_log(LogParams(**params), folder)
    seconds = time.perf_counter() - start
    spec.write_text(SPEC.format(events=events))
    marker.write_text(json.dumps(params))
    return spec, seconds


def baseline_tree(commit: str, target: Path, package: str = "dataset") -> Path:
    """`package/` as of `commit`, extracted under `target` (an importable root)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, package], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


# --- what the child measures -----------------------------------------------------------------------------
def _digest(hasher, array) -> None:
    array = np.ascontiguousarray(np.asarray(array))
    if array.dtype.kind == "U":
        hasher.update("\x1f".join(array.reshape(-1).tolist()).encode())
    else:
        hasher.update(str(array.shape).encode())
        hasher.update(array.astype(np.int64 if array.dtype.kind in "iub" else np.float64).tobytes())


def fingerprint(data, chunk: int = 1 << 18) -> dict[str, str]:
    """sha256 (16 hex digits) of each part of a PreparedData as the model and the feature store see it."""
    parts: dict[str, str] = {}

    def put(name, *arrays) -> None:
        hasher = hashlib.sha256()
        for array in arrays:
            _digest(hasher, array)
        parts[name] = hasher.hexdigest()[:16]

    parts["schema"] = hashlib.sha256(json.dumps(data.schema.to_json(), sort_keys=True).encode()).hexdigest()[:16]
    put("user_ids", data.user_ids)
    for split, samples in data.splits.items():
        put(f"{split}.columns", samples.user, samples.item, samples.label, samples.user_key)
        history, profile = hashlib.sha256(), hashlib.sha256()
        for lo in range(0, len(samples), chunk):
            rows = np.arange(lo, min(lo + chunk, len(samples)))
            batch = samples.batch(rows)
            _digest(history, batch["history"])
            _digest(profile, batch["profile"])
        parts[f"{split}.history"] = history.hexdigest()[:16]
        parts[f"{split}.profile"] = profile.hexdigest()[:16]
    known = data.known_users
    put("known_users", known.user_ids, known.profile, known.history, known.history_len)
    put("user_columns", *[data.user_columns[k] for k in sorted(data.user_columns)])
    parts["stats"] = hashlib.sha256(json.dumps(data.stats, sort_keys=True).encode()).hexdigest()[:16]
    return parts


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_seconds() -> float:
    """User + system CPU time of this process (both cores count: > wall time when pyarrow reads in threads)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def child(spec_path: str, with_fingerprint: bool) -> dict:
    """One measurement, in this (fresh) process: prepare, then one training batch."""
    import dataset
    from dataset.ingest import prepare
    from dataset.spec import load_spec

    spec = load_spec(spec_path)
    cpu = cpu_seconds()
    start = time.perf_counter()
    data = prepare(spec)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu
    train = data.splits["train"]
    rows = np.sort(np.random.default_rng(0).choice(len(train), size=min(BATCH, len(train)), replace=False))
    start = time.perf_counter()
    batch = train.batch(rows)
    batch_seconds = time.perf_counter() - start
    result = {"dataset_from": str(Path(dataset.__file__).resolve().parent),
              "events": int(data.stats["events"]), "seconds": seconds, "cpu_seconds": cpu,
              "batch_seconds": batch_seconds,
              "batch_shapes": {k: list(v.shape) for k, v in batch.items()},
              "peak_rss_bytes": peak_rss_bytes(), "splits": data.stats["splits"]}
    if with_fingerprint:
        result["fingerprint"] = fingerprint(data)
    return result


def legacy_child(spec_path: str) -> dict:
    """The pre-refactor path in this (fresh) process: the spec's Parquet files read into the old `RawDataset`
    (untimed), then `model.features.prepare` timed, then one training batch of its materialised arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from model.datasets import PROFILE_FIELDS, RawDataset
    from model.features import prepare

    import model

    folder = Path(spec_path).parent
    events = pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("events-*.parquet"))])
    users = pq.read_table(folder / "users.parquet").to_pydict()
    items = pq.read_table(folder / "items.parquet").to_pydict()
    names = ("cohort", "sex", "segment")  # the bench spec's user fields, in the old code's profile order
    profiles = {u: {old: str(users[new][k]) for old, new in zip(PROFILE_FIELDS, names, strict=True)}
                for k, u in enumerate(users["user_id"])}
    raw = RawDataset("bench", np.asarray(events.column("user_id").to_numpy(zero_copy_only=False)).astype(str),
                     np.asarray(events.column("item_id").to_numpy(zero_copy_only=False)).astype(str),
                     events.column("click").to_numpy().astype(np.float32), events.column("timestamp").to_numpy(),
                     profiles, {i: [str(c)] for i, c in zip(items["item_id"], items["category"], strict=True)},
                     label_threshold=0.5)
    del events
    cpu = cpu_seconds()
    start = time.perf_counter()
    data = prepare(raw, max_history=50)
    seconds = time.perf_counter() - start
    cpu = cpu_seconds() - cpu
    train = data.splits["train"]
    rows = np.sort(np.random.default_rng(0).choice(len(train), size=min(BATCH, len(train)), replace=False))
    start = time.perf_counter()
    batch = {k: getattr(train, k)[rows] for k in ("user", "profile", "item", "history", "label")}
    batch_seconds = time.perf_counter() - start
    return {"dataset_from": str(Path(model.__file__).resolve().parent), "events": len(raw), "seconds": seconds,
            "cpu_seconds": cpu, "batch_seconds": batch_seconds,
            "batch_shapes": {k: list(v.shape) for k, v in batch.items()}, "peak_rss_bytes": peak_rss_bytes(),
            "splits": {name: len(s) for name, s in data.splits.items()}}


def run_child(spec: Path, root: Path, with_fingerprint: bool, legacy: bool = False) -> dict:
    """`child` in a fresh interpreter whose `dataset` package is the one under `root`.

    The script is run by its path (not `-m`, which would put the working directory, this checkout, first on
    sys.path), from `root`, with only `root` on PYTHONPATH; the child reports where `dataset` came from."""
    env = dict(os.environ, PYTHONPATH=str(root))
    command = [sys.executable, str(Path(__file__).resolve()), "--legacy-child" if legacy else "--child", str(spec)]
    if with_fingerprint:
        command.append("--fingerprint")
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=str(root))
    if done.returncode != 0:
        raise RuntimeError(f"the {root} child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not Path(result["dataset_from"]).is_relative_to(Path(root).resolve()):
        raise RuntimeError(f"the child meant to run {root} imported dataset from {result['dataset_from']}")
    return result


# --- the table -------------------------------------------------------------------------------------------
def _row(result: dict) -> list[str]:
    splits = result["splits"]
    return [f"{result['events']:,}", result["implementation"], f"{result['seconds']:.2f}",
            f"{result['cpu_seconds']:.2f}",
            f"{result['events_per_s'] / 1e6:.2f} M", f"{result['peak_rss_bytes'] / 2**30:.2f}",
            f"{result['batch_seconds'] * 1e3:.2f}",
            f"{splits['train']:,} / {splits['valid']:,} / {splits['test']:,}"]


def fit(results: list[dict]) -> dict | None:
    """Least squares seconds and peak RSS against events over the new implementation's measured sizes."""
    points = sorted((r["events"], r["seconds"], r["peak_rss_bytes"]) for r in results if r["implementation"] == "new")
    if len({p[0] for p in points}) < 2:
        return None
    x = np.array([p[0] for p in points], float)
    seconds = np.polyfit(x, [p[1] for p in points], 1)
    rss = np.polyfit(x, [p[2] for p in points], 1)
    return {"seconds_per_m_events": seconds[0] * 1e6, "seconds_fixed": seconds[1],
            "rss_bytes_per_m_events": rss[0] * 1e6, "rss_bytes_fixed": rss[1],
            "measured_up_to": int(x.max())}


def render(report: dict) -> str:
    lines = [f"Ingestion, Parquet -> PreparedData with its splits, on {report['machine']['cpus']} CPUs "
             f"({report['machine']['processor']}); each cell the median of {report['repeats']} fresh "
             f"subprocesses (CPU seconds: user + system time of the child during prepare, also a median; "
             "pyarrow decodes on both cores, so a wall time well above it means the process waited, for CPUs "
             f"shared with other jobs or for I/O; load average {report['load'][0]:.1f} at the start, "
             f"{report['load'][1]:.1f} at the end). Baseline: `git archive {report['baseline']} dataset/` "
             "(the first version of dataset/ingest.py) extracted to a temporary folder and run the same way. "
             "Peak RSS: ru_maxrss of the child (interpreter, numpy, pyarrow included). Batch: `Samples.batch` of "
             f"{BATCH} random train rows (histories and profiles gathered for those rows only)."
             + (f" Pre-refactor: `model.features.prepare` of `git archive {report['legacy']} model/` (MovieLens-only "
                "code: the child reads the same Parquet files into its RawDataset untimed, then times prepare; "
                "its splits hold every history materialised, so its batch is a slice)."
                if any(r["implementation"] == "pre-refactor" for r in report["results"]) else ""), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---:" if i != 1 else "---" for i in
                                                           range(len(COLUMNS))) + "|"]
    for result in report["results"]:
        lines.append("| " + " | ".join(_row(result)) + " |")
    speedups = []
    by_size: dict[int, dict] = {}
    for result in report["results"]:
        by_size.setdefault(result["events"], {})[result["implementation"]] = result
    for events, pair in sorted(by_size.items()):
        if "new" in pair and "baseline" in pair:
            speedups.append(f"{events:,}: {pair['baseline']['seconds'] / pair['new']['seconds']:.1f}x faster, "
                            f"{pair['baseline']['peak_rss_bytes'] / pair['new']['peak_rss_bytes']:.1f}x less RSS")
    if speedups:
        lines += ["", "New vs baseline: " + "; ".join(speedups) + "."]
    legacy = [f"{events:,}: {pair['pre-refactor']['seconds'] / pair['new']['seconds']:.1f}x faster, "
              f"{pair['pre-refactor']['peak_rss_bytes'] / pair['new']['peak_rss_bytes']:.1f}x less RSS"
              for events, pair in sorted(by_size.items()) if "new" in pair and "pre-refactor" in pair]
    if legacy:
        lines += ["", "New vs pre-refactor: " + "; ".join(legacy) + "."]
    if report.get("agree") is not None:
        lines += ["", "Output fingerprints (schema, every split's model inputs, known users, user columns, stats) "
                  + ("agree" if report["agree"] else "DIFFER") + f" between new and baseline at "
                  f"{', '.join(f'{n:,}' for n in report['checked'])} events."]
    line = report.get("fit")
    if line:
        def events_at(gib: float) -> float:
            return (gib * 2**30 - line["rss_bytes_fixed"]) / line["rss_bytes_per_m_events"]

        def seconds_at(m_events: float) -> float:
            return line["seconds_fixed"] + m_events * line["seconds_per_m_events"]

        lines += ["", f"A line through the new implementation's points (up to {line['measured_up_to']:,} events): "
                  f"{line['seconds_per_m_events']:.3f} s and {line['rss_bytes_per_m_events'] / 2**20:.0f} MiB of peak "
                  f"RSS per million events (plus {line['seconds_fixed']:.2f} s and "
                  f"{line['rss_bytes_fixed'] / 2**20:.0f} MiB). Extrapolated along it, not measured: 2.5 GiB at "
                  f"~{events_at(2.5):.0f} M events, 20 GiB at ~{events_at(20):.0f} M events "
                  f"(~{seconds_at(events_at(20)):.0f} s)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="bench_ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="comma list of event counts")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--data-dir", type=Path, help="where the generated logs live (default: a temporary folder)")
    parser.add_argument("--baseline", default=BASELINE_COMMIT, help="commit of the baseline, or 'none'")
    parser.add_argument("--baseline-max-events", type=int, default=10_000_000,
                        help="run the baseline only up to this size (it needs ~4x the memory)")
    parser.add_argument("--legacy", default=LEGACY_COMMIT,
                        help="commit of the pre-refactor model.features, or 'none'")
    parser.add_argument("--legacy-max-events", type=int, default=3_000_000,
                        help="run the pre-refactor path only up to this size (it materialises every history)")
    parser.add_argument("--check", action="store_true", help="fingerprint both outputs and compare them")
    parser.add_argument("--render", type=Path, help="print the table of a --json file and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--legacy-child", help=argparse.SUPPRESS)
    parser.add_argument("--fingerprint", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child or args.legacy_child:
        result = child(args.child, args.fingerprint) if args.child else legacy_child(args.legacy_child)
        print(json.dumps(result))
        return result
    if args.render:
        report = json.loads(args.render.read_text())
        print(render(report))
        return report

    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        data_root = args.data_dir or Path(tmp) / "data"
        baseline_root = baseline_tree(args.baseline, Path(tmp) / "baseline") if args.baseline != "none" else None
        legacy_root = baseline_tree(args.legacy, Path(tmp) / "legacy", "model") if args.legacy != "none" else None
        results, generated, agree, checked = [], {}, None, []
        for events in sizes:
            spec, seconds = make_data(events, data_root)
            generated[events] = round(seconds, 2)
            roots = [("new", REPO)]
            if baseline_root is not None and events <= args.baseline_max_events:
                roots.append(("baseline", baseline_root))
            if legacy_root is not None and events <= args.legacy_max_events:
                roots.append(("pre-refactor", legacy_root))
            prints = {}
            for name, root in roots:
                legacy = name == "pre-refactor"
                runs = [run_child(spec, root, args.check and k == 0 and not legacy, legacy)
                        for k in range(args.repeats)]
                if args.check and not legacy:
                    prints[name] = runs[0]["fingerprint"]
                median = statistics.median(r["seconds"] for r in runs)
                results.append({"events": runs[0]["events"], "implementation": name, "seconds": median,
                                "events_per_s": runs[0]["events"] / median,
                                "peak_rss_bytes": int(statistics.median(r["peak_rss_bytes"] for r in runs)),
                                "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
                                "batch_seconds": statistics.median(r["batch_seconds"] for r in runs),
                                "batch_shapes": runs[0]["batch_shapes"], "splits": runs[0]["splits"],
                                "runs": [{k: r[k] for k in ("seconds", "cpu_seconds", "peak_rss_bytes",
                                                            "batch_seconds")}
                                         for r in runs]})
                print(f"  {events:,} {name}: {median:.2f} s, "
                      f"{results[-1]['peak_rss_bytes'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
            if len(prints) == 2:
                checked.append(events)
                same = prints["new"] == prints["baseline"]
                agree = same if agree is None else agree and same
                if not same:
                    diff = sorted(k for k in prints["new"] if prints["new"][k] != prints["baseline"].get(k))
                    print(f"  fingerprints differ at {events:,}: {diff}", file=sys.stderr)
    report = {"command": "python -m loadtest.bench_ingest " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "processor": cpu_name(),
                          "python": platform.python_version()},
              "load": [load_start, os.getloadavg()[0]],
              "baseline": args.baseline, "legacy": args.legacy, "repeats": args.repeats,
              "generation_seconds": generated,
              "results": results, "agree": agree, "checked": checked, "fit": fit(results)}
    print(render(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
