"""A fixed-rate (open-loop) HTTP/1.1 load generator for the overhead benchmark (loadtest/bench.py).

Requests start on a fixed schedule whatever the answers do, and every latency is measured from the
request's *scheduled* start, so a stall in the server shows up in full (no coordinated omission).
It is built to cost the server under test as little as possible: uvloop, pre-encoded request
bytes, httptools to parse the answers, keep-alive connections reused from an idle pool (a new one
is opened only when every connection is busy). For a stream it also records the time to the first
content chunk. Also the small helpers the benchmarks share (a free port, a process's CPU time).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httptools


@dataclass(slots=True)
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, scheduled start -> last byte
    ttfts: list[float] = field(default_factory=list)  # seconds, scheduled start -> first content
    errors: int = 0


class _Conn(asyncio.Protocol):
    def __init__(self, on_done: Callable[[_Conn, float, float | None, int], None]) -> None:
        self.on_done = on_done
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.started = 0.0
        self.first: float | None = None
        self.measured = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._finish(0)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.started:
            self._finish(0)

    # httptools callbacks
    def on_body(self, body: bytes) -> None:
        if self.first is None and b'"content"' in body:
            self.first = time.perf_counter()

    def on_message_complete(self) -> None:
        self._finish(self.parser.get_status_code())

    def send(self, payload: bytes, scheduled: float) -> None:
        self.started, self.first = scheduled, None
        assert self.transport is not None
        self.transport.write(payload)

    def _finish(self, status: int) -> None:
        if not self.started:
            return
        started, self.started = self.started, 0.0
        end = time.perf_counter()
        self.on_done(self, end - started, None if self.first is None else self.first - started, status)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request_bytes(url: str, body: bytes, headers: dict[str, str]) -> bytes:
    parts = urlsplit(url)
    lines = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def run(
    url: str, bodies: list[bytes], headers: dict[str, str], rate: float, seconds: float, warmup: int = 200
) -> Result:
    """Send len(bodies)-cycled requests at `rate` per second for `seconds`; returns the latencies
    of the measured part (a warm-up of `warmup` requests at the same rate comes first)."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    payloads = [request_bytes(url, b, headers) for b in bodies]
    idle: list[_Conn] = []
    every: list[_Conn] = []
    result = Result()
    total = warmup + int(rate * seconds)
    sent = 0
    pending = 0
    all_done = loop.create_future()

    def on_done(conn: _Conn, latency: float, ttft: float | None, status: int) -> None:
        nonlocal pending
        pending -= 1
        if conn.measured:
            if status == 200:
                result.latencies.append(latency)
                if ttft is not None:
                    result.ttfts.append(ttft)
            else:
                result.errors += 1
        if status == 200:
            idle.append(conn)
        elif conn.transport is not None:
            conn.transport.close()
        if sent == total and pending == 0 and not all_done.done():
            all_done.set_result(None)

    async def connect() -> _Conn:
        _, conn = await loop.create_connection(lambda: _Conn(on_done), host, port)
        every.append(conn)
        return conn

    for _ in range(16):
        idle.append(await connect())
    start = time.perf_counter() + 0.01
    interval = 1.0 / rate
    while sent < total:
        scheduled = start + sent * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        conn = idle.pop() if idle else await connect()
        conn.measured = sent >= warmup
        pending += 1
        conn.send(payloads[sent % len(payloads)], scheduled)
        sent += 1
    if pending:
        await asyncio.wait_for(all_done, 60)
    for conn in every:
        if conn.transport is not None:
            conn.transport.close()
    return result
