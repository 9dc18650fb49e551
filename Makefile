# The two set-up commands of the README: `make demo` and `make test`. Both create .venv when missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The one install step; infra/docker/Dockerfile runs the same command (tests/test_infra_docker.py checks it).
INSTALL_CMD := DS_BUILD_OPS=0 pip install --no-cache-dir -e '.[dev]'
export OMP_NUM_THREADS ?= 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0
export RAY_TMPDIR ?= /tmp/dd2ray
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1

.PHONY: venv test test-fast demo bench lint mlflow-server clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	source $(VENV)/bin/activate && $(INSTALL_CMD)
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

demo: venv
	$(PY) jobs/demo.py

bench: venv
	$(PY) jobs/benchmark.py toy --family var --out runs/bench/toy_var.json

lint: venv
	$(VENV)/bin/ruff check dd2dist jobs data_pipelines tests infra

mlflow-server: venv
	$(PY) infra/mlflow/local_server.py --root runs/mlflow --port 5000

clean:
	rm -rf runs/ .pytest_cache
