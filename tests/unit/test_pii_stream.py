"""The output side of personal data on streams (policies/pii_stream.py) and in the relay."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from policies.pii import Found, Recognizer
from policies.pii_stream import MAX_HOLD, ChunkRestorer
from policies.pii_text import AnswerCheck, Pseudonyms
from proxy.apis.chat import ChatRenderer
from proxy.errors import ContentFiltered
from proxy.streaming import Relay, StreamTap

PHONE, ID, OTHER = "13812345678", "11010519491231002X", "13987654321"
R = Recognizer()
TEXT = "您好，[PHONE_1] 已绑定，证件 [ID_1] 已核验。"
SHOWN = f"您好，{PHONE} 已绑定，证件 {ID} 已核验。"


def restorer(output: str = "off", counts: dict[str, int] | None = None) -> ChunkRestorer:
    """The request said PHONE and ID: [PHONE_1] and [ID_1] stand for them."""
    names = Pseudonyms(keep=True)
    for f in R.find(f"{PHONE} {ID}"):
        names.placeholder(R.labels[f.kind], f)
    tally = {} if counts is None else counts

    def seen(found: Found) -> None:
        tally[found.kind] = tally.get(found.kind, 0) + 1

    return ChunkRestorer(AnswerCheck(R if output != "off" else None, output, names, seen))


def chunk(text: str | None = None, finish: str | None = None, index: int = 0, **delta: Any) -> dict[str, Any]:
    if text is not None:
        delta["content"] = text
    return {"id": "c", "object": "chat.completion.chunk", "choices": [
        {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def run(r: ChunkRestorer, pieces: list[str], finish: bool = True) -> tuple[str, list[dict[str, Any]]]:
    out: list[dict[str, Any]] = []
    for piece in pieces:
        out += r.feed(chunk(piece))
    out += r.feed(chunk(finish="stop")) if finish else r.flush_chunks()
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in out if c["choices"])
    return text, out


def splits(text: str) -> list[list[str]]:
    """Every two-way split, and three-way splits around each placeholder."""
    cases = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    for start in (text.index("[PHONE_1]"), text.index("[ID_1]")):
        for i in range(start, start + 9):
            cases += [[text[:i], text[i:j], text[j:]] for j in range(i, start + 10)]
    return cases


@pytest.mark.parametrize("output", ["off", "flag", "mask"])
def test_a_placeholder_split_anywhere_is_restored_whole(output: str) -> None:
    for pieces in splits(TEXT):
        text, out = run(restorer(output), pieces)
        assert text == SHOWN, pieces
        assert not any("[" in (c["choices"][0]["delta"].get("content") or "") for c in out if c["choices"])
        assert out[-1]["choices"][0]["finish_reason"] == "stop"


def test_ordinary_text_is_not_held_and_only_a_placeholder_head_is() -> None:
    r = restorer()
    assert [c["choices"][0]["delta"]["content"] for c in r.feed(chunk("Hello "))] == ["Hello "]
    assert r.feed(chunk("see [PH")) == [chunk("see ")]
    assert r.feed(chunk("ONE_1")) == []  # all held: the chunk is not sent
    assert r.feed(chunk("] and [link](x)")) == [chunk(f"{PHONE} and [link](x)")]
    assert r.feed(chunk("a [")) == [chunk("a ")]
    assert r.flush_chunks()[0]["choices"][0]["delta"] == {"content": "["}  # ended without finish_reason


def test_chunks_are_new_dicts_the_input_is_kept_for_the_cache() -> None:
    r, original = restorer(), chunk("[PHONE_1] ok", role="assistant")
    kept = copy.deepcopy(original)
    assert r.feed(original)[0]["choices"][0]["delta"] == {"role": "assistant", "content": f"{PHONE} ok"}
    assert original == kept


def test_tool_call_arguments_are_restored_as_json() -> None:
    names = Pseudonyms(keep=True)
    names.values["[NAME_1]"] = 'Li "Lee"'
    r = ChunkRestorer(AnswerCheck(None, "off", names, lambda f: None))
    pieces = ['{"who": "[NA', 'ME_1]", "n": 1}']
    out = []
    for i, piece in enumerate(pieces):
        head = {"id": "t", "type": "function"} if i == 0 else {}
        call = {"index": 0, "function": {"arguments": piece}, **head}
        out += r.feed(chunk(tool_calls=[call]))
    out += r.feed(chunk(finish="tool_calls"))
    calls = [tc for c in out for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    args = "".join(tc["function"].get("arguments", "") for tc in calls)
    assert orjson.loads(args) == {"who": 'Li "Lee"', "n": 1}
    assert out[0]["choices"][0]["delta"]["tool_calls"][0]["id"] == "t"


def test_output_mask_catches_a_value_split_anywhere() -> None:
    text = f"请联系 {OTHER}，或者 [PHONE_1]。"
    for i in range(len(text) + 1):
        counts: dict[str, int] = {}
        shown, _ = run(restorer("mask", counts), [text[:i], text[i:]])
        assert shown == f"请联系 [PHONE_2]，或者 {PHONE}。", i
        assert counts == {"cn_mobile": 1}


def test_output_hold_is_bounded() -> None:
    r = restorer("mask")
    long = "a" * (MAX_HOLD * 3)
    text, _ = run(r, [long], finish=False)
    assert text == long
    sent = r.feed(chunk("b" * (MAX_HOLD * 2)))[0]["choices"][0]["delta"]["content"]
    assert len(sent) >= MAX_HOLD  # no more than MAX_HOLD characters waited


def test_flag_counts_at_the_end_and_holds_nothing() -> None:
    counts: dict[str, int] = {}
    r = restorer("flag", counts)
    assert r.feed(chunk(f"call {OTHER[:5]}")) == [chunk(f"call {OTHER[:5]}")]
    assert r.feed(chunk(OTHER[5:])) == [chunk(OTHER[5:])]
    assert counts == {}
    r.feed(chunk(finish="stop"))
    assert counts == {"cn_mobile": 1}


def test_output_block_stops_before_the_value() -> None:
    r = restorer("block")
    out = r.feed(chunk(f"ok [PHONE_1], agent {OTHER} more"))
    assert r.blocked and out[0]["choices"][0]["delta"]["content"] == f"ok {PHONE}, agent "
    assert r.feed(chunk("more")) == []
    assert r.finish_chunks()[0]["choices"][0]["finish_reason"] == "content_filter"


def test_choices_are_kept_apart() -> None:
    r = restorer()
    def both(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
        return {"choices": [first["choices"][0], second["choices"][0]]}

    assert r.feed(both(chunk("[PHO", index=0), chunk("[ID", index=1))) == []
    out = r.feed(both(chunk("NE_1]", index=0), chunk("_1]", "stop", index=1)))
    contents = {c["index"]: c["delta"].get("content") for c in out[0]["choices"]}
    assert contents == {0: PHONE, 1: ID}


async def _chunks(items: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for item in items:
        yield item


async def test_the_relay_taps_placeholders_and_sends_values() -> None:
    tap = StreamTap()
    relay = Relay(ChatRenderer(False), None, tap, "m", lambda: ContentFiltered("x"), restorer())
    pieces = [chunk("Hi [PHO"), chunk("NE_1]"), chunk(finish="stop")]
    frames = [f async for f in relay.frames(_chunks(pieces), lambda: {})]
    sent = b"".join(frames).decode()
    assert PHONE in sent and "[PHONE_1]" not in sent and sent.endswith("data: [DONE]\n\n")
    tapped = "".join(c["choices"][0]["delta"].get("content") or "" for c in tap.chunks)
    assert tapped == "Hi [PHONE_1]" and tap.complete


async def test_the_relay_ends_a_blocked_stream_with_an_error() -> None:
    tap = StreamTap()
    relay = Relay(ChatRenderer(False), None, tap, "m", lambda: ContentFiltered("stopped"), restorer("block"))
    pieces = [chunk(f"call {OTHER} now"), chunk(finish="stop")]
    frames = [f async for f in relay.frames(_chunks(pieces), lambda: {})]
    sent = b"".join(frames).decode()
    assert OTHER not in sent and "content_filter" in sent and "stopped" in sent and "[DONE]" not in sent
    assert tap.blocked and not tap.complete
