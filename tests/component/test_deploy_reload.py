"""Word lists reload inside Kubernetes. The gateway's volume is built from deploy/k8s (its ConfigMaps
and the Deployment's projected volume, mount path and --config) and laid out the way kubelet writes
it; load_settings reads the mounted config and PolicyGuard watches the mounted lists. An edit to the
ConfigMap is then applied the way kubelet applies it, and the guard's poll must see it."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.errors import ContentFiltered
from proxy.guard import PolicyGuard
from proxy.settings import PolicySettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
NEW_WORD = "quokkagate"  # in no shipped list; added by the edits below
LISTED = "double your bitcoin"  # in config/words/en.txt
ENV = {"GATEWAY_JWT_SECRET": "k8s-reload-test-" + "x" * 32}


class KubeletVolume:
    """A ConfigMap volume written like kubelet's AtomicWriter (pkg/volume/util/atomic_writer.go): the
    payload goes into a fresh `..<timestamp>` directory, a `..data_tmp` symlink to it is renamed over
    `..data`, every top-level name is a symlink into `..data`, then the previous directory goes."""

    def __init__(self, target: Path) -> None:
        self.target = target
        target.mkdir(parents=True)

    def write(self, payload: Mapping[str, bytes]) -> None:
        data = self.target / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        prefix = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
        stamped = Path(tempfile.mkdtemp(prefix=prefix, dir=self.target))
        stamped.chmod(0o755)
        for rel, content in payload.items():
            path = stamped / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
            path.chmod(0o644)
        os.symlink(stamped.name, self.target / "..data_tmp")
        os.rename(self.target / "..data_tmp", data)
        for top in {rel.split("/")[0] for rel in payload}:
            if not (self.target / top).is_symlink():
                os.symlink(f"..data/{top}", self.target / top)
        if old is not None:
            shutil.rmtree(self.target / old)


def _k8s() -> dict[tuple[str, str], dict[str, Any]]:
    docs = {}
    for path in sorted((ROOT / "deploy" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs[doc["kind"], doc["metadata"]["name"]] = doc
    return docs


class GatewayPod:
    """The gateway container's view of its config volume, rooted in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.k8s = _k8s()
        spec = self.k8s["Deployment", "llm-gateway"]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        args = container["args"]
        self.config = root / args[args.index("--config") + 1].lstrip("/")
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = [m for m in container["volumeMounts"] if "projected" in volumes[m["name"]]]
        (mount,) = mounts  # the config and the word lists share one volume, hence one swap
        assert "subPath" not in mount
        self.sources = volumes[mount["name"]]["projected"]["sources"]
        self.volume = KubeletVolume(root / mount["mountPath"].lstrip("/"))

    def payload(self, edits: Mapping[tuple[str, str], bytes] | None = None) -> dict[str, bytes]:
        """The volume's files from the ConfigMaps, with `edits` ((ConfigMap, key) -> bytes) applied."""
        files = {}
        for source in self.sources:
            name = source["configMap"]["name"]
            data = self.k8s["ConfigMap", name]["data"]
            for item in source["configMap"].get("items") or [{"key": k, "path": k} for k in data]:
                key = (name, item["key"])
                files[item["path"]] = (edits or {}).get(key) or data[item["key"]].encode()
        return files

    def with_new_word(self) -> dict[str, bytes]:
        en: str = self.k8s["ConfigMap", "llm-gateway-words"]["data"]["en.txt"]
        return self.payload({("llm-gateway-words", "en.txt"): f"{en}{NEW_WORD}\n".encode()})


def _request(text: str) -> dict[str, Any]:
    return {"model": "assistant", "messages": [{"role": "user", "content": text}]}


def _blocks(guard: PolicyGuard, text: str) -> bool:
    try:
        guard.check_input(_request(text))
    except ContentFiltered:
        return True
    return False


@pytest.fixture
async def pod(tmp_path: Path) -> AsyncIterator[tuple[GatewayPod, PolicyGuard]]:
    pod = GatewayPod(tmp_path)
    pod.volume.write(pod.payload())
    settings = load_settings(pod.config, ENV)
    guard = PolicyGuard(settings.policies)
    await guard.start()
    try:
        yield pod, guard
    finally:
        await guard.close()


def test_the_config_names_the_lists_through_kubelets_links(tmp_path: Path) -> None:
    """Not through `..data`'s current target, which the next swap deletes."""
    p = GatewayPod(tmp_path)
    p.volume.write(p.payload())
    words = load_settings(p.config, ENV).policies.words
    assert words and all(w.startswith(str(p.volume.target) + "/") and "..data" not in w for w in words)
    assert all(Path(w).resolve() != Path(w) for w in words)


async def test_the_shipped_volume_serves_the_word_lists(pod: tuple[GatewayPod, PolicyGuard]) -> None:
    _, guard = pod
    assert _blocks(guard, f"please {LISTED} now")
    assert not _blocks(guard, f"tell me about {NEW_WORD}")


async def test_an_edited_word_list_applies_after_the_kubelet_swap(
    pod: tuple[GatewayPod, PolicyGuard],
) -> None:
    p, guard = pod
    assert not guard.changed()
    p.volume.write(p.with_new_word())
    assert len(list(p.volume.target.glob("..2*"))) == 1, "the previous timestamped directory is gone"
    assert guard.changed(), "the watcher's poll does not see the swapped ConfigMap"
    assert await guard.reload_now()
    assert _blocks(guard, f"tell me about {NEW_WORD}")
    assert _blocks(guard, f"please {LISTED} now")
    assert not guard.changed()


async def test_a_broken_edit_keeps_the_lists_in_force(pod: tuple[GatewayPod, PolicyGuard]) -> None:
    p, guard = pod
    p.volume.write(p.with_new_word())
    assert await guard.reload_now()
    p.volume.write(p.payload({("llm-gateway-words", "zh.txt"): b"\xff\xfe not utf-8\n"}))
    assert guard.changed()
    assert not await guard.reload_now()
    assert _blocks(guard, f"tell me about {NEW_WORD}"), "a broken edit dropped the lists in force"
    assert not guard.changed(), "the same broken files would be reloaded again at every poll"
    p.volume.write(p.payload())
    assert guard.changed() and await guard.reload_now()
    assert not _blocks(guard, f"tell me about {NEW_WORD}")


async def test_a_word_list_configmap_mounted_alone_reloads(tmp_path: Path) -> None:
    """Each list a top-level link (`en.txt -> ..data/en.txt`) whose own stat never changes."""
    data = _k8s()["ConfigMap", "llm-gateway-words"]["data"]
    volume = KubeletVolume(tmp_path / "words")
    volume.write({k: v.encode() for k, v in data.items()})
    assert (volume.target / "en.txt").is_symlink()
    guard = PolicyGuard(PolicySettings(words=[str(volume.target / k) for k in sorted(data)]))
    await guard.start()
    try:
        volume.write({**{k: v.encode() for k, v in data.items()}, "en.txt": f"{NEW_WORD}\n".encode()})
        assert guard.changed(), "the watcher's poll does not see the swapped ConfigMap"
        assert await guard.reload_now()
        assert _blocks(guard, f"tell me about {NEW_WORD}")
        assert not _blocks(guard, f"please {LISTED} now")
    finally:
        await guard.close()
