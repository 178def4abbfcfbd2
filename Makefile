# Set-up and everyday targets. `make run` and `make test` are the two commands of the README.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so that pip takes the local CPU wheel on the project's machines instead of a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= train,serve,loadtest,dev,docs,otel

.PHONY: install serve-install run test lint clean-venv loadtest bench-compare docs mutation mutation-changed mutation-bounded

$(BIN)/udg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/udg

# The serving install: no torch.
serve-install:
	$(PYTHON) -m venv $(VENV)-serve
	$(VENV)-serve/bin/pip install -q -e ".[serve]"

run: install
	$(BIN)/udg quickstart

test: install
	$(BIN)/pytest -q

# Headless load test of a locally started stack (private Redis, small synthetic model, 2 workers); report in
# results/loadtest/. LOADTEST_ARGS passes more flags, e.g. LOADTEST_ARGS="--run-time 120 --users 32".
LOADTEST_ARGS ?=
loadtest: install
	$(BIN)/udg loadtest $(LOADTEST_ARGS)

# Service vs in-process floor/ceiling vs a naive FastAPI+PyTorch baseline at N=500: one table (a few minutes).
bench-compare: install
	$(BIN)/udg bench compare --json results/bench_compare.json

# The documentation site (mkdocs-material, offline: no web fonts, no CDN) into site/, after checking that the
# generated pages are fresh and every link and quoted command resolves.
docs: install
	$(BIN)/udg docs build --check
	$(BIN)/udg docs check
	$(BIN)/mkdocs build --strict

# Mutation score of the core modules, each against the fast tests that cover it (docs/testing.md; ~1 h on 2
# cores); journals in docs/results/mutation/. `mutation-changed` mutates only the modules changed since BASE;
# `mutation-bounded` a deterministic sample of theirs in a time budget, failing below the 85% target (its
# result in build/mutation/bounded.json, not a journal).
BASE ?= main
MUTANTS ?= 30
BUDGET_S ?= 900
mutation: install
	$(BIN)/python scripts/mutation.py --label current

mutation-changed: install
	$(BIN)/python scripts/mutation.py --changed $(BASE) --label changed

mutation-bounded: install
	mkdir -p build/mutation
	$(BIN)/python scripts/mutation.py --changed $(BASE) --max-mutants $(MUTANTS) --time-budget $(BUDGET_S) \
		--min-score --jobs 1 --label bounded --json build/mutation/bounded.json

lint: install
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV) $(VENV)-serve
