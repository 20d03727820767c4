"""The Responses translator, pure: requests into the internal chat form (allow-list, OpenAI's
wording), conversations rebuilt from stored items, JSON and SSE rendering checked against the
openai SDK's own types and its stream accumulator (over a mock transport, no network)."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import httpx2
import openai
import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from proxy import errors
from proxy.apis.base import Parsed
from proxy.apis.responses import Chain, ResponsesApi, StoredTurn
from proxy.auth.authenticator import Principal

RID = "resp_" + "ab" * 16
ALICE = Principal("alice", "acme", "default", None, MappingProxyType({}))
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


class FakeStore:
    """Records calls; `chains` maps (tenant, id) to what `chain` returns."""

    def __init__(self, chains: dict[tuple[str, str], Chain] | None = None) -> None:
        self.chains = chains or {}
        self.asked: list[tuple[str, str]] = []
        self.puts: list[tuple[str, str, StoredTurn, list[str]]] = []

    async def chain(self, tenant: str, response_id: str) -> Chain | None:
        self.asked.append((tenant, response_id))
        return self.chains.get((tenant, response_id))

    async def put(self, tenant: str, response_id: str, turn: StoredTurn, ancestors: list[str]) -> None:
        self.puts.append((tenant, response_id, turn, ancestors))

    async def get(self, tenant: str, response_id: str) -> dict[str, Any] | None:
        return None

    async def delete(self, tenant: str, response_id: str) -> bool:
        return False


def _api(store: FakeStore | None = None) -> ResponsesApi:
    fake = store or FakeStore()
    return ResponsesApi(lambda: fake, clock=lambda: 1_700_000_000.5, new_id=lambda: RID)


def _parse(body: dict[str, Any], store: FakeStore | None = None) -> Parsed:
    return _api(store).parse(orjson.dumps(body))


def _upstream(body: dict[str, Any]) -> dict[str, Any]:
    return _parse(body).chat.upstream_body()


# -- requests -> the chat form -----------------------------------------------------------------------
def test_a_string_input_with_instructions_and_parameters() -> None:
    chat = _parse({
        "model": "m", "input": "hi", "instructions": "Be brief.", "max_output_tokens": 50,
        "temperature": 0, "top_p": 0.5, "stream": True, "user": "u1",
    }).chat
    assert chat.upstream_body() == {
        "model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        "stream": True, "temperature": 0, "top_p": 0.5, "max_tokens": 50,
    }
    assert chat.user == "u1"  # the routing session, as on chat completions; never forwarded


def test_a_long_string_input_is_one_message_and_items_are_capped() -> None:
    assert _upstream({"model": "m", "input": "x" * 10_000})["messages"] == [{"role": "user", "content": "x" * 10_000}]
    with pytest.raises(errors.InvalidRequest) as caught:
        _parse({"model": "m", "input": [{"role": "user", "content": "x"}] * 4097})
    assert caught.value.param == "input"


def test_items_become_messages_tool_calls_and_tool_results() -> None:
    body = _upstream({"model": "m", "input": [
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "rain"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
    ]})
    assert body["messages"] == [
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ]},
        {"role": "tool", "content": "rain", "tool_call_id": "c1"},
        {"role": "tool", "content": "noon", "tool_call_id": "c2"},
    ]


def test_images_stay_parts_and_text_parts_are_joined() -> None:
    body = _upstream({"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "what is this"},
        {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"},
    ]}, {"role": "user", "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]}]})
    assert body["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "low"}},
        ]},
        {"role": "user", "content": "a\nb"},
    ]


def test_function_tools_tool_choice_text_format_and_reasoning_map_to_chat() -> None:
    body = _upstream({
        "model": "m", "input": "x",
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": True}],
        "tool_choice": {"type": "function", "name": "f"}, "parallel_tool_calls": False,
        "text": {"format": {"type": "json_schema", "name": "out", "schema": {"type": "object"}, "strict": True},
                 "verbosity": "low"},
        "reasoning": {"effort": "high", "summary": "auto"},
    })
    assert body["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "strict": True}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "out", "schema": {"type": "object"}, "strict": True}}
    assert body["reasoning_effort"] == "high"
    assert "verbosity" not in orjson.dumps(body).decode()


def test_fields_without_use_here_are_accepted_and_never_forwarded() -> None:
    body = _upstream({
        "model": "m", "input": "x", "include": ["reasoning.encrypted_content"], "prompt_cache_key": "k",
        "safety_identifier": "s", "service_tier": "auto", "store": False, "metadata": {"a": "b"},
        "truncation": "disabled", "background": False, "reasoning": {"effort": "none"}, "max_tool_calls": 3,
    })
    assert body == {"model": "m", "messages": [{"role": "user", "content": "x"}]}


REFUSED = [
    ("unknown field", {"model": "m", "input": "x", "api_base": "http://evil"}, "Unknown parameter: 'api_base'.", "api_base", "unknown_parameter"),
    ("unknown item field", {"model": "m", "input": [{"role": "user", "content": "x", "name": "n"}]}, "Unknown parameter: 'input[0].name'.", "input[0].name", "unknown_parameter"),
    ("missing model", {"input": "x"}, "Missing required parameter: 'model'.", "model", "missing_required_parameter"),
    ("missing input", {"model": "m"}, "Missing required parameter: 'input'.", "input", "missing_required_parameter"),
    ("a hosted tool", {"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, None, "tools", "invalid_value"),
    ("an item reference", {"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]},
     "Invalid value for 'input[0].type': 'item_reference' items are not supported.", "input[0].type", "invalid_value"),
    ("background", {"model": "m", "input": "x", "background": True}, None, "background", "invalid_value"),
    ("a bad temperature", {"model": "m", "input": "x", "temperature": 3}, None, "temperature", "invalid_value"),
    ("a conversation object", {"model": "m", "input": "x", "conversation": "conv_1"}, "Unknown parameter: 'conversation'.", "conversation", "unknown_parameter"),
    ("no message at all", {"model": "m", "input": [{"type": "reasoning", "summary": []}]}, "The input has no message for the model.", "input", None),
]


@pytest.mark.parametrize(("case", "body", "message", "param", "code"), REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_with_openai_wording(case: str, body: dict[str, Any], message: str | None, param: str, code: str | None) -> None:
    with pytest.raises(errors.InvalidRequest) as caught:
        _parse(body)
    assert caught.value.param == param and caught.value.code == code
    if message is not None:
        assert caught.value.message == message


@pytest.mark.parametrize("raw", [b"{", b"[]", b'{"model": "m", "model": "n", "input": "x"}'])
def test_bodies_that_are_not_one_json_object_are_refused(raw: bytes) -> None:
    with pytest.raises(errors.InvalidRequest):
        _api().parse(raw)


# -- conversations ------------------------------------------------------------------------------------
def _stored(response_id: str, input_items: list[dict[str, Any]], output: list[dict[str, Any]]) -> StoredTurn:
    return StoredTurn({"id": response_id, "output": output}, input_items)


async def test_resolve_rebuilds_the_conversation_from_stored_items() -> None:
    first = _stored("resp_" + "01" * 16, [{"type": "message", "role": "user", "content": "call f"}], [
        {"type": "reasoning", "id": "rs", "summary": [], "content": [{"type": "reasoning_text", "text": "hmm"}]},
        {"type": "function_call", "id": "fc", "call_id": "c1", "name": "f", "arguments": "{}", "status": "completed"},
    ])
    second = _stored("resp_" + "02" * 16, [{"type": "function_call_output", "call_id": "c1", "output": "42"}], [
        {"type": "message", "id": "m", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "It is 42.", "annotations": []}]},
    ])
    ids = ["resp_" + "01" * 16, "resp_" + "02" * 16]
    store = FakeStore({("acme", ids[1]): Chain([first, second], ids)})
    api = _api(store)
    parsed = api.parse(orjson.dumps({"model": "m", "input": "and again?", "instructions": "New rules.",
                                     "previous_response_id": ids[1]}))
    await api.resolve(parsed, ALICE)
    assert parsed.chat.upstream_body()["messages"] == [
        {"role": "system", "content": "New rules."},  # this request's instructions only, first
        {"role": "user", "content": "call f"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is 42."},
        {"role": "user", "content": "and again?"},
    ]
    assert parsed.native.chain == ids
    assert parsed.native.envelope["previous_response_id"] == ids[1]


@pytest.mark.parametrize("previous", ["resp_" + "99" * 16, "resp_not-ours", "x" * 200])
async def test_an_unknown_previous_response_is_openais_400(previous: str) -> None:
    store = FakeStore()
    api = _api(store)
    parsed = api.parse(orjson.dumps({"model": "m", "input": "x", "previous_response_id": previous}))
    with pytest.raises(errors.InvalidRequest) as caught:
        await api.resolve(parsed, ALICE)
    assert caught.value.code == "previous_response_not_found" and caught.value.param == "previous_response_id"
    assert store.asked == ([("acme", previous)] if previous.startswith("resp_9") else [])  # malformed: no lookup


async def test_a_first_turn_needs_no_store() -> None:
    store = FakeStore()
    api = _api(store)
    parsed = api.parse(orjson.dumps({"model": "m", "input": "x"}))
    await api.resolve(parsed, ALICE)
    assert store.asked == [] and parsed.native.chain == []


async def test_completed_stores_the_response_with_its_input_and_chain_unless_store_is_false() -> None:
    store = FakeStore()
    api = _api(store)
    parsed = api.parse(orjson.dumps({"model": "m", "input": "x"}))
    parsed.native.chain = ["resp_" + "01" * 16]
    result = api.render(_completion("hello"), parsed)
    kept = api.completed(parsed, ALICE, result)
    assert kept is not None
    await kept
    assert store.puts == [("acme", RID, StoredTurn(result, [{"type": "message", "role": "user", "content": "x"}]),
                           ["resp_" + "01" * 16])]
    unstored = api.parse(orjson.dumps({"model": "m", "input": "x", "store": False}))
    assert api.completed(unstored, ALICE, api.render(_completion("hello"), unstored)) is None


# -- JSON rendering ----------------------------------------------------------------------------------
def _completion(text: str | None, finish: str = "stop", **message: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, **message}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                  "prompt_tokens_details": {"cached_tokens": 4}},
    }


def test_a_completion_renders_as_a_response_object_the_sdk_validates() -> None:
    parsed = _parse({"model": "m", "input": "x", "instructions": "i", "metadata": {"k": "v"},
                     "tools": [{"type": "function", "name": "f"}]})
    out = _api().render(_completion("Hi.", reasoning_content="think"), parsed)
    response = Response.model_validate(out)
    assert response.id == RID and response.status == "completed" and response.output_text == "Hi."
    assert response.created_at == 1_700_000_000 and response.instructions == "i" and response.metadata == {"k": "v"}
    assert [o.type for o in response.output] == ["reasoning", "message"]
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (7, 3, 10)
    assert response.usage.input_tokens_details.cached_tokens == 4


def test_tool_calls_render_as_function_call_items_and_length_as_incomplete() -> None:
    parsed = _parse({"model": "m", "input": "x"})
    calls = [{"id": "call_9", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]
    called = Response.model_validate(_api().render(_completion(None, "tool_calls", tool_calls=calls), parsed))
    assert [(o.type, o.call_id, o.name, o.arguments) for o in called.output] == [("function_call", "call_9", "f", '{"a":1}')]
    cut = Response.model_validate(_api().render(_completion("Hal", "length"), parsed))
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"


# -- SSE rendering -------------------------------------------------------------------------------------
def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for frame in raw.decode().split("\n\n"):
        if frame:
            kind, data = frame.split("\n")
            event = orjson.loads(data.removeprefix("data: "))
            assert kind == f"event: {event['type']}"
            EVENTS.validate_python(event)  # every event is one of the SDK's typed events
            out.append(event)
    return out


TOOL_STREAM = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"reasoning_content": "Let me "}), _chunk({"reasoning_content": "think."}),
    _chunk({"content": "Sure, "}), _chunk({"content": "calling."}),
    _chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": " 1}"}}]}),
    _chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}),
    _chunk({}, "tool_calls"),
]
USAGE = {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}


def _render_stream(chunks: list[dict[str, Any]], body: dict[str, Any] | None = None) -> tuple[bytes, Any]:
    renderer = _api().renderer(_parse(body or {"model": "m", "input": "x", "stream": True}))
    raw = b"".join(renderer.chunk(c) for c in chunks) + renderer.end(USAGE)
    return raw, renderer


def test_a_stream_is_the_typed_event_sequence_in_order() -> None:
    raw, renderer = _render_stream(TOOL_STREAM)
    events = _events(raw)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    final = Response.model_validate(events[-1]["response"])
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call", "function_call"]
    assert final.output[2].arguments == '{"x": 1}' and final.output[3].call_id == "call_b"
    assert final.usage is not None and final.usage.output_tokens == 9
    assert renderer.result() == events[-1]["response"]


def _sdk_stream(raw: bytes) -> tuple[list[Any], Any]:
    """The openai SDK's `responses.stream` folding these bytes (a mock transport, no network)."""
    transport = httpx2.MockTransport(
        lambda _request: httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=raw)
    )
    with openai.OpenAI(api_key="k", base_url="http://gw/v1", http_client=httpx2.Client(transport=transport)) as client:
        with client.responses.stream(model="m", input="x") as stream:
            events = list(stream)
            return events, stream.get_final_response()


def test_the_sdk_folds_the_stream_into_the_same_response() -> None:
    raw, renderer = _render_stream(TOOL_STREAM)
    events, final = _sdk_stream(raw)
    assert final.id == RID and final.output_text == "Sure, calling."
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call", "function_call"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["Sure, ", "calling."]
    assert final.model_dump(exclude_none=True) == Response.model_validate(renderer.result()).model_dump(exclude_none=True)


def test_a_stream_cut_by_max_output_tokens_ends_incomplete() -> None:
    raw, renderer = _render_stream([_chunk({"content": "Hal"}, "length")])
    events = _events(raw)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"
    assert renderer.result()["status"] == "incomplete"


@pytest.mark.parametrize(
    ("failure", "last"),
    [(errors.BadGateway("The model server failed while streaming."), "response.failed"),
     (errors.ContentFiltered("The answer was blocked by the content policy."), "response.incomplete")],
    ids=["backend", "content filter"],
)
def test_a_failure_after_the_first_byte_closes_the_item_and_ends_with_an_error_event(
    failure: errors.GatewayError, last: str
) -> None:
    renderer = _api().renderer(_parse({"model": "m", "input": "x", "stream": True}))
    raw = renderer.chunk(_chunk({"content": "Hel"})) + renderer.error(failure)
    events = _events(raw)
    assert [e["type"] for e in events[-5:]] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "error", last,
    ]
    assert events[-3]["item"]["status"] == "incomplete"
    assert events[-2]["message"] == failure.message and events[-2]["code"] == failure.code
    ended = events[-1]["response"]
    assert ended["output"][0]["content"][0]["text"] == "Hel"
    if last == "response.failed":
        assert ended["status"] == "failed" and ended["error"]["code"] == "server_error"
    else:
        assert ended["incomplete_details"] == {"reason": "content_filter"}
    assert not any(e["type"] == "response.completed" for e in events) and renderer.result() is None


def test_a_stream_without_any_content_still_opens_and_completes() -> None:
    raw, _ = _render_stream([])
    assert [e["type"] for e in _events(raw)] == ["response.created", "response.in_progress", "response.completed"]
