"""Per-principal request and token limits, shared by every gateway process through Redis.

Requests: an exact sliding log per identity (N requests per rolling minute hold across processes
with no boundary bursts; the retry-after of a refused request is the moment the request that keeps
the log full leaves it). Tokens: a token bucket (capacity = tokens_per_minute, refilled
continuously) that reserves `prompt + max_tokens` at admission and refunds or charges the
difference at the end, and knows exactly when enough tokens are back.

Both live in proxy.limits.store and are checked and charged together in one Lua script: one Redis
round trip to admit, one to settle. (Not `limits.aio`'s moving window: it needs a second call for
the remaining-requests header and a third for the bucket, and its in-memory storage sorts in a
worker thread on every hit; four round trips measured half of a request's CPU.)

Redis is the process's one shared client (proxy/redis.py): its socket timeout bounds every call
and its breaker decides when Redis is skipped. A request Redis cannot serve gets the configured
policy: fail_closed -> 503, fail_open -> per-process local limits under a per-process emergency cap.
While the breaker is open (after `redis.breaker.failures` in a row, by any stage) the policy
applies at once; shared limits resume as soon as a probe succeeds.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from proxy.auth.authenticator import Principal
from proxy.errors import RateLimited, ServiceUnavailable
from proxy.limits.store import LimitStore, LocalLimitStore, Peek, Quota, RedisLimitStore, Verdict
from proxy.redis import REDIS_ERRORS, RedisUnavailable, SharedRedis
from proxy.settings import LimitSettings

log = logging.getLogger(__name__)

WINDOW_S = 60.0


@dataclass
class LimiterStats:
    """Counters for metrics: Redis failures, rejections by kind, admissions while degraded."""

    redis_errors: int = 0
    settle_errors: int = 0
    degraded_admits: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: {"requests": 0, "tokens": 0, "emergency": 0})


class Admission:
    """An admitted request: its rate-limit headers, the token reservation to settle at the end,
    and, when a `free_if` entry was given and Redis answered, what the entry held (`peek`)."""

    __slots__ = ("_settle", "degraded", "headers", "peek", "reserved", "settled")

    def __init__(
        self,
        headers: dict[str, str],
        reserved: int,
        settle: Callable[[int], Awaitable[None]],
        *,
        degraded: bool = False,
        peek: Peek | None = None,
    ) -> None:
        self.headers, self.reserved, self.degraded, self.peek = headers, reserved, degraded, peek
        self._settle, self.settled = settle, False

    async def settle(self, used_tokens: int) -> None:
        """Refund `reserved - used` (or charge the overshoot). Idempotent; never raises for Redis
        trouble; the refund completes even if the caller is cancelled while awaiting it."""
        if self.settled:
            return
        self.settled = True
        delta = max(0, used_tokens) - self.reserved
        if delta:
            await self._settle(delta)


def format_duration(seconds: float) -> str:
    """OpenAI's (Go-style) durations: '20ms', '1s', '6m0s', '1h2m3.5s'."""
    ms = max(0, math.ceil(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest // 1000}.{rest % 1000:03d}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    return f"{minutes}m{secs}" if minutes else secs


def _identity(principal: Principal) -> str:
    """A fixed-shape key part for (tenant, sub): no claim value can change the key's structure."""
    return _identity_of(principal.tenant, principal.sub)


@functools.lru_cache(maxsize=16_384)  # once per request; the same few callers repeat
def _identity_of(tenant: str, sub: str) -> str:
    raw = f"{len(tenant)}:{tenant}|{sub}".encode("utf-8", "surrogatepass")
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _headers(tier: Quota, req_left: int, req_reset: float, tokens: float) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": str(tier.requests),
        "x-ratelimit-remaining-requests": str(max(0, req_left)),
        "x-ratelimit-reset-requests": format_duration(req_reset),
        "x-ratelimit-limit-tokens": str(tier.tokens),
        "x-ratelimit-remaining-tokens": str(max(0, math.floor(tokens))),
        "x-ratelimit-reset-tokens": format_duration((tier.tokens - tokens) / tier.rate),
    }


def _rejection(limit: str, message: str, headers: dict[str, str], wait_s: float) -> RateLimited:
    """`limit`: "requests" or "tokens", OpenAI's error type naming the limit that was hit."""
    headers["retry-after"] = str(max(1, math.ceil(wait_s)))
    headers["retry-after-ms"] = str(max(1, math.ceil(wait_s * 1000)))
    return RateLimited(message, limit=limit, headers=headers)


class RateLimiter:
    """Admits requests for a principal under its tier's limits; see the module docstring.
    `redis`: the process's shared client (None: limits in this process only); the caller owns it."""

    def __init__(
        self,
        settings: LimitSettings,
        redis: SharedRedis | None,
        *,
        clock: Callable[[], float] = time.time,
        key_prefix: str = "llmgw:rl",
    ) -> None:
        self._settings, self._clock, self._prefix = settings, clock, key_prefix
        self._tiers = {
            name: Quota(t.requests_per_minute, t.tokens_per_minute, WINDOW_S)
            for name, t in settings.tiers.items()
        }
        self._local = LocalLimitStore()
        self._redis = redis
        self._shared: RedisLimitStore | None = None
        self._deadline_s = 0.0
        if redis is not None:
            self._shared = RedisLimitStore(redis.client, key_prefix)
            # a safety net over one call: pool wait + one round trip (+ one retry); sockets time out first
            self._deadline_s = redis.settings.pool_timeout_s + 2 * redis.settings.timeout_s
        # while Redis is down and the policy fails open: one per-process log over every admission
        self._emergency = LocalLimitStore()
        self._emergency_quota = Quota(settings.emergency_requests_per_minute, 1, WINDOW_S)
        self._pending: set[asyncio.Task[None]] = set()
        self.stats = LimiterStats()

    async def start(self) -> None:
        """An unreachable Redis is not a start-up error (the policy covers it)."""
        if self._shared is not None and not await self.redis_ok():
            log.warning(
                "Redis is unreachable at start-up; rate limiting follows %s", self._settings.on_redis_error
            )

    @property
    def redis_breaker_state(self) -> str | None:
        """The shared Redis breaker's state (every Redis-using stage's), None without Redis."""
        return self._redis.breaker.state if self._redis is not None else None

    async def redis_ok(self) -> bool:
        """Whether Redis answers within the timeout (for /readyz). True when no Redis is configured."""
        return self._redis is None or await self._redis.ping()

    async def close(self) -> None:
        """Waits for the refunds in flight; the shared client is closed by its owner."""
        if self._pending:
            await asyncio.wait(self._pending, timeout=1.0)

    async def admit(
        self, principal: Principal, reserve_tokens: int, *, free_if: tuple[str, str] | None = None
    ) -> Admission:
        """Count one request and reserve `reserve_tokens`; raises RateLimited or ServiceUnavailable.
        `free_if`: a Redis (hash key, field) - a cached answer - whose presence makes the request
        cost no tokens. It is read in the same round trip and handed back as `Admission.peek`, so
        a cache hit needs neither its own GET nor a refund, and a miss needs no GET either."""
        tier = self._tiers.get(principal.tier) or self._tiers["default"]
        ident, cost = _identity(principal), max(0, reserve_tokens)
        if cost > tier.tokens:
            exc = RateLimited(
                f"Request too large: it may use {cost} tokens (prompt + max_tokens) but the limit is "
                f"{tier.tokens} tokens per minute. Lower max_tokens or shorten the prompt.",
                limit="tokens",
            )
            exc.should_retry = False
            self.stats.rejected["tokens"] += 1
            raise exc
        shared = self._shared
        now = self._clock()
        if shared is None or self._redis is None:
            verdict = await self._local.admit(ident, tier, cost, now)
            return self._decide(self._local, tier, ident, cost, verdict, now)
        try:
            with self._redis.guard():
                async with asyncio.timeout(self._deadline_s):
                    verdict = await shared.admit(ident, tier, cost, now, free_if)
        except REDIS_ERRORS as exc:
            if not isinstance(exc, RedisUnavailable):  # skipped while the breaker is open: not tried
                self.stats.redis_errors += 1
            return await self._degraded(tier, ident, cost)
        return self._decide(shared, tier, ident, cost, verdict, now, free_if=free_if)

    def _decide(
        self,
        store: LimitStore,
        tier: Quota,
        ident: str,
        cost: int,
        v: Verdict,
        now: float,
        *,
        degraded: bool = False,
        free_if: tuple[str, str] | None = None,
    ) -> Admission:
        """The store's verdict as an Admission, or the RateLimited it calls for."""
        if v.free:
            cost = 0
        if not v.requests_ok:
            wait = v.blocking + WINDOW_S - now
            self.stats.rejected["requests"] += 1
            raise _rejection(
                "requests",
                f"Rate limit reached for requests per minute (RPM): Limit {tier.requests}. "
                f"Please try again in {format_duration(wait)}.",
                _headers(tier, 0, wait, v.tokens),
                wait,
            )
        headers = _headers(tier, tier.requests - v.in_window, v.oldest + WINDOW_S - now, v.tokens)
        if not v.tokens_ok:
            wait = (cost - v.tokens) / tier.rate
            self.stats.rejected["tokens"] += 1
            raise _rejection(
                "tokens",
                f"Rate limit reached for tokens per minute (TPM): Limit {tier.tokens}, "
                f"Requested {cost}. Please try again in {format_duration(wait)}.",
                headers,
                wait,
            )
        peek = Peek(v.found) if free_if is not None and store.shared else None
        return Admission(
            headers, cost, lambda delta: self._settle(store, ident, tier, delta), degraded=degraded, peek=peek
        )

    async def _degraded(self, tier: Quota, ident: str, cost: int) -> Admission:
        if self._settings.on_redis_error == "fail_closed":
            raise ServiceUnavailable(
                "Rate limiting is temporarily unavailable. Please retry shortly.",
                headers={"retry-after": "1"},
            )
        now = self._clock()
        cap = await self._emergency.admit("*", self._emergency_quota, 0, now)
        if not cap.requests_ok:
            wait = cap.blocking + WINDOW_S - now
            self.stats.rejected["emergency"] += 1
            raise _rejection(
                "requests",
                "The gateway is running in degraded mode and has reached its emergency request cap. "
                f"Please try again in {format_duration(wait)}.",
                {},
                wait,
            )
        self.stats.degraded_admits += 1
        verdict = await self._local.admit(ident, tier, cost, now)
        return self._decide(self._local, tier, ident, cost, verdict, now, degraded=True)

    async def _settle(self, store: LimitStore, ident: str, tier: Quota, delta: int) -> None:
        if not store.shared:
            await store.adjust(ident, tier, delta, self._clock())
            return
        # A task of our own, so that a cancelled caller (client gone) cannot cut the refund short.
        task = asyncio.create_task(self._settle_shared(store, ident, tier, delta, self._clock()))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        await asyncio.shield(task)

    async def _settle_shared(
        self, store: LimitStore, ident: str, tier: Quota, delta: int, now: float
    ) -> None:
        assert self._redis is not None
        try:
            with self._redis.guard():
                async with asyncio.timeout(self._deadline_s):
                    await store.adjust(ident, tier, delta, now)
        except REDIS_ERRORS:
            self.stats.settle_errors += 1  # the refund (or overshoot) is lost; the bucket refills anyway
