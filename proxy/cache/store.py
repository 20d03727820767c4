"""Where cached answers live: Redis (+ its vector index) or an in-process LRU with the same behaviour.

Layout in Redis: one hash per answer, `{prefix}:e:{exact digest}`, with `answer` (JSON), and when the
request can be matched semantically also `vec` (float32), `part` (TAG: digest of tenant scope, model,
variant, earlier context, answer-affecting parameters and embedder) and `text` (the user turn, for
verification). The exact layer is `HGET answer`; the semantic layer is one hybrid KNN query over the
index `{prefix}:idx:{dim}` filtered by `part`. Expiry is the hash's TTL; the index drops expired keys.

Why direct FT.SEARCH rather than RedisVL's SemanticCache (loadtest/bench_embed.py --compare-redisvl,
1,000 entries in one partition, Redis 8.2 + RediSearch 2.10, vector supplied by the caller, on a busy
2-core host): RedisVL `acheck` p50 0.42 ms / p95 0.68 ms, direct query p50 0.35 ms / p95 0.54 ms. So
RedisVL is not too slow; it is chosen against for what it does: every hit re-EXPIREs the entry (a
sliding TTL, so a popular answer never ages out, contrary to `cache.ttl_s`); its entry id is its own
hash of prompt + filters, so the exact layer would need a second copy of every answer; its
constructor runs blocking index I/O (and CustomVectorizer calls the embedder synchronously); and it
keeps its own clients, outside the bounded pool and timeouts that make the cache a safe bypass.

RedisStore uses the process's shared client (proxy/redis.py): every operation goes through its
breaker, so while Redis is considered down a lookup or store fails at once (and is bypassed).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from redis.exceptions import ResponseError

from proxy.redis import REDIS_ERRORS, SharedRedis

log = logging.getLogger(__name__)
INDEX_RETRY_S = 1.0  # while the index is missing (Redis down at start-up, restarted), retry this often


@dataclass(frozen=True)
class SemanticEntry:
    part: str
    vector: np.ndarray
    text: str


@dataclass(frozen=True)
class Candidate:
    similarity: float
    text: str
    answer: bytes


class Store(Protocol):
    async def start(self, dim: int | None) -> None: ...

    async def close(self) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, answer: bytes, ttl_s: int, semantic: SemanticEntry | None) -> None: ...

    async def nearest(self, part: str, vector: np.ndarray, k: int) -> list[Candidate]: ...


class SearchModuleMissing(RuntimeError):
    pass


# KEYS[1]: the entry. ARGV: ttl, then field/value pairs. One atomic step: a later exact-only store
# must not keep a stale vector, so the old entry goes first.
_PUT = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
"""


class RedisStore:
    """The cache in Redis, over the shared client; the caller owns `redis` (not closed here)."""

    def __init__(self, redis: SharedRedis, *, prefix: str) -> None:
        self._shared, self._prefix = redis, prefix
        self._redis = redis.client
        self._put_script = self._redis.register_script(_PUT)
        self._index, self._dim = "", 0
        self._ready, self._retry_at = False, 0.0

    async def start(self, dim: int | None) -> None:
        """With `dim`, create or verify the vector index (needs the Redis query engine)."""
        if dim is None:
            return
        self._index, self._dim = f"{self._prefix}:idx:{dim}", dim
        try:
            with self._shared.guard():
                await self._ensure_index()
        except ResponseError:  # Redis answered: a real problem with the index, not an outage
            raise
        except REDIS_ERRORS as exc:
            # Unreachable is not misconfigured: serve without the cache and create the index later.
            log.warning("cache: Redis unreachable at start-up (%r); bypassing until it answers", exc)

    async def close(self) -> None:
        return None

    async def _ensure_index(self) -> None:
        dim = self._dim
        try:
            await self._command("FT._LIST")
        except ResponseError as exc:
            raise SearchModuleMissing(
                f"the Redis at {self._shared.url} has no search module ({exc}); the semantic cache "
                "needs the Redis query engine: disable cache.semantic or use Redis 8 / redis-stack"
            ) from None
        try:
            await self._command(
                "FT.CREATE", self._index, "ON", "HASH", "PREFIX", "1", f"{self._prefix}:e:",
                "SCHEMA", "part", "TAG", "vec", "VECTOR", "HNSW", "6",
                "TYPE", "FLOAT32", "DIM", str(dim), "DISTANCE_METRIC", "COSINE",
            )  # fmt: skip
        except ResponseError as exc:
            if "already exists" not in str(exc).lower():
                raise
            info = _flatten(await self._command("FT.INFO", self._index))
            if "vec" not in info or str(dim) not in info:
                raise RuntimeError(f"index {self._index} exists with another schema; drop it") from None
        self._ready = True

    async def _index_ready(self) -> bool:
        """Create the index if it went missing; at most one attempt per INDEX_RETRY_S."""
        if self._ready or not self._index:
            return self._ready
        now = time.monotonic()
        if now < self._retry_at:
            return False
        self._retry_at = now + INDEX_RETRY_S
        await self._ensure_index()
        return True

    async def _command(self, *args: Any) -> Any:
        return await self._redis.execute_command(*args)  # type: ignore[no-untyped-call]

    async def get(self, key: str) -> bytes | None:
        with self._shared.guard():
            value = await self._redis.hget(self.redis_key(key), "answer")
        return value if isinstance(value, bytes) or value is None else str(value).encode()

    async def put(self, key: str, answer: bytes, ttl_s: int, semantic: SemanticEntry | None) -> None:
        with self._shared.guard():
            fields: dict[Any, bytes | str] = {"answer": answer}
            if semantic is not None and await self._index_ready():
                fields |= {"vec": semantic.vector.astype(np.float32).tobytes(), "part": semantic.part}
                fields["text"] = semantic.text.encode()
            args: list[Any] = [ttl_s]
            for item in fields.items():
                args.extend(item)
            await self._put_script(keys=[self.redis_key(key)], args=args)

    async def nearest(self, part: str, vector: np.ndarray, k: int) -> list[Candidate]:
        with self._shared.guard():
            if not await self._index_ready():
                return []
            try:
                reply = await self._search(part, vector, k)
            except ResponseError as exc:
                if "no such index" in str(exc).lower():  # Redis restarted or flushed: re-create later
                    self._ready = False
                raise
        out = []
        for fields in reply[2::2]:
            doc = dict(zip(fields[::2], fields[1::2], strict=True))
            if b"answer" in doc and b"dist" in doc:
                text = doc.get(b"text", b"").decode()
                out.append(Candidate(1.0 - float(doc[b"dist"]), text, doc[b"answer"]))
        return out

    async def _search(self, part: str, vector: np.ndarray, k: int) -> Any:
        return await self._command(
            "FT.SEARCH", self._index, f"(@part:{{{part}}})=>[KNN {k} @vec $B AS dist]",
            "PARAMS", "2", "B", vector.astype(np.float32).tobytes(),
            "SORTBY", "dist", "RETURN", "3", "dist", "text", "answer", "LIMIT", "0", str(k), "DIALECT", "2",
        )  # fmt: skip

    def redis_key(self, key: str) -> str:
        return f"{self._prefix}:e:{key}"


def _flatten(reply: Any) -> list[str]:
    if isinstance(reply, list | tuple):
        return [x for item in reply for x in _flatten(item)]
    return [reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)]


@dataclass
class _Entry:
    answer: bytes
    expires_at: float
    semantic: SemanticEntry | None


class MemoryStore:
    """In-process store for a single process: TTL, LRU-bounded, brute-force cosine per partition."""

    def __init__(self, *, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._max, self._clock = max_entries, clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._parts: dict[str, dict[str, None]] = {}

    async def start(self, dim: int | None) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self._parts.clear()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> bytes | None:
        entry = self._live(key)
        return entry.answer if entry else None

    async def put(self, key: str, answer: bytes, ttl_s: int, semantic: SemanticEntry | None) -> None:
        self._drop(key)
        self._entries[key] = _Entry(answer, self._clock() + ttl_s, semantic)
        if semantic is not None:
            self._parts.setdefault(semantic.part, {})[key] = None
        while len(self._entries) > self._max:
            self._drop(next(iter(self._entries)))  # least recently used first

    async def nearest(self, part: str, vector: np.ndarray, k: int) -> list[Candidate]:
        live = [(key, e) for key in list(self._parts.get(part, ())) if (e := self._live(key)) and e.semantic]
        if not live:
            return []
        sims = np.stack([e.semantic.vector for _, e in live if e.semantic]) @ vector
        order = np.argsort(-sims)[:k]
        out = []
        for i in order:
            entry = live[int(i)][1]
            if entry.semantic is not None:
                out.append(Candidate(float(sims[i]), entry.semantic.text, entry.answer))
        return out

    def _live(self, key: str) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None and entry.semantic is not None:
            members = self._parts.get(entry.semantic.part)
            if members is not None:
                members.pop(key, None)
                if not members:
                    del self._parts[entry.semantic.part]
