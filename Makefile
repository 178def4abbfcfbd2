# Set-up and everyday targets. `make run` and `make test` are the two commands of the README.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned so that pip takes the local CPU wheel on the project's machines instead of a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= train,serve,loadtest,dev

.PHONY: install serve-install run test lint clean-venv

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

lint: install
	$(BIN)/ruff check .

clean-venv:
	rm -rf $(VENV) $(VENV)-serve
