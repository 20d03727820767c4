"""Checks on the deployment files that schema validation cannot make (scripts/validate_deploy.sh
runs this after kubernetes-validate and docker-compose config):

- every image names an exact version: no `:latest`, no missing or major-only tag (deploy/k8s, the
  resolved docker-compose config, the Dockerfile's FROM lines);
- no ConfigMap, Secret or projected volume is mounted with subPath (kubelet never updates those);
- model weights live on PersistentVolumeClaims, and no password, secret or token is a literal value;
- the ConfigMaps that carry a file of the repository carry it verbatim (`--sync` rewrites them).

    python scripts/check_deploy.py [--compose-config FILE] [--sync]
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]

# (ConfigMap, key) -> the repository file it carries
COPIES: dict[tuple[str, str], str] = {
    ("llm-gateway-config", "gateway.yaml"): "config/gateway.gpu.yaml",
    ("llm-gateway-words", "zh.txt"): "config/words/zh.txt",
    ("llm-gateway-words", "en.txt"): "config/words/en.txt",
    ("grafana-provisioning", "datasource.yaml"): "deploy/grafana/provisioning/datasources/prometheus.yaml",
    ("grafana-provisioning", "dashboards.yaml"): "deploy/grafana/provisioning/dashboards/llm-gateway.yaml",
    ("grafana-dashboards", "llm-gateway.json"): "deploy/grafana/dashboard.json",
}
# image prefix -> (environment variable that moves its model cache, the cache's default path)
MODEL_CACHES = {
    "vllm/vllm-openai:": ("HF_HOME", "/root/.cache/huggingface"),
    "ghcr.io/ggml-org/llama.cpp:": ("LLAMA_CACHE", "/root/.cache/llama.cpp"),
}
UPDATED_SOURCES = ("configMap", "secret", "projected", "downwardAPI")
# an exact version: 1.2.3 (any prefix/suffix: v0.10.1.1, 3.11.13-slim-bookworm) or a build (b6617)
EXACT_TAG = re.compile(r"\d+\.\d+\.\d+|(?:^|-)b\d{3,}(?:$|-)")
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKEN|API_KEY)$")
POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def image_problem(image: str) -> str | None:
    """Why `image` is not pinned to an exact version, or None when it is."""
    if "@sha256:" in image:
        return None
    _, sep, tag = image.rpartition(":")
    if not sep or "/" in tag:
        return f"{image}: no tag (means :latest)"
    if tag == "latest":
        return f"{image}: :latest"
    if not EXACT_TAG.search(tag):
        return f"{image}: tag {tag!r} names no exact version"
    return None


def k8s_documents(root: Path) -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted((root / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs.append((f"{path.relative_to(root)}: {doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    kind = doc.get("kind")
    spec: dict[str, Any] | None = None
    if kind == "Pod":
        spec = doc.get("spec")
    elif kind == "CronJob":
        spec = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    elif kind in POD_TEMPLATE_KINDS:
        spec = doc["spec"]["template"]["spec"]
    return spec


def _containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def check_pod(where: str, spec: dict[str, Any]) -> list[str]:
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    problems = []
    for c in _containers(spec):
        here = f"{where}: container {c['name']}"
        if problem := image_problem(c.get("image", "")):
            problems.append(f"{here}: image {problem}")
        for mount in c.get("volumeMounts") or []:
            source = next((s for s in UPDATED_SOURCES if s in volumes.get(mount["name"], {})), None)
            if source and ("subPath" in mount or "subPathExpr" in mount):
                problems.append(f"{here}: {source} volume {mount['name']} mounted with subPath (not updated)")
        for env in c.get("env") or []:
            if SECRET_NAME.search(env["name"]) and "value" in env:
                problems.append(f"{here}: {env['name']} is a literal value, not a secretKeyRef")
        problems += _model_cache_problems(here, c, volumes)
    return problems


def _model_cache_problems(here: str, c: dict[str, Any], volumes: dict[str, Any]) -> list[str]:
    image = c.get("image", "")
    cache = next((v for prefix, v in MODEL_CACHES.items() if image.startswith(prefix)), None)
    if cache is None:
        return []
    env = {e["name"]: e.get("value") for e in c.get("env") or []}
    path = env.get(cache[0]) or cache[1]
    for mount in c.get("volumeMounts") or []:
        if path == mount["mountPath"] or path.startswith(mount["mountPath"].rstrip("/") + "/"):
            if "persistentVolumeClaim" in volumes.get(mount["name"], {}):
                return []
            return [f"{here}: model cache {path} is on volume {mount['name']}, not a PersistentVolumeClaim"]
    return [f"{here}: model cache {path} is on no volume: weights download again at every start"]


def check_k8s(docs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    problems = []
    for where, doc in docs:
        spec = pod_spec(doc)
        if spec is not None:
            problems += check_pod(where, spec)
    return problems


def check_compose(config: dict[str, Any]) -> list[str]:
    """`config`: the output of `docker-compose config` (variables resolved)."""
    problems = []
    for name, service in (config.get("services") or {}).items():
        image = service.get("image")
        if image is None:
            problems.append(f"compose service {name}: no image (a build needs an image with a version tag)")
        elif problem := image_problem(image):
            problems.append(f"compose service {name}: image {problem}")
    return problems


def check_dockerfile(text: str) -> list[str]:
    """The FROM lines, with the global ARG defaults substituted; a FROM of an earlier stage is fine."""
    args: dict[str, str] = {}
    stages: set[str] = set()
    seen_from = False
    problems = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        words = line.split()
        instruction = words[0].upper() if words else ""
        if instruction == "ARG" and not seen_from and "=" in words[1]:
            key, _, value = words[1].partition("=")
            args[key] = value.strip("\"'")
        elif instruction == "FROM":
            seen_from = True
            refs = [w for w in words[1:] if not w.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), ""), refs[0])
            if image not in stages and image != "scratch" and (problem := image_problem(image)):
                problems.append(f"Dockerfile: FROM {problem}")
            if len(refs) >= 3 and refs[1].upper() == "AS":
                stages.add(refs[2])
    return problems


def _config_maps(docs: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in docs if doc.get("kind") == "ConfigMap"}


def check_copies(root: Path, docs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    maps = _config_maps(docs)
    problems = []
    for (name, key), source in COPIES.items():
        if name not in maps:
            problems.append(f"ConfigMap {name}: missing (it carries {source})")
        elif (maps[name].get("data") or {}).get(key) != (root / source).read_text(encoding="utf-8"):
            problems.append(f"ConfigMap {name}: {key} differs from {source} (run {sys.argv[0]} --sync)")
    return problems


def _block(key: str, content: str) -> str:
    """`key: |` and `content` as a YAML literal block indented by four spaces, verbatim."""
    if content.endswith("\n\n") or not content.endswith("\n") or content[:1].isspace():
        raise ValueError(f"{key}: cannot be written verbatim as a literal block")
    lines = "".join(f"    {line}" if line.strip() else "\n" for line in content.splitlines(True))
    return f"  {key}: |\n{lines}"


def sync_copies(root: Path) -> list[str]:
    """Rewrite every COPIES entry in deploy/k8s from its source file; return the files changed."""
    changed = []
    for path in sorted((root / "deploy" / "k8s").glob("*.yaml")):
        original = path.read_text(encoding="utf-8")
        parts = re.split(r"(?m)^(---\n)", original)  # documents and their separators
        text = "".join(_sync_document(root, part) for part in parts)
        if text != original:
            path.write_text(text, encoding="utf-8")
            changed.append(str(path.relative_to(root)))
    return changed


def _sync_document(root: Path, text: str) -> str:
    doc = yaml.safe_load(text) if text.strip() not in ("", "---") else None
    if not isinstance(doc, dict) or doc.get("kind") != "ConfigMap":
        return text
    name = doc["metadata"]["name"]
    for (cm, key), source in COPIES.items():
        if cm != name:
            continue
        content = (root / source).read_text(encoding="utf-8")
        block = re.compile(rf"(?m)^  {re.escape(key)}: \|[-+]?\n(?:(?:    .*)?\n)*")
        replacement = _block(key, content).replace("\\", "\\\\")  # taken literally by subn
        text, found = block.subn(replacement, text, count=1)
        if not found:
            raise ValueError(f"ConfigMap {name} has no `{key}: |` entry to rewrite")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=ROOT)
    parser.add_argument("--compose-config", type=Path, help="the output of `docker-compose config`")
    parser.add_argument("--sync", action="store_true", help="rewrite the ConfigMap copies first")
    args = parser.parse_args(argv)
    if args.sync:
        for path in sync_copies(args.root):
            print(f"rewrote {path}")
    docs = k8s_documents(args.root)
    problems = check_k8s(docs) + check_copies(args.root, docs)
    dockerfile = args.root / "Dockerfile"
    if dockerfile.exists():
        problems += check_dockerfile(dockerfile.read_text(encoding="utf-8"))
    if args.compose_config:
        problems += check_compose(yaml.safe_load(args.compose_config.read_text(encoding="utf-8")))
    for problem in problems:
        print(problem, file=sys.stderr)
    if not problems:
        print(f"deploy files: ok ({len(docs)} Kubernetes objects, {len(COPIES)} ConfigMap copies)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
