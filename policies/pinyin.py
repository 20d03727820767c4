"""Optional pinyin variants of Chinese entries (`policies.pinyin: true`; off by default).

Each listed entry with Chinese characters also yields its toneless pinyin, syllables separated,
so 傻逼 also hits "shabi", "sha bi" and "SHA-BI" (Latin word-boundary rules apply). Only the most
common reading of a character is used (pypinyin's default), so a rarer reading is not caught;
homophones written with other characters are not caught either. Needs the `pypinyin` package:
enabling it without the package is a start-up error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from policies.words import Entry


def pinyin_entries(entries: Sequence[Entry]) -> list[Entry]:
    from pypinyin import Style, lazy_pinyin  # imported only when the feature is on

    out = []
    for entry in entries:
        if entry.allow or not any("\u3400" <= ch <= "\u9fff" for ch in entry.text):
            continue
        syllables = lazy_pinyin(entry.text, style=Style.NORMAL, errors="default")
        out.append(replace(entry, text=" ".join(syllables), source=f"{entry.source} (pinyin)"))
    return out
