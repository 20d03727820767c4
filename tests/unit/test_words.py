"""The word matcher: list parsing, normalization, evasions caught, benign text left alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from policies.normalize import SMALL, _normalize_large, _normalize_small, as_list, normalize_text, tables
from policies.words import MAX_WORD_CHARS, Matcher, WordListError, parse_word_list

ROOT = Path(__file__).resolve().parents[2]
WORDS = """# test list
fuck*
shit
bitch*
sex
cunt*
木马程序
傻逼
洗钱
!洗钱包
刷单返利
网络赌博
double your bitcoin
"""


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    return Matcher.from_texts([WORDS], max_gap=2)


@pytest.fixture(scope="module")
def shipped() -> Matcher:
    paths = [ROOT / "config/words/zh.txt", ROOT / "config/words/en.txt"]
    return Matcher.from_texts([p.read_text(encoding="utf-8") for p in paths], names=[p.name for p in paths])


EVASIONS = [
    ("full width", "ＦＵＣＫ you"),
    ("full width lower", "ｓｈｉｔ happens"),
    ("ideographic space", "你是傻　逼"),
    ("math bold", "𝐟𝐮𝐜𝐤"),
    ("math italic", "𝑓𝑢𝑐𝑘 this"),
    ("math script", "𝓯𝓾𝓬𝓴"),
    ("math double-struck", "𝕗𝕦𝕔𝕜"),
    ("math monospace", "𝚜𝚑𝚒𝚝"),
    ("math sans bold", "𝗯𝗶𝘁𝗰𝗵"),
    ("superscript letters", "ᶠᵘᶜᵏ"),
    ("circled letters", "ⓢⓗⓘⓣ"),
    ("parenthesized letters", "⒡⒰⒞⒦"),
    ("negative squared letters", "🅵🆄🅲🅺"),
    ("regional indicators", "🇸🇭🇮🇹"),
    ("kangxi radicals", "⽊⾺程序"),
    ("cjk compatibility ideograph", "刷单返\uf9dd"),
    ("zero-width space", "f\u200bu\u200bc\u200bk"),
    ("zero-width non-joiner", "傻\u200c逼"),
    ("zero-width joiner", "洗\u200d钱"),
    ("word joiner", "sh\u2060it"),
    ("byte order mark inside", "洗\ufeff钱"),
    ("soft hyphen", "bi\u00adtch"),
    ("many zero-width", "s" + "\u200b" * 20 + "hit"),
    ("variation selector", "傻\ufe0f逼"),
    ("combining marks", "f\u0301u\u0308ck"),
    ("precomposed accents", "fück"),
    ("spaced letters", "f u c k"),
    ("dotted letters", "s.h.i.t"),
    ("hyphenated letters", "b-i-t-c-h"),
    ("underscores", "f_u_c_k"),
    ("symbols inside", "f*u*c*k"),
    ("two symbols inside", "fu**ck"),
    ("emoji inside", "傻💩逼"),
    ("two emoji inside", "洗💰💰钱"),
    ("space between hanzi", "洗 钱"),
    ("hyphen between hanzi", "刷单-返利"),
    ("traditional", "洗錢"),
    ("traditional phrase", "網絡賭博"),
    ("traditional + full width", "刷單返利！"),
    ("upper case", "FUCK"),
    ("mixed case", "BiTcH"),
    ("cyrillic homoglyphs", "ѕһіt"),
    ("greek homoglyphs", "ΒΙΤCΗ"),
    ("armenian homoglyph", "fսck"),
    ("small capitals", "ꜱʜɪᴛ"),
    ("mixed tricks", "Ｆ\u200bＵ\u00adｃＫ\ufe0fing"),
    ("open end", "fucking"),
    ("inside cjk text", "你这个fuck人"),
    ("phrase with other separators", "double-your  bitcoin"),
    ("phrase without separators", "DoubleYourBitcoin"),
    ("hanzi spelled out with punctuation", "刷.单-返/利"),
    ("hanzi spelled out on lines", "刷\n单\n返\n利"),
    ("hanzi spelled out with clause breaks", "网。络，赌、博"),
    ("hanzi spelled out with mixed breaks", "刷\r\n单!返?利"),
]


@pytest.mark.parametrize(("name", "text"), EVASIONS, ids=[e[0] for e in EVASIONS])
def test_evasion_is_caught(matcher: Matcher, name: str, text: str) -> None:
    hits = matcher.find(text)
    assert hits, name
    masked = matcher.mask(text)
    assert len(masked) == len(text)
    assert not matcher.find(masked)


def test_at_least_forty_evasion_cases() -> None:
    assert len(EVASIONS) >= 40


BENIGN = [
    ("inside a longer word", "the class passage was assessed"),
    ("boundary at start", "Scunthorpe United"),
    ("boundary at end", "shitake mushrooms"),
    ("gap across two words", "it's excellent"),
    ("gap across hyphenated words", "he's ex-wife"),
    ("gap joins word parts", "push it and fish it"),
    ("gap joins word parts 2", "a bit chunky"),
    ("clause break between hanzi", "衣服我来洗。钱你来付。"),
    ("line break between hanzi", "洗\n钱"),
    ("one clause break inside a longer entry", "先刷单。返利另算"),
    ("breaks but not between every character", "网络。赌博"),
    ("allowed compound", "他用清水洗钱包"),
    ("gap too wide", "f   u   c   k"),
    ("no leetspeak", "5h1t"),
    ("other phrase", "double your efforts"),
]


@pytest.mark.parametrize(("name", "text"), BENIGN, ids=[b[0] for b in BENIGN])
def test_benign_is_not_hit(matcher: Matcher, name: str, text: str) -> None:
    assert matcher.find(text) == [], name
    assert matcher.mask(text) == text


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("a ＦＵＣＫ b", "a **** b"),
        ("x f\u200bu\u200bck y", "x ****** y"),
        ("s e x!", "*****!"),
        ("他是傻逼吗", "他是**吗"),
        ("洗錢和洗钱", "**和**"),
        ("ok ﬁne", "ok ﬁne"),
        ("fuck shit", "**** ****"),
        ("fuck\u0301 it", "****\u0301 it"),
    ],
)
def test_mask_replaces_exactly_the_original_characters(matcher: Matcher, text: str, masked: str) -> None:
    assert matcher.mask(text) == masked


def test_offsets_are_original_offsets(matcher: Matcher) -> None:
    text = "ab \u200b\u200bＦ\u200bＵＣＫ!"
    [hit] = matcher.find(text)
    assert (hit.start, hit.end) == (5, 10)


def test_ligature_expands_and_maps_back() -> None:
    m = Matcher.from_texts(["fine"])
    [hit] = m.find("so ﬁne")  # one original character became two
    assert (hit.start, hit.end) == (3, 6)


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("ＡＢＣ", "abc"),
        ("ß", "ss"),
        ("İ", "i"),
        ("⽇本", "日本"),
        ("學習", "学习"),
        ("a\u200b\u00ad\ufe0fb", "ab"),
        ("сех", "cex"),
        ("①", "1"),
    ],
)
def test_normalization(text: str, normalized: str) -> None:
    assert normalize_text(text) == normalized


def test_parse_handles_bom_crlf_comments_blank_lines_and_case() -> None:
    entries = parse_word_list("\ufeff# c\r\n\r\n  Word  \r\n!Allowed Phrase\r\n*mid*\r\n\\#tag\r\n", "f.txt")
    assert [(e.text, e.allow, e.open_start, e.open_end) for e in entries] == [
        ("Word", False, False, False),
        ("Allowed Phrase", True, False, False),
        ("mid", False, True, True),
        ("#tag", False, False, False),
    ]
    assert entries[0].source == "f.txt:3"


def test_duplicates_in_other_forms_merge() -> None:
    m = Matcher.from_texts(["FUCK\nfuck\nＦｕｃｋ", "洗錢\n洗钱"])
    assert m.words == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ok\n!\n", "f.txt:2: empty entry"),
        ("ok\n*\n", "f.txt:2: empty entry"),
        ("ok\n\u200b***\n", "f.txt:2: the entry has no letters or digits"),
        ("secretword\n!secretword\n", "f.txt:2: the entry is both listed and allowed"),
        ("x" * (MAX_WORD_CHARS + 1), "f.txt:1: the entry is longer than"),
    ],
)
def test_bad_entries_are_errors_that_never_repeat_the_word(text: str, message: str) -> None:
    with pytest.raises(WordListError) as err:
        Matcher.from_texts([text], names=["f.txt"])
    assert str(err.value).startswith(message)
    assert "secretword" not in str(err.value)


def test_empty_lists_match_nothing() -> None:
    m = Matcher.from_texts(["# nothing here\n"])
    assert m.words == 0 and m.find("anything") == [] and m.hold_bound == 0


def test_gap_is_configurable() -> None:
    assert Matcher.from_texts(["fuck"], max_gap=0).find("f u c k") == []
    assert Matcher.from_texts(["fuck"], max_gap=3).find("f   u   c   k")


def test_pinyin_is_off_by_default_and_optional() -> None:
    assert Matcher.from_texts(["傻逼"]).find("sha bi") == []
    on = Matcher.from_texts(["傻逼"], pinyin=True)
    assert on.find("sha bi") and on.find("SHABI") and not on.find("washabiz")


def load_corpus() -> list[str]:
    lines = (ROOT / "tests/data/benign_sentences.txt").read_text(encoding="utf-8").splitlines()
    return [s for s in lines if s.strip() and not s.startswith("#")]


def test_benign_corpus_has_no_hit(shipped: Matcher) -> None:
    corpus = load_corpus()
    assert len(corpus) >= 200
    assert sum(any("\u4e00" <= c <= "\u9fff" for c in s) for s in corpus) >= 100
    flagged = [s for s in corpus if shipped.find(s)]
    assert flagged == []


def test_allowed_compounds_are_what_keeps_boundary_crossings_clean() -> None:
    zh = (ROOT / "config/words/zh.txt").read_text(encoding="utf-8")
    without_allow = "\n".join(line for line in zh.splitlines() if not line.startswith("!"))
    m = Matcher.from_texts([without_allow])
    crossing = [s for s in load_corpus() if m.find(s)]
    assert len(crossing) >= 3  # 洗钱包, 他妈的确, 体操你妈 ...


def test_shipped_lists_catch_their_own_words(shipped: Matcher) -> None:
    for name in ("zh.txt", "en.txt"):
        for entry in parse_word_list((ROOT / "config/words" / name).read_text(encoding="utf-8")):
            if not entry.allow:
                assert shipped.find(f"x {entry.text} y"), entry.source


NORMALIZE_PIECES = [
    "a",
    "Ｂ",
    "ß",
    "ﬁ",
    "\u200b",
    "\u0301",
    "學",
    "⽇",
    "𝐱",
    " ",
    "。",
    "㎏",
    "\ud800",
    "İ",
    "9",
]


ONE_TO_ONE_PIECES = ["a", "Ｂ", "學", "⽇", "𝐱", " ", "。", "\ud800", "Z", "!", "洗"]


@pytest.mark.parametrize("pieces", [NORMALIZE_PIECES, ONE_TO_ONE_PIECES], ids=["any", "one-to-one"])
@pytest.mark.parametrize("seed", range(10))
def test_short_and_long_normalization_paths_agree(pieces: list[str], seed: int) -> None:
    rng = __import__("random").Random(seed)
    text = "".join(rng.choice(pieces) for _ in range(SMALL + 50))
    small, large = _normalize_small(text, tables()), _normalize_large(text, tables())
    assert small.compact == large.compact and small.size == large.size
    for a, b in ((small.norm, large.norm), (small.orig, large.orig), (small.cidx, large.cidx)):
        assert as_list(a) == as_list(b)
