"""vLLM specifics on top of the OpenAI HTTP backend: `/health` and the `/metrics` queue gauges.

The load signal is `vllm:num_requests_waiting` (requests queued behind the running batch);
the pool falls over to the next backend when it exceeds the configured `max_waiting`.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from backends.openai_http import OpenAIHTTPBackend, probe_timeout

_WAITING = b"vllm:num_requests_waiting"
_RUNNING = b"vllm:num_requests_running"


def parse_gauges(text: bytes) -> dict[str, float]:
    """Sum vLLM's queue gauges over all label sets (one vLLM may serve several model names)."""
    out = {"waiting": 0.0, "running": 0.0}
    for line in text.splitlines():
        if line.startswith(_WAITING):
            key = "waiting"
        elif line.startswith(_RUNNING):
            key = "running"
        else:
            continue
        try:
            out[key] += float(line.rsplit(b" ", 1)[1])
        except (IndexError, ValueError):
            continue
    return out


class VllmBackend(OpenAIHTTPBackend):
    def __init__(self, name: str, settings: Any, session: aiohttp.ClientSession) -> None:
        super().__init__(name, settings, session)
        self.max_waiting: int | None = settings.max_waiting
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
        try:
            async with self._session.get(f"{self._base}/metrics", timeout=self._probe_timeout) as resp:
                if resp.status != 200:
                    return None
                return parse_gauges(await resp.read())["waiting"]
        except (aiohttp.ClientError, ConnectionError, TimeoutError):
            return None
