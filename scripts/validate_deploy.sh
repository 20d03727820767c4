#!/usr/bin/env bash
# Validate the deployment files without deploying anything (CI runs it; needs no Docker engine):
#   1. docker-compose.gpu.yml        with Debian's docker-compose (v1.29) `config`
#   2. config/gateway.gpu.yaml and config/gateway.load.yaml   with `llm-gateway check-config`
#   3. deploy/k8s/*.yaml             against the Kubernetes schemas (kubernetes-validate, offline)
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}

if ! command -v docker-compose >/dev/null; then
    apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null
fi
echo "== docker-compose -f docker-compose.gpu.yml config"
docker-compose -f docker-compose.gpu.yml config --quiet
echo "docker-compose.gpu.yml: ok"

echo "== llm-gateway check-config"
# gateway.gpu.yaml requires the signing secret from the environment; any value validates.
GATEWAY_JWT_SECRET=${GATEWAY_JWT_SECRET:-placeholder-for-validation} \
    "$BIN/llm-gateway" check-config config/gateway.gpu.yaml
"$BIN/llm-gateway" check-config config/gateway.load.yaml
"$BIN/llm-gateway" check-config config/gateway.yaml

echo "== kubernetes-validate deploy/k8s"
if [ ! -x "$BIN/kubernetes-validate" ]; then
    "$BIN/pip" install -q kubernetes-validate
fi
"$BIN/kubernetes-validate" --strict --quiet deploy/k8s/*.yaml
echo "deploy/k8s: ok ($(ls deploy/k8s/*.yaml | wc -l) files)"
