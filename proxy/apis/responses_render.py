"""OpenAI Responses rendering: an internal chat.completion as a Response object, and internal
chunks as the typed SSE events the OpenAI SDK folds into one (`event: <type>` + `data: {...}`, each
with its `sequence_number`).

A stream is response.created, response.in_progress, then per output item (reasoning, message,
function_call, in the order the model produced them) output_item.added, its content events and
output_item.done, and last response.completed (or response.incomplete when the answer hit
max_output_tokens or the content filter). A failure after the first byte closes the open item as
incomplete and ends the stream with an `error` event and response.failed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from proxy.apis.responses_request import FunctionChoice, ResponsesRequest

if TYPE_CHECKING:
    from proxy import errors

_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


def envelope(req: ResponsesRequest, response_id: str, created_at: int) -> dict[str, Any]:
    """The Response object before any output: what the request set, echoed as OpenAI does."""
    fmt = req.text.format if req.text is not None and req.text.format is not None else None
    choice = req.tool_choice
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": req.max_tool_calls,
        "model": req.model,
        "output": [],
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
        "store": req.store is not False,
        "temperature": req.temperature,
        "text": {"format": fmt.model_dump(exclude_none=True, by_alias=True) if fmt else {"type": "text"}},
        "tool_choice": choice.model_dump() if isinstance(choice, FunctionChoice) else choice or "auto",
        "tools": [tool.model_dump() for tool in req.tools or ()],
        "top_p": req.top_p,
        "truncation": req.truncation or "disabled",
        "usage": None,
        "user": req.user,
        "metadata": req.metadata or {},
    }


def render_completion(completion: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """A (policy-filtered) chat.completion -> the finished Response object."""
    choice = (completion.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    finish = choice.get("finish_reason")
    status = "incomplete" if finish in _INCOMPLETE else "completed"
    suffix = env["id"].removeprefix("resp_")
    items: list[dict[str, Any]] = []
    if reasoning := message.get("reasoning_content") or message.get("reasoning"):
        items.append(_reasoning_item(f"rs_{suffix}_{len(items)}", reasoning, "completed"))
    content, calls = message.get("content"), message.get("tool_calls") or []
    if isinstance(content, str) and (content or not calls):
        items.append(_message_item(f"msg_{suffix}_{len(items)}", content, status))
    for call in calls:
        fn = call.get("function") or {}
        call_id = call.get("id") or f"call_{suffix}_{len(items)}"
        name, arguments = fn.get("name") or "", fn.get("arguments") or ""
        items.append(_call_item(f"fc_{suffix}_{len(items)}", call_id, name, arguments))
    return finished(env, items, finish, completion.get("usage"))


def finished(
    env: dict[str, Any], items: list[dict[str, Any]], finish: str | None, usage: dict[str, Any] | None
) -> dict[str, Any]:
    reason = _INCOMPLETE.get(finish or "")
    return {
        **env,
        "status": "incomplete" if reason else "completed",
        "incomplete_details": {"reason": reason} if reason else None,
        "output": items,
        "usage": _usage(usage or {}),
    }


def _usage(usage: dict[str, Any]) -> dict[str, Any]:
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [_text_part(text)] if text or status != "in_progress" else []
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def _reasoning_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    content = [{"type": "reasoning_text", "text": text}] if status != "in_progress" else []
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}  # fmt: skip


@dataclass(slots=True)
class _Open:
    """The output item being streamed."""

    kind: str  # message | reasoning | function_call
    index: int
    id: str
    parts: list[str] = field(default_factory=list)
    call_id: str = ""
    name: str = ""
    tool_index: int = 0


class ResponsesStream:
    """One per streamed answer: internal chunks in, Responses SSE events out (base.StreamRenderer)."""

    __slots__ = ("_env", "_final", "_finish", "_items", "_open", "_seq", "_suffix")

    def __init__(self, env: dict[str, Any]) -> None:
        self._env, self._suffix = env, env["id"].removeprefix("resp_")
        self._seq = -1  # -1: nothing sent yet
        self._items: list[dict[str, Any]] = []
        self._open: _Open | None = None
        self._finish: str | None = None
        self._final: dict[str, Any] | None = None

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        out = self._start()
        for choice in chunk.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            if text := delta.get("reasoning_content") or delta.get("reasoning"):
                self._text("reasoning", text, out)
            if text := delta.get("content"):
                self._text("message", text, out)
            for call in delta.get("tool_calls") or ():
                self._call(call, out)
            self._finish = choice.get("finish_reason") or self._finish
        return b"".join(out)

    def end(self, usage: dict[str, Any]) -> bytes:
        out = self._start()
        self._close(out, "incomplete" if self._finish in _INCOMPLETE else "completed")
        final = finished(self._env, self._items, self._finish, usage)
        self._final = final
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        out.append(self._event(kind, response=final))
        return b"".join(out)

    def error(self, exc: errors.GatewayError) -> bytes:
        out = self._start()
        self._close(out, "incomplete")
        out.append(self._event("error", code=exc.code, message=exc.message, param=exc.param))
        if exc.code == "content_filter":  # the output policy blocked the answer part-way
            ended = {**self._env, "status": "incomplete", "incomplete_details": {"reason": "content_filter"}}
            out.append(self._event("response.incomplete", response={**ended, "output": self._items}))
        else:
            code = "server_error" if exc.status >= 500 else exc.code
            failed = {**self._env, "status": "failed", "error": {"code": code, "message": exc.message}}
            out.append(self._event("response.failed", response={**failed, "output": self._items}))
        return b"".join(out)

    def result(self) -> dict[str, Any] | None:
        return self._final

    # -- events ------------------------------------------------------------------------------------
    def _event(self, kind: str, **fields: Any) -> bytes:
        self._seq += 1
        data = orjson.dumps({"type": kind, **fields, "sequence_number": self._seq})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def _start(self) -> list[bytes]:
        if self._seq >= 0:
            return []
        return [self._event("response.created", response=self._env),
                self._event("response.in_progress", response=self._env)]  # fmt: skip

    def _begin(self, kind: str, out: list[bytes], call: dict[str, Any] | None = None) -> _Open:
        self._close(out, "completed")
        index = len(self._items)
        prefix = {"message": "msg", "reasoning": "rs", "function_call": "fc"}[kind]
        item = _Open(kind, index, f"{prefix}_{self._suffix}_{index}")
        if kind == "message":
            added = _message_item(item.id, "", "in_progress")
        elif kind == "reasoning":
            added = _reasoning_item(item.id, "", "in_progress")
        else:
            fn = (call or {}).get("function") or {}
            item.call_id = (call or {}).get("id") or f"call_{self._suffix}_{index}"
            item.name, item.tool_index = fn.get("name") or "", (call or {}).get("index", 0)
            added = _call_item(item.id, item.call_id, item.name, "", "in_progress")
        out.append(self._event("response.output_item.added", output_index=index, item=added))
        if kind != "function_call":
            part = _text_part("") if kind == "message" else {"type": "reasoning_text", "text": ""}
            out.append(self._content_event("response.content_part.added", item, part=part))
        self._open = item
        return item

    def _content_event(self, kind: str, item: _Open, **fields: Any) -> bytes:
        return self._event(kind, item_id=item.id, output_index=item.index, content_index=0, **fields)

    def _text(self, kind: str, text: str, out: list[bytes]) -> None:
        item = self._open if self._open is not None and self._open.kind == kind else self._begin(kind, out)
        item.parts.append(text)
        if kind == "message":
            out.append(self._content_event("response.output_text.delta", item, delta=text, logprobs=[]))
        else:
            out.append(self._content_event("response.reasoning_text.delta", item, delta=text))

    def _call(self, call: dict[str, Any], out: list[bytes]) -> None:
        item = self._open
        if item is None or item.kind != "function_call" or item.tool_index != call.get("index", 0):
            item = self._begin("function_call", out, call)
        fn = call.get("function") or {}
        item.name = item.name or fn.get("name") or ""
        if arguments := fn.get("arguments"):
            item.parts.append(arguments)
            out.append(self._event("response.function_call_arguments.delta", item_id=item.id,
                                   output_index=item.index, delta=arguments))  # fmt: skip

    def _close(self, out: list[bytes], status: str) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        text = "".join(item.parts)
        if item.kind == "message":
            out.append(self._content_event("response.output_text.done", item, text=text, logprobs=[]))
            out.append(self._content_event("response.content_part.done", item, part=_text_part(text)))
            done = _message_item(item.id, text, status)
        elif item.kind == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            out.append(self._content_event("response.reasoning_text.done", item, text=text))
            out.append(self._content_event("response.content_part.done", item, part=part))
            done = _reasoning_item(item.id, text, status)
        else:
            out.append(self._event("response.function_call_arguments.done", item_id=item.id,
                                   output_index=item.index, arguments=text, name=item.name))  # fmt: skip
            done = _call_item(item.id, item.call_id, item.name, text, status)
        self._items.append(done)
        out.append(self._event("response.output_item.done", output_index=item.index, item=done))
