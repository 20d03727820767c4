"""The embedder's queue: micro-batches, a latency budget for lookups, a bounded lane for stores.

A lookup (a request is waiting) is admitted only while the predicted time to its vector fits
`own time + budget`, where own time is what the embedder takes for one text when nothing is ahead;
otherwise it is refused at once and the request skips the semantic layer. Vectors for new entries
(wanted after the response) wait in a second lane of bounded length, served only when no lookup
waits; a full lane refuses. The prediction is the measured time per text (a moving average over
finished batches) times the texts ahead, plus what is left of the batch in flight (or of the
rest after it, where a duty below 1 caps the embedder's share of the CPU).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)
COST_WEIGHT = 0.2  # weight of the newest batch in the moving average of seconds per text


class EmbeddingError(Exception):
    """The embedder could not produce vectors (overloaded, unreachable, bad reply, closed)."""


@dataclass(frozen=True)
class Budget:
    budget_s: float  # queueing a lookup accepts on top of the embedder's own time for one text
    max_wait_s: float  # a lookup never waits longer than this in all
    background_max: int  # texts waiting in the store lane; beyond: refused
    duty: float = 1.0  # the share of time the embedder may compute; after each batch it rests the rest


@dataclass
class Ticket:
    """An admitted text: its future vector and the latest moment its waiter should wait until."""

    future: asyncio.Future[np.ndarray]
    deadline: float


Item = tuple[str, "asyncio.Future[np.ndarray]"]


class EmbedQueue:
    """One worker task that runs `run_batch` over what waits, lookups first."""

    def __init__(
        self,
        run_batch: Callable[[list[str]], Awaitable[np.ndarray]],
        *,
        batch_max: int,
        batch_wait_s: float,
        budget: Budget,
        cost_s: float = 0.02,
        max_pending: int = 4096,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._run_batch, self._budget, self.clock, self._sleep = run_batch, budget, clock, sleep
        self._batch_max, self._wait_s, self._max_pending = batch_max, batch_wait_s, max_pending
        self._lookups: deque[Item] = deque()
        self._background: deque[Item] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.cost_s = cost_s  # seconds per text, measured
        self._busy_until: float | None = None  # predicted end of the batch in flight (None: idle)
        self._measured = False  # False: the next batch's figure replaces cost_s instead of averaging in
        self.batches = 0  # counters for benchmarks and metrics
        self.items = 0

    @property
    def depth(self) -> int:
        """Texts waiting (both lanes), for the queue-depth gauge."""
        return len(self._lookups) + len(self._background)

    def start(self) -> None:
        self._task = asyncio.create_task(self._work(), name="embedding-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for lane in (self._lookups, self._background):
            while lane:
                _, fut = lane.popleft()
                if not fut.done():
                    fut.set_exception(EmbeddingError("embedder closed"))

    def own_time(self) -> float:
        """What one text takes when nothing is ahead of it (the worker's gathering wait included)."""
        return self.cost_s + self._wait_s

    def predicted(self) -> float:
        """Seconds from now until a lookup admitted now would have its vector."""
        now = self.clock()
        if self._busy_until is None:  # idle: the worker gathers company first, then runs
            ahead = self._wait_s
        else:
            ahead = max(0.0, self._busy_until - now)
        return ahead + (self._live(self._lookups) + 1) * self.cost_s

    def allowance(self) -> float:
        """The longest a lookup may wait for its vector now."""
        return min(self.own_time() + self._budget.budget_s, self._budget.max_wait_s)

    def offer(self, text: str, *, lookup: bool, urgent: bool = False) -> Ticket | None:
        """Admit `text` to a lane, or refuse it (None) when the budget or the lane's bound says no.
        `urgent` (store lane only): at the lane's head and past its bound; the caller bounds how
        many it has waiting (cache_semantic.Backfill)."""
        if self._task is None:
            raise EmbeddingError("embedder not started")
        if lookup:
            allowed = self.allowance()
            # An idle embedder takes one text whatever the estimate: that keeps the estimate honest
            # (it is only re-measured by running) while its waiter still gives up at the allowance.
            if self.predicted() > allowed and not self._idle():
                return None
            lane, deadline = self._lookups, self.clock() + allowed
        else:
            if not urgent and self._live(self._background) >= self._budget.background_max:
                return None
            lane, deadline = self._background, float("inf")
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        if urgent and not lookup:
            lane.appendleft((text, fut))
        else:
            lane.append((text, fut))
        self._wakeup.set()
        return Ticket(fut, deadline)

    async def submit(self, texts: list[str]) -> np.ndarray:
        """Embed `texts` whatever the wait (scripts, start-up probes); bounded by `max_pending` only."""
        if self._task is None:
            raise EmbeddingError("embedder not started")
        if self.depth + len(texts) > self._max_pending:
            raise EmbeddingError("embedder overloaded")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in texts]
        self._lookups.extend(zip(texts, futures, strict=True))
        self._wakeup.set()
        rows = await asyncio.gather(*futures)
        return np.stack(rows) if rows else np.empty((0, 0), dtype=np.float32)

    def _idle(self) -> bool:
        """Nothing in flight and no lookup waiting: a lookup now is the next batch (stores wait)."""
        return self._busy_until is None and not self._live(self._lookups)

    def forget_cost(self) -> None:
        """Let the next batch set the cost afresh (after a warm-up whose first pass was cold)."""
        self._measured = False

    @staticmethod
    def _live(lane: deque[Item]) -> int:
        """Texts still wanted: a waiter that gave up cancelled its future (dropped when reached)."""
        while lane and lane[0][1].done():
            lane.popleft()
        return len(lane)

    async def _work(self) -> None:
        while True:
            await self._wakeup.wait()
            if len(self._lookups) < self._batch_max and self._wait_s > 0:
                await asyncio.sleep(self._wait_s)  # let concurrent callers join this batch
            batch = self._take()
            if not self._lookups and not self._background:
                self._wakeup.clear()
            if batch:
                await self._run(batch)

    async def _rest(self, elapsed: float) -> None:
        """Below a duty of 1 the embedder rests after each batch in proportion to it, leaving the
        CPU to the event loop and whatever shares its core; lookups count the rest as time ahead."""
        duty = self._budget.duty
        if duty >= 1.0 or elapsed <= 0:
            return
        rest = elapsed * (1.0 / duty - 1.0)
        self._busy_until = self.clock() + rest
        try:
            await self._sleep(rest)
        finally:
            self._busy_until = None

    def _take(self) -> list[Item]:
        """Lookups first; store-lane texts only when no lookup waits, and only as many as fit the
        budget (at least one), so a lookup arriving meanwhile is not held up for long."""
        batch: list[Item] = []
        for lane, most in ((self._lookups, self._batch_max), (self._background, self._background_share())):
            while lane and len(batch) < most:
                text, fut = lane.popleft()
                if not fut.done():  # the caller may have given up meanwhile
                    batch.append((text, fut))
            if batch:
                break
        return batch

    def _background_share(self) -> int:
        return max(1, min(self._batch_max, int(self._budget.budget_s / max(self.cost_s, 1e-6))))

    async def _run(self, batch: list[Item]) -> None:
        start = self.clock()
        self._busy_until = start + len(batch) * self.cost_s
        try:
            vectors = await self._run_batch([text for text, _ in batch])
        except BaseException as exc:  # every waiter learns of the failure, also on close()
            self._busy_until = None
            error = exc if isinstance(exc, EmbeddingError) else EmbeddingError(repr(exc))
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(error)
            if not isinstance(exc, Exception):
                raise  # cancelled: the worker stops
            log.warning("embedding batch of %d failed: %r", len(batch), exc)
            return  # the worker lives on
        self._busy_until = None
        elapsed = max(0.0, self.clock() - start)
        weight = COST_WEIGHT if self._measured else 1.0
        self._measured = True
        self.cost_s += weight * (elapsed / len(batch) - self.cost_s)
        self.batches += 1
        self.items += len(batch)
        for (_, fut), row in zip(batch, vectors, strict=True):
            if not fut.done():
                fut.set_result(row)
        await self._rest(elapsed)
