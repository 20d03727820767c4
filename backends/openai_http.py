"""Any OpenAI-compatible server over HTTP (vLLM, llama.cpp server, others), on one shared aiohttp session.

This is the one seam where aiohttp's exceptions become BackendError kinds. The session (bounded
connector, explicit timeouts) belongs to the app's lifespan and is passed in; a backend never
creates its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson

from backends.base import RAW_PROMPT, REFUSALS, BackendError, Body, Chunk, ErrorKind
from backends.collect import CompletionBuilder, before_first_byte, with_usage
from backends.text_completion import chat_chunk, completion_body


def _status_error(status: int, raw: bytes) -> BackendError:
    """Translate a non-2xx upstream answer. The upstream text is kept only for 4xx validation
    errors, where it tells the client what to fix; 5xx details stay in our logs. 401/403/404 mean
    the backend refuses the gateway (its key, its model id): another backend may still answer."""
    if status == 429:
        return BackendError(ErrorKind.RATE_LIMITED, "The model server is rate limiting.", status=status)
    if status >= 500:
        return BackendError(ErrorKind.UPSTREAM_5XX, f"The model server failed ({status}).", status=status)
    if status in REFUSALS:  # its text may quote the gateway's own key: never passed on
        return BackendError(
            ErrorKind.REFUSED, f"The model server refused the gateway ({status}).", status=status
        )
    message, param = "The model server rejected the request.", None
    try:
        data = orjson.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"][:500]
            param = err.get("param") if isinstance(err.get("param"), str) else None
    except orjson.JSONDecodeError:
        pass
    return BackendError(ErrorKind.BAD_REQUEST, message, status=status, param=param)


class SSEChunkStream:
    """Decodes an upstream SSE body into chunk dicts. The first chunk must arrive by
    `first_deadline`, later ones within `idle_timeout` of each other, and the last by `deadline`
    (the whole request's; all on the loop's clock). `convert`: how a chunk of another wire
    (legacy completions) becomes a chat chunk; it raises ValueError for one it cannot read."""

    def __init__(
        self,
        resp: aiohttp.ClientResponse,
        first_deadline: float,
        idle_timeout: float,
        deadline: float,
        convert: Callable[[Chunk], Chunk] | None = None,
    ) -> None:
        self._resp = resp
        self._convert = convert
        self._first_deadline = first_deadline
        self._idle = idle_timeout
        self._deadline = deadline
        self._yielded = False
        self._done = False
        self._iter = self._chunks()  # one iterator: the first chunk and the rest come from it

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iter

    async def _chunks(self) -> AsyncGenerator[Chunk, None]:
        rest = b""
        reader = self._resp.content
        while True:
            payloads, rest = await self._next_events(reader, rest)
            for payload in payloads:
                if payload == b"[DONE]":
                    self._done = True
                    return
                chunk = self._decode(payload)
                self._yielded = True
                yield chunk

    async def collect(self) -> Body:
        """Read the stream to its end and fold it into one `chat.completion` (the JSON path): the
        same deadlines, without an async step per chunk. A failure part-way is reported as the
        kind it would have had before the first chunk (nothing reached a client)."""
        builder = CompletionBuilder()
        rest = b""
        reader = self._resp.content
        try:
            while not self._done:
                payloads, rest = await self._next_events(reader, rest)
                for payload in payloads:
                    if payload == b"[DONE]":
                        self._done = True
                        break
                    builder.add(self._decode(payload))
                    self._yielded = True
        except BackendError as exc:
            raise before_first_byte(exc) from None
        finally:
            await self.aclose()
        return builder.completion()

    async def _next_events(self, reader: aiohttp.StreamReader, rest: bytes) -> tuple[list[bytes], bytes]:
        """Read until at least one event is complete: (their data payloads, the incomplete rest)."""
        while True:
            data = await self._read(reader)
            if not data:
                self._fail_eof()
            payloads, rest = _split_events(rest + data)
            if payloads:
                return payloads, rest

    async def _read(self, reader: aiohttp.StreamReader) -> bytes:
        due = asyncio.get_running_loop().time() + self._idle if self._yielded else self._first_deadline
        try:
            async with asyncio.timeout_at(min(due, self._deadline)):
                return await reader.readany()
        except TimeoutError:
            if due > self._deadline:
                what = "did not finish within the request deadline"
            else:
                what = "timed out between chunks" if self._yielded else "timed out before the first token"
            raise self._error(ErrorKind.TIMEOUT, f"The model server {what}.") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise self._error(ErrorKind.CONNECT, "The model server dropped the stream.") from exc

    def _fail_eof(self) -> None:
        raise self._error(ErrorKind.CONNECT, "The model server ended the stream early.")

    def _error(self, before_first: ErrorKind, message: str) -> BackendError:
        if self._yielded:
            return BackendError(ErrorKind.MID_STREAM, message, cause=before_first)
        return BackendError(before_first, message)

    def _decode(self, payload: bytes) -> Chunk:
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise self._error(ErrorKind.PROTOCOL, "The model server sent invalid JSON.") from None
        if not isinstance(chunk, dict):
            raise self._error(ErrorKind.PROTOCOL, "The model server sent an invalid chunk.")
        if "error" in chunk or chunk.get("object") == "error":
            raise self._error(ErrorKind.UPSTREAM_5XX, "The model server failed mid-stream.")
        if self._convert is None:
            return chunk
        try:
            return self._convert(chunk)
        except (TypeError, ValueError):
            raise self._error(ErrorKind.PROTOCOL, "The model server sent an invalid chunk.") from None

    async def aclose(self) -> None:
        await self._iter.aclose()
        if self._done:
            self._resp.release()
        else:
            self._resp.close()  # drops the connection: the server sees the disconnect and stops


def _split_events(buf: bytes) -> tuple[list[bytes], bytes]:
    """The data payloads of the complete events in `buf` (comments and empty events skipped),
    and what follows the last complete event."""
    if b"\r" in buf:
        buf = buf.replace(b"\r\n", b"\n")
    events = buf.split(b"\n\n")
    rest = events.pop()
    payloads = []
    for event in events:
        if event.startswith(b"data: ") and b"\n" not in event:  # what servers send: one data line
            payloads.append(event[6:])
        elif (payload := _sse_data(event)) is not None:
            payloads.append(payload)
    return payloads, rest


def _sse_data(event: bytes) -> bytes | None:
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
    return b"\n".join(data) if data else None


class OpenAIHTTPBackend:
    """Chat completions against `<url>/v1/chat/completions`; raw prompts (legacy completions)
    against `<url>/v1/completions`, embeddings against `<url>/v1/embeddings`."""

    def __init__(self, name: str, settings: Any, session: aiohttp.ClientSession) -> None:
        self.name = name
        self.model: str = settings.model
        self.context_length: int | None = settings.context_length
        self.max_concurrency: int = settings.max_concurrency
        self._s = settings
        self._session = session
        self._url = f"{settings.url}/v1/chat/completions"
        self._completions_url = f"{settings.url}/v1/completions"
        self._embeddings_url = f"{settings.url}/v1/embeddings"
        self._headers = {"content-type": "application/json"}
        if settings.api_key:
            self._headers["authorization"] = f"Bearer {settings.api_key}"
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s, sock_read=None
        )

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def _post(self, url: str, data: bytes, limits: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        """POST once more when a pooled keep-alive connection turns out to be dead: the server
        closed it while idle, so the request never reached it and resending is safe."""
        try:
            return await self._session.post(url, data=data, headers=self._headers, timeout=limits)
        except aiohttp.ServerDisconnectedError:
            return await self._session.post(url, data=data, headers=self._headers, timeout=limits)

    async def chat(self, body: Body) -> Body:
        return await (await self.stream(with_usage(body))).collect()

    async def stream(self, body: Body) -> SSEChunkStream:
        """Open the stream: connect, send, and read the response head by the first-token deadline
        (the stream then holds the first chunk to it, each later one to the idle timeout, and all
        of it to the request deadline)."""
        now = asyncio.get_running_loop().time()
        first_deadline, deadline = now + self._s.first_token_timeout_s, now + self._s.request_timeout_s
        url, convert = self._url, None
        if body.get(RAW_PROMPT):  # a legacy completions request: the raw prompt, no chat template
            url, body, convert = self._completions_url, completion_body(body), chat_chunk
        resp = await self._open(url, orjson.dumps(body), self._stream_timeout, min(first_deadline, deadline))
        return SSEChunkStream(resp, first_deadline, self._s.idle_timeout_s, deadline, convert)

    async def _open(
        self, url: str, data: bytes, limits: aiohttp.ClientTimeout, due: float
    ) -> aiohttp.ClientResponse:
        """POST and read the response head by `due` (loop time); a non-2xx is a BackendError."""
        try:
            async with asyncio.timeout_at(due):
                resp = await self._post(url, data, limits)
        except TimeoutError:
            raise BackendError(ErrorKind.TIMEOUT, "The model server timed out before answering.") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise BackendError(ErrorKind.CONNECT, "The model server could not be reached.") from exc
        if resp.status >= 400:
            try:
                async with asyncio.timeout(5):
                    raw = await resp.read()
            except (TimeoutError, aiohttp.ClientError):
                raw = b""
            finally:
                resp.release()
            raise _status_error(resp.status, raw)
        return resp

    async def embeddings(self, body: Body) -> Body:
        """POST /v1/embeddings, the whole answer by the request deadline (its first byte by the
        first-token one). Not retried here: the pool's walk decides."""
        now = asyncio.get_running_loop().time()
        deadline = now + self._s.request_timeout_s
        due = min(now + self._s.first_token_timeout_s, deadline)
        resp = await self._open(self._embeddings_url, orjson.dumps(body), self._stream_timeout, due)
        try:
            async with asyncio.timeout_at(deadline):
                raw = await resp.read()
        except TimeoutError:
            raise BackendError(ErrorKind.TIMEOUT, "The model server did not finish in time.") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise BackendError(ErrorKind.CONNECT, "The model server dropped the answer.") from exc
        finally:
            resp.close()  # a no-op once read; otherwise (cancelled) the server sees the disconnect
        return _embedding_list(raw)

    async def health(self) -> bool:
        return True  # a plain OpenAI server has no standard health route: the breaker decides

    async def load(self) -> float | None:
        return None

    def count_tokens(self, messages: list[Any]) -> int | None:
        return None


def _embedding_list(raw: bytes) -> Body:
    """An embeddings answer, checked for the parts the gateway reads (`data`, `usage`)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise BackendError(ErrorKind.PROTOCOL, "The model server sent an invalid embeddings answer.")
    if not isinstance(data.get("usage"), dict):
        data["usage"] = {}
    return data


def probe_timeout(settings: Any) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=max(1.0, settings.connect_timeout_s * 2))
