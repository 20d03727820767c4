"""Where the A/B aggregates and completion-id records live: Redis (shared by replicas, through the
process's shared client and its breaker) or process memory (no redis_url). The layout is documented
in proxy/experiments/aggregates.py; the logic lives there too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import orjson

from proxy.redis import SharedRedis
from proxy.settings import ObservabilitySettings

Fields = dict[str, float]
_READ_BATCH = 500
_WRITE_BATCH = 100


class AbBackend(Protocol):
    """Where the aggregates and completion-id records live."""

    async def apply(self, batch: dict[int, dict[str, Fields]]) -> None: ...
    async def read(self, minutes: range) -> list[dict[str, float]]: ...
    async def remember_many(self, records: dict[str, dict[str, str]]) -> None: ...
    async def lookup(self, cid: str) -> dict[str, str] | None: ...
    async def rate(
        self, cid: str, minute: int, prefix: str, owner: str, score: float, comment: str | None
    ) -> int: ...
    async def close(self) -> None: ...


def _flat(fields_by_pair: dict[str, Fields]) -> Fields:
    return {f"{pair}{name}": v for pair, fields in fields_by_pair.items() for name, v in fields.items()}


class MemoryBackend:
    """The layout in process memory (no redis_url): one process only, bounded."""

    def __init__(
        self, settings: ObservabilitySettings, clock: Callable[[], float], max_ids: int = 100_000
    ) -> None:
        self._settings, self._clock, self._max_ids = settings, clock, max_ids
        self._minutes: dict[int, Fields] = {}
        self._ids: OrderedDict[str, tuple[float, dict[str, str]]] = OrderedDict()

    async def apply(self, batch: dict[int, dict[str, Fields]]) -> None:
        for minute, pairs in batch.items():
            bucket = self._minutes.setdefault(minute, {})
            for name, value in _flat(pairs).items():
                bucket[name] = bucket.get(name, 0.0) + value
        oldest = int(self._clock() - self._settings.ab_retention_s) // 60
        for minute in [m for m in self._minutes if m < oldest]:
            del self._minutes[minute]

    async def read(self, minutes: range) -> list[dict[str, float]]:
        return [dict(self._minutes[m]) for m in minutes if m in self._minutes]

    async def remember_many(self, records: dict[str, dict[str, str]]) -> None:
        expires = self._clock() + self._settings.feedback_ttl_s
        for cid, record in records.items():
            self._ids[cid] = (expires, record)
            self._ids.move_to_end(cid)
        while len(self._ids) > self._max_ids:
            self._ids.popitem(last=False)

    async def lookup(self, cid: str) -> dict[str, str] | None:
        entry = self._ids.get(cid)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    async def rate(
        self, cid: str, minute: int, prefix: str, owner: str, score: float, comment: str | None
    ) -> int:
        record = await self.lookup(cid)
        if record is None:
            return 0
        if record["owner"] != owner:
            return -1
        old = float(record["score"]) if "score" in record else None
        record["score"] = repr(score)
        record.pop("comment", None)
        if comment:
            record["comment"] = comment
        delta = feedback_delta(score, old)
        await self.apply({minute: {prefix: delta}})
        return 1 if old is None else 2

    async def close(self) -> None:
        return None


def feedback_delta(score: float, old: float | None) -> Fields:
    if old is None:
        return {"fb_n": 1, "fb_s": score, "fb_q": score * score}
    return {"fb_s": score - old, "fb_q": score * score - old * old}


_RATE_LUA = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then return 0 end
if owner ~= ARGV[1] then return -1 end
local old = redis.call('HGET', KEYS[1], 'score')
local s = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'score', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'comment', ARGV[3])
else redis.call('HDEL', KEYS[1], 'comment') end
local p = ARGV[4]
if old then
  local o = tonumber(old)
  redis.call('HINCRBYFLOAT', KEYS[2], p .. 'fb_s', s - o)
  redis.call('HINCRBYFLOAT', KEYS[2], p .. 'fb_q', s * s - o * o)
else
  redis.call('HINCRBY', KEYS[2], p .. 'fb_n', 1)
  redis.call('HINCRBYFLOAT', KEYS[2], p .. 'fb_s', s)
  redis.call('HINCRBYFLOAT', KEYS[2], p .. 'fb_q', s * s)
end
redis.call('EXPIRE', KEYS[2], ARGV[5])
if old then return 2 end
return 1
"""


# KEYS: one record key per completion id. ARGV: ttl, then one JSON object of string fields per
# key (one argument per record keeps redis-py's packing cheap). A reused id starts over (no stale
# score).
_REMEMBER_LUA = """
local ttl = ARGV[1]
for i, key in ipairs(KEYS) do
  local flat = {}
  for field, value in pairs(cjson.decode(ARGV[i + 1])) do
    flat[#flat + 1] = field
    flat[#flat + 1] = value
  end
  redis.call('DEL', key)
  redis.call('HSET', key, unpack(flat))
  redis.call('EXPIRE', key, ttl)
end
return #KEYS
"""


class RedisBackend:
    """The layout in Redis, over the shared client (owned by the caller). Every call goes through
    its breaker: while Redis is considered down a call raises RedisUnavailable without being sent."""

    def __init__(self, redis: SharedRedis, settings: ObservabilitySettings) -> None:
        self._settings, self._prefix = settings, settings.ab_prefix
        self._shared, self._redis = redis, redis.client
        self._rate_script = self._redis.register_script(_RATE_LUA)
        self._remember_script = self._redis.register_script(_REMEMBER_LUA)

    def minute_key(self, minute: int) -> str:
        return f"{self._prefix}:m:{minute}"

    def _cid_key(self, cid: str) -> str:
        return f"{self._prefix}:c:{cid}"

    async def apply(self, batch: dict[int, dict[str, Fields]]) -> None:
        pipe = self._redis.pipeline(transaction=True)  # all or nothing: a failed flush never half-counts
        for minute, pairs in batch.items():
            key = self.minute_key(minute)
            for name, value in _flat(pairs).items():
                if float(value).is_integer():
                    pipe.hincrby(key, name, int(value))
                else:
                    pipe.hincrbyfloat(key, name, value)
            pipe.expire(key, self._settings.ab_retention_s)
        with self._shared.guard():
            await pipe.execute()

    async def read(self, minutes: range) -> list[dict[str, float]]:
        out: list[dict[str, float]] = []
        keys = [self.minute_key(m) for m in minutes]
        for start in range(0, len(keys), _READ_BATCH):
            pipe = self._redis.pipeline(transaction=False)
            for key in keys[start : start + _READ_BATCH]:
                pipe.hgetall(key)
            with self._shared.guard():
                replies = await pipe.execute()
            for raw in replies:
                out.append({k.decode(): float(v) for k, v in raw.items()})
        return out

    async def remember_many(self, records: dict[str, dict[str, str]]) -> None:
        """One script call per _WRITE_BATCH ids instead of three commands per id. Batches are small
        so that neither this event loop (packing) nor Redis (running the script) stalls for long:
        a flush of 2,500 ids in 4,500-argument calls took 15 ms of loop CPU at a stretch."""
        items = list(records.items())
        for start in range(0, len(items), _WRITE_BATCH):
            batch = items[start : start + _WRITE_BATCH]
            keys = [self._cid_key(cid) for cid, _ in batch]
            args: list[bytes | int] = [self._settings.feedback_ttl_s]
            args += [orjson.dumps(record) for _, record in batch]
            with self._shared.guard():
                await self._remember_script(keys=keys, args=args)

    async def lookup(self, cid: str) -> dict[str, str] | None:
        with self._shared.guard():
            raw = await self._redis.hgetall(self._cid_key(cid))
        return {_text(k): _text(v) for k, v in raw.items()} or None

    async def rate(
        self, cid: str, minute: int, prefix: str, owner: str, score: float, comment: str | None
    ) -> int:
        keys = [self._cid_key(cid), self.minute_key(minute)]
        args: list[str | int] = [owner, repr(score), comment or "", prefix, self._settings.ab_retention_s]
        with self._shared.guard():
            return int(await self._rate_script(keys=keys, args=args))

    async def close(self) -> None:
        return None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
