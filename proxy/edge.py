"""Limits at the edge: header count and size and a header-read timeout (slow-loris clients), which
uvicorn does not offer (a subclass of its httptools protocol, chosen with `http=` in the CLI), and
the bounded body read.

The limits travel to every worker process through one environment variable set by the CLI
(`LLM_GATEWAY_EDGE=max_headers,max_header_bytes,header_timeout_s`), because uvicorn re-imports the
protocol class by name in each worker.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from starlette.requests import Request
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from proxy import errors

ENV = "LLM_GATEWAY_EDGE"


class HeadersTooLarge(errors.GatewayError):
    status, type, code, should_retry = 431, "invalid_request_error", "headers_too_large", False


class HeaderTimeout(errors.GatewayError):
    status, type, code, should_retry = 408, "invalid_request_error", "request_timeout", False


def _limits() -> tuple[int, int, float]:
    raw = os.environ.get(ENV, "100,16384,10")
    count, size, timeout = raw.split(",")
    return int(count), int(size), float(timeout)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_headers, self._max_bytes, self._timeout_s = _limits()
        self._timer: asyncio.TimerHandle | None = None
        self._count = self._bytes = 0
        self._rejection: errors.GatewayError | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._count = self._bytes = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        self._bytes += len(url)
        self._check()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count += 1
        self._bytes += len(name) + len(value) + 4
        self._check()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _check(self) -> None:
        if self._count > self._max_headers or self._bytes > self._max_bytes:
            self._rejection = HeadersTooLarge(
                f"Request headers exceed {self._max_headers} fields or {self._max_bytes} bytes."
            )
            raise ValueError("header limit")  # httptools turns this into HttpParserCallbackError

    def send_400_response(self, msg: str) -> None:
        if self._rejection is None:
            super().send_400_response(msg)
            return
        self._reply(self._rejection)

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self._timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if not self.transport.is_closing():
            self._reply(HeaderTimeout("The request headers were not received in time."))

    def _reply(self, exc: errors.GatewayError) -> None:
        body = exc.json()
        head = [STATUS_LINE[exc.status], b"content-type: application/json\r\n"]
        head += [f"{k}: {v}\r\n".encode() for k, v in exc.response_headers().items()]
        head += [b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        self.transport.close()


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """Read the body, refusing with 413 as soon as it is known to be too large. A client that
    disconnects before the body is complete ends the request as ClientDisconnected (499)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise errors.InvalidRequest("Invalid Content-Length header.")
        if int(declared) > limit:
            raise errors.PayloadTooLarge(f"The request body exceeds {limit} bytes.")
    parts: list[bytes] = []
    size, receive = 0, request.receive  # the ASGI messages themselves: Starlette's stream() adds nothing
    try:
        async with asyncio.timeout(timeout_s):  # not wait_for: on 3.11 that makes a task per call
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise errors.ClientDisconnected("The client closed the connection.")
                part = message.get("body", b"")
                size += len(part)
                if size > limit:
                    raise errors.PayloadTooLarge(f"The request body exceeds {limit} bytes.")
                parts.append(part)
                if not message.get("more_body", False):
                    return b"".join(parts)
    except TimeoutError:
        raise errors.InvalidRequest(
            "The request body was not received in time.", code="body_timeout"
        ) from None
