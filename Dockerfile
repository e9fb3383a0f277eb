# The image of the Kubernetes deployment (docs/kubernetes.md): the Helm chart's user code
# deployment (code server), every run pod and every step pod run it. Build and push it under a
# pinned tag, the one resources/kubernetes.yaml (executor.k8s.job_image) and
# deploy/dagster-values.yaml name; never `latest`:
#   docker build -t registry.example.com/attribution-assets:0.1.0 .
#   docker push registry.example.com/attribution-assets:0.1.0
# Everything installs from constraints.txt with the `k8s` extra (dagster-k8s, dagster-postgres);
# torch comes from the PyPI-compatible PyTorch index for your CUDA (--build-arg TORCH_INDEX=...).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    ATTRIBUTION_RESOURCES=/opt/attribution/resources/kubernetes.yaml

WORKDIR /opt/attribution

# The dependencies first, in a layer that changes only with the pins (torch alone is gigabytes):
# installed with an empty stand-in package, which is then replaced by the code.
COPY pyproject.toml constraints.txt README.md ./
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
RUN mkdir attribution_assets && touch attribution_assets/__init__.py \
    && pip install --extra-index-url "$TORCH_INDEX" -c constraints.txt ".[k8s]" \
    && pip uninstall -y attribution-assets && rm -rf attribution_assets build *.egg-info \
    && mkdir -p "$DAGSTER_HOME"
COPY attribution_assets ./attribution_assets
RUN pip install --no-deps -c constraints.txt . && rm -rf build *.egg-info

# Deployment profiles: $ATTRIBUTION_RESOURCES names the `kubernetes` one by path, so it is found
# whatever the working directory of a pod.
COPY resources ./resources

# The Helm chart starts the code server with its own command (codeServerArgs); step pods run
# `dagster api execute_step` as the Job's args, so no ENTRYPOINT may be set.
EXPOSE 3030
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "3030", "-m", "attribution_assets.definitions"]
