"""Any OpenAI-compatible server over HTTP (vLLM, llama.cpp server, others), on one shared aiohttp session.

This is the one seam where aiohttp's exceptions become BackendError kinds. The session (bounded
connector, explicit timeouts) belongs to the app's lifespan and is passed in; a backend never
creates its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import aiohttp
import orjson

from backends.base import REFUSALS, BackendError, Body, Chunk, ErrorKind


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
    message = "The model server rejected the request."
    try:
        data = orjson.loads(raw)
        err = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            message = err["message"][:500]
    except orjson.JSONDecodeError:
        pass
    return BackendError(ErrorKind.BAD_REQUEST, message, status=status)


class SSEChunkStream:
    """Decodes an upstream SSE body into chunk dicts. The first chunk must arrive within
    `first_timeout` of opening; later ones within `idle_timeout` of each other."""

    def __init__(self, resp: aiohttp.ClientResponse, first_deadline: float, idle_timeout: float) -> None:
        self._resp = resp
        self._first_deadline = first_deadline
        self._idle = idle_timeout
        self._yielded = False
        self._done = False
        self._iter = self._chunks()  # one iterator: the first chunk and the rest come from it

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._iter

    async def _chunks(self) -> AsyncGenerator[Chunk, None]:
        buf = b""
        reader = self._resp.content
        while True:
            event_end = buf.find(b"\n\n")
            if event_end < 0:
                data = await self._read(reader)
                if not data:
                    self._fail_eof()
                buf += data.replace(b"\r\n", b"\n") if b"\r" in data else data
                continue
            event, buf = buf[:event_end], buf[event_end + 2 :]
            payload = _sse_data(event)
            if payload is None:
                continue
            if payload == b"[DONE]":
                self._done = True
                return
            chunk = self._decode(payload)
            self._yielded = True
            yield chunk

    async def _read(self, reader: aiohttp.StreamReader) -> bytes:
        timeout = self._idle if self._yielded else max(0.0, self._first_deadline - time.monotonic())
        try:
            return await asyncio.wait_for(reader.readany(), timeout)
        except TimeoutError:
            what = "between chunks" if self._yielded else "before the first token"
            raise BackendError(self._kind(ErrorKind.TIMEOUT), f"The model server timed out {what}.") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise BackendError(self._kind(ErrorKind.CONNECT), "The model server dropped the stream.") from exc

    def _fail_eof(self) -> None:
        raise BackendError(self._kind(ErrorKind.CONNECT), "The model server ended the stream early.")

    def _kind(self, before_first: ErrorKind) -> ErrorKind:
        return ErrorKind.MID_STREAM if self._yielded else before_first

    def _decode(self, payload: bytes) -> Chunk:
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            kind = self._kind(ErrorKind.PROTOCOL)
            raise BackendError(kind, "The model server sent invalid JSON.") from None
        if not isinstance(chunk, dict):
            raise BackendError(self._kind(ErrorKind.PROTOCOL), "The model server sent an invalid chunk.")
        if "error" in chunk or chunk.get("object") == "error":
            raise BackendError(self._kind(ErrorKind.UPSTREAM_5XX), "The model server failed mid-stream.")
        return chunk

    async def aclose(self) -> None:
        await self._iter.aclose()
        if self._done:
            self._resp.release()
        else:
            self._resp.close()  # drops the connection: the server sees the disconnect and stops


def _sse_data(event: bytes) -> bytes | None:
    data: list[bytes] = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
    return b"\n".join(data) if data else None


class OpenAIHTTPBackend:
    """Chat completions against `<url>/v1/chat/completions`."""

    def __init__(self, name: str, settings: Any, session: aiohttp.ClientSession) -> None:
        self.name = name
        self.model: str = settings.model
        self.context_length: int | None = settings.context_length
        self.max_concurrency: int = settings.max_concurrency
        self._s = settings
        self._session = session
        self._url = f"{settings.url}/v1/chat/completions"
        self._headers = {"content-type": "application/json"}
        if settings.api_key:
            self._headers["authorization"] = f"Bearer {settings.api_key}"
        self._chat_timeout = aiohttp.ClientTimeout(
            total=settings.request_timeout_s, sock_connect=settings.connect_timeout_s
        )
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=settings.connect_timeout_s, sock_read=None
        )

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def _post(self, data: bytes, limits: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        """POST once more when a pooled keep-alive connection turns out to be dead: the server
        closed it while idle, so the request never reached it and resending is safe."""
        try:
            return await self._session.post(self._url, data=data, headers=self._headers, timeout=limits)
        except aiohttp.ServerDisconnectedError:
            return await self._session.post(self._url, data=data, headers=self._headers, timeout=limits)

    async def chat(self, body: Body) -> Body:
        try:
            async with await self._post(orjson.dumps(body), self._chat_timeout) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:
            raise BackendError(ErrorKind.TIMEOUT, "The model server timed out.") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise BackendError(ErrorKind.CONNECT, "The model server could not be reached.") from exc
        if status >= 400:
            raise _status_error(status, raw)
        try:
            data: Body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise BackendError(ErrorKind.PROTOCOL, "The model server sent invalid JSON.") from None
        return data

    async def stream(self, body: Body) -> SSEChunkStream:
        deadline = time.monotonic() + self._s.first_token_timeout_s
        try:
            resp = await asyncio.wait_for(
                self._post(orjson.dumps(body), self._stream_timeout), self._s.first_token_timeout_s
            )
        except TimeoutError:
            raise BackendError(ErrorKind.TIMEOUT, "The model server timed out before answering.") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise BackendError(ErrorKind.CONNECT, "The model server could not be reached.") from exc
        if resp.status >= 400:
            try:
                raw = await asyncio.wait_for(resp.read(), 5)
            except (TimeoutError, aiohttp.ClientError):
                raw = b""
            finally:
                resp.release()
            raise _status_error(resp.status, raw)
        return SSEChunkStream(resp, deadline, self._s.idle_timeout_s)

    async def health(self) -> bool:
        return True  # a plain OpenAI server has no standard health route: the breaker decides

    async def load(self) -> float | None:
        return None

    def count_tokens(self, messages: list[Any]) -> int | None:
        return None


def probe_timeout(settings: Any) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=max(1.0, settings.connect_timeout_s * 2))
