# llm-gateway image: python:3.11-slim, non-root, the embedded default config unless one is mounted
# at /etc/llm-gateway/gateway.yaml (docker-compose.gpu.yml mounts config/gateway.gpu.yaml there).
#   docker build -t llm-gateway .
#   docker run -p 8000:8000 -e GATEWAY_JWT_SECRET=$(openssl rand -hex 32) llm-gateway

# ---- build: llama-cpp-python compiles from source ------------------------------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # portable build: no -march=native (the image runs on other CPUs than the builder's), no llava
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY backends ./backends
COPY policies ./policies
COPY loadtest ./loadtest
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install ".[semantic]"

# ---- runtime ---------------------------------------------------------------------------------------
FROM python:3.11-slim
# libgomp1: OpenMP runtime of llama.cpp
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/llm-gateway --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/llm-gateway/config /var/lib/llm-gateway \
 && chown gateway:gateway /var/lib/llm-gateway
COPY --from=build /opt/venv /opt/venv
# Word lists resolve relative to the config file's folder: /etc/llm-gateway/config/words/*.txt
COPY config/words /etc/llm-gateway/config/words
COPY config/gateway.yaml /etc/llm-gateway/gateway.yaml
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
