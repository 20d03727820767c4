"""The breaker type (backends/breaker.py) and the shared Redis client's guard (proxy/redis.py), with an
injected clock: what counts against Redis, one probe at a time, and what closes it again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from backends.breaker import Breaker
from proxy.redis import RedisUnavailable, SharedRedis
from proxy.settings import BreakerSettings, RedisSettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def redis() -> AsyncIterator[tuple[SharedRedis, Clock]]:
    """A client whose breaker opens after 3 failures for 1 s; nothing is ever sent (no network)."""
    clock = Clock()
    settings = RedisSettings(breaker=BreakerSettings(failures=3, reset_s=1.0))
    shared = SharedRedis("redis://127.0.0.1:1/0", settings, clock=clock)
    yield shared, clock
    await shared.close()


def fail(redis: SharedRedis, exc: BaseException) -> None:
    with pytest.raises(type(exc)), redis.guard():
        raise exc


def test_breaker_reports_its_transitions_and_a_released_trial_goes_to_the_next_caller() -> None:
    clock = Clock()
    b = Breaker(failures=2, reset_s=5, clock=clock)
    assert b.failure() is False and b.closed
    assert b.failure() is True and b.state == "open"  # opened now
    assert b.failure() is False  # already open: the reset interval starts again
    clock.now += 5
    assert b.allow() is True and b.allow() is False  # one trial at a time
    b.release()  # the trial was abandoned: no verdict
    assert b.state == "half_open" and b.allow() is True
    assert b.success() is True and b.closed and b.success() is False


async def test_failures_in_a_row_open_it_for_every_caller_and_skip_at_once(
    redis: tuple[SharedRedis, Clock],
) -> None:
    shared, _ = redis
    fail(shared, RedisTimeoutError("Timeout reading from socket"))
    fail(shared, RedisConnectionError("Connection refused"))
    with shared.guard():  # a success in between: the count starts again
        pass
    for _ in range(3):
        fail(shared, OSError("unreachable"))
    assert shared.breaker.state == "open" and shared.stats.opened == 1 and shared.stats.failures == 5
    with pytest.raises(RedisUnavailable), shared.guard():
        raise AssertionError("not reached: the call is not made")
    assert shared.stats.skipped == 1


async def test_one_probe_after_the_reset_and_its_success_closes_it(redis: tuple[SharedRedis, Clock]) -> None:
    shared, clock = redis
    for _ in range(3):
        fail(shared, RedisTimeoutError())
    clock.now += 0.5
    with pytest.raises(RedisUnavailable), shared.guard():
        pass
    clock.now += 0.5
    probe = shared.guard()
    probe.__enter__()  # the probe is in flight ...
    with pytest.raises(RedisUnavailable), shared.guard():  # ... so every other call is still skipped
        pass
    probe.__exit__(None, None, None)
    assert shared.breaker.closed
    with shared.guard():
        pass


async def test_a_failed_probe_opens_it_for_another_interval(redis: tuple[SharedRedis, Clock]) -> None:
    shared, clock = redis
    for _ in range(3):
        fail(shared, RedisTimeoutError())
    clock.now += 1.0
    fail(shared, RedisConnectionError("Connection refused"))
    assert shared.breaker.state == "open" and shared.breaker.reopens_in() == 1.0
    assert shared.stats.opened == 1  # still the same outage


async def test_an_abandoned_probe_lets_the_next_call_probe(redis: tuple[SharedRedis, Clock]) -> None:
    """A cancelled call (client gone, or the stage's own shorter budget) says nothing about Redis."""
    shared, clock = redis
    for _ in range(3):
        fail(shared, RedisTimeoutError())
    clock.now += 1.0
    fail(shared, asyncio.CancelledError())
    assert shared.breaker.state == "half_open"
    with shared.guard():  # the next call gets the probe
        pass
    assert shared.breaker.closed and shared.stats.failures == 3


async def test_an_error_reply_is_an_answer_and_a_pool_wait_is_no_verdict(
    redis: tuple[SharedRedis, Clock],
) -> None:
    shared, clock = redis
    for _ in range(2):
        fail(shared, RedisTimeoutError())
    fail(shared, ResponseError("no such index"))  # Redis answered: the count starts again
    for _ in range(2):
        fail(shared, RedisTimeoutError())
    fail(shared, RedisConnectionError("No connection available."))  # this process was busy
    assert shared.breaker.closed and shared.stats.failures == 4
    fail(shared, RedisTimeoutError())
    clock.now += 1.0
    fail(shared, RedisConnectionError("No connection available."))  # the probe gives its turn back
    with shared.guard():
        pass
    assert shared.breaker.closed
