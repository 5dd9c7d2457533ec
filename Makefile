# Two commands on a fresh machine: `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TOOLS := .venv-tools
PORT ?= 3000
HOST ?= 127.0.0.1
export BENTOML_DO_NOT_TRACK := True
# Local development serves without JWT auth, on loopback only (the service refuses to start open on another address);
# production sets NEURONOVA_AUTH__SECRET (>= 32 bytes) and leaves auth on.
SERVE_ENV ?= NEURONOVA_AUTH__ENABLED=false
COVERAGE_FLOOR ?= 95

.PHONY: install tools viewer-loaders demo serve test bench models export-demo bento bento-gpu clean

$(BIN)/.installed: pyproject.toml requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile -e ".[test]"  # byte-compiling every installed module on the spot: ~50 s of a fresh install
	touch $@

install: $(BIN)/.installed

# The OHIF viewer's own DICOM loaders (Node packages pinned by tests/viewer/package-lock.json) that
# tests/viewer_loaders.py runs on our result objects; install scripts are not run (none is needed).
VIEWER_MODULES := tests/viewer/node_modules/.installed
NPM := $(shell command -v npm 2>/dev/null)

$(VIEWER_MODULES): tests/viewer/package.json tests/viewer/package-lock.json
	npm ci --prefix tests/viewer --ignore-scripts --no-audit --no-fund
	touch $@

viewer-loaders: $(if $(NPM),$(VIEWER_MODULES))  ## install the viewer loaders where npm is (else their tests skip; CI: fail)

# The programs the tests call (checkov), in a virtual environment of their own: their pins conflict with the service's.
$(TOOLS)/.installed: requirements-tools.txt
	test -x $(TOOLS)/bin/python || $(PY) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q --upgrade pip
	$(TOOLS)/bin/pip install -q -r requirements-tools.txt
	touch $@

tools: $(TOOLS)/.installed  ## the tests' command-line tools (checkov) in .venv-tools

demo: install  ## import the shipped demo models (demo_models/) into the local model store when absent
	$(BIN)/python -m training_export ensure-demo

models: install  ## retrain every demo model from code into the local model store (~10 min on 2 cores)
	$(BIN)/python -m training_export ensure-demo --retrain

export-demo: install  ## rewrite demo_models/ from the store's latest versions (after `make models`)
	$(BIN)/python -m training_export export-demo

serve: demo  ## set up, import the shipped demo models if absent, serve on 127.0.0.1:3000
	$(SERVE_ENV) $(BIN)/bentoml serve service:NeuroNova --host $(HOST) --port $(PORT)

test: install tools viewer-loaders  ## set up and run the whole suite with coverage (exit code 5, no tests collected, is a failure)
	BENTOML_HOME=$(CURDIR)/.bentoml-test $(BIN)/python -m pytest --cov --cov-report=term --cov-fail-under=$(COVERAGE_FLOOR)

bench: demo  ## benchmarks (see docs/performance.md)
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/ct.py
	$(BIN)/python bench/mri.py
	$(BIN)/python bench/biomarker.py

bento: demo  ## build the Bento (then: bentoml containerize neuronova:latest)
	$(BIN)/bentoml build

bento-gpu: demo  ## the GPU Bento (CUDA base image; then: bentoml containerize neuronova-gpu:latest)
	$(BIN)/python deploy/build_gpu_bento.py

clean:
	rm -rf $(VENV) $(TOOLS) .bentoml-test .pytest_cache .coverage .coverage.*
