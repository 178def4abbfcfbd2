"""Mutation score of the core modules: each module mutated by mutmut against the fast test files that cover it.

    python scripts/mutation.py                      # every module of MODULES (`make mutation`)
    python scripts/mutation.py --changed main       # only the modules changed since a git rev (`make mutation-changed`)
    python scripts/mutation.py --module service/registry.py --rev main --label before
    python scripts/mutation.py --report             # the table of the committed journals (docs/testing.md)
    python scripts/mutation.py --changed main --max-mutants 40 --time-budget 600   # a bounded run (CI-sized)

Each module runs in a scratch copy of the tree (build/mutation/<label>/<module>/: tracked and untracked files,
or the tree of `--rev`) with a generated `[tool.mutmut]` section, so the project's own pyproject.toml never
carries run-specific settings and several modules can be measured from one checkout. mutmut runs, for each
mutant, only the tests that executed the mutated function. A mutant whose function no mapped test executes
("no tests") counts as surviving: the score is killed / all mutants (a timeout counts as killed).
The result of each module is a journal: docs/results/mutation/<label>.json.

A bounded run (`--max-mutants N`) mutates a deterministic sample of each module's mutants: the N whose names
hash lowest (sha256), so the same code gives the same sample on every machine and a before/after comparison
sees the same mutants. `--time-budget S` stops the run after S seconds (shared by the modules still to run);
the score is then over the mutants that finished, and the journal says how many did not.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOURNALS = ROOT / "docs" / "results" / "mutation"
# The target of every core module (killed / mutants); a bounded run's sample must reach it too
# (tests/scripts/test_mutation_bounded.py runs one in the suite).
MIN_SCORE = 0.85
PACKAGES = ["service", "model", "export", "repository", "dataset", "pipeline", "loadtest"]

# module -> the fast test files that cover it (seconds per run, not minutes: a run is one pytest per mutant).
MODULES: dict[str, list[str]] = {
    "model/layers.py": ["tests/model/test_udg_math.py", "tests/model/test_udg_forward_reference.py"],
    "model/udg.py": ["tests/model/test_udg_math.py", "tests/model/test_udg_forward_reference.py"],
    # tests/model/test_meta_generator.py (beats shuffled profiles) trains for minutes: too slow per mutant
    "model/meta.py": ["tests/model/test_meta_units.py"],
    "export/runtime.py": ["tests/export/test_runtime.py", "tests/service/test_service_no_torch.py",
                          "tests/service/test_guards.py", "tests/service/test_properties.py"],
    "service/registry.py": ["tests/service/test_split_bounds.py", "tests/service/test_guards.py"],
    "service/redis_layout.py": ["tests/service/test_properties.py", "tests/service/test_state_units.py",
                                "tests/service/test_guards.py"],
    "service/feature_store.py": ["tests/service/test_feature_store.py", "tests/service/test_state_units.py",
                                 "tests/service/test_guards.py"],
    "service/control.py": ["tests/service/test_control.py", "tests/service/test_guards.py"],
    # tests/service/test_service_api.py covers it too, but costs ~50 s a run here: the direct tests suffice
    "service/scoring.py": ["tests/service/test_scoring.py"],
    "service/publish.py": ["tests/service/test_publish.py", "tests/service/test_guards.py",
                           "tests/service/test_service_store.py"],
    "dataset/schema.py": ["tests/service/test_properties.py"],
}
# torch (and onnxruntime) are not fork-safe once their thread pools run: fork a clean server per mutant instead.
FORKSERVER = {"model/layers.py", "model/udg.py", "model/meta.py"}


def changed_modules(base: str) -> list[str]:
    out = subprocess.run(["git", "diff", "--name-only", base, "--"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.split()
    untracked = subprocess.run(["git", "ls-files", "-o", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split()
    touched = set(out) | set(untracked)
    # a module is re-measured when it or one of its test files changed
    return [m for m, tests in MODULES.items() if m in touched or touched & set(tests)]


def copy_tree(target: Path, rev: str | None) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    if rev is None:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.splitlines()
        for name in files:
            source = ROOT / name
            if source.is_file() and not name.startswith("docs/results/"):
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
    else:
        archive = subprocess.run(["git", "archive", rev], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "xf", "-", "-C", str(target)], input=archive, check=True)


def located(tree: Path, test: str) -> str | None:
    """`test` as it is found in `tree`: where MODULES names it, or in the flat tests/ of revisions before
    tests/ mirrored the packages (tests/service/test_x.py was tests/test_x.py); None if absent."""
    path, _, rest = test.partition("::")
    for candidate in (path, f"tests/{Path(path).name}"):
        if (tree / candidate).exists():
            return candidate + (f"::{rest}" if rest else "")
    return None


def configure(tree: Path, module: str, tests: list[str]) -> list[str]:
    present = [t for t in (located(tree, test) for test in tests) if t]
    if not present:  # no covering test at this rev: a test that runs nothing, so every mutant is "no tests"
        (tree / "tests" / "test_mutation_placeholder.py").write_text("def test_nothing():\n    pass\n")
        present = ["tests/test_mutation_placeholder.py"]
    section = {
        "source_paths": PACKAGES,
        "also_copy": ["udg_cli.py"],
        "only_mutate": [module],
        "pytest_add_cli_args_test_selection": present,
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-q", "-x"],
        "process_isolation": "forkserver" if module in FORKSERVER else "fork",
        "use_git_change_detection": False,
    }
    lines = ["", "[tool.mutmut]"] + [f"{key} = {json.dumps(value)}" for key, value in section.items()]
    with open(tree / "pyproject.toml", "a") as handle:
        handle.write("\n".join(lines) + "\n")
    return present


# run inside a configured scratch tree: mutmut's own generator lists the module's mutants without running any
LIST_MUTANTS = """
import json, sys
from pathlib import Path
from mutmut.mutation.file_mutation import mutate_file_contents
from mutmut.utils.format_utils import get_mutant_name
module = sys.argv[1]
names = mutate_file_contents(module, Path(module).read_text()).mutant_names
print(json.dumps([get_mutant_name(Path(module), name) for name in names]))
"""


def list_mutants(tree: Path, module: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", LIST_MUTANTS, module], cwd=tree, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": ""}).stdout
    return json.loads(out)


def sample_mutants(names: list[str], n: int) -> list[str]:
    """The n names that hash lowest: deterministic, spread over the whole module, stable when other functions
    change (a name is module.function__mutmut_k)."""
    return sorted(sorted(names, key=lambda name: hashlib.sha256(name.encode()).hexdigest())[:n])


def count(tree: Path, only: list[str] | None = None) -> tuple[dict[str, int], list[str]]:
    mutmut = Path(sys.executable).with_name("mutmut")
    out = subprocess.run([str(mutmut), "results", "--all", "true"], cwd=tree, capture_output=True, text=True).stdout
    counts: dict[str, int] = {}
    survivors = []
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if name and (not only or any(fnmatch.fnmatchcase(name, pattern) for pattern in only)):
            counts[status] = counts.get(status, 0) + 1
            if status in ("survived", "no tests"):
                survivors.append(f"{name}: {status}")
    return counts, survivors


def run_module(module: str, label: str, rev: str | None, jobs: int, only: list[str] | None = None,
               recount: bool = False, max_mutants: int | None = None, budget_s: float | None = None,
               tests: list[str] | None = None) -> dict:
    """Mutate `module` (only the mutants whose names match `only`, if given; a sample of `max_mutants` of
    them, if given) in a scratch tree, for at most `budget_s` seconds, against `tests` (default: its
    mapping); `recount` reads the results of an earlier run of that tree again without running."""
    tree = ROOT / "build" / "mutation" / label / module.replace("/", "_").removesuffix(".py")
    if recount:
        counts, survivors = count(tree, only)
        total = sum(counts.values())
        killed = counts.get("killed", 0) + counts.get("timeout", 0)
        return {"module": module, "label": label, "rev": rev or "working tree", "only": only, "counts": counts,
                "mutants": total, "killed": killed, "score": round(killed / total, 4) if total else None,
                "seconds": None, "survivors": survivors, "tests": MODULES[module]}
    copy_tree(tree, rev)
    tests = configure(tree, module, tests or MODULES[module])
    population = None
    if max_mutants is not None:
        names = list_mutants(tree, module)
        if only:
            names = [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in only)]
        population = len(names)
        only = sample_mutants(names, max_mutants)
    mutmut = Path(sys.executable).with_name("mutmut")
    # the tiny model the service tests share is trained once for all mutants (tests/conftest.py)
    env = {**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1", "UDG_HYPOTHESIS_PROFILE": "mutation",
           "UDG_TEST_MODEL_CACHE": str(ROOT / "build" / "mutation" / "model_cache")}
    started = time.perf_counter()
    log = tree / "mutmut.log"
    with open(log, "w") as handle:
        # its own session: on the budget, the whole group (mutmut and its forked children) is stopped
        process = subprocess.Popen([str(mutmut), "run", "--max-children", str(jobs), *(only or [])], cwd=tree,
                                   env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            process.wait(timeout=budget_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    seconds = time.perf_counter() - started
    counts, survivors = count(tree, only)
    unfinished = counts.pop("not checked", 0)  # the budget ran out first: neither killed nor survived
    total = sum(counts.values())
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    result = {"module": module, "label": label, "rev": rev or "working tree", "only": only, "tests": tests,
              "counts": counts,
              "mutants": total, "killed": killed, "score": round(killed / total, 4) if total else None,
              "seconds": round(seconds, 1), "survivors": survivors}
    if population is not None:
        result.update(sample=max_mutants, population=population, unfinished=unfinished)
    return result


def write_journal(label: str, result: dict) -> None:
    JOURNALS.mkdir(parents=True, exist_ok=True)
    path = JOURNALS / f"{label}.json"
    journal = json.loads(path.read_text()) if path.exists() else {}
    journal[result["module"] + (f" ({result['scope']})" if result.get("scope") else "")] = result
    path.write_text(json.dumps(journal, indent=1, sort_keys=True) + "\n")


def report() -> str:
    journals = {p.stem: json.loads(p.read_text()) for p in sorted(JOURNALS.glob("*.json"))}
    modules = sorted({m for journal in journals.values() for m in journal})
    labels = list(journals)
    head = "| module | " + " | ".join(f"{label}: killed / mutants (score)" for label in labels) + " |"
    rows = [head, "|---|" + "---|" * len(labels)]
    totals = {label: [0, 0] for label in labels}
    for module in modules:
        cells = []
        in_all = all(module in journal for journal in journals.values())
        for label in labels:
            result = journals[label].get(module)
            if result is None:
                cells.append("not measured")
                continue
            if in_all:  # the total compares like with like: rows measured under every label
                totals[label][0] += result["killed"]
                totals[label][1] += result["mutants"]
            took = f", {result['seconds']:.0f} s" if result.get("seconds") else ""
            if result.get("unfinished"):  # the time budget ran out first
                took += f", {result['unfinished']} unfinished"
            cells.append(f"{result['killed']} / {result['mutants']} ({result['score'] or 0:.0%}{took})")
        sampled = next((j[module] for j in journals.values() if j.get(module, {}).get("population")), None)
        name = (f"`{sampled['module']}` ({sampled['scope']} of {sampled['population']} mutants)" if sampled
                else f"`{module}`")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    rows.append("| rows measured under every label | " + " | ".join(
        f"{k} / {n} ({k / n:.0%})" if n else "-" for k, n in totals.values()) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", action="append", choices=sorted(MODULES), help="a module (repeatable)")
    parser.add_argument("--changed", metavar="REV", help="only the modules (or their tests) changed since REV")
    parser.add_argument("--rev", help="measure the tree of this git rev instead of the working tree")
    parser.add_argument("--label", default="current", help="journal name (docs/results/mutation/LABEL.json)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants run in parallel")
    parser.add_argument("--report", action="store_true", help="print the table of the committed journals")
    parser.add_argument("--only", action="append", metavar="GLOB",
                        help="only the mutants whose names match (mutmut names: module.x_function__mutmut_N)")
    parser.add_argument("--scope", help="a name for the --only subset (the journal row is 'module (scope)')")
    parser.add_argument("--recount", action="store_true", help="re-read an earlier run's results (with --only)")
    parser.add_argument("--min-score", type=float, nargs="?", const=MIN_SCORE, default=None,
                        help=f"exit 1 when a module scores below this (alone: the target, {MIN_SCORE})")
    parser.add_argument("--tests", action="append", metavar="FILE",
                        help="test files instead of the module's mapping (e.g. an older rev's mapping)")
    parser.add_argument("--json", metavar="FILE", help="write the results there instead of the journal")
    parser.add_argument("--max-mutants", type=int, metavar="N",
                        help="a deterministic sample of N mutants per module (a bounded run)")
    parser.add_argument("--time-budget", type=float, metavar="S",
                        help="stop after S seconds in all; the score covers the mutants that finished")
    args = parser.parse_args(argv)
    if args.report:
        print(report())
        return 0
    modules = args.module or (changed_modules(args.changed) if args.changed else list(MODULES))
    if not modules:
        print("no core module changed")
        return 0
    failed = False
    results = []
    deadline = None if args.time_budget is None else time.monotonic() + args.time_budget
    for left, module in zip(range(len(modules), 0, -1), modules, strict=True):
        budget = None if deadline is None else max(1.0, (deadline - time.monotonic()) / left)
        result = run_module(module, args.label, args.rev, args.jobs, args.only, args.recount, args.max_mutants,
                            budget, args.tests)
        result["scope"] = args.scope or (f"sample of {args.max_mutants}" if args.max_mutants else None)
        results.append(result)
        if not result["mutants"] and not args.recount:  # mutmut stopped before any mutant (e.g. red clean tests)
            log = ROOT / "build" / "mutation" / args.label / module.replace("/", "_").removesuffix(".py") / "mutmut.log"
            print(f"{module}: no mutant ran; see {log.relative_to(ROOT)} (journal not changed)", flush=True)
            failed = True
            continue
        if args.json is None:
            write_journal(args.label, result)
        print(f"{module}: {result['killed']} / {result['mutants']} killed ({result['score']}) in "
              f"{result['seconds']} s; {result['counts']}"
              + (f"; {result['unfinished']} unfinished" if result.get("unfinished") else ""), flush=True)
        if args.min_score is not None and (result["score"] or 0) < args.min_score:
            failed = True
    if args.json is not None:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
