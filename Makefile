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
# Prefect keeps its local state (the temporary server's database) in the project.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install run compare year chain-year method-demo deploy test lint format bench demo-data clean experiments

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[pipeline,harness,cluster,dev]"
	touch $(STAMP)

install: $(STAMP)

$(DEMO_BASE)/config.json: | $(STAMP)
	$(BIN)/python -m milora.demo.build --out $(DEMO_DATA)

demo-data: $(DEMO_BASE)/config.json

# The main job: the retraining flow on the demo world (Prefect without a server, MLflow on
# a local SQLite store, DVC with a local cache and remote). A second run with unchanged data
# and params retrains nothing.
run: $(STAMP) $(DEMO_BASE)/config.json
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m flows.retrain

# DVC experiments side by side, readable: the settings that differ between them and the
# numbers that matter (scores, forgetting, n, loss), not every policy and string. Run
# experiments with `dvc exp run --temp -S train.rank=8` (in a temporary copy: the workspace
# the scheduled flow uses, params.yaml included, is never changed).
EXP_COLUMNS ?= train\.(method|rank|alpha|profile|target_modules)$$|.*\.(score|forgetting|n)$$|(train_loss|global_step)$$
experiments:
	$(BIN)/dvc exp show --only-changed --drop '.*' --keep '$(EXP_COLUMNS)' $(EXP_SHOW_ARGS)

# The method comparison on the demo world (params.yaml `compare`): lora, pissa and milora,
# 3 seeds each plus a learning-rate sweep, scored along training -> outputs/compare.
compare: $(STAMP) $(DEMO_BASE)/config.json
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m flows.compare

# A year of scheduled retraining on the demo world: each monthly drop (data/demo/company,
# then data/demo/later_drops) lands in a scratch copy of the project and the retrain flow
# runs there -> outputs/year/table.md, table.csv, year.png. YEAR_ARGS="--months 2
# --set train.profiles.demo.max_steps=20 --keep --keep-going".
YEAR_ARGS ?=
year: $(STAMP) $(DEMO_BASE)/config.json
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/year_simulation.py $(YEAR_ARGS)

# Retraining from the champion against retraining from the base, over the demo year: full,
# continue and refold x milora and lora -> outputs/retrain_over_time/ (table, months.png,
# verdict.json). CHAIN_ARGS="--months 3 --methods milora".
CHAIN_ARGS ?=
chain-year: $(STAMP) $(DEMO_BASE)/config.json
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python benchmarks/retrain_over_time.py $(CHAIN_ARGS)

# The method alone: spectrum, MiLoRA init (cold, then from the cache), identity check,
# plain-LoRA conversion, where the adapter sits in the spectrum.
method-demo: $(STAMP) $(DEMO_BASE)/config.json
	$(MILORA) inspect $(DEMO_BASE) --rank 8
	$(MILORA) init $(DEMO_BASE) $(DEMO_OUT)/milora-r8 --rank 8 --cache-dir .cache/svd --overwrite
	$(MILORA) init $(DEMO_BASE) $(DEMO_OUT)/milora-r4 --rank 4 --cache-dir .cache/svd --overwrite
	$(MILORA) verify $(DEMO_BASE) $(DEMO_OUT)/milora-r8
	$(MILORA) convert $(DEMO_OUT)/milora-r8 $(DEMO_OUT)/milora-r8-as-lora
	$(MILORA) inspect $(DEMO_BASE) --adapter $(DEMO_OUT)/milora-r8 --initial

# Register the prefect.yaml deployments (needs PREFECT_API_URL of a running server).
deploy: $(STAMP)
	MILORA_PROJECT_DIR="$(CURDIR)" $(BIN)/prefect --no-prompt deploy --all

# Monitoring. Ports of `make ui` (both on 127.0.0.1 only).
PREFECT_UI_PORT ?= 4200
MLFLOW_UI_PORT ?= 5000
.PHONY: report ui alerts

# The HTML report: a page per retrain run (outputs/runs/*.json) and the index, with the
# registry's history; prints the index path. REPORT_ARGS=--rebuild redraws every page.
report: $(STAMP)
	$(BIN)/python -m tasks.html_report $(REPORT_ARGS)

# Prefect UI (this project's PREFECT_HOME: runs of `make run` show up) and MLflow UI (the
# project's SQLite store and artifacts), each in its own process group; Ctrl-C stops both.
ui: $(STAMP)
	@echo "Prefect UI: http://127.0.0.1:$(PREFECT_UI_PORT)   MLflow UI: http://127.0.0.1:$(MLFLOW_UI_PORT)   (Ctrl-C stops both)"
	setsid $(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_UI_PORT) & prefect=$$!; \
	setsid $(BIN)/mlflow server --backend-store-uri "sqlite:///$(CURDIR)/mlflow.db" \
	  --artifacts-destination "$(CURDIR)/mlartifacts" --host 127.0.0.1 --port $(MLFLOW_UI_PORT) --workers 1 & mlflow=$$!; \
	trap 'kill -TERM -- -$$prefect -$$mlflow 2>/dev/null || true' EXIT INT TERM; \
	wait -n $$prefect $$mlflow

# Failure alerts (automations.yaml) on the Prefect server of `make ui` (or PREFECT_API_URL);
# MILORA_ALERT_WEBHOOK_URL is where they go (Slack/Teams incoming webhook, any HTTP endpoint).
alerts: $(STAMP)
	PREFECT_API_URL="$${PREFECT_API_URL:-http://127.0.0.1:$(PREFECT_UI_PORT)/api}" $(BIN)/python -m tasks.alerts

# The HTML report's browser test drives Debian's Chromium (installed here when missing;
# apt-get as root, else through sudo when there is one).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "no apt-get: install Chromium for the browser test"; exit 0; }; \
	sudo=$$([ "$$(id -u)" = 0 ] || command -v sudo || true); \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium

test: $(STAMP) | $(CHROMIUM)
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
