"""Personal-data recognizers for Chinese and English text: PRC resident IDs, mainland mobile and
landline numbers, payment cards, email addresses, IPv4/IPv6 addresses, PRC passports, US SSNs and
US phone numbers, plus a deployment's own patterns. Pure; no I/O after construction.

Precise by construction: a value never starts or ends inside a longer run of letters or digits,
every candidate must pass its type's check (check digits, number plans, dates), and context words
decide where the shape alone is ambiguous (the types: policies/pii_types.py).

Cheap where there is nothing: text without a digit or `@` is not scanned at all. Otherwise the
types are compiled once (at start-up) into one alternation per lane (types whose values start
alike), and each is tried only where one of its values may start, found by one pass of a regular
expression that begins with a character class (the engine skips to such characters in C). One
alternation searched along the whole text cost ~5x more (about 0.5 us a character here): at
every position it tried every type.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from policies import pii_checks as checks
from policies.pii_types import BUILTIN, BUILTIN_NAMES, LEFT, RIGHT, CustomPattern, PiiType, custom_type

__all__ = ["BUILTIN_NAMES", "CustomPattern", "Found", "Recognizer"]


@dataclass(frozen=True, slots=True)
class Found:
    start: int
    end: int
    kind: str  # the type's name: "cn_mobile", "email", ... or a configured pattern's name
    value: str  # the text as written
    key: str  # the value normalized (digits only, lower-case address): equal values, one placeholder


_TRIGGER = re.compile(r"[\d@\uff20]")
# where a value of a lane may start; each begins with a character class, so the regex engine
# skips ahead to it without trying anything at the other positions
# (the shortest value of the digits lane, 1.1.1.1, has six more of its characters after the first)
_DIGIT_START = re.compile(r"[\d+(](?=[\d .\-()+]{6})(?<![\dA-Za-z_@][\d+(])(?<![\dA-Za-z][.\-][\d+(])")
_PASSPORT_START = re.compile(r"[EG](?=[A-Z]?\d)")
_IPV6_GATE = re.compile(r":[0-9A-Fa-f]{0,4}:")
_HEX = frozenset("0123456789abcdefABCDEF")
_LOCAL = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-")


def _email_starts(text: str) -> Iterator[int]:
    """For each @: where its local part begins (at most 64 characters back)."""
    at = text.find("@")
    while at >= 0:
        start = at
        while start > 0 and at - start < 64 and text[start - 1] in _LOCAL:
            start -= 1
        yield start
        at = text.find("@", at + 1)


def _ipv6_starts(text: str) -> Iterator[int]:
    """Before each `:hex:`: where its first hex group begins (at most 4 characters back)."""
    for m in _IPV6_GATE.finditer(text):
        start = m.start()
        while start > 0 and m.start() - start < 4 and text[start - 1] in _HEX:
            start -= 1
        yield start


# full-width digits and the signs around them, read as their ASCII forms (one character each, so
# offsets hold): 电话１３８１２３４５６７８ is a phone number too
_WIDE = re.compile(r"[\uff10-\uff19\uff20\uff0b\uff0d\uff08\uff09\uff0e]")
_NARROW = {c: c - 0xFEE0 for c in (*range(0xFF10, 0xFF1A), 0xFF20, 0xFF0B, 0xFF0D, 0xFF08, 0xFF09, 0xFF0E)}


class _Lane:
    """Types whose values start alike, tried together where a value may start: one alternation,
    `match`ed there (never scanned along the text: most text starts no value)."""

    def __init__(self, members: list[tuple[str, PiiType]]) -> None:
        self.groups = dict(members)
        self.rx = re.compile("|".join(f"(?P<{g}>{LEFT}(?:{t.pattern}){RIGHT})" for g, t in members))
        self.each = [(t, re.compile(f"{LEFT}(?:{t.pattern}){RIGHT}")) for _, t in members]


class Recognizer:
    """Finds the enabled types in a text. Each lane of types is matched only where one of its
    values may start (a digit, `+` or `(` not glued to a token; an `@`'s local part; a hex group
    before `:`; E or G before digits), a deployment's patterns everywhere; then every candidate's
    check. Overlaps go to the value that starts first (then the type listed first)."""

    def __init__(self, types: Sequence[str] = BUILTIN_NAMES, custom: Sequence[CustomPattern] = ()) -> None:
        by_name = {t.name: t for t in BUILTIN}
        builtin = [by_name[n] for n in by_name if n in types]
        self.types: list[PiiType] = [custom_type(c) for c in custom] + builtin
        self.labels = {t.name: t.label for t in self.types}
        self._order = {t.name: i for i, t in enumerate(self.types)}
        members: dict[str, list[tuple[str, PiiType]]] = {}
        for i, t in enumerate(self.types):
            members.setdefault(t.lane, []).append((f"t{i}", t))
        self._lanes = {lane: _Lane(m) for lane, m in members.items()}
        # custom patterns may match text without digits: then every text is scanned
        self._trigger = None if custom else _TRIGGER
        checks.cn_regions()  # load the county table now, not on the first ID seen

    def find(self, text: str) -> list[Found]:
        """Every value in `text`, left to right, none overlapping."""
        if self._trigger is not None and self._trigger.search(text) is None:
            return []
        scan = text if text.isascii() or _WIDE.search(text) is None else text.translate(_NARROW)
        lanes, found = self._lanes, []
        if (lane := lanes.get("custom")) is not None:
            found += self._search(lane, scan)
        if (lane := lanes.get("digits")) is not None:
            found += self._at(lane, scan, (m.start() for m in _DIGIT_START.finditer(scan)))
        if "@" in scan and (lane := lanes.get("email")) is not None:
            found += self._at(lane, scan, _email_starts(scan))
        if ":" in scan and (lane := lanes.get("ipv6")) is not None:
            found += self._at(lane, scan, _ipv6_starts(scan))
        if ("E" in scan or "G" in scan) and (lane := lanes.get("passport")) is not None:
            found += self._at(lane, scan, (m.start() for m in _PASSPORT_START.finditer(scan)))
        out = self._non_overlapping(found) if len(found) > 1 else found
        if scan is not text:
            out = [Found(f.start, f.end, f.kind, text[f.start : f.end], f.key) for f in out]
        return out

    def _at(self, lane: _Lane, text: str, starts: Iterable[int]) -> list[Found]:
        out: list[Found] = []
        end = 0
        for start in starts:
            if start < end or (m := lane.rx.match(text, start)) is None:
                continue
            kind = lane.groups[m.lastgroup or ""]
            found = self._accept(kind, text, start, m.end()) or self._fallback(lane, kind, text, start)
            if found is not None:
                out.append(found)
                end = found.end
        return out

    def _search(self, lane: _Lane, text: str) -> list[Found]:
        out: list[Found] = []
        pos = 0
        while (m := lane.rx.search(text, pos)) is not None:
            kind, start = lane.groups[m.lastgroup or ""], m.start()
            found = self._accept(kind, text, start, m.end()) or self._fallback(lane, kind, text, start)
            if found is None:
                pos = start + 1  # a value may still start inside the refused candidate
                continue
            out.append(found)
            pos = found.end
        return out

    def _non_overlapping(self, found: list[Found]) -> list[Found]:
        found.sort(key=lambda f: (f.start, self._order[f.kind], -f.end))
        out: list[Found] = []
        for f in found:
            if not out or f.start >= out[-1].end:
                out.append(f)
        return out

    def _fallback(self, lane: _Lane, refused: PiiType, text: str, start: int) -> Found | None:
        """The lane's types after `refused`, tried at the same place (an 18-digit card that is
        no ID)."""
        later = False
        for kind, rx in lane.each:
            if kind is refused:
                later = True
            elif later and (m := rx.match(text, start)) is not None:
                found = self._accept(kind, text, start, m.end())
                if found is not None:
                    return found
        return None

    @staticmethod
    def _accept(kind: PiiType, text: str, start: int, end: int) -> Found | None:
        key = kind.key(text, start, end)
        return None if key is None else Found(start, end, kind.name, text[start:end], key)
