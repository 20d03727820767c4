"""The response store on the real Redis: what one gateway process stores another continues, keys
expire with the chain's latest turn, and an unreachable Redis is a 503 to read and a logged miss to
write (never an exception out of a follow-up task)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy import errors
from proxy.apis.responses import StoredTurn
from proxy.conversations import RedisConversations, build_conversations
from proxy.redis import SharedRedis
from proxy.settings import RedisSettings, ResponsesSettings

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    value = f"test:resp:{os.urandom(4).hex()}"
    yield value
    client = aioredis.Redis.from_url(REDIS)
    keys = [k async for k in client.scan_iter(f"{value}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def replicas(prefix: str) -> AsyncIterator[Any]:
    """make(url, **settings) -> a store on a shared client of its own (one gateway process each)."""
    made: list[SharedRedis] = []

    def make(url: str = REDIS, **settings: Any) -> RedisConversations:
        redis = SharedRedis(url, RedisSettings(timeout_s=0.5))
        made.append(redis)
        store = build_conversations(ResponsesSettings(prefix=prefix, **settings), redis)
        assert isinstance(store, RedisConversations)
        return store

    yield make
    for redis in made:
        await redis.close()


def _id(n: int) -> str:
    return f"resp_{n:032x}"


def _turn(n: int) -> StoredTurn:
    return StoredTurn({"id": _id(n), "output": [{"type": "message", "text": f"out {n}"}]},
                      [{"type": "message", "role": "user", "content": f"in {n}"}])


async def test_one_process_continues_what_another_stored(replicas: Any) -> None:
    a, b = replicas(), replicas()
    ids: list[str] = []
    for i in range(70):  # past one window of ancestor ids
        await (a if i % 2 else b).put("acme", _id(i), _turn(i), list(ids))
        ids.append(_id(i))
    chain = await a.chain("acme", ids[-1])
    assert chain is not None and chain.ids == ids
    assert chain.turns[0] == _turn(0)
    assert await b.get("acme", ids[5]) == _turn(5).response
    assert await a.chain("globex", ids[-1]) is None  # another tenant's key is another key
    assert await b.delete("acme", ids[5]) is True and await a.get("acme", ids[5]) is None


async def test_keys_live_ttl_s_past_the_chains_latest_turn(replicas: Any, prefix: str) -> None:
    store = replicas(ttl_s=600)
    await store.put("acme", _id(0), _turn(0), [])
    client = aioredis.Redis.from_url(REDIS)
    try:
        [key] = [k async for k in client.scan_iter(f"{prefix}:*")]
        assert b"{" in key  # the tenant's hash tag: one tenant's records share a cluster slot
        await client.expire(key, 60)
        await store.put("acme", _id(1), _turn(1), [_id(0)])  # the next turn restarts the first's TTL
        assert 590 < await client.ttl(key) <= 600
        await client.expire(key, 6000)
        await store.put("acme", _id(2), _turn(2), [_id(0)])  # never shortened (EXPIRE ... GT)
        assert await client.ttl(key) > 5900
    finally:
        await client.aclose()


async def test_an_unreachable_redis_is_a_503_to_read_and_a_logged_miss_to_write(
    replicas: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store = replicas("redis://127.0.0.1:1/0")  # nothing listens there
    with pytest.raises(errors.ServiceUnavailable) as caught:
        await store.chain("acme", _id(0))
    assert caught.value.headers == {"retry-after": "1"}
    await store.put("acme", _id(0), _turn(0), [])  # returns: a follow-up task must not raise
    assert "not stored" in caplog.text
