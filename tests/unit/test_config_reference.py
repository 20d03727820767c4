"""docs/configuration.md is what scripts/config_reference.py makes of the settings model: a key
added, renamed or re-described without regenerating it fails here (and so in CI)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts/config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_checked_in_reference_is_the_generated_one() -> None:
    generated = _script().render()
    current = (ROOT / "docs/configuration.md").read_text(encoding="utf-8")
    assert current == generated, "docs/configuration.md is out of date: run python scripts/config_reference.py"


def test_every_key_has_a_meaning() -> None:
    assert _script().undocumented() == []


def test_every_section_and_key_is_listed() -> None:
    from proxy.settings import LlamaCppBackendSettings, Settings, VariantSettings

    text = _script().render()
    for name in Settings.model_fields:
        assert f"| `{name}` |" in text
    for section in ("## server", "## cache.semantic", "## limits.tiers.<name>", "## models.<name>.variants[]"):
        assert f"\n{section}\n" in text
    assert "## backends.<name> (type: llamacpp)" in text and "## backends.<name>.breaker" in text
    assert "| `model_path` | path |" in text and "| `words` | list of path |" in text
    assert all(f"| `{k}` |" in text for k in (*LlamaCppBackendSettings.model_fields, *VariantSettings.model_fields))
