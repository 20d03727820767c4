"""The A/B store's Redis layout against the real Redis at 127.0.0.1:6379."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from proxy.experiments.store import RedisBackend
from proxy.redis import SharedRedis
from proxy.settings import ObservabilitySettings, RedisSettings

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def backend() -> AsyncIterator[RedisBackend]:
    prefix = f"test-ab-{time.time_ns()}"
    shared = SharedRedis(REDIS, RedisSettings())
    store = RedisBackend(shared, ObservabilitySettings(ab_prefix=prefix, feedback_ttl_s=120))
    yield store
    await store.close()
    await shared.close()
    client = aioredis.Redis.from_url(REDIS)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def record(owner: str, variant: str) -> dict[str, str]:
    return {"owner": owner, "model": "m", "variant": variant, "minute": "1"}


async def test_remembered_ids_in_several_batches_with_ttl(backend: RedisBackend) -> None:
    records = {f"cid-{i}": record(f"o{i}", "a" if i % 2 else "b") for i in range(1203)}
    await backend.remember_many(records)
    for cid in ("cid-0", "cid-499", "cid-500", "cid-1202"):
        assert await backend.lookup(cid) == records[cid]
    client = aioredis.Redis.from_url(REDIS)
    try:
        ttl = await client.ttl(backend._cid_key("cid-1202"))
    finally:
        await client.aclose()
    assert 0 < ttl <= 120


async def test_a_reused_id_starts_over_without_its_old_score(backend: RedisBackend) -> None:
    await backend.remember_many({"cid-x": record("alice", "a")})
    assert await backend.rate("cid-x", 1, "m|a|", "alice", 1.0, "good") == 1
    assert (await backend.lookup("cid-x") or {})["score"] == "1.0"
    await backend.remember_many({"cid-x": record("bob", "b")})
    assert await backend.lookup("cid-x") == record("bob", "b")
    assert await backend.rate("cid-x", 1, "m|b|", "alice", 1.0, None) == -1  # bob's now
