"""A JSON answer folded from a stream (backends.collect), and the stream's deadlines."""

import asyncio
from typing import Any

import orjson
import pytest

from backends.base import BackendError, ErrorKind
from backends.collect import collect, with_usage
from backends.openai_http import SSEChunkStream


class Chunks:
    """A ChunkStream over a list; an exception in the list is raised in its place."""

    def __init__(self, items: list[Any]) -> None:
        self.items, self.closed = list(items), False

    def __aiter__(self) -> "Chunks":
        return self

    async def __anext__(self) -> dict[str, Any]:
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    async def aclose(self) -> None:
        self.closed = True


def chunk(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m", "choices": choices, **extra}


def delta(index: int = 0, finish: str | None = None, **d: Any) -> dict[str, Any]:
    return {"index": index, "delta": d, "logprobs": None, "finish_reason": finish}


def run(items: list[Any]) -> tuple[dict[str, Any], Chunks]:
    stream = Chunks(items)
    return asyncio.run(collect(stream)), stream


def test_text_usage_and_head() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    out, stream = run([
        chunk([delta(role="assistant", content="")]),
        chunk([delta(content="Hel")]),
        chunk([delta(content="lo", finish="stop")]),
        chunk([], usage=usage),
    ])
    assert stream.closed
    assert out == {
        "id": "chatcmpl-1", "created": 7, "model": "m", "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": usage,
    }


def test_several_choices_interleaved() -> None:
    out, _ = run([
        chunk([delta(1, content="b1")]), chunk([delta(0, content="a1")]),
        chunk([delta(1, content="b2", finish="length")]), chunk([delta(0, content="a2", finish="stop")]),
    ])
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in out["choices"]] == [
        (0, "a1a2", "stop"), (1, "b1b2", "length"),
    ]


def test_a_large_tool_call_split_across_many_chunks_is_whole() -> None:
    arguments = orjson.dumps({"text": "x" * 9000, "n": list(range(50))}).decode()
    pieces = [arguments[i : i + 37] for i in range(0, len(arguments), 37)]
    first = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "write", "arguments": ""}}
    items = [chunk([delta(role="assistant", tool_calls=[first])])]
    items += [chunk([delta(tool_calls=[{"index": 0, "function": {"arguments": p}}])]) for p in pieces]
    items += [chunk([delta(finish="tool_calls", reasoning_content="thought")])]
    out, _ = run(items)
    message = out["choices"][0]["message"]
    assert message["content"] is None and message["reasoning_content"] == "thought"
    assert message["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "write", "arguments": arguments}}
    ]
    assert out["choices"][0]["finish_reason"] == "tool_calls"


def test_logprobs_are_concatenated() -> None:
    lp = [{"token": "a", "logprob": -0.1}], [{"token": "b", "logprob": -0.2}]
    out, _ = run([
        {**chunk([delta(content="a")]), "choices": [{**delta(content="a"), "logprobs": {"content": lp[0]}}]},
        {**chunk([]), "choices": [{**delta(content="b", finish="stop"), "logprobs": {"content": lp[1]}}]},
    ])
    assert out["choices"][0]["logprobs"] == {"content": [*lp[0], *lp[1]]}


@pytest.mark.parametrize("cause", [ErrorKind.TIMEOUT, ErrorKind.CONNECT, None])
def test_a_failure_part_way_is_reported_as_before_the_first_byte(cause: ErrorKind | None) -> None:
    """Nothing of a JSON answer has reached the client: the pipeline may still fall over."""
    failure = BackendError(ErrorKind.MID_STREAM, "dropped", cause=cause)
    with pytest.raises(BackendError) as info:
        run([chunk([delta(content="a")]), failure])
    assert info.value.kind is (cause or ErrorKind.UPSTREAM_5XX)
    assert info.value.retryable


def test_with_usage_asks_for_a_stream_with_usage() -> None:
    body = {"model": "m", "messages": [], "stream_options": {"continuous_usage_stats": True}}
    assert with_usage(body) == {"model": "m", "messages": [], "stream": True,
                                "stream_options": {"include_usage": True}}


class StalledReader:
    async def readany(self) -> bytes:
        await asyncio.Event().wait()  # never answers; only a deadline ends this
        return b""


class Resp:
    def __init__(self) -> None:
        self.content = StalledReader()
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def release(self) -> None:
        pass


@pytest.mark.parametrize(
    ("first_in", "deadline_in", "text"),
    [(0.0, 100.0, "before the first token"), (100.0, 0.0, "request deadline")],
)
def test_a_stalled_stream_ends_at_its_deadlines(first_in: float, deadline_in: float, text: str) -> None:
    async def go() -> BackendError:
        now = asyncio.get_running_loop().time()
        stream = SSEChunkStream(Resp(), now + first_in, 100.0, now + deadline_in)  # type: ignore[arg-type]
        with pytest.raises(BackendError) as info:
            async for _ in stream:
                pass
        await stream.aclose()
        return info.value

    err = asyncio.run(go())
    assert err.kind is ErrorKind.TIMEOUT and text in err.message
