"""/v1/completions and /v1/embeddings end to end: the real openai SDK against a gateway process in
front of two vLLM simulators (and the embedded llama.cpp model for completions).

For each endpoint: what reaches the backend (the raw prompt on vLLM's completions route, the
texts to embed), a listed word refused before any backend sees it, a backend failing before the
first byte falling over, a client leaving cancelling the upstream within a second, the rate
limits counting the request, and the endpoint in the log line and the metrics. Completions also:
JSON and streams with usage and log probabilities, and a listed word split across chunks masked.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtest.sim_text import vector
from loadtest.vllm_sim import SimulatorThread
from tests.conftest import SMOLLM, GatewayProcess, gateway_config

TIGHT_RPM = 3


def _backend(url: str) -> dict[str, Any]:
    return {"type": "vllm", "url": url, "model": "sim-model", "health_interval_s": 0.2,
            "breaker": {"failures": 100000, "reset_s": 1}}


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, spare: SimulatorThread, module_tmp: Path) -> Iterator[GatewayProcess]:
    tiers = {"default": {"requests_per_minute": 100000, "tokens_per_minute": 100000000},
             "tight": {"requests_per_minute": TIGHT_RPM, "tokens_per_minute": 100000000}}
    config = gateway_config(
        limits={"tiers": tiers},
        cache={"enabled": False},
        backends={"gpu": _backend(sim.url), "spare": _backend(spare.url)},
        models={"assistant": {"variants": [{"name": "a", "weight": 1, "backends": ["gpu"], "fallback": ["spare"]}]}},
    )
    proc = GatewayProcess(config, module_tmp).start()
    yield proc
    proc.stop()


def _records(sim: SimulatorThread, path: str) -> list[dict[str, Any]]:
    return [r for r in sim.requests() if r["path"] == path]


def _request_lines(gw: GatewayProcess, request_id: str) -> list[dict[str, Any]]:
    """The gateway's request log line for `request_id` (polled: the log is written asynchronously)."""
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(raw) for raw in gw.log().splitlines() if raw.startswith("{")]
        found = [x for x in lines if x.get("event") == "request" and x.get("request_id") == request_id]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _requests_metric(gw: GatewayProcess, endpoint: str) -> float:
    text = httpx.get(f"{gw.url}/metrics", timeout=10).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "llm_gateway_requests_total" and s.labels.get("endpoint") == endpoint)


# -- completions against the simulator ----------------------------------------------------------------
def test_a_completion_sends_the_raw_prompt_to_the_completions_route(gw: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(reply_tokens=40)
    raw = gw.client().completions.with_raw_response.create(model="assistant", prompt="Once upon a time")
    done = raw.parse()
    assert done.object == "text_completion" and done.model == "assistant"
    filler = "lorem ipsum dolor sit amet consectetur adipiscing elit sed"
    assert done.choices[0].text == f"Simulated answer to: Once upon a time {filler}"
    assert done.choices[0].finish_reason == "length"  # OpenAI's default of 16 tokens was sent
    assert done.usage is not None and done.usage.completion_tokens == 16
    assert raw.headers["x-gateway-backend"] == "gpu"
    [rec] = _records(sim, "/v1/completions")
    assert rec["body"]["prompt"] == "Once upon a time" and rec["body"]["max_tokens"] == 16
    assert "messages" not in rec["body"] and "raw_prompt" not in rec["body"]
    assert rec["body"]["model"] == "sim-model" and rec["body"]["cache_salt"]  # tenants' prefixes apart
    assert not _records(sim, "/v1/chat/completions")


def test_a_streamed_completion_with_usage(gw: GatewayProcess, sim: SimulatorThread) -> None:
    chunks = list(gw.client().completions.create(
        model="assistant", prompt="Tell me", max_tokens=5, stream=True, stream_options={"include_usage": True},
    ))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == "Simulated answer to: Tell me"
    assert all(c.object == "text_completion" and c.model == "assistant" for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])  # only on the last text chunk
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


def test_logprobs_pass_through_in_the_completions_shape(gw: GatewayProcess) -> None:
    done = gw.client().completions.create(model="assistant", prompt="Say it", max_tokens=3, logprobs=2)
    logprobs = done.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens == ["Simulated", " answer", " to:"]
    assert logprobs.text_offset == [0, 9, 16]
    assert logprobs.top_logprobs is not None and len(logprobs.top_logprobs[0]) == 3  # the token + 2
    # a stream's text may be held back and masked by the output policy, so its chunks carry no
    # log probabilities (as on chat completions); tests/unit/test_api_completions.py has the offsets
    stream = gw.client().completions.create(model="assistant", prompt="Say it", max_tokens=3, logprobs=0, stream=True)
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == "Simulated answer to:"
    assert all(c.choices[0].logprobs is None for c in chunks)


def test_a_listed_word_in_the_prompt_is_refused_before_any_backend(gw: GatewayProcess, sim: SimulatorThread) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        gw.client().completions.create(model="assistant", prompt="what a load of bullshit", stream=True)
    assert exc.value.code == "content_filter"
    assert sim.requests() == []


def test_a_listed_word_split_across_streamed_chunks_is_masked(gw: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(scripts={"split:": ["That was bull", "sh", "it, honestly."]})
    chunks = list(gw.client().completions.create(model="assistant", prompt="split: go", stream=True))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert "bullshit" not in text.lower() and text.startswith("That was ") and text.endswith(", honestly.")
    assert len(text) == len("That was bullshit, honestly.")  # masked character for character
    done = gw.client().completions.create(model="assistant", prompt="split: json")
    assert "bullshit" not in done.choices[0].text


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_completion_falls_over_before_the_first_byte(
    gw: GatewayProcess, sim: SimulatorThread, spare: SimulatorThread, stream: bool
) -> None:
    sim.configure(fault="status", fault_status=503)
    raw = gw.client().completions.with_raw_response.create(model="assistant", prompt="fall over", stream=stream)
    assert raw.headers["x-gateway-backend"] == "spare"
    answer = raw.parse()
    texts = [c.choices[0].text for c in answer if c.choices] if stream else [answer.choices[0].text]
    assert "".join(texts).startswith("Simulated answer to: fall over")
    assert _records(spare, "/v1/completions")[0]["body"]["prompt"] == "fall over"


class RawClient:
    """One POST on a raw socket, so the test decides the exact moment the client leaves."""

    def __init__(self, gw: GatewayProcess, path: str, body: dict[str, Any]) -> None:
        payload = orjson.dumps(body)
        head = (
            f"POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            f"authorization: {gw.headers()['authorization']}\r\ncontent-length: {len(payload)}\r\n\r\n"
        )
        self.sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        self.sock.sendall(head.encode() + payload)

    def read_until(self, marker: bytes) -> bytes:
        got = b""
        while marker not in got:
            data = self.sock.recv(65536)
            assert data, f"the gateway closed the connection: {got!r}"
            got += data
        return got

    def leave(self) -> float:
        self.sock.close()
        return time.monotonic()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()  # idempotent; also when an assertion failed before leave()


def _upstream_gone_within_a_second(sim: SimulatorThread, left_at: float) -> None:
    recs = sim.wait_for(lambda recs: bool(recs) and recs[-1]["finished"] is not None, timeout=2.0)
    assert recs[-1]["finished"] - left_at < 1.0
    assert not recs[-1]["completed"] and recs[-1]["cancelled"]


def test_a_client_leaving_a_completion_stream_cancels_the_upstream(gw: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(itl_ms=100, reply_tokens=200)
    body = {"model": "assistant", "prompt": "long", "stream": True, "max_tokens": 200}
    with RawClient(gw, "/v1/completions", body) as client:
        sim.wait_for(lambda recs: bool(recs) and recs[-1]["status"] == 200)
        client.read_until(b"text_completion")  # tokens are reaching the client
        left_at = client.leave()
    _upstream_gone_within_a_second(sim, left_at)


def test_completions_count_against_the_rate_limits(gw: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.token("tight-completions", tier="tight"),
                           max_retries=0)
    remaining = []
    for _ in range(TIGHT_RPM):
        raw = client.completions.with_raw_response.create(model="assistant", prompt="count me")
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    assert remaining == list(range(TIGHT_RPM - 1, -1, -1))
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model="assistant", prompt="one too many")
    client.close()


def test_the_log_line_and_metrics_carry_the_completions_endpoint(gw: GatewayProcess) -> None:
    before = _requests_metric(gw, "completions")
    raw = gw.client().completions.with_raw_response.create(model="assistant", prompt="log me")
    [line] = _request_lines(gw, raw.headers["x-request-id"])
    assert line["endpoint"] == "completions" and line["status"] == 200 and line["backend"] == "gpu"
    assert _requests_metric(gw, "completions") == before + 1


def test_a_deterministic_completion_is_cached_apart_from_chat(sim: SimulatorThread, module_tmp: Path) -> None:
    config = gateway_config(
        backends={"gpu": _backend(sim.url)},
        models={"assistant": {"variants": [{"name": "a", "weight": 1, "backends": ["gpu"]}]}},
    )
    proc = GatewayProcess(config, module_tmp).start()
    try:
        client = proc.client()
        ask = {"model": "assistant", "prompt": "cache me", "temperature": 0}
        first = client.completions.with_raw_response.create(**ask)
        again = client.completions.with_raw_response.create(**ask)
        assert (first.headers["x-gateway-cache"], again.headers["x-gateway-cache"]) == ("miss", "hit")
        assert again.parse().choices[0].text == first.parse().choices[0].text
        replayed = list(client.completions.create(**ask, stream=True))
        assert "".join(c.choices[0].text for c in replayed if c.choices) == first.parse().choices[0].text
        chat = client.chat.completions.with_raw_response.create(
            model="assistant", messages=[{"role": "user", "content": "cache me"}], temperature=0, max_tokens=16)
        assert chat.headers["x-gateway-cache"] == "miss"  # a chat turn never gets the raw prompt's answer
        assert len(_records(sim, "/v1/completions")) == 1
    finally:
        proc.stop()


# -- embeddings against the simulator -----------------------------------------------------------------
def test_embeddings_come_back_as_the_backend_made_them(gw: GatewayProcess, sim: SimulatorThread) -> None:
    raw = gw.client().embeddings.with_raw_response.create(model="assistant", input=["hello world", "bye"])
    done = raw.parse()  # the SDK asked for base64 and decoded it
    assert done.model == "assistant" and [d.index for d in done.data] == [0, 1]
    assert done.data[0].embedding == pytest.approx(vector("hello world", 384), abs=1e-6)
    assert done.usage.prompt_tokens == done.usage.total_tokens == 7  # the backend's count
    assert raw.headers["x-gateway-backend"] == "gpu" and raw.headers["x-gateway-cache"] == "bypass"
    [rec] = _records(sim, "/v1/embeddings")
    assert rec["body"] == {"input": ["hello world", "bye"], "encoding_format": "base64", "model": "sim-model"}
    floats = gw.client().embeddings.create(model="assistant", input="hello", encoding_format="float", dimensions=8)
    assert floats.data[0].embedding == pytest.approx(vector("hello", 8))


def test_a_listed_word_in_an_input_is_refused_before_any_backend(gw: GatewayProcess, sim: SimulatorThread) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        gw.client().embeddings.create(model="assistant", input=["fine", "double your bitcoin today"])
    assert exc.value.code == "content_filter" and exc.value.param == "input"
    assert sim.requests() == []


def test_invalid_embedding_inputs_name_the_parameter(gw: GatewayProcess, sim: SimulatorThread) -> None:
    for bad in ([1, 2, 3], [[1, 2]], [], [""]):
        r = httpx.post(f"{gw.url}/v1/embeddings", headers=gw.headers(), timeout=10,
                       json={"model": "assistant", "input": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "input", (bad, r.text)
    assert sim.requests() == []


def test_embeddings_fall_over_before_the_first_byte(
    gw: GatewayProcess, sim: SimulatorThread, spare: SimulatorThread
) -> None:
    sim.configure(fault="status", fault_status=503)
    raw = gw.client().embeddings.with_raw_response.create(model="assistant", input="fall over")
    assert raw.headers["x-gateway-backend"] == "spare"
    assert raw.parse().data[0].embedding == pytest.approx(vector("fall over", 384), abs=1e-6)


def test_a_client_leaving_an_embeddings_request_cancels_the_upstream(
    gw: GatewayProcess, sim: SimulatorThread
) -> None:
    sim.configure(fault="stall", stall_s=30)
    with RawClient(gw, "/v1/embeddings", {"model": "assistant", "input": "slow"}) as client:
        sim.wait_for(lambda recs: bool(recs))
        left_at = client.leave()
    _upstream_gone_within_a_second(sim, left_at)


def test_embeddings_count_against_the_rate_limits(gw: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.token("tight-embeddings", tier="tight"),
                           max_retries=0)
    remaining = []
    for _ in range(TIGHT_RPM):
        raw = client.embeddings.with_raw_response.create(model="assistant", input="count me")
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    assert remaining == list(range(TIGHT_RPM - 1, -1, -1))
    with pytest.raises(openai.RateLimitError):
        client.embeddings.create(model="assistant", input="one too many")
    client.close()


def test_the_log_line_and_metrics_carry_the_embeddings_endpoint(gw: GatewayProcess) -> None:
    before = _requests_metric(gw, "embeddings")
    raw = gw.client().embeddings.with_raw_response.create(model="assistant", input="log me")
    [line] = _request_lines(gw, raw.headers["x-request-id"])
    assert line["endpoint"] == "embeddings" and line["status"] == 200 and line["backend"] == "gpu"
    assert line["prompt_tokens"] == 4  # the backend's count, not the estimate
    assert _requests_metric(gw, "embeddings") == before + 1


# -- the embedded llama.cpp model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def local(module_tmp: Path) -> Iterator[GatewayProcess]:
    config = gateway_config(
        cache={"enabled": False},
        backends={"cpu": SMOLLM},
        models={"local": {"variants": [{"name": "a", "weight": 1, "backends": ["cpu"]}]}},
    )
    proc = GatewayProcess(config, module_tmp).start()
    yield proc
    proc.stop()


@pytest.mark.model
def test_the_embedded_model_completes_a_raw_prompt(local: GatewayProcess) -> None:
    client = local.client()
    prompt = "The capital of France is"
    done = client.completions.create(model="local", prompt=prompt, max_tokens=8, temperature=0)
    chat = client.chat.completions.create(model="local", messages=[{"role": "user", "content": prompt}],
                                          max_tokens=1, temperature=0)
    assert done.choices[0].text and done.usage is not None and chat.usage is not None
    assert 0 < done.usage.completion_tokens <= 8
    assert done.usage.prompt_tokens < chat.usage.prompt_tokens  # no chat template around the prompt
    chunks = list(client.completions.create(model="local", prompt=prompt, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == done.usage.prompt_tokens


@pytest.mark.model
def test_the_embedded_model_refuses_embeddings_and_logprobs(local: GatewayProcess) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        local.client().embeddings.create(model="local", input="hello")
    assert exc.value.param == "model" and "does not support embeddings" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        local.client().completions.create(model="local", prompt="hi", logprobs=1)
    assert exc.value.param == "logprobs"
