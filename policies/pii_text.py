"""Personal data in chat bodies: placeholders in a request, the user's values put back into an
answer, and the output check of an answer (what a model wrote on its own). Pure.

A request's values are replaced in every message of every role: string content and text parts,
`refusal`, reasoning text, and tool calls' arguments. Arguments are JSON: each string is read
decoded (policies/jsontext.py) and a value is replaced in its raw form, so the arguments stay valid
JSON. Tool and response-format schemas are the developer's text and are left alone. Placeholders
are typed and numbered per request, `[PHONE_1]`, in order of first appearance, so the same value
is the same placeholder in every message and turn. Nothing is changed in place: a changed message
or answer is a copy (the cache may still hold the original answer).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

from policies.jsontext import JsonString, join_document, split_document
from policies.pii import Found, Recognizer

PLACEHOLDER = re.compile(r"\[[A-Z][A-Z0-9_]*_\d{1,6}\]")
_TEXT_FIELDS = ("content", "reasoning", "reasoning_content", "refusal")
_TEXT_SET = frozenset(_TEXT_FIELDS)
_BLANKED = ("reasoning", "reasoning_content", "refusal", "tool_calls", "function_call")
Seen = Callable[[Found], None]  # told of every value found (counts by type)


class Pseudonyms:
    """One request's placeholders. `keep`: the values are remembered to be put back (pseudonymize);
    without it a placeholder is a plain mask. Numbers continue across input and output, so a value
    the model wrote on its own never takes a number that stands for the user's."""

    __slots__ = ("_by_key", "_counts", "keep", "values")

    def __init__(self, keep: bool) -> None:
        self._by_key: dict[tuple[str, str], str] = {}
        self._counts: dict[str, int] = {}
        self.keep = keep
        self.values: dict[str, str] = {}  # placeholder -> the value as the user wrote it

    def placeholder(self, label: str, found: Found, *, keep: bool | None = None) -> str:
        k = (label, found.key)
        name = self._by_key.get(k)
        if name is None:
            n = self._counts.get(label, 0) + 1
            self._counts[label] = n
            name = self._by_key[k] = f"[{label}_{n}]"
            if self.keep if keep is None else keep:
                self.values[name] = found.value
        return name

    def restore(self, text: str, *, json: bool = False) -> str:
        """`text` with every placeholder of this request replaced by its value (JSON-escaped
        inside tool-call arguments); unknown placeholders stay as they are."""
        if not self.values or "[" not in text:
            return text
        values = self.values
        if json:
            return PLACEHOLDER.sub(lambda m: _json_escaped(values.get(m[0], m[0])), text)
        return PLACEHOLDER.sub(lambda m: values.get(m[0], m[0]), text)


def _json_escaped(value: str) -> str:
    return orjson.dumps(value).decode()[1:-1]


def replaced(text: str, found: list[Found], name: Callable[[Found], str]) -> str:
    """`text` with each found value replaced by its placeholder."""
    out: list[str] = []
    at = 0
    for f in found:
        out += (text[at : f.start], name(f))
        at = f.end
    out.append(text[at:])
    return "".join(out)


# ---- requests -------------------------------------------------------------------------------------


class RequestScan:
    """Finds the values of one request and, given `names`, replaces them (copy on write)."""

    def __init__(self, recognizer: Recognizer, names: Pseudonyms | None, seen: Seen) -> None:
        self.recognizer, self.names, self.seen = recognizer, names, seen
        self.changed = False

    def body(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list):
            return body
        new = [self._message(m) if isinstance(m, dict) else m for m in messages]
        if not self.changed:
            return body
        return {**body, "messages": new}

    def _name(self, f: Found) -> str:
        assert self.names is not None
        return self.names.placeholder(self.recognizer.labels[f.kind], f)

    def _find(self, text: str) -> list[Found]:
        found = self.recognizer.find(text)
        for f in found:
            self.seen(f)
        return found if self.names is not None else []

    def text(self, text: str) -> str:
        found = self._find(text)
        if not found:
            return text
        self.changed = True
        return replaced(text, found, self._name)

    def _message(self, msg: dict[str, Any]) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        new: Any
        for key, value in msg.items():
            if key in _TEXT_SET and isinstance(value, str):
                new = self.text(value)
            elif key == "content" and isinstance(value, list):
                new = [self._part(p) for p in value]
                new = value if all(p is q for p, q in zip(new, value, strict=True)) else new
            elif key == "tool_calls" and isinstance(value, list):
                new = [self._call(c) for c in value]
                new = value if all(c is d for c, d in zip(new, value, strict=True)) else new
            else:
                continue
            if new is not value:
                changes[key] = new
        return {**msg, **changes} if changes else msg

    def _part(self, part: Any) -> Any:
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            return part
        new = self.text(part["text"])
        return part if new is part["text"] else {**part, "text": new}

    def _call(self, call: Any) -> Any:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
            return call
        new = self.arguments(fn["arguments"])
        return call if new is fn["arguments"] else {**call, "function": {**fn, "arguments": new}}

    def arguments(self, raw: str) -> str:
        """JSON text: each string's decoded text is scanned, a value replaced in its raw form."""
        parts = split_document(raw)
        if parts is None:
            return self.text(raw)
        changed = False
        for i, part in enumerate(parts):
            if isinstance(part, JsonString) and part.forms and (found := self._find(part.text)):
                parts[i] = _raw_replaced(part, found, self._name)
                changed = True
        self.changed = self.changed or changed
        return join_document(parts) if changed else raw


def _raw_replaced(string: JsonString, found: list[Found], name: Callable[[Found], str]) -> str:
    """The raw JSON form of `string` with each value replaced by its placeholder (which needs no
    escaping); every other character keeps its raw form (an escape stays an escape)."""
    raw: list[str] = []  # raw form of each decoded character
    for decoded, form in string.forms:
        if form is None:
            raw.extend(decoded)
        else:
            raw.append(form)
            raw.extend("" for _ in decoded[1:])
    out: list[str] = []
    at = 0
    for f in found:
        out += (*raw[at : f.start], name(f))
        at = f.end
    out += raw[at:]
    return "".join(out)


# ---- answers --------------------------------------------------------------------------------------


class AnswerCheck:
    """The output side of one request: values the model wrote itself (found by `recognizer`,
    None when the output check is off) are counted and, per `action`, masked or the choice
    blocked; then the request's placeholders are put back."""

    def __init__(self, recognizer: Recognizer | None, action: str, names: Pseudonyms, seen: Seen) -> None:
        self.recognizer, self.action, self.names, self.seen = recognizer, action, names, seen
        self.blocked = False

    def found(self, text: str, context: str = "") -> list[Found]:
        """The values in `text` (counted); `context`: the text just before it, read for context
        words and boundaries only (offsets are `text`'s)."""
        if self.recognizer is None:
            return []
        found = self.recognizer.find(context + text if context else text)
        if context:
            n = len(context)
            found = [Found(f.start - n, f.end - n, f.kind, f.value, f.key) for f in found if f.start >= n]
        for f in found:
            self.seen(f)
        return found

    def apply(self, text: str, found: list[Found], *, json: bool = False) -> str:
        """The action on `found` (block: only what precedes the first value), then the user's
        values put back."""
        if found and self.action == "block":
            self.blocked = True
            text = text[: found[0].start]
        elif found and self.action == "mask":
            text = replaced(text, found, self._mask)
        return self.names.restore(text, json=json)

    def text(self, text: str, *, json: bool = False) -> str:
        return self.apply(text, self.found(text), json=json)

    def _mask(self, f: Found) -> str:
        assert self.recognizer is not None
        return self.names.placeholder(self.recognizer.labels[f.kind], f, keep=False)

    def completion(self, completion: dict[str, Any]) -> dict[str, Any]:
        """A copy of a `chat.completion` as the client gets it; a blocked choice is emptied and
        ends in content_filter."""
        choices = completion.get("choices")
        if not isinstance(choices, list):
            return completion
        return {**completion, "choices": [self._choice(c) for c in choices]}

    def _choice(self, choice: Any) -> Any:
        msg = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(msg, dict):
            return choice
        self.blocked = False
        new = dict(msg)
        for key in _TEXT_FIELDS:
            if isinstance(msg.get(key), str):
                new[key] = self.text(msg[key])
        calls = msg.get("tool_calls")
        if isinstance(calls, list):
            new["tool_calls"] = [self._call(c) for c in calls]
        if not self.blocked:
            return {**choice, "message": new}
        for key in _BLANKED:
            new.pop(key, None)
        new["content"] = ""
        return {**choice, "message": new, "finish_reason": "content_filter", "logprobs": None}

    def _call(self, call: Any) -> Any:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
            return call
        return {**call, "function": {**fn, "arguments": self.text(fn["arguments"], json=True)}}
