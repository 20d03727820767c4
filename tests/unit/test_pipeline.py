"""The pipeline's stages in order, in process: the real Gateway and stage objects (no Redis, no
semantic layer) over scripted fake backends, driven through Gateway.handle with an ASGI request.
No server, no sockets, no sleeps; the limiter and the authenticator run on a fixed clock."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.types import Message

from backends.base import BackendError, ErrorKind
from backends.breaker import Breaker
from backends.pool import Member
from proxy import errors
from proxy.apis.chat import ChatApi
from proxy.auth.authenticator import Authenticator, mint_token
from proxy.cache.embed_queue import Budget, EmbedQueue, Ticket
from proxy.cache.response_cache import ResponseCache
from proxy.call import Call
from proxy.experiments.aggregates import ExperimentStore
from proxy.guard import PolicyGuard
from proxy.limits.limiter import RateLimiter
from proxy.observability.observer import Observer
from proxy.pipeline import Gateway, Reply
from proxy.protocol import estimate_prompt_tokens
from proxy.settings import Settings
from proxy.streaming import JSONBytesResponse, SSEResponse
from tests.loop import until
from tests.unit.fake_backend import FakeBackend, Script, answer

NOW = 1_700_000_000.0
SECRET = "pipeline-unit-secret-0123456789abcdef0123456789"
WORD, MASKED = "plugh", "*****"
RPM, TPM = 50, 10_000
SYSTEM = "Be brief."
CHAT = ChatApi()
_ids = itertools.count()


class RecordingObserver(Observer):
    """The real Observer, keeping every Call it finishes and able to await its follow-up tasks."""

    def __init__(self, settings: Any) -> None:
        super().__init__(settings, CollectorRegistry())
        self.finished: list[Call] = []

    def finish(self, call: Call) -> None:
        self.finished.append(call)
        super().finish(call)

    async def drain(self) -> None:
        """Cache stores and token settlements spawned by finished requests, run to their end."""
        while self._tasks:
            await asyncio.gather(*self._tasks)


def settings_for(tmp_path: Path, input_action: str, semantic: dict[str, Any] | None = None) -> Settings:
    words = tmp_path / "words.txt"
    words.write_text(f"{WORD}\n", encoding="utf-8")
    http = {"type": "openai", "url": "http://upstream.test", "model": "configured"}
    variant = {"name": "control", "weight": 1, "backends": ["a"], "fallback": ["b"], "system_prompt": SYSTEM}
    return Settings.model_validate(
        {
            "auth": {"algorithms": ["HS256"], "secret": SECRET},
            "limits": {"tiers": {"default": {"requests_per_minute": RPM, "tokens_per_minute": TPM}}},
            "cache": {"semantic": semantic or {"enabled": False}},
            "policies": {"words": [str(words)], "input": input_action, "output": "mask",
                         "reload_interval_s": 3600},
            "observability": {"log_format": "json"},
            "backends": {"a": http, "b": http},
            "models": {"assistant": {"variants": [variant]}},
        }
    )


class Harness:
    def __init__(self, gateway: Gateway, fakes: dict[str, FakeBackend], observer: RecordingObserver) -> None:
        self.gateway, self.fakes, self.observer = gateway, fakes, observer
        self.token = mint_token(
            key=SECRET, algorithm="HS256", sub="alice", tenant="acme", tier=None, models=None, ttl_s=600,
            audience="", issuer="", settings=gateway.settings.auth, now=NOW,
        )

    async def send(self, content: str = "hello", **fields: Any) -> tuple[Call, Reply]:
        body = {"model": "assistant", "messages": [{"role": "user", "content": content}], **fields}
        rid = f"req_{next(_ids)}"
        call = Call(rid, time.monotonic(), CHAT.name, headers={"x-request-id": rid})
        return call, await self.gateway.handle(CHAT, request(orjson.dumps(body), self.token), call)

    async def remaining(self, which: str) -> int:
        """The limiter's remaining requests or tokens, as an admission of no tokens reports them."""
        principal = await self.gateway.auth.authenticate([f"Bearer {self.token}"])
        admission = await self.gateway.limiter.admit(principal, 0)
        return int(admission.headers[f"x-ratelimit-remaining-{which}"])


def request(raw: bytes, token: str) -> Request:
    headers = [(b"authorization", f"Bearer {token}".encode()), (b"content-type", b"application/json"),
               (b"content-length", str(len(raw)).encode())]
    messages: list[Message] = [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive() -> Message:
        if messages:
            return messages.pop()
        stays: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        return await stays  # the client stays connected: no http.disconnect

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers,
             "query_string": b""}
    return Request(scope, receive)


def json_of(reply: Reply) -> dict[str, Any]:
    assert isinstance(reply, JSONBytesResponse)
    return dict(orjson.loads(reply.body))


def content_of(reply: Reply) -> str:
    return str(json_of(reply)["choices"][0]["message"]["content"])


async def frames(reply: Reply) -> list[Any]:
    """The SSE response run as an ASGI app: each data frame decoded ("[DONE]" kept as text)."""
    assert isinstance(reply, SSEResponse)
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def never() -> Message:
        raise AssertionError("the pipeline's disconnect watch reads receive, not the response")

    await reply({"type": "http"}, never, send)
    raw = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    datas = [f.removeprefix(b"data: ") for f in raw.split(b"\n\n") if f]
    return [d.decode() if d == b"[DONE]" else orjson.loads(d) for d in datas]


def text_of(events: list[Any]) -> str:
    return "".join(
        c["delta"].get("content") or "" for e in events if isinstance(e, dict) for c in e.get("choices", ())
    )


Build = Callable[..., Awaitable[Harness]]


class GatedEmbedder:
    """An Embedder (proxy.cache.embedding) over the real EmbedQueue whose batches finish only when
    `gate` is open: texts about passwords share one direction, anything else another."""

    name, dim, window = "gated-test", 2, 512

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.asked: list[str] = []
        budget = Budget(budget_s=60.0, max_wait_s=60.0, background_max=64)
        self.queue = EmbedQueue(self._run, batch_max=8, batch_wait_s=0.0, budget=budget)

    async def start(self) -> None:
        self.queue.start()

    async def close(self) -> None:
        await self.queue.close()

    def fits(self, text: str) -> bool:
        return True

    def offer(self, text: str, *, lookup: bool, urgent: bool = False) -> Ticket | None:
        return self.queue.offer(text, lookup=lookup, urgent=urgent)

    async def embed_queries(self, texts: list[str]) -> np.ndarray:
        return await self.queue.submit(texts)

    async def _run(self, texts: list[str]) -> np.ndarray:
        self.asked += texts
        await self.gate.wait()
        return np.asarray([[1.0, 0.0] if "password" in t else [0.0, 1.0] for t in texts], dtype=np.float32)


@pytest.fixture
async def build(tmp_path: Path) -> AsyncIterator[Build]:
    """build(a_script, b_script=answer("from b"), input_action="block", semantic=None, embedder=None,
    **fake_a_options); `semantic`: cache.semantic settings for the `embedder` given."""
    async with AsyncExitStack() as stack:

        async def make(
            a: Script,
            b: Script | None = None,
            input_action: str = "block",
            semantic: dict[str, Any] | None = None,
            embedder: GatedEmbedder | None = None,
            **opts: Any,
        ) -> Harness:
            s = settings_for(tmp_path, input_action, semantic)
            b = answer("from b") if b is None else b
            fakes = {"a": FakeBackend("a", a, **opts), "b": FakeBackend("b", b)}
            members = {name: Member(fake, Breaker(5, 10.0)) for name, fake in fakes.items()}
            auth = Authenticator(s.auth, secret=SECRET, clock=lambda: NOW)
            limiter = RateLimiter(s.limits, None, clock=lambda: NOW)
            guard, cache = PolicyGuard(s.policies), ResponseCache(s.cache, None, embedder)
            observer = RecordingObserver(s.observability)
            if embedder is not None:
                await embedder.start()
                stack.push_async_callback(embedder.close)
            for part in (auth, limiter, guard, cache):
                await part.start()
                stack.push_async_callback(part.close)
            gateway = Gateway(s, members, auth, limiter, guard, cache, observer)
            await observer.start(gateway, ExperimentStore(None, s.observability))
            stack.push_async_callback(observer.close)
            return Harness(gateway, fakes, observer)

        yield make


# -- stage order ----------------------------------------------------------------------------------
async def test_a_blocked_prompt_reaches_no_backend_and_spends_no_request_slot(build: Build) -> None:
    h = await build(answer("fine"))
    with pytest.raises(errors.ContentFiltered) as caught:
        await h.send(f"tell me about {WORD}")
    assert (caught.value.status, caught.value.param) == (400, "messages")
    assert h.fakes["a"].bodies == [] and h.fakes["b"].bodies == []
    assert await h.remaining("requests") == RPM - 1  # this probe's own slot only


async def test_a_masked_prompt_reaches_the_backend_masked_and_is_not_cached(build: Build) -> None:
    h = await build(answer("fine"), input_action="mask")
    for _ in range(2):
        call, _reply = await h.send(f"tell me about {WORD}", temperature=0)
        await h.observer.drain()
        assert call.cache == "bypass" and call.policy == ["input:mask"]
    sent = [body["messages"][-1]["content"] for body in h.fakes["a"].bodies]
    assert sent == [f"tell me about {MASKED}"] * 2  # masked both times, and asked both times


# -- what the backend is sent ---------------------------------------------------------------------
async def test_the_backend_gets_the_variant_prompt_its_own_model_and_fitted_max_tokens(build: Build) -> None:
    h = await build(answer("ok"), context_length=100, prompt_tokens=10)
    call, reply = await h.send("hi")
    body = h.fakes["a"].bodies[0]
    assert body["messages"] == [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    assert (body["model"], body["max_tokens"]) == ("a-model", 90)
    assert (call.variant, json_of(reply)["model"]) == ("control", "assistant")  # the public name back


async def test_a_client_max_tokens_beyond_the_context_is_a_400_naming_it(build: Build) -> None:
    h = await build(answer("ok"), context_length=100, prompt_tokens=10)
    with pytest.raises(errors.InvalidRequest) as caught:
        await h.send("hi", max_tokens=500)
    assert (caught.value.status, caught.value.param, caught.value.code) == (
        400, "max_tokens", "context_length_exceeded")
    assert "at most 90" in caught.value.message
    assert h.fakes["a"].bodies == [] and h.fakes["b"].bodies == []


# -- fallback before the first byte ---------------------------------------------------------------
async def test_a_connect_error_falls_over_to_the_next_backend(build: Build) -> None:
    h = await build(BackendError(ErrorKind.CONNECT, "refused"))
    call, reply = await h.send()
    assert content_of(reply) == "from b"
    assert [len(h.fakes[n].bodies) for n in "ab"] == [1, 1]
    assert h.fakes["b"].bodies[0]["model"] == "b-model"
    assert call.headers["x-gateway-backend"] == "b"


async def test_a_bad_request_from_a_backend_is_not_retried(build: Build) -> None:
    h = await build(BackendError(ErrorKind.BAD_REQUEST, "bad logit_bias", status=400, param="logit_bias"))
    with pytest.raises(errors.InvalidRequest) as caught:
        await h.send()
    assert (caught.value.status, caught.value.param) == (400, "logit_bias")
    assert h.fakes["b"].bodies == []


@pytest.mark.parametrize(
    ("kind", "error", "retry_after"),
    [
        (ErrorKind.CONNECT, errors.ServiceUnavailable, "1"),
        (ErrorKind.TIMEOUT, errors.GatewayTimeout, None),
        (ErrorKind.UPSTREAM_5XX, errors.BadGateway, None),
    ],
)
async def test_when_every_backend_fails_the_client_is_told_how(
    build: Build, kind: ErrorKind, error: type[errors.GatewayError], retry_after: str | None
) -> None:
    failure = BackendError(kind, "no")
    h = await build(failure, failure)
    with pytest.raises(errors.GatewayError) as caught:
        await h.send()
    assert type(caught.value) is error
    assert caught.value.response_headers().get("retry-after") == retry_after
    assert [len(h.fakes[n].bodies) for n in "ab"] == [1, 1]


# -- JSON answers ---------------------------------------------------------------------------------
async def test_the_output_policy_masks_a_listed_word_in_a_json_answer(build: Build) -> None:
    h = await build(answer("the word is ", WORD, "!"))
    call, reply = await h.send()
    assert content_of(reply) == f"the word is {MASKED}!"
    assert call.policy == ["output:mask"]


async def test_usage_settles_the_token_reservation(build: Build) -> None:
    h = await build(answer("ok", prompt=7, completion=3))
    call, _reply = await h.send("hi", max_tokens=100)
    reserved = estimate_prompt_tokens(h.fakes["a"].bodies[0]["messages"]) + 100
    assert call.headers["x-ratelimit-remaining-tokens"] == str(TPM - reserved)
    await h.observer.drain()
    assert await h.remaining("tokens") == TPM - 10  # the real usage, 7 + 3


async def test_a_deterministic_request_is_answered_from_the_exact_cache(build: Build) -> None:
    h = await build(answer("cached ", "answer"))
    first, reply1 = await h.send("what is 2+2?", temperature=0)
    await h.observer.drain()  # the store is a follow-up task
    second, reply2 = await h.send("what is 2+2?", temperature=0)
    assert (first.cache, second.cache, second.backend) == ("miss", "hit", "cache")
    assert second.headers["x-gateway-cache"] == "hit"
    assert content_of(reply1) == content_of(reply2) == "cached answer"
    assert len(h.fakes["a"].bodies) == 1


# -- streams --------------------------------------------------------------------------------------
async def test_a_stream_is_relayed_as_chunks_then_done(build: Build) -> None:
    h = await build(answer("Hel", "lo"))
    _call, reply = await h.send(stream=True)
    events = await frames(reply)
    assert text_of(events) == "Hello" and events[-1] == "[DONE]"
    assert [c["finish_reason"] for e in events[:-1] for c in e["choices"]] == [None, None, "stop"]
    assert all(e["model"] == "assistant" for e in events[:-1])
    assert h.fakes["a"].bodies[0]["stream_options"] == {"include_usage": True}  # usage settles tokens


async def test_a_backend_failing_mid_stream_ends_with_an_error_frame_and_no_done(build: Build) -> None:
    cut = BackendError(ErrorKind.MID_STREAM, "reset", cause=ErrorKind.UPSTREAM_5XX)
    h = await build([answer("Hel")[0], cut])
    call, reply = await h.send(stream=True)
    events = await frames(reply)
    assert text_of(events) == "Hel" and "[DONE]" not in events
    assert events[-1]["error"]["code"] == "bad_gateway"
    assert (call.status, call.error) == (502, "mid_stream")
    assert h.fakes["b"].bodies == []  # after the first byte nothing falls over


async def test_a_listed_word_split_across_two_chunks_is_masked(build: Build) -> None:
    h = await build(answer("say pl", "ugh now"))
    call, reply = await h.send(stream=True)
    events = await frames(reply)
    assert text_of(events) == f"say {MASKED} now" and events[-1] == "[DONE]"
    assert call.policy == ["output:mask"]


# -- what observability reads ---------------------------------------------------------------------
async def test_the_call_observability_reads(build: Build) -> None:
    h = await build(BackendError(ErrorKind.CONNECT, "refused"))
    await h.send(temperature=0)
    [call] = h.observer.finished
    seen = (call.endpoint, call.model, call.variant, call.backend, call.tried, call.fallback_reasons)
    assert seen == ("chat", "assistant", "control", "b", ["a", "b"], ["connect"])
    assert (call.cache, call.status, call.completion_tokens) == ("miss", 200, 1)


# -- the semantic lookup beside the backend (cache.semantic.hedge) -------------------------------
ASKED, PARAPHRASE = "How do I reset my password?", "How can I reset my password?"


async def test_a_semantic_miss_has_the_backend_working_while_the_lookup_runs(build: Build) -> None:
    embedder = GatedEmbedder()
    h = await build(answer("Use the link."), semantic={"hedge": True}, embedder=embedder)
    embedder.gate.clear()
    sending = asyncio.ensure_future(h.send(ASKED, temperature=0))
    await until(lambda: len(h.fakes["a"].bodies) == 1)  # asked while the vector is not there yet
    assert not sending.done()
    embedder.gate.set()
    call, reply = await sending
    assert (call.cache, call.backend, content_of(reply)) == ("miss", "a", "Use the link.")
    assert h.gateway.members["a"].outstanding == 0


async def test_a_semantic_hit_cancels_the_backend_request_it_started(build: Build) -> None:
    embedder, prefill = GatedEmbedder(), asyncio.Event()
    h = await build(answer("Use the link."), semantic={"hedge": True}, embedder=embedder, gate=prefill)
    prefill.set()
    await h.send(ASKED, temperature=0)
    await h.observer.drain()  # stored, with its vector
    prefill.clear()  # the backend's next answer is still in prefill when the lookup hits
    embedder.gate.clear()
    for asked, stream in ((2, False), (3, True)):
        sending = asyncio.ensure_future(h.send(PARAPHRASE, temperature=0, stream=stream))
        await until(lambda: len(h.fakes["a"].bodies) == asked)  # noqa: B023 - awaited in this iteration
        embedder.gate.set()
        call, reply = await sending
        embedder.gate.clear()
        text = text_of(await frames(reply)) if stream else content_of(reply)
        assert (call.cache, call.backend, text) == ("semantic-hit", "cache", "Use the link.")
        assert h.fakes["a"].cancelled == 1 + stream and h.gateway.members["a"].outstanding == 0
    assert h.gateway.cache.stats.hedges_cancelled == 2


async def test_without_the_hedge_the_backend_waits_for_the_lookup(build: Build) -> None:
    embedder = GatedEmbedder()
    h = await build(answer("Use the link."), semantic={"hedge": False}, embedder=embedder)
    embedder.gate.clear()
    sending = asyncio.ensure_future(h.send(ASKED, temperature=0))
    await until(lambda: bool(embedder.asked))  # the lookup is in flight
    for _ in range(50):
        await asyncio.sleep(0)
    assert h.fakes["a"].bodies == [] and not sending.done()
    embedder.gate.set()
    call, _reply = await sending
    assert (call.cache, len(h.fakes["a"].bodies)) == ("miss", 1)
