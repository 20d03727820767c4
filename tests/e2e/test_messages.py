"""Anthropic Messages end to end: a real gateway process driven by the real `anthropic` SDK, in front
of the vLLM simulator (and, for a few cases, the embedded llama.cpp model). Every stage applies to
/v1/messages as to chat completions: auth, limits, input and output policy, fallback, cancellation
on disconnect, the cache, the log line and metrics."""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.sim_agent import tool_arguments
from loadtest.vllm_sim import SimulatorThread
from tests.conftest import SMOLLM, GatewayProcess, gateway_config

RUN = uuid.uuid4().hex[:8]
USER = [{"role": "user", "content": "Say hello in five words."}]
WEATHER = {"name": "weather", "description": "Weather now", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _gpu(url: str) -> dict[str, Any]:
    return {"type": "vllm", "url": url, "model": "sim-model", "first_token_timeout_s": 1.0,
            "health_interval_s": 0.2, "breaker": {"failures": 100000, "reset_s": 1}}


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, spare: SimulatorThread, module_tmp: Path) -> Iterator[GatewayProcess]:
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


def _client(gw: GatewayProcess, sub: str = "alice", **kw: Any) -> anthropic.Anthropic:
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.token(sub, **kw), max_retries=0)
    gw._clients.append(client)  # closed with the gateway
    return client


# -- create and stream -----------------------------------------------------------------------------
def test_create_answers_a_message_and_forwards_the_internal_form(gw: GatewayProcess, sim: SimulatorThread) -> None:
    raw = _client(gw).messages.with_raw_response.create(
        model="assistant", max_tokens=32, system="Be brief.", messages=USER,
        metadata={"user_id": "u-1"}, stop_sequences=["THE END"], extra_body={"top_k": 20},
    )
    message = raw.parse()
    assert message.type == "message" and message.role == "assistant" and message.model == "assistant"
    assert message.content[0].type == "text" and message.content[0].text.startswith("Simulated answer to: Say")
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 16
    assert raw.headers["x-gateway-backend"] == "gpu" and raw.headers["x-request-id"].startswith("req_")
    forwarded = sim.requests()[-1]["body"]
    assert forwarded["messages"] == [{"role": "system", "content": "Be brief."}, *USER]
    assert (forwarded["max_tokens"], forwarded["top_k"], forwarded["stop"]) == (32, 20, ["THE END"])
    assert not {"system", "metadata", "stop_sequences", "user"} & forwarded.keys()


def test_x_api_key_and_anthropic_headers_are_accepted_and_not_forwarded(
    gw: GatewayProcess, sim: SimulatorThread
) -> None:
    client = anthropic.Anthropic(
        base_url=gw.url, api_key=None, max_retries=0,
        default_headers={"x-api-key": gw.token("keyed"), "anthropic-beta": "tools-2024-04-04"},
    )
    gw._clients.append(client)
    message = client.messages.create(model="assistant", max_tokens=8, messages=USER)
    assert message.stop_reason == "max_tokens"  # 8 of the simulator's 16 tokens
    headers = sim.requests()[-1]["headers"]
    assert not any(h.startswith("anthropic-") or h == "x-api-key" for h in headers)


def test_stream_text_through_the_sdk(gw: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(scripts={"stream me": ["Once ", "upon ", "a ", "time."]})
    with _client(gw).messages.stream(model="assistant", max_tokens=64, messages=[
        {"role": "user", "content": "stream me a story"}
    ]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Once upon a time."
    assert final.content[0].text == text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 4 and final.usage.input_tokens > 0


def test_stream_events_are_anthropics_named_events(gw: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(scripts={"events": ["a", "b"]})
    body = {"model": "assistant", "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": "events"}]}
    with httpx.Client(timeout=10) as http, http.stream(
        "POST", f"{gw.url}/v1/messages", json=body, headers={"x-api-key": gw.token(), "anthropic-version": "2023-06-01"}
    ) as r:
        raw = r.read().decode()
    assert r.headers["content-type"].startswith("text/event-stream")
    frames = [f.split("\n") for f in raw.split("\n\n") if f]
    names = [f[0].removeprefix("event: ") for f in frames]
    deltas = names.count("content_block_delta")  # the output policy may hold text back and join chunks
    assert deltas >= 1 and names == ["message_start", "content_block_start", *["content_block_delta"] * deltas,
                                     "content_block_stop", "message_delta", "message_stop"]
    data = [json.loads(f[1].removeprefix("data: ")) for f in frames]
    assert [d["type"] for d in data] == names
    assert "".join(d["delta"]["text"] for d in data if d["type"] == "content_block_delta") == "ab"


def test_a_tool_round_trip_reaches_the_backend_as_tool_calls(gw: GatewayProcess, sim: SimulatorThread) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 21C"}]},
    ]
    with _client(gw).messages.stream(model="assistant", max_tokens=32, messages=messages, tools=[WEATHER],
                                     tool_choice={"type": "auto"}) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "text" and final.stop_reason == "end_turn"
    forwarded = sim.requests()[-1]["body"]
    assert forwarded["messages"][1:] == [
        {"role": "assistant", "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
            "name": "weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny, 21C"},
    ]
    assert forwarded["tools"][0]["function"]["parameters"] == WEATHER["input_schema"]
    assert forwarded["tool_choice"] == "auto"


def test_a_tool_use_answer_and_its_result_round_trip(gw: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(agent_scripts={"weather in Paris": {
        "reasoning": ["Need ", "the tool."], "content": ["Let me check."], "tool_calls": [['{"city"', ': "Paris"}']]}})
    client = _client(gw)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    with client.messages.stream(model="assistant", max_tokens=64, messages=ask, tools=[WEATHER]) as stream:
        streamed = stream.get_final_message()
    answered = client.messages.create(model="assistant", max_tokens=64, messages=ask, tools=[WEATHER])
    for message in (streamed, answered):
        assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
        assert message.content[0].thinking == "Need the tool." and message.content[1].text == "Let me check."
        assert (message.content[2].name, message.content[2].input) == ("weather", {"city": "Paris"})
        assert message.stop_reason == "tool_use"
    call = streamed.content[2]
    result = {"type": "tool_result", "tool_use_id": call.id, "content": "sunny, 21C"}
    follow = [*ask, {"role": "assistant", "content": streamed.content}, {"role": "user", "content": [result]}]
    client.messages.create(model="assistant", max_tokens=64, messages=follow, tools=[WEATHER])
    forwarded = sim.requests()[-1]["body"]["messages"]
    assert forwarded[1]["tool_calls"] == [{"id": call.id, "type": "function", "function": {
        "name": "weather", "arguments": '{"city":"Paris"}'}}]
    assert forwarded[1]["reasoning_content"] == "Need the tool." and forwarded[1]["content"] == "Let me check."
    assert forwarded[2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}


def test_a_tool_call_over_8_kb_in_many_chunks_arrives_intact(gw: GatewayProcess) -> None:
    ask = [{"role": "user", "content": "Write the notes. [sim tool_bytes=9000 tool_chunk=7]"}]
    with _client(gw).messages.stream(model="assistant", max_tokens=4000, messages=ask, tools=[WEATHER]) as stream:
        pieces = [e for e in stream if e.type == "input_json"]
        final = stream.get_final_message()
    expected = tool_arguments(9000, 0)
    assert final.content[0].input == json.loads(expected) and final.stop_reason == "tool_use"
    assert "".join(p.partial_json for p in pieces) == expected and len(pieces) > 100


def test_a_stream_that_fails_after_its_first_token_makes_the_sdk_raise(
    gw: GatewayProcess, sim: SimulatorThread
) -> None:
    sim.configure(fault="drop", drop_after_chunks=3)
    with pytest.raises(anthropic.APIStatusError) as info:  # the `error` event, after a 200 head
        with _client(gw).messages.stream(model="assistant", max_tokens=64, messages=USER) as stream:
            list(stream.text_stream)
    assert info.value.body["error"]["type"] == "api_error"


def test_a_repeated_deterministic_request_is_replayed_from_the_cache(gw: GatewayProcess, sim: SimulatorThread) -> None:
    ask = [{"role": "user", "content": f"cache me {RUN}"}]
    deterministic = {"temperature": 0}  # extra_body: newer SDKs no longer declare temperature
    first = _client(gw).messages.create(model="assistant", max_tokens=16, messages=ask, extra_body=deterministic)
    with _client(gw).messages.with_streaming_response.create(
        model="assistant", max_tokens=16, messages=ask, stream=True, extra_body=deterministic
    ) as raw:
        assert raw.headers["x-gateway-cache"] == "hit"
        events = [e for e in raw.parse() if e.type == "content_block_delta"]
    assert "".join(e.delta.text for e in events) == first.content[0].text
    assert len(sim.requests()) == 1


# -- count_tokens ----------------------------------------------------------------------------------
def test_count_tokens_without_a_local_tokenizer_is_the_gateways_estimate(
    gw: GatewayProcess, sim: SimulatorThread
) -> None:
    raw = _client(gw).messages.with_raw_response.count_tokens(model="assistant", system="Be brief.", messages=USER)
    assert raw.parse().input_tokens == 4 + 3 + 4 + 6  # framing + "Be brief." + framing + the question
    assert "x-ratelimit-remaining-requests" in raw.headers
    assert sim.requests() == []  # no backend is asked


def test_count_tokens_errors_are_anthropic_errors(gw: GatewayProcess) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        _client(gw).messages.count_tokens(model="nosuch", messages=USER)
    assert missing.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=gw.url, api_key="not-a-jwt", max_retries=0).messages.count_tokens(
            model="assistant", messages=USER)
    with pytest.raises(anthropic.BadRequestError) as bad:
        _client(gw).messages.count_tokens(model="assistant", messages=[])
    assert bad.value.body["error"]["message"].startswith("messages: ")


# -- auth and limits -------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["not-a-jwt", "eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl"])
def test_an_invalid_key_raises_authentication_error(gw: GatewayProcess, sim: SimulatorThread, key: str) -> None:
    client = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        client.messages.create(model="assistant", max_tokens=8, messages=USER)
    client.close()
    assert info.value.status_code == 401
    assert info.value.body == {"type": "error", "error": {
        "type": "authentication_error", "message": "Invalid or expired API key."}}
    assert sim.requests() == []


def test_the_request_limit_counts_messages_and_raises_rate_limit_error(gw: GatewayProcess) -> None:
    client = _client(gw, f"tight-{RUN}", tier="tight")
    remaining = []
    for _ in range(2):
        raw = client.messages.with_raw_response.create(model="assistant", max_tokens=4, messages=USER)
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [1, 0]
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(model="assistant", max_tokens=4, messages=USER)
    assert info.value.body["error"]["type"] == "rate_limit_error"
    assert int(info.value.response.headers["retry-after"]) >= 1
    with pytest.raises(anthropic.RateLimitError):  # count_tokens is one more request against the limit
        client.messages.count_tokens(model="assistant", messages=USER)


# -- policies --------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["user", "system", "tool_result"])
def test_a_listed_word_in_the_prompt_is_refused_before_any_backend(
    gw: GatewayProcess, sim: SimulatorThread, where: str
) -> None:
    bad = "tell me about bullshit"
    kwargs: dict[str, Any] = {"messages": [{"role": "user", "content": bad}]}
    if where == "system":
        kwargs = {"system": bad, "messages": USER}
    elif where == "tool_result":
        kwargs = {"messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": bad}]},
        ]}
    with pytest.raises(anthropic.BadRequestError) as info:
        _client(gw).messages.create(model="assistant", max_tokens=8, **kwargs)
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "bullshit" not in info.value.body["error"]["message"]
    assert sim.requests() == []


def test_a_word_split_across_streamed_chunks_is_masked(gw: GatewayProcess, sim: SimulatorThread) -> None:
    parts = ["Well, that was bull", "sh", "it, honestly."]
    sim.configure(scripts={"split word": parts})
    with _client(gw).messages.stream(model="assistant", max_tokens=64, messages=[
        {"role": "user", "content": "split word please"}
    ]) as stream:
        text = "".join(stream.text_stream)
    assert "bullshit" not in text.lower() and text.startswith("Well, that was ")
    assert text == "Well, that was ********, honestly."  # masked character for character


# -- backends: fallback and cancellation -----------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_backend_failing_before_the_first_byte_falls_over(
    gw: GatewayProcess, sim: SimulatorThread, spare: SimulatorThread, stream: bool
) -> None:
    sim.configure(fault="status", fault_status=500)
    raw = _client(gw).messages.with_raw_response.create(
        model="fallback", max_tokens=16, messages=USER, stream=stream
    )
    assert raw.headers["x-gateway-backend"] == "spare"
    if stream:
        text = "".join(e.delta.text for e in raw.parse() if e.type == "content_block_delta")
    else:
        text = raw.parse().content[0].text
    assert text.startswith("Simulated answer to:")
    assert len(sim.requests()) == 1 and len(spare.requests()) == 1


def test_a_client_leaving_mid_stream_cancels_the_upstream_within_a_second(
    gw: GatewayProcess, sim: SimulatorThread
) -> None:
    sim.configure(itl_ms=100, reply_tokens=200)
    body = orjson.dumps({"model": "assistant", "max_tokens": 400, "stream": True,
                         "messages": [{"role": "user", "content": f"long story {RUN}"}]})
    head = (f"POST /v1/messages HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            f"x-api-key: {gw.token('leaver')}\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(head + body)
        sim.wait_for(lambda recs: bool(recs) and recs[-1]["status"] == 200, timeout=5.0)
        assert b"event: content_block_delta" in _read_until(sock, b"event: content_block_delta")
        left_at = time.monotonic()
    recs = sim.wait_for(lambda recs: recs[-1]["finished"] is not None, timeout=2.0)
    assert recs[-1]["finished"] - left_at < 1.0 and not recs[-1]["completed"]
    line = _wait_for_log_line(gw, lambda line: line.get("disconnected") and line["endpoint"] == "messages")
    assert line["status"] == 200 and line["stream"] is True


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        part = sock.recv(65536)
        assert part, "the gateway closed the connection"
        seen += part
    return seen


# -- observability ---------------------------------------------------------------------------------
def _wait_for_log_line(gw: GatewayProcess, match: Any) -> dict[str, Any]:
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(raw) for raw in gw.log().splitlines() if raw.startswith("{")]
        found = [line for line in lines if line.get("event") == "request" and match(line)]
        if found:
            return found[-1]
        assert time.monotonic() < deadline, "no such request line"
        time.sleep(0.05)  # harness polling: the line is written at the end of a loop iteration


def test_the_log_line_and_metrics_carry_the_messages_endpoint(gw: GatewayProcess) -> None:
    raw = _client(gw, f"observed-{RUN}").messages.with_raw_response.create(
        model="assistant", max_tokens=4, messages=USER)
    rid = raw.headers["x-request-id"]
    line = _wait_for_log_line(gw, lambda line: line["request_id"] == rid)
    assert line["endpoint"] == "messages" and line["status"] == 200 and line["completion_tokens"] == 4
    metrics = httpx.get(f"{gw.url}/metrics", timeout=10).text
    samples = [s for f in text_string_to_metric_families(metrics) if f.name == "llm_gateway_requests"
               for s in f.samples if s.name == "llm_gateway_requests_total"]
    assert any(s.labels["endpoint"] == "messages" and s.labels["status"] == "200" and s.value >= 1 for s in samples)


# -- the embedded llama.cpp model ------------------------------------------------------------------
@pytest.fixture(scope="module")
def local(module_tmp: Path) -> Iterator[GatewayProcess]:
    config = gateway_config(
        backends={"cpu": SMOLLM},
        models={"local": {"variants": [{"name": "only", "weight": 1, "backends": ["cpu"]}]}},
    )
    proc = GatewayProcess(config, module_tmp).start()
    yield proc
    proc.stop()


@pytest.mark.model
def test_llamacpp_create_stream_and_count_tokens(local: GatewayProcess) -> None:
    client = _client(local)
    ask = [{"role": "user", "content": "Name three colours."}]
    counted = client.messages.count_tokens(model="local", system="Be brief.", messages=ask).input_tokens
    message = client.messages.create(model="local", system="Be brief.", max_tokens=8, messages=ask)
    assert message.content[0].text.strip() and message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens == counted  # count_tokens used the model's own tokenizer
    with client.messages.stream(model="local", max_tokens=8, messages=[
        {"role": "user", "content": "Say hello."}
    ]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip() and final.content[0].text == text
    assert 0 < final.usage.output_tokens <= 8 and final.usage.input_tokens > 5
