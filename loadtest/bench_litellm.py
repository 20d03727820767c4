"""CPU cost per call of the litellm backend against the aiohttp backend (backends/openai_http.py).

Starts `python -m loadtest.vllm_sim` (zero delays) pinned to one core, then makes sequential
calls from this process, pinned to another, through each backend in turn, and prints this
process's CPU time per call (`time.process_time()`: the simulator's own CPU is not counted).
Not a test: it prints figures and asserts nothing.

    python -m loadtest.bench_litellm --calls 500
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

import aiohttp

from backends.base import Backend
from backends.litellm import LiteLLMBackend
from backends.openai_http import OpenAIHTTPBackend
from loadtest.sim_bench import simulator
from proxy.settings import LiteLLMBackendSettings, OpenAIBackendSettings

MESSAGES = [{"role": "user", "content": "Benchmark the backend with a short question please."}]


async def _call(backend: Backend, body: dict[str, Any], stream: bool) -> None:
    if not stream:
        await backend.chat(body)
        return
    chunks = await backend.stream(body)
    try:
        async for _ in chunks:
            pass
    finally:
        await chunks.aclose()


async def measure(backend: Backend, calls: int, warmup: int, stream: bool) -> tuple[float, float]:
    """(CPU ms, wall ms) per call, after `warmup` calls that are not counted."""
    body: dict[str, Any] = {"model": backend.model, "messages": MESSAGES}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    for _ in range(warmup):
        await _call(backend, body, stream)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        await _call(backend, body, stream)
    return (time.process_time() - cpu) * 1e3 / calls, (time.perf_counter() - wall) * 1e3 / calls


async def run(url: str, calls: int, warmup: int) -> None:
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(connector=connector) as session:
        aiohttp_backend = OpenAIHTTPBackend(
            "sim", OpenAIBackendSettings(type="openai", url=url, model="sim-model"), session
        )
        cfg = LiteLLMBackendSettings(type="litellm", model="hosted_vllm/sim-model", api_base=url + "/v1")
        litellm_backend = LiteLLMBackend("sim", cfg)
        cpu = time.process_time()
        await litellm_backend.start()
        print(f"litellm import + start: {(time.process_time() - cpu) * 1e3:.0f} ms CPU")
        try:
            results: dict[tuple[str, str], tuple[float, float]] = {}
            for stream in (False, True):
                mode = "stream" if stream else "non-stream"
                for name, backend in (("aiohttp", aiohttp_backend), ("litellm", litellm_backend)):
                    results[name, mode] = await measure(backend, calls, warmup, stream)
                    cpu_ms, wall_ms = results[name, mode]
                    print(f"{name:<8} {mode:<11} {cpu_ms:7.3f} ms CPU/call  {wall_ms:7.3f} ms wall/call")
                ratio = results["litellm", mode][0] / results["aiohttp", mode][0]
                print(f"{'':<8} {mode:<11} litellm costs {ratio:.1f}x the CPU of the aiohttp backend")
        finally:
            await litellm_backend.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--port", type=int, default=8198)
    p.add_argument("--reply-tokens", type=int, default=16)
    p.add_argument("--sim-core", type=int, default=0)
    p.add_argument("--load-core", type=int, default=1)
    args = p.parse_args(argv)
    os.sched_setaffinity(0, {args.load_core})
    with simulator(args.port, args.sim_core, args.reply_tokens) as url:
        print(
            f"{args.calls} sequential calls per row after {args.warmup} warm-up calls; simulator pinned "
            f"to core {args.sim_core}, this process to core {args.load_core}, "
            f"{args.reply_tokens} tokens per reply, zero delays"
        )
        asyncio.run(run(url, args.calls, args.warmup))


if __name__ == "__main__":
    main()
