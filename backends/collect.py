"""A non-streaming answer built from a stream: every backend answers JSON requests this way, so
one set of deadlines (connect, first token, idle between chunks, whole request) bounds both kinds.
The fold is also how the cache turns a stored stream into a JSON answer (proxy/cache/replay.py).
Reasoning text keeps the field name the server used (`reasoning` or `reasoning_content`), tool
calls their id, type, name and arguments joined in order.

A server that accepts a request and never answers is found out after the first-token deadline
instead of the whole-request one, and a failure before the answer is complete is still a failure
before the first byte reached the client: the pipeline may try the next backend.
"""

from __future__ import annotations

from typing import Any

from backends.base import BackendError, Body, Chunk, ChunkStream, ErrorKind

REASONING_FIELDS = ("reasoning", "reasoning_content")  # vLLM's name, and the older one


class _Choice:
    __slots__ = ("content", "finish_reason", "logprobs", "reasoning", "refusal", "stop_reason", "tools")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: dict[str, list[str]] = {}  # by the field name the upstream used
        self.refusal: list[str] = []
        self.tools: dict[int, dict[str, Any]] = {}
        self.logprobs: list[Any] | None = None
        self.finish_reason: str | None = None
        self.stop_reason: Any = None

    def add(self, choice: dict[str, Any]) -> None:
        for key, value in (choice.get("delta") or {}).items():  # usually one key: content
            if not value:
                continue
            if key == "content":
                self.content.append(value)
            elif key in REASONING_FIELDS:
                self.reasoning.setdefault(key, []).append(value)
            elif key == "refusal":
                self.refusal.append(value)
            elif key == "tool_calls":
                for call in value:
                    self._add_tool(call)
        logprobs = choice.get("logprobs")
        if logprobs and logprobs.get("content"):
            self.logprobs = (self.logprobs or []) + list(logprobs["content"])
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        if choice.get("stop_reason") is not None:
            self.stop_reason = choice["stop_reason"]

    def _add_tool(self, call: dict[str, Any]) -> None:
        slot = self.tools.setdefault(
            int(call.get("index", len(self.tools))),
            {"id": None, "type": "function", "function": {"name": "", "arguments": []}},
        )
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        function = call.get("function") or {}
        if function.get("name"):
            slot["function"]["name"] += function["name"]
        if function.get("arguments"):
            slot["function"]["arguments"].append(function["arguments"])

    def render(self, index: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.tools:
            message["tool_calls"] = [_tool_call(t) for _, t in sorted(self.tools.items())]
            message["content"] = message["content"] or None
        for name, parts in self.reasoning.items():  # as sent: a server that sends both names
            message[name] = "".join(parts)  # (the same text twice) gets both back
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        out: dict[str, Any] = {
            "index": index,
            "message": message,
            "logprobs": None if self.logprobs is None else {"content": self.logprobs},
            "finish_reason": self.finish_reason,
        }
        if self.stop_reason is not None:
            out["stop_reason"] = self.stop_reason
        return out


def _tool_call(slot: dict[str, Any]) -> dict[str, Any]:
    function = slot["function"]
    return {**slot, "function": {"name": function["name"], "arguments": "".join(function["arguments"])}}


class CompletionBuilder:
    """Folds `chat.completion.chunk` dicts into one `chat.completion` (choices by index)."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None

    def add(self, chunk: Chunk) -> None:
        if not self.head:
            self.head = {k: chunk[k] for k in ("id", "created", "model", "system_fingerprint") if k in chunk}
        for choice in chunk.get("choices") or ():
            index = int(choice.get("index", 0))
            slot = self.choices.get(index)
            if slot is None:
                slot = self.choices[index] = _Choice()
            slot.add(choice)
        if chunk.get("usage"):
            self.usage = chunk["usage"]

    def completion(self) -> Body:
        choices = [self.choices[i].render(i) for i in sorted(self.choices)]
        body: Body = {**self.head, "object": "chat.completion", "choices": choices}
        if self.usage is not None:
            body["usage"] = self.usage
        return body


async def collect(stream: ChunkStream) -> Body:
    """Read `stream` to its end (it is always closed) and return the completion it spelled. A
    failure part-way is reported as the kind it would have had before the first chunk: no byte of
    this answer has reached a client yet."""
    builder = CompletionBuilder()
    try:
        async for chunk in stream:
            builder.add(chunk)
    except BackendError as exc:
        raise before_first_byte(exc) from None
    finally:
        await stream.aclose()
    return builder.completion()


def before_first_byte(exc: BackendError) -> BackendError:
    """A mid-stream failure of an answer nobody has seen yet, as the kind it would have had
    before the first chunk (so the next backend may be tried)."""
    if exc.kind is not ErrorKind.MID_STREAM:
        return exc
    return BackendError(exc.cause or ErrorKind.UPSTREAM_5XX, exc.message, status=exc.status, param=exc.param)


def with_usage(body: Body) -> Body:
    """The body to open a stream for a JSON answer: usage asked for, so limits settle exactly."""
    return {**body, "stream": True, "stream_options": {"include_usage": True}}
