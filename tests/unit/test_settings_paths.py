"""Paths in a config are relative to the config file's folder; start-up checks (proxy/preflight.py)
report every problem as one line naming the file, the line and the key."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from proxy.preflight import check
from proxy.settings import ConfigError, load_settings, locate

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ["config/gateway.yaml", "config/gateway.load.yaml", "config/gateway.gpu.yaml"]
PEM = """-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEVs/o5+uQbTjL3chynL4wXgUg2R9
q9UU8I5mEovUf86QZ7kOBIjJwqnzD1omageEHWwHdBO6B+dFabmdT9POxg==
-----END PUBLIC KEY-----
"""


def _write(folder: Path, config: dict[str, object]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "gw.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _line(path: Path, needle: str) -> int:
    """The 1-based line of the first line of `path` that starts with `needle` (indentation included)."""
    lines = path.read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if text.startswith(needle))


def _config(**sections: object) -> dict[str, object]:
    base: dict[str, object] = {
        "server": {"state_dir": "state"},
        "auth": {"secret": "s" * 40},
        "cache": {"semantic": {"enabled": False}},
        "policies": {"words": ["words/en.txt"]},
        "backends": {"gpu": {"type": "openai", "url": "http://127.0.0.1:9", "model": "m"}},
        "models": {"assistant": {"variants": [{"name": "control", "weight": 1, "backends": ["gpu"]}]}},
    }
    return {**base, **sections}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A config folder with its word list beside it, as config/ ships."""
    (tmp_path / "cfg" / "words").mkdir(parents=True)
    shutil.copy(ROOT / "config/words/en.txt", tmp_path / "cfg/words/en.txt")
    return tmp_path / "cfg"


def test_relative_paths_resolve_against_the_config_folder_from_any_cwd(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = folder / "keys" / "es.pem"
    key.parent.mkdir()
    key.write_text(PEM)
    llama = {"type": "llamacpp", "model_path": "../models/m.gguf"}
    path = _write(
        folder,
        _config(
            auth={"algorithms": ["ES256"], "public_key_file": "keys/es.pem"},
            policies={"words": ["words/en.txt", "/abs/zh.txt"]},
            backends={"cpu": llama},
            models={"assistant": {"variants": [{"name": "control", "weight": 1, "backends": ["cpu"]}]}},
        ),
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    s = load_settings(os.path.relpath(path))
    assert s.policies.words == [str(folder / "words/en.txt"), "/abs/zh.txt"]  # absolute stays
    assert s.server.state_dir == str(folder / "state")
    assert s.auth.public_key_file == str(key)
    assert s.backends["cpu"].model_path == str(tmp_path / "models/m.gguf")  # normalized, no ".."


def test_a_symlinked_config_keeps_its_paths_beside_the_link(folder: Path, tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as links into a `..data` folder that is swapped on update:
    paths must name files beside the link (they follow the swap), not inside today's target."""
    real = _write(tmp_path / "..2024_01_01", _config())
    (folder / "gw.yaml").symlink_to(real)
    s = load_settings(folder / "gw.yaml")
    assert s.policies.words == [str(folder / "words/en.txt")]


def test_shipped_configs_name_files_that_exist_beside_them() -> None:
    env = {"GATEWAY_JWT_SECRET": "x" * 40}
    for name in SHIPPED:
        s = load_settings(ROOT / name, env)
        assert s.policies.words and all(Path(w).is_file() for w in s.policies.words), name
        assert all(Path(w).parent == ROOT / "config/words" for w in s.policies.words)
    assert load_settings(ROOT / "config/gateway.yaml", {}).server.state_dir == str(ROOT / ".state")


def test_locate_names_file_line_and_key(tmp_path: Path) -> None:
    path = _write(tmp_path, _config())
    words = _line(path, "  - words/en.txt")
    assert locate(path, ("policies", "words", 0), "gone") == f"{path}:{words}: policies.words.0: gone"
    assert locate(path, ("server", "state_dir"), "x") == f"{path}:{_line(path, '  state_dir:')}: server.state_dir: x"


def test_check_passes_a_good_config(folder: Path) -> None:
    assert check(_write(folder, _config())).models["assistant"].variants[0].name == "control"


@pytest.mark.parametrize(
    ("sections", "at", "key", "fragment"),
    [
        ({"policies": {"words": ["words/none.txt"]}}, "  - words/none.txt", "policies.words.0", "no such file"),
        ({"policies": {"words": ["words"]}}, "  - words", "policies.words.0", "not a readable file"),
        ({"auth": {"secret": "short"}}, "  secret:", "auth.secret", "shorter than 32 bytes"),
        (
            {"auth": {"algorithms": ["RS256"], "public_key_file": "k.pem"}},
            "  public_key_file:",
            "auth.public_key_file",
            "cannot read",
        ),
        ({"auth": {"algorithms": ["RS256"]}}, "  algorithms:", "auth.algorithms", "no key for algorithm(s) RS256"),
        ({"redis_url": "http://redis:6379"}, "redis_url:", "redis_url", "redis://"),
        (
            {"cache": {"semantic": {"enabled": True, "embedder": "openai", "embedder_model": "e5"}}},
            "  semantic:",
            "cache.semantic.embedder_url",
            "openai embedder",
        ),
        (
            {"backends": {"gpu": {"type": "llamacpp", "model_path": "m.gguf"}}},
            "    model_path:",
            "backends.gpu.model_path",
            "cannot read model file",
        ),
        (
            {"backends": {"gpu": {"type": "llamacpp", "model_package": "no_such_model_pkg"}}},
            "    model_package:",
            "backends.gpu.model_package",
            "not an installed package",
        ),
        (
            {"server": {"state_dir": "gw.yaml/state"}, "auth": {"secret": ""}},
            "  state_dir:",
            "server.state_dir",
            "Not a directory",
        ),
    ],
)
def test_check_reports_what_serve_would_fail_on(
    folder: Path, sections: dict[str, object], at: str, key: str, fragment: str
) -> None:
    path = _write(folder, _config(**sections))
    with pytest.raises(ConfigError) as info:
        check(path)
    (message,) = str(info.value).splitlines()  # one problem, one line
    assert message.startswith(f"{path}:{_line(path, at)}: {key}: ") and fragment in message


def test_check_reads_the_word_lists_with_the_policy_loader(folder: Path) -> None:
    (folder / "words/en.txt").write_bytes(b"\xff\xfe broken")
    path = _write(folder, _config())
    with pytest.raises(ConfigError) as info:
        check(path)
    assert str(info.value).startswith(f"{path}:{_line(path, '  words:')}: policies.words: ")
    assert str(info.value).endswith("en.txt: word list is not UTF-8 (byte 0)")


def test_check_refuses_a_file_that_is_not_gguf_and_a_key_that_is_not_pem(folder: Path) -> None:
    (folder / "m.gguf").write_bytes(b"<html>not a model</html>")
    (folder / "k.pem").write_text("not a key")
    config = _config(
        auth={"algorithms": ["RS256"], "public_key_file": "k.pem"},
        backends={"gpu": {"type": "llamacpp", "model_path": "m.gguf"}},
    )
    with pytest.raises(ConfigError) as info:
        check(_write(folder, config))
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert "auth.public_key_file: " in lines[0] and "is not a PEM public key" in lines[0]
    assert "backends.gpu.model_path: " in lines[1] and "is not a GGUF model file" in lines[1]


def test_check_refuses_a_too_short_generated_secret(folder: Path) -> None:
    (folder / "state").mkdir(mode=0o700)
    (folder / "state/jwt_secret").write_text("short\n")
    (folder / "state/jwt_secret").chmod(0o600)
    with pytest.raises(ConfigError, match=r"gw.yaml:2: server.state_dir: .*jwt_secret holds a secret shorter"):
        check(_write(folder, _config(auth={"secret": ""})))
