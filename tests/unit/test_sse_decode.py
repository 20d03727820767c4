"""The upstream SSE decoder: events split anywhere across reads, CRLF, comments, [DONE], errors."""

import asyncio

import orjson
import pytest

from backends.base import BackendError, ErrorKind
from backends.openai_http import SSEChunkStream


class Reader:
    def __init__(self, parts):
        self.parts = list(parts)

    async def readany(self):
        return self.parts.pop(0) if self.parts else b""


class Resp:
    def __init__(self, parts):
        self.content = Reader(parts)
        self.closed = self.released = False

    def close(self):
        self.closed = True

    def release(self):
        self.released = True


STREAM = (
    b": keep-alive\n\n"
    + b"".join(b"data: " + orjson.dumps({"i": i, "t": "\u4f60\u597d"}) + b"\n\n" for i in range(3))
    + b"data: [DONE]\n\n"
)


def _collect(parts):
    async def run():
        resp = Resp(parts)
        stream = SSEChunkStream(resp, first_deadline=1e18, idle_timeout=5, deadline=1e18)
        out = [c async for c in stream]
        await stream.aclose()
        return out, resp

    return asyncio.run(run())


@pytest.mark.parametrize("split", [1, 2, 3, 7, 13, 50, len(STREAM)])
def test_split_anywhere(split):
    parts = [STREAM[i : i + split] for i in range(0, len(STREAM), split)]
    chunks, resp = _collect(parts)
    assert [c["i"] for c in chunks] == [0, 1, 2]
    assert chunks[0]["t"] == "\u4f60\u597d"  # a multi-byte character split across reads survives
    assert resp.released and not resp.closed


def test_crlf_line_endings():
    chunks, _ = _collect([STREAM.replace(b"\n", b"\r\n")])
    assert len(chunks) == 3


def test_eof_before_done_is_an_error_and_closes():
    async def run():
        resp = Resp([STREAM[: STREAM.index(b"data: [DONE]")]])
        stream = SSEChunkStream(resp, first_deadline=1e18, idle_timeout=5, deadline=1e18)
        got = []
        with pytest.raises(BackendError) as info:
            async for c in stream:
                got.append(c)
        await stream.aclose()
        return got, info.value, resp

    got, err, resp = asyncio.run(run())
    assert len(got) == 3 and err.kind is ErrorKind.MID_STREAM and resp.closed


def test_eof_before_any_chunk_is_retryable():
    async def run():
        stream = SSEChunkStream(Resp([]), first_deadline=1e18, idle_timeout=5, deadline=1e18)
        with pytest.raises(BackendError) as info:
            async for _ in stream:
                pass
        return info.value

    assert asyncio.run(run()).retryable


def test_error_event_mid_stream():
    data = b'data: {"i":0}\n\ndata: {"error":{"message":"boom"}}\n\n'
    async def run():
        stream = SSEChunkStream(Resp([data]), first_deadline=1e18, idle_timeout=5, deadline=1e18)
        with pytest.raises(BackendError) as info:
            async for _ in stream:
                pass
        return info.value

    assert asyncio.run(run()).kind is ErrorKind.MID_STREAM


def test_first_chunk_then_the_rest_from_one_stream():
    """The pipeline takes the first chunk (fallback decision), then relays the rest."""

    async def run():
        stream = SSEChunkStream(Resp([STREAM]), first_deadline=1e18, idle_timeout=5, deadline=1e18)
        first = await anext(aiter(stream))
        rest = [c async for c in stream]
        await stream.aclose()
        return first, rest

    first, rest = asyncio.run(run())
    assert first["i"] == 0 and [c["i"] for c in rest] == [1, 2]
