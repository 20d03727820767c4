"""Agent traffic through the gateway, driven by the real openai SDK against the vLLM simulator:
large tool calls streamed in many pieces arrive intact, reasoning passes through under the name
the server used, finish_reason comes once at the end, the JSON path and the cache replay keep all
of it, and the word policies read reasoning text and tool-call arguments both ways."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from loadtest.sim_agent import tool_arguments
from loadtest.vllm_sim import SimulatorThread
from tests.conftest import GatewayProcess, gateway_config

TOOLS = [{"type": "function", "function": {"name": "write_file", "parameters": {"type": "object"}}}]
BIG = "[sim reasoning=12 tool_bytes=9000 tool_chunk=7]"


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, module_tmp) -> Iterator[GatewayProcess]:
    config = gateway_config(
        backends={"gpu": {"type": "vllm", "url": sim.url, "model": "sim-model"}},
        models={"assistant": {"variants": [{"name": "c", "weight": 1, "backends": ["gpu"]}]}},
        policies={"input": "block", "output": "mask"},
    )
    proc = GatewayProcess(config, module_tmp).start()
    yield proc
    proc.stop()


def _unique(text: str) -> str:
    return f"{text} (case {uuid.uuid4().hex[:8]})"


def _stream(client: openai.OpenAI, prompt: str, model: str = "assistant", **kw: Any) -> list[Any]:
    messages = [{"role": "user", "content": prompt}]
    return list(client.chat.completions.create(model=model, messages=messages, stream=True, **kw))


def _arguments(chunks: list[Any]) -> dict[int, dict[str, Any]]:
    """Per tool-call index: id, name, the joined arguments and how many pieces carried them."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                slot = calls.setdefault(call.index, {"id": None, "name": None, "arguments": "", "pieces": 0})
                slot["id"] = call.id or slot["id"]
                if call.function and call.function.name:
                    slot["name"] = call.function.name
                if call.function and call.function.arguments:
                    slot["arguments"] += call.function.arguments
                    slot["pieces"] += 1
    return calls


def _field(chunks: list[Any], name: str) -> str:
    return "".join(getattr(c.choices[0].delta, name, None) or "" for c in chunks if c.choices)


def _finishes(chunks: list[Any]) -> list[str | None]:
    return [c.choices[0].finish_reason for c in chunks if c.choices]


def test_a_large_tool_call_streams_through_intact(gw: GatewayProcess, sim: SimulatorThread) -> None:
    via_gateway = _stream(gw.client(), f"save it {BIG}", tools=TOOLS)
    direct = openai.OpenAI(base_url=f"{sim.url}/v1", api_key="unused", max_retries=0)
    try:
        straight = _stream(direct, f"save it {BIG}", model="sim-model", tools=TOOLS)
    finally:
        direct.close()
    call = _arguments(via_gateway)[0]
    assert call["arguments"] == tool_arguments(9000, 0) == _arguments(straight)[0]["arguments"]
    assert len(call["arguments"]) > 8192 and call["pieces"] > 1000
    assert call["name"] == "write_file" and call["id"].startswith("chatcmpl-tool-")
    assert json.loads(call["arguments"])["path"] == "notes/item-0.md"
    assert _field(via_gateway, "reasoning") == _field(straight, "reasoning") != ""
    finishes = _finishes(via_gateway)
    assert finishes[-1] == "tool_calls" and not any(finishes[:-1])


def test_arguments_in_one_huge_chunk_pass_whole(gw: GatewayProcess, sim: SimulatorThread) -> None:
    chunks = _stream(gw.client(), "save [sim tool_bytes=300000 tool_chunk=1000000]", tools=TOOLS)
    call = _arguments(chunks)[0]
    assert call["pieces"] == 1 and call["arguments"] == tool_arguments(300000, 0)


def test_reasoning_passes_through_under_the_servers_name(gw: GatewayProcess, sim: SimulatorThread) -> None:
    client = gw.client()
    for name in ("reasoning", "reasoning_content"):
        sim.configure(reasoning_field=name)
        chunks = _stream(client, _unique("why? [sim reasoning=6]"))
        assert _field(chunks, name) == "The user wants a careful answer,"
        assert _field(chunks, "content").startswith("Simulated answer to: why?")
        finishes = _finishes(chunks)
        assert finishes[-1] == "stop" and not any(finishes[:-1])
        message = client.chat.completions.create(
            model="assistant", messages=[{"role": "user", "content": _unique("why? [sim reasoning=6]")}]
        ).choices[0].message
        assert getattr(message, name) == "The user wants a careful answer,"


def test_json_answer_carries_the_whole_tool_call(gw: GatewayProcess, sim: SimulatorThread) -> None:
    done = gw.client().chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": f"save {BIG}"}], tools=TOOLS
    )
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "write_file" and call.function.arguments == tool_arguments(9000, 0)
    assert choice.message.reasoning == "The user wants a careful answer, so let me check each step."


def test_cached_reasoning_answers_replay_intact(gw: GatewayProcess, sim: SimulatorThread) -> None:
    client = gw.client()
    prompt = _unique("explain [sim reasoning=6]")
    first = client.chat.completions.with_raw_response.create(
        model="assistant", messages=[{"role": "user", "content": prompt}], temperature=0, stream=True
    )
    streamed = list(first.parse())
    as_json = client.chat.completions.with_raw_response.create(
        model="assistant", messages=[{"role": "user", "content": prompt}], temperature=0
    )
    again = client.chat.completions.with_raw_response.create(
        model="assistant", messages=[{"role": "user", "content": prompt}], temperature=0, stream=True
    )
    assert first.headers["x-gateway-cache"] == "miss"
    assert as_json.headers["x-gateway-cache"] == again.headers["x-gateway-cache"] == "hit"
    message = as_json.parse().choices[0].message
    assert message.reasoning == _field(streamed, "reasoning") == "The user wants a careful answer,"
    assert message.content == _field(streamed, "content")
    replay = list(again.parse())
    assert _field(replay, "reasoning") == message.reasoning
    assert _finishes(replay)[-1] == "stop" and not any(_finishes(replay)[:-1])
    assert len(sim.requests()) == 1


def test_tool_call_answers_are_not_cached(gw: GatewayProcess, sim: SimulatorThread) -> None:
    client = gw.client()
    prompt = _unique("save [sim tool_bytes=300]")
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model="assistant", messages=[{"role": "user", "content": prompt}], tools=TOOLS, temperature=0
        )
        assert raw.headers["x-gateway-cache"] == "bypass"
        assert raw.parse().choices[0].message.tool_calls[0].function.arguments == tool_arguments(300, 0)
    assert len(sim.requests()) == 2


def test_a_word_split_across_tool_argument_chunks_is_masked(gw: GatewayProcess, sim: SimulatorThread) -> None:
    raw = json.dumps({"note": "pay now or " + "x" * 9000 + " double your bitcoin", "n": 3})
    cut = raw.index("double your bitcoin") + 5
    pieces = [raw[i : i + 9] for i in range(0, cut, 9)] + [raw[cut : cut + 3], raw[cut + 3 :]]
    sim.configure(agent_scripts={"wallet": {"reasoning": ["I will say bull", "shit"], "tool_calls": [pieces]}})
    chunks = _stream(gw.client(), "wallet please", tools=TOOLS)
    args = json.loads(_arguments(chunks)[0]["arguments"])  # still valid JSON
    assert args == {"note": "pay now or " + "x" * 9000 + " *******************", "n": 3}
    assert _field(chunks, "reasoning") == "I will say ********"
    finishes = _finishes(chunks)
    assert finishes[-1] == "tool_calls" and not any(finishes[:-1])
    done = gw.client().chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": "wallet please"}], tools=TOOLS
    )
    message = done.choices[0].message
    assert json.loads(message.tool_calls[0].function.arguments) == args
    assert message.reasoning == "I will say ********"


@pytest.mark.parametrize("turn", [
    {"role": "assistant", "content": None,
     "tool_calls": [{"id": "c1", "type": "function",
                     "function": {"name": "write_file", "arguments": '{"text": "\\u6d17\\u94b1 now"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "done: bullshit"},
    {"role": "assistant", "content": "ok", "reasoning_content": "just double your bitcoin"},
])
def test_listed_words_in_agent_turns_are_refused_before_any_backend(
    gw: GatewayProcess, sim: SimulatorThread, turn: dict[str, Any]
) -> None:
    messages = [{"role": "user", "content": "hi"}, turn, {"role": "user", "content": "go on"}]
    with pytest.raises(openai.BadRequestError) as info:
        gw.client().chat.completions.create(model="assistant", messages=messages, tools=TOOLS)
    assert info.value.body["code"] == "content_filter"
    assert sim.requests() == []
