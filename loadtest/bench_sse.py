"""SSE response classes compared: our SSEResponse, sse-starlette's EventSourceResponse, Starlette's
StreamingResponse. Prints max streams/s and server CPU per stream (figures only, not a test).

    .venv/bin/python -m loadtest.bench_sse [--frames 16] [--seconds 8]

Each class streams the same `--frames` pre-built chunk frames plus [DONE] from a uvicorn server
(uvloop, httptools, one worker) pinned to core 0; `wrk` (closed loop, 64 connections) on core 1
drives it. sse-starlette is not a dependency of the gateway: `pip install sse-starlette`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from loadtest.openloop import cpu_seconds, free_port
from proxy.protocol import DONE_FRAME, chunk_frame
from proxy.streaming import SSEResponse

KINDS = ("ours", "sse-starlette", "starlette")


def _chunk(i: int) -> dict[str, object]:
    return {
        "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "logprobs": None, "finish_reason": None}],
    }  # fmt: skip


def build_app(frames: int) -> Starlette:
    chunks = [_chunk(i) for i in range(frames)]

    async def frames_out() -> AsyncIterator[bytes]:
        for c in chunks:
            yield chunk_frame(c)
        yield DONE_FRAME

    async def ours(_request: Request) -> SSEResponse:
        return SSEResponse(frames_out(), {})

    async def starlette_stream(_request: Request) -> Response:
        return StreamingResponse(frames_out(), media_type="text/event-stream")

    async def sse_starlette(_request: Request) -> Response:
        from sse_starlette.sse import EventSourceResponse

        async def events() -> AsyncIterator[dict[str, str]]:
            for c in chunks:
                yield {"data": orjson.dumps(c).decode()}
            yield {"data": "[DONE]"}

        return EventSourceResponse(events())

    return Starlette(
        routes=[
            Route("/ours", ours),  # type: ignore[arg-type]  # a pure ASGI response
            Route("/sse-starlette", sse_starlette),
            Route("/starlette", starlette_stream),
            Route("/health", lambda _r: Response(b"ok")),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the server on this port
    args = ap.parse_args()
    if args.serve:
        import uvicorn

        app = build_app(args.frames)
        uvicorn.run(
            app, port=args.serve, loop="uvloop", http="httptools", access_log=False, log_level="warning"
        )
        return
    if not shutil.which("wrk"):
        sys.exit("needs wrk (apt-get install wrk)")
    port = free_port()
    cmd = [sys.executable, "-m", "loadtest.bench_sse", "--serve", str(port), "--frames", str(args.frames)]
    server = subprocess.Popen(cmd, preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        print(f"{args.frames} frames + [DONE] per stream, server on core 0, wrk -c64 on core 1")
        for kind in KINDS:
            url = f"http://127.0.0.1:{port}/{kind}"
            subprocess.run(["taskset", "-c", "1", "wrk", "-t1", "-c64", "-d2s", url], capture_output=True)
            cpu = cpu_seconds(server.pid)
            out = subprocess.run(
                ["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{args.seconds}s", url],
                capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            cpu = cpu_seconds(server.pid) - cpu
            rps = next(
                float(line.split()[1]) for line in out.splitlines() if line.startswith("Requests/sec:")
            )
            if "Non-2xx" in out:
                raise RuntimeError(f"{kind}: {out}")
            per = cpu / (rps * args.seconds) * 1e6
            print(f"  {kind:14s} {rps:8.0f} streams/s   server CPU {per:6.0f} us/stream")
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
