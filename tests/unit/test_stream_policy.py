"""The streaming matcher: every chunk split gives the one-shot result, with a bounded hold-back."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from policies.normalize import normalize_text
from policies.stream import ChunkFilter, StreamScanner
from policies.words import Matcher

WORDS = "fuck*\nshit\nass\nsex\n傻逼\n洗钱\n!洗钱包\n刷单返利\ndouble your bitcoin\n"


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    return Matcher.from_texts([WORDS], max_gap=2)


SENTENCES = [
    "well fuck this",
    "you ass, said the class",
    "s e x and s.h.i.t",
    "f\u0301uck it",  # split between a base character and its combining mark
    "f\u200bu\u200bck",  # split around zero-width characters
    "他是傻\u200b逼吗",
    "我要洗錢，不是洗钱包",
    "刷单-返利！",
    "Ｓｈｉｔ happens",
    "please double your bitcoin now",
    "a bit chunky passage",
]


def stream(matcher: Matcher, pieces: list[str]) -> tuple[str, list[int]]:
    """Feed pieces; return what the client saw and the normalized hold-back after each feed."""
    scanner, seen, fed, held = StreamScanner(matcher), "", "", []
    for piece in pieces:
        fed += piece
        seen += scanner.feed(piece)
        assert scanner.held == len(fed) - len(seen)
        held.append(len(normalize_text(fed[len(seen) :])))
    return seen + scanner.flush(), held


def splits(text: str) -> list[list[str]]:
    cuts = itertools.combinations(range(len(text) + 1), 2)
    return [[text[:i], text[i:j], text[j:]] for i, j in cuts]


@pytest.mark.parametrize("text", SENTENCES)
def test_every_split_gives_the_one_shot_result(matcher: Matcher, text: str) -> None:
    expected = matcher.mask(text)
    for pieces in splits(text):
        seen, held = stream(matcher, pieces)
        assert seen == expected, pieces
        assert matcher.find(seen) == []
        assert max(held) <= matcher.hold_bound, pieces


@pytest.mark.parametrize("text", SENTENCES)
def test_one_character_at_a_time(matcher: Matcher, text: str) -> None:
    seen, held = stream(matcher, list(text))
    assert seen == matcher.mask(text)
    assert max(held) <= matcher.hold_bound


@pytest.mark.parametrize("text", ["hello world, how is it going?", "今天天气很好。", "12345 67890"])
def test_text_that_cannot_start_a_word_is_not_held(matcher: Matcher, text: str) -> None:
    scanner = StreamScanner(matcher)
    assert [scanner.feed(ch) for ch in text] == list(text)


def test_hold_back_is_only_a_possible_prefix(matcher: Matcher) -> None:
    scanner = StreamScanner(matcher)
    assert scanner.feed("the fu") == "the "
    assert scanner.held == 2
    assert scanner.feed("n part") == "fun part"
    assert scanner.held == 0


def test_hold_bound_formula(matcher: Matcher) -> None:
    assert matcher.longest == len("doubleyourbitcoin")
    assert matcher.hold_bound == matcher.longest * (max(matcher.max_gap, 1) + 1)


def test_block_returns_the_safe_prefix_and_stops(matcher: Matcher) -> None:
    scanner = StreamScanner(matcher, block=True)
    out = scanner.feed("all good, fu") + scanner.feed("ck you")
    assert out == "all good, "
    assert scanner.blocked and scanner.hits == 1
    assert scanner.feed("more") == "" and scanner.flush() == ""


def test_block_at_flush(matcher: Matcher) -> None:
    scanner = StreamScanner(matcher, block=True)
    assert scanner.feed("go to hell, ass") == "go to hell, "
    assert scanner.flush() == "" and scanner.blocked


# ---- ChunkFilter ----


def chunk(index: int = 0, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}


def content(chunks: list[dict[str, Any]], index: int = 0, field: str = "content") -> str:
    return "".join(c["delta"].get(field) or "" for ch in chunks for c in ch["choices"] if c["index"] == index)


def run(f: ChunkFilter, chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [out for ch in chunks for out in f.feed(ch)]


@pytest.mark.parametrize("text", SENTENCES)
def test_chunk_filter_every_split(matcher: Matcher, text: str) -> None:
    for pieces in splits(text):
        f = ChunkFilter(matcher, "mask")
        chunks = [chunk(role="assistant", content="")] + [chunk(content=p) for p in pieces if p]
        out = run(f, [*chunks, chunk(finish="stop")])
        assert content(out) == matcher.mask(text)
        assert out[-1]["choices"][0]["finish_reason"] == "stop"
        assert all(ch["choices"] for ch in out)
        assert f.held == 0


def test_all_held_chunk_is_not_sent_unless_it_carries_something(matcher: Matcher) -> None:
    f = ChunkFilter(matcher, "mask")
    [first] = f.feed(chunk(role="assistant", content="fu"))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert f.feed(chunk(content="c")) == []
    [last] = f.feed(chunk(finish="length", content="k"))
    assert last["choices"][0]["delta"]["content"] == "****"
    assert last["choices"][0]["finish_reason"] == "length"


def test_usage_chunk_passes_untouched(matcher: Matcher) -> None:
    f = ChunkFilter(matcher, "mask")
    usage = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
    assert f.feed(usage) == [usage] and f.feed(usage)[0] is usage


def test_choices_are_filtered_independently(matcher: Matcher) -> None:
    f = ChunkFilter(matcher, "mask")
    script = [chunk(0, content="sh"), chunk(1, content="sh"), chunk(0, content="it"), chunk(1, content="ow")]
    out = run(f, [*script, chunk(0, finish="stop"), chunk(1, finish="stop")])
    assert content(out, 0) == "****" and content(out, 1) == "show"


def test_tool_call_arguments_are_filtered(matcher: Matcher) -> None:
    f = ChunkFilter(matcher, "mask")
    head = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "say", "arguments": ""}}
    parts = ['{"text": "sh', "it", ' happens"}']
    script = [chunk(tool_calls=[head])] + [
        chunk(tool_calls=[{"index": 0, "function": {"arguments": p}}]) for p in parts
    ]
    out = run(f, [*script, chunk(finish="tool_calls")])
    calls = [tc for ch in out for c in ch["choices"] for tc in c["delta"].get("tool_calls", [])]
    assert calls[0]["id"] == "call_1" and calls[0]["function"]["name"] == "say"
    assert "".join(tc["function"].get("arguments", "") for tc in calls) == '{"text": "**** happens"}'


def test_switching_field_flushes_the_previous_one(matcher: Matcher) -> None:
    f = ChunkFilter(matcher, "mask")
    out = run(f, [chunk(reasoning_content="think fu"), chunk(content="Hello")])
    assert content(out, field="reasoning_content") == "think fu"
    assert content(out) == "Hello"


def test_logprobs_are_dropped_when_masking(matcher: Matcher) -> None:
    f = ChunkFilter(matcher, "mask")
    ch = chunk(content="hello")
    ch["choices"][0]["logprobs"] = {"content": [{"token": "hello", "logprob": -0.1}]}
    [out] = f.feed(ch)
    assert out["choices"][0]["logprobs"] is None


def test_block_mid_stream(matcher: Matcher) -> None:
    f = ChunkFilter(matcher, "block")
    out = run(f, [chunk(role="assistant", content="Sure, "), chunk(content="fu"), chunk(content="ck that")])
    assert f.blocked
    assert content(out) == "Sure, "
    [end] = f.finish_chunks()
    assert end["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}]
    assert end["id"] == "c1" and end["object"] == "chat.completion.chunk"
    assert f.feed(chunk(content="more")) == []


def test_flag_passes_everything_and_counts(matcher: Matcher) -> None:
    f = ChunkFilter(matcher, "flag")
    script = [chunk(content="fu"), chunk(content="ck it"), chunk(finish="stop")]
    out = run(f, script)
    assert out == script and all(a is b for a, b in zip(out, script, strict=True))
    assert f.hits == 1


def test_flush_chunks_when_upstream_ends_without_finish(matcher: Matcher) -> None:
    f = ChunkFilter(matcher, "mask")
    run(f, [chunk(content="oh sh")])
    assert content(f.flush_chunks()) == "sh"
    assert f.flush_chunks() == []


PIECES = ["f", "u", "c", "k", "s", "h", "i", "t", "a", "e", "x", " ", ".", "*", "\u200b", "\u0301",
          "傻", "逼", "洗", "钱", "錢", "包", "。", "class", "Ｓ", "ing"]  # fmt: skip


@pytest.mark.parametrize("seed", range(30))
def test_random_texts_and_splits_match_the_one_shot_result(matcher: Matcher, seed: int) -> None:
    rng = __import__("random").Random(seed)
    text = "".join(rng.choice(PIECES) for _ in range(60))
    cuts = sorted(rng.sample(range(1, len(text)), 12))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    seen, held = stream(matcher, pieces)
    assert seen == matcher.mask(text)
    assert max(held) <= matcher.hold_bound
