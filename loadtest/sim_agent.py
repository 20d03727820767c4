"""Agent-shaped answers of the simulated vLLM: reasoning text before the answer (what vLLM's
reasoning parser streams) and tool calls (what its tool parser streams), as vLLM puts them on the
wire. Pure; no I/O.

Asked for per request by a marker in the last user message (load tests and end-to-end tests set
it; the rest of the prompt is answered as usual):

    [sim reasoning=40 tool_calls=2 tool_bytes=9000 tool_chunk=7 ascii=1]

`reasoning`: reasoning tokens before the content; `tool_calls`: calls to make (1 when only
`tool_bytes` is given); `tool_bytes`: length of each call's JSON arguments (at least; default
256); `tool_chunk`: characters per streamed arguments piece (default 8); `ascii=1`: arguments
escaped to ASCII (`\\u00e9`), as `json.dumps` writes them by default. Exact pieces come from
`SimConfig.agent_scripts` instead, keyed like `scripts` by a substring of the last user message:
`{"reasoning": [...], "content": [...], "tool_calls": [["{\\"a\\": ", "1}"], ...]}`.

What vLLM does and the simulator copies (vllm/entrypoints/openai/chat_completion/serving.py,
generate/base/protocol.py; chunks are `model_dump_json(exclude_unset=True)`):
- tool calls only when the request offers tools and tool_choice is not "none"; a call's first
  delta is `{"id": "chatcmpl-tool-<hex>", "type": "function", "index": i, "function": {"name"}}`,
  the arguments follow as `{"index": i, "function": {"arguments": piece}}`, and the stream ends
  with an empty delta carrying finish_reason "tool_calls" ("stop" for a named tool_choice, which
  makes exactly one call); the JSON answer's message has `tool_calls` and `content` null;
- reasoning deltas under `SimConfig.reasoning_field`: "reasoning" (vLLM's name since late 2025,
  the only one since early 2026), "reasoning_content" (earlier vLLM), or "both" (the same text
  under both names, as compatibility layers send it).
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

REASONING_FIELDS = frozenset({"reasoning", "reasoning_content", "both"})
_MARKER = re.compile(r"\[sim ([^\]]*)\]")
_OPTIONS = {"reasoning", "tool_calls", "tool_bytes", "tool_chunk", "ascii"}
_THOUGHT = ("The", "user", "wants", "a", "careful", "answer,", "so", "let", "me", "check", "each", "step.")
_LINES = (
    'He said "ship it" and left.',
    "Path: C:\\agent\\notes\\todo.txt",
    "Tabs\tand\nnew lines",
    "Café, naïve, façade",
    "数据库索引的原理",
    "Launch 🚀 at 09:00",
)


@dataclass(frozen=True)
class Call:
    id: str
    name: str
    pieces: tuple[str, ...]  # the arguments JSON as streamed


@dataclass(frozen=True)
class AgentReply:
    """What one choice says, in the order vLLM streams it: reasoning, content, then tool calls."""

    reasoning: tuple[str, ...]
    content: tuple[str, ...]
    calls: tuple[Call, ...]
    named: bool  # tool_choice named the function: finish_reason "stop" instead of "tool_calls"
    field: str  # SimConfig.reasoning_field

    def tokens(self) -> tuple[str, ...]:
        """One text per streamed step (a call's name, each piece; the closing step is empty)."""
        steps = [*self.reasoning, *self.content]
        for call in self.calls:
            steps += [call.name, *call.pieces]
        return (*steps, "") if self.calls else tuple(steps)

    def finish_reason(self, engine_finish: str) -> str:
        if engine_finish == "length" or not self.calls:
            return engine_finish
        return "stop" if self.named else "tool_calls"

    def deltas(self, count: int) -> Iterator[dict[str, Any]]:
        """The delta of each of the first `count` steps."""
        for step, delta in enumerate(self._all_deltas()):
            if step >= count:
                return
            yield delta

    def _all_deltas(self) -> Iterator[dict[str, Any]]:
        for text in self.reasoning:
            yield self._reasoning(text)
        for text in self.content:
            yield {"content": text}
        for i, call in enumerate(self.calls):
            head = {"id": call.id, "type": "function", "index": i, "function": {"name": call.name}}
            yield {"tool_calls": [head]}
            for piece in call.pieces:
                yield {"tool_calls": [{"index": i, "function": {"arguments": piece}}]}
        if self.calls:
            yield {}  # the closing token (</tool_call>, end of sequence): nothing to show

    def message(self, count: int) -> dict[str, Any]:
        """The JSON answer's message (vLLM's ChatMessage) after the first `count` steps."""
        reasoning, content = [], []
        calls: dict[int, dict[str, Any]] = {}
        for delta in self.deltas(count):
            for call in delta.get("tool_calls", ()):
                fn = call["function"]
                if "name" in fn:  # a call's first delta: its id, type and name
                    function = {"name": fn["name"], "arguments": ""}
                    calls[call["index"]] = {"id": call["id"], "type": "function", "function": function}
                else:
                    calls[call["index"]]["function"]["arguments"] += fn["arguments"]
            content.append(delta.get("content") or "")
            reasoning.append(delta.get("reasoning") or delta.get("reasoning_content") or "")
        message: dict[str, Any] = {
            "role": "assistant",
            "content": _content("".join(content), bool(calls), self.named),
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
        }
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        text = "".join(reasoning) or None
        for name in ("reasoning", "reasoning_content"):
            if self.field in (name, "both"):
                message[name] = text
        return message

    def _reasoning(self, text: str) -> dict[str, Any]:
        if self.field == "both":
            return {"reasoning": text, "reasoning_content": text}
        return {self.field: text}


def _content(text: str, called: bool, named: bool) -> str | None:
    """vLLM's message content: a call made by choice (auto) leaves it null when empty."""
    if called and not named:
        return text or None
    return text


def check_script(key: str, script: Any) -> None:
    """An `agent_scripts` entry: reasoning / content lists of strings, tool_calls lists of them."""
    if not isinstance(script, Mapping) or set(script) - {"reasoning", "content", "tool_calls"}:
        raise ValueError(f"agent script {key!r} must map reasoning/content/tool_calls to pieces")
    for name in ("reasoning", "content"):
        if not all(isinstance(p, str) for p in script.get(name, ())):
            raise ValueError(f"agent script {key!r}: {name} must be a list of strings")
    for pieces in script.get("tool_calls", ()):
        if not pieces or not all(isinstance(p, str) for p in pieces):
            raise ValueError(f"agent script {key!r}: each tool call must be a non-empty list of strings")


def agent_reply(
    body: dict[str, Any], last_user: str, scripts: Mapping[str, Any], field: str, content: tuple[str, ...]
) -> AgentReply | None:
    """The agent-shaped answer this request asks for, or None for a plain one. `content` is the
    plain answer's tokens, kept as the content when the marker asks for reasoning only."""
    script = next((s for key, s in scripts.items() if key in last_user), None)
    if script is None:
        options = _marker(last_user)
        if options is None:
            return None
        script = _generated(options, content)
    names, named = _tool_names(body)
    calls = (
        tuple(
            Call("chatcmpl-tool-" + os.urandom(16).hex(), names[i % len(names)], tuple(pieces))
            for i, pieces in enumerate(script.get("tool_calls", ())[: 1 if named else None])
        )
        if names
        else ()
    )
    said = tuple(script.get("content", ()))
    return AgentReply(
        reasoning=tuple(script.get("reasoning", ())),
        content=said if said or calls else content,  # offered no tools, the model answers in text
        calls=calls,
        named=named,
        field=field,
    )


@functools.lru_cache(maxsize=64)
def tool_arguments(size: int, seed: int = 0, *, ascii: bool = False) -> str:
    """Deterministic JSON arguments of at least `size` characters, with text that needs escapes
    (quotes, backslashes, control characters) and non-ASCII (accents, Chinese, an emoji)."""
    lines: list[str] = []
    args: dict[str, Any] = {"path": f"notes/item-{seed}.md", "mode": "append", "lines": lines}
    length = len(json.dumps(args, ensure_ascii=ascii))
    while length < size:
        line = f"{len(lines)}: {_LINES[(len(lines) + seed) % len(_LINES)]}"
        length += len(json.dumps(line, ensure_ascii=ascii)) + (2 if lines else 0)  # ", " between
        lines.append(line)
    return json.dumps(args, ensure_ascii=ascii)


def _marker(text: str) -> dict[str, int] | None:
    m = _MARKER.search(text)
    if m is None:
        return None
    options: dict[str, int] = {}
    for item in m.group(1).split():
        name, _, value = item.partition("=")
        if name in _OPTIONS and value.isdigit():
            options[name] = int(value)
    return options


def _generated(options: dict[str, int], content: tuple[str, ...]) -> dict[str, Any]:
    thought = [_THOUGHT[i % len(_THOUGHT)] for i in range(options.get("reasoning", 0))]
    script: dict[str, Any] = {"reasoning": [(" " if i else "") + w for i, w in enumerate(thought)]}
    calls = options.get("tool_calls", 1 if "tool_bytes" in options else 0)
    chunk = max(1, options.get("tool_chunk", 8))
    pieces = []
    for seed in range(calls):
        raw = tool_arguments(options.get("tool_bytes", 256), seed, ascii=bool(options.get("ascii")))
        pieces.append([raw[i : i + chunk] for i in range(0, len(raw), chunk)])
    script["tool_calls"] = pieces
    script["content"] = [] if calls else list(content)
    return script


def _tool_names(body: dict[str, Any]) -> tuple[list[str], bool]:
    """(function names the model may call, whether tool_choice named one); no names: no calls."""
    choice = body.get("tool_choice")
    if choice == "none":
        return [], False
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return [str(choice["function"].get("name"))], True
    tools = body.get("tools")
    if not isinstance(tools, list):
        return [], False
    functions = [t.get("function") for t in tools if isinstance(t, dict)]
    return [str(f.get("name")) for f in functions if isinstance(f, dict)], False
