"""The Anthropic Messages translator (proxy/apis/messages.py): requests into the internal chat form,
answers and streams out, checked against the anthropic SDK's own types and stream accumulator."""

from __future__ import annotations

from typing import Any

import anthropic
import orjson
import pytest
from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter
from starlette.datastructures import Headers

from proxy import errors
from proxy.apis.base import Parsed
from proxy.apis.messages import MessagesApi, count_input_tokens

API = MessagesApi()
EVENT = TypeAdapter(RawMessageStreamEvent)
BASE = {"model": "assistant", "max_tokens": 64}


def _parse(**fields: Any) -> Parsed:
    return API.parse(orjson.dumps({**BASE, **fields}))


def _chat(**fields: Any) -> dict[str, Any]:
    return _parse(**fields).chat.upstream_body()


# -- requests --------------------------------------------------------------------------------------
def test_a_plain_request_keeps_only_what_the_client_set() -> None:
    body = _chat(messages=[{"role": "user", "content": "hi"}])
    assert body == {"model": "assistant", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        ("Be brief.", "Be brief."),
        ([{"type": "text", "text": "One.", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "Two."}],
         "One.\n\nTwo."),
    ],
    ids=["string", "blocks"],
)
def test_system_becomes_the_first_message(system: Any, expected: str) -> None:
    body = _chat(system=system, messages=[{"role": "user", "content": "hi"}])
    assert body["messages"][0] == {"role": "system", "content": expected}


def test_a_tool_round_trip_becomes_tool_calls_and_tool_messages() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Use the tool.", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_2", "name": "time", "input": {}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "noon"}],
             "is_error": False},
            {"type": "text", "text": "Thanks."},
        ]},
    ]
    body = _chat(messages=messages)
    assert body["messages"] == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "reasoning_content": "Use the tool.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "noon"},
        {"role": "user", "content": "Thanks."},
    ]


def test_an_assistant_turn_of_tool_use_only_has_no_content() -> None:
    messages = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
    ]
    body = _chat(messages=messages)
    assert "content" not in body["messages"][1]
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "t", "content": ""}


def test_images_become_image_url_parts() -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    url = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
    body = _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "What is it?"}, image, url]}])
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "What is it?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        ({"type": "tool", "name": "weather", "disable_parallel_tool_use": True},
         {"tool_choice": {"type": "function", "function": {"name": "weather"}}, "parallel_tool_calls": False}),
    ],
)
def test_tools_and_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    tool = {"name": "weather", "description": "Today's weather", "input_schema": {"type": "object"},
            "cache_control": {"type": "ephemeral"}}
    body = _chat(messages=[{"role": "user", "content": "hi"}], tools=[tool], tool_choice=choice)
    assert body["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "Today's weather", "parameters": {"type": "object"}}}]
    assert {k: body[k] for k in expected} == expected


def test_sampling_stop_sequences_metadata_and_dropped_fields() -> None:
    parsed = _parse(
        messages=[{"role": "user", "content": "hi"}], temperature=0, top_p=0.9, top_k=40, stream=True,
        stop_sequences=["END"], metadata={"user_id": "u-1"}, thinking={"type": "enabled", "budget_tokens": 1024},
        service_tier="auto", cache_control={"type": "ephemeral"}, max_tokens=2048,
    )
    body = parsed.chat.upstream_body()
    assert {k: body[k] for k in ("temperature", "top_p", "top_k", "stream", "stop")} == {
        "temperature": 0, "top_p": 0.9, "top_k": 40, "stream": True, "stop": ["END"]}
    assert parsed.chat.user == "u-1" and "user" not in body  # kept for routing, never forwarded
    assert not {"thinking", "service_tier", "cache_control", "metadata"} & body.keys()
    assert parsed.native == ("END",)


def test_count_tokens_bodies_need_no_max_tokens() -> None:
    parsed = API.parse_count(orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
    assert parsed.chat.max_tokens is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "max_tokens: Field required"),
        ({**BASE, "messages": []}, "messages: List should have at least 1 item after validation, not 0"),
        ({**BASE, "messages": [{"role": "user", "content": "hi"}], "api_base": "x"},
         "api_base: Extra inputs are not permitted"),
        ({**BASE, "messages": [{"role": "user", "content": "hi"}], "temperature": 1.5},
         "temperature: Input should be less than or equal to 1"),
        ({**BASE, "messages": [{"role": "system", "content": "hi"}]},
         "messages.0.role: Input should be 'user' or 'assistant'"),
        ({**BASE, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
         "messages.0.content.0.text.text: Field required"),
        ({**BASE, "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                              "input": {}}]}]},
         "messages.0: `tool_use` blocks are not allowed in `user` messages"),
        ({**BASE, "messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]},
         "messages.0: `tool_result` blocks are not allowed in `assistant` messages"),
        ({**BASE, "messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "tool"}},
         "tool_choice: `name` is required for tool_choice of type `tool`, and only for it"),
        ({**BASE, "messages": [{"role": "user", "content": "hi"}], "tools": [{"name": "bad name!",
                                                                            "input_schema": {}}]},
         "tools.0.name: String should match pattern '^[a-zA-Z0-9_-]{1,64}$'"),
        ({**BASE, "messages": [{"role": "user", "content": "hi"}], "thinking": {"type": "enabled",
                                                                               "budget_tokens": 2048}},
         "`max_tokens` must be greater than `thinking.budget_tokens`"),
        ({**BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "64"},
         "max_tokens: Input should be a valid integer"),
    ],
)
def test_invalid_requests_are_refused_in_anthropic_words(body: dict[str, Any], message: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        API.parse(orjson.dumps(body))
    assert info.value.message == message
    assert orjson.loads(API.error_body(info.value)) == {
        "type": "error", "error": {"type": "invalid_request_error", "message": message}}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"model": "a", "model": "b"}', "The JSON body has a duplicate key."),
        (b"{not json", "We could not parse the JSON body of your request. The body must be valid JSON."),
        (b"[1]", "The request body must be a JSON object."),
    ],
)
def test_bodies_that_are_not_one_json_object(raw: bytes, message: str) -> None:
    with pytest.raises(errors.InvalidRequest, match=message):
        API.parse(raw)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-api-key": "tok"}, ["Bearer tok"]),
        ({"authorization": "Bearer tok"}, ["Bearer tok"]),
        ({"x-api-key": "tok", "authorization": "Bearer tok"}, ["Bearer tok"]),
        ({"x-api-key": "one", "authorization": "Bearer two"}, ["Bearer one", "Bearer two"]),  # refused later
        ({"anthropic-version": "2023-06-01"}, []),
    ],
)
def test_credentials_from_x_api_key_or_authorization(headers: dict[str, str], expected: list[str]) -> None:
    assert API.credentials(Headers(headers)) == expected


# -- answers ---------------------------------------------------------------------------------------
def _completion(message: dict[str, Any], finish: str | None, **choice: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "assistant",
        "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish, **choice}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }


def test_a_completion_renders_as_a_message_the_sdk_reads() -> None:
    completion = _completion({
        "content": "Let me check.", "reasoning_content": "Tool time.",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "weather",
                                                                         "arguments": '{"city": "Paris"}'}}],
    }, "tool_calls")
    rendered = API.render(completion, _parse(messages=[{"role": "user", "content": "hi"}]))
    message = Message.model_validate(rendered)
    assert message.id == "chatcmpl-1" and message.model == "assistant" and message.role == "assistant"
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[2].input == {"city": "Paris"} and message.content[2].name == "weather"
    assert message.stop_reason == "tool_use" and message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 7)


@pytest.mark.parametrize(
    ("finish", "matched", "reason", "sequence"),
    [
        ("stop", None, "end_turn", None),
        ("stop", "END", "stop_sequence", "END"),
        ("stop", 2, "end_turn", None),  # vLLM's stop_reason: a stop token id
        ("length", None, "max_tokens", None),
        ("tool_calls", None, "tool_use", None),
        ("content_filter", None, "refusal", None),
    ],
)
def test_stop_reasons(finish: str, matched: Any, reason: str, sequence: str | None) -> None:
    parsed = _parse(messages=[{"role": "user", "content": "hi"}], stop_sequences=["END"])
    rendered = API.render(_completion({"content": "x"}, finish, stop_reason=matched), parsed)
    assert (rendered["stop_reason"], rendered["stop_sequence"]) == (reason, sequence)


def test_tool_arguments_that_are_not_an_object_are_kept_raw() -> None:
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": "cut sh'}}]
    rendered = API.render(_completion({"content": None, "tool_calls": calls}, "length"), _parse(
        messages=[{"role": "user", "content": "hi"}]))
    assert rendered["content"] == [{"type": "tool_use", "id": "c", "name": "f", "input": {"_raw": '{"a": "cut sh'}}]


# -- streams ---------------------------------------------------------------------------------------
def _chunk(delta: dict[str, Any], finish: str | None = None, **choice: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1, "model": "assistant",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **choice}]}


def _tool_delta(index: int, call_id: str | None, name: str | None, arguments: str) -> dict[str, Any]:
    function = {"arguments": arguments, **({"name": name} if name else {})}
    return {"tool_calls": [{"index": index, **({"id": call_id, "type": "function"} if call_id else {}),
                            "function": function}]}


def _events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """SSE frames as (event name, data): every frame is exactly `event: X\\ndata: {...}`."""
    out = []
    for frame in raw.split(b"\n\n")[:-1]:
        event, data = frame.split(b"\n")
        assert event.startswith(b"event: ") and data.startswith(b"data: ")
        out.append((event[7:].decode(), orjson.loads(data[6:])))
    assert raw.endswith(b"\n\n")
    return out


def _run(chunks: list[dict[str, Any]], usage: dict[str, Any] | None, stops: tuple[str, ...] = ()) -> list[Any]:
    renderer = API.renderer(Parsed(_parse(messages=[{"role": "user", "content": "x"}]).chat, stops))
    raw = b"".join(renderer.chunk(c) for c in chunks)
    raw += renderer.end(usage) if usage is not None else renderer.error(errors.BadGateway("upstream died"))
    return _events(raw)


def _accumulate(events: list[tuple[str, dict[str, Any]]]) -> Any:
    snapshot, bufs = None, {}
    for name, data in events:
        assert name == data["type"]
        event = EVENT.validate_python(data)  # the SDK's own models accept every event
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=bufs)
    return snapshot


def test_a_stream_of_thinking_text_and_a_tool_call_accumulates_in_the_sdk() -> None:
    arguments = '{"city": "Paris", "days": [1, 2, 3]}'
    chunks = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"reasoning_content": "Need "}), _chunk({"reasoning": "weather."}),
        _chunk({"content": "Checking"}), _chunk({"content": " now."}),
        _chunk(_tool_delta(0, "call_1", "weather", "")),
        *(_chunk(_tool_delta(0, None, None, arguments[i:i + 5])) for i in range(0, len(arguments), 5)),
        _chunk({}, "tool_calls"),
    ]
    events = _run(chunks, {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42})
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert names.count("content_block_start") == names.count("content_block_stop") == 3
    message = _accumulate(events)
    assert message.id == "chatcmpl-9" and message.model == "assistant"
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[0].thinking == "Need weather." and message.content[1].text == "Checking now."
    assert message.content[2].id == "call_1" and message.content[2].input == orjson.loads(arguments)
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 30)


def test_two_tool_calls_are_two_blocks() -> None:
    chunks = [
        _chunk(_tool_delta(0, "a", "first", '{"x": 1}')),
        _chunk(_tool_delta(1, "b", "second", '{"y"')), _chunk(_tool_delta(1, None, None, ": 2}")),
        _chunk({}, "tool_calls"),
    ]
    message = _accumulate(_run(chunks, {"prompt_tokens": 1, "completion_tokens": 2}))
    assert [(b.name, b.input) for b in message.content] == [("first", {"x": 1}), ("second", {"y": 2})]
    assert [d["index"] for n, d in _run(chunks, {}) if n == "content_block_start"] == [0, 1]


def test_a_stop_sequence_and_an_unfinished_stream() -> None:
    done = _run([_chunk({"content": "a"}, "stop", stop_reason="END")], {}, stops=("END",))
    assert done[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    cut = _run([_chunk({"content": "a"})], {})  # upstream ended without a finish_reason: no fake stop
    assert cut[-2][1]["delta"] == {"stop_reason": None, "stop_sequence": None}


def test_a_failure_after_the_first_byte_is_an_error_event_without_message_stop() -> None:
    events = _run([_chunk({"content": "partial"})], None)
    assert events[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "upstream died"}})
    assert "message_stop" not in [n for n, _ in events]


def test_an_empty_stream_still_starts_and_ends_the_message() -> None:
    events = _run([], {"prompt_tokens": 3, "completion_tokens": 0})
    assert [n for n, _ in events] == ["message_start", "message_delta", "message_stop"]
    assert _accumulate(events).content == []


# -- errors and count_tokens -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (errors.Unauthorized("no"), "authentication_error"),
        (errors.PermissionDenied("no"), "permission_error"),
        (errors.ModelNotFound("no"), "not_found_error"),
        (errors.PayloadTooLarge("no"), "request_too_large"),
        (errors.RateLimited("no", limit="requests"), "rate_limit_error"),
        (errors.ServiceUnavailable("no"), "overloaded_error"),
        (errors.GatewayTimeout("no"), "timeout_error"),
        (errors.BadGateway("no"), "api_error"),
        (errors.InternalError(), "api_error"),
        (errors.ContentFiltered("no"), "invalid_request_error"),
    ],
)
def test_error_types_follow_the_status(exc: errors.GatewayError, kind: str) -> None:
    body = orjson.loads(API.error_body(exc))
    assert body == {"type": "error", "error": {"type": kind, "message": exc.message}}
    if kind != "request_too_large":  # Anthropic's documented 413 type; the SDK picks its class by status
        assert anthropic.types.ErrorResponse.model_validate(body).error.type == kind


def test_count_input_tokens_prefers_the_backends_tokenizer() -> None:
    tool = {"name": "weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
    body = {"model": "m", "system": "Be brief.", "messages": [{"role": "user", "content": "Hello there"}]}
    plain = API.parse_count(orjson.dumps(body))
    seen: list[Any] = []
    assert count_input_tokens(plain, lambda messages: seen.append(messages) or 42) == 42
    assert seen == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]]
    estimated = count_input_tokens(plain, lambda _: None)
    assert estimated == 4 + 3 + 4 + 3  # framing + "Be brief." + framing + "Hello there"
    with_tools = count_input_tokens(API.parse_count(orjson.dumps({**body, "tools": [tool]})), lambda _: None)
    assert with_tools > estimated
