"""One Redis client and one breaker for every stage, against a private redis-server that is stopped and
started again: an outage seen by any stage makes every stage step aside at once, and a recovery seen
by any stage brings every stage back. Injected clock for the breaker's reset interval."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from types import MappingProxyType

import pytest

from proxy.auth.authenticator import Principal
from proxy.cache.response_cache import CachedAnswer, CacheScope, ResponseCache
from proxy.experiments.aggregates import ExperimentStore, Sample
from proxy.limits.limiter import RateLimiter
from proxy.protocol import ChatRequest
from proxy.redis import SharedRedis
from proxy.settings import (
    BreakerSettings,
    CacheSettings,
    LimitSettings,
    ObservabilitySettings,
    RedisSettings,
    SemanticCacheSettings,
)
from tests.component.test_ratelimit import RedisServer, free_port

WHO = Principal("alice", "acme", "default", None, MappingProxyType({}))
SCOPE = CacheScope("acme", "assistant", "control")
USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


class Clock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


@dataclass
class Stages:
    redis: SharedRedis
    clock: Clock
    limiter: RateLimiter
    cache: ResponseCache
    experiments: ExperimentStore


@pytest.fixture
def server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    srv = RedisServer(free_port())
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
async def stages(server: RedisServer) -> AsyncIterator[Stages]:
    """The three Redis-using stages of one gateway process, built as the lifespan builds them."""
    clock = Clock()
    settings = RedisSettings(timeout_s=0.5, breaker=BreakerSettings(failures=3, reset_s=1.0))
    redis = SharedRedis(f"redis://127.0.0.1:{server.port}/0", settings, clock=clock)
    prefix = f"test-shared-{uuid.uuid4().hex[:8]}"
    limiter = RateLimiter(LimitSettings(on_redis_error="fail_open"), redis, key_prefix=f"{prefix}:rl")
    exact_only = CacheSettings(redis_timeout_s=0.5, semantic=SemanticCacheSettings(enabled=False))
    cache = ResponseCache(exact_only, redis, None, prefix=f"{prefix}:cache", clock=clock)
    experiments = ExperimentStore(redis, ObservabilitySettings(ab_prefix=f"{prefix}:ab"), feedback={"m": 1.0})
    for part in (limiter, cache):
        await part.start()
    await experiments.start(flusher=False)
    yield Stages(redis, clock, limiter, cache, experiments)
    await experiments.close()
    await cache.close()
    await limiter.close()
    await redis.close()


def ask(text: str) -> ChatRequest:
    return ChatRequest.model_validate({"model": "assistant", "messages": [{"role": "user", "content": text}]})


def answer(text: str) -> CachedAnswer:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    body = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [choice],
        "usage": USAGE,
    }
    return CachedAnswer("hit", None, body)


def sample() -> Sample:
    return Sample("m", "control", 200, False, False, False, 10, 20, 0.5, 0.1)


async def test_an_outage_opens_the_one_breaker_for_every_stage_and_a_recovery_closes_it(
    stages: Stages, server: RedisServer
) -> None:
    s, question = stages, ask("How do I reset my password?")
    assert not (await s.limiter.admit(WHO, 10)).degraded
    await s.cache.store(SCOPE, question, answer("like this"))
    assert (await s.cache.fetch(SCOPE, question)).status == "hit"
    s.experiments.record(sample())
    await s.experiments.flush()
    assert s.experiments.stats.flushes == 1

    server.stop()
    # each stage meets the outage once: three failures in a row, whichever stage saw them
    assert (await s.limiter.admit(WHO, 10)).degraded
    assert (await s.cache.fetch(SCOPE, question)).status == "bypass"
    s.experiments.record(sample())
    await s.experiments.flush()
    assert s.redis.breaker.state == "open" and s.redis.stats.failures == 3
    assert s.experiments.stats.flush_errors == 1  # that flush had been sent: dropped, counted

    # now every stage steps aside without asking Redis
    started, errors = time.perf_counter(), s.limiter.stats.redis_errors
    assert (await s.limiter.admit(WHO, 10)).degraded
    assert s.limiter.stats.redis_errors == errors  # skipped, not tried
    assert (await s.cache.fetch(SCOPE, question)).status == "bypass"
    s.experiments.record(sample())
    s.experiments.remember("chatcmpl-1", sample(), WHO)
    await s.experiments.flush()
    assert s.experiments.stats.flush_errors == 1 and s.experiments._buffer  # kept for later
    assert time.perf_counter() - started < 0.1  # no connection attempt, no timeout
    assert s.redis.stats.skipped >= 4 and s.redis.stats.failures == 3

    server.start()  # same port, empty data set
    s.clock.now += 1.0  # the reset interval: the next call, from any stage, probes
    await s.experiments.flush()  # the A/B store's flush is the probe; it succeeds
    assert s.redis.breaker.closed and s.redis.stats.opened == 1
    assert not (await s.limiter.admit(WHO, 10)).degraded  # shared limits again
    assert (await s.cache.fetch(SCOPE, question)).status == "miss"  # Redis answers (empty after restart)
    counts = (await s.experiments.read(3600))["m"]["control"]
    assert counts.get("n") == 1  # the buffer kept while Redis was skipped (the dropped flush is gone)
    assert await s.experiments._backend.lookup("chatcmpl-1") is not None
