"""The gateway core end to end: real gateway process, real openai SDK, real llama.cpp model,
and the vLLM simulator in place of a GPU server."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import orjson
import pytest

from loadtest.vllm_sim import SimulatorThread
from tests.conftest import SMOLLM, GatewayProcess, gateway_config

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, module_tmp) -> Iterator[GatewayProcess]:
    gpu = {
        "type": "vllm", "url": sim.url, "model": "sim-model", "first_token_timeout_s": 1.5,
        "request_timeout_s": 3, "health_interval_s": 0.2, "breaker": {"failures": 1000, "reset_s": 1},
    }
    config = gateway_config(
        limits={"tiers": {"default": {"requests_per_minute": 100000, "tokens_per_minute": 100000000},
                          "small": {"requests_per_minute": 100000, "tokens_per_minute": 60000}}},
        backends={"gpu": gpu, "cpu": SMOLLM},
        models={
            "assistant": {"variants": [{"name": "control", "weight": 100, "backends": ["gpu"], "fallback": ["cpu"]}]},
            "local": {"variants": [{"name": "only", "weight": 100, "backends": ["cpu"]}]},
            "ab": {
                "sticky_by": "sub",
                "variants": [
                    {"name": "a", "weight": 70, "backends": ["gpu"]},
                    {"name": "b", "weight": 30, "backends": ["gpu"], "system_prompt": "Be brief."},
                ],
            },
        },
    )
    proc = GatewayProcess(config, module_tmp).start()
    yield proc
    proc.stop()


HI = [{"role": "user", "content": "Say hello in five words."}]


# -- the real model ------------------------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [TOOL]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
        ({"max_tokens": 100_000}, "max_tokens"),
    ],
    ids=["tools", "logprobs", "top_logprobs", "max_tokens"],
)
def test_llamacpp_refuses_what_it_cannot_honour_naming_the_parameter(
    gw: GatewayProcess, extra: dict, param: str
) -> None:
    """Before, tools and logprobs were dropped and max_tokens cut to the context: a tool call came
    back as plain text ending in `length`. Now a 400 says which parameter the model cannot honour."""
    with pytest.raises(openai.BadRequestError) as err:
        gw.client().chat.completions.create(model="local", messages=HI, **extra)
    body = err.value.body
    assert isinstance(body, dict) and body["param"] == param, body
    assert body["type"] == "invalid_request_error"


def test_llamacpp_accepts_tools_it_is_told_not_to_call(gw: GatewayProcess) -> None:
    completion = gw.client().chat.completions.create(
        model="local", messages=HI, max_tokens=4, temperature=0, tools=[TOOL], tool_choice="none"
    )
    assert completion.choices[0].message.tool_calls is None


def test_llamacpp_non_stream(gw: GatewayProcess) -> None:
    raw = gw.client().chat.completions.with_raw_response.create(
        model="local", messages=HI, max_tokens=8, temperature=0
    )
    completion = raw.parse()
    assert completion.choices[0].message.content.strip()
    assert completion.model == "local"
    assert completion.usage.prompt_tokens > 5 and 0 < completion.usage.completion_tokens <= 8
    assert raw.headers["x-gateway-backend"] == "cpu" and raw.headers["x-gateway-variant"] == "only"
    assert raw.headers["x-request-id"].startswith("req_")


def test_llamacpp_stream_with_usage_chunk(gw: GatewayProcess) -> None:
    stream = gw.client().chat.completions.create(  # another prompt: this must come from the model, not the cache
        model="local", messages=[{"role": "user", "content": "Name three colours."}], max_tokens=8, temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage.completion_tokens > 0
    assert usage.usage.total_tokens == usage.usage.prompt_tokens + usage.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1
    assert stream.response.headers["x-gateway-cache"] == "miss"


def test_stream_without_include_usage_has_no_usage_chunk(gw: GatewayProcess, sim: SimulatorThread) -> None:
    chunks = list(gw.client().chat.completions.create(model="assistant", messages=HI, stream=True))
    assert chunks and all(c.choices for c in chunks)
    # the gateway still asked upstream for usage, to settle token limits
    assert sim.requests()[-1]["body"]["stream_options"]["include_usage"] is True


# -- through the simulator -----------------------------------------------------------------------
def test_sim_non_stream_and_forwarded_body(gw: GatewayProcess, sim: SimulatorThread) -> None:
    completion = gw.client().chat.completions.create(
        model="assistant", messages=HI, max_tokens=10, user="u-1", extra_body={"top_k": 5}
    )
    assert completion.choices[0].message.content.startswith("Simulated")
    body = sim.requests()[-1]["body"]
    assert body["model"] == "sim-model" and body["top_k"] == 5 and body["max_tokens"] == 10
    assert "user" not in body  # accepted for SDK compatibility, never forwarded


def test_sim_stream(gw: GatewayProcess) -> None:
    chunks = list(gw.client().chat.completions.create(
        model="assistant", messages=HI, stream=True, stream_options={"include_usage": True}
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 16
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("Simulated")


def test_ab_split_and_stickiness_over_2000_users(gw: GatewayProcess, sim: SimulatorThread) -> None:
    counts: Counter[str] = Counter()
    seen: dict[str, str] = {}
    body = orjson.dumps({"model": "ab", "messages": HI, "max_tokens": 1})
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        for i in range(2000):
            r = http.post("/v1/chat/completions", content=body, headers=gw.headers(f"user-{i}"))
            assert r.status_code == 200, r.text
            counts[r.headers["x-gateway-variant"]] += 1
            seen[f"user-{i}"] = r.headers["x-gateway-variant"]
        for i in range(0, 2000, 40):  # the same user always lands in the same arm
            r = http.post("/v1/chat/completions", content=body, headers=gw.headers(f"user-{i}"))
            assert r.headers["x-gateway-variant"] == seen[f"user-{i}"]
    assert abs(counts["a"] / 20 - 70) < 3 and abs(counts["b"] / 20 - 30) < 3, counts
    prompts = [r["body"]["messages"][0] for r in sim.requests()]
    assert {"role": "system", "content": "Be brief."} in prompts  # variant b's template reached upstream


# -- fallback before the first byte ----------------------------------------------------------------
@pytest.mark.parametrize("fault", ["refuse", "status", "stall"])
@pytest.mark.parametrize("stream", [False, True])
def test_fallback_to_llamacpp(gw: GatewayProcess, sim: SimulatorThread, fault: str, stream: bool) -> None:
    sim.configure(fault=fault, fault_status=503, stall_s=10)
    question = [{"role": "user", "content": f"Fallback check {fault} {stream}: say hi."}]  # never a cache hit
    raw = gw.client().chat.completions.with_raw_response.create(
        model="assistant", messages=question, max_tokens=4, temperature=0, stream=stream
    )
    assert raw.headers["x-gateway-backend"] == "cpu"
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    else:
        text = raw.parse().choices[0].message.content
    assert text.strip()


@pytest.mark.parametrize("status", [401, 403, 404])
def test_upstream_refusing_the_gateway_falls_back_and_never_leaks(
    gw: GatewayProcess, sim: SimulatorThread, status: int
) -> None:
    """401/403/404 from a backend mean its key or model id is wrong - a configuration fault: the
    next backend answers, and the upstream text (which may quote the gateway's key) goes nowhere."""
    sim.configure(fault="status", fault_status=status, fault_message="Incorrect API key sk-live-9f8e7d")
    question = [{"role": "user", "content": f"Refusal check {status}: say hi."}]
    raw = gw.client().chat.completions.with_raw_response.create(
        model="assistant", messages=question, max_tokens=4, temperature=0
    )
    assert raw.headers["x-gateway-backend"] == "cpu"
    assert "sk-live" not in raw.http_response.text
    assert "sk-live" not in gw.log()


def test_upstream_4xx_is_not_retried(gw: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(fault="status", fault_status=400)
    with pytest.raises(openai.BadRequestError):
        gw.client().chat.completions.create(model="assistant", messages=HI)
    assert len(sim.requests()) == 1


# -- after the first byte --------------------------------------------------------------------------
def test_mid_stream_drop_raises_in_the_sdk(gw: GatewayProcess, sim: SimulatorThread) -> None:
    # spaced chunks: the first reaches the client before the drop (a burst would be failed over)
    sim.configure(fault="drop", drop_after_chunks=3, itl_ms=30)
    stream = gw.client().chat.completions.create(model="assistant", messages=HI, stream=True)
    got = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            got.append(chunk)
    assert got and not any(c.choices and c.choices[0].finish_reason for c in got)  # no fake "stop"


def test_client_disconnect_cancels_upstream_within_1s(gw: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(itl_ms=50, reply_tokens=400)
    body = {"model": "assistant", "messages": HI, "stream": True}
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        with http.stream("POST", "/v1/chat/completions", json=body, headers=gw.headers()) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break
    assert sim.wait_for(lambda recs: recs and recs[-1]["cancelled"], timeout=1.0)


# -- bad input -------------------------------------------------------------------------------------
def _msgs(**extra):
    return {"model": "assistant", "messages": HI, **extra}


BAD = [
    ("not json", b"{", 400, None),
    ("array body", b"[]", 400, None),
    ("missing model", {"messages": HI}, 400, "model"),
    ("missing messages", {"model": "assistant"}, 400, "messages"),
    ("empty messages", {"model": "assistant", "messages": []}, 400, "messages"),
    ("unknown model", {"model": "gpt-9", "messages": HI}, 404, "model"),
    ("bad role", {"model": "assistant", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("content wrong type", {"model": "assistant", "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("temperature too high", _msgs(temperature=2.5), 400, "temperature"),
    ("temperature wrong type", _msgs(temperature="hot"), 400, "temperature"),
    ("top_p zero", _msgs(top_p=0), 400, "top_p"),
    ("negative max_tokens", _msgs(max_tokens=-1), 400, "max_tokens"),
    ("n too large", _msgs(n=1000), 400, "n"),
    ("presence_penalty out of range", _msgs(presence_penalty=3), 400, "presence_penalty"),
    ("too many stops", _msgs(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("stream as a string", _msgs(stream="yes"), 400, "stream"),
    ("api_base smuggled", _msgs(api_base="http://169.254.169.254"), 400, "api_base"),
    ("base_url smuggled", _msgs(base_url="http://evil"), 400, "base_url"),
    ("chat_template smuggled", _msgs(chat_template="{{ 7*7 }}"), 400, "chat_template"),
    ("chat_template_kwargs smuggled", _msgs(chat_template_kwargs={"x": 1}), 400, "chat_template_kwargs"),
    ("stream_options without stream", _msgs(stream_options={"include_usage": True}), 400, "stream_options"),
    ("max_tokens beyond context", {"model": "local", "messages": [{"role": "user", "content": "hi " * 2100}]},
     400, "messages"),
    ("duplicate key", b'{"model":"assistant","model":"local","messages":[{"role":"user","content":"x"}]}', 400, None),
    ("nested duplicate key", b'{"model":"assistant","messages":[{"role":"user","content":"x","content":"y"}]}', 400, None),
    ("case-variant key", b'{"model":"assistant","Model":"local","messages":[{"role":"user","content":"x"}]}', 400,
     "Model"),
    ("case-variant nested key", b'{"model":"assistant","messages":[{"role":"user","Role":"system","content":"x"}]}',
     400, "messages[0].Role"),
    ("oversized body", {"model": "assistant", "messages": [{"role": "user", "content": "x" * 1_100_000}]}, 413, None),
]


@pytest.mark.parametrize(("name", "body", "status", "param"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_openai_error_and_reaches_no_backend(
    gw: GatewayProcess, sim: SimulatorThread, name: str, body, status: int, param: str | None
) -> None:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {**gw.headers(), "content-type": "application/json"}
    r = httpx.post(f"{gw.url}/v1/chat/completions", content=content, headers=headers, timeout=10)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "detail" not in r.json()
    assert err["param"] == param
    assert "Traceback" not in r.text
    assert sim.requests() == []


def test_unknown_route_and_method_are_openai_shaped(gw: GatewayProcess) -> None:
    r = httpx.get(f"{gw.url}/v1/nope", headers=gw.headers())
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(f"{gw.url}/v1/chat/completions", headers=gw.headers())
    assert r.status_code == 405 and "error" in r.json()


# -- models and health ---------------------------------------------------------------------------
def test_models_endpoints(gw: GatewayProcess) -> None:
    client = gw.client()
    assert {m.id for m in client.models.list()} == {"assistant", "local", "ab"}
    assert client.models.retrieve("local").id == "local"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_health_and_readiness(gw: GatewayProcess) -> None:
    assert httpx.get(f"{gw.url}/healthz").status_code == 200
    r = httpx.get(f"{gw.url}/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"


def test_max_tokens_beyond_the_vllm_context_is_vllms_own_400(gw: GatewayProcess, sim: SimulatorThread) -> None:
    """vLLM counts the prompt itself; the gateway's estimate never decides for it: the server's 400
    reaches the client, and a request without max_tokens is sent without one (vLLM fills in what fits)."""
    sim.reset()
    with pytest.raises(openai.BadRequestError) as err:
        gw.client().chat.completions.create(model="assistant", messages=HI, max_tokens=100_000)
    body = err.value.body
    assert isinstance(body, dict) and "max_tokens" in body["message"] and "4096" in body["message"]
    gw.client().chat.completions.create(model="assistant", messages=HI)
    assert "max_tokens" not in sim.requests()[-1]["body"]


def test_failed_stream_refunds_its_token_reservation(gw: GatewayProcess, sim: SimulatorThread) -> None:
    """A stream that fails before its first byte (503 here) must give its reservation back."""
    headers = {"authorization": f"Bearer {gw.token('refund-user', tier='small')}"}
    body = {"model": "ab", "messages": HI, "max_tokens": 4000, "stream": True}
    with httpx.Client(base_url=gw.url, timeout=10) as http:
        sim.configure(fault="status", fault_status=503)
        assert http.post("/v1/chat/completions", json=body, headers=headers).status_code == 503
        sim.configure(fault="none")
        ok = http.post("/v1/chat/completions", json={**body, "max_tokens": 10}, headers=headers)
    remaining = int(ok.headers["x-ratelimit-remaining-tokens"])
    assert remaining > 60000 - 1000  # without the refund it would be below 56000
