"""The output side of personal data on a stream of OpenAI chunks: the request's placeholders put
back, and values the model wrote itself checked, whatever the chunk boundaries. Pure.

Each text of a choice (content, reasoning, refusal, each tool call's arguments) is a `TextStream`
with a bounded hold-back. Putting values back holds only what may still become a placeholder (a
`[` and up to 32 capital letters, digits and `_` after it), so `[PHO` + `NE_1]` is restored whole
and ordinary text is not delayed. Checking the model's own values (output action mask or block)
holds the run at the end that may still grow into one (digits with their separators, or a word
that may turn into an address), at most `MAX_HOLD` characters; with "flag" nothing is held: the
whole text is checked once when it ends, and only counted. Held text is released into the chunk
that carries the choice's finish_reason, or by `flush_chunks` when the upstream ends without one.
"""

from __future__ import annotations

import re
from typing import Any

from policies.pii_text import AnswerCheck
from policies.stream import TEXT_FIELDS, TOOL, Key, blocked_end, choice_end, has_text, put_text

MAX_HOLD = 96  # characters held while they may still become a value
CONTEXT = 24  # characters kept before the released text, for context words and boundaries
_PLACEHOLDER_HEAD = re.compile(r"\[[A-Z0-9_]{0,32}")
_TAIL = re.compile(r"(?:[+(]?\d[\d()\-. ]*|[A-Za-z0-9._%+\-:@]+|\[[A-Z0-9_]{0,32})\Z")
_TEXT_SET = frozenset(TEXT_FIELDS)


def _placeholder_cut(text: str) -> int:
    """Where a possible placeholder begins at the end of `text` (len(text): none)."""
    i = text.rfind("[", max(0, len(text) - 34))
    return i if i >= 0 and _PLACEHOLDER_HEAD.fullmatch(text, i) else len(text)


def _value_cut(text: str) -> int:
    """Where a run that may still grow into a value begins at the end of `text`."""
    m = _TAIL.search(text, max(0, len(text) - MAX_HOLD))
    return m.start() if m is not None else len(text)


class TextStream:
    """One streamed text. `feed` returns what may be sent now, `flush` the rest."""

    __slots__ = ("_buf", "_check", "_ctx", "_json", "_shadow", "blocked")

    def __init__(self, check: AnswerCheck, *, json: bool = False) -> None:
        self._check, self._json = check, json
        self._buf = self._ctx = ""
        self._shadow: list[str] = []  # flag: the text so far, checked when it ends
        self.blocked = False

    @property
    def held(self) -> int:
        """Characters received and not yet returned."""
        return len(self._buf)

    def feed(self, text: str) -> str:
        if self.blocked:
            return ""
        check = self._check
        if check.recognizer is not None and check.action != "flag":
            buf = self._buf + text
            cut = _value_cut(buf)
            self._buf = buf[cut:]
            return self._release(buf[:cut])
        if check.recognizer is not None:
            self._shadow.append(text)
        if not self._buf and "[" not in text:  # putting values back only: hold a placeholder's head
            return text
        buf = self._buf + text
        cut = _placeholder_cut(buf)
        self._buf = buf[cut:]
        return check.names.restore(buf[:cut], json=self._json)

    def flush(self) -> str:
        if self.blocked:
            return ""
        check, rest, self._buf = self._check, self._buf, ""
        if check.recognizer is not None and check.action != "flag":
            return self._release(rest)
        if self._shadow:
            check.found("".join(self._shadow))
            self._shadow.clear()
        return check.names.restore(rest, json=self._json)

    def _release(self, text: str) -> str:
        if not text:
            return ""
        found = self._check.found(text, self._ctx)
        self._ctx = (self._ctx + text)[-CONTEXT:]
        self._check.blocked = False
        out = self._check.apply(text, found, json=self._json)
        self.blocked = self._check.blocked
        return out


class ChunkRestorer:
    """Applies the output side to OpenAI `chat.completion.chunk` dicts; `feed` returns the chunks
    to send now: the chunk itself when nothing in it changes, else new dicts (the input, which the
    cache may keep, is never changed). A choice whose
    text is all held is left out unless it carries something else (role, finish_reason, a tool
    call's id or name); a chunk left with no choice is not sent. `blocked` turns True when the
    output action is "block" and the model wrote a value: the caller ends the stream
    (`finish_chunks()`, then an error)."""

    def __init__(self, check: AnswerCheck) -> None:
        self._check = check
        self._streams: dict[Key, TextStream] = {}
        self._template: dict[str, Any] = {}
        self.blocked = False

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        choices = chunk.get("choices")
        if self.blocked:
            return []
        if not isinstance(choices, list) or not choices:
            return [chunk]
        if self._passes(choices):
            return [chunk]
        self._template = {k: v for k, v in chunk.items() if k in ("id", "object", "created", "model")}
        kept = [c for c in (self._choice(choice) for choice in choices) if c is not None]
        return [{**chunk, "choices": kept}] if kept or chunk.get("usage") else []

    def _passes(self, choices: list[Any]) -> bool:
        """The common case, sent on as it is: nothing held, no `[` in the chunk's text, no tool
        call or finish_reason, and the model's text not held for a check (output off, or flag:
        its text is kept to be checked when the choice ends)."""
        check = self._check
        if self._holding or (check.recognizer is not None and check.action != "flag"):
            return False
        texts = []
        for choice in choices:
            delta = choice.get("delta") if isinstance(choice, dict) else None
            if not isinstance(delta, dict) or choice.get("finish_reason"):
                return False
            for field, text in delta.items():
                if field in _TEXT_SET and text:
                    if "[" in text:
                        return False
                    texts.append((choice.get("index", 0), field, text))
                elif field == "tool_calls" and text:
                    return False
        if check.recognizer is not None:  # flag: the whole text is checked when it ends
            for index, field, text in texts:
                self._stream((index, field, -1)).feed(text)
        return True

    def finish_chunks(self) -> list[dict[str, Any]]:
        """After a block: one chunk ending every choice with finish_reason "content_filter"."""
        return blocked_end(self._template, {key[0] for key in self._streams})

    def flush_chunks(self) -> list[dict[str, Any]]:
        """The upstream ended without a finish_reason: everything still held."""
        if self.blocked:
            return []
        deltas: dict[int, dict[str, Any]] = {}
        for key in list(self._streams):
            put_text(deltas.setdefault(key[0], {}), key, self._streams.pop(key).flush())
        choices = [choice_end(i, d, None) for i, d in deltas.items() if has_text(d)]
        return [{**self._template, "choices": choices}] if choices else []

    @property
    def _holding(self) -> bool:
        return any(s.held for s in self._streams.values())

    def _stream(self, key: Key) -> TextStream:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = TextStream(self._check, json=key[1] == TOOL)
        return stream

    def _feed(self, key: Key, text: str) -> str:
        stream = self._stream(key)
        out = stream.feed(text)
        self.blocked = self.blocked or stream.blocked
        return out

    def _choice(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        index = choice.get("index", 0)
        delta = choice.get("delta") or {}
        new = {k: v for k, v in delta.items() if k not in TEXT_FIELDS and k != "tool_calls"}
        carries = bool(choice.get("finish_reason")) or any(v is not None for v in new.values())
        for field in TEXT_FIELDS:
            text = delta.get(field)
            if text is not None and not self.blocked:
                new[field] = self._feed((index, field, -1), text) if text else ""
                carries = carries or text == ""
        carries = self._tool_calls(index, delta.get("tool_calls"), new) or carries
        if choice.get("finish_reason") and not self.blocked:
            for key in [k for k in self._streams if k[0] == index]:
                put_text(new, key, self._streams.pop(key).flush())
        if not carries and not has_text(new):
            return None
        return {**choice, "delta": new}

    def _tool_calls(self, index: int, calls: Any, new: dict[str, Any]) -> bool:
        """Tool-call deltas into `new`; True when one carries an id, a name or text."""
        if not isinstance(calls, list):
            return False
        carries = False
        for call in calls:
            fn = dict(call.get("function") or {})
            args = fn.get("arguments")
            if isinstance(args, str) and args and not self.blocked:
                fn["arguments"] = self._feed((index, TOOL, call.get("index", 0)), args)
            entry = {**call, "function": fn} if "function" in call else dict(call)
            informative = any(k not in ("index", "function") for k in call) or "name" in fn
            if informative or fn.get("arguments"):
                new.setdefault("tool_calls", []).append(entry)
                carries = True
        return carries
