"""The simulator's GPU-modelling mode over real HTTP with the openai SDK: prefix reuse and its
counters, eviction, cache_salt, priority scheduling, the waiting queue, and the unchanged wire."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from loadtest.vllm_sim import SimulatorThread

SYSTEM = " ".join(f"rule{i}" for i in range(2000))  # 2,000 tokens: one second of prefill below
GPU = {"mode": "gpu", "max_model_len": 32768, "gpu_prefill_tok_s": 2000.0, "gpu_kv_blocks": 2000}


@pytest.fixture(scope="module")
def shared_sim() -> Iterator[SimulatorThread]:
    """This module's simulator is in GPU mode; conftest's `sim` resets it around each test (the
    initial config and a fresh, empty KV cache)."""
    with SimulatorThread(**GPU) as sim:
        yield sim


@pytest.fixture
def client(sim: SimulatorThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.url + "/v1", api_key="x", max_retries=0, timeout=30) as c:
        yield c


def messages(question: str, system: str = SYSTEM) -> list[Any]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def ask(client: openai.OpenAI, question: str, system: str = SYSTEM, **extra: Any) -> float:
    """Stream one answer; return the time to its first content token."""
    start = time.monotonic()
    first = None
    stream = client.chat.completions.create(
        model="sim-model", messages=messages(question, system), stream=True, extra_body=extra or None
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - start
    assert first is not None
    return first


def metrics(sim: SimulatorThread) -> dict[str, float]:
    text = httpx.get(sim.url + "/metrics").text
    pattern = r'^(vllm:\w+)\{engine="0",model_name="sim-model"\} (\S+)$'
    return {name: float(value) for name, value in re.findall(pattern, text, re.M)}


def test_prefix_reuse_shortens_prefill_and_counts_hits(sim: SimulatorThread, client: openai.OpenAI) -> None:
    cold = ask(client, "first question")
    warm = ask(client, "second question")
    first, second = sim.requests()
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] == (first["prompt_tokens"] - 4) // 16 * 16  # the system prompt's blocks
    assert cold >= 1.0  # 2,000 uncached tokens at 2,000 tokens/s
    assert warm < cold / 2
    m = metrics(sim)
    assert m["vllm:prefix_cache_hits_total"] == second["cached_tokens"]
    assert m["vllm:prefix_cache_queries_total"] == first["prompt_tokens"] + second["prompt_tokens"]
    assert m["vllm:prompt_tokens_total"] == m["vllm:prefix_cache_queries_total"]
    assert m["vllm:generation_tokens_total"] == 32


def test_different_cache_salt_gets_no_reuse(sim: SimulatorThread, client: openai.OpenAI) -> None:
    sim.configure(gpu_prefill_tok_s=1e6)
    ask(client, "q", cache_salt="tenant-a")
    ask(client, "q", cache_salt="tenant-b")
    ask(client, "q", cache_salt="tenant-a")
    assert [r["cached_tokens"] for r in sim.requests()] == [0, 0, 2000]


def test_eviction_under_pressure(sim: SimulatorThread, client: openai.OpenAI) -> None:
    sim.configure(gpu_kv_blocks=300, gpu_prefill_tok_s=1e6)  # 4,800 tokens: two 2,000-token prompts
    first_system = SYSTEM
    ask(client, "q", first_system)
    for tenant in ("b", "c"):
        ask(client, "q", " ".join(f"{tenant}{i}" for i in range(2000)))
    ask(client, "q", first_system)
    cached = [r["cached_tokens"] for r in sim.requests()]
    assert cached[:3] == [0, 0, 0]
    assert cached[3] < 1000  # mostly evicted; a freed sequence loses its tail blocks first
    ask(client, "again", first_system)
    assert sim.requests()[-1]["cached_tokens"] == 2000


def test_priority_runs_first_under_priority_scheduling(sim: SimulatorThread, client: openai.OpenAI) -> None:
    sim.configure(scheduling_policy="priority", max_num_seqs=1, gpu_prefill_tok_s=1e6, reply_tokens=60)
    first_token: dict[str, float] = {}

    def run(name: str, priority: int) -> None:
        ask(client, name, "short", priority=priority)
        first_token[name] = time.monotonic()

    def until_waiting(n: float) -> None:
        deadline = time.monotonic() + 10
        while metrics(sim)["vllm:num_requests_waiting"] != n:
            assert time.monotonic() < deadline, "queue never reached the expected length"
            time.sleep(0.005)  # polling the server's state, not timing the test

    threads = [threading.Thread(target=run, args=("busy", 0))]
    threads[0].start()
    deadline = time.monotonic() + 10
    while metrics(sim)["vllm:num_requests_running"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    for name, priority, waiting in (("low", 5, 1), ("high", -1, 2)):
        threads.append(threading.Thread(target=run, args=(name, priority)))
        threads[-1].start()
        until_waiting(waiting)
    for t in threads:
        t.join(30)
    assert first_token["busy"] < first_token["high"] < first_token["low"]


def test_priority_needs_priority_scheduling(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="Got priority 3 but Priority scheduling is not enabled"):
        ask(client, "q", "short", priority=3)


def test_waiting_queue_running_and_kv_usage_metrics(sim: SimulatorThread) -> None:
    sim.configure(max_num_seqs=2, gpu_prefill_tok_s=1e6, reply_tokens=200)
    body = {"model": "sim-model", "messages": messages("q", "short"), "stream": True}
    with httpx.Client(base_url=sim.url, timeout=30) as http:
        streams = [http.stream("POST", "/v1/chat/completions", json=body) for _ in range(4)]
        try:
            for s in streams:
                s.__enter__()
            deadline = time.monotonic() + 10
            while (m := metrics(sim))["vllm:num_requests_waiting"] != 2:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert m["vllm:num_requests_running"] == 2
            assert 0 < m["vllm:kv_cache_usage_perc"] == m["vllm:gpu_cache_usage_perc"] < 0.01
        finally:
            for s in streams:
                s.__exit__(None, None, None)
    deadline = time.monotonic() + 10
    while metrics(sim)["vllm:num_requests_running"] != 0:  # the clients left: the engine drops them
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert metrics(sim)["vllm:kv_cache_usage_perc"] == 0.0


def _normalized_frames(url: str, body: dict[str, Any]) -> list[Any]:
    with httpx.Client(timeout=30) as http:
        raw = http.post(url + "/v1/chat/completions", json=body).content.decode()
    frames = [f.removeprefix("data: ") for f in raw.strip().split("\n\n")] if body.get("stream") else [raw]
    out = []
    for frame in frames:
        if frame == "[DONE]":
            out.append(frame)
            continue
        doc = orjson.loads(frame)
        doc["id"] = doc["created"] = None
        if doc.get("usage"):
            doc["usage"] = {k: None for k in doc["usage"]}  # the two modes count prompt tokens differently
        out.append(doc)
    return out


@pytest.mark.parametrize("stream", [True, False])
def test_wire_format_identical_to_zero_delay_mode(sim: SimulatorThread, stream: bool) -> None:
    body: dict[str, Any] = {
        "model": "sim-model",
        "messages": messages("What is the capital of France?", "be brief"),
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    with SimulatorThread() as zero:
        expected = _normalized_frames(zero.url, body)
        zero_metrics = httpx.get(zero.url + "/metrics").text
    assert _normalized_frames(sim.url, body) == expected
    assert "vllm:prefix_cache_hits_total" in zero_metrics  # same metric set in both modes, zero here
    assert len(expected) == (16 + 3 if stream else 1)
