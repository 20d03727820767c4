"""Text normalization for the word matcher, with a map back to the original offsets.

Every code point is mapped on its own (never in context), so the mapping of a text is the
concatenation of the mappings of its characters; that is what lets a stream be normalized chunk
by chunk with the same result. The per-character mapping is:
NFKD -> Latin homoglyphs -> case fold -> NFKD -> drop diacritics, format characters and variation
selectors -> NFC -> Latin homoglyphs -> traditional-to-simplified Chinese (OpenCC's character
table, one character to one character: phrase-level conversions are a documented limitation).
The tables are built once per process (about a second) and are read-only afterwards.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from opencc import OpenCC

# Character classes of a *normalized* code point (bit flags in Tables.cls).
ALNUM = 1  # a letter or digit: part of a word; everything else is a separator
NOSPACE = 2  # a letter of a script written without spaces (Han, kana, Hangul, Thai, ...)
LATIN_BREAK = 4  # whitespace / word punctuation: ends a word in space-separated text
CJK_BREAK = 8  # clause or sentence punctuation and line breaks: ends a phrase in any script

_UNICODE_SIZE = 0x110000
NON_UNIT = 0xFFFFFFFF  # in Tables.single: "maps to no code point, or to several"
_DIACRITICS = ((0x0300, 0x0370), (0x1AB0, 0x1B00), (0x1DC0, 0x1E00), (0x20D0, 0x2100), (0xFE20, 0xFE30))
_IGNORED = ((0xFE00, 0xFE10), (0xE0100, 0xE01F0), (0x115F, 0x1161), (0x3164, 0x3165), (0xFFA0, 0xFFA1))
_NOSPACE_RANGES = (
    (0x0E00, 0x0F00), (0x1000, 0x10A0), (0x1100, 0x1200), (0x1780, 0x1800), (0x2E80, 0x2FE0),
    (0x3005, 0x3008), (0x3040, 0x3190), (0x31A0, 0x3200), (0x3400, 0x4DC0), (0x4E00, 0xA000),
    (0xA960, 0xA980), (0xAC00, 0xD7B0), (0xF900, 0xFB00), (0x20000, 0x323B0),
)  # fmt: skip
_LATIN_BREAKS = ".,;:!?'\"()[]{}<>/\\-\u2010\u2011\u2012\u2013\u2014\u2015\u2026\u2018\u2019\u201c\u201d«»"
_CJK_BREAKS = ".,;:!?\u3002\u3001\u2026\n\r\x0b\x0c\x85\u2028\u2029"
# Letters of other scripts that are drawn like Latin letters (upper case ones before folding).
_HOMOGLYPHS: dict[str, str] = dict(
    (pair[0], pair[1])
    for pair in (
        "Аa Вb Еe Кk Мm Нh Оo Рp Сc Тt Хx Уy аa еe оo рp сc уy хx іi јj ѕs ԁd ԛq ԝw һh ӏl Іi Јj Ѕs "
        "Αa Βb Εe Ζz Ηh Ιi Κk Μm Νn Οo Ρp Τt Υy Χx αa βb εe ιi κk νv οo ρp τt υu χx ϲc ϳj "
        "ɑa ɡg ıi ȷj օo սu ᴀa ʙb ᴄc ᴅd ᴇe ɢg ʜh ɪi ᴊj ᴋk ʟl ᴍm ɴn ᴏo ᴘp ʀr ꜱs ᴛt ᴜu ᴠv ᴡw ʏy ᴢz "
        "øo đd łl ħh ŧt"
    ).split()
)
_LETTER_BLOCKS = (0x1F1E6, 0x1F130, 0x1F150, 0x1F170)  # regional indicators, squared/circled letters


@dataclass(frozen=True)
class Tables:
    """Lookup tables indexed by code point, built once (see `tables()`)."""

    length: npt.NDArray[np.int8]  # how many normalized code points a code point becomes (0: dropped)
    single: npt.NDArray[np.uint32]  # its image when length == 1, else NON_UNIT
    exp_at: npt.NDArray[np.int32]  # for length > 1: where its image starts in `flat`
    flat: npt.NDArray[np.uint32]
    cls: npt.NDArray[np.uint8]  # class bits of a normalized code point
    alnum: npt.NDArray[np.bool_]  # cls & ALNUM, as booleans (faster to gather)
    word: npt.NDArray[np.bool_]  # a letter/digit of a space-separated script: a word boundary can't touch it
    mapping: dict[str, str]  # the same mapping as a dict (only the code points that change)
    translate: dict[int, str]  # for str.translate: the code points that map to one code point
    non_unit: re.Pattern[str]  # code points that map to none or to several


# numpy arrays for long texts, plain lists for short ones (numpy's per-call overhead dominates there)
Ints = npt.NDArray[Any] | list[int]
SMALL = 256  # texts up to this length take the pure-Python path (stream chunks, short fields)


@dataclass(frozen=True)
class Normalized:
    """A text after normalization: `norm[i]` came from original index `orig[i]`;
    `compact` is `norm` without separators, and `cidx[j]` is the index in `norm` of `compact[j]`."""

    norm: Ints  # code points
    orig: Ints
    cidx: Ints
    compact: str
    size: int  # length of the original text


def _t2s() -> dict[str, str]:
    # OpenCC converts phrases longest-first; spaces keep every character its own "phrase".
    han = ((0x3400, 0x4DC0), (0x4E00, 0xA000), (0x20000, 0x2A6E0))
    cands = [chr(c) for lo, hi in han for c in range(lo, hi)]
    out = OpenCC("t2s").convert(" ".join(cands)).split(" ")
    return {a: b for a, b in zip(cands, out, strict=True) if a != b and len(b) == 1}


def _drop(cp: int) -> bool:
    return any(lo <= cp < hi for lo, hi in _DIACRITICS + _IGNORED) or unicodedata.category(chr(cp)) == "Cf"


def _map_char(ch: str, t2s: dict[str, str]) -> str:
    s = "".join(_HOMOGLYPHS.get(c, c) for c in unicodedata.normalize("NFKD", ch))
    s = unicodedata.normalize("NFKD", s.casefold())
    s = unicodedata.normalize("NFC", "".join(c for c in s if not _drop(ord(c))))
    return "".join(t2s.get(c, c) for c in (_HOMOGLYPHS.get(c, c) for c in s))


def _changes(cp: int, t2s: dict[str, str]) -> bool:
    ch = chr(cp)
    return (
        ch in t2s
        or ch in _HOMOGLYPHS
        or unicodedata.decomposition(ch) != ""
        or ch.casefold() != ch
        or _drop(cp)
    )


def _build_mapping() -> dict[str, str]:
    t2s = _t2s()
    mapping: dict[str, str] = {}
    for lo, hi in ((0, 0x323B0), (0xE0000, 0xE01F0)):
        for cp in range(lo, hi):
            if _changes(cp, t2s):
                img = _map_char(chr(cp), t2s)
                if img != chr(cp):
                    mapping[chr(cp)] = img
    for base in _LETTER_BLOCKS:
        for i in range(26):
            mapping[chr(base + i)] = chr(ord("a") + i)
    return mapping


def _classes() -> npt.NDArray[np.uint8]:
    every = "".join(map(chr, range(_UNICODE_SIZE)))
    cls = np.fromiter(map(str.isalnum, every), dtype=np.uint8, count=_UNICODE_SIZE)
    for lo, hi in _NOSPACE_RANGES:
        cls[lo:hi] |= np.where(cls[lo:hi] & ALNUM, NOSPACE, 0).astype(np.uint8)
    space = np.fromiter(map(str.isspace, every), dtype=bool, count=_UNICODE_SIZE)
    space[:0x20] = True  # control characters separate like white space
    cls[space] |= LATIN_BREAK
    for ch in _LATIN_BREAKS:
        cls[ord(ch)] |= LATIN_BREAK
    for ch in _CJK_BREAKS:
        cls[ord(ch)] |= CJK_BREAK
    return cls


@functools.cache
def tables() -> Tables:
    """The process-wide normalization tables (immutable once built)."""
    mapping = _build_mapping()
    length = np.ones(_UNICODE_SIZE, dtype=np.int8)  # small tables stay in cache
    single = np.arange(_UNICODE_SIZE, dtype=np.uint32)
    exp_at = np.zeros(_UNICODE_SIZE, dtype=np.int32)
    flat: list[int] = [0]
    for ch, img in mapping.items():
        cp = ord(ch)
        length[cp] = len(img)
        single[cp] = ord(img) if len(img) == 1 else NON_UNIT
        if len(img) > 1:
            exp_at[cp] = len(flat)
            flat.extend(map(ord, img))
    cls = _classes()
    flat_arr = np.array(flat, dtype=np.uint32)
    word = (cls & (ALNUM | NOSPACE)) == ALNUM
    unit = {ord(ch): img for ch, img in mapping.items() if len(img) == 1}
    non_unit = _char_class(sorted(ord(ch) for ch, img in mapping.items() if len(img) != 1))
    alnum = (cls & ALNUM).astype(bool)
    return Tables(length, single, exp_at, flat_arr, cls, alnum, word, mapping, unit, non_unit)


def _char_class(cps: list[int]) -> re.Pattern[str]:
    ranges: list[list[int]] = []
    for cp in cps:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    body = "".join(re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in ranges)
    return re.compile(f"[{body}]")


def _codepoints(text: str) -> npt.NDArray[np.uint32]:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def _decode(cps: npt.NDArray[np.uint32]) -> str:
    return cps.astype(np.uint32, copy=False).tobytes().decode("utf-32-le", "surrogatepass")


def normalize(text: str, tab: Tables | None = None) -> Normalized:
    """Normalize `text`: per character in Python when short, vectorized when long
    (a 1 MB text takes milliseconds); both give the same result."""
    t = tab or tables()
    return _normalize_small(text, t) if len(text) <= SMALL else _normalize_large(text, t)


def _normalize_small(text: str, t: Tables) -> Normalized:
    if t.non_unit.search(text) is None:  # the common case: one code point to one
        s = text.translate(t.translate)
        cidx = [j for j, ch in enumerate(s) if ch.isalnum()]
        return Normalized([*map(ord, s)], [*range(len(s))], cidx, "".join([s[j] for j in cidx]), len(s))
    norm: list[int] = []
    orig: list[int] = []
    get = t.mapping.get
    for i, ch in enumerate(text):
        img = get(ch)
        if img is None:
            norm.append(ord(ch))
            orig.append(i)
        else:
            norm.extend(map(ord, img))
            orig.extend([i] * len(img))
    cidx = [j for j, cp in enumerate(norm) if chr(cp).isalnum()]  # the same test as Tables.alnum
    return Normalized(norm, orig, cidx, "".join([chr(norm[j]) for j in cidx]), len(text))


def _normalize_large(text: str, t: Tables) -> Normalized:
    cps = _codepoints(text)
    norm = t.single[cps]
    if bool((norm == NON_UNIT).any()):  # rare: a code point maps to none or to several
        lengths = t.length[cps].astype(np.intp)
        orig = np.repeat(np.arange(len(cps), dtype=np.intp), lengths)
        src = cps[orig]
        norm = t.single[src]
        multi = np.flatnonzero(lengths[orig] > 1)  # positions inside multi-character images
        if len(multi):
            first = np.cumsum(lengths) - lengths
            offset = multi - first[orig[multi]]
            norm[multi] = t.flat[t.exp_at[src[multi]] + offset]
    else:
        orig = np.arange(len(cps), dtype=np.intp)
    cidx = np.flatnonzero(t.alnum[norm])
    return Normalized(norm, orig, cidx, _decode(norm[cidx]), len(cps))


def as_list(ints: Ints) -> list[int]:
    return ints.tolist() if isinstance(ints, np.ndarray) else ints


def normalize_text(text: str, tab: Tables | None = None) -> str:
    """The normalized text (separators kept); for tests and diagnostics."""
    return "".join(map(chr, as_list(normalize(text, tab).norm)))
