"""Rate limits against the real Redis at 127.0.0.1:6379 (and private redis-server processes for outages)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.auth.authenticator import Principal
from proxy.errors import RateLimited, ServiceUnavailable
from proxy.limits.limiter import RateLimiter, format_duration
from proxy.redis import SharedRedis
from proxy.settings import LimitSettings, RedisSettings, TierLimits

ROOT = Path(__file__).resolve().parents[2]
REDIS = "redis://127.0.0.1:6379"


def principal(sub: str = "alice", tenant: str = "acme", tier: str = "default") -> Principal:
    return Principal(sub, tenant, tier, None, MappingProxyType({}))


def limits(rpm: int = 1000, tpm: int = 1_000_000, **kw: Any) -> LimitSettings:
    return LimitSettings(tiers={"default": TierLimits(requests_per_minute=rpm, tokens_per_minute=tpm)}, **kw)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FrozenClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    name = f"test-rl-{time.time_ns()}"
    yield name
    client = aioredis.Redis.from_url(REDIS)
    keys = [k async for k in client.scan_iter(match=f"{name}:*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def make(prefix: str) -> AsyncIterator[Any]:
    """A limiter with a shared Redis client of its own (one gateway process); `timeout_s` is the
    client's socket timeout, `clock` the limiter's and its breaker's."""
    made: list[tuple[RateLimiter, SharedRedis | None]] = []

    async def factory(
        settings: LimitSettings, url: str = REDIS, *, timeout_s: float = 0.25, clock: Any = None
    ) -> RateLimiter:
        redis = None
        if url:
            redis = SharedRedis(url, RedisSettings(timeout_s=timeout_s), clock=clock or time.monotonic)
        limiter = RateLimiter(settings, redis, key_prefix=prefix, clock=clock or time.time)
        await limiter.start()
        made.append((limiter, redis))
        return limiter

    yield factory
    for limiter, redis in made:
        await limiter.close()
        if redis is not None:
            await redis.close()


WORKER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from types import MappingProxyType
    from proxy.auth.authenticator import Principal
    from proxy.errors import GatewayError
    from proxy.limits.limiter import RateLimiter
    from proxy.redis import SharedRedis
    from proxy.settings import LimitSettings, RedisSettings, TierLimits

    async def main(prefix, rpm, n, start_at):
        settings = LimitSettings(
            tiers={"default": TierLimits(requests_per_minute=rpm, tokens_per_minute=10**9)},
            on_redis_error="fail_closed",
        )
        redis = SharedRedis("redis://127.0.0.1:6379", RedisSettings(timeout_s=5.0))
        limiter = RateLimiter(settings, redis, key_prefix=prefix)
        await limiter.start()
        who = Principal("alice", "acme", "default", None, MappingProxyType({}))
        await asyncio.sleep(max(0.0, start_at - time.time()))
        results = await asyncio.gather(*(limiter.admit(who, 10) for _ in range(n)), return_exceptions=True)
        await limiter.close()
        await redis.close()
        kinds = [type(r).__name__ for r in results]
        print(json.dumps({k: kinds.count(k) for k in set(kinds)}))

    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
    """
)


def test_exact_request_limit_across_two_processes(prefix: str) -> None:
    start_at = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, prefix, "37", "100", str(start_at)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        outcomes.append(json.loads(out))
    accepted = sum(o.get("Admission", 0) for o in outcomes)
    rejected = sum(o.get("RateLimited", 0) for o in outcomes)
    assert (accepted, rejected) == (37, 163), outcomes


async def test_reservation_and_refund_show_in_headers(make: Any) -> None:
    clock = FrozenClock()  # the token bucket reads this clock, so no refill blurs the numbers
    limiter = await make(limits(rpm=10, tpm=1000), clock=clock)
    who = principal()
    first = await limiter.admit(who, 300)
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert first.headers["x-ratelimit-remaining-tokens"] == "700"
    assert first.headers["x-ratelimit-reset-tokens"] == "18s"  # 300 tokens at 1000/min
    assert first.headers["x-ratelimit-limit-requests"] == "10"
    assert first.headers["x-ratelimit-remaining-requests"] == "9"
    await first.settle(120)  # 180 of the reservation come back
    await first.settle(0)  # idempotent: a second settle changes nothing
    second = await limiter.admit(who, 0)
    assert second.headers["x-ratelimit-remaining-tokens"] == "880"
    assert second.headers["x-ratelimit-remaining-requests"] == "8"
    third = await limiter.admit(who, 100)
    await third.settle(250)  # overshoot: 150 more are charged
    assert (await limiter.admit(who, 0)).headers["x-ratelimit-remaining-tokens"] == "630"


async def test_token_rejection_with_exact_retry_after(make: Any) -> None:
    clock = FrozenClock()
    limiter = await make(limits(rpm=100, tpm=600), clock=clock)  # 10 tokens per second
    who = principal()
    await limiter.admit(who, 580)
    with pytest.raises(RateLimited) as info:
        await limiter.admit(who, 45)  # 20 left: 25 short -> 2.5 s
    exc = info.value
    assert exc.status == 429 and exc.code == "rate_limit_exceeded"
    assert exc.headers["retry-after"] == "3"
    assert exc.headers["retry-after-ms"] == "2500"
    assert exc.headers["x-ratelimit-remaining-tokens"] == "20"
    assert "tokens per minute" in exc.message
    clock.now += 2.5
    await limiter.admit(who, 45)  # exactly when retry-after said
    assert limiter.stats.rejected["tokens"] == 1


async def test_token_retry_after_matches_real_time(make: Any) -> None:
    limiter = await make(limits(rpm=100, tpm=600))  # real clock: 10 tokens per second
    who = principal()
    await limiter.admit(who, 600)
    with pytest.raises(RateLimited) as info:
        await limiter.admit(who, 15)
    wait = int(info.value.headers["retry-after"])
    assert wait == 2
    await asyncio.sleep(wait)
    await limiter.admit(who, 15)


async def test_request_retry_after_is_time_to_window_reset(make: Any) -> None:
    limiter = await make(limits(rpm=2))
    who = principal()
    first_at = time.time()
    await limiter.admit(who, 1)
    await asyncio.sleep(1.2)
    await limiter.admit(who, 1)
    with pytest.raises(RateLimited) as info:
        await limiter.admit(who, 1)
    expected = first_at + 60 - time.time()  # the oldest request leaves the window then
    headers = info.value.headers
    assert abs(int(headers["retry-after"]) - expected) <= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-limit-requests"] == "2"
    assert set(headers) >= {"x-ratelimit-reset-requests", "x-ratelimit-remaining-tokens"}
    assert limiter.stats.rejected["requests"] == 1


async def test_request_larger_than_the_token_limit(make: Any) -> None:
    limiter = await make(limits(tpm=1000))
    with pytest.raises(RateLimited) as info:
        await limiter.admit(principal(), 1001)
    assert info.value.response_headers()["x-should-retry"] == "false"


async def test_tiers_and_principals_are_separate(make: Any) -> None:
    settings = LimitSettings(
        tiers={
            "default": TierLimits(requests_per_minute=1, tokens_per_minute=1000),
            "pro": TierLimits(requests_per_minute=3, tokens_per_minute=1000),
        }
    )
    limiter = await make(settings)
    for _ in range(3):
        await limiter.admit(principal("p", tier="pro"), 1)
    await limiter.admit(principal("u", tier="no-such-tier"), 1)  # unknown tier: default limits
    with pytest.raises(RateLimited):
        await limiter.admit(principal("u", tier="no-such-tier"), 1)
    # (tenant, sub) pairs that would collide if joined naively stay apart, odd characters included
    await limiter.admit(principal(sub="b:c", tenant="a"), 1)
    await limiter.admit(principal(sub="c", tenant="a:b"), 1)
    await limiter.admit(principal(sub="*{x}\n/", tenant="a"), 1)
    await limiter.admit(principal(sub="c", tenant="a|b"), 1)


async def test_refund_survives_a_cancelled_caller(make: Any) -> None:
    clock = FrozenClock()
    limiter = await make(limits(tpm=1000), clock=clock)
    who = principal()
    admission = await limiter.admit(who, 500)
    started = asyncio.Event()

    async def handler() -> None:
        try:
            started.set()
            await asyncio.Event().wait()  # a response that never ends: the client goes away
        finally:
            await admission.settle(100)

    task = asyncio.create_task(handler())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert (await limiter.admit(who, 0)).headers["x-ratelimit-remaining-tokens"] == "900"


async def test_in_memory_storage_without_redis(make: Any) -> None:
    limiter = await make(limits(rpm=2, tpm=100), url="")
    who = principal()
    admission = await limiter.admit(who, 60)
    assert admission.headers["x-ratelimit-remaining-tokens"] == "40"
    await admission.settle(10)
    await limiter.admit(who, 80)
    with pytest.raises(RateLimited):
        await limiter.admit(who, 1)
    assert await limiter.redis_ok()


# --- Redis unreachable, slow, stopped and restarted ----------------------------------------------


async def test_unreachable_redis_fail_open_uses_emergency_cap(make: Any) -> None:
    url = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    clock = FrozenClock()
    limiter = await make(limits(emergency_requests_per_minute=5), url=url, clock=clock)
    started = time.perf_counter()
    admitted = [await limiter.admit(principal(f"u{i}"), 10) for i in range(5)]
    assert all(a.degraded for a in admitted)
    clock.now += 20
    with pytest.raises(RateLimited) as info:  # the cap is per process, over every principal
        await limiter.admit(principal("u9"), 10)
    assert info.value.headers["retry-after"] == "40"  # when the first of the five leaves the minute
    for a in admitted:
        await a.settle(5)
    clock.now += 40
    assert (await limiter.admit(principal("u9"), 10)).degraded
    assert time.perf_counter() - started < 2.0
    assert limiter.stats.redis_errors >= 1 and limiter.stats.rejected["emergency"] == 1
    assert not await limiter.redis_ok()


async def test_unreachable_redis_fail_closed_is_503_and_fast(make: Any) -> None:
    limiter = await make(limits(on_redis_error="fail_closed"), url=f"redis://127.0.0.1:{free_port()}")
    started = time.perf_counter()
    for _ in range(20):
        with pytest.raises(ServiceUnavailable) as info:
            await limiter.admit(principal(), 10)
    assert info.value.status == 503 and info.value.headers["retry-after"] == "1"
    assert time.perf_counter() - started < 1.0


async def test_slow_redis_is_bounded_by_the_timeout(make: Any) -> None:
    """A server that accepts and never answers: each admit gives up after the client's timeout."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # read until the client gives up; never answer
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        limiter = await make(
            limits(on_redis_error="fail_closed"), url=f"redis://127.0.0.1:{port}", timeout_s=0.05
        )
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        beat = asyncio.create_task(heartbeat())
        started = time.perf_counter()
        with pytest.raises(ServiceUnavailable):
            await limiter.admit(principal(), 10)
        elapsed = time.perf_counter() - started
        beat.cancel()
        assert elapsed < 0.3
        assert ticks >= 2  # the loop kept running while we waited
    finally:
        server.close()


async def test_cancelled_probe_does_not_wedge_the_breaker(make: Any) -> None:
    """A client that disconnects during the probe must not leave Redis skipped for good."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    clock = FrozenClock()
    try:
        url = f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        limiter = await make(limits(), url=url, timeout_s=0.1, clock=clock)
        for _ in range(3):  # three timeouts in a row: Redis is skipped for a while
            assert (await limiter.admit(principal(), 1)).degraded
        errors = limiter.stats.redis_errors
        assert (await limiter.admit(principal(), 1)).degraded
        assert limiter.stats.redis_errors == errors  # skipped, not tried
        clock.now += 5
        probe = asyncio.create_task(limiter.admit(principal(), 1))
        await asyncio.sleep(0.02)
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        assert (await limiter.admit(principal(), 1)).degraded  # a new probe was made and timed out
        assert limiter.stats.redis_errors == errors + 1
    finally:
        server.close()


class RedisServer:
    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--bind", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.02)  # harness: waiting for a subprocess to listen
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(free_port())
    server.start()
    yield server
    server.stop()


async def wait_until_shared(limiter: RateLimiter, who: Principal) -> Any:
    """Admit until an admission comes from Redis again (the limiter probes about once a second)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            admission = await limiter.admit(who, 1)
        except (ServiceUnavailable, RateLimited):  # failing closed, or local limits while failing open
            admission = None
        if admission is not None and not admission.degraded:
            return admission
        await asyncio.sleep(0.1)
    raise AssertionError("shared limits did not resume")


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
async def test_redis_stopped_then_restarted(make: Any, private_redis: RedisServer, policy: str) -> None:
    url = f"redis://127.0.0.1:{private_redis.port}"
    settings = limits(rpm=4, on_redis_error=policy)
    a, b = await make(settings, url=url, timeout_s=0.2), await make(settings, url=url, timeout_s=0.2)
    who = principal()
    assert not (await a.admit(who, 1)).degraded
    private_redis.stop()
    started = time.perf_counter()
    if policy == "fail_closed":
        with pytest.raises(ServiceUnavailable):
            await a.admit(who, 1)
    else:
        assert (await a.admit(who, 1)).degraded
    assert time.perf_counter() - started < 0.5
    assert a.stats.redis_errors >= 1
    private_redis.start()  # same port, empty data set
    await wait_until_shared(a, principal("probe"))
    await wait_until_shared(b, principal("probe"))
    for limiter in (a, a, b, b):  # 4 shared admissions since the restart: the limit
        assert not (await limiter.admit(who, 1)).degraded
    for limiter in (a, b):
        with pytest.raises(RateLimited):
            await limiter.admit(who, 1)


def test_format_duration() -> None:
    cases = {0: "0ms", 0.02: "20ms", 1: "1s", 1.5: "1.5s", 59.994: "59.994s", 60: "1m0s", 360: "6m0s"}
    cases |= {86.4: "1m26.4s", 3723.5: "1h2m3.5s", 0.0001: "1ms"}
    for seconds, text in cases.items():
        assert format_duration(seconds) == text, seconds


async def test_a_token_refusal_spends_no_request_slot(make: Any) -> None:
    clock = FrozenClock()
    limiter = await make(limits(rpm=2, tpm=100), clock=clock)
    who = principal()
    await limiter.admit(who, 90)
    for _ in range(3):  # refused for tokens: neither the log nor the bucket is charged
        with pytest.raises(RateLimited) as info:
            await limiter.admit(who, 50)
        assert "tokens per minute" in info.value.message
        assert info.value.headers["x-ratelimit-remaining-requests"] == "1"
    admitted = await limiter.admit(who, 10)
    assert admitted.headers["x-ratelimit-remaining-requests"] == "0"
    assert admitted.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_redis_and_memory_stores_agree_step_by_step(prefix: str) -> None:
    """The Lua script and its in-process twin: the same verdicts for the same steps and clock."""
    import random

    from proxy.limits.store import LocalLimitStore, Quota, RedisLimitStore

    client = aioredis.Redis.from_url(REDIS)
    stores = (RedisLimitStore(client, prefix), LocalLimitStore())
    quota = Quota(requests=5, tokens=200, window_s=60.0)
    rng = random.Random(7)
    now = 1_000_000.0
    try:
        for step in range(400):
            now += rng.choice((0.0, 0.25, 1.5, 7.0, 31.0))
            ident = f"id{rng.randrange(3)}"
            if rng.random() < 0.2:
                delta = rng.randrange(-60, 60)
                for store in stores:
                    await store.adjust(ident, quota, delta, now)
                continue
            cost = rng.randrange(0, 120)
            shared, local = [await s.admit(ident, quota, cost, now) for s in stores]
            assert (shared.requests_ok, shared.tokens_ok, shared.in_window) == (
                local.requests_ok,
                local.tokens_ok,
                local.in_window,
            ), step
            for a, b in ((shared.oldest, local.oldest), (shared.blocking, local.blocking)):
                assert a == pytest.approx(b, abs=1e-3), step
            assert shared.tokens == pytest.approx(local.tokens, abs=1e-6), step
    finally:
        await client.aclose()


async def test_a_request_whose_answer_is_cached_reserves_no_tokens(make: Any, prefix: str) -> None:
    clock = FrozenClock()
    limiter = await make(limits(rpm=10, tpm=1000), clock=clock)
    who = principal()
    cached, absent = (f"{prefix}:cached-answer", "answer"), (f"{prefix}:no-such-answer", "answer")
    client = aioredis.Redis.from_url(REDIS)
    try:
        await client.hset(cached[0], "answer", b"the answer")
        hit = await limiter.admit(who, 300, free_if=cached)
        assert hit.reserved == 0 and hit.headers["x-ratelimit-remaining-tokens"] == "1000"
        assert hit.headers["x-ratelimit-remaining-requests"] == "9"  # a hit still spends a request
        assert hit.peek is not None and hit.peek.value == b"the answer"  # read in the same round trip
        miss = await limiter.admit(who, 300, free_if=absent)
        assert miss.reserved == 300 and miss.headers["x-ratelimit-remaining-tokens"] == "700"
        assert miss.peek is not None and miss.peek.value is None
        assert (await limiter.admit(who, 0)).peek is None  # nothing asked, nothing read
        await miss.settle(1300)  # an overshoot leaves the bucket 600 in debt
        with pytest.raises(RateLimited):
            await limiter.admit(who, 1, free_if=absent)
        assert (await limiter.admit(who, 1, free_if=cached)).reserved == 0  # free even in debt
    finally:
        await client.aclose()
