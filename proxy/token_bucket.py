"""Token buckets (capacity = a per-minute limit, refilled continuously) in Redis or in process memory.

Reserve at admission with `take`, reconcile at the end with `adjust` (a refund is a negative
adjustment, capped at capacity; an overshoot may leave the bucket in debt). Both forms share the
same arithmetic; the Redis form is one Lua script, so concurrent processes see one atomic bucket.
"""

from __future__ import annotations

from typing import Protocol

import redis.asyncio as aioredis

_LOCAL_MAX = 100_000  # buckets kept in memory at most

# KEYS[1] bucket hash {t: tokens, ts: last refill}. ARGV: capacity, refill/s, now, cost, mode
# (1: take `cost` only if available; 0: adjust by `cost`, negative = refund). Returns {ok, tokens}.
_LUA = """
local cap, rate, now, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local state = redis.call('HMGET', KEYS[1], 't', 'ts')
local tokens, ts = tonumber(state[1]), tonumber(state[2])
if tokens == nil or ts == nil then tokens, ts = cap, now end
if now > ts then tokens, ts = tokens + (now - ts) * rate, now end
if tokens > cap then tokens = cap end
local ok = 1
if ARGV[5] == '1' then
  if cost > tokens then ok = 0 else tokens = tokens - cost end
else
  tokens = math.min(cap, tokens - cost)
end
if tokens >= cap then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 't', tokens, 'ts', ts)
  redis.call('PEXPIRE', KEYS[1], math.ceil((cap - tokens) / rate * 1000) + 1000)
end
return {ok, tostring(tokens)}
"""


class Buckets(Protocol):
    """take: remove `cost` tokens if that many are there; adjust: remove `delta` (negative: refund)."""

    async def take(self, key: str, cap: int, rate: float, cost: int, now: float) -> tuple[bool, float]: ...
    async def adjust(self, key: str, cap: int, rate: float, delta: int, now: float) -> None: ...


class RedisBuckets:
    def __init__(self, client: aioredis.Redis) -> None:
        self._script = client.register_script(_LUA)

    async def take(self, key: str, cap: int, rate: float, cost: int, now: float) -> tuple[bool, float]:
        ok, tokens = await self._script(keys=[key], args=[cap, rate, now, cost, 1])
        return bool(ok), float(tokens)

    async def adjust(self, key: str, cap: int, rate: float, delta: int, now: float) -> None:
        await self._script(keys=[key], args=[cap, rate, now, delta, 0])


class LocalBuckets:
    """The same bucket in process memory (no Redis configured, or failing open)."""

    def __init__(self) -> None:
        self._state: dict[str, tuple[float, float]] = {}

    def _refill(self, key: str, cap: int, rate: float, now: float) -> float:
        tokens, ts = self._state.get(key, (cap, now))
        return min(cap, tokens + max(0.0, now - ts) * rate)

    def _store(self, key: str, cap: int, tokens: float, now: float) -> None:
        if tokens >= cap:
            self._state.pop(key, None)
            return
        if len(self._state) >= _LOCAL_MAX:  # forget the oldest; a forgotten bucket reads full
            del self._state[next(iter(self._state))]
        self._state[key] = (tokens, now)

    async def take(self, key: str, cap: int, rate: float, cost: int, now: float) -> tuple[bool, float]:
        tokens = self._refill(key, cap, rate, now)
        ok = cost <= tokens
        self._store(key, cap, tokens - cost if ok else tokens, now)
        return ok, tokens - cost if ok else tokens

    async def adjust(self, key: str, cap: int, rate: float, delta: int, now: float) -> None:
        self._store(key, cap, min(cap, self._refill(key, cap, rate, now) - delta), now)
