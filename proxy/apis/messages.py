"""Anthropic Messages (`POST /v1/messages`): requests in (messages_request.py), answers out as a
`message` object, its stream as Anthropic's named SSE events, errors in Anthropic's shape.

Stream: message_start, then per content block content_block_start / content_block_delta
(thinking_delta, text_delta, input_json_delta) / content_block_stop, then message_delta (stop
reason, usage) and message_stop; a failure after the first byte is an `error` event. The message
id is the backend's completion id, unchanged, so feedback finds the variant by the id the client saw.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from starlette.datastructures import Headers

from proxy import errors
from proxy.apis import messages_request
from proxy.apis.base import Parsed, Stateless
from proxy.protocol import estimate_prompt_tokens

if TYPE_CHECKING:
    pass

# an OpenAI finish_reason -> Anthropic's stop_reason (content_filter: the output policy blocked it)
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_EMPTY_BLOCKS = {
    "text": {"type": "text", "text": ""},
    "thinking": {"type": "thinking", "thinking": "", "signature": ""},
}


def error_object(exc: errors.GatewayError) -> dict[str, Any]:
    kind = ERROR_TYPES.get(exc.status) or ("api_error" if exc.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


def stop_reason(finish: str | None, matched: Any, stops: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(stop_reason, stop_sequence). `matched` is vLLM's choice.stop_reason: the stop string that
    ended the answer, when one did. No finish_reason (the upstream ended early) is no stop reason."""
    if finish is None:
        return None, None
    if finish == "stop" and isinstance(matched, str) and matched in stops:
        return "stop_sequence", matched
    return STOP_REASONS.get(finish, "end_turn"), None


def _event(name: bytes, payload: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class MessagesStream:
    """Internal chunks -> Anthropic events. One content block is open at a time: a change of
    kind (thinking, text, a new tool call) closes it and opens the next."""

    __slots__ = ("_finish", "_index", "_matched", "_model", "_open", "_started", "_stops", "_tools")

    def __init__(self, stops: tuple[str, ...], model: str) -> None:
        self._stops, self._model = stops, model
        self._started = False
        self._open: str | None = None  # the open block's kind
        self._index = -1  # the open (or last) block's index
        self._tools: dict[int, int] = {}  # tool-call index -> its block's index
        self._finish: str | None = None
        self._matched: Any = None

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        out = b"" if self._started else self._start(chunk)
        choices = chunk.get("choices") or ()
        if not choices:
            return out
        choice = choices[0]
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning:
            out += self._delta("thinking", {"type": "thinking_delta", "thinking": reasoning})
        if delta.get("content"):
            out += self._delta("text", {"type": "text_delta", "text": delta["content"]})
        for call in delta.get("tool_calls") or ():
            out += self._tool_call(call)
        if choice.get("finish_reason"):
            self._finish, self._matched = choice["finish_reason"], choice.get("stop_reason")
        return out

    def end(self, usage: dict[str, Any]) -> bytes:
        out = (b"" if self._started else self._start({})) + self._close()
        reason, sequence = stop_reason(self._finish, self._matched, self._stops)
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": {
                "input_tokens": int(usage.get("prompt_tokens") or 0),
                "output_tokens": int(usage.get("completion_tokens") or 0),
            },
        }
        return out + _event(b"message_delta", delta) + _event(b"message_stop", {"type": "message_stop"})

    def error(self, exc: errors.GatewayError) -> bytes:
        return _event(b"error", error_object(exc))

    def result(self) -> None:
        return None

    def _start(self, chunk: dict[str, Any]) -> bytes:
        self._started = True
        message: dict[str, Any] = {
            "id": chunk.get("id") or f"msg_{os.urandom(12).hex()}",
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},  # the real counts come in message_delta
        }
        return _event(b"message_start", {"type": "message_start", "message": message})

    def _open_block(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._index += 1
        self._open = kind
        start = {"type": "content_block_start", "index": self._index, "content_block": block}
        return out + _event(b"content_block_start", start)

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return _event(b"content_block_stop", {"type": "content_block_stop", "index": self._index})

    def _delta(self, kind: str, delta: dict[str, Any]) -> bytes:
        out = b"" if self._open == kind else self._open_block(kind, dict(_EMPTY_BLOCKS[kind]))
        event = {"type": "content_block_delta", "index": self._index, "delta": delta}
        return out + _event(b"content_block_delta", event)

    def _tool_call(self, call: dict[str, Any]) -> bytes:
        """A call's first delta carries its id and name (a new tool_use block); later deltas of
        the open call carry pieces of its arguments, relayed as they come."""
        out = b""
        index, function = call.get("index", 0), call.get("function") or {}
        if call.get("id") and index not in self._tools:
            block = {"type": "tool_use", "id": call["id"], "name": function.get("name") or "", "input": {}}
            out = self._open_block("tool_use", block)
            self._tools[index] = self._index
        arguments = function.get("arguments")
        if arguments and self._open == "tool_use" and self._tools.get(index) == self._index:
            event = {
                "type": "content_block_delta",
                "index": self._index,
                "delta": {"type": "input_json_delta", "partial_json": arguments},
            }
            out += _event(b"content_block_delta", event)
        return out


class MessagesApi(Stateless):
    name = "messages"

    def credentials(self, headers: Headers) -> list[str]:
        """`x-api-key: <jwt>` or `Authorization: Bearer <jwt>`; both at once only when equal
        (two different keys are refused as ambiguous by the authenticator)."""
        keys = [f"Bearer {value.strip()}" for value in headers.getlist("x-api-key")]
        return list(dict.fromkeys([*keys, *(v.strip() for v in headers.getlist("authorization"))]))

    def parse(self, raw: bytes) -> Parsed:
        req, chat = messages_request.parse(raw, require_max_tokens=True)
        return Parsed(chat, tuple(req.stop_sequences or ()))

    def parse_count(self, raw: bytes) -> Parsed:
        """A count_tokens body: the same fields, max_tokens not required."""
        req, chat = messages_request.parse(raw, require_max_tokens=False)
        return Parsed(chat, tuple(req.stop_sequences or ()))

    def render(self, completion: dict[str, Any], parsed: Parsed) -> dict[str, Any]:
        choice = (completion.get("choices") or [{}])[0]
        message = choice.get("message") or {}
        content: list[dict[str, Any]] = []
        thinking = message.get("reasoning_content") or message.get("reasoning")
        if thinking:
            content.append({"type": "thinking", "thinking": thinking, "signature": ""})
        if message.get("content"):
            content.append({"type": "text", "text": message["content"]})
        content.extend(_tool_use(call) for call in message.get("tool_calls") or ())
        reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_reason"), parsed.native)
        usage = completion.get("usage") or {}
        return {
            "id": completion.get("id"),
            "type": "message",
            "role": "assistant",
            "model": completion.get("model"),
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": {
                "input_tokens": int(usage.get("prompt_tokens") or 0),
                "output_tokens": int(usage.get("completion_tokens") or 0),
            },
        }

    def renderer(self, parsed: Parsed) -> MessagesStream:
        return MessagesStream(parsed.native, parsed.chat.model)

    def error_body(self, exc: errors.GatewayError) -> bytes:
        return orjson.dumps(error_object(exc))


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    """A tool call as a tool_use block: `input` is its arguments decoded. Arguments that are not
    a JSON object (cut short by max_tokens) come as {"_raw": <text>}, never silently dropped."""
    function = call.get("function") or {}
    arguments = function.get("arguments") or "{}"
    try:
        decoded = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        decoded = None
    tool_input = decoded if isinstance(decoded, dict) else {"_raw": arguments}
    return {"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": tool_input}


def count_input_tokens(parsed: Parsed, tokenizer: Callable[[list[Any]], int | None]) -> int:
    """count_tokens' answer: the messages by the backend's own tokenizer when it has one (else the
    gateway's estimate), plus the tool definitions estimated at ~4 bytes of JSON a token."""
    body = parsed.chat.upstream_body()
    messages = body["messages"]
    total = tokenizer(messages) or estimate_prompt_tokens(messages)
    if body.get("tools"):
        total += (len(orjson.dumps(body["tools"])) + 3) // 4
    return total
