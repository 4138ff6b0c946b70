# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# where torch comes from: empty = pip's configured index; https://download.pytorch.org/whl/cpu for the CPU build
TORCH_INDEX ?=
DEMO_OUT ?= runs/demo

.PHONY: setup demo test lint typecheck unit bench chromium postgres clean

setup: $(STAMP)

# torch first (the local CPU build on CPU-only machines), then the rest with ranges it satisfies,
# so pip never replaces it with a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: setup
	$(BIN)/rlhf demo --out $(DEMO_OUT)

chromium:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)

postgres:
	@pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || pg_ctlcluster --skip-systemctl-redirect $$(ls /etc/postgresql) main start || true

lint: setup
	$(BIN)/ruff check rlhf tests benchmarks
	$(BIN)/ruff format --check rlhf tests benchmarks

# mypy's cache lives beside pip's, outside the checkout: a fresh clone re-checks only the files that changed
typecheck: setup
	$(BIN)/mypy --cache-dir "$${XDG_CACHE_HOME:-$$HOME/.cache}/rlhf-loop/mypy" rlhf

unit: setup
	$(BIN)/pytest -q tests/unit

# The suite runs on every core (pytest-xdist), a test file to a worker so that module fixtures are built once.
# Bytecode is compiled once here: where PYTHONDONTWRITEBYTECODE is set, every process the tests start (the
# labeling server, the CLI) would otherwise compile the package again.
test: setup chromium postgres lint typecheck
	$(BIN)/python -m compileall -q rlhf
	$(BIN)/pytest -q -p no:cacheprovider -n auto --dist loadfile tests

bench: setup
	$(BIN)/python -m benchmarks.run

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
