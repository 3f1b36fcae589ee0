# whisper-obs: `make run` (the whole default pipeline) and `make test` (the test suite).
# Both create .venv and install pinned requirements on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export HF_HUB_DISABLE_TELEMETRY := 1
# Converted bundled models are cached here (once per checkout, reused by every stage).
export WHISPER_OBS_CACHE ?= $(abspath .cache)
UI_PORT ?= 5000

.PHONY: install run frontier test test-slow test-all ui bench lint format clean-runs

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

## run: the full default pipeline (calibrate -> prune -> evaluate, sweep), then the table
run: install
	dvc repro calibrate prune evaluate sweep
	@python -m whisper_obs_pruning.pipeline.report

## frontier: WER vs compressed-checkpoint size (sparse x int8/int4 GPTQ), metrics/frontier/
frontier: install
	dvc repro frontier
	@python -m whisper_obs_pruning.pipeline.report metrics/frontier

## test: the default test suite (< 15 min on 2 cores); `make test-all` adds the slow tests
test: install
	python -m pytest -m "not slow"

## test-slow: only the slow tests (bundled base parity, queued experiments, tracking server + remote)
test-slow: install
	python -m pytest -m slow

test-all: install
	python -m pytest

## ui: the MLflow UI on http://127.0.0.1:$(UI_PORT) over the local store
ui: install
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server --host 127.0.0.1 --port $(UI_PORT) \
	  --backend-store-uri sqlite:///$(abspath mlflow.db) --workers 1

## bench: speed, memory and quality benchmarks -> metrics/bench/
bench: install
	python bench/run_all.py

lint: install
	ruff check src stages tests bench scripts
	ruff format --check src stages tests bench scripts

format: install
	ruff format src stages tests bench scripts
	ruff check --fix src stages tests bench scripts
