"""Where limits are kept: per identity, a sliding log of admitted requests and a token bucket, in
Redis (shared by every gateway process) or in process memory (no Redis, or failing open).

One admission is one atomic step: the log drops entries older than the window, and the request
is admitted only when the log has room *and* the bucket holds `cost` tokens; only then are both
charged (a refused request spends neither). In Redis that step is one Lua script over two keys with
the same hash tag, so it is one round trip; `adjust` (refund or overshoot at the end) is the second
and last. The bucket: capacity = tokens per minute, refilled continuously; a refund is capped at
capacity, an overshoot may leave it in debt. Times are the caller's clock (seconds).
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from dataclasses import dataclass
from typing import Protocol, TypeVar

import redis.asyncio as aioredis

V = TypeVar("V")
_LOCAL_MAX = 100_000  # identities kept in memory at most (the oldest is forgotten: it reads as unused)


@dataclass(frozen=True, slots=True)
class Quota:
    """One tier's limits: requests per window, and a bucket of `tokens` refilled over the window."""

    requests: int
    tokens: int  # bucket capacity
    window_s: float = 60.0

    @property
    def rate(self) -> float:
        """Tokens refilled per second."""
        return self.tokens / self.window_s


@dataclass(frozen=True, slots=True)
class Verdict:
    requests_ok: bool
    tokens_ok: bool
    in_window: int  # requests in the window, this one included when admitted
    oldest: float  # when the oldest request in the window was admitted (now when there is none)
    blocking: float  # when the request that keeps the log full was admitted (refusals: retry-after)
    tokens: float  # the bucket after this step
    free: bool = False  # the `free_if` entry existed: no tokens were reserved
    found: bytes | None = None  # that entry's value


@dataclass(frozen=True, slots=True)
class Peek:
    """What the admission read of the `free_if` entry: its value, or None when there is none."""

    value: bytes | None


class LimitStore(Protocol):
    shared: bool

    async def admit(
        self, ident: str, quota: Quota, cost: int, now: float, free_if: tuple[str, str] | None = None
    ) -> Verdict: ...

    async def adjust(self, ident: str, quota: Quota, delta: int, now: float) -> None: ...


# Shared by both scripts: refill the bucket in KEYS[2] to `now` -> tokens, ts.
_REFILL = """
local state = redis.call('HMGET', KEYS[2], 't', 'ts')
local tokens, ts = tonumber(state[1]), tonumber(state[2])
if tokens == nil or ts == nil then tokens, ts = cap, now end
if now > ts then tokens, ts = tokens + (now - ts) * rate, now end
if tokens > cap then tokens = cap end
"""
_SAVE = """
if tokens >= cap then
  redis.call('DEL', KEYS[2])
else
  redis.call('HSET', KEYS[2], 't', tokens, 'ts', ts)
  redis.call('PEXPIRE', KEYS[2], math.ceil((cap - tokens) / rate * 1000) + 1000)
end
"""
# KEYS: request log (sorted set scored by admission time), token bucket (hash {t, ts}), and
# optionally a hash whose field ARGV[8] makes the request free of tokens (a cached answer).
# ARGV: now, window_s, limit, member (unique), cap, refill/s, cost[, field].
# Returns {requests_ok, tokens_ok, in_window, oldest, blocking, tokens, free, value or nil}.
_ADMIT = (
    """
local now, window, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cap, rate, cost = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local free, found = 0, false
if KEYS[3] then
  found = redis.call('HGET', KEYS[3], ARGV[8])
  if found then cost, free = 0, 1 end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
"""
    + _REFILL
    + """
local function score_at(i)
  local e = redis.call('ZRANGE', KEYS[1], i, i, 'WITHSCORES')
  if e[2] then return e[2] end
  return tostring(now)
end
if count >= limit then
  return {0, 1, count, score_at(0), score_at(count - limit), tostring(tokens), free, found}
end
if free == 0 and cost > tokens then
  return {1, 0, count, score_at(0), tostring(now), tostring(tokens), free, found}
end
tokens = tokens - cost
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
"""
    + _SAVE
    + """
return {1, 1, count + 1, score_at(0), tostring(now), tostring(tokens), free, found}
"""
)
# KEYS: request log (unused), token bucket. ARGV: cap, refill/s, now, delta (negative: refund).
_ADJUST = (
    """
local cap, rate, now, delta = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
"""
    + _REFILL
    + """
tokens = math.min(cap, tokens - delta)
"""
    + _SAVE
)


class RedisLimitStore:
    shared = True

    def __init__(self, client: aioredis.Redis, prefix: str) -> None:
        self._admit = client.register_script(_ADMIT)
        self._adjust = client.register_script(_ADJUST)
        self._prefix = prefix
        self._tag = os.urandom(6).hex()  # log members must be unique across processes
        self._seq = itertools.count()

    def keys(self, ident: str) -> list[str]:
        """The two keys of one identity: one hash tag, so a Redis Cluster keeps them on one node."""
        return [f"{self._prefix}:{{{ident}}}:req", f"{self._prefix}:{{{ident}}}:tok"]

    async def admit(
        self, ident: str, quota: Quota, cost: int, now: float, free_if: tuple[str, str] | None = None
    ) -> Verdict:
        member = f"{self._tag}:{next(self._seq)}"
        keys = self.keys(ident)
        args: list[str | float] = [
            now,
            quota.window_s,
            quota.requests,
            member,
            quota.tokens,
            quota.rate,
            cost,
        ]
        if free_if is not None:
            keys.append(free_if[0])
            args.append(free_if[1])
        reply = await self._admit(keys=keys, args=args)
        req_ok, tok_ok, count, oldest, blocking, tokens, free = reply[:7]
        found = reply[7] if len(reply) > 7 else None  # a trailing nil is dropped from the reply
        return Verdict(
            bool(req_ok),
            bool(tok_ok),
            int(count),
            float(oldest),
            float(blocking),
            float(tokens),
            bool(free),
            found,
        )

    async def adjust(self, ident: str, quota: Quota, delta: int, now: float) -> None:
        await self._adjust(keys=self.keys(ident), args=[quota.tokens, quota.rate, now, delta])


class LocalLimitStore:
    """The same arithmetic in process memory."""

    shared = False

    def __init__(self) -> None:
        self._logs: dict[str, deque[float]] = {}
        self._buckets: dict[str, tuple[float, float]] = {}

    def _refill(self, ident: str, quota: Quota, now: float) -> float:
        tokens, ts = self._buckets.get(ident, (quota.tokens, now))
        return min(quota.tokens, tokens + max(0.0, now - ts) * quota.rate)

    def _save(self, ident: str, quota: Quota, tokens: float, now: float) -> None:
        if tokens >= quota.tokens:
            self._buckets.pop(ident, None)
            return
        _bounded_set(self._buckets, ident, (tokens, now))

    async def admit(
        self,
        ident: str,
        quota: Quota,
        cost: int,
        now: float,
        free_if: tuple[str, str] | None = None,  # a Redis hash field: never set without Redis
    ) -> Verdict:
        log = self._logs.get(ident)
        if log is None:
            log = deque()
            _bounded_set(self._logs, ident, log)
        while log and log[0] <= now - quota.window_s:
            log.popleft()
        count, tokens = len(log), self._refill(ident, quota, now)
        oldest = log[0] if log else now
        if count >= quota.requests:
            return Verdict(False, True, count, oldest, log[count - quota.requests], tokens)
        if cost > tokens:
            return Verdict(True, False, count, oldest, now, tokens)
        log.append(now)
        self._save(ident, quota, tokens - cost, now)
        return Verdict(True, True, count + 1, log[0], now, tokens - cost)

    async def adjust(self, ident: str, quota: Quota, delta: int, now: float) -> None:
        self._save(ident, quota, min(quota.tokens, self._refill(ident, quota, now) - delta), now)


def _bounded_set(table: dict[str, V], key: str, value: V) -> None:
    if key not in table and len(table) >= _LOCAL_MAX:
        del table[next(iter(table))]
    table[key] = value
