# The image every Kubernetes step runs (resources/kubernetes.yaml: executor.k8s.job_image).
#   docker build -t attribution-assets:latest .
# A CUDA build of torch comes from the PyTorch index (--build-arg TORCH_INDEX=... for your CUDA);
# constraints.txt pins everything else.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1 \
    ATTRIBUTION_RESOURCES=kubernetes DAGSTER_HOME=/opt/dagster/home
WORKDIR /opt/attribution
COPY pyproject.toml constraints.txt README.md ./
COPY attribution_assets ./attribution_assets
COPY resources ./resources
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
RUN pip install --extra-index-url "$TORCH_INDEX" \
        -c constraints.txt ".[k8s]" \
    && mkdir -p "$DAGSTER_HOME"
# The code location the Dagster deployment loads (the k8s executor's step pods import it too).
EXPOSE 4000
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "attribution_assets.definitions"]
