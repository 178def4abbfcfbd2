"""Generated documentation: nothing here is typed by hand, and `udg docs build --check` fails when a committed
copy is stale.

- Each report grid of `experiments/experiments.toml` whose folder is under docs/results/ has its report.md
  rendered from its run journal (`model.report.render`), as `udg report --experiments GRID --summary-only`
  writes it.
- A page section between `<!-- generated: include FILE table=N [rows=A,B] -->` and `<!-- end generated -->`
  is the N-th markdown table of FILE (a generated report), optionally only the rows whose first cell is one
  of A, B; with `line=PREFIX` instead of `table=N`, the first line of FILE that starts with PREFIX (a run's
  machine and load line, quoted beside its table), with `lines=PREFIX` every such line (a run's target lines).
- Each committed benchmark journal in `BENCHMARK_REPORTS` has a report-*.md beside it: what the benchmark's
  own reprint option prints from that journal (no run), so a page includes its tables instead of a paste.
- docs/api.md is rendered from the service's OpenAPI document.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTION = re.compile(r"(<!-- generated: (?P<directive>.+?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


class DocsError(ValueError):
    """A directive that does not resolve; the message names the page and the directive."""


def pages(root: Path = ROOT) -> list[Path]:
    """The hand-written pages: README.md and every markdown page under docs/ except generated reports."""
    found = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    return [p for p in found if p.exists() and not _is_report(p, root) and p.name != "api.md"]


def _is_report(path: Path, root: Path) -> bool:
    return path.parent != root / "docs" and path.name.startswith("report") and "results" in path.parts


def markdown_tables(text: str) -> list[list[str]]:
    """The markdown tables of a text, each as its lines (header, rule, rows)."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return [t for t in tables if len(t) >= 2 and set(t[1].replace("|", "").strip()) <= set("-: ")]


def render_directive(directive: str, root: Path = ROOT, files: dict[Path, str] | None = None) -> str:
    """The body of one generated section. `files` holds freshly generated texts that override the disk."""
    words = shlex.split(directive)
    if not words or words[0] != "include" or len(words) < 3:
        raise DocsError(f"expected 'include FILE table=N [rows=A,B]', got {directive!r}")
    path = root / words[1]
    options = dict(word.split("=", 1) for word in words[2:])
    unknown = set(options) - {"table", "rows", "line", "lines"}
    if unknown:
        raise DocsError(f"{directive!r}: unknown option(s) {sorted(unknown)}")
    text = (files or {}).get(path)
    if text is None:
        if not path.exists():
            raise DocsError(f"{directive!r}: {words[1]} does not exist")
        text = path.read_text()
    for key in ("line", "lines"):
        if key not in options:
            continue
        if ({"table", "rows", "line", "lines"} - {key}) & set(options):
            raise DocsError(f"{directive!r}: {key}= includes lines, not a table")
        found = [line for line in text.splitlines() if line.startswith(options[key])]
        if not found:
            raise DocsError(f"{directive!r}: no line of {words[1]} starts with {options[key]!r}")
        return "\n".join(found if key == "lines" else found[:1]) + "\n"
    tables = markdown_tables(text)
    index = int(options.get("table", "1"))
    if not 1 <= index <= len(tables):
        raise DocsError(f"{directive!r}: {words[1]} has {len(tables)} table(s)")
    table = tables[index - 1]
    if "rows" in options:
        keep = {r.strip() for r in options["rows"].split(",")}
        body = [line for line in table[2:] if line.split("|")[1].strip() in keep]
        missing = keep - {line.split("|")[1].strip() for line in body}
        if missing:
            raise DocsError(f"{directive!r}: no row {sorted(missing)} in table {index} of {words[1]}")
        table = table[:2] + body
    return "\n".join(table) + "\n"


def render_page(text: str, root: Path = ROOT, files: dict[Path, str] | None = None, where: str = "") -> str:
    def replace(match: re.Match) -> str:
        try:
            body = render_directive(match["directive"], root, files)
        except DocsError as error:
            raise DocsError(f"{where}: {error}") from None
        return match.group(1) + body + match.group(4)

    return SECTION.sub(replace, text)


def report_files(root: Path = ROOT) -> dict[Path, str]:
    """report.md of every committed grid, rendered from its journal (imports the training side)."""
    import os

    from model.experiment import load_experiments
    from model.report import grid_from_experiments, render

    experiments = [e for e in load_experiments().values() if (e.out or "").startswith("docs/results/")]
    here = os.getcwd()
    os.chdir(root)  # the experiments' folders are relative to the repository
    try:
        return {root / grid.out / grid.report_name: render(grid, grid.rows()) + "\n"
                for grid in grid_from_experiments(experiments)}
    finally:
        os.chdir(here)


# report file -> (benchmark module, its arguments that reprint the tables of a committed journal, no run)
BENCHMARK_REPORTS = {
    "docs/results/perf/report-bench-model.md": ("loadtest.bench_model",
                                                ["--report", "docs/results/perf/bench-model-quieter.json"]),
    "docs/results/perf/report-bench-model-idle.md": ("loadtest.bench_model",
                                                     ["--report", "docs/results/perf/bench-model-idle.json"]),
    "docs/results/perf/report-bench-model-kinds.md": ("loadtest.bench_model",
                                                      ["--report", "docs/results/perf/bench-model.json"]),
    "docs/results/perf/report-bench-model-padding.md": ("loadtest.bench_model",
                                                        ["--report", "docs/results/perf/bench-model-padding.json"]),
    "docs/results/perf/report-bench-model-served.md": ("loadtest.bench_model",
                                                       ["--report", "docs/results/perf/bench-model-served.json"]),
    "docs/results/perf/report-bench-model-kinds-idle.md": (
        "loadtest.bench_model", ["--report", "docs/results/perf/bench-model-kinds-idle.json"]),
    "docs/results/perf/report-bench-model-loaded.md": ("loadtest.bench_model",
                                                       ["--report", "docs/results/perf/bench-model-loaded.json"]),
    "docs/results/perf/report-bench-model-session-options.md": (
        "loadtest.bench_model", ["--report", "docs/results/perf/bench-model-session-options.json"]),
    "docs/results/perf/report-bench-compare-batching-n100.md": (
        "loadtest.bench_compare", ["--report", "docs/results/perf/bench-compare-batching-n100.json"]),
    "docs/results/perf/report-bench-compare-batching-n500.md": (
        "loadtest.bench_compare", ["--report", "docs/results/perf/bench-compare-batching-n500.json"]),
    "docs/results/perf/report-bench-compare-int8.md": ("loadtest.bench_compare",
                                                       ["--report", "docs/results/perf/bench-compare-int8.json"]),
    "docs/results/perf/report-bench-compare.md": ("loadtest.bench_compare",
                                                  ["--report", "docs/results/perf/bench-compare.json"]),
    "docs/results/perf/report-bench-compare-before.md": ("loadtest.bench_compare",
                                                         ["--report", "docs/results/perf/bench-compare-before.json"]),
    "docs/results/perf/report-bench-compare-state-cache.md": (
        "loadtest.bench_compare", ["--report", "docs/results/perf/bench-compare-state-cache.json"]),
    "docs/results/perf/report-bench-compare-state-cache-many-users.md": (
        "loadtest.bench_compare", ["--report", "docs/results/perf/bench-compare-state-cache-many-users.json"]),
    "docs/results/perf/report-bench-compare-single-write.md": (
        "loadtest.bench_compare", ["--report", "docs/results/perf/bench-compare-single-write.json"]),
    "docs/results/perf/report-bench-compare-fast-path-ab.md": (
        "loadtest.bench_compare", ["--report", "docs/results/perf/bench-compare-fast-path-ab.json"]),
    "docs/results/perf/report-bench-compare-fast-path.md": (
        "loadtest.bench_compare", ["--report", "docs/results/perf/bench-compare-fast-path.json"]),
    "docs/results/perf/report-bench-compare-quiet.md": (
        "loadtest.bench_compare", ["--report", "docs/results/perf/bench-compare-quiet.json"]),
    "docs/results/perf/report-bench-compare-pipelined-reads.md": (
        "loadtest.bench_compare", ["--report", "docs/results/perf/bench-compare-pipelined-reads.json"]),
    "docs/results/perf/report-bench-compare-pipelined-cache.md": (
        "loadtest.bench_compare", ["--report", "docs/results/perf/bench-compare-pipelined-cache.json"]),
    "docs/results/perf/report-bench-overhead.md": ("loadtest.bench_overhead",
                                                   ["--report", "docs/results/perf/bench-overhead.json"]),
    "docs/results/perf/report-profile-service-fast-path.md": (
        "loadtest.profile_service", ["--report", "docs/results/perf/profile-service-fast-path.json"]),
    "docs/results/perf/report-profile-service.md": ("loadtest.profile_service",
                                                    ["--report", "docs/results/perf/profile-service.json"]),
    "docs/results/perf/report-profile-service-cache.md": ("loadtest.profile_service",
                                                          ["--report", "docs/results/perf/profile-service-cache.json"]),
    "docs/results/perf/report-bench-batching-gathered.md": (
        "loadtest.bench_batching", ["--report", "docs/results/perf/bench-batching-gathered.json"]),
    "docs/results/perf/report-bench-batching-users-once.md": (
        "loadtest.bench_batching", ["--report", "docs/results/perf/bench-batching-users-once.json"]),
    "docs/results/perf/report-bench-batching.md": ("loadtest.bench_batching",
                                                   ["--report", "docs/results/perf/bench-batching.json"]),
    "docs/results/cluster/report-bench.md": ("loadtest.bench_publish", ["--table", "docs/results/cluster/bench.json"]),
    "docs/results/cluster/report-failover.md": ("loadtest.failover_report",
                                                ["--report", "docs/results/cluster/failover.json"]),
    "docs/results/ddp/report-bench.md": ("loadtest.bench_ddp", ["--from-journal", "docs/results/ddp/bench.json"]),
    # a module name, or a script's path from the repository root
    "docs/results/ingest/report-bench.md": ("loadtest.bench_ingest", ["--render", "docs/results/ingest/bench.json"]),
    "docs/results/ingest/report-bench-prerefactor.md": ("loadtest.bench_ingest",
                                                        ["--render", "docs/results/ingest/bench-prerefactor.json"]),
    "docs/results/gpu/report-h100.md": ("loadtest.gpu_check", ["--report", "docs/results/gpu/h100_gpu_check.json"]),
    "docs/results/mutation/report.md": ("scripts/mutation.py", ["--report"]),
    "docs/results/report-rolling-restart.md": ("loadtest.rolling_restart",
                                               ["--table", "docs/results/rolling_restart.json"]),
    "docs/results/faults/report-http-drill.md": ("loadtest.http_drill",
                                                 ["--table", "docs/results/faults/http-drill.json"]),
    "docs/results/faults/report-fault-drill.md": ("loadtest.fault_drill",
                                                  ["--table", "docs/results/faults/fault-drill.json"]),
    "docs/results/perf/report-bench-service.md": ("loadtest.bench_service",
                                                  ["--report", "docs/results/perf/bench-service.json"]),
    "docs/results/warmup/report-summary.md": ("loadtest.bench_warmup",
                                              ["--out", "docs/results/warmup", "--summary-table"]),
}


def _benchmark_module(root: Path, module: str):
    import importlib
    import importlib.util

    if not module.endswith(".py"):
        return importlib.import_module(module)
    spec = importlib.util.spec_from_file_location(Path(module).stem, root / module)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def benchmark_files(root: Path = ROOT) -> dict[Path, str]:
    """The report-*.md of every journal in BENCHMARK_REPORTS, as its benchmark reprints it."""
    import contextlib
    import io
    import os

    here = os.getcwd()
    os.chdir(root)  # the journals' paths are relative to the repository
    try:
        files = {}
        for out, (module, args) in BENCHMARK_REPORTS.items():
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                _benchmark_module(root, module).main(args)
            command = " ".join(["python", module, *args] if module.endswith(".py") else ["python -m", module, *args])
            title = Path(out).parent.name if args[-1].startswith("--") else Path(args[-1]).name
            files[root / out] = (f"# {title}\n\nGenerated by `udg docs build` from the committed "
                                 f"journal: `{command}` prints the same.\n\n{printed.getvalue().rstrip()}\n")
        return files
    finally:
        os.chdir(here)


def api_page() -> str:
    from docsite.api import render_openapi
    from service.main import create_app

    return render_openapi(create_app().openapi())


def build(root: Path = ROOT, api: bool = True) -> dict[Path, str]:
    """Every generated file and page with generated sections, as it should be committed."""
    files = report_files(root)
    files.update(benchmark_files(root))
    for page in pages(root):
        text = page.read_text()
        if SECTION.search(text):
            files[page] = render_page(text, root, files, where=str(page.relative_to(root)))
    if api:
        files[root / "docs" / "api.md"] = api_page()
    return files


def stale_coldstart(root: Path = ROOT) -> list[Path]:
    """Cold-start reports whose tables differ from those rendered from their journals. (Their head line on
    the users and events needs the data, so only the tables, which end the file, are compared.)"""
    import json

    from model.coldstart import report_tables

    old = []
    for journal in sorted((root / "docs" / "results" / "coldstart").glob("*/runs.jsonl")):
        entries = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
        setup = entries[-1]["setup"]  # the journal's current setup; lines of another setup do not count
        rows = {(e["row"]["model"], e["row"]["variant"], e["row"]["seed"]): e["row"] for e in entries
                if e["setup"] == setup}
        report = journal.with_name("report.md")
        if not report.exists() or not report.read_text().endswith(report_tables(list(rows.values())) + "\n"):
            old.append(report)
    return old


def stale(files: dict[Path, str]) -> list[Path]:
    return [path for path, text in files.items() if not path.exists() or path.read_text() != text]
