#!/usr/bin/env bash
# Validate the deployment files without deploying anything (CI runs it; needs no Docker engine and
# no cluster):
#   1. docker-compose.gpu.yml        with Debian's docker-compose (v1.29) `config`, and that it
#                                    refuses to run without GRAFANA_ADMIN_PASSWORD
#   2. config/gateway*.yaml          with `llm-gateway check-config`
#   3. deploy/k8s/*.yaml             against the Kubernetes schemas (kubernetes-validate --strict,
#                                    offline)
#   4. scripts/check_deploy.py       every image pinned to a version, no ConfigMap mounted with
#                                    subPath, model weights on PersistentVolumeClaims, no literal
#                                    secrets, the ConfigMap copies equal to their files
# tests/component/test_deploy_reload.py proves the mounted word lists reload after a kubelet swap.
# Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! command -v docker-compose >/dev/null; then
    apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null
fi
echo "== docker-compose -f docker-compose.gpu.yml config"
# Both are required by the file; any value validates.
export GATEWAY_JWT_SECRET=${GATEWAY_JWT_SECRET:-placeholder-for-validation-at-least-32-bytes}
export GRAFANA_ADMIN_PASSWORD=${GRAFANA_ADMIN_PASSWORD:-placeholder-for-validation}
docker-compose -f docker-compose.gpu.yml config > "$work/compose.yml"
if env -u GRAFANA_ADMIN_PASSWORD docker-compose -f docker-compose.gpu.yml config --quiet 2>/dev/null; then
    echo "docker-compose.gpu.yml: Grafana starts without GRAFANA_ADMIN_PASSWORD (a default password)" >&2
    exit 1
fi
echo "docker-compose.gpu.yml: ok"

echo "== llm-gateway check-config"
"$BIN/llm-gateway" check-config config/gateway.gpu.yaml
"$BIN/llm-gateway" check-config config/gateway.load.yaml
"$BIN/llm-gateway" check-config config/gateway.yaml

echo "== kubernetes-validate deploy/k8s"
if [ ! -x "$BIN/kubernetes-validate" ]; then
    "$BIN/pip" install -q kubernetes-validate
fi
"$BIN/kubernetes-validate" --strict --quiet deploy/k8s/*.yaml
echo "deploy/k8s: ok ($(ls deploy/k8s/*.yaml | wc -l) files)"

echo "== scripts/check_deploy.py"
"$BIN/python" scripts/check_deploy.py --compose-config "$work/compose.yml"
