# geogate: two commands on a fresh machine.
#   make run    creates .venv, installs everything, runs the embedded default world
#   make test   installs what tests need and runs the whole suite
# (make test-unit: the in-process tier alone, under a minute; make lint: ruff and the import layers)
# GPU=1 installs onnxruntime-gpu instead of onnxruntime (never both: they share a folder).

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
GPU    ?= 0
ORT_EXTRA := $(if $(filter 1,$(GPU)),gpu,cpu)
ORT_OTHER := $(if $(filter 1,$(GPU)),onnxruntime,onnxruntime-gpu)
STAMP  := $(VENV)/.installed-$(ORT_EXTRA)

.PHONY: run test test-unit lint install system-deps triton-env clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@# CPU and GPU builds are mutually exclusive: remove the other one first.
	@if $(PIP) show -q $(ORT_OTHER) >/dev/null 2>&1; then $(PIP) uninstall -y -q $(ORT_OTHER) onnxruntime onnxruntime-gpu; fi
	$(PIP) install -q -e ".[$(ORT_EXTRA),test]"
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

system-deps:
	@bash scripts/system-deps.sh

# A real NVIDIA Triton 2.51 server (from the nvidia-pytriton wheel) in its own .venv-triton.
# ... and NVIDIA's perf_analyzer (from the tritonclient 2.51.0 wheel) next to it.
triton-env:
	@bash scripts/triton-env.sh >/dev/null
	@bash scripts/perf-analyzer.sh >/dev/null

run: install
	$(VENV)/bin/geogate up

# Everything: the unit tier (full hypothesis example counts), then the end-to-end tier.
test: install system-deps triton-env
	ORT_DISABLE_TELEMETRY=1 $(VENV)/bin/python -m pytest -q -p no:cacheprovider --hypothesis-profile=full \
		tests/unit tests/e2e $(PYTEST_ARGS)

# The fast tier: in-process tests only (no processes), fewer fuzz examples (tests/fuzzing.py).
test-unit: install
	ORT_DISABLE_TELEMETRY=1 $(VENV)/bin/python -m pytest -q -p no:cacheprovider --hypothesis-profile=unit \
		tests/unit $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .venv-triton .geogate
