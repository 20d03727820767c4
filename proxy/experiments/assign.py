"""Public model -> experiment -> variant, and what a variant does to the request body.

The variant is a pure function of (model, sticky key): a keyed hash mapped onto the cumulative
weights, so every replica agrees without shared state and a user stays in one arm.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.settings import ModelSettings, Settings, VariantSettings


@dataclass(frozen=True, slots=True)
class Experiment:
    name: str
    settings: ModelSettings
    cumulative: tuple[int, ...]  # running sums of the weights
    total: int

    def choose(self, sticky_key: str) -> VariantSettings:
        digest = hashlib.blake2b(f"{self.name}\x00{sticky_key}".encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "big") % self.total
        for variant, bound in zip(self.settings.variants, self.cumulative, strict=True):
            if point < bound:
                return variant
        raise AssertionError("unreachable: point < total")


class Router:
    def __init__(self, settings: Settings) -> None:
        self.experiments: dict[str, Experiment] = {}
        for name, model in settings.models.items():
            sums, running = [], 0
            for v in model.variants:
                running += v.weight
                sums.append(running)
            self.experiments[name] = Experiment(name, model, tuple(sums), running)

    def get(self, model: str) -> Experiment | None:
        return self.experiments.get(model)


def sticky_key(how: str, *, sub: str, tenant: str, headers: Mapping[str, str], request_id: str) -> str:
    """The string a user is hashed on. A missing sticky header falls back to the subject."""
    if how == "sub":
        return f"sub:{sub}"
    if how == "tenant":
        return f"tenant:{tenant}"
    if how == "request":
        return f"req:{request_id}"
    value = headers.get(how.removeprefix("header:"))
    return f"hdr:{value}" if value else f"sub:{sub}"


def apply_variant(body: dict[str, Any], variant: VariantSettings) -> dict[str, Any]:
    """Variant defaults fill parameters the client left unset; its system prompt is prepended
    to (or replaces) the client's system messages. Returns a new dict; `body` is not changed."""
    out = dict(body)
    for key, value in variant.defaults.model_dump(exclude_none=True).items():
        if key == "max_tokens" and ("max_tokens" in out or "max_completion_tokens" in out):
            continue
        out.setdefault(key, value)
    if variant.system_prompt is not None:
        messages = out["messages"]
        if variant.system_prompt_mode == "replace":
            messages = [m for m in messages if m.get("role") not in ("system", "developer")]
        out["messages"] = [{"role": "system", "content": variant.system_prompt}, *messages]
    return out
