"""A scripted Backend for in-process pipeline tests: it answers with OpenAI chunks or fails with a
scripted BackendError (before the first chunk or part-way), and records every body it was sent."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from backends.base import BackendError, Body, Chunk
from backends.collect import collect, with_usage

Step = Chunk | BackendError  # a chunk to yield, or a failure to raise at that point of the stream
Script = list[Step] | BackendError  # a stream's steps, or a failure when it is opened


def answer(*parts: str, prompt: int = 7, completion: int | None = None) -> list[Step]:
    """One content chunk per part, a finish chunk, then the usage chunk (empty choices)."""
    head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "upstream"}
    chunks: list[Step] = [
        {**head, "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in parts
    ]
    chunks.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    done = len(parts) if completion is None else completion
    usage = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}
    chunks.append({**head, "choices": [], "usage": usage})
    return chunks


def _fresh(exc: BackendError) -> BackendError:
    return BackendError(exc.kind, exc.message, status=exc.status, param=exc.param, cause=exc.cause)


class ScriptedStream:
    """A ChunkStream over scripted steps; each chunk is a copy (the relay writes into chunks)."""

    def __init__(self, steps: list[Step]) -> None:
        self._steps, self._at, self.closed = steps, 0, False

    def __aiter__(self) -> ScriptedStream:
        return self

    async def __anext__(self) -> Chunk:
        if self.closed or self._at >= len(self._steps):
            raise StopAsyncIteration
        step = self._steps[self._at]
        self._at += 1
        if isinstance(step, BackendError):
            raise _fresh(step)
        return copy.deepcopy(step)

    async def aclose(self) -> None:
        self.closed = True


class FakeBackend:
    """Implements backends.base.Backend; `chat` is built from `stream`, as every real backend's is."""

    def __init__(
        self,
        name: str,
        script: Script,
        *,
        context_length: int | None = None,
        prompt_tokens: int | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.name, self.model, self.context_length = name, f"{name}-model", context_length
        self.script, self.prompt_tokens, self.gate = script, prompt_tokens, gate
        self.bodies: list[Body] = []
        self.cancelled = 0  # opens cancelled while waiting at the gate

    async def _opened(self) -> None:
        """With a gate: the first chunk is not ready until the gate opens (a model still in prefill)."""
        if self.gate is not None:
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def stream(self, body: Body) -> ScriptedStream:
        self.bodies.append(copy.deepcopy(body))
        await self._opened()
        if isinstance(self.script, BackendError):
            raise _fresh(self.script)
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return ScriptedStream([s for s in self.script if usage or not _is_usage(s)])

    async def chat(self, body: Body) -> Body:
        return await collect(await self.stream(with_usage(body)))

    async def health(self) -> bool:
        return True

    async def load(self) -> float | None:
        return None

    def count_tokens(self, messages: list[Any]) -> int | None:
        return self.prompt_tokens


def _is_usage(step: Step) -> bool:
    return isinstance(step, dict) and not step.get("choices") and "usage" in step
