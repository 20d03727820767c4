"""proxy.cache.store.MemoryStore: TTL, LRU bound, per-partition nearest neighbours. Injected clock."""

from __future__ import annotations

import numpy as np

from proxy.cache.store import MemoryStore, SemanticEntry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def unit(*xs: float) -> np.ndarray:
    v = np.asarray(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


async def test_ttl_expires_entries() -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    await store.put("k", b"answer", 60, SemanticEntry("p", unit(1, 0), "q"))
    clock.now += 59
    assert await store.get("k") == b"answer"
    assert [c.text for c in await store.nearest("p", unit(1, 0), 3)] == ["q"]
    clock.now += 2
    assert await store.get("k") is None
    assert await store.nearest("p", unit(1, 0), 3) == []
    assert len(store) == 0


async def test_lru_bound_evicts_least_recently_used() -> None:
    store = MemoryStore(max_entries=2, clock=Clock())
    await store.put("a", b"1", 60, SemanticEntry("p", unit(1, 0), "a"))
    await store.put("b", b"2", 60, None)
    assert await store.get("a") == b"1"  # touch a: b is now the oldest
    await store.put("c", b"3", 60, None)
    assert (await store.get("a"), await store.get("b"), await store.get("c")) == (b"1", None, b"3")
    await store.put("d", b"4", 60, None)  # evicts a, and its vector with it
    assert await store.nearest("p", unit(1, 0), 3) == []


async def test_nearest_is_per_partition_and_sorted() -> None:
    store = MemoryStore(clock=Clock())
    await store.put("x", b"x", 60, SemanticEntry("p1", unit(1, 0), "x"))
    await store.put("y", b"y", 60, SemanticEntry("p1", unit(1, 1), "y"))
    await store.put("z", b"z", 60, SemanticEntry("p2", unit(1, 0), "z"))
    got = await store.nearest("p1", unit(1, 0.1), 3)
    assert [c.text for c in got] == ["x", "y"]
    assert got[0].similarity > got[1].similarity
    assert [c.text for c in await store.nearest("p3", unit(1, 0), 3)] == []


async def test_overwrite_replaces_vector() -> None:
    store = MemoryStore(clock=Clock())
    await store.put("k", b"old", 60, SemanticEntry("p", unit(1, 0), "old"))
    await store.put("k", b"new", 60, None)
    assert await store.get("k") == b"new"
    assert await store.nearest("p", unit(1, 0), 3) == []


def test_a_stored_stream_keeps_only_its_choices_and_replays_whole() -> None:
    from proxy.cache.replay import CachedAnswer, decode, encode, replay_chunks

    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpu-model",
             "system_fingerprint": "fp", "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    last = chunk | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    usage = {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    raw = encode(CachedAnswer("hit", [chunk, last, {"choices": [], "usage": usage}], None, usage))
    stored = decode(raw, "hit")
    assert stored.chunks == [{"choices": chunk["choices"]}, {"choices": last["choices"]}]
    assert stored.usage == usage and b"gpu-model" not in raw and b"chatcmpl-1" not in raw
    replayed = replay_chunks(stored, request_id="req_9", created=7, model="assistant", include_usage=False)
    assert [c["choices"] for c in replayed] == [chunk["choices"], last["choices"]]
    assert all(
        (c["id"], c["object"], c["created"], c["model"]) == ("req_9", "chat.completion.chunk", 7, "assistant")
        for c in replayed
    )
