"""Text inside a JSON document as the word policies read it: every string (keys included) decoded,
with the raw form of each character kept, so that a masked character replaces exactly its raw
form (`\\u0073` becomes `*`) and everything else stays byte for byte as it was. Structure never
carries text and is passed on as is; a hit can therefore never span two strings or touch a quote.

`JsonLexer` is incremental (a tool call's arguments arrive in pieces of any size): `feed` returns
at once what it can classify, holding back only an unfinished escape. Input that stops being JSON
(a bare word outside a string) is handed on from there as plain text, so nothing goes unscanned.
Pure; no I/O.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

RAW, TEXT, END = 0, 1, 2  # Piece kinds: structure to pass on, string text, end of a string
_PLAIN = re.compile(r'[^"\\]+')
_STRUCTURE = re.compile(r"[\s{}\[\],:]+")
_BARE = re.compile(r"[A-Za-z0-9+\-.]+")
_NUMBER = re.compile(r"-?(?:[0-9][0-9.eE+\-]*)?")
_LITERALS = ("true", "false", "null")
_SIMPLE = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_UNKNOWN = "\ufffd"  # what a lone surrogate or a broken \u escape reads as


class Piece(NamedTuple):
    kind: int  # RAW, TEXT or END
    text: str  # RAW: raw text; TEXT: decoded characters; END: ""
    raw: str | None = None  # TEXT from one escape: its raw form (the text is one character)


class JsonLexer:
    """Splits a streamed JSON text into structure (RAW), decoded string text (TEXT) and string
    ends (END). After input that is not JSON, everything that follows is TEXT with no END."""

    __slots__ = ("_escape", "_high", "_in_string", "_token", "text_mode")

    def __init__(self) -> None:
        self._in_string = False
        self._escape = ""  # raw characters of an escape not yet complete
        self._high: Piece | None = None  # a high surrogate escape waiting for its low half
        self._token = ""  # the bare token (number or literal) being read outside strings
        self.text_mode = False

    @property
    def pending(self) -> int:
        """Raw characters received but not yet classified (an unfinished escape)."""
        return len(self._escape) + (len(self._high.raw or "") if self._high else 0)

    def feed(self, raw: str) -> list[Piece]:
        out: list[Piece] = []
        i, n = 0, len(raw)
        while i < n:
            if self.text_mode:
                out.append(Piece(TEXT, raw[i:]))
                break
            i = self._in(raw, i, out) if self._in_string else self._out(raw, i, out)
        return out

    def flush(self) -> list[Piece]:
        """End of the text: an unfinished escape is passed on as text, an open string ended."""
        out: list[Piece] = []
        self._release_high(out)
        if self._escape:
            out.append(Piece(TEXT, self._escape))
            self._escape = ""
        if self._in_string:
            out.append(Piece(END, ""))
            self._in_string = False
        return out

    def _out(self, raw: str, i: int, out: list[Piece]) -> int:
        if m := _STRUCTURE.match(raw, i):
            self._token = ""
            out.append(Piece(RAW, m.group()))
            return m.end()
        if raw[i] == '"':
            self._token, self._in_string = "", True
            out.append(Piece(RAW, '"'))
            return i + 1
        m = _BARE.match(raw, i)
        if m is not None:
            self._token += m.group()
            if _NUMBER.fullmatch(self._token) or any(w.startswith(self._token) for w in _LITERALS):
                out.append(Piece(RAW, m.group()))
                return m.end()
        self.text_mode = True  # not JSON from here on: scanned as plain text
        out.append(Piece(TEXT, raw[i:]))
        return len(raw)

    def _in(self, raw: str, i: int, out: list[Piece]) -> int:
        if self._escape:
            return self._continue_escape(raw, i, out)
        if m := _PLAIN.match(raw, i):
            self._release_high(out)
            out.append(Piece(TEXT, m.group()))
            return m.end()
        if raw[i] == '"':
            self._release_high(out)
            self._in_string = False
            out += (Piece(END, ""), Piece(RAW, '"'))
            return i + 1
        self._escape = "\\"
        return i + 1

    def _continue_escape(self, raw: str, i: int, out: list[Piece]) -> int:
        esc = self._escape
        if len(esc) == 1:
            esc += raw[i]
            i += 1
        if esc[1] == "u":
            take = min(6 - len(esc), len(raw) - i)
            esc, i = esc + raw[i : i + take], i + take
            if len(esc) < 6:
                self._escape = esc
                return i
        self._escape = ""
        self._decoded(esc, out)
        return i

    def _decoded(self, esc: str, out: list[Piece]) -> None:
        if esc[1] != "u":
            self._release_high(out)
            out.append(Piece(TEXT, _SIMPLE.get(esc[1], esc[1]), esc))
            return
        try:
            code = int(esc[2:], 16)
        except ValueError:
            code = -1
        if 0xDC00 <= code < 0xE000 and self._high is not None:  # the low half of a pair
            high = int((self._high.raw or "")[2:], 16)
            char = chr(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00))
            out.append(Piece(TEXT, char, (self._high.raw or "") + esc))
            self._high = None
            return
        self._release_high(out)
        if 0xD800 <= code < 0xDC00:
            self._high = Piece(TEXT, _UNKNOWN, esc)
            return
        out.append(Piece(TEXT, chr(code) if 0 <= code < 0xD800 or code >= 0xE000 else _UNKNOWN, esc))

    def _release_high(self, out: list[Piece]) -> None:
        if self._high is not None:
            out.append(self._high)
            self._high = None


Form = tuple[str, str | None]  # (decoded text, raw form when it differs: one escaped character)


def remap(forms: deque[Form], text: str) -> str:
    """The raw form of `text`, the next `len(text)` decoded characters of `forms` after a
    length-preserving mask: unchanged characters keep their raw form, masked ones are `text`'s."""
    out: list[str] = []
    at, end = 0, len(text)
    while at < end:
        decoded, raw = forms[0]
        take = min(len(decoded), end - at)
        got = text[at : at + take]
        if raw is None:
            out.append(got)
        else:
            out.append(raw if got == decoded else got)
        if take == len(decoded):
            forms.popleft()
        else:
            forms[0] = (decoded[take:], None)
        at += take
    return "".join(out)


@dataclass
class JsonString:
    """One string of a document: its decoded text, and the raw forms to write a masked copy."""

    forms: list[Form] = field(default_factory=list)
    masked: str | None = None

    @property
    def text(self) -> str:
        return "".join(f[0] for f in self.forms)

    def raw(self) -> str:
        if self.masked is None:
            return "".join(f[1] if f[1] is not None else f[0] for f in self.forms)
        return remap(deque(self.forms), self.masked)


def split_document(raw: str) -> list[str | JsonString] | None:
    """A whole JSON text as raw structure and strings; None when it is not JSON text."""
    lexer = JsonLexer()
    parts: list[str | JsonString] = []
    current: JsonString | None = None
    pieces = [*lexer.feed(raw), *lexer.flush()]
    if lexer.text_mode:
        return None
    for kind, text, form in pieces:
        if kind == RAW:
            parts.append(text)
        elif kind == TEXT:
            if current is None:
                current = JsonString()
                parts.append(current)
            current.forms.append((text, form))
        else:
            current = None
    return parts


def join_document(parts: list[str | JsonString]) -> str:
    return "".join(p if isinstance(p, str) else p.raw() for p in parts)
