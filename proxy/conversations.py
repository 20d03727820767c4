"""The response store behind /v1/responses: one record per stored response, per tenant, in Redis
(every replica continues every conversation) or in process memory (no redis_url: one process).

A record holds the Response object, its request's input items and the ids of its nearest WINDOW
ancestors. A chain of n responses loads in 1 + ceil((n - 1) / WINDOW) reads (each fetches a window
of records at once), and a turn costs its own items plus at most WINDOW ids. The alternatives: a
record holding the whole flattened history makes a conversation of n turns cost O(n^2) bytes (an
agent's loop runs hundreds of turns); a record holding only its parent's id costs n sequential reads.
Each new turn restarts the TTL of every response in its chain, so a conversation lives `ttl_s` past
its latest turn. Deleting a response breaks the chains running through it: they cannot be continued.
Keys carry the tenant's digest as a hash tag, so one tenant's records share a Redis Cluster slot.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import orjson

from proxy import errors
from proxy.apis.responses import Chain, StoredTurn
from proxy.redis import REDIS_ERRORS, SharedRedis
from proxy.settings import ResponsesSettings

log = logging.getLogger("llm_gateway.conversations")
WINDOW = 64  # ancestor ids per record: reads per chain vs. bytes per turn
_RECORD_OVERHEAD = 128  # bytes the in-process store counts per record beyond its key and data


class _Records:
    """The chain logic over a key-value seam (`_read`, `_write`, `_remove`) that the Redis and the
    in-process stores implement."""

    def __init__(self, settings: ResponsesSettings) -> None:
        self.settings = settings

    async def _read(self, keys: list[str]) -> list[bytes | None]:
        raise NotImplementedError

    async def _write(self, key: str, data: bytes, refresh: list[str]) -> None:
        raise NotImplementedError

    async def _remove(self, key: str) -> bool:
        raise NotImplementedError

    def _key(self, tenant: str, response_id: str) -> str:
        return f"{self.settings.prefix}:{{{_tenant_tag(tenant)}}}:{response_id}"

    async def chain(self, tenant: str, response_id: str) -> Chain | None:
        (head,) = await self._read([self._key(tenant, response_id)])
        if head is None:
            return None
        records: list[dict[str, Any]] = [orjson.loads(head)]
        ids = [response_id]
        window: list[str] = records[0]["ancestors"]
        while window:
            if len(ids) + len(window) >= self.settings.max_depth:
                raise errors.InvalidRequest(
                    f"This conversation holds {self.settings.max_depth - 1} responses or more, the most "
                    "a chain may hold here; start a new conversation.",
                    param="previous_response_id",
                    code="conversation_too_long",
                )
            found = await self._read([self._key(tenant, a) for a in window])
            if missing := [a for a, data in zip(window, found, strict=True) if data is None]:
                raise errors.InvalidRequest(
                    f"Response '{missing[-1]}' of this conversation was deleted or has expired; the "
                    "conversation can no longer be continued.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            older = [orjson.loads(data) for data in found if data is not None]
            records[:0], ids[:0] = older, window
            window = older[0]["ancestors"]  # the oldest loaded record's own window: strictly older ids
        return Chain([StoredTurn(r["response"], r["input"]) for r in records], ids)

    async def put(self, tenant: str, response_id: str, turn: StoredTurn, ancestors: list[str]) -> None:
        record = {"response": turn.response, "input": turn.input, "ancestors": ancestors[-WINDOW:]}
        data = orjson.dumps(record)
        if len(data) > self.settings.max_bytes:
            log.warning("response %s not stored: %d bytes (max_bytes %d)", response_id, len(data),
                        self.settings.max_bytes)  # fmt: skip
            return
        try:
            await self._write(self._key(tenant, response_id), data, [self._key(tenant, a) for a in ancestors])
        except errors.ServiceUnavailable:
            log.warning("response %s not stored: the response store is unreachable", response_id)

    async def get(self, tenant: str, response_id: str) -> dict[str, Any] | None:
        (data,) = await self._read([self._key(tenant, response_id)])
        return None if data is None else dict(orjson.loads(data)["response"])

    async def delete(self, tenant: str, response_id: str) -> bool:
        return await self._remove(self._key(tenant, response_id))


class MemoryConversations(_Records):
    """In process memory: least recently used records go first past `memory_bytes`; an expired
    record is dropped when it is next read (until then it counts against the budget)."""

    def __init__(self, settings: ResponsesSettings, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(settings)
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # key -> (expires, data)
        self.bytes = 0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0

    async def _read(self, keys: list[str]) -> list[bytes | None]:
        now = self._clock()
        found: list[bytes | None] = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is not None and entry[0] <= now:
                self._drop(key)
                entry = None
            if entry is not None:
                self._entries.move_to_end(key)
            found.append(None if entry is None else entry[1])
        return found

    async def _write(self, key: str, data: bytes, refresh: list[str]) -> None:
        expires = self._clock() + self.settings.ttl_s
        for ancestor in refresh:
            entry = self._entries.get(ancestor)
            if entry is not None:
                self._entries[ancestor] = (max(entry[0], expires), entry[1])
                self._entries.move_to_end(ancestor)
        self._drop(key)
        self._entries[key] = (expires, data)
        self.bytes += _size(key, data)
        while self.bytes > self.settings.memory_bytes and self._entries:
            oldest, (_, old) = self._entries.popitem(last=False)
            self.bytes -= _size(oldest, old)

    async def _remove(self, key: str) -> bool:
        (found,) = await self._read([key])
        self._drop(key)
        return found is not None

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= _size(key, entry[1])


class RedisConversations(_Records):
    """In Redis (the process's shared client and breaker, proxy/redis.py): one string per response
    with its TTL; a turn's write and its chain's TTL refresh go in one pipelined round trip. Redis
    failures become errors.ServiceUnavailable here."""

    def __init__(self, settings: ResponsesSettings, redis: SharedRedis) -> None:
        super().__init__(settings)
        self._redis = redis

    async def start(self) -> None:
        return None  # the lifespan owns the shared client

    async def close(self) -> None:
        return None

    async def _read(self, keys: list[str]) -> list[bytes | None]:
        try:
            with self._redis.guard():
                found = await self._redis.client.mget(keys)
        except REDIS_ERRORS as exc:
            raise _unavailable(exc) from None
        return [value.encode() if isinstance(value, str) else value for value in found]

    async def _write(self, key: str, data: bytes, refresh: list[str]) -> None:
        ttl = self.settings.ttl_s
        try:
            with self._redis.guard():
                async with self._redis.client.pipeline(transaction=False) as pipe:
                    pipe.set(key, data, ex=ttl)
                    for ancestor in refresh:
                        pipe.expire(ancestor, ttl, gt=True)  # never shortens what another turn set
                    await pipe.execute()
        except REDIS_ERRORS as exc:
            raise _unavailable(exc) from None

    async def _remove(self, key: str) -> bool:
        try:
            with self._redis.guard():
                return bool(await self._redis.client.delete(key))
        except REDIS_ERRORS as exc:
            raise _unavailable(exc) from None


Conversations = MemoryConversations | RedisConversations


def build_conversations(settings: ResponsesSettings, redis: SharedRedis | None) -> Conversations:
    """The store for this deployment: Redis when the gateway has one, else in process."""
    return MemoryConversations(settings) if redis is None else RedisConversations(settings, redis)


def _unavailable(exc: BaseException) -> errors.ServiceUnavailable:
    log.warning("response store: Redis failed (%s)", type(exc).__name__)
    return errors.ServiceUnavailable(
        "The response store is unavailable; try again shortly.", headers={"retry-after": "1"}
    )


def _size(key: str, data: bytes) -> int:
    return len(key) + len(data) + _RECORD_OVERHEAD


@functools.lru_cache(maxsize=4096)
def _tenant_tag(tenant: str) -> str:
    """A tenant's part of a key: fixed length, no separator characters, not the name itself."""
    return hashlib.blake2b(tenant.encode(), digest_size=8, person=b"llmgw-resp").hexdigest()
