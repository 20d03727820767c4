"""The vLLM simulator over real HTTP, driven by the real openai SDK (and raw httpx for the bytes)."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import httpx
import openai
import orjson
import pytest
from openai import Stream
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessageParam

from loadtest.vllm_sim import SimConfig, SimulatorThread

QUESTION = "What is the capital of France?"
# "Simulated answer to:" + the first 8 prompt words, then filler words up to 16 tokens.
ANSWER = (
    "Simulated answer to: What is the capital of France? lorem ipsum dolor sit amet consectetur adipiscing"
)
PROMPT_TOKENS = 6 + 4  # words of the one message + 4 per message
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]


@pytest.fixture
def client(sim: SimulatorThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, timeout=5) as c:
        yield c


@pytest.fixture
def http(sim: SimulatorThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, timeout=5) as c:
        yield c


def sse_events(http: httpx.Client, body: dict[str, Any]) -> list[str]:
    """The raw `data:` payloads of one streamed response, [DONE] included."""
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    assert raw.endswith("\n\n")
    frames = raw[:-2].split("\n\n")
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[len("data: ") :] for f in frames]


def ask(client: openai.OpenAI, **params: Any) -> ChatCompletion:
    params.setdefault("messages", MESSAGES)
    return cast(ChatCompletion, client.chat.completions.create(model="sim-model", **params))


def ask_stream(client: openai.OpenAI, **params: Any) -> Stream[ChatCompletionChunk]:
    params.setdefault("messages", MESSAGES)
    return cast(
        Stream[ChatCompletionChunk], client.chat.completions.create(model="sim-model", stream=True, **params)
    )


def metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}{{[^}}]*model_name=\"sim-model\"[^}}]*}} (\S+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_non_stream_answer_usage_and_vllm_fields(client: openai.OpenAI, http: httpx.Client) -> None:
    r = ask(client)
    assert r.choices[0].message.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        PROMPT_TOKENS,
        16,
        PROMPT_TOKENS + 16,
    )
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", r.id)

    raw = http.post("/v1/chat/completions", json={"model": "sim-model", "messages": MESSAGES}).json()
    assert list(raw) == [
        "id",
        "object",
        "created",
        "model",
        "choices",
        "service_tier",
        "system_fingerprint",
        "usage",
        "prompt_logprobs",
        "prompt_token_ids",
        "prompt_text",
        "kv_transfer_params",
        "ec_transfer_params",
        "metrics",
    ]
    choice = raw["choices"][0]
    assert choice["stop_reason"] is None and choice["logprobs"] is None
    assert set(choice["message"]) == {
        "role",
        "content",
        "refusal",
        "annotations",
        "audio",
        "function_call",
        "reasoning",
    }
    assert raw["usage"]["prompt_tokens_details"] is None


def test_n_choices_share_one_answer(client: openai.OpenAI) -> None:
    r = ask(client, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert {c.message.content for c in r.choices} == {ANSWER}
    assert r.usage is not None and r.usage.completion_tokens == 48


def test_stream_chunks_ids_usage_and_done(client: openai.OpenAI, http: httpx.Client) -> None:
    chunks = list(ask_stream(client, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    first, *content, usage = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert len(content) == 16
    assert "".join(c.choices[0].delta.content or "" for c in content) == ANSWER
    assert [c.choices[0].finish_reason for c in content] == [None] * 15 + ["stop"]
    assert usage.choices == [] and usage.usage is not None
    assert (usage.usage.prompt_tokens, usage.usage.completion_tokens) == (PROMPT_TOKENS, 16)

    events = sse_events(http, {"messages": MESSAGES, "stream": True, "max_tokens": 2})
    assert events[-1] == "[DONE]"
    assert [orjson.loads(e)["choices"][0]["delta"] for e in events[:-1]] == [
        {"role": "assistant", "content": ""},
        {"content": "Simulated"},
        {"content": " answer"},
    ]
    assert "usage" not in orjson.loads(events[1])  # only with stream_options


def test_continuous_usage_stats_on_every_chunk(http: httpx.Client) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"messages": MESSAGES, "stream": True, "max_tokens": 3, "stream_options": options}
    events = sse_events(http, body)
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 3]
    assert all(c["usage"]["prompt_tokens"] == PROMPT_TOKENS for c in chunks)
    assert chunks[-1]["choices"] == []


def test_max_tokens_stops_with_length(client: openai.OpenAI) -> None:
    r = ask(client, max_tokens=5)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == "Simulated answer to: What is"
    assert r.usage is not None and r.usage.completion_tokens == 5
    chunks = list(ask_stream(client, max_completion_tokens=2))
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, "length"]


def test_scripted_chunks_arrive_exactly_as_scripted(
    sim: SimulatorThread, http: httpx.Client, client: openai.OpenAI
) -> None:
    sim.configure(scripts={"tell me": ["Hel", "lo wo", "rld"]})
    body = {"messages": [{"role": "user", "content": "please tell me a story"}], "stream": True}
    deltas = [orjson.loads(e)["choices"][0]["delta"].get("content") for e in sse_events(http, body)[:-1]]
    assert deltas == ["", "Hel", "lo wo", "rld"]
    r = ask(client, messages=body["messages"])
    assert r.choices[0].message.content == "Hello world"
    assert r.usage is not None and r.usage.completion_tokens == 3


def test_fault_status_answers_vllm_error(sim: SimulatorThread, client: openai.OpenAI) -> None:
    sim.configure(fault="status", fault_status=503)
    with pytest.raises(openai.APIStatusError) as info:
        ask(client)
    assert info.value.status_code == 503
    assert info.value.body == {
        "message": "Simulated fault.",
        "type": "ServiceUnavailableError",
        "param": None,
        "code": 503,
    }


def test_fault_stall_trips_client_timeout_and_is_cancelled(
    sim: SimulatorThread, client: openai.OpenAI
) -> None:
    sim.configure(fault="stall", stall_s=5)
    with pytest.raises(openai.APITimeoutError):
        ask_stream(client.with_options(timeout=0.3))
    (record,) = sim.wait_for(lambda rs: bool(rs) and rs[-1]["cancelled"], timeout=2)
    assert not record["completed"]


def test_fault_drop_breaks_stream_and_non_stream(sim: SimulatorThread, client: openai.OpenAI) -> None:
    sim.configure(fault="drop", drop_after_chunks=2)
    received: list[ChatCompletionChunk] = []
    # openai 3.x wraps the broken chunked body in APIConnectionError; 2.x lets httpx's error through
    with pytest.raises((openai.APIConnectionError, httpx.RemoteProtocolError)):
        received.extend(ask_stream(client))
    assert [c.choices[0].delta.content for c in received] == ["", "Simulated"]
    with pytest.raises(openai.APIConnectionError):
        ask(client)
    records = sim.requests()
    assert [(r["dropped"], r["completed"], r["cancelled"]) for r in records] == [(True, False, False)] * 2


def test_fault_refuse_then_recover_on_same_port(sim: SimulatorThread, client: openai.OpenAI) -> None:
    ask(client)
    port = sim.port
    sim.configure(fault="refuse")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with pytest.raises(openai.APIConnectionError):  # also over the connection it had kept alive
        ask(client)
    sim.configure(fault="none")
    assert sim.port == port
    r = ask(client)
    assert r.choices[0].message.content == ANSWER


def test_client_closing_mid_stream_is_recorded_as_cancelled(
    sim: SimulatorThread, client: openai.OpenAI
) -> None:
    sim.configure(itl_ms=20, reply_tokens=200)
    with ask_stream(client) as stream:
        next(iter(stream))
    closed_at = time.monotonic()
    (record,) = sim.wait_for(lambda rs: bool(rs) and rs[-1]["cancelled"], timeout=2)
    assert not record["completed"]
    assert record["finished"] - closed_at < 0.1


def test_metrics_gauges_follow_load(sim: SimulatorThread, client: openai.OpenAI, http: httpx.Client) -> None:
    sim.configure(waiting=7, max_num_seqs=1, ttft_ms=400)
    calls = [
        threading.Thread(
            target=client.chat.completions.create, kwargs={"model": "sim-model", "messages": MESSAGES}
        )
        for _ in range(2)
    ]
    for call in calls:
        call.start()
    sim.wait_for(lambda rs: len(rs) == 2)
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        text = http.get("/metrics").text
        if metric(text, "vllm:num_requests_waiting") == 8:
            break
    assert metric(text, "vllm:num_requests_running") == 1
    assert metric(text, "vllm:num_requests_waiting") == 8  # 7 configured + 1 beyond max_num_seqs
    assert metric(text, "vllm:kv_cache_usage_perc") == 1.0
    for call in calls:
        call.join(5)
    text = http.get("/metrics").text
    assert metric(text, "vllm:num_requests_running") == 0
    assert metric(text, "vllm:generation_tokens_total") >= 32


def test_models_health_and_request_id(
    sim: SimulatorThread, http: httpx.Client, client: openai.OpenAI
) -> None:
    sim.configure(max_model_len=8192)
    (card,) = http.get("/v1/models").json()["data"]
    assert (card["id"], card["root"], card["owned_by"], card["max_model_len"]) == (
        "sim-model",
        "sim-model",
        "vllm",
        8192,
    )
    assert card["permission"][0]["object"] == "model_permission"
    health = http.get("/health")
    assert (health.status_code, health.content) == (200, b"")
    r = ask(client, extra_headers={"X-Request-Id": "abc123"})
    assert r.id == "chatcmpl-abc123"
    assert sim.requests()[-1]["headers"]["x-request-id"] == "abc123"


def test_too_long_prompt_and_unknown_model_errors(
    sim: SimulatorThread, http: httpx.Client, client: openai.OpenAI
) -> None:
    sim.configure(max_model_len=20)
    long_messages = [{"role": "user", "content": "word " * 30}]
    with pytest.raises(openai.BadRequestError):
        ask(client, messages=long_messages)
    resp = http.post("/v1/chat/completions", json={"messages": long_messages})
    assert resp.status_code == 400
    assert resp.json() == {
        "error": {
            "message": "This model's maximum context length is 20 tokens. However, your request has 34 input "
            "tokens. Please reduce the length of the input messages.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }
    resp = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 15})
    assert resp.status_code == 400
    assert resp.json()["error"]["message"].startswith(
        "'max_tokens' or 'max_completion_tokens' is too large: 15. This model's maximum context length is 20"
    )
    resp = http.post("/v1/chat/completions", json={"model": "other", "messages": MESSAGES})
    assert (resp.status_code, resp.json()["error"]["type"]) == (404, "NotFoundError")


def test_slow_fault_and_ttft_delay_the_answer(sim: SimulatorThread, client: openai.OpenAI) -> None:
    sim.configure(ttft_ms=15, itl_ms=0, fault="slow")
    started = time.monotonic()
    ask(client)
    assert time.monotonic() - started >= 0.15


def test_admin_api(sim: SimulatorThread, http: httpx.Client) -> None:
    assert http.post("/_sim/config", json={"ttft_ms": 5, "waiting": 3}).json()["waiting"] == 3
    assert http.get("/_sim/config").json()["ttft_ms"] == 5
    assert sim.config == SimConfig(ttft_ms=5, waiting=3)
    bad = http.post("/_sim/config", json={"nope": 1})
    assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
    http.post("/v1/chat/completions", json={"messages": MESSAGES})
    (record,) = http.get("/_sim/requests").json()
    assert record["body"] == {"messages": MESSAGES} and record["completed"] and record["status"] == 200
    assert http.post("/_sim/reset").json()["waiting"] == 0
    assert http.get("/_sim/requests").json() == []
