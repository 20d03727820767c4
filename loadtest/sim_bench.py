"""Throughput of the vLLM simulator (the gateway benchmarks' load target): prints requests/s.

Starts `python -m loadtest.vllm_sim` pinned to one core (unless --url points at a running one)
and loads it from this process, pinned to another core, with `wrk` (POST through a Lua script)
when installed, else an aiohttp client. Not a test: it prints figures and asserts nothing.

    python -m loadtest.sim_bench --duration 10 --connections 64
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import orjson

MESSAGES = [{"role": "user", "content": "Benchmark the simulator with a short question please."}]
BODIES = {
    "non-stream": {"model": "sim-model", "messages": MESSAGES},
    "stream": {
        "model": "sim-model",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
}
_LUA = 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [[%s]]\n'


@contextmanager
def simulator(port: int, core: int, reply_tokens: int) -> Iterator[str]:
    cmd = [
        sys.executable,
        "-m",
        "loadtest.vllm_sim",
        "--port",
        str(port),
        "--reply-tokens",
        str(reply_tokens),
    ]
    proc = subprocess.Popen(cmd, preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                urllib.request.urlopen(url + "/health", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("simulator did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def run_wrk(url: str, body: bytes, connections: int, duration: float) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_LUA % body.decode())
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t",
                "1",
                "-c",
                str(connections),
                "-d",
                f"{duration:g}s",
                "-s",
                script.name,
                url + "/v1/chat/completions",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        os.unlink(script.name)
    if "Non-2xx" in out or "Socket errors" in out:
        print(out, file=sys.stderr)
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    assert match, out
    return float(match.group(1))


async def run_aiohttp(url: str, body: bytes, connections: int, duration: float) -> float:
    done = 0
    stop_at = time.monotonic() + duration
    target = url + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            async with session.post(target, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"status {resp.status}")
            done += 1

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        return done / (time.monotonic() - started)


def bench(url: str, tool: str, connections: int, duration: float) -> None:
    for name, body in BODIES.items():
        raw = orjson.dumps(body)
        if tool == "wrk":
            rate = run_wrk(url, raw, connections, duration)
        else:
            rate = asyncio.run(run_aiohttp(url, raw, connections, duration))
        print(
            f"{name:<11} {rate:>9.0f} req/s  ({tool}, {connections} connections, {duration:g}s)", flush=True
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="bench a running simulator instead of starting one")
    p.add_argument("--port", type=int, default=8199)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--duration", type=float, default=10)
    p.add_argument("--reply-tokens", type=int, default=16)
    p.add_argument("--tool", choices=("auto", "wrk", "aiohttp"), default="auto")
    p.add_argument("--sim-core", type=int, default=0)
    p.add_argument("--load-core", type=int, default=1)
    args = p.parse_args(argv)
    tool = args.tool if args.tool != "auto" else ("wrk" if shutil.which("wrk") else "aiohttp")
    os.sched_setaffinity(0, {args.load_core})
    if args.url:
        bench(args.url, tool, args.connections, args.duration)
        return
    with simulator(args.port, args.sim_core, args.reply_tokens) as url:
        print(
            f"simulator pinned to core {args.sim_core}, load from core {args.load_core}, "
            f"{args.reply_tokens} tokens per reply, zero delays"
        )
        bench(url, tool, args.connections, args.duration)


if __name__ == "__main__":
    main()
