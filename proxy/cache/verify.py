"""Verification of semantic-cache candidates: do two questions that embed alike really ask the same thing?

Embedding similarity alone confuses "what is 2+3" with "what is 2+4", a question with its negation, today
with tomorrow, and "Boston to Chicago" with "Chicago to Boston" (e5 scores all of these above 0.97).
Before a candidate found by vector search is served, the stored user turn and the query must agree on:

- language (Chinese or not): an answer is reused only in the language it was asked in;
- numbers, in order (digits, Chinese numerals, English number words and ordinals, arithmetic signs);
- what each number counts: the two content words / characters after it must share a word or word
  form when both sides name something (30 tips / 30 quiz questions, 207个 / 207句 differ);
- dates and times (weekdays, months, today/tomorrow, next/last week, morning/night, 今天/下周/去年, ...);
- the number of negations (not/no/never/without/n't; 不/没/别/非/无/未/禁止, minus "是不是"-style
  questions and words such as 不同/特别/非常 that contain the character but do not negate);
- "product-like" Latin tokens, in order (capitalized or all-caps words, letters mixed with digits, and
  every Latin word inside Chinese text: iPhone 15, GPT-4, XPS 13, Python);
- direction words on a shared axis (buy/sell, upload/download, 上涨/下跌, 最高/最低);
- terms linked by a directional word must not trade places (杭州到南京 / 南京到杭州, from X to Y);
- what is asked, where both turns name it (proxy.cache.ask): a story is not an explanation, an agenda
  not a quiz, a duration not a price;
- the content words must not differ by one substituted stretch (ethanol/methanol, 微信/支付宝,
  低血糖/糖尿病) or by several stretches each replaced by something unrelated (给程序员...数据库索引 /
  给高中生...机器学习入门), in the whole turn or in one clause of turns whose clauses line up, and must
  share something at all (proxy.cache.substitution).

Only then does the similarity threshold decide. Every rule can only turn a hit into a miss, never the
reverse, so a rule that is too strict costs recall (a backend call), not correctness. Pure functions;
the word lists live in proxy.cache.lexicon.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.cache import lexicon as lx
from proxy.cache.ask import asks_differ
from proxy.cache.substitution import is_han, share_a_word, substitution

_M0, _M1 = "\ue000", "\ue001"  # private-use brackets around marker tokens produced by the rewrites


def _mark(tag: str) -> str:
    return f" {_M0}{tag}{_M1} "


UNIT_WORDS = 2  # what a number counts: the next two content words (English) or characters (Chinese)
_UNIT_BREAK = re.compile(r"[,.;:?!()，。；：？！、（）]")
_ZH_NEG_RE = re.compile(lx.ZH_NEG_PATTERN)
_ZH_A_NOT_A = re.compile(lx.ZH_A_NOT_A_PATTERN)  # 是不是, 有没有, 可不可(以): questions, not negations
_POLAR_ZH_RE = re.compile("|".join(sorted(lx.POLAR_ZH, key=len, reverse=True)))


@dataclass(frozen=True)
class Features:
    chinese: bool  # written mostly in Chinese: an answer is only reused in the language it was asked in
    numbers: tuple[str, ...]
    dates: tuple[str, ...]
    negations: int
    hard: tuple[str, ...]
    polarity: tuple[tuple[str, int], ...]
    content: tuple[str, ...]  # content words (English) / characters (Chinese), framing words left out
    tokens: tuple[str, ...]  # every word / character, for the swap rule
    units: tuple[tuple[str, ...], ...]  # per number: what it counts (the words / characters after it)


def _cn_number(run: str) -> str:
    total, section, digit = 0, 0, 0
    for ch in run:
        if ch in lx.CN_DIGITS:
            digit = lx.CN_DIGITS[ch]
        elif ch in ("万", "亿"):
            total += (section + digit) * lx.CN_UNITS[ch]
            section, digit = 0, 0
        else:
            section += (digit or 1) * lx.CN_UNITS[ch]
            digit = 0
    return _num(str(total + section + digit))


def _num(s: str) -> str:
    s = s.replace(",", "")
    return s.rstrip("0").rstrip(".") if "." in s else s.lstrip("0") or "0"


def _weekday_cn(m: re.Match[str]) -> str:
    rel = {"这": "w:0", "本": "w:0", "下": "w:+1", "上": "w:-1"}.get(m.group(1) or "")
    return (_mark(rel) if rel else "") + _mark(f"wd:{lx.WEEKDAY_CN[m.group(2)]}")


# Built once: the word lists as (word, marker) and the rewrites as compiled patterns. A marker names
# its word by number, so no later rewrite can match inside it (一 in 一些 is not a numeral).
_ZH_WORDS = (*lx.ZH_NEUTRAL, *lx.ZH_FRAMING)
_ZH_MARKED = [
    (w, _mark(f"{'k' if i < len(lx.ZH_NEUTRAL) else 's'}:{i}")) for i, w in enumerate(_ZH_WORDS)
]
_ZH_REWRITES: list[tuple[re.Pattern[str], Any]] = [
    (re.compile(pattern), _weekday_cn if tag == "WD" else _mark(tag)) for pattern, tag in lx.ZH_REWRITES
]
_CN_NUM_RE = re.compile(f"[{lx.CN_NUM}]+")
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3})")
_OP_RE = re.compile(r"(?<=\d)\s*([+*/×÷^=]|-(?=\s*\d))\s*(?=\d)")
_HAN_RE = re.compile(r"[\u4e00-\u9fff]")
_SENTENCE_END_RE = re.compile(r"[.?!。？！]")
_CONTRACTIONS = [(re.compile(pattern, re.IGNORECASE), repl) for pattern, repl in lx.EN_CONTRACTIONS]
_POLAR_PHRASES = [(re.compile(pattern), axis) for pattern, axis in lx.POLAR_EN_PHRASES]
_LATIN_RE = re.compile(r"[a-z]+")


def _rewrite_zh(text: str) -> str:
    if not _HAN_RE.search(text):
        return text  # every word and pattern below is Chinese
    text = _ZH_A_NOT_A.sub(r"\1", text).replace("十分钟", "10分钟")  # 十分 alone means "very"
    for word, marked in _ZH_MARKED:
        if word in text:
            text = text.replace(word, marked)
    for pattern, repl in _ZH_REWRITES:
        text = pattern.sub(repl, text)

    def numeral(m: re.Match[str]) -> str:
        run, after = m.group(0), text[m.end() : m.end() + 1]
        before = text[m.start() - 1 : m.start()] if m.start() else ""
        if run == "一" and after not in ("月", "日", "号") and before != "第":
            return " "  # "一" alone is an article ("一个问题"), not a number
        return _mark(f"n:{_cn_number(run)}")

    return _CN_NUM_RE.sub(numeral, text)


def _normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = _THOUSANDS_RE.sub("", text)
    text = _OP_RE.sub(lambda m: _mark("op:" + m.group(1)), text)
    return _rewrite_zh(text)


_TOKEN_RE = re.compile(
    f"{_M0}([^{_M1}]+){_M1}|(\\d+(?:\\.\\d+)*)(st|nd|rd|th)?|([A-Za-z]+(?:['’.\\-][A-Za-z0-9]+)*)|([\u4e00-\u9fff])"
)


def _is_hard_latin(word: str, sentence_start: bool, in_chinese: bool) -> bool:
    if in_chinese or any(c.isdigit() for c in word):
        return True
    if len(word) >= 2 and (word.isupper() or any(c.isupper() for c in word[1:])):
        return True
    if len(word) == 1:
        return word.isupper() and word not in ("I", "A")
    return word[0].isupper() and not sentence_start


def _english_word(word: str, prev: str, capitalized: bool, feats: dict[str, list[str]]) -> str | None:
    """Classify one lower-cased English word; returns the content token (None: framing word)."""
    if word in lx.EN_NEG:
        feats["neg"].append(word)
        return None
    if word in lx.EN_NUMBERS and not (word == "second" and prev in ("a", "one", "per")):
        feats["num"].append(_num(str(lx.EN_NUMBERS[word])))
        return None
    if word in lx.EN_WEEKDAYS:
        if prev in lx.EN_REL:
            feats["date"].append(f"w:{lx.EN_REL[prev]}")
        feats["date"].append(f"wd:{lx.EN_WEEKDAYS[word]}")
        return None
    if word in lx.EN_MONTHS and (word != "may" or capitalized):
        feats["date"].append(f"m:{lx.EN_MONTHS[word]}")
        return None
    if word in lx.EN_DAYS:
        feats["date"].extend(lx.EN_DAYS[word].split())
        return None
    if word in lx.EN_PERIODS and prev in lx.EN_REL:
        feats["date"].append(f"{lx.EN_PERIODS[word]}:{lx.EN_REL[prev]}")
        return None
    if word in lx.EN_TIMES:
        feats["date"].append(lx.EN_TIMES[word])
        return None
    if word in lx.EN_STOP or word in lx.EN_REL:
        return None
    return _stem(word)


def _stem(word: str) -> str:
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ses", "xes", "ches", "shes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


@functools.lru_cache(maxsize=4096)
def features(text: str) -> Features:
    """Extract the hard features of one user turn (or clause). Remembered: a query is checked
    against up to three candidates, and popular stored turns come back as candidates again."""
    text = unicodedata.normalize("NFKC", text)
    raw = _normalize(text)
    in_chinese = len(_HAN_RE.findall(text)) >= 2
    for pattern, repl in _CONTRACTIONS:
        raw = pattern.sub(repl, raw)
    feats: dict[str, list[str]] = {"num": [], "date": [], "neg": [], "hard": [], "content": [], "tokens": []}
    units: list[list[str]] = []
    prev, sentence_start, last_end = "", True, 0
    for m in _TOKEN_RE.finditer(raw):
        gap = raw[last_end : m.start()]
        if _SENTENCE_END_RE.search(gap):
            sentence_start = True
        last_end = m.end()
        numbers = len(feats["num"])
        unit = units[-1] if units and len(units[-1]) < UNIT_WORDS and not _UNIT_BREAK.search(gap) else None
        marker, digits, _ordinal, word, han = m.groups()
        if marker is not None:
            _marker(marker, feats)
        elif digits is not None:
            feats["num"].append(_num(digits))
            feats["tokens"].append(_num(digits))
        elif word is not None:
            token = _english_word(word.lower(), prev, word[0].isupper() and not sentence_start, feats)
            if _is_hard_latin(word, sentence_start, in_chinese) and (token or word.isupper()):
                feats["hard"].append(word.lower())
            if token is not None:
                feats["content"].append(token)
                if unit is not None:
                    unit.append(token)
            feats["tokens"].append(word.lower())
            prev = word.lower()
        elif han is not None:
            feats["tokens"].append(han)
            if han not in lx.ZH_STOP:
                feats["content"].append(han)
            if unit is not None:
                unit.append(han)
        units.extend([] for _ in range(len(feats["num"]) - numbers))
        sentence_start = False
    return Features(
        chinese=in_chinese,
        numbers=tuple(feats["num"]),
        dates=tuple(feats["date"]),
        negations=len(feats["neg"]) + _count_zh_negations(text),
        hard=tuple(feats["hard"]),
        polarity=_polarity(text),
        content=tuple(feats["content"]),
        tokens=tuple(feats["tokens"]),
        units=tuple(tuple(u) for u in units),
    )


def _marker(tag: str, feats: dict[str, list[str]]) -> None:
    kind, _, value = tag.partition(":")
    if kind in ("k", "s"):
        value = _ZH_WORDS[int(value)]
    if kind in ("n", "op"):
        feats["num"].append(value if kind == "n" else tag)
    elif kind == "k":  # a word that contains a numeral or negation character but is neither
        feats["content"].append(value)
    elif kind != "s":  # "s": a Chinese framing word (怎么, 什么, ...), in tokens only
        feats["date"].append(tag)
        value = tag
    feats["tokens"].append(value)


def _count_zh_negations(text: str) -> int:
    text = _ZH_A_NOT_A.sub(r"\1", text)
    for word in lx.ZH_NEUTRAL:
        text = text.replace(word, " ")
    return len(_ZH_NEG_RE.findall(text))


def _polarity(text: str) -> tuple[tuple[str, int], ...]:
    found = [lx.POLAR_ZH[m.group(0)] for m in _POLAR_ZH_RE.finditer(text)]
    lower = text.lower()
    found += [lx.POLAR_EN[w] for w in _LATIN_RE.findall(lower) if w in lx.POLAR_EN]
    found += [axis for pattern, axis in _POLAR_PHRASES if pattern.search(lower)]
    return tuple(sorted(found))


def _polarity_clash(a: tuple[tuple[str, int], ...], b: tuple[tuple[str, int], ...]) -> bool:
    for axis in {x for x, _ in a} & {x for x, _ in b}:
        if sorted(s for x, s in a if x == axis) != sorted(s for x, s in b if x == axis):
            return True
    return False


def _counts_differ(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when the same number counts different things: 30 tips / 30 quiz questions, 207个 / 207句.
    Lenient where a side names nothing (a number at the end) or the two share a word or a word form."""
    return bool(a and b) and not share_a_word(a, b)


def _disjoint(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when the two turns share no content at all (word forms count as shared)."""
    if not a or not b or set(a) & set(b):
        return False
    return not any(len(x) >= 5 and len(y) >= 5 and x[:5] == y[:5] for x in a for y in b)


def _units(tokens: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Span of each word, and of each pair of adjacent Chinese characters, that occurs once."""
    seen: dict[str, list[tuple[int, int]]] = {}
    for i, tok in enumerate(tokens):
        if is_han(tok):
            if i + 1 < len(tokens) and is_han(tokens[i + 1]) and not {tok, tokens[i + 1]} & lx.CONNECT_ZH:
                seen.setdefault(tok + tokens[i + 1], []).append((i, i + 2))
        elif tok not in lx.EN_STOP and tok not in lx.CONNECT_EN:
            seen.setdefault(tok, []).append((i, i + 1))
    return {unit: spans[0] for unit, spans in seen.items() if len(spans) == 1}


def _linked(tokens: tuple[str, ...], first: tuple[int, int], second: tuple[int, int]) -> bool:
    """Only a directional word (and framing words) between the two spans: "X 到 Y", "from X to Y"."""
    between = tokens[first[1] : second[0]]
    connectors = [t for t in between if t in lx.CONNECT_EN or t in lx.CONNECT_ZH]
    return bool(connectors) and all(t in connectors or t in lx.EN_STOP or t in lx.ZH_STOP for t in between)


def _inverted(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when two shared terms linked by a directional word swap places (A 到 B / B 到 A)."""
    ua, ub = _units(a), _units(b)
    shared = [u for u in ua if u in ub]
    for i, p in enumerate(shared):
        for q in shared[i + 1 :]:
            (pa, qa), (pb, qb) = (ua[p], ua[q]), (ub[p], ub[q])
            if (pa < qa) == (pb < qb):
                continue
            if _linked(a, *sorted((pa, qa))) and _linked(b, *sorted((pb, qb))):
                return True
    return False


def _swapped(a: list[str], b: list[str]) -> bool:
    """True when a = P X M Y S and b = P Y M X S: two spans trade places around the same middle."""
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[-1 - s] == b[-1 - s]:
        s += 1
    x, y = a[p : len(a) - s], b[p : len(b) - s]
    if len(x) != len(y) or len(x) < 3:
        return False
    n = len(x)
    for nx in range(1, n - 1):
        for ny in range(1, n - nx):
            if x[:nx] == y[n - nx :] and x[n - ny :] == y[:ny] and x[nx : n - ny] == y[ny : n - nx]:
                return x[:nx] != x[n - ny :]
    return False


_CLAUSE_RE = re.compile(r"[;:?!，。；：？！、]+|,(?!\d)|\.(?=\s|$)")


def _clause_substitution(a: str, b: str) -> bool:
    """The substitution rule clause by clause, for turns of two or more clauses that line up: "I'm a
    nurse. Can you outline a plan for X?" / "I'm an engineer. ... for Y?" changes two stretches in
    all, too many for the whole-turn rule, but the second clause alone is one substitution."""
    ca = [c for c in (part.strip() for part in _CLAUSE_RE.split(a)) if c]
    cb = [c for c in (part.strip() for part in _CLAUSE_RE.split(b)) if c]
    if len(ca) < 2 or len(ca) != len(cb):
        return False
    return any(substitution(features(x).content, features(y).content) for x, y in zip(ca, cb, strict=True))


def disagreement(query: str, candidate: str) -> str | None:
    """Why `candidate` must not answer `query` (None: they may be the same question)."""
    fq, fc = features(query), features(candidate)
    # evaluated in order, only until the first failure, which is the reason given
    checks: tuple[tuple[str, Callable[[], bool]], ...] = (
        ("language", lambda: fq.chinese != fc.chinese),
        ("number", lambda: fq.numbers != fc.numbers),
        ("unit", lambda: any(_counts_differ(x, y) for x, y in zip(fq.units, fc.units, strict=True))),
        ("date", lambda: fq.dates != fc.dates),
        ("negation", lambda: fq.negations != fc.negations),
        ("hard-token", lambda: fq.hard != fc.hard),
        ("polarity", lambda: _polarity_clash(fq.polarity, fc.polarity)),
        ("swap", lambda: _swapped(list(fq.tokens), list(fc.tokens)) or _inverted(fq.tokens, fc.tokens)),
        ("ask", lambda: asks_differ(query, candidate)),
        (
            "substitution",
            lambda: substitution(fq.content, fc.content) or _clause_substitution(query, candidate),
        ),
        ("disjoint", lambda: _disjoint(fq.content, fc.content)),
    )
    return next((name for name, failed in checks if failed()), None)
