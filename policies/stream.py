"""The streaming form of the word matcher: a scanner with a bounded hold-back, and a filter for
OpenAI `chat.completion.chunk` dicts built on it.

`StreamScanner.feed` returns at once every character that no continuation can turn into (or out
of) a hit; it holds back only the longest tail whose compact form is a prefix of a listed (or
allowed) entry and whose gaps are still within the limit. In normalized characters:

    held <= matcher.hold_bound = longest_entry * (gap_limit + 1)

(characters that normalize to nothing, such as zero-width ones, come on top: they carry no text).
The result is the same as masking the whole text at once, whatever the chunk boundaries, except
where more than `CONTEXT` characters that normalize to nothing precede a word (then the scanner
may mask where the one-shot matcher would not, never the reverse).

Tool-call arguments are JSON: `JsonScanner` scans each of their strings on its own, decoded
(`\\u0073` reads as "s"), and masks a character by replacing its raw form, so the arguments stay
valid JSON and are otherwise relayed byte for byte (the one-shot walk in bodies.py does the same).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

from policies.jsontext import END, RAW, Form, JsonLexer, Piece, remap
from policies.words import Match, Matcher, mask_spans

Action = Literal["block", "mask", "flag"]
# `reasoning` is vLLM's name for reasoning text, `reasoning_content` the older one (some versions
# send both, the same text): both are scanned, and switching between the two is not a new field
TEXT_FIELDS = ("content", "reasoning", "reasoning_content", "refusal")
_SAME_TEXT = {"reasoning_content": "reasoning"}
TOOL = "tool"
Key = tuple[int, str, int]  # (choice index, field, tool-call index or -1)


class StreamScanner:
    """One text stream. `blocked` turns True at the first hit when built with `block=True`."""

    CONTEXT = 8  # emitted characters kept as left context (word boundaries, lone-letter gaps)

    def __init__(self, matcher: Matcher, *, block: bool = False) -> None:
        self._matcher = matcher
        self._block = block
        self._ctx = ""
        self._buf = ""
        self._pending = 0  # leading characters of _buf that belong to a hit already decided
        self._started = False
        self.blocked = False
        self.hits = 0

    @property
    def held(self) -> int:
        """Characters received but not yet returned."""
        return len(self._buf)

    def feed(self, text: str) -> str:
        """Add streamed text; return the text that is safe to send now (masked)."""
        if self.blocked or not text:
            return ""
        self._buf += text
        return self._advance(final=False)

    def flush(self) -> str:
        """End of the stream: return everything still held, masked."""
        if self.blocked or not self._buf:
            return ""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        work, c = self._ctx + self._buf, len(self._ctx)
        scan = self._matcher.scan(work, final=final, at_start=not self._started, emitted=c)
        cut = max(scan.tail, c)
        decided = [m for m in scan.matches if m.start < cut and m.end > c]
        self.hits += sum(m.start >= c for m in decided)
        if decided and self._block:
            self.blocked = True
            safe = work[c : max(c, min(m.start for m in decided))]
            self._buf = ""
            return safe
        spans = [*decided, Match(c, c + self._pending, -1)] if self._pending else decided
        out = mask_spans(work, spans)[c:cut]
        self._pending = max([m.end - cut for m in decided if m.end > cut], default=0)
        self._ctx = work[max(0, cut - self.CONTEXT) : cut]
        self._buf = work[cut:]
        self._started = self._started or cut > c
        return out


class JsonScanner:
    """One streamed JSON text (a tool call's arguments). Each string is scanned by a fresh
    StreamScanner, so a hit never joins two strings; structure passes at once; a masked
    character replaces its raw form. Text that is not JSON is scanned as it comes."""

    def __init__(self, matcher: Matcher, *, block: bool = False) -> None:
        self._matcher = matcher
        self._block = block
        self._lexer = JsonLexer()
        self._string: StreamScanner | None = None  # the string being read
        self._forms: deque[Form] = deque()  # its held characters with their raw forms
        self._hits = 0  # in strings already closed
        self.blocked = False

    @property
    def held(self) -> int:
        return self._lexer.pending + (self._string.held if self._string else 0)

    @property
    def hits(self) -> int:
        return self._hits + (self._string.hits if self._string else 0)

    def feed(self, text: str) -> str:
        if self.blocked or not text:
            return ""
        return self._run(self._lexer.feed(text), final=False)

    def flush(self) -> str:
        """End of the text: everything held, masked."""
        if self.blocked:
            return ""
        return self._run(self._lexer.flush(), final=True)

    def release(self) -> str:
        """The stream moved to another field for now: the held string text, masked (an unfinished
        escape stays held; the JSON state is kept for the text's continuation)."""
        return "" if self.blocked else self._close()

    def _run(self, pieces: list[Piece], *, final: bool) -> str:
        out: list[str] = []
        text: list[str] = []  # string text since the last scan: one scan per feed, not per escape
        for kind, value, raw in pieces:
            if kind not in (RAW, END):
                self._forms.append((value, raw))
                text.append(value)
                continue
            if text and not self._scan(text, out):
                return "".join(out)
            out.append(value if kind == RAW else self._close())
            if self.blocked:
                return "".join(out)
        if text and not self._scan(text, out):
            return "".join(out)
        if final:
            out.append(self._close())  # the text ended inside a string, or was not JSON
        return "".join(out)

    def _scan(self, text: list[str], out: list[str]) -> bool:
        """Feed the string's new text; False once blocked."""
        if self._string is None:
            self._string = StreamScanner(self._matcher, block=self._block)
        out.append(remap(self._forms, self._string.feed("".join(text))))
        text.clear()
        self.blocked = self._string.blocked
        return not self.blocked

    def _close(self) -> str:
        scanner, self._string = self._string, None
        if scanner is None:
            return ""
        out = remap(self._forms, scanner.flush())
        self._hits += scanner.hits
        self.blocked = scanner.blocked
        self._forms.clear()
        return out


class ChunkFilter:
    """Filters the choices of OpenAI stream chunks: per choice and per field (content, reasoning
    / reasoning_content, refusal, each tool call's arguments as JSON). `feed` returns the chunks
    to send now. A choice whose text is all held is dropped from a chunk unless it carries something else
    (role, finish_reason, a tool call's id or name); a chunk left with no choice is not sent.
    Held text is flushed into the chunk that carries the choice's `finish_reason`, and a field's
    held text is flushed when the choice moves on to another field. Usage chunks (`choices: []`)
    pass untouched. With "mask" and "block", `logprobs` are dropped (they would repeat masked
    tokens). With "block", `blocked` turns True at the first hit: `feed` returned the safe
    prefix, and the caller ends the stream (`finish_chunks()`, then an error frame)."""

    def __init__(self, matcher: Matcher, action: Action) -> None:
        self._matcher = matcher
        self.action = action
        self._scanners: dict[Key, StreamScanner | JsonScanner] = {}
        self._active: dict[int, Key] = {}
        self._template: dict[str, Any] = {}
        self.blocked = False

    @property
    def hits(self) -> int:
        return sum(s.hits for s in self._scanners.values())

    @property
    def held(self) -> int:
        return sum(s.held for s in self._scanners.values())

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        choices = chunk.get("choices")
        if self.blocked:
            return []
        if not isinstance(choices, list) or not choices:
            return [chunk]
        self._template = {k: v for k, v in chunk.items() if k in ("id", "object", "created", "model")}
        if self.action == "flag":
            for choice in choices:
                self._choice(choice)
            return [chunk]
        kept = [c for c in (self._choice(choice) for choice in choices) if c is not None]
        return [{**chunk, "choices": kept}] if kept or chunk.get("usage") else []

    def finish_chunks(self) -> list[dict[str, Any]]:
        """After a block: one chunk ending every choice with finish_reason "content_filter"."""
        return blocked_end(self._template, {key[0] for key in self._scanners})

    def flush_chunks(self) -> list[dict[str, Any]]:
        """The upstream ended without a finish_reason: everything still held, masked."""
        if self.blocked:
            return []
        deltas: dict[int, dict[str, Any]] = {}
        for key in list(self._scanners):
            put_text(deltas.setdefault(key[0], {}), key, self._flush(key))
        choices = [choice_end(i, d, None) for i, d in deltas.items()]
        return [{**self._template, "choices": choices}] if any(deltas.values()) else []

    def _scanner(self, key: Key) -> StreamScanner | JsonScanner:
        scanner = self._scanners.get(key)
        if scanner is None:
            kind = JsonScanner if key[1] == TOOL else StreamScanner
            scanner = self._scanners[key] = kind(self._matcher, block=self.action == "block")
        return scanner

    def _feed(self, key: Key, text: str, delta: dict[str, Any]) -> str:
        active = self._active.get(key[0])
        if active is not None and active != key and _stream_of(active) != _stream_of(key):
            left = _stream_of(active)
            for other in [k for k in self._scanners if _stream_of(k) == left]:
                put_text(delta, other, self._flush(other, final=False))
        self._active[key[0]] = key
        scanner = self._scanner(key)
        out = scanner.feed(text)
        self.blocked = self.blocked or scanner.blocked
        return out

    def _flush(self, key: Key, *, final: bool = True) -> str:
        scanner = self._scanners[key]
        out = scanner.release() if not final and isinstance(scanner, JsonScanner) else scanner.flush()
        self.blocked = self.blocked or scanner.blocked
        return out

    def _choice(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        index = choice.get("index", 0)
        delta = choice.get("delta") or {}
        new = {k: v for k, v in delta.items() if k not in TEXT_FIELDS and k != "tool_calls"}
        carries = bool(choice.get("finish_reason")) or any(v is not None for v in new.values())
        for field in TEXT_FIELDS:
            text = delta.get(field)
            if text is not None and not self.blocked:
                out = self._feed((index, field, -1), text, new) if text else ""
                new[field] = (new.get(field) or "") + out
                carries = carries or bool(new[field]) or text == ""
        carries = self._tool_calls(index, delta.get("tool_calls"), new) or carries
        if choice.get("finish_reason") and not self.blocked:
            for key in [k for k in self._scanners if k[0] == index]:
                put_text(new, key, self._flush(key))
            self._active.pop(index, None)
        if not carries and not has_text(new):
            return None
        result: dict[str, Any] = {**choice, "delta": new}
        if self.action != "flag" and "logprobs" in result:
            result["logprobs"] = None
        return result

    def _tool_calls(self, index: int, calls: Any, new: dict[str, Any]) -> bool:
        """Filter tool-call deltas into `new`; True when one carries an id, a name or text."""
        if not isinstance(calls, list):
            return False
        carries = False
        for call in calls:
            fn = dict(call.get("function") or {})
            args = fn.get("arguments")
            if isinstance(args, str) and args and not self.blocked:
                fn["arguments"] = self._feed((index, TOOL, call.get("index", 0)), args, new)
            entry = {**call, "function": fn} if "function" in call else dict(call)
            informative = any(k not in ("index", "function") for k in call) or "name" in fn
            if informative or fn.get("arguments"):
                new.setdefault("tool_calls", []).append(entry)
                carries = True
        return carries


def _stream_of(key: Key) -> Key:
    """Keys of one text: the two names of reasoning text are one stream, not a change of field."""
    return (key[0], _SAME_TEXT.get(key[1], key[1]), key[2])


def put_text(delta: dict[str, Any], key: Key, text: str) -> None:
    """Append flushed text for `key` to a delta being built."""
    if not text:
        return
    _, field, tool = key
    if field != TOOL:
        delta[field] = (delta.get(field) or "") + text
        return
    calls = delta.setdefault("tool_calls", [])
    for call in calls:
        if call.get("index", 0) == tool:
            fn = call["function"] = dict(call.get("function") or {})  # never the upstream's dict
            fn["arguments"] = (fn.get("arguments") or "") + text
            return
    calls.append({"index": tool, "function": {"arguments": text}})


def blocked_end(template: dict[str, Any], indexes: set[int]) -> list[dict[str, Any]]:
    """The chunk that ends every choice (`indexes`, or choice 0) with finish_reason "content_filter"."""
    end = [choice_end(i, {}, "content_filter") for i in sorted(indexes or {0})]
    return [{**template, "object": "chat.completion.chunk", "choices": end}]


def choice_end(index: int, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def has_text(delta: dict[str, Any]) -> bool:
    return any(delta.get(f) for f in TEXT_FIELDS) or bool(delta.get("tool_calls"))
