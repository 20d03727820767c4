"""The embedder's latency budget (proxy/cache/embed_queue.py) and the semantic layer's vector source
(proxy/cache_semantic.Vectors), with an injected clock and a batch function the test releases."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest

from proxy.cache.embed_queue import Budget, EmbedQueue, Ticket
from proxy.cache.semantic import Backfill, Vectors, VectorStats
from proxy.cache.store import SemanticEntry

DIM = 4


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Engine:
    """A batch function that waits until the test releases it; records every batch it got."""

    def __init__(self, clock: Clock, seconds_per_text: float = 0.0) -> None:
        self.clock, self.per_text = clock, seconds_per_text
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        await self.gate.wait()
        self.clock.now += self.per_text * len(texts)
        rows = np.ones((len(texts), DIM), dtype=np.float32)
        rows[:, 0] = [len(t) for t in texts]
        return rows


def queue(
    engine: Engine, clock: Clock, *, cost: float = 0.010, budget: float = 0.005, lane: int = 2
) -> EmbedQueue:
    q = EmbedQueue(
        engine, batch_max=8, batch_wait_s=0.0, budget=Budget(budget, 1.0, lane), cost_s=cost, clock=clock
    )
    q.start()
    return q


async def settle() -> None:
    for _ in range(5):  # let the worker task take what waits (no timers involved)
        await asyncio.sleep(0)


async def test_idle_embedder_admits_a_lookup_with_its_own_time_plus_budget() -> None:
    clock = Clock()
    q = queue(Engine(clock), clock)
    assert q.predicted() == pytest.approx(0.010)
    ticket = q.offer("hello", lookup=True)
    assert ticket is not None and ticket.deadline == pytest.approx(clock.now + 0.010 + 0.005)
    assert (await ticket.future)[0] == 5
    await q.close()


async def test_lookups_beyond_the_budget_are_refused_at_once() -> None:
    clock, engine = Clock(), None
    engine = Engine(clock)
    engine.gate.clear()  # the first batch stays in flight
    q = queue(engine, clock, cost=0.010, budget=0.015)
    first = q.offer("a", lookup=True)
    await settle()  # taken: in flight until 100.010
    assert first is not None and engine.batches == [["a"]]
    assert q.offer("b", lookup=True) is not None  # 0.010 left + 0.010 own = 0.020 <= 0.025
    assert q.offer("c", lookup=True) is None  # 0.010 + 2 x 0.010 = 0.030 > 0.025
    clock.now += 0.008  # the batch in flight is nearly done: 0.002 + 2 x 0.010 = 0.022
    assert q.offer("c", lookup=True) is not None
    engine.gate.set()
    await settle()
    assert engine.batches[1] == ["b", "c"]
    await q.close()


async def test_a_waiter_that_gave_up_frees_its_place() -> None:
    clock, engine = Clock(), None
    engine = Engine(clock)
    engine.gate.clear()
    q = queue(engine, clock, cost=0.010, budget=0.015)
    q.offer("a", lookup=True)
    await settle()
    waiting = q.offer("b", lookup=True)
    assert waiting is not None and q.offer("c", lookup=True) is None
    waiting.future.cancel()  # its request went on without it
    assert q.offer("c", lookup=True) is not None
    await q.close()


async def test_store_lane_is_bounded_and_served_after_lookups() -> None:
    clock = Clock()
    engine = Engine(clock)
    engine.gate.clear()
    q = queue(engine, clock, budget=0.015, lane=2)
    q.offer("busy", lookup=True)
    await settle()
    stores = [q.offer(f"store {i}", lookup=False) for i in range(3)]
    assert stores[0] is not None and stores[1] is not None and stores[2] is None  # full: refused
    assert q.offer("look", lookup=True) is not None
    assert q.depth == 3
    engine.gate.set()
    await settle()
    assert engine.batches[1] == ["look"]  # the lookup first, though it came last
    await settle()
    assert [t for b in engine.batches[2:] for t in b] == ["store 0", "store 1"]
    await q.close()


async def test_cost_per_text_follows_the_measured_batches() -> None:
    clock = Clock()
    q = queue(Engine(clock, seconds_per_text=0.040), clock, cost=0.010)
    await q.submit(["a", "b"])
    assert q.cost_s == pytest.approx(0.040)  # the first batch replaces the guess
    assert q.allowance() == pytest.approx(0.045)
    await q.close()


async def test_an_embedder_slower_than_max_wait_takes_one_probe_at_a_time() -> None:
    clock = Clock()
    engine = Engine(clock)
    engine.gate.clear()
    q = EmbedQueue(engine, batch_max=8, batch_wait_s=0.0, budget=Budget(0.005, 0.050, 4), cost_s=0.080,
                   clock=clock)  # fmt: skip
    q.start()
    probe = q.offer("x", lookup=True)  # idle: taken, so the estimate is measured again, but its
    assert probe is not None and probe.deadline == pytest.approx(clock.now + 0.050)  # wait is capped
    assert q.offer("y", lookup=True) is None
    await settle()
    assert q.offer("y", lookup=True) is None  # busy with the probe
    await q.close()


async def test_below_a_duty_of_one_the_embedder_rests_and_lookups_count_the_rest() -> None:
    """duty 0.5: after a 40 ms batch the embedder rests 40 ms; a lookup arriving then is predicted
    to wait the rest plus its own time, beyond its allowance, so it skips at once."""
    clock, rests = Clock(), []
    release = asyncio.Event()

    async def rest(seconds: float) -> None:
        rests.append(seconds)
        await release.wait()

    q = EmbedQueue(Engine(clock, seconds_per_text=0.040), batch_max=8, batch_wait_s=0.0,
                   budget=Budget(0.005, 1.0, 4, duty=0.5), cost_s=0.040, clock=clock, sleep=rest)  # fmt: skip
    q.start()
    ticket = q.offer("a", lookup=True)
    assert ticket is not None
    await ticket.future
    await settle()
    assert rests == [pytest.approx(0.040)]
    assert q.predicted() == pytest.approx(0.040 + 0.040)  # the rest, then its own text
    assert q.offer("b", lookup=True) is None  # 80 ms > 40 ms + 5 ms allowed
    release.set()
    await settle()
    assert q.offer("b", lookup=True) is not None  # rested: idle again
    await q.close()


async def test_at_full_duty_the_embedder_never_rests() -> None:
    clock, rests = Clock(), []

    async def rest(seconds: float) -> None:
        rests.append(seconds)

    q = EmbedQueue(Engine(clock, seconds_per_text=0.040), batch_max=8, batch_wait_s=0.0,
                   budget=Budget(0.005, 1.0, 4), cost_s=0.040, clock=clock, sleep=rest)  # fmt: skip
    q.start()
    await q.submit(["a", "b"])
    assert rests == []
    await q.close()


class FakeEmbedder:
    """The Embedder surface Vectors uses, over a real EmbedQueue."""

    name, dim, window = "fake", DIM, 10

    def __init__(self, q: EmbedQueue) -> None:
        self.queue, self.offers = q, 0

    def fits(self, text: str) -> bool:
        return len(text) <= self.window

    def offer(self, text: str, *, lookup: bool, urgent: bool = False) -> Ticket | None:
        self.offers += 1
        return self.queue.offer(text, lookup=lookup, urgent=urgent)


def vectors(q: EmbedQueue) -> tuple[Vectors, FakeEmbedder]:
    emb = FakeEmbedder(q)
    return Vectors(emb, 16, Counter(), VectorStats()), emb  # type: ignore[arg-type]


async def test_vectors_are_reused_by_digest_without_the_embedder() -> None:
    clock = Clock()
    q = queue(Engine(clock), clock)
    v, emb = vectors(q)
    first = await v.lookup("hello")
    again = await v.lookup("hello")
    assert first is not None and again is not None and emb.offers == 1
    assert v.stats.embedded == 1 and v.stats.reused == 1
    assert await v.store("hello") is not None and emb.offers == 1
    await q.close()


async def test_too_long_for_the_window_is_skipped_before_the_queue() -> None:
    clock = Clock()
    q = queue(Engine(clock), clock)
    v, emb = vectors(q)
    assert await v.lookup("x" * 11) is None
    assert v.skips == Counter({("lookup", "window"): 1}) and emb.offers == 0
    await q.close()


async def test_a_late_vector_is_skipped_but_kept_for_the_store() -> None:
    clock = Clock()
    engine = Engine(clock)
    engine.gate.clear()
    q = EmbedQueue(engine, batch_max=8, batch_wait_s=0.0, budget=Budget(0.0, 1.0, 4), cost_s=0.0, clock=clock)
    q.start()
    v, emb = vectors(q)
    assert await v.lookup("late") is None  # an allowance of 0 s: gives up at once, counted
    assert v.skips == Counter({("lookup", "late"): 1})
    engine.gate.set()
    await settle()
    assert await v.store("late") is not None and emb.offers == 1  # from the LRU
    await q.close()


async def test_budget_refusals_are_counted_per_stage() -> None:
    clock = Clock()
    engine = Engine(clock)
    engine.gate.clear()
    q = queue(engine, clock, cost=0.010, budget=0.0, lane=0)
    v, _ = vectors(q)
    q.offer("in flight", lookup=True)
    await settle()
    assert await v.lookup("refused") is None
    assert await v.store("refused2") is None
    assert v.skips == Counter({("lookup", "budget"): 1, ("store", "full"): 1})
    await q.close()


async def test_an_urgent_store_goes_to_the_lanes_head_even_when_it_is_full() -> None:
    clock, engine = Clock(), Engine(Clock())
    engine.gate.clear()
    q = queue(engine, clock, lane=2)
    busy = q.offer("busy", lookup=True)  # the batch in flight
    await settle()
    assert busy is not None and q.offer("s1", lookup=False) and q.offer("s2", lookup=False)
    assert q.offer("s3", lookup=False) is None  # the lane is full
    assert q.offer("popular", lookup=False, urgent=True) is not None
    engine.gate.set()
    await settle()
    assert engine.batches[1][0] == "popular"
    await q.close()


async def test_backfill_gives_a_repeated_question_its_vector_and_rewrites_its_entry() -> None:
    clock, engine = Clock(), Engine(Clock())
    q = queue(engine, clock)
    vecs, _ = vectors(q)
    written: list[tuple[str, bytes, SemanticEntry]] = []

    async def write(key: str, payload: bytes, entry: SemanticEntry) -> None:
        written.append((key, payload, entry))

    backfill = Backfill(vecs, write, size=2)
    backfill.remember("k1", "question", "part-1")
    backfill.served("k-unknown", b"x")  # an entry that has its vector: nothing to do
    backfill.served("k1", b"answer")
    for _ in range(3):
        await settle()
    assert [(k, p, e.part, e.text) for k, p, e in written] == [("k1", b"answer", "part-1", "question")]
    backfill.served("k1", b"answer")  # done once: not again
    await settle()
    assert len(written) == 1 and backfill.done == 1
    for key in ("a", "b", "c"):  # bounded: the oldest is forgotten
        backfill.remember(key, key, "p")
    backfill.served("a", b"x")
    await settle()
    assert len(written) == 1
    await backfill.close()
    await q.close()
