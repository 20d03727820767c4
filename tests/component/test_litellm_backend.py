"""LiteLLMBackend against the vLLM simulator over real HTTP, through litellm's `hosted_vllm/` provider."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from backends.base import BackendError, ErrorKind
from backends.litellm import LiteLLMBackend
from loadtest.vllm_sim import SimulatorThread
from proxy.settings import LiteLLMBackendSettings

# Raised inside litellm's stream handling, where it turns any exception into a MidStreamFallbackError:
# pydantic warns once per TypedDict schema litellm builds lazily, and litellm reads
# `model_computed_fields` off an instance when it assembles the usage chunk.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:Items? .* on TypedDict class .* using the `ReadOnly` qualifier:UserWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:Accessing the 'model_(computed_)?fields' attribute on the instance is deprecated"
        ":DeprecationWarning"
    ),
]

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What is the capital of France?"
ANSWER = (
    "Simulated answer to: What is the capital of France? lorem ipsum dolor sit amet consectetur adipiscing"
)
BODY: dict[str, Any] = {"model": "hosted_vllm/sim-model", "messages": [{"role": "user", "content": QUESTION}]}


def settings(sim: SimulatorThread, **changes: Any) -> LiteLLMBackendSettings:
    base = {"type": "litellm", "model": "hosted_vllm/sim-model", "api_base": sim.url + "/v1",
            "first_token_timeout_s": 5.0, "request_timeout_s": 5.0}  # fmt: skip
    return LiteLLMBackendSettings(**(base | changes))


async def started(cfg: LiteLLMBackendSettings) -> LiteLLMBackend:
    backend = LiteLLMBackend("hosted", cfg)
    await backend.start()
    return backend


@pytest.fixture
async def backend(sim: SimulatorThread) -> AsyncIterator[LiteLLMBackend]:
    b = await started(settings(sim))
    yield b
    await b.close()


def cancelled(records: list[dict[str, Any]]) -> bool:
    return bool(records) and bool(records[-1]["cancelled"])


async def fails(call: Any) -> BackendError:
    with pytest.raises(BackendError) as info:
        await call
    return info.value


async def drain(backend: LiteLLMBackend, body: dict[str, Any]) -> list[dict[str, Any]]:
    stream = await backend.stream(body)
    try:
        first = await anext(aiter(stream))  # how the pipeline reads: first chunk, then the rest
        return [first] + [chunk async for chunk in stream]
    finally:
        await stream.aclose()


async def test_chat_returns_openai_shape_with_usage(backend: LiteLLMBackend, sim: SimulatorThread) -> None:
    out = await backend.chat(
        BODY | {"max_tokens": 5, "temperature": 0.0, "top_k": 3, "user": "not-forwarded"}
    )
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["content"] == "Simulated answer to: What is"
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == 10 and out["usage"]["completion_tokens"] == 5
    assert "provider_specific_fields" not in out and "provider_specific_fields" not in out["choices"][0]
    sent = sim.requests()[-1]["body"]
    assert sent["model"] == "sim-model" and "stream" not in sent and "user" not in sent
    assert (sent["max_tokens"], sent["temperature"], sent["top_k"]) == (5, 0.0, 3)


async def test_stream_yields_chunks_finish_reason_and_usage_last(backend: LiteLLMBackend) -> None:
    chunks = await drain(backend, BODY | {"stream_options": {"include_usage": True}})
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
    assert text == ANSWER
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch.get("finish_reason")] == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 16
    assert not any(c.get("usage") for c in chunks[:-1])


async def test_stream_without_include_usage_has_no_usage_chunk(backend: LiteLLMBackend) -> None:
    chunks = await drain(backend, BODY)
    assert all(c["choices"] and not c.get("usage") for c in chunks)


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize(
    ("fault", "kind"),
    [
        ({"fault": "status", "fault_status": 503}, ErrorKind.UPSTREAM_5XX),
        ({"fault": "status", "fault_status": 500}, ErrorKind.UPSTREAM_5XX),
        ({"fault": "status", "fault_status": 429}, ErrorKind.RATE_LIMITED),
        ({"fault": "refuse"}, ErrorKind.CONNECT),
    ],
)
async def test_retryable_failures_before_the_first_byte(
    backend: LiteLLMBackend, sim: SimulatorThread, fault: dict[str, Any], kind: ErrorKind, streaming: bool
) -> None:
    sim.configure(**fault)
    err = await fails(backend.stream(BODY) if streaming else backend.chat(BODY))
    assert err.kind is kind and err.retryable
    assert "http" not in err.message and "127.0.0.1" not in err.message
    assert len(sim.requests()) <= 1  # litellm does not retry behind the pool's back


@pytest.mark.parametrize("streaming", [False, True])
async def test_400_is_a_bad_request_with_the_upstream_message(
    backend: LiteLLMBackend, sim: SimulatorThread, streaming: bool
) -> None:
    sim.configure(fault="status", fault_status=400)
    err = await fails(backend.stream(BODY) if streaming else backend.chat(BODY))
    assert (err.kind, err.status, err.message, err.retryable) == (
        ErrorKind.BAD_REQUEST, 400, "Simulated fault.", False
    )  # fmt: skip


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_refusals_of_the_gateway_hide_the_upstream_text(
    backend: LiteLLMBackend, sim: SimulatorThread, status: int
) -> None:
    sim.configure(fault="status", fault_status=status, fault_message="Incorrect API key: sk-live-1234")
    err = await fails(backend.chat(BODY))
    assert (err.kind, err.status, err.retryable) == (ErrorKind.REFUSED, status, True)
    assert err.message == f"The model server refused the gateway ({status})."


async def test_context_window_exceeded_is_a_bad_request(
    backend: LiteLLMBackend, sim: SimulatorThread
) -> None:
    sim.configure(max_model_len=32)
    err = await fails(backend.chat({**BODY, "messages": [{"role": "user", "content": "word " * 100}]}))
    assert (err.kind, err.param, err.retryable) == (ErrorKind.BAD_REQUEST, "messages", False)
    assert "maximum context length" in err.message


async def test_a_parameter_the_provider_lacks_is_a_bad_request(sim: SimulatorThread) -> None:
    backend = await started(settings(sim, model="anthropic/claude-3-5-haiku-latest", api_key="k"))
    try:
        err = await fails(backend.chat(BODY | {"logit_bias": {"1": 1.0}}))
    finally:
        await backend.close()
    assert (err.kind, err.status) == (ErrorKind.BAD_REQUEST, 400)
    assert err.message == "The model does not support a parameter: ['logit_bias']."
    assert sim.requests() == []  # refused by litellm before any request


async def first_chunk(backend: LiteLLMBackend, body: dict[str, Any]) -> dict[str, Any]:
    stream = await backend.stream(body)
    try:
        return await anext(aiter(stream))
    finally:
        await stream.aclose()


@pytest.mark.parametrize(
    ("fault", "call"),
    [
        ({"fault": "stall", "stall_s": 5}, "stream"),  # nothing at all, not even headers
        ({"ttft_ms": 5000}, "stream"),  # headers at once, then no first chunk
        ({"fault": "stall", "stall_s": 5}, "chat"),
    ],
)
async def test_no_answer_in_time_is_a_timeout(sim: SimulatorThread, fault: dict[str, Any], call: str) -> None:
    sim.configure(**fault)
    # first_token_timeout_s bounds a stream, request_timeout_s a whole non-stream request
    backend = await started(settings(sim, first_token_timeout_s=0.3, request_timeout_s=0.6))
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        err = await fails(first_chunk(backend, BODY) if call == "stream" else backend.chat(BODY))
    finally:
        await backend.close()
    assert err.kind is ErrorKind.TIMEOUT and err.retryable
    assert (0.25 if call == "stream" else 0.55) < loop.time() - began < 1.5
    await asyncio.to_thread(sim.wait_for, cancelled, 2)  # the upstream request was closed


async def test_drop_before_the_first_chunk_is_retryable(
    backend: LiteLLMBackend, sim: SimulatorThread
) -> None:
    sim.configure(fault="drop", drop_after_chunks=0)
    err = await fails(first_chunk(backend, BODY))
    assert err.kind is ErrorKind.CONNECT and err.retryable


async def test_drop_after_the_first_chunk_is_mid_stream(
    backend: LiteLLMBackend, sim: SimulatorThread
) -> None:
    sim.configure(fault="drop", drop_after_chunks=2)
    stream = await backend.stream(BODY)
    got: list[dict[str, Any]] = []
    try:
        with pytest.raises(BackendError) as info:
            async for chunk in stream:
                got.append(chunk)
    finally:
        await stream.aclose()
    assert got and info.value.kind is ErrorKind.MID_STREAM and not info.value.retryable


async def test_aclose_after_the_first_chunk_closes_the_upstream(
    backend: LiteLLMBackend, sim: SimulatorThread
) -> None:
    sim.configure(itl_ms=50, reply_tokens=200)
    stream = await backend.stream(BODY)
    first = await anext(aiter(stream))
    assert first["choices"]
    await stream.aclose()
    await stream.aclose()  # idempotent
    records = await asyncio.to_thread(sim.wait_for, cancelled, 2)
    assert not records[-1]["completed"]


async def test_start_without_litellm_is_a_clear_error(
    sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "litellm", None)  # makes `import litellm` raise ImportError
    backend = LiteLLMBackend("hosted", settings(sim))
    with pytest.raises(RuntimeError, match=r"backend hosted has type litellm: install the extra"):
        await backend.start()
    await backend.close()  # safe after a failed start


def test_importing_the_backend_module_does_not_import_litellm() -> None:
    code = "import sys, backends.litellm; assert 'litellm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=30)


async def test_a_legacy_completion_is_refused_not_sent_as_a_chat_turn(backend: LiteLLMBackend) -> None:
    from backends.base import RAW_PROMPT

    body = {"model": "x", "messages": [{"role": "user", "content": "Once upon"}], RAW_PROMPT: True}
    with pytest.raises(BackendError) as err:
        await backend.chat(body)
    assert err.value.kind is ErrorKind.BAD_REQUEST and err.value.status == 400
