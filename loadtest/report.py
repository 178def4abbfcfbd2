"""Turn a headless locust run's CSV files into a PNG plot and a markdown summary.

    python -m loadtest.report OUT_DIR            # (re)builds OUT_DIR/latency_throughput.png and summary.md

Reads what `locust --csv OUT_DIR/locust --csv-full-history` writes:
- `locust_stats.csv`: one row per request type (`Type`, `Name`) plus `Aggregated`: counts, failures, RPS and
  response-time percentiles (ms) over the whole run;
- `locust_stats_history.csv`: one row per second (and per request type with --csv-full-history): the current
  RPS and the percentiles of a sliding window, which is what the plot shows over time;
- optionally `swaps.json` (written by `udg loadtest --swap`): model-version swaps, marked on the plot.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

STATS_FILE, HISTORY_FILE, FAILURES_FILE = "locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv"
PLOT_FILE, SUMMARY_FILE, SWAPS_FILE = "latency_throughput.png", "summary.md", "swaps.json"
PERCENTILES = ("50%", "95%", "99%")
MAX_FAILURE_ROWS = 20


def _number(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "", "N/A") else math.nan
    except ValueError:
        return math.nan


@dataclass
class StatsRow:
    type: str
    name: str
    requests: int
    failures: int
    rps: float
    median_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @property
    def label(self) -> str:
        return self.name if self.name == "Aggregated" else f"{self.type} {self.name}"


def read_stats(path: Path) -> list[StatsRow]:
    """locust_stats.csv -> rows, `Aggregated` last."""
    rows = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append(StatsRow(type=row.get("Type", ""), name=row.get("Name", ""),
                                 requests=int(_number(row.get("Request Count")) or 0),
                                 failures=int(_number(row.get("Failure Count")) or 0),
                                 rps=_number(row.get("Requests/s")), median_ms=_number(row.get("Median Response Time")),
                                 p50_ms=_number(row.get("50%")), p95_ms=_number(row.get("95%")),
                                 p99_ms=_number(row.get("99%")), max_ms=_number(row.get("Max Response Time"))))
    rows.sort(key=lambda r: r.name == "Aggregated")
    return rows


def read_history(path: Path) -> tuple[float | None, dict[str, dict[str, list[float]]]]:
    """locust_stats_history.csv -> (unix time of the first row, {request label: {"t": seconds since that row,
    "rps", "failures/s", "users", "50%", "95%", "99%"}})."""
    series: dict[str, dict[str, list[float]]] = {}
    start = None
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            stamp = _number(row.get("Timestamp"))
            if math.isnan(stamp):
                continue
            start = stamp if start is None else start
            name = row.get("Name", "")
            label = name if name == "Aggregated" else f"{row.get('Type', '')} {name}"
            entry = series.setdefault(label, {"t": [], "rps": [], "users": [], "failures/s": [], "total": [],
                                              "failed": [], **{p: [] for p in PERCENTILES}})
            entry["t"].append(stamp - start)
            entry["total"].append(_number(row.get("Total Request Count")))
            entry["failed"].append(_number(row.get("Total Failure Count")))
            entry["users"].append(_number(row.get("User Count")))
            for p in PERCENTILES:  # 0 / N/A before the first answer: no point rather than a drop to 0
                value = _number(row.get(p))
                entry[p].append(value if value > 0 else math.nan)
    for entry in series.values():
        # Throughput per sampling interval, from the cumulative counts (locust's own Requests/s column is a
        # moving average that lags a change by several seconds).
        for rate, count in (("rps", "total"), ("failures/s", "failed")):
            values, times = entry[count], entry["t"]
            entry[rate] = [math.nan] + [(values[i] - values[i - 1]) / (times[i] - times[i - 1])
                                        if times[i] > times[i - 1] else math.nan for i in range(1, len(values))]
    return start, series


def read_swaps(out_dir: Path) -> list[dict]:
    path = out_dir / SWAPS_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def plot(history: dict[str, dict[str, list[float]]], swaps: list[dict], path: Path, title: str = "") -> None:
    """Two panels over time: latency percentiles (ms, aggregated and per request type) and throughput (req/s).
    Each swap is {"t": seconds on the same axis, "version": ..., "ok": bool}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True, height_ratios=(3, 2))
    aggregated = history.get("Aggregated")
    styles = {"50%": "-", "95%": "--", "99%": ":"}
    if aggregated:
        for p in PERCENTILES:
            top.plot(aggregated["t"], aggregated[p], styles[p], color="black", label=f"all p{p[:-1]}")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, entry) in enumerate(sorted((k, v) for k, v in history.items() if k != "Aggregated")):
        colour = colours[i % len(colours)]
        top.plot(entry["t"], entry["99%"], styles["99%"], color=colour, alpha=0.8, label=f"{label} p99")
        top.plot(entry["t"], entry["50%"], styles["50%"], color=colour, alpha=0.8, label=f"{label} p50")
        bottom.plot(entry["t"], entry["rps"], color=colour, alpha=0.8, label=label)
    if aggregated:
        bottom.plot(aggregated["t"], aggregated["rps"], color="black", label="all requests")
        if any(v > 0 for v in aggregated["failures/s"] if not math.isnan(v)):
            bottom.plot(aggregated["t"], aggregated["failures/s"], color="red", label="failures/s")
    for swap in swaps:
        for axis in (top, bottom):
            axis.axvline(swap["t"], color="tab:red", linestyle="-.", linewidth=1)
        top.annotate(f"swap → {swap['version']}" + ("" if swap.get("ok", True) else " (failed)"),
                     (swap["t"], 0.02), xycoords=("data", "axes fraction"), rotation=90, va="bottom", ha="right",
                     fontsize=8, color="tab:red")
    top.set_ylabel("latency, ms (sliding window)")
    top.set_yscale("log")
    top.grid(True, which="both", alpha=0.3)
    top.legend(fontsize=7, ncol=2, loc="upper left")
    bottom.set_ylabel("requests/s (per interval)")
    bottom.set_xlabel("seconds since the first sample")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize=7, loc="upper left")
    fig.suptitle(title or "udg load test: latency and throughput over time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def summary_markdown(rows: list[StatsRow], swaps: list[dict], context: dict | None = None,
                     failures: list[dict] | None = None) -> str:
    context = context or {}
    total = next((r for r in rows if r.name == "Aggregated"), None)
    lines = ["# udg load test summary", ""]
    for key, value in context.items():
        lines.append(f"- **{key}**: {value}")
    if context:
        lines.append("")
    if total is not None:
        share = total.failures / total.requests if total.requests else 0.0
        lines += [f"**{total.rps:,.1f} requests/s** over {total.requests:,d} requests; "
                  f"**{total.failures:,d} failures** ({100 * share:.2f}%).", ""]
    lines += ["| request | requests | failures | req/s | p50 ms | p95 ms | p99 ms | max ms |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        label = "**all**" if r.name == "Aggregated" else f"`{r.label}`"
        lines.append(f"| {label} | {r.requests:,d} | {r.failures:,d} | {r.rps:,.1f} | {_ms(r.p50_ms)} | "
                     f"{_ms(r.p95_ms)} | {_ms(r.p99_ms)} | {_ms(r.max_ms)} |")
    if failures:
        failures = sorted(failures, key=lambda f: -_number(f.get("Occurrences")))
        lines += ["", "## Failures", ""]
        if len(failures) > MAX_FAILURE_ROWS:
            rest = sum(int(_number(f.get("Occurrences")) or 0) for f in failures[MAX_FAILURE_ROWS:])
            lines += [f"The {MAX_FAILURE_ROWS} most frequent of {len(failures)} distinct errors ({rest:,d} "
                      f"occurrences of the others are not listed; see `{FAILURES_FILE}`).", ""]
            failures = failures[:MAX_FAILURE_ROWS]
        lines += ["| request | error | occurrences |", "|---|---|---:|"]
        for f in failures:
            error = str(f.get("Error", "")).replace("|", "\\|").replace("\n", " ")[:200]
            lines.append(f"| `{f.get('Method', '')} {f.get('Name', '')}` | {error} | {f.get('Occurrences', '')} |")
    if swaps:
        lines += ["", "## Model-version swaps", "", "| t (s) | version | result |", "|---:|---|---|"]
        for s in swaps:
            result = str(s.get("result", "ok")).replace("|", "\\|")
            lines.append(f"| {s['t']:.1f} | {s['version']} | {result[:160]} |")
    lines += ["", f"Files: `{STATS_FILE}` (whole run), `{HISTORY_FILE}` (per second), `{FAILURES_FILE}`, "
              f"`report.html` (locust's report), `{PLOT_FILE}`.", ""]
    return "\n".join(lines)


def read_failures(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def build(out_dir: Path, context: dict | None = None) -> tuple[list[StatsRow], Path, Path]:
    """Write the plot and the summary for a finished run in `out_dir`; returns (stats rows, plot, summary)."""
    out_dir = Path(out_dir)
    rows = read_stats(out_dir / STATS_FILE)
    swaps = read_swaps(out_dir)
    history_file = out_dir / HISTORY_FILE
    start, history = read_history(history_file) if history_file.is_file() else (None, {})
    for swap in swaps:  # swaps.json holds unix times ("at"); the plot's axis starts at the first history row
        swap["t"] = swap["at"] - start if start is not None else 0.0
    plot_path = out_dir / PLOT_FILE
    plot(history, swaps, plot_path, title=str((context or {}).get("title", "")))
    summary_path = out_dir / SUMMARY_FILE
    context = {k: v for k, v in (context or {}).items() if k != "title"}
    summary_path.write_text(summary_markdown(rows, swaps, context, read_failures(out_dir / FAILURES_FILE)))
    return rows, plot_path, summary_path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    _, plot_file, summary_file = build(Path(sys.argv[1]))
    print(summary_file.read_text())
