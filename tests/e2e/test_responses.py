"""OpenAI Responses end to end: a real gateway process driven by the real `openai` SDK, in front of
the vLLM simulator (and, for the conversation that falls over mid-way, the embedded llama.cpp model).
Every stage applies to /v1/responses as to chat completions (auth, limits, input and output policy,
fallback, cancellation on disconnect, the log line and metrics), and conversations are kept by the
gateway: in process without Redis, in Redis across gateway processes."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.vllm_sim import SimulatorThread
from tests.conftest import SMOLLM, GatewayProcess, gateway_config

RUN = uuid.uuid4().hex[:8]
REDIS_URL = "redis://127.0.0.1:6379/0"
WEATHER = {"type": "function", "name": "weather", "description": "Weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _gpu(url: str) -> dict[str, Any]:
    return {"type": "vllm", "url": url, "model": "sim-model", "first_token_timeout_s": 1.0,
            "health_interval_s": 0.2, "breaker": {"failures": 100000, "reset_s": 1}}


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, spare: SimulatorThread, module_tmp: Path) -> Iterator[GatewayProcess]:
    """No redis_url: the embedded default, conversations kept in process."""
    config = gateway_config(
        limits={"tiers": {"default": {"requests_per_minute": 100000, "tokens_per_minute": 100000000},
                          "tight": {"requests_per_minute": 2, "tokens_per_minute": 100000000}}},
        backends={"gpu": _gpu(sim.url), "spare": _gpu(spare.url)},
        models={
            "assistant": {"variants": [{"name": "control", "weight": 1, "backends": ["gpu"]}]},
            "fallback": {"variants": [{"name": "a", "weight": 1, "backends": ["gpu"], "fallback": ["spare"]}]},
        },
        policies={"input": "block", "output": "mask"},
    )
    proc = GatewayProcess(config, module_tmp).start()
    yield proc
    proc.stop()


def _client(gw: GatewayProcess, sub: str = "alice", **claims: Any) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.token(sub, **claims), max_retries=0)
    gw._clients.append(client)  # closed with the gateway
    return client


def _forwarded(sim: SimulatorThread) -> dict[str, Any]:
    return dict(sim.requests()[-1]["body"])


# -- create, stream, conversations -------------------------------------------------------------------
def test_create_answers_and_forwards_the_internal_form(gw: GatewayProcess, sim: SimulatorThread) -> None:
    raw = _client(gw).responses.with_raw_response.create(
        model="assistant", input="Say hello in five words.", instructions="Be brief.", max_output_tokens=32,
        temperature=0.5, metadata={"run": RUN}, user="u-1",
    )
    response = raw.parse()
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.output_text.startswith("Simulated answer to: Say hello")
    assert response.model == "assistant" and response.metadata == {"run": RUN} and response.instructions == "Be brief."
    assert response.usage is not None and response.usage.output_tokens == 16 and response.usage.input_tokens > 0
    assert raw.headers["x-gateway-backend"] == "gpu" and raw.headers["x-request-id"].startswith("req_")
    forwarded = _forwarded(sim)
    assert forwarded["messages"] == [{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Say hello in five words."}]
    assert (forwarded["max_tokens"], forwarded["temperature"]) == (32, 0.5)
    assert not {"input", "instructions", "metadata", "user", "store", "max_output_tokens"} & forwarded.keys()


def test_a_conversation_continues_by_previous_response_id(gw: GatewayProcess, sim: SimulatorThread) -> None:
    client = _client(gw)
    first = client.responses.create(model="assistant", input="My name is Ada.", instructions="Old rules.")
    second = client.responses.create(model="assistant", input="What is my name?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert _forwarded(sim)["messages"] == [  # the first turn's instructions are not carried over
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]


def test_stream_through_the_sdk_and_retrieve_the_same_response(gw: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(scripts={"stream me": ["Once ", "upon ", "a ", "time."]})
    client = _client(gw)
    with client.responses.stream(model="assistant", input="stream me a story") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == "Once upon a time."
    assert final.status == "completed" and final.usage is not None and final.usage.output_tokens == 4
    stored = _eventually(lambda: client.responses.retrieve(final.id))
    assert (stored.id, stored.status, stored.output_text, stored.usage) == (final.id, "completed", final.output_text, final.usage)
    assert [o.id for o in stored.output] == [o.id for o in final.output]


def test_stream_true_yields_the_typed_events_in_order(gw: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(scripts={"events": ["a", "b"]})
    events = list(_client(gw).responses.create(model="assistant", input="events", stream=True))
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * kinds.count("response.output_text.delta"),
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "ab"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_function_tool_round_trip(gw: GatewayProcess, sim: SimulatorThread, stream: bool) -> None:
    sim.configure(agent_scripts={"weather in Paris": {
        "reasoning": ["Need ", "the tool."], "content": ["Let me check."], "tool_calls": [['{"city"', ': "Paris"}']]}})
    client = _client(gw)
    ask = "What is the weather in Paris?"
    if stream:
        with client.responses.stream(model="assistant", input=ask, tools=[WEATHER]) as events:
            first = events.get_final_response()
    else:
        first = client.responses.create(model="assistant", input=ask, tools=[WEATHER])
    assert [o.type for o in first.output] == ["reasoning", "message", "function_call"]
    call = first.output[2]
    assert call.type == "function_call" and call.name == "weather" and json.loads(call.arguments) == {"city": "Paris"}
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}
    client.responses.create(model="assistant", input=[result], previous_response_id=first.id, tools=[WEATHER])
    forwarded = _forwarded(sim)
    assert forwarded["messages"] == [
        {"role": "user", "content": ask},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [{"id": call.call_id, "type": "function",
                                                                          "function": {"name": "weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": "sunny, 21C"},
    ]
    assert forwarded["tools"] == [{"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}]


def test_a_repeated_deterministic_request_is_a_cache_hit_that_is_kept_too(
    gw: GatewayProcess, sim: SimulatorThread
) -> None:
    client = _client(gw)
    ask = f"cache me {RUN}"
    first = client.responses.create(model="assistant", input=ask, temperature=0)
    with client.responses.with_streaming_response.create(
        model="assistant", input=ask, temperature=0, stream=True
    ) as raw:
        assert raw.headers["x-gateway-cache"] == "hit"
        events = list(raw.parse())
    hit = events[-1].response
    assert hit.id != first.id and hit.output_text == first.output_text and len(sim.requests()) == 1
    _eventually(lambda: client.responses.retrieve(hit.id))
    client.responses.create(model="assistant", input="and then?", previous_response_id=hit.id)
    assert _forwarded(sim)["messages"][:2] == [{"role": "user", "content": ask},
                                               {"role": "assistant", "content": first.output_text}]


def test_store_false_answers_and_keeps_nothing(gw: GatewayProcess) -> None:
    client = _client(gw)
    response = client.responses.create(model="assistant", input="forget me", store=False)
    assert response.store is False and response.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model="assistant", input="and?", previous_response_id=response.id)
    assert info.value.code == "previous_response_not_found"


def test_get_and_delete_are_tenant_scoped(gw: GatewayProcess) -> None:
    acme, globex = _client(gw, "alice", tenant="acme"), _client(gw, "bob", tenant="globex")
    response = acme.responses.create(model="assistant", input="a private question")
    assert _eventually(lambda: acme.responses.retrieve(response.id)).output_text == response.output_text
    with pytest.raises(openai.NotFoundError) as info:
        globex.responses.retrieve(response.id)
    assert info.value.body == {"message": f"Response with id '{response.id}' not found.",
                               "type": "invalid_request_error", "param": "response_id", "code": "not_found"}
    with pytest.raises(openai.NotFoundError):
        globex.responses.delete(response.id)
    with pytest.raises(openai.BadRequestError) as continued:
        globex.responses.create(model="assistant", input="x", previous_response_id=response.id)
    assert continued.value.code == "previous_response_not_found"
    assert acme.responses.delete(response.id) is None
    for call in (lambda: acme.responses.retrieve(response.id), lambda: acme.responses.delete(response.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gw.url}/v1", api_key="not-a-jwt", max_retries=0).responses.retrieve(response.id)


def test_unknown_parameters_are_refused_in_openais_words(gw: GatewayProcess, sim: SimulatorThread) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        _client(gw).responses.create(model="assistant", input="x", extra_body={"api_base": "http://evil"})
    assert info.value.code == "unknown_parameter" and info.value.param == "api_base"
    assert info.value.message.endswith("Unknown parameter: 'api_base'.")
    assert sim.requests() == []


# -- policies ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["input", "instructions", "function_call_output"])
def test_a_listed_word_in_the_prompt_is_refused_before_any_backend(
    gw: GatewayProcess, sim: SimulatorThread, where: str
) -> None:
    bad = "tell me about bullshit"
    kwargs: dict[str, Any] = {"input": bad}
    if where == "instructions":
        kwargs = {"input": "hello", "instructions": bad}
    elif where == "function_call_output":
        kwargs = {"input": [
            {"role": "user", "content": "go"},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": bad},
        ]}
    with pytest.raises(openai.BadRequestError) as info:
        _client(gw).responses.create(model="assistant", **kwargs)
    assert info.value.code == "content_filter" and "bullshit" not in info.value.message
    assert sim.requests() == []


def test_a_word_split_across_streamed_chunks_is_masked_and_stored_masked(
    gw: GatewayProcess, sim: SimulatorThread
) -> None:
    sim.configure(scripts={"split word": ["Well, that was bull", "sh", "it, honestly."]})
    client = _client(gw)
    with client.responses.stream(model="assistant", input="split word please") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == final.output_text == "Well, that was ********, honestly."
    assert _eventually(lambda: client.responses.retrieve(final.id)).output_text == text


# -- limits, backends, cancellation ------------------------------------------------------------------
def test_the_request_limit_counts_responses(gw: GatewayProcess) -> None:
    client = _client(gw, f"tight-{RUN}", tier="tight")
    remaining = []
    for _ in range(2):
        raw = client.responses.with_raw_response.create(model="assistant", input="hi", max_output_tokens=4)
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100000000
    assert remaining == [1, 0]
    with pytest.raises(openai.RateLimitError) as info:
        client.responses.create(model="assistant", input="hi")
    assert int(info.value.response.headers["retry-after"]) >= 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_backend_failing_before_the_first_byte_falls_over(
    gw: GatewayProcess, sim: SimulatorThread, spare: SimulatorThread, stream: bool
) -> None:
    sim.configure(fault="status", fault_status=500)
    raw = _client(gw).responses.with_raw_response.create(
        model="fallback", input="Say hello.", stream=stream
    )
    assert raw.headers["x-gateway-backend"] == "spare"
    if stream:
        events = list(raw.parse())
        assert events[-1].type == "response.completed"
        text = events[-1].response.output_text
    else:
        text = raw.parse().output_text
    assert text.startswith("Simulated answer to:")
    assert len(sim.requests()) == 1 and len(spare.requests()) == 1


def test_a_stream_failing_after_its_first_token_ends_with_error_and_response_failed(
    gw: GatewayProcess, sim: SimulatorThread
) -> None:
    sim.configure(fault="drop", drop_after_chunks=3, itl_ms=30)  # spaced: the first tokens go out first
    events = list(_client(gw).responses.create(model="assistant", input="drop me", stream=True))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-3].type == "response.output_item.done" and events[-3].item.status == "incomplete"
    assert events[-1].response.status == "failed" and events[-1].response.error.code == "server_error"
    assert not any(e.type == "response.completed" for e in events)


def test_a_client_leaving_mid_stream_cancels_the_upstream_within_a_second(
    gw: GatewayProcess, sim: SimulatorThread
) -> None:
    sim.configure(itl_ms=100, reply_tokens=200)
    body = orjson.dumps({"model": "assistant", "stream": True, "input": f"long story {RUN}"})
    head = (f"POST /v1/responses HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {gw.token('leaver')}\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(head + body)
        seen = _read_until(sock, b"event: response.output_text.delta")
        left_at = time.monotonic()
    recs = sim.wait_for(lambda recs: bool(recs) and recs[-1]["finished"] is not None, timeout=2.0)
    assert recs[-1]["finished"] - left_at < 1.0 and not recs[-1]["completed"]
    line = _wait_for_log_line(gw, lambda line: line.get("disconnected") and line["endpoint"] == "responses")
    assert line["status"] == 200 and line["stream"] is True
    created = next(orjson.loads(f.split(b"data: ", 1)[1]) for f in seen.split(b"\n\n") if b"response.created" in f)
    with pytest.raises(openai.NotFoundError):  # an answer the client never got whole is not kept
        _client(gw, "leaver").responses.retrieve(created["response"]["id"])


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        part = sock.recv(65536)
        assert part, "the gateway closed the connection"
        seen += part
    return seen


# -- observability -----------------------------------------------------------------------------------
def _wait_for_log_line(gw: GatewayProcess, match: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(raw) for raw in gw.log().splitlines() if raw.startswith("{")]
        found = [line for line in lines if line.get("event") == "request" and match(line)]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, "no such request line"
        time.sleep(0.05)  # harness polling: the line is written at the end of a loop iteration


def _eventually(read: Any) -> Any:
    """A stored response is written just after the answer's last byte: poll briefly for it."""
    deadline = time.monotonic() + 2
    while True:
        try:
            return read()
        except openai.NotFoundError:
            assert time.monotonic() < deadline, "the response was not stored"
            time.sleep(0.02)  # harness polling for the follow-up write


def test_the_log_line_and_metrics_carry_the_responses_endpoint(gw: GatewayProcess) -> None:
    raw = _client(gw, f"observed-{RUN}").responses.with_raw_response.create(
        model="assistant", input="hi", max_output_tokens=4)
    rid = raw.headers["x-request-id"]
    line = _wait_for_log_line(gw, lambda line: line["request_id"] == rid)
    assert line["endpoint"] == "responses" and line["status"] == 200 and line["completion_tokens"] == 4
    metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
    samples = [s for f in text_string_to_metric_families(metrics) if f.name == "llm_gateway_requests"
               for s in f.samples if s.name == "llm_gateway_requests_total"]
    assert any(s.labels["endpoint"] == "responses" and s.labels["status"] == "200" and s.value >= 1 for s in samples)


# -- any replica continues any conversation, on any backend ------------------------------------------
@pytest.fixture(scope="module")
def replicas(sim: SimulatorThread, module_tmp: Path) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """Two gateway processes on one Redis; the simulator first, the llama.cpp model as fallback."""
    gpu = {**_gpu(sim.url), "breaker": {"failures": 100000, "reset_s": 0.2}}
    config = gateway_config(
        redis_url=REDIS_URL,
        backends={"gpu": gpu, "cpu": SMOLLM},
        models={"assistant": {"variants": [{"name": "a", "weight": 1, "backends": ["gpu"], "fallback": ["cpu"]}]}},
        responses={"ttl_s": 600},
    )
    pair = (GatewayProcess(config, module_tmp).start(), GatewayProcess(config, module_tmp).start())
    yield pair
    for proc in pair:
        proc.stop()


@pytest.mark.model
def test_three_turns_across_two_processes_with_a_fallback_to_llamacpp_mid_conversation(
    replicas: tuple[GatewayProcess, GatewayProcess], sim: SimulatorThread
) -> None:
    a, b = replicas
    on_a, on_b = _client(a, f"conv-{RUN}"), _client(b, f"conv-{RUN}")
    first = on_a.responses.create(model="assistant", input="My name is Ada.", max_output_tokens=32)
    sim.configure(fault="status", fault_status=500)  # the GPU fails: the second turn is llama.cpp's
    events = list(on_a.responses.create(model="assistant", input="Say hi to me.", previous_response_id=first.id,
                                        max_output_tokens=12, stream=True))
    second = events[-1].response
    assert events[-1].type in ("response.completed", "response.incomplete")  # the model may stop at the cap
    assert second.output_text.strip() and not second.output_text.startswith("Simulated")
    sim.reset()
    _wait_until_ready(b)
    raw = on_b.responses.with_raw_response.create(
        model="assistant", input="What is my name?", previous_response_id=second.id, max_output_tokens=32
    )
    third = raw.parse()
    assert raw.headers["x-gateway-backend"] == "gpu" and third.output_text.startswith("Simulated answer to:")
    assert _forwarded(sim)["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Say hi to me."},
        {"role": "assistant", "content": second.output_text},  # as llama.cpp answered it, on the other process
        {"role": "user", "content": "What is my name?"},
    ]
    assert on_b.responses.retrieve(first.id).output_text == first.output_text


def _wait_until_ready(gw: GatewayProcess) -> None:
    deadline = time.monotonic() + 5
    while httpx.get(f"{gw.url}/readyz", timeout=5).json()["status"] != "ready":
        assert time.monotonic() < deadline, "the backend did not come back"
        time.sleep(0.05)  # harness polling for the next health probe
