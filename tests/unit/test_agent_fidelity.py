"""Agent traffic, pure parts: the simulator's tool-call and reasoning streams (vLLM's shapes), their
fold into a JSON answer, the cache's replay of them, and the word policies inside reasoning text and
tool-call arguments (streamed and whole), with masked arguments still valid JSON."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from backends.collect import CompletionBuilder
from loadtest.sim_agent import tool_arguments
from loadtest.sim_plan import SimConfig, build_plan, completion_body, stream_frames
from policies.bodies import scan_completion, scan_request
from policies.jsontext import join_document, split_document
from policies.stream import ChunkFilter, JsonScanner
from policies.words import Matcher
from proxy.cache.replay import CachedAnswer, chunks_to_completion, completion_to_chunks, is_complete

WORDS = "fuck*\nshit\nbullshit\n洗钱\ndouble your bitcoin\n"
TOOLS = [{"type": "function", "function": {"name": "write_file", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def matcher() -> Matcher:
    return Matcher.from_texts([WORDS], max_gap=2)


def sim_chunks(prompt: str, cfg: SimConfig | None = None, **body: Any) -> list[dict[str, Any]]:
    """The simulator's stream for one request, as decoded chunk dicts (without [DONE])."""
    request = {"model": "sim-model", "messages": [{"role": "user", "content": prompt}], "stream": True, **body}
    plan = build_plan(request, cfg or SimConfig(), "chatcmpl-t")
    frames = [frame for _, frame in stream_frames(plan, 0.0, 0.0)]
    assert frames[-1] == b"data: [DONE]\n\n"
    return [orjson.loads(f[6:]) for f in frames[:-1]]


def sim_json(prompt: str, cfg: SimConfig | None = None, **body: Any) -> dict[str, Any]:
    request = {"model": "sim-model", "messages": [{"role": "user", "content": prompt}], **body}
    return orjson.loads(completion_body(build_plan(request, cfg or SimConfig(), "chatcmpl-t")))


def fold(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    builder = CompletionBuilder()
    for chunk in chunks:
        builder.add(chunk)
    return builder.completion()


def arguments(chunks: list[dict[str, Any]], index: int = 0) -> str:
    calls = [c for ch in chunks for ch_c in ch["choices"] for c in ch_c["delta"].get("tool_calls") or []]
    return "".join(c.get("function", {}).get("arguments") or "" for c in calls if c["index"] == index)


def tool_chunk(piece: str, index: int = 0, finish: str | None = None) -> dict[str, Any]:
    delta = {"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def filtered(matcher: Matcher, chunks: list[dict[str, Any]], action: str = "mask") -> tuple[list[dict[str, Any]], ChunkFilter]:
    f = ChunkFilter(matcher, action)  # type: ignore[arg-type]
    out = [o for c in chunks for o in f.feed(c)]
    return out, f


# -- the simulator speaks vLLM's tool-call and reasoning stream ----------------------------------

MARKER = "[sim reasoning=5 tool_bytes=9000 tool_chunk=7]"


def test_sim_streams_a_large_tool_call_in_vllm_shape() -> None:
    chunks = sim_chunks(f"write it {MARKER}", tools=TOOLS, stream_options={"include_usage": True})
    *body, usage = chunks
    deltas = [c["choices"][0]["delta"] for c in body]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d["reasoning"] for d in deltas[1:6]] == ["The", " user", " wants", " a", " careful"]
    head = deltas[6]["tool_calls"][0]
    assert list(head) == ["id", "type", "index", "function"] and head["id"].startswith("chatcmpl-tool-")
    assert head["function"] == {"name": "write_file"}  # no arguments on the first delta
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[7:-1]]
    assert all(list(d["tool_calls"][0]) == ["index", "function"] for d in deltas[7:-1])
    assert "".join(pieces) == tool_arguments(9000, 0) and len(pieces) > 1000
    assert len(tool_arguments(9000, 0)) >= 9000
    assert deltas[-1] == {}
    finishes = [c["choices"][0]["finish_reason"] for c in body]
    assert finishes[-1] == "tool_calls" and not any(finishes[:-1])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(body) - 1


@pytest.mark.parametrize(("field", "names"), [
    ("reasoning", ["reasoning"]),
    ("reasoning_content", ["reasoning_content"]),
    ("both", ["reasoning", "reasoning_content"]),
])
def test_sim_names_reasoning_as_configured(field: str, names: list[str]) -> None:
    cfg = SimConfig(reasoning_field=field)
    chunks = sim_chunks("why? [sim reasoning=3]", cfg)
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert all(sorted(d) == names for d in deltas[1:4])
    assert "".join(d["content"] for d in deltas[4:]).startswith("Simulated answer to: why?")
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    message = sim_json("why? [sim reasoning=3]", cfg)["choices"][0]["message"]
    assert all(message[n] == "The user wants" for n in names)


def test_sim_makes_tool_calls_only_when_tools_are_offered() -> None:
    plain = sim_chunks(f"go {MARKER}")  # no tools: the model answers in text
    assert not arguments(plain) and plain[-1]["choices"][0]["finish_reason"] == "stop"
    none = sim_chunks(f"go {MARKER}", tools=TOOLS, tool_choice="none")
    assert not arguments(none)
    named = {"type": "function", "function": {"name": "save"}}
    chunks = sim_chunks("go [sim tool_calls=3 tool_bytes=50]", tools=TOOLS, tool_choice=named)
    heads = [c for ch in chunks for c in ch["choices"][0]["delta"].get("tool_calls") or [] if "id" in c]
    assert [h["function"]["name"] for h in heads] == ["save"]  # a named choice: one call, finish stop
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_sim_json_answer_equals_the_fold_of_its_stream() -> None:
    cfg = SimConfig()
    request = {"model": "sim-model", "messages": [{"role": "user", "content": f"x {MARKER}"}], "tools": TOOLS}
    plan = build_plan(request, cfg, "chatcmpl-t")
    answer = orjson.loads(completion_body(plan))["choices"][0]
    stream = [orjson.loads(f[6:]) for _, f in stream_frames(plan, 0.0, 0.0) if f != b"data: [DONE]\n\n"]
    folded = fold(stream)["choices"][0]
    assert answer["finish_reason"] == folded["finish_reason"] == "tool_calls"
    assert answer["message"]["content"] is None and answer["message"]["reasoning"] == folded["message"]["reasoning"]
    assert answer["message"]["tool_calls"] == folded["message"]["tool_calls"]
    assert list(answer["message"]["tool_calls"][0]) == ["id", "type", "function"]


def test_sim_cut_by_max_tokens_ends_with_length() -> None:
    chunks = sim_chunks(f"x {MARKER}", tools=TOOLS, max_tokens=20)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and len(chunks) == 21


def test_sim_agent_scripts_are_validated() -> None:
    with pytest.raises(ValueError, match="agent script"):
        SimConfig(agent_scripts={"k": {"tool_calls": [[]]}})
    with pytest.raises(ValueError, match="agent script"):
        SimConfig(agent_scripts={"k": {"words": ["a"]}})
    with pytest.raises(ValueError, match="reasoning_field"):
        SimConfig(reasoning_field="thoughts")


# -- the JSON path and the cache fold the same way -----------------------------------------------

def test_fold_keeps_tool_calls_and_the_reasoning_field_name() -> None:
    chunks = sim_chunks(f"x {MARKER}", SimConfig(reasoning_field="both"), tools=TOOLS)
    message = fold(chunks)["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == "The user wants a careful"  # not doubled
    assert message["tool_calls"][0]["function"]["arguments"] == tool_arguments(9000, 0)
    assert chunks_to_completion(chunks, None)["choices"] == fold(chunks)["choices"]  # one fold


def test_cache_replay_converters_keep_tool_calls_and_reasoning() -> None:
    completion = fold(sim_chunks(f"x {MARKER}", tools=TOOLS)) | {"usage": {"completion_tokens": 3}}
    chunks = completion_to_chunks(completion, include_usage=False)
    assert chunks_to_completion(chunks, completion["usage"])["choices"] == completion["choices"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[-1] == "tool_calls" and not any(finishes[:-1])


def test_tool_call_answers_are_never_stored() -> None:
    chunks = sim_chunks(f"x {MARKER}", tools=TOOLS)
    assert not is_complete(CachedAnswer("hit", chunks, None))
    assert not is_complete(CachedAnswer("hit", None, fold(chunks)))
    reasoning_only = sim_chunks("x [sim reasoning=4]")
    assert is_complete(CachedAnswer("hit", reasoning_only, None))


# -- word policies in tool-call arguments ----------------------------------------------------------

DOC = {"path": "a.md", "text": "that is bullshit, \"quoted\"\n洗钱 and more", "n": [1, -2.5e3, True, None]}


def stream_json(matcher: Matcher, raw: str, size: int) -> tuple[str, int]:
    scanner, out, held = JsonScanner(matcher), [], 0
    for i in range(0, len(raw), size):
        out.append(scanner.feed(raw[i : i + size]))
        held = max(held, scanner.held)
    return "".join(out) + scanner.flush(), held


@pytest.mark.parametrize("ascii", [False, True])
@pytest.mark.parametrize("size", [1, 2, 5, 13, 1000])
def test_masked_arguments_stay_valid_json_whatever_the_split(matcher: Matcher, ascii: bool, size: int) -> None:
    raw = json.dumps(DOC, ensure_ascii=ascii).replace("shit", "\\u0073hit")  # an escape inside the word
    out, held = stream_json(matcher, raw, size)
    assert json.loads(out) == {**DOC, "text": "that is ********, \"quoted\"\n** and more"}
    assert len(out) <= len(raw) and held <= matcher.hold_bound + 12
    whole, hits = scan_completion(matcher, completion_with_call(raw), mask=True)
    assert whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == out  # one rule
    assert len(hits) == 2


def completion_with_call(raw: str) -> dict[str, Any]:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": raw}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    return {"choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]}


def test_clean_arguments_pass_byte_for_byte(matcher: Matcher) -> None:
    raw = tool_arguments(9000, 0, ascii=True) + " "
    out, held = stream_json(matcher, raw, 7)
    assert out == raw and held <= matcher.hold_bound + 12
    parts = split_document(raw)
    assert parts is not None and join_document(parts) == raw


def test_a_word_split_across_many_argument_chunks_is_masked(matcher: Matcher) -> None:
    raw = '{"note": "well, ' + "x" * 9000 + ' double your bitcoin today"}'
    pieces = [raw[i : i + 3] for i in range(0, len(raw), 3)]
    out, f = filtered(matcher, [tool_chunk(p) for p in pieces] + [tool_chunk("", finish="tool_calls")])
    args = arguments(out)
    assert json.loads(args)["note"].endswith(" ******************* today") and f.hits == 1
    assert [c["choices"][0]["finish_reason"] for c in out][-1] == "tool_calls"


def test_words_do_not_join_across_json_strings(matcher: Matcher) -> None:
    raw = '{"a": "bull", "b": "shit is ok"}'
    out, _ = stream_json(matcher, raw, 1)
    assert json.loads(out) == {"a": "bull", "b": "**** is ok"}


def test_arguments_that_are_not_json_are_scanned_as_text(matcher: Matcher) -> None:
    out, _ = stream_json(matcher, "{call: bullshit now}", 2)
    assert out == "{call: ******** now}"


def test_block_stops_inside_the_arguments(matcher: Matcher) -> None:
    pieces = ['{"q": "ok ', "bull", "shit", ' more"}']
    out, f = filtered(matcher, [tool_chunk(p) for p in pieces], "block")
    assert f.blocked and arguments(out) == '{"q": "ok '


# -- word policies in reasoning text ----------------------------------------------------------------

def reasoning_chunk(finish: str | None = None, **delta: str) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


@pytest.mark.parametrize("names", [("reasoning",), ("reasoning_content",), ("reasoning", "reasoning_content")])
def test_reasoning_is_scanned_under_either_name(matcher: Matcher, names: tuple[str, ...]) -> None:
    pieces = ["I think bull", "sh", "it, so"]
    chunks = [reasoning_chunk(**dict.fromkeys(names, p)) for p in pieces]
    out, _ = filtered(matcher, [*chunks, reasoning_chunk("stop", content="done")])
    for name in names:
        text = "".join(c["choices"][0]["delta"].get(name) or "" for c in out)
        assert text == "I think ********, so"
    assert out[-1]["choices"][0]["finish_reason"] == "stop"


def test_request_reasoning_and_prior_tool_calls_are_scanned(matcher: Matcher) -> None:
    raw = '{"text":\n  "pay by double your bitcoin",  "n": 1}'
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": raw}}
    body = {"messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "reasoning": "fuck it", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "洗钱 done"},
    ]}
    masked, hits = scan_request(matcher, body, mask=True)
    assert sorted(h.where for h in hits) == [
        "messages[1].reasoning", "messages[1].tool_calls[0].function.arguments", "messages[2].content",
    ]
    args = masked["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert args == '{"text":\n  "pay by *******************",  "n": 1}'  # formatting kept
    assert masked["messages"][1]["reasoning"] == "**** it"


def test_completion_reasoning_is_scanned(matcher: Matcher) -> None:
    message = {"role": "assistant", "content": "ok", "reasoning": "shit happens"}
    completion = {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    masked, hits = scan_completion(matcher, completion, mask=True)
    assert [h.where for h in hits] == ["choices[0].message.reasoning"]
    assert masked["choices"][0]["message"]["reasoning"] == "**** happens"


def test_a_history_with_reasoning_under_either_name_is_accepted() -> None:
    """A client sends back the assistant turn it was given: current vLLM names its reasoning
    `reasoning`, older vLLM `reasoning_content`."""
    from proxy.protocol import parse_chat_request

    for field in ("reasoning", "reasoning_content"):
        body = {
            "model": "m",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello", field: "the user greets me"},
                {"role": "user", "content": "again"},
            ],
        }
        req = parse_chat_request(orjson.dumps(body))
        assert req.upstream_body()["messages"][1][field] == "the user greets me"
