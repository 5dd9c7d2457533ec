# Two commands on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 3000
export BENTOML_DO_NOT_TRACK := True
# Local development serves without JWT auth; production sets NEURONOVA_AUTH__SECRET and leaves auth on.
SERVE_ENV ?= NEURONOVA_AUTH__ENABLED=false
COVERAGE_FLOOR ?= 95

.PHONY: install serve test bench models bento bento-gpu clean

$(BIN)/.installed: pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

models: install  ## train the demo models into the local model store when absent
	$(BIN)/python -m training_export ensure-demo

serve: models  ## set up, train demo models if absent, serve on :3000
	$(SERVE_ENV) $(BIN)/bentoml serve service:NeuroNova --port $(PORT)

test: install  ## set up and run the whole suite with coverage (exit code 5, no tests collected, is a failure)
	BENTOML_HOME=$(CURDIR)/.bentoml-test $(BIN)/python -m pytest --cov --cov-report=term --cov-fail-under=$(COVERAGE_FLOOR)

bench: models  ## benchmarks (see docs/performance.md)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/ct.py
	$(BIN)/python bench/mri.py
	$(BIN)/python bench/biomarker.py

bento: models  ## build the Bento (then: bentoml containerize neuronova:latest)
	$(BIN)/bentoml build

bento-gpu: models  ## the GPU Bento (CUDA base image; then: bentoml containerize neuronova-gpu:latest)
	$(BIN)/python deploy/build_gpu_bento.py

clean:
	rm -rf $(VENV) .bentoml-test .pytest_cache .coverage .coverage.*
