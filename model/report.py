"""`udg report`: base vs +UDG vs doubled embedding over several seeds (the paper's Tables 2-3, Figure 2)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from model.experiment import GATED_VARIANTS, VARIANTS, udg_preset, variant_config

log = logging.getLogger(__name__)

METRICS = ("log_loss", "auc", "rmse", "rig")
VARIANT_LABELS = {name: variant.label for name, variant in VARIANTS.items()}


def run_grid(data, pairs: list[tuple[str, str]], seeds: int, train_config,
             journal: RunJournal | None = None, train_missing: bool = True) -> list[dict]:
    """Train every (model, variant) of `pairs` for every seed; runs already in the journal are reused, new ones
    appended to it. With train_missing=False only the journal's runs are returned (a summary of a grid still
    running, or of a committed journal: then neither data nor torch is needed)."""
    rows = []
    # Seed-major: a grid stopped part-way leaves complete, paired seeds for every (model, variant).
    for seed in range(seeds):
        for kind, variant in pairs:
            done = journal.get(kind, variant, seed) if journal else None
            if done is not None:
                rows.append(done)
                continue
            if not train_missing:
                continue
            if journal and not journal.claim(kind, variant, seed):
                log.info("%s/%s seed %d: finished or being trained by another process", kind, variant, seed)
                continue
            from model.train import train_model

            started = time.perf_counter()
            try:
                _, metrics = train_model(data, variant_config(kind, variant), replace(train_config, seed=seed),
                                         progress=False)
            except BaseException:
                if journal:
                    journal.release(kind, variant, seed)
                raise
            row = {"model": kind, "variant": variant, "seed": seed, "parameters": metrics["parameters"],
                   "seconds_per_epoch": metrics["seconds_per_epoch"], "best_epoch": metrics["best_epoch"],
                   "valid": metrics["valid"], "test": metrics["test"]}
            if journal:
                journal.add(row)
            rows.append(row)
            log.info("%s/%s seed %d: valid auc %.4f test auc %.4f (%.0f s)", kind, variant, seed,
                     metrics["valid"]["auc"], metrics["test"]["auc"], time.perf_counter() - started)
    if journal and train_missing:
        # Runs other processes finished meanwhile belong in this summary too.
        journal.refresh()
        mine = {(r["model"], r["variant"], r["seed"]) for r in rows}
        rows += [journal.get(k, v, s) for s in range(seeds) for k, v in pairs
                 if (k, v, s) not in mine and journal.get(k, v, s) is not None]
    return rows


class RunJournal:
    """Finished runs, one JSON line each, so a long grid resumes after an interruption and several processes
    can share an output folder. A line counts only under the same setup (data, split, training options):
    change any of them and the runs are redone.

    Processes split a grid between them through claims: before training a run, a process re-reads the
    journal and creates `<journal>.claims/<model>-<variant>-<seed>` exclusively; another process skips a
    run that is finished or claimed. A claim whose process has died (same host, pid gone) is taken over, so
    a killed grid needs no cleaning up.
    """

    def __init__(self, path: Path, setup: dict):
        self.path = path
        self.setup = json.loads(json.dumps(setup, default=float))
        self.claims = path.with_name(path.name + ".claims")
        self.rows: dict[tuple, dict] = {}
        self.refresh()

    def refresh(self) -> None:
        """Re-read the file: rows other processes finished since are picked up."""
        if not self.path.exists():
            return
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
            if entry.get("setup") == self.setup:
                row = entry["row"]
                self.rows[(row["model"], row["variant"], row["seed"])] = row

    def get(self, kind: str, variant: str, seed: int) -> dict | None:
        return self.rows.get((kind, variant, seed))

    def add(self, row: dict) -> None:
        self.rows[(row["model"], row["variant"], row["seed"])] = row
        # One short append per run: lines from concurrent processes do not interleave.
        with self.path.open("a") as handle:
            handle.write(json.dumps({"setup": self.setup, "row": row}, default=float) + "\n")
        self._claim_file(row["model"], row["variant"], row["seed"]).unlink(missing_ok=True)

    def _claim_file(self, kind: str, variant: str, seed: int) -> Path:
        return self.claims / f"{kind}-{variant}-{seed}"

    def claim(self, kind: str, variant: str, seed: int) -> bool:
        """True if this process should train the run: not finished, and now claimed by this process."""
        self.refresh()
        if self.get(kind, variant, seed) is not None:
            return False
        self.claims.mkdir(parents=True, exist_ok=True)
        file = self._claim_file(kind, variant, seed)
        owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        for _ in range(2):
            try:
                with open(file, "x") as handle:
                    handle.write(owner)
                return True
            except FileExistsError:
                if not self._stale(file):
                    return False
                file.unlink(missing_ok=True)  # its process died: take the run over
        return False

    def release(self, kind: str, variant: str, seed: int) -> None:
        """Give up a claim without a result (the run failed or was interrupted)."""
        self._claim_file(kind, variant, seed).unlink(missing_ok=True)

    @staticmethod
    def _stale(file: Path) -> bool:
        try:
            owner = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError):  # being written right now, or gone
            return False
        if owner.get("host") != socket.gethostname():
            return False  # cannot tell whether a process on another host is alive
        try:
            os.kill(int(owner["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by another user
            return False
        return False


def summarise(rows: list[dict]) -> list[dict]:
    """One line per (model, variant) with mean ± std and the paired-by-seed AUC gain over the base."""
    summary = []
    for kind in dict.fromkeys(r["model"] for r in rows):
        base = {r["seed"]: r for r in rows if r["model"] == kind and r["variant"] == "base"}
        for variant in dict.fromkeys(r["variant"] for r in rows if r["model"] == kind):
            group = sorted((r for r in rows if r["model"] == kind and r["variant"] == variant),
                           key=lambda r: r["seed"])
            line = {"model": kind, "variant": variant, "seeds": len(group),
                    "parameters": group[0]["parameters"],
                    "seconds_per_epoch": float(np.mean([r["seconds_per_epoch"] for r in group]))}
            for split in ("valid", "test"):
                for metric in METRICS:
                    values = [r[split][metric] for r in group]
                    line[f"{split}_{metric}"] = (float(np.mean(values)), float(np.std(values, ddof=1))
                                                 if len(values) > 1 else 0.0)
                for metric in ("auc", "log_loss"):
                    paired = [r[split][metric] - base[r["seed"]][split][metric] for r in group if r["seed"] in base]
                    line[f"{split}_{metric}_gain"] = (float(np.mean(paired)), float(np.std(paired, ddof=1))
                                                      if len(paired) > 1 else 0.0) if paired else None
            summary.append(line)
    return summary


def markdown(summary: list[dict], title: str) -> str:
    def fmt(pair):
        return f"{pair[0]:.4f} ± {pair[1]:.4f}"

    def gain(pair):
        return "—" if pair is None else f"{pair[0]:+.4f} ± {pair[1]:.4f}"

    lines = [f"### {title}", "",
             "| model | variant | seeds | params | test log loss | test AUC | test RMSE | test RIG | valid AUC "
             "| paired Δ test AUC | paired Δ valid AUC | paired Δ test log loss | s/epoch |",
             "|---|---|---:|---:|---|---|---|---|---|---|---|---|---:|"]
    for line in summary:
        lines.append(
            f"| {line['model']} | {VARIANT_LABELS.get(line['variant'], line['variant'])} | {line['seeds']} | "
            f"{line['parameters']:,d} | {fmt(line['test_log_loss'])} | {fmt(line['test_auc'])} | "
            f"{fmt(line['test_rmse'])} | {fmt(line['test_rig'])} | {fmt(line['valid_auc'])} | "
            f"{gain(line['test_auc_gain']) if line['variant'] != 'base' else '—'} | "
            f"{gain(line['valid_auc_gain']) if line['variant'] != 'base' else '—'} | "
            f"{gain(line['test_log_loss_gain']) if line['variant'] != 'base' else '—'} | "
            f"{line['seconds_per_epoch']:.1f} |")
    lines += ["", "Mean ± sample std over the seeds given; Δ is paired by seed against the same model's base."]
    return "\n".join(lines)


# The paper's MovieLens test AUC (Tables 2 and 3: base, +UDG, doubled embedding), for reference beside ours:
# its MovieLens is much larger than MovieLens-100K, so gains compare, absolute values do not.
PAPER_MOVIELENS_AUC = {"pnn": (0.8264, 0.8294, 0.8259), "deepfm": (0.8190, 0.8230, 0.8188),
                       "wide_deep": (0.8172, 0.8210, 0.8170), "din": (0.8643, 0.8663, 0.8635),
                       "dien": (0.8689, 0.8724, 0.8677)}
MODEL_LABELS = {"pnn": "PNN", "deepfm": "DeepFM", "wide_deep": "Wide&Deep", "din": "DIN", "dien": "DIEN"}


def signed(value: float) -> str:
    """+0.0012 / −0.0012, with a typographic minus (the results tables use it)."""
    return f"{value:+.4f}".replace("-", "−")


def signed_gain(pair: tuple[float, float] | None) -> str:
    """A paired gain as "+mean ± std", or "—" when there is none."""
    return "—" if pair is None else f"{signed(pair[0])} ± {pair[1]:.4f}"


def comparison(summary: list[dict], paper: dict | None = None) -> str:
    """One line per model: test AUC of every variant, and each variant's paired gains over the base (test
    AUC, valid AUC, test log loss), parameters and seconds per epoch; the paper's figures when given."""
    def pm(pair):
        return "—" if pair is None else f"{pair[0]:.4f} ± {pair[1]:.4f}"

    gain = signed_gain
    by = {(line["model"], line["variant"]): line for line in summary}
    variants = list(dict.fromkeys(line["variant"] for line in summary))
    others = [v for v in variants if v != "base"]
    label = {v: VARIANT_LABELS.get(v, v) for v in variants}
    head = (["model", f"seeds ({'/'.join(label[v] for v in variants)})"]
            + [f"{label[v]} test AUC" for v in variants]
            + [f"Δ {label[v]} {what}" for v in others for what in ("test AUC", "valid AUC", "test log loss")]
            + ["params " + " / ".join(label[v] for v in variants), "s/epoch"])
    if paper:
        head.append("paper: base → +UDG (Δ), 2x")
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---|" * (len(head) - 2)]
    for kind in dict.fromkeys(line["model"] for line in summary):
        cells = [by.get((kind, v)) for v in variants]
        row = [MODEL_LABELS.get(kind, kind), "/".join(str(c["seeds"]) if c else "0" for c in cells)]
        row += [pm(c["test_auc"]) if c else "—" for c in cells]
        for v in others:
            c = by.get((kind, v))
            row += [gain(c and c["test_auc_gain"]), gain(c and c["valid_auc_gain"]),
                    gain(c and c["test_log_loss_gain"])]
        row.append(" / ".join(f"{c['parameters']:,d}" if c else "—" for c in cells))
        row.append(" / ".join(f"{c['seconds_per_epoch']:.1f}" if c else "—" for c in cells))
        if paper:
            base, udg, double = paper.get(kind, (None, None, None))
            row.append("—" if base is None else f"{base:.4f} → {udg:.4f} ({udg - base:+.4f}), {double:.4f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def gate_choice(summary: list[dict]) -> str:
    """One line per model with two or more gated variants: each one's paired Δ test AUC (Δ valid AUC), the
    variant with the best Δ valid AUC and its Δ test AUC, the 2x embedding's Δ test AUC, and the preset that
    `udg train --udg` ships for the kind. Empty when no model has a choice to make."""
    gain = signed_gain
    by = {(line["model"], line["variant"]): line for line in summary}
    kinds = [k for k in dict.fromkeys(line["model"] for line in summary)
             if sum((k, v) in by and by[(k, v)]["valid_auc_gain"] is not None for v in GATED_VARIANTS) >= 2]
    if not kinds:
        return ""
    gated = [v for v in GATED_VARIANTS if any((k, v) in by for k in kinds)]
    head = (["model", "seeds (base)"] + [f"{VARIANT_LABELS[v]}: Δ test AUC (Δ valid)" for v in gated]
            + ["chosen on validation → Δ test AUC", "2x embedding: Δ test AUC", "`--udg` ships"])
    lines = ["| " + " | ".join(head) + " |", "|---|---:|" + "---|" * (len(head) - 2)]
    for kind in kinds:
        row = [MODEL_LABELS.get(kind, kind), str(by[(kind, "base")]["seeds"]) if (kind, "base") in by else "0"]
        choices = {}
        for v in gated:
            line = by.get((kind, v))
            if line is None or line["valid_auc_gain"] is None:
                row.append("—")
                continue
            choices[v] = line
            row.append(f"{gain(line['test_auc_gain'])} ({signed(line['valid_auc_gain'][0])})")
        best = max(choices, key=lambda v: choices[v]["valid_auc_gain"][0])
        row.append(f"{VARIANT_LABELS[best]} → {gain(choices[best]['test_auc_gain'])}")
        double = by.get((kind, "double"))
        row.append(gain(double["test_auc_gain"]) if double else "—")
        row.append(f"`{udg_preset(kind)}`")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(s["model"] for s in summary))
    variants = list(dict.fromkeys(s["variant"] for s in summary))
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(kinds), 3.6))
    for j, variant in enumerate(variants):
        xs, means, stds = [], [], []
        for i, kind in enumerate(kinds):
            for s in summary:
                if s["model"] == kind and s["variant"] == variant:
                    xs.append(i + (j - (len(variants) - 1) / 2) * width)
                    means.append(s["test_auc"][0])
                    stds.append(s["test_auc"][1])
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=VARIANT_LABELS.get(variant, variant))
    lows = [s["test_auc"][0] - 2 * s["test_auc"][1] for s in summary]
    highs = [s["test_auc"][0] + 2 * s["test_auc"][1] for s in summary]
    ax.set_ylim(min(lows) - 0.005, max(highs) + 0.005)
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylabel("test AUC (mean ± std)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class Grid:
    """One report: the (model, variant) pairs trained on one spec with one set of training options, their
    seeds, and the folder that holds the run journal, the table and the plot."""

    name: str
    spec: object  # dataset.spec.DatasetSpec
    pairs: list[tuple[str, str]]
    seeds: int
    train: dict  # every model.experiment.TRAIN_OPTIONS, resolved
    out: Path
    report_name: str = "report.md"

    @property
    def kinds(self) -> list[str]:
        return list(dict.fromkeys(kind for kind, _ in self.pairs))

    def setup(self) -> dict:
        """What a journal line must match to be reused: the data and the options that change the numbers."""
        from model.experiment import train_defaults

        setup = {"data": self.spec.fingerprint(), "epochs": self.train["epochs"], "embed_wd": self.train["embed_wd"]}
        if self.train["device"] != "cpu":  # other numerics (and kernels): pair runs within one device only
            setup["device"] = self.train["device"]
        defaults = train_defaults()
        setup.update({k: self.train[k] for k in ("batch_size", "lr", "patience") if self.train[k] != defaults[k]})
        return setup

    def train_config(self):
        from model.train import TrainConfig

        options = {("embed_weight_decay" if k == "embed_wd" else k): v for k, v in self.train.items()}
        return TrainConfig(**options)

    def journal(self) -> RunJournal:
        return RunJournal(self.out / "runs.jsonl", self.setup())

    def rows(self) -> list[dict]:
        """The journal's finished runs of this grid (no data, no training)."""
        return run_grid(None, self.pairs, self.seeds, None, self.journal(), train_missing=False)


def render(grid: Grid, rows: list[dict]) -> str:
    """report.md of a grid: the metrics table, the comparison (with the paper's figures on MovieLens) and,
    when a model has two gated variants, the gate chosen on validation."""
    summary = summarise(rows)
    title = f"{grid.spec.name}: {', '.join(grid.kinds)}"
    paper = PAPER_MOVIELENS_AUC if grid.spec.name == "movielens-100k" else None
    table = markdown(summary, title) + "\n\n" + comparison(summary, paper)
    choice = gate_choice(summary)
    if choice:
        table += "\n\nGate variant chosen on validation (paired Δ against the base, mean ± std):\n\n" + choice
    return table


def grid_from_experiments(experiments) -> list[Grid]:
    """The grids of named experiments, each with its resolved spec and training options."""
    from model.commands import spec_from
    from model.experiment import train_defaults

    grids: dict[str, list] = {}
    for experiment in experiments:
        grids.setdefault(experiment.grid or experiment.name, []).append(experiment)
    defaults = train_defaults()
    result = []
    for name, members in grids.items():
        first = members[0]
        shared = [(e.spec, e.spec_overrides, e.seeds, e.out, e.report, e.train, e.model_options) for e in members]
        if any(s != shared[0] for s in shared[1:]):
            raise SystemExit(f"grid {name!r}: its experiments differ in spec, seeds, output or training options")
        if first.model_options:
            raise SystemExit(f"grid {name!r}: model_options are for `udg train --experiment`, not report grids")
        result.append(Grid(name=name, spec=spec_from(first.spec, list(first.spec_overrides)),
                           pairs=[(e.model, e.variant) for e in members], seeds=first.seeds,
                           train={**defaults, **first.train}, out=Path(first.out or f"results/{name}"),
                           report_name=first.report))
    return result


def grids_from_args(args: argparse.Namespace) -> list[Grid]:
    """`--experiments` names grids from the experiments file; else --spec/--models/--variants make one. Options
    given on the command line override the grid's."""
    from model.commands import data_spec
    from model.experiment import DEFAULT_SEEDS, ExperimentError, select_experiments, train_defaults

    given = {k: getattr(args, k) for k in ("epochs", "embed_wd", "threads", "device") if getattr(args, k) is not None}
    if args.experiments:
        clash = [f"--{k}" for k in ("models", "variants", "spec") if getattr(args, k) not in (None, [])]
        if clash or args.set:
            raise SystemExit(f"--experiments names the grid; drop {clash + (['--set'] if args.set else [])}")
        try:
            grids = grid_from_experiments(select_experiments(args.experiments))
        except ExperimentError as error:
            raise SystemExit(str(error)) from None
        for grid in grids:
            grid.train.update(given)
            grid.seeds = args.seeds if args.seeds is not None else grid.seeds
            grid.out = Path(args.out) if args.out else grid.out
        if args.out and len(grids) > 1:
            raise SystemExit("--out with several grids would write them into one folder")
        return grids
    kinds = [k.strip() for k in (args.models or "pnn").split(",") if k.strip()]
    variants = [v.strip() for v in (args.variants or "base,udg,double").split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if "base" not in variants:
        variants.insert(0, "base")
    spec = data_spec(args)
    return [Grid(name=spec.name, spec=spec, pairs=[(k, v) for k in kinds for v in variants],
                 seeds=args.seeds if args.seeds is not None else DEFAULT_SEEDS, train={**train_defaults(), **given},
                 out=Path(args.out or "results/report"))]


def report_grid(grid: Grid, fresh: bool = False, summary_only: bool = False) -> str:
    """Train what the grid's journal lacks (unless summary_only), then write its table and plot."""
    grid.out.mkdir(parents=True, exist_ok=True)
    journal_path = grid.out / "runs.jsonl"
    if fresh and journal_path.exists():
        journal_path.unlink()
    if summary_only:
        rows = grid.rows()
    else:
        import torch

        from model.commands import load_data

        if grid.train["threads"]:
            torch.set_num_threads(grid.train["threads"])
        rows = run_grid(load_data(grid.spec), grid.pairs, grid.seeds, grid.train_config(), grid.journal())
    if not rows:
        raise SystemExit(f"no finished runs for these models and variants in {journal_path}")
    table = render(grid, rows)
    report = grid.out / grid.report_name
    (grid.out / "runs.json").write_text(json.dumps({"data": grid.spec.fingerprint(), "rows": rows}, indent=1,
                                                   default=float))
    report.write_text(table + "\n")
    plot_path = report.with_name("auc.png" if grid.report_name == "report.md" else f"{report.stem}.png")
    plot(summarise(rows), plot_path, f"{grid.spec.name}: {', '.join(grid.kinds)}")
    print(table)
    print(f"\nwritten: {report}, {plot_path}, {grid.out / 'runs.json'}")
    return table


def run_report(args: argparse.Namespace) -> None:
    for grid in grids_from_args(args):
        report_grid(grid, fresh=args.fresh, summary_only=args.summary_only)
