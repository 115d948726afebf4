# Quick start: `make run` (the demo job) and `make test` (the whole suite). Both create
# .venv and install what is missing on first use.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed first, by version: pip takes the CPU wheel when one is on local disk
# (as on this project's CI machines) and PyPI's CUDA build otherwise. For a CPU-only build
# elsewhere: make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
CONSTRAINTS ?= constraints.txt
DEMO_DATA ?= data/demo
DEMO_BASE ?= $(DEMO_DATA)/base_model
DEMO_OUT ?= outputs/demo
MILORA := $(BIN)/milora

# Nothing here may call out: every tool's telemetry off, the model hub offline.
export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install run test lint format bench demo-data clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[pipeline,dev]"
	touch $(STAMP)

install: $(STAMP)

$(DEMO_BASE)/config.json: | $(STAMP)
	$(BIN)/python -m milora.demo.build --out $(DEMO_DATA)

demo-data: $(DEMO_BASE)/config.json

# The main job. For now: MiLoRA initialisation, identity check, plain-LoRA conversion and
# rank compression on the demo base model (later issues grow it into the full pipeline).
run: $(STAMP) $(DEMO_BASE)/config.json
	$(MILORA) inspect $(DEMO_BASE) --rank 8
	$(MILORA) init $(DEMO_BASE) $(DEMO_OUT)/milora-r8 --rank 8 --cache-dir .cache/svd --overwrite
	$(MILORA) init $(DEMO_BASE) $(DEMO_OUT)/milora-r4 --rank 4 --cache-dir .cache/svd --overwrite
	$(MILORA) verify $(DEMO_BASE) $(DEMO_OUT)/milora-r8
	$(MILORA) convert $(DEMO_OUT)/milora-r8 $(DEMO_OUT)/milora-r8-as-lora
	$(MILORA) inspect $(DEMO_BASE) --adapter $(DEMO_OUT)/milora-r8 --initial

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python benchmarks/svd_init.py

clean:
	rm -rf $(DEMO_OUT) .cache .pytest_cache
