"""Where text hides in OpenAI chat bodies, and scanning / masking all of it in one matcher pass.

Request: every message of every role (string content or an array of parts, `name`, `refusal`,
reasoning text (`reasoning`, vLLM's name, and `reasoning_content`), tool calls' and legacy
function calls' names and arguments), tool results (role "tool" content) and the tool / function
definitions and `response_format` schemas. Completion: every choice's `content`, reasoning text,
`refusal` and tool calls' names and arguments. Text parts of one message are scanned as one text,
so a word split across two parts is still a hit; separate fields never join. JSON arguments are
read string by string, decoded (a `\\u6d17` escape is seen as the character), keys included; a
mask replaces a character's raw form inside its string (policies/jsontext.py), so masked
arguments are still valid JSON and otherwise unchanged byte for byte. Arguments that are not JSON
are scanned as plain text. Pure functions; hits carry where they were, never the word.
"""

from __future__ import annotations

import copy
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from policies.jsontext import JsonString, join_document, split_document
from policies.words import Match, Matcher, mask_spans

_PART_KEYS = ("text", "refusal")
_MESSAGE_FIELDS = ("name", "refusal", "reasoning", "reasoning_content")
_OUTPUT_FIELDS = ("content", "reasoning", "reasoning_content", "refusal")
Document = tuple[dict[str, Any], str, list["str | JsonString"]]  # (holder, key, split JSON text)


@dataclass(frozen=True)
class Hit:
    where: str  # e.g. "messages[2].content", "choices[0].message.tool_calls[1].function.arguments"
    choice: int | None  # the choice index for completions
    source: str  # "file:line" of the listed word: loggable, unlike the word


@dataclass
class _Slot:
    holder: Any  # dict or list holding the text, or the JsonString it is
    key: Any
    text: str


@dataclass
class _Group:
    """Texts scanned as one (parts of a message); `owner` is set for a string of JSON text."""

    where: str
    choice: int | None
    slots: list[_Slot] = field(default_factory=list)
    owner: Document | None = None  # the JSON text the string (the one slot's holder) belongs to


class _Collector:
    def __init__(self) -> None:
        self.groups: list[_Group] = []

    def text(self, holder: Any, key: Any, where: str, choice: int | None = None) -> None:
        value = holder.get(key) if isinstance(holder, dict) else holder[key]
        if isinstance(value, str) and value:
            self.groups.append(_Group(where, choice, [_Slot(holder, key, value)]))

    def parts(self, parts: list[Any], where: str) -> None:
        group = _Group(where, None)
        for part in parts:
            if isinstance(part, str):  # lenient clients send bare strings
                continue
            if isinstance(part, dict):
                for key in _PART_KEYS:
                    if isinstance(part.get(key), str):
                        group.slots.append(_Slot(part, key, part[key]))
        if group.slots:
            self.groups.append(group)

    def arguments(self, holder: dict[str, Any], key: str, where: str, choice: int | None = None) -> None:
        raw = holder.get(key)
        if not isinstance(raw, str) or not raw:
            return
        parts = split_document(raw)
        if parts is None:
            self.text(holder, key, where, choice)
            return
        document = (holder, key, parts)
        for part in parts:
            if isinstance(part, JsonString) and part.forms:
                self.groups.append(_Group(where, choice, [_Slot(part, "masked", part.text)], document))

    def strings(self, obj: Any, where: str) -> None:
        """Every string value under a (schema-like) object."""
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
        for key, value in items:
            if isinstance(value, str):
                self.text(obj, key, where)
            else:
                self.strings(value, where)


def _collect_message(c: _Collector, msg: dict[str, Any], where: str) -> None:
    content = msg.get("content")
    if isinstance(content, list):
        c.parts(content, f"{where}.content")
    else:
        c.text(msg, "content", f"{where}.content")
    for key in _MESSAGE_FIELDS:
        c.text(msg, key, f"{where}.{key}")
    _collect_calls(c, msg, where, None)


def _collect_calls(c: _Collector, msg: dict[str, Any], where: str, choice: int | None) -> None:
    calls = msg.get("tool_calls")
    for j, call in enumerate(calls if isinstance(calls, list) else []):
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            c.text(fn, "name", f"{where}.tool_calls[{j}].function.name", choice)
            c.arguments(fn, "arguments", f"{where}.tool_calls[{j}].function.arguments", choice)
    legacy = msg.get("function_call")
    if isinstance(legacy, dict):
        c.text(legacy, "name", f"{where}.function_call.name", choice)
        c.arguments(legacy, "arguments", f"{where}.function_call.arguments", choice)


def _collect_request(body: dict[str, Any]) -> _Collector:
    c = _Collector()
    messages = body.get("messages")
    for i, msg in enumerate(messages if isinstance(messages, list) else []):
        if isinstance(msg, dict):
            _collect_message(c, msg, f"messages[{i}]")
    for key in ("tools", "functions", "response_format"):
        c.strings(body.get(key), key)
    return c


def _collect_completion(completion: dict[str, Any]) -> _Collector:
    c = _Collector()
    choices = completion.get("choices")
    for i, choice in enumerate(choices if isinstance(choices, list) else []):
        msg = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(msg, dict):
            continue
        index = choice.get("index", i)
        where = f"choices[{index}].message"
        for key in _OUTPUT_FIELDS:
            c.text(msg, key, f"{where}.{key}", index)
        _collect_calls(c, msg, where, index)
    return c


def _find(matcher: Matcher, groups: list[_Group]) -> list[list[Match]]:
    """One matcher pass over all groups joined by line breaks; a hit may not cross two groups."""
    texts = ["".join(s.text for s in g.slots) for g in groups]
    starts, at = [], 0
    for t in texts:
        starts.append(at)
        at += len(t) + 1
    per_group: list[list[Match]] = [[] for _ in groups]
    for m in matcher.find("\n".join(texts)):
        g = bisect_right(starts, m.start) - 1
        if m.end <= starts[g] + len(texts[g]):
            per_group[g].append(Match(m.start - starts[g], m.end - starts[g], m.word_id))
    return per_group


def _scan(
    matcher: Matcher, body: dict[str, Any], collect: Callable[[dict[str, Any]], _Collector], mask: bool
) -> tuple[dict[str, Any], list[Hit]]:
    groups = collect(body).groups
    found = _find(matcher, groups) if groups else []
    pairs = zip(groups, found, strict=True)
    hits = [Hit(g.where, g.choice, matcher.source(m.word_id)) for g, ms in pairs for m in ms]
    if not hits or not mask:
        return body, hits
    new = copy.deepcopy(body)
    new_groups = collect(new).groups  # same order as `groups`: the walk is deterministic
    documents: dict[int, Document] = {}
    for group, matches in zip(new_groups, found, strict=True):
        if matches:
            _apply(group, matches)
            if group.owner is not None:
                documents[id(group.owner[2])] = group.owner
    for holder, key, parts in documents.values():
        holder[key] = join_document(parts)
    return new, hits


def _apply(group: _Group, matches: list[Match]) -> None:
    masked = mask_spans("".join(s.text for s in group.slots), matches)
    at = 0
    for slot in group.slots:
        piece = masked[at : at + len(slot.text)]
        if isinstance(slot.holder, JsonString):
            slot.holder.masked = piece
        else:
            slot.holder[slot.key] = piece
        at += len(slot.text)


def scan_request(matcher: Matcher, body: dict[str, Any], *, mask: bool) -> tuple[dict[str, Any], list[Hit]]:
    """Hits in a chat request; with `mask`, also a masked deep copy (the input is never changed)."""
    return _scan(matcher, body, _collect_request, mask)


def scan_completion(
    matcher: Matcher, completion: dict[str, Any], *, mask: bool
) -> tuple[dict[str, Any], list[Hit]]:
    """Hits in a `chat.completion`; with `mask`, also a masked deep copy. A masked choice loses
    its `logprobs`, whose tokens would repeat the masked text."""
    new, hits = _scan(matcher, completion, _collect_completion, mask)
    if mask and hits:
        hit = {h.choice for h in hits}
        for i, choice in enumerate(new.get("choices") or []):
            if isinstance(choice, dict) and choice.get("index", i) in hit and "logprobs" in choice:
                choice["logprobs"] = None
    return new, hits
