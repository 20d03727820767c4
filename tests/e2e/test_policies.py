"""Content policies end to end: scripted chunk splits through the simulator and the gateway."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from loadtest.vllm_sim import SimulatorThread
from tests.conftest import GatewayProcess, gateway_config

SENTENCE = "Well, that was a bullshit answer from the double your bitcoin crowd, honestly."



def _config(sim: SimulatorThread, output: str) -> dict:
    return gateway_config(
        backends={"gpu": {"type": "vllm", "url": sim.url, "model": "sim-model"}},
        models={"assistant": {"variants": [{"name": "c", "weight": 1, "backends": ["gpu"]}]}},
        policies={"output": output, "input": "block"},
        cache={"enabled": False},
    )


@pytest.fixture(scope="module")
def masking(sim: SimulatorThread, module_tmp) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(_config(sim, "mask"), module_tmp).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def blocking(sim: SimulatorThread, module_tmp) -> Iterator[GatewayProcess]:
    proc = GatewayProcess(_config(sim, "block"), module_tmp).start()
    yield proc
    proc.stop()


def _splits(text: str) -> list[list[str]]:
    """Two-way splits at every position inside the listed words, and a few three-way splits."""
    cases = []
    for word in ("bullshit", "double your bitcoin"):
        start = text.index(word)
        for cut in range(start + 1, start + len(word)):
            cases.append([text[:cut], text[cut:]])
    cases.append([text[:20], "\u200b", text[20:]])  # a zero-width chunk between chunks
    cases.append(list(text))  # one character per chunk
    return cases


def _stream_text(gw: GatewayProcess, prompt: str) -> tuple[str, list]:
    chunks = list(gw.client().chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": prompt}], stream=True,
    ))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_listed_words_never_reach_a_streaming_client_in_any_split(
    masking: GatewayProcess, sim: SimulatorThread
) -> None:
    cases = _splits(SENTENCE)
    sim.configure(scripts={f"case {i}:": parts for i, parts in enumerate(cases)})
    for i, parts in enumerate(cases):
        text, chunks = _stream_text(masking, f"case {i}: go")
        low = text.lower()
        assert "bullshit" not in low and "bitcoin" not in low, (parts, text)
        assert text.replace("*", "").startswith("Well, that was a")  # everything else arrives
        assert len(text) == len("".join(parts))  # masked character for character
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_unlisted_text_is_not_held(masking: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(scripts={"plain": ["Hello ", "there, ", "friend."]})
    _, chunks = _stream_text(masking, "plain please")
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert contents == ["Hello ", "there, ", "friend."]  # forwarded chunk for chunk


def test_block_mid_stream_ends_with_content_filter_and_error(
    blocking: GatewayProcess, sim: SimulatorThread
) -> None:
    sim.configure(scripts={"go": ["Sure. ", "That is bull", "shit and ", "more text ", "after it"]}, itl_ms=20)
    body = {"model": "assistant", "messages": [{"role": "user", "content": "go"}], "stream": True}
    with httpx.Client(base_url=blocking.url, timeout=10) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers=blocking.headers()) as r:
            frames = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    events = [orjson.loads(f) for f in frames if f != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events if c.get("choices"))
    assert "bull" not in text and text.startswith("Sure.")
    finishes = [c["choices"][0]["finish_reason"] for c in events if c.get("choices")]
    assert finishes[-1] == "content_filter" and "stop" not in finishes
    assert events[-1]["error"]["code"] == "content_filter"
    assert "[DONE]" not in frames
    # the upstream request was cancelled rather than generated to the end
    records = sim.wait_for(lambda recs: recs and recs[-1]["cancelled"], timeout=2)
    assert records[-1]["cancelled"]


def test_block_mid_stream_makes_the_sdk_raise(blocking: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(scripts={"go": ["Sure. ", "That is bull", "shit."]})
    with pytest.raises(openai.APIError):
        _stream_text(blocking, "go")


@pytest.mark.parametrize("prompt", [
    "tell me about bullshit",
    "B\u200bu\u200bl\u200bl\u200bs\u200bh\u200bi\u200bt",
    "ｂｕｌｌｓｈｉｔ please",
    "你这个傻逼",
    "你這個傻逼",
])
def test_input_block_reaches_no_backend(masking: GatewayProcess, sim: SimulatorThread, prompt: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        masking.client().chat.completions.create(model="assistant", messages=[{"role": "user", "content": prompt}])
    err = info.value.body
    assert err["code"] == "content_filter"
    assert "bullshit" not in err["message"].lower() and "傻逼" not in err["message"]
    assert sim.requests() == []


def test_non_stream_output_is_masked(masking: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(scripts={"hi": ["What ", "bullshit."]})
    completion = masking.client().chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == "What ********."
