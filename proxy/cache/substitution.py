"""Is one turn another with some of its content replaced by other content? For proxy.cache.verify.

Works on the content tokens that cache_verify extracts (English words, Chinese characters): ethanol /
methanol, 微信 / 支付宝, or several stretches each replaced by something unrelated.
"""

from __future__ import annotations

import difflib
from typing import Any


def substitution(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """True when b is a with content replaced by other content (not by a word form): one stretch, or
    several stretches each replaced by something unrelated."""
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    return _one_stretch(a, b, ops) or _unrelated_stretches(a, b, ops)


def _one_stretch(a: tuple[str, ...], b: tuple[str, ...], ops: list[Any]) -> bool:
    """One replaced stretch, or - for Chinese, compared character by character - a short one (at most 3
    characters a side) around one unchanged character (低血糖 / 糖尿病). Some content must stay unchanged.
    """
    changed = [op for op in ops if op[0] != "equal"]
    if len(changed) == 1 and changed[0][0] == "replace":
        _, i1, i2, j1, j2 = changed[0]
    elif len(changed) == 2 and {changed[0][0], changed[1][0]} in ({"delete", "insert"}, {"replace"}):
        (_, i1, _, j1, _), (_, _, i2, _, j2) = changed
        if i2 - i1 > 3 or j2 - j1 > 3 or changed[1][1] - changed[0][2] > 1:
            return False
        if not all(is_han(t) for t in (*a[i1:i2], *b[j1:j2])):
            return False
    else:
        return False
    if i2 - i1 == len(a):
        return False
    sx, sy = "".join(a[i1:i2]), "".join(b[j1:j2])
    return not (sx.startswith(sy) or sy.startswith(sx))  # boil / boiling is a word form, not another word


def _unrelated_stretches(a: tuple[str, ...], b: tuple[str, ...], ops: list[Any]) -> bool:
    """Every changed stretch replaced by unrelated content, around at least two unchanged tokens:
    给程序员讲清楚数据库索引 / 给高中生讲清楚机器学习入门 (audience and topic both changed). Next
    to one stretch that is unrelated by _unrelated, a two-character one that shares no character counts
    too (给大学生讲清楚旅行攻略 / 给护士讲清楚新能源汽车); alone it is too often a rewrite (洗掉 / 去除)."""
    stretches, unchanged = _stretches(a, b, ops)
    if not stretches or unchanged < 2:
        return False
    strict = [_unrelated(x, y) for x, y in stretches]
    pairs = zip(strict, stretches, strict=True)
    return any(strict) and all(s or _unrelated_pair(x, y) for s, (x, y) in pairs)


def _stretches(
    a: tuple[str, ...], b: tuple[str, ...], ops: list[Any]
) -> tuple[list[tuple[tuple[str, ...], tuple[str, ...]]], int]:
    """The changed stretches as (a's side, b's side), and how many tokens stay unchanged around them.
    One unchanged Chinese character between two changes is inside one stretch (家庭理财 / 时间管理
    share 理). One unchanged word between a deletion and an insertion is a topic rebuilt around it
    (supply chain basics / the basics of machine learning): one stretch, without that word."""
    out: list[tuple[list[str], list[str]]] = []
    bridge: tuple[str, ...] = ()
    unchanged, join = 0, False
    for k, (tag, i1, i2, j1, j2) in enumerate(ops):
        if tag != "equal":
            if join:
                out[-1][0].extend((*bridge, *a[i1:i2]))
                out[-1][1].extend((*bridge, *b[j1:j2]))
            else:
                out.append((list(a[i1:i2]), list(b[j1:j2])))
            join = False
            continue
        inner = bool(out) and k < len(ops) - 1 and i2 - i1 == 1
        if inner and is_han(a[i1]):
            join, bridge = True, a[i1:i2]  # a change follows: one stretch across this character
        elif inner and {ops[k - 1][0], ops[k + 1][0]} == {"delete", "insert"}:
            join, bridge, unchanged = True, (), unchanged + 1
        else:
            unchanged += i2 - i1
    return [(tuple(x), tuple(y)) for x, y in out], unchanged


def _unrelated_pair(x: tuple[str, ...], y: tuple[str, ...]) -> bool:
    """Two Chinese words of two or more characters sharing no character (大学生 / 护士)."""
    return min(len(x), len(y)) >= 2 and all(is_han(t) for t in (*x, *y)) and not set(x) & set(y)


def _unrelated(x: tuple[str, ...], y: tuple[str, ...]) -> bool:
    """Nothing in common: no word or word form; Chinese stretches of 3+ characters sharing at most
    one character when both have 4+ (shorter ones are too often rewrites: 截图 / 截屏).
    An insertion or a deletion adds or drops a detail and is not a replacement."""
    if not x or not y:
        return False
    if any(is_han(t) for t in (*x, *y)):
        shortest = min(len(x), len(y))
        return shortest >= 3 and len(set(x) & set(y)) <= (1 if shortest >= 4 else 0)
    return not share_a_word(x, y)


def _same_word(x: str, y: str) -> bool:
    """Word forms of one word: boil / boiling, translate / translation (a shared 5-letter stem)."""
    return x.startswith(y) or y.startswith(x) or (len(x) >= 5 and len(y) >= 5 and x[:5] == y[:5])


def share_a_word(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return any(_same_word(x, y) for x in a for y in b)


def is_han(token: str) -> bool:
    return len(token) == 1 and "\u4e00" <= token <= "\u9fff"
