"""What a question asks for (a story or an explanation, a duration or a price), for proxy.cache.verify.

Two turns about the same topic can ask for different things: "write a 40-word story about X" and
"explain X in 40 words", "how long does shipping take" and "how much does shipping cost".
"""

from __future__ import annotations

import functools
import re
import unicodedata

from proxy.cache import lexicon as lx

_HAN_RE = re.compile(r"[\u4e00-\u9fff]")
_WORD_RE = re.compile(r"[a-z]+")
_EN_WORDS = {word: name for name, words in lx.ASK_EN_WORDS.items() for word in words.split()}


# Chinese: one pattern per class, each searched on its own (a search skips ahead to a pattern's first
# character: 5 us a turn, against 12 us for one alternation of every class). English phrases start with
# a word boundary, which defeats that skip: one alternation, one scan.
_ASK_ZH = tuple((name, re.compile(pattern)) for name, pattern in lx.ASK_ZH.items())
_YESNO_EN, _YESNO_ZH = re.compile(lx.ASK_EN_YESNO), re.compile(lx.ASK_ZH_YESNO)
_EN_GROUPS = {name.replace("-", "_"): name for name in lx.ASK_EN_PHRASES}
_ASK_EN = re.compile(
    r"\b(?:" + "|".join(f"(?P<{group}>{lx.ASK_EN_PHRASES[name]})" for group, name in _EN_GROUPS.items()) + ")"
)


@functools.lru_cache(maxsize=4096)
def asks(text: str) -> frozenset[str]:
    """The classes of what `text` asks for (empty: it names none). Remembered like features()."""
    text = unicodedata.normalize("NFKC", text)
    if len(_HAN_RE.findall(text)) >= 2:
        found = {name for name, pattern in _ASK_ZH if pattern.search(text)}
        if _YESNO_ZH.match(text.strip()):
            found.add("yes-no")
        return frozenset(found)
    lower = text.lower()
    words = _WORD_RE.findall(lower)
    found = {_EN_WORDS[w] for w in words if w in _EN_WORDS}
    found.update(_EN_GROUPS[m.lastgroup or ""] for m in _ASK_EN.finditer(lower))
    if words and words[0] in lx.ASK_EN_FIRST:
        found.add(lx.ASK_EN_FIRST[words[0]])
    if _YESNO_EN.match(lower):
        found.add("yes-no")
    return frozenset(found)


def asks_differ(a: str, b: str) -> bool:
    """True when both turns name what they ask for and share none of it, on either dimension: the kind
    of answer ("how to", a duration, a story) and the action ("do:apply" / "do:check"). Lenient where one
    side names nothing ("What is a black hole?" / "Explain black holes"): a rule can only refuse a hit."""
    x, y = asks(a), asks(b)
    if not x or not y:
        return False
    for action in (False, True):
        xs = {c for c in x if c.startswith("do:") == action}
        ys = {c for c in y if c.startswith("do:") == action}
        if xs and ys and not xs & ys:
            return True
    return False
