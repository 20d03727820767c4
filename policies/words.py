"""Sensitive-word lists and the matcher compiled from them (normalization + Aho-Corasick).

Word-file syntax, one entry a line (BOM, CRLF, blank lines and `#` comment lines are fine):
  `word`      listed. Entries are normalized like the text (case, width, traditional forms...).
  `*word*`    `*` at an end lifts the word-boundary rule at that end (`fuck*` also hits "fucking").
  `!phrase`   allowed: a listed word inside an occurrence of this phrase is not a hit
              (e.g. `!洗钱包` keeps 洗钱 from firing in 洗钱包, "wash the wallet").
  `\\#word`   a backslash makes the next character literal.
Matching rules: words in space-separated scripts hit only at word boundaries of the normalized
text ("ass" never inside "class"); words in Chinese/Japanese/Korean/Thai hit anywhere. Up to
`max_gap` separators may sit between two characters of a word, with limits that keep the gap from
joining words of normal text (see `_gap_ok`). Messages and exceptions never contain a word.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field

import ahocorasick_rs
import numpy as np

from policies.normalize import (
    ALNUM,
    CJK_BREAK,
    LATIN_BREAK,
    NOSPACE,
    Normalized,
    Tables,
    normalize,
    tables,
)

MAX_WORD_CHARS = 64  # longest entry, in normalized characters (it bounds the stream hold-back)
_SPELLED_MIN = 3  # characters a CJK word needs before breaks between all of them count as gaps


class WordListError(ValueError):
    """A word file that cannot be used; the message names the file and line, never the entry."""


@dataclass(frozen=True)
class Entry:
    text: str
    source: str  # "file:line"
    allow: bool = False
    open_start: bool = False
    open_end: bool = False


@dataclass(frozen=True)
class Match:
    start: int  # original offsets, end exclusive
    end: int
    word_id: int


@dataclass
class Pattern:
    key: str  # compact normalized form
    source: str
    allow: bool
    bound_start: bool
    bound_end: bool
    breaks: set[int] = field(default_factory=set)  # compact positions where a separator was listed


@dataclass(frozen=True)
class Scan:
    matches: list[Match]
    tail: int  # original index from which the text could still become part of a match


def parse_word_list(text: str, name: str = "<words>") -> list[Entry]:
    """Parse one word file's text (pure)."""
    entries = []
    for number, raw in enumerate(text.removeprefix("\ufeff").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{name}:{number}"
        allow = line.startswith("!")
        body = line[1:].strip() if allow else line
        open_start = body.startswith("*")
        open_end = body.endswith("*") and not body.endswith("\\*") and len(body) > 1
        body = body[1 if open_start else 0 : len(body) - 1 if open_end else len(body)]
        if body.startswith("\\"):
            body = body[1:]
        body = body.replace("\\*", "*").strip()
        if not body:
            raise WordListError(f"{where}: empty entry")
        entries.append(Entry(body, where, allow, open_start, open_end))
    return entries


def _pattern(entry: Entry, tab: Tables) -> Pattern:
    n = normalize(entry.text, tab)
    key = n.compact
    if not key:
        raise WordListError(f"{entry.source}: the entry has no letters or digits once normalized")
    if len(key) > MAX_WORD_CHARS:
        raise WordListError(f"{entry.source}: the entry is longer than {MAX_WORD_CHARS} characters")
    breaks = {j for j in range(1, len(key)) if int(n.cidx[j]) - int(n.cidx[j - 1]) > 1}
    first, last = int(tab.cls[ord(key[0])]), int(tab.cls[ord(key[-1])])
    return Pattern(
        key,
        entry.source,
        entry.allow,
        bound_start=not entry.open_start and not first & NOSPACE,
        bound_end=not entry.open_end and not last & NOSPACE,
        breaks=breaks,
    )


def compile_patterns(entries: Sequence[Entry], tab: Tables) -> list[Pattern]:
    """Normalize entries and merge duplicates (same normalized form)."""
    by_key: dict[str, Pattern] = {}
    for entry in entries:
        p = _pattern(entry, tab)
        seen = by_key.get(p.key)
        if seen is None:
            by_key[p.key] = p
        elif seen.allow != p.allow:
            raise WordListError(f"{p.source}: the entry is both listed and allowed (see {seen.source})")
        else:
            seen.bound_start &= p.bound_start
            seen.bound_end &= p.bound_end
            seen.breaks |= p.breaks
    return list(by_key.values())


class Matcher:
    """An immutable matcher compiled once per load; safe to share between requests and threads."""

    def __init__(self, patterns: Sequence[Pattern], max_gap: int = 2, tab: Tables | None = None) -> None:
        if max_gap < 0:
            raise ValueError("max_gap must be >= 0")
        self._tab = tab or tables()
        self._patterns = list(patterns)
        self.max_gap = max_gap
        self.words = sum(not p.allow for p in self._patterns)
        self.longest = max((len(p.key) for p in self._patterns), default=0)
        # a listed separator (phrase entries) always tolerates at least one separator
        has_breaks = any(p.breaks for p in self._patterns)
        self.gap_limit = max(max_gap, 1) if has_breaks else max_gap
        keys = [p.key for p in self._patterns]
        # the contiguous NFA measured fastest on a 1 MB prompt (11 ms vs 14 ms default, 14 ms DFA)
        contiguous = ahocorasick_rs.Implementation.ContiguousNFA
        self._ac = (
            ahocorasick_rs.AhoCorasick(keys, store_patterns=False, implementation=contiguous)
            if keys
            else None
        )
        self._bound_start_of = np.array([p.bound_start for p in self._patterns], dtype=bool)
        self._bound_end_of = np.array([p.bound_end for p in self._patterns], dtype=bool)
        self._free_start = sorted(p.key for p in self._patterns if not p.bound_start)
        self._bound_start = sorted(p.key for p in self._patterns if p.bound_start)
        self._free_first = frozenset(k[0] for k in self._free_start)
        self._bound_first = frozenset(k[0] for k in self._bound_start)

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        *,
        max_gap: int = 2,
        pinyin: bool = False,
        names: Sequence[str] | None = None,
    ) -> Matcher:
        """Compile the word files' texts (`names` only label errors). See policies/pinyin.py."""
        tab = tables()
        labels = list(names) if names is not None else [f"list{i}" for i in range(len(texts))]
        entries = [e for text, name in zip(texts, labels, strict=True) for e in parse_word_list(text, name)]
        if pinyin:
            from policies.pinyin import pinyin_entries

            entries += pinyin_entries(entries)
        return cls(compile_patterns(entries, tab), max_gap, tab)

    @property
    def hold_bound(self) -> int:
        """Most normalized characters a stream scanner holds back: longest * (gap_limit + 1)."""
        return self.longest * (self.gap_limit + 1)

    def source(self, word_id: int) -> str:
        """Where a word was listed ("file:line"): loggable, unlike the word itself."""
        return self._patterns[word_id].source

    def find(self, text: str) -> list[Match]:
        """Every hit in `text`, in original offsets, sorted by start."""
        return self.scan(text, final=True).matches

    def mask(self, text: str) -> str:
        return mask_spans(text, self.find(text))

    def scan(self, text: str, *, final: bool, at_start: bool = True, emitted: int = 0) -> Scan:
        """Hits plus, unless `final`, where the undecided tail of a streamed text begins.
        `at_start`: nothing precedes `text` (else its first character is not a word start);
        `emitted`: how much of `text` a stream has already sent (left context only)."""
        if self._ac is None or not text:
            return Scan([], len(text))
        n = normalize(text, self._tab)
        found = self._ac.find_matches_as_indexes(n.compact, overlapping=True) if n.compact else []
        words: list[tuple[int, int, int]] = []
        allowed: list[tuple[int, int]] = []
        for first, end, pid in self._spans(n, found):
            if self._patterns[pid].allow:
                allowed.append((first, end))
            else:
                words.append((first, end, pid))
        matches = [self._to_match(n, w) for w in _not_allowed(words, allowed)]
        tail = n.size if final else self._tail(n, at_start, emitted)
        return Scan(matches, tail)

    @staticmethod
    def _to_match(n: Normalized, w: tuple[int, int, int]) -> Match:
        return Match(int(n.orig[w[0]]), int(n.orig[w[1] - 1]) + 1, w[2])

    def _spans(self, n: Normalized, found: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """(start, end, pid) in `n.norm` of the raw hits that the boundary and gap rules accept.
        Boundaries are checked vectorized: a benign 1 MB text can have thousands of raw hits."""
        if not found:
            return []
        pid, cs, ce = np.array(found, dtype=np.intp).reshape(-1, 3).T
        cidx, norm = np.asarray(n.cidx, dtype=np.intp), np.asarray(n.norm, dtype=np.uint32)
        first, last = cidx[cs], cidx[ce - 1]
        word = self._tab.word
        before = np.zeros(len(pid), dtype=bool)
        has = first > 0
        before[has] = word[norm[first[has] - 1]]
        after = np.zeros(len(pid), dtype=bool)
        has = last + 1 < len(norm)
        after[has] = word[norm[last[has] + 1]]
        ok = ~((self._bound_start_of[pid] & before) | (self._bound_end_of[pid] & after))
        gapped = (last - first) != (ce - cs - 1)
        out = []
        for i in np.flatnonzero(ok).tolist():
            if gapped[i] and not self._gaps_ok(n, self._patterns[pid[i]], cidx[cs[i] : ce[i]].tolist()):
                continue
            out.append((int(first[i]), int(last[i]) + 1, int(pid[i])))
        return out

    def _gaps_ok(self, n: Normalized, p: Pattern, pos: list[int]) -> bool:
        gapped = [j for j in range(1, len(pos)) if pos[j] - pos[j - 1] > 1]
        spelled = len(pos) >= _SPELLED_MIN and len(gapped) == len(pos) - 1
        return all(self._gap_ok(n, pos[j - 1], pos[j], j in p.breaks, spelled) for j in gapped)

    def _is_word(self, n: Normalized, i: int) -> bool:
        """A letter or digit of a space-separated script (which a word boundary may not touch)."""
        return bool(self._tab.word[n.norm[i]])

    def _gap_ok(self, n: Normalized, a: int, b: int, listed: bool, spelled: bool) -> bool:
        """Separators between norm[a] and norm[b] (two characters of one word).
        A listed separator (phrase entry) allows any. Otherwise at most `max_gap`, and:
        symbols and emoji always pass ("f*ck", "洗💰钱"); between CJK characters sentence
        punctuation and line breaks pass only when the word is spelled out, every one of its (3+)
        characters set apart ("习.近-平", "习\n近\n平"): a lone break is a clause boundary ("办法。
        轮到你" does not spell 法轮); white space and word punctuation pass between Latin letters
        only when each side is a lone letter ("s e x", "f.u.c.k"), so "it's ex-wife" does not
        spell "sex"."""
        gap = b - a - 1
        if listed:
            return gap <= self.gap_limit
        if gap > self.max_gap:
            return False
        cls = self._tab.cls
        bits = np.bitwise_or.reduce(cls[n.norm[a + 1 : b]])
        if cls[n.norm[a]] & NOSPACE or cls[n.norm[b]] & NOSPACE:
            return spelled or not bits & CJK_BREAK
        if not bits & (LATIN_BREAK | CJK_BREAK):
            return True
        before = a > 0 and bool(cls[n.norm[a - 1]] & ALNUM)
        after = b + 1 < len(n.norm) and bool(cls[n.norm[b + 1]] & ALNUM)
        return not before and not after

    def _tail(self, n: Normalized, at_start: bool, emitted: int) -> int:
        """Start (original offset) of the longest compact suffix that some entry could still
        continue, with feasible gaps: the only text a stream must hold back. A suffix that is a
        whole entry already followed by a separator is decided and is not held. Suffixes that
        start before `emitted` (text already sent) are not considered: they were not viable."""
        size = len(n.compact)
        trailing = len(n.norm) - 1 - int(n.cidx[-1]) if size else 0
        if not size or trailing > self.gap_limit:
            return n.size
        pos, orig = n.cidx, n.orig
        lo = size - 1
        while lo > max(0, size - self.longest) and int(orig[pos[lo - 1]]) >= emitted:
            if int(pos[lo]) - int(pos[lo - 1]) - 1 > self.gap_limit:
                break
            lo -= 1
        closed = trailing > 0
        for j in range(lo, size):
            q = n.compact[j:]
            if q[0] in self._free_first and _continues(self._free_start, q, closed):
                return int(orig[pos[j]])
            if q[0] in self._bound_first and _continues(self._bound_start, q, closed):
                word_start = at_start if pos[j] == 0 else not self._is_word(n, int(pos[j]) - 1)
                if word_start:
                    return int(orig[pos[j]])
        return n.size


def _continues(keys: list[str], q: str, closed: bool) -> bool:
    """Is `q` a prefix of a key (a proper prefix when `closed`: a separator already follows)?"""
    i = bisect.bisect_left(keys, q)
    if closed and i < len(keys) and keys[i] == q:
        i += 1
    return i < len(keys) and keys[i].startswith(q)


def _not_allowed(
    words: list[tuple[int, int, int]], allowed: list[tuple[int, int]]
) -> list[tuple[int, int, int]]:
    """Drop word hits that lie inside an allowed phrase's hit; sort by start."""
    words.sort()
    if not allowed:
        return words
    allowed.sort()
    starts = [a[0] for a in allowed]
    reach: list[int] = []
    for a in allowed:
        reach.append(max(a[1], reach[-1]) if reach else a[1])
    out = []
    for w in words:
        i = bisect.bisect_right(starts, w[0])
        if not (i and reach[i - 1] >= w[1]):
            out.append(w)
    return out


def mask_spans(text: str, matches: Sequence[Match], char: str = "*") -> str:
    """Replace every character of every match span with `char`."""
    if not matches:
        return text
    out, at = [], 0
    for m in sorted(matches, key=lambda m: m.start):
        if m.end <= at:
            continue
        start = max(m.start, at)
        out.append(text[at:start])
        out.append(char * (m.end - start))
        at = m.end
    out.append(text[at:])
    return "".join(out)
