"""Writes docs/configuration.md from the settings model (proxy/settings.py): every key, its type,
its default and its meaning (the field's docstring).

    python scripts/config_reference.py            rewrite docs/configuration.md
    python scripts/config_reference.py --check    exit 1 when the file is not what the model gives

tests/unit/test_config_reference.py runs the check, so the reference cannot drift from the code.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proxy import settings as cfg  # noqa: E402  (the project root is on the path only now)

OUTPUT = ROOT / "docs" / "configuration.md"
UNDOCUMENTED = "**undocumented**"
TOP = "(top level)"

HEADER = """\
# Configuration reference

Generated from `proxy/settings.py` by `scripts/config_reference.py` (do not edit by hand: run the
script; a test fails when this file and the settings model differ).

The gateway reads one YAML file: `llm-gateway serve --config FILE` (default: `config/gateway.yaml`
in the working directory, else the one shipped with the project). How it is read:

- Any value may use `${VAR}` (an error if VAR is unset) or `${VAR:-default}` (the default when VAR
  is unset or empty); a variable's value is taken as text, never parsed as YAML.
- Unknown keys, wrong types and dangling references (a variant naming a backend that does not
  exist) are errors; each names the file, the line and the key.
- A relative path (type `path` below) is relative to the folder of the config file itself, so
  `words/en.txt` in `config/gateway.yaml` is `config/words/en.txt`, whatever the working directory.
- `llm-gateway check-config FILE` runs every check `serve` runs at start-up (word lists readable and
  valid, model files present, keys readable, secrets long enough) without serving; a file it passes
  starts.

Keys written `<name>` are names of your choosing (a tier, a backend, a model).
"""


class Section(NamedTuple):
    title: str  # the dotted key of the section, e.g. "cache.semantic" or "backends.<name>"
    model: type[BaseModel]
    note: str = ""


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The settings classes an annotation holds (directly, in a list, a dict, a union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _key_suffix(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is dict:
        return ".<name>"
    if origin is list:
        return "[]"
    if origin in (typing.Union, types.UnionType):
        return next((s for a in get_args(annotation) if (s := _key_suffix(a))), "")
    if origin is typing.Annotated:
        return _key_suffix(get_args(annotation)[0])
    return ""


def _type_text(annotation: Any, metadata: Any = ()) -> str:
    if any(isinstance(m, cfg._FromConfigDir) for m in metadata):
        return "path"
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is typing.Annotated:
        return _type_text(args[0], annotation.__metadata__)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is dict:
        return f"map: name → {_type_text(args[1])}"
    if origin in (typing.Union, types.UnionType):
        if len(_models_in(annotation)) > 1:
            return "section (by `type`)"
        shown = " or ".join(_type_text(a) for a in args if a is not type(None))
        return shown + (" or null" if type(None) in args else "")
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


_SIGNS = ((at.Ge, "ge", "≥"), (at.Gt, "gt", ">"), (at.Le, "le", "≤"), (at.Lt, "lt", "<"))


def _bounds(info: FieldInfo) -> str:
    unit = "characters" if info.annotation is str else "entries"
    parts = []
    for m in info.metadata:
        parts += [f"{sign} {_number(getattr(m, attr))}" for kind, attr, sign in _SIGNS if isinstance(m, kind)]
        if isinstance(m, at.MinLen) and m.min_length > 0:
            parts.append(f"at least {m.min_length} {unit}")
        if isinstance(m, at.MaxLen):
            parts.append(f"at most {m.max_length} {unit}")
        if getattr(m, "pattern", None):
            parts.append(f"matching `{m.pattern}`")
    return ", ".join(parts)


def _number(value: float) -> str:
    return f"{value:_}".replace("_", ",") if isinstance(value, int) and abs(value) >= 10_000 else f"{value}"


def _default(name: str, info: FieldInfo) -> str:
    value = info.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value == "" else f"`{value}`"
    if isinstance(value, dict):
        return "`{" + ", ".join(f"{k}: …" for k in value) + "}`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    shown = f"`{_number(value)}`"
    if name.endswith("_s") and isinstance(value, int | float) and value >= 86_400:
        shown += f" ({value / 86_400:g} days)"
    return shown


def _row(name: str, info: FieldInfo) -> str:
    kind = _type_text(info.annotation, info.metadata)
    bounds = _bounds(info)
    kind = f"{kind}, {bounds}" if bounds else kind
    meaning = (info.description or UNDOCUMENTED).replace("|", "\\|").replace("\n", " ")
    return f"| `{name}` | {kind} | {_default(name, info)} | {meaning} |"


def _children(title: str, model: type[BaseModel]) -> list[tuple[str, type[BaseModel]]]:
    """(title, class) of the sections inside a section, in field order."""
    prefix = "" if title == TOP else f"{title.partition(' (type:')[0]}."
    out = []
    for name, info in _fields(model):
        models = _models_in(info.annotation)
        key = f"{prefix}{name}{_key_suffix(info.annotation)}"
        for child in models:
            kind = child.model_fields.get("type")
            shown = f"{key} (type: {get_args(kind.annotation)[0]})" if len(models) > 1 and kind else key
            out.append((shown, child))
    return out


def _sections() -> list[Section]:
    """Every section, depth first; a class reached again refers to where it is nearest the top."""
    home: dict[type[BaseModel], str] = {}
    queue: list[tuple[str, type[BaseModel]]] = [(TOP, cfg.Settings)]
    while queue:  # breadth first: the shallowest title of each class is its home
        title, model = queue.pop(0)
        if model not in home:
            home[model] = title
            queue += _children(title, model)
    out: list[Section] = []
    seen: set[str] = set()

    def visit(title: str, model: type[BaseModel]) -> None:
        if title in seen:  # backends.<name>.breaker: once, not once per backend type
            return
        seen.add(title)
        if home[model] != title:
            out.append(Section(title, model, f"The same keys as `{home[model]}`."))
            return
        out.append(Section(title, model))
        for child_title, child in _children(title, model):
            visit(child_title, child)

    visit(TOP, cfg.Settings)
    return out


def _fields(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    """A model's fields, a backend's `type` first."""
    fields = list(model.model_fields.items())
    return sorted(fields, key=lambda item: item[0] != "type")


def render() -> str:
    parts = [HEADER]
    for section in _sections():
        parts.append(f"\n## {section.title}\n")
        doc = (section.model.__doc__ or "").strip()
        if doc:
            parts.append(f"{' '.join(doc.split())}\n")
        if section.note:
            parts.append(f"{section.note}\n")
            continue
        parts.append("| key | type | default | meaning |\n|---|---|---|---|")
        parts.extend(_row(name, info) for name, info in _fields(section.model))
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def undocumented() -> list[str]:
    """Keys without a description (the test names them)."""
    return [
        f"{s.title}.{name}"
        for s in _sections()
        if not s.note
        for name, info in s.model.model_fields.items()
        if not info.description
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"{OUTPUT.relative_to(ROOT)} is out of date: run python scripts/config_reference.py")
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
