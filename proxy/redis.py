"""The one Redis client of a gateway process and the one breaker every Redis-using stage consults.

Rate limits, the response cache, the A/B aggregates with their feedback mappings and the stored
conversations all live on the one Redis named by `redis_url`, so they share one connection pool
(`redis.pool_size` connections, `redis.timeout_s` on every socket operation) and one view of its
health: a `Breaker` (backends/breaker.py, the type the backend replicas use). Created and closed
by the lifespan (proxy/app.py) and handed to each stage's constructor.

Each call goes through `guard()`, which decides what the call's outcome says about Redis:
- a refused or broken connection, or an answer later than `redis.timeout_s`: a failure. After
  `redis.breaker.failures` in a row every stage steps aside (its own policy: the limiter fails
  open or closed, the cache bypasses, the A/B store keeps its buffer) and `RedisUnavailable` is
  raised at once instead of waiting for a timeout; after `reset_s` one call probes, and its success
  resumes Redis for every stage.
- any answer, an error reply included (a missing index, a full Redis): a success. Redis is up.
- a call the stage abandoned (its own shorter budget, the client gone) or one that waited too long
  for a pooled connection: no verdict. Impatience and local load say nothing about Redis.
One breaker, not one per stage: Redis is one server with one command thread, so a slow or dead
Redis is slow or dead for every stage alike. A stage that wants an answer sooner than
`redis.timeout_s` (the cache's `cache.redis_timeout_s`) gives up on its own without counting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from backends.breaker import Breaker
from proxy.settings import RedisSettings

log = logging.getLogger("llm_gateway.redis")

# What a stage catches around a Redis call: Redis did not serve it (RedisUnavailable included).
REDIS_ERRORS = (RedisError, OSError, TimeoutError)
_POOL_EXHAUSTED = "No connection available."  # redis-py's BlockingConnectionPool wait ran out


class RedisUnavailable(RedisConnectionError):
    """The breaker is open: the call was not sent. A RedisError, so stages handle it like one."""


@dataclass
class RedisStats:
    """Counters for metrics and tests."""

    failures: int = 0  # calls that failed in a way that counts against Redis
    skipped: int = 0  # calls refused at once while the breaker was open
    opened: int = 0  # times the breaker opened


class Guard:
    """`with redis.guard(): await ...`: refuses at once while the breaker is open, then records what
    the call's outcome says about Redis (see the module docstring). Sync, so it costs no await."""

    __slots__ = ("_redis", "_trial")

    def __init__(self, redis: SharedRedis) -> None:
        self._redis = redis
        self._trial = False

    def __enter__(self) -> None:
        breaker = self._redis.breaker
        self._trial = not breaker.closed
        if not breaker.allow():
            self._redis.stats.skipped += 1
            raise RedisUnavailable("Redis is skipped after repeated failures; a probe follows shortly")

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _tb: TracebackType | None
    ) -> None:
        if kind is None or issubclass(kind, ResponseError):
            self._redis.succeeded()
        elif issubclass(kind, REDIS_ERRORS) and not _local(exc):
            self._redis.failed(exc)
        elif self._trial:
            self._redis.breaker.release()


def _local(exc: BaseException | None) -> bool:
    """A wait for a pooled connection that ran out: this process is busy, Redis may be fine."""
    return isinstance(exc, RedisConnectionError) and str(exc) == _POOL_EXHAUSTED


class SharedRedis:
    """One pool and one breaker for one Redis URL. Owned by whoever created it (the lifespan)."""

    def __init__(
        self, url: str, settings: RedisSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.url, self.settings = url, settings
        self.pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=settings.pool_size,
            # Waiting for a pooled connection is local queueing, not Redis being slow: its own,
            # longer bound, and no verdict on Redis when it runs out (see Guard).
            timeout=settings.pool_timeout_s,
            socket_timeout=settings.timeout_s,
            socket_connect_timeout=settings.timeout_s,
            # one immediate retry on a dead connection (stale after a Redis restart); timeouts are
            # never retried: the breaker and each stage's policy decide what a slow Redis means
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            protocol=2,  # FT.SEARCH replies are parsed in their RESP2 (flat list) form
        )
        self.client = aioredis.Redis(connection_pool=self.pool)
        self.breaker = Breaker(settings.breaker.failures, settings.breaker.reset_s, clock)
        self.stats = RedisStats()

    def guard(self) -> Guard:
        return Guard(self)

    def succeeded(self) -> None:
        if self.breaker.success():
            log.info("Redis is reachable again; every stage uses it again")

    def failed(self, exc: BaseException | None) -> None:
        self.stats.failures += 1
        if self.breaker.failure():
            self.stats.opened += 1
            log.warning(
                "Redis failed (%s) %d times in a row; every stage steps aside, one probe every %.1f s",
                type(exc).__name__,
                self.settings.breaker.failures,
                self.settings.breaker.reset_s,
            )

    async def ping(self) -> bool:
        """Whether Redis answers within the timeout (for /readyz); the breaker is left alone."""
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                await self.client.ping()
        except REDIS_ERRORS:
            return False
        return True

    async def close(self) -> None:
        await self.client.aclose()
        await self.pool.aclose()
