"""vLLM specifics on top of the OpenAI HTTP backend: `/health` and the `/metrics` load gauges.

The load signals are `vllm:num_requests_waiting` (requests queued behind the running batch),
`vllm:num_requests_running` and `vllm:kv_cache_usage_perc` (`vllm:gpu_cache_usage_perc` before
vLLM v1). The pool falls over to the next backend when the queue exceeds the configured
`max_waiting`, and the routing policy leaves a saturated replica (backends/pool.py).
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import orjson

from backends.openai_http import OpenAIHTTPBackend, probe_timeout
from backends.pool import Gauges

# one sample line per label set: `vllm:<name>{labels} <value>` (a histogram's lines have other names)
_SAMPLE = re.compile(
    rb"^vllm:(num_requests_waiting|num_requests_running|kv_cache_usage_perc|gpu_cache_usage_perc)"
    rb"(?:\{[^}\n]*\})?[ \t]+(\S+)",
    re.MULTILINE,
)


def parse_gauges(text: bytes) -> Gauges:
    """Queue gauges summed over label sets (one vLLM may serve several model names, or run several
    data-parallel engines); KV-cache usage averaged over them, from the v1 name when present."""
    sums: dict[bytes, float] = {}
    counts: dict[bytes, int] = {}
    for match in _SAMPLE.finditer(text):
        name = match.group(1)
        try:
            value = float(match.group(2))
        except ValueError:
            continue
        if value != value:  # NaN: no reading
            continue
        sums[name] = sums.get(name, 0.0) + value
        counts[name] = counts.get(name, 0) + 1
    kv_name = b"kv_cache_usage_perc" if b"kv_cache_usage_perc" in sums else b"gpu_cache_usage_perc"
    kv = sums[kv_name] / counts[kv_name] if kv_name in sums else None
    return Gauges(sums.get(b"num_requests_waiting", 0.0), sums.get(b"num_requests_running"), kv)


class VllmBackend(OpenAIHTTPBackend):
    def __init__(self, name: str, settings: Any, session: aiohttp.ClientSession) -> None:
        super().__init__(name, settings, session)
        self.max_waiting: int | None = settings.max_waiting
        self.send_priority: bool = settings.send_priority
        self._base = settings.url
        self._probe_timeout = probe_timeout(settings)

    async def health(self) -> bool:
        try:
            async with self._session.get(f"{self._base}/health", timeout=self._probe_timeout) as resp:
                healthy = resp.status == 200
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            return False
        if healthy and self.context_length is None:
            self.context_length = await self._max_model_len()
        return healthy

    async def _max_model_len(self) -> int | None:
        """vLLM reports its context in /v1/models; learning it lets the gateway clamp max_tokens
        (and refuse over-long prompts) before the request leaves."""
        try:
            async with self._session.get(f"{self._base}/v1/models", timeout=self._probe_timeout) as resp:
                data = orjson.loads(await resp.read()) if resp.status == 200 else {}
        except (aiohttp.ClientError, ConnectionError, TimeoutError, orjson.JSONDecodeError):
            return None
        for card in data.get("data") or ():
            if card.get("id") == self.model and isinstance(card.get("max_model_len"), int):
                return int(card["max_model_len"])
        return None

    async def load(self) -> float | None:
        gauges = await self.gauges()
        return None if gauges is None else gauges.waiting

    async def gauges(self) -> Gauges | None:
        """The load gauges from /metrics; None when they cannot be read."""
        try:
            async with self._session.get(f"{self._base}/metrics", timeout=self._probe_timeout) as resp:
                if resp.status != 200:
                    return None
                return parse_gauges(await resp.read())
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            return None
