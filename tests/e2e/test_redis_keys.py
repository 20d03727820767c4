"""Every key the gateway writes to Redis expires: traffic of every kind through a real gateway process
(chat completions and streams, cache hits exact and semantic, a refusal, feedback, a two-turn
/v1/responses conversation, the A/B flush) against a private Redis 8 with search, then SCAN: no key
may be left without a TTL, and every family of key the gateway writes must have shown up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from loadtest.redis_memory import FAMILIES, scan_keys
from loadtest.vllm_sim import SimulatorThread
from tests.conftest import GatewayProcess, gateway_config

pytestmark = pytest.mark.redis8


@pytest.fixture(scope="module")
def private_redis8() -> Iterator[str]:
    """A fresh Redis 8 of this module's own: SCAN sees only what this gateway wrote."""
    from tests.redis8 import start_redis8, stop

    proc, url = start_redis8()
    yield url
    stop(proc)


def config(sim: SimulatorThread, redis_url: str) -> dict[str, Any]:
    variants = [
        {"name": "control", "weight": 50, "backends": ["gpu"]},
        {"name": "b", "weight": 50, "backends": ["gpu"]},
    ]
    return gateway_config(
        backends={"gpu": {"type": "vllm", "url": sim.url, "model": "sim-model"}},
        models={"assistant": {"variants": variants, "feedback_sample": 1}},
        redis_url=redis_url,
        # a bucket not yet refilled stays in Redis for a few seconds after its last request
        limits={"tiers": {"default": {"requests_per_minute": 1000, "tokens_per_minute": 3000}}},
        cache={"semantic": {"enabled": True}},
        observability={"ab_flush_s": 0.2},
    )


def chats(gw: GatewayProcess) -> str:
    """Completions and streams, exact and semantic hits, a sampled answer, a refusal: the id of the first."""
    client = gw.client("alice")
    ask = [{"role": "user", "content": "How do I reset my router to factory settings?"}]
    first = client.chat.completions.create(model="assistant", messages=ask, temperature=0, max_tokens=16)
    client.chat.completions.create(model="assistant", messages=ask, temperature=0, max_tokens=16)  # exact hit
    paraphrase = [{"role": "user", "content": "How can I restore my router to its factory settings?"}]
    client.chat.completions.create(model="assistant", messages=paraphrase, temperature=0, max_tokens=16)
    stream = [{"role": "user", "content": "Why does my sourdough bread come out so dense?"}]
    for _ in client.chat.completions.create(model="assistant", messages=stream, temperature=0, stream=True):
        pass
    sampled = [{"role": "user", "content": "Write a haiku about Redis."}]
    client.chat.completions.create(model="assistant", messages=sampled, temperature=0.7, max_tokens=16)
    refused = httpx.post(f"{gw.url}/v1/chat/completions", headers=gw.headers("alice"),
                         json={"model": "assistant", "messages": [{"role": "user", "content": "shit"}]})  # fmt: skip
    assert refused.status_code == 400
    return first.id


def rate_and_converse(gw: GatewayProcess, completion_id: str) -> None:
    """Feedback on a completion and a two-turn /v1/responses conversation."""
    rated = httpx.post(
        f"{gw.url}/v1/feedback", json={"id": completion_id, "score": 1}, headers=gw.headers("alice")
    )
    assert rated.status_code == 200, rated.text
    client = gw.client("alice")
    turn = client.responses.create(model="assistant", input="My name is Ada.")
    client.responses.create(model="assistant", input="What is my name?", previous_response_id=turn.id)


async def keys_until(url: str, families: set[str]) -> tuple[set[str], list[tuple[str, int]]]:
    """SCAN every 0.2 s until `families` have all been seen (the A/B flush and cache stores run
    after the answers): the families seen, and every key seen without a TTL."""
    client = aioredis.Redis.from_url(url)
    seen: set[str] = set()
    no_ttl: list[tuple[str, int]] = []
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not seen >= families:
            for name, family in (await scan_keys(client)).items():
                seen.add(name)
                no_ttl += [(name, ttl) for ttl in family.ttls if ttl == -1]
            await asyncio.sleep(0.2)  # e2e polling: the gateway's background writes
    finally:
        await client.aclose()
    return seen, no_ttl


async def test_no_key_is_left_without_a_ttl(
    sim: SimulatorThread, private_redis8: str, start_gateway: Any
) -> None:
    gw = start_gateway(config(sim, private_redis8))
    completion_id = await asyncio.to_thread(chats, gw)
    # before any feedback: rating a completion also sets its minute bucket's TTL, which would hide one
    # that the A/B flush left without
    seen, no_ttl = await keys_until(private_redis8, set(FAMILIES) - {"stored responses"})
    assert no_ttl == []
    await asyncio.to_thread(rate_and_converse, gw, completion_id)
    later, no_ttl = await keys_until(private_redis8, {"stored responses"})
    assert no_ttl == []
    assert seen | later >= set(FAMILIES), f"families never written: {set(FAMILIES) - seen - later}"
