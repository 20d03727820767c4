"""The contract every model server speaks to the pipeline, and the one error type it raises.

A backend takes an already validated, allow-listed OpenAI chat request body (a dict whose
"model" is the backend's own model name) and returns OpenAI-shaped dicts. A legacy completions
request is the same form marked RAW_PROMPT, and its answer comes back as chat chunks too.
Client-library errors (aiohttp, llama.cpp, litellm) are translated into BackendError here, at the
seam, exactly once.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

Body = dict[str, Any]
Chunk = dict[str, Any]
# Body key set (True) only by the gateway's /v1/completions translator: the last message's text is a
# raw prompt for the model's completions endpoint, sent without the chat template. A client body
# cannot carry it (the chat allow-list has no such field).
RAW_PROMPT = "raw_prompt"


def raw_prompt(body: Body) -> str | None:
    """The raw prompt of a legacy completions request (the last message's text), or None for chat."""
    if not body.get(RAW_PROMPT):
        return None
    content = body["messages"][-1].get("content")
    return content if isinstance(content, str) else ""


class ErrorKind(enum.Enum):
    CONNECT = "connect"  # could not reach the server
    TIMEOUT = "timeout"  # connect / first-token / idle timeout
    UPSTREAM_5XX = "upstream_5xx"
    RATE_LIMITED = "rate_limited"  # the backend answered 429
    OVERLOADED = "overloaded"  # our own bound: queue full, too deep, breaker open
    BAD_REQUEST = "bad_request"  # the backend answered 4xx (not 429): never retried
    PROTOCOL = "protocol"  # the backend spoke something we could not parse
    MID_STREAM = "mid_stream"  # failed after the first chunk
    REFUSED = "refused"  # 401/403/404: the backend refuses the gateway itself (key, model id)


RETRYABLE = frozenset(
    {
        ErrorKind.CONNECT,
        ErrorKind.TIMEOUT,
        ErrorKind.UPSTREAM_5XX,
        ErrorKind.RATE_LIMITED,
        ErrorKind.OVERLOADED,
        ErrorKind.REFUSED,  # a fault of that backend's configuration, not of the request
    }
)

REFUSALS = frozenset({401, 403, 404})  # upstream statuses that mean ErrorKind.REFUSED


class BackendError(Exception):
    """A failure talking to one backend. `message` is safe to show a client (no URLs, no keys)."""

    def __init__(
        self,
        kind: ErrorKind,
        message: str,
        *,
        status: int | None = None,
        param: str | None = None,
        cause: ErrorKind | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status  # upstream HTTP status, when there was one
        self.param = param
        self.cause = cause  # for MID_STREAM: the kind this failure would have had before the first chunk

    @property
    def retryable(self) -> bool:
        """True when the next backend in the chain may be tried (only before the first byte)."""
        return self.kind in RETRYABLE


@runtime_checkable
class ChunkStream(Protocol):
    """An opened upstream stream: iterate chunks, and always close it (idempotent)."""

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    async def aclose(self) -> None: ...


class Backend(Protocol):
    """One model server (or one in-process model). All methods are coroutines; none blocks the loop."""

    name: str
    model: str  # the backend's own model id, written into the forwarded body
    context_length: int | None  # max tokens of prompt + completion, when known

    async def start(self) -> None:
        """Open resources (sessions, model handles). Called once from the lifespan."""

    async def close(self) -> None:
        """Release everything start() opened. Safe to call after a failed start()."""

    async def chat(self, body: Body) -> Body:
        """Non-streaming completion: an OpenAI `chat.completion` object, `usage` included. Built
        from `stream()` (backends.collect), so the same deadlines bound it."""

    async def stream(self, body: Body) -> ChunkStream:
        """Open a stream. Raises BackendError *before* returning when the server refuses
        (connect error, non-2xx status). Iterating yields `chat.completion.chunk` dicts; an
        upstream failure while iterating raises BackendError. A usage chunk (empty choices)
        is yielded last when the body asked for `stream_options.include_usage`."""

    async def health(self) -> bool:
        """A cheap liveness probe (used by the pool's periodic checks)."""

    async def load(self) -> float | None:
        """Requests waiting in the server's own queue, when the server exposes it."""

    def count_tokens(self, messages: list[Any]) -> int | None:
        """Prompt tokens by the backend's own tokenizer when it has one locally, else None."""


@runtime_checkable
class EmbeddingBackend(Protocol):
    """A backend kind that can serve `/v1/embeddings`. Optional: the embeddings stages skip the
    backends that are not one (the embedded llama.cpp chat model: llama.cpp embeds only with a
    model instance created for it)."""

    name: str
    model: str

    async def embeddings(self, body: Body) -> Body:
        """An OpenAI embeddings body (`model` the backend's own) -> its `list` of embeddings with
        `usage`. Raises BackendError as `stream()` does (no retry inside)."""
