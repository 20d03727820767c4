"""Response cache: exact layer, then semantic layer, per tenant; what may be cached; faithful replay.

Exact layer: a digest of everything in the request that can change the answer (tenant scope, model,
variant, all messages, every sampling parameter, response_format, tools, n, ...). Semantic layer,
tried only after an exact miss: the user's own content of the last turn is embedded ("query: "
prefix; template text shared by most recent turns is left out, proxy.cache.semantic) and the nearest
stored turns are searched among entries whose partition digest matches exactly (tenant scope, model,
variant, digest of all earlier messages including the system prompt, answer-affecting parameters,
embedder, the template text). A lookup waits for its vector only within the embedder's budget, else
it skips the layer (a miss, counted); a turn longer than the embedder's window is matched exactly only.
A candidate is served only if its similarity reaches `cache.semantic.threshold` *and* it
agrees with the query on numbers, dates, negation, product-like tokens and word substitutions
(proxy.cache.verify). Two chats that both end in "继续" differ in their context digest, never collide.

Request header `x-gateway-cache`: `no-cache` (do not read, still store the fresh answer), `no-store`
(neither read nor store), `bypass` (same as no-store). Redis errors or slowness (bounded by
`cache.redis_timeout_s`) make the cache step a bypass; embedder errors skip the semantic layer only.
Neither reaches the client.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson

from proxy.cache.embedding import Embedder
from proxy.cache.replay import (
    CachedAnswer,
    chunks_to_completion,
    completion_to_chunks,
    decode,
    encode,
    is_complete,
    replay_chunks,
    replay_completion,
    usage_of,
)
from proxy.cache.semantic import Backfill, TemplateGuard, Vectors, VectorStats
from proxy.cache.store import MemoryStore, RedisStore, SemanticEntry, Store
from proxy.cache.verify import disagreement
from proxy.limits.store import Peek
from proxy.protocol import ChatRequest
from proxy.redis import SharedRedis
from proxy.settings import CacheSettings, ModelSettings

log = logging.getLogger(__name__)

__all__ = [
    "CacheDecision",
    "CacheResult",
    "CacheScope",
    "CacheStats",
    "CachedAnswer",
    "ResponseCache",
    "chunks_to_completion",
    "completion_to_chunks",
    "decide",
    "exact_key",
    "replay_chunks",
    "replay_completion",
    "semantic_part",
    "usage_of",
    "user_turn",
]

HEADER = "x-gateway-cache"
SEMANTIC_MAX_CHARS = 1000  # longer user turns (pasted documents) are matched exactly only
CANDIDATES = 3  # nearest neighbours checked by the verification step
BREAKER_FAILURES, BREAKER_PAUSE_S = 3, 1.0  # a dead Redis costs one timeout per second, not per request
Status = Literal["hit", "semantic-hit", "miss", "bypass"]


@dataclass
class CacheDecision:
    read: bool
    write: bool
    reason: str | None  # why not (both) - for logs and the x-gateway-cache: bypass header


@dataclass(frozen=True)
class CacheScope:
    tenant: str | None  # None: the model is configured with shared_cache
    model: str  # the public model name
    variant: str


@dataclass
class CacheResult:
    answer: CachedAnswer | None
    status: Status
    semantic: asyncio.Task[CacheResult] | None = None  # fetch(hedge=True): the lookup still running


@dataclass
class CacheStats:
    hits: int = 0
    semantic_hits: int = 0
    misses: int = 0
    bypass_errors: int = 0  # Redis / index unreachable or slow: the cache was skipped
    rejected_candidates: int = 0  # semantic candidates refused by verification
    hedges_cancelled: int = 0  # backend requests started beside a semantic lookup, cancelled by its hit
    stores: int = 0
    store_skipped: int = 0  # incomplete or failed answers
    store_errors: int = 0
    # the semantic layer skipped, by (lookup | store, budget | late | full | window | error)
    skips: Counter[tuple[str, str]] = field(default_factory=Counter)
    vectors: VectorStats = field(default_factory=VectorStats)

    @property
    def embed_errors(self) -> int:
        """The embedder failed: the semantic layer was skipped for one lookup or store."""
        return self.vectors.errors


def _uncacheable(req: ChatRequest, model: ModelSettings, settings: CacheSettings) -> str | None:
    if req.tools or req.tool_choice is not None:
        return "tools"
    if any(m.role == "tool" or m.tool_calls for m in req.messages):
        return "tool-messages"
    if (req.n or 1) > 1:
        return "n>1"
    if req.logprobs:
        return "logprobs"
    sampled = (req.temperature if req.temperature is not None else _default_temperature(model)) > 0
    if sampled and not (settings.cache_sampled or model.cache_sampled):
        return "temperature>0"
    return None


def _default_temperature(model: ModelSettings) -> float:
    """Unset temperature means the backend's default, which samples, unless every variant pins it."""
    temps = [v.defaults.temperature for v in model.variants]
    return max(t if t is not None else 1.0 for t in temps)


def decide(
    req: ChatRequest, headers: Mapping[str, str], model: ModelSettings, settings: CacheSettings
) -> CacheDecision:
    """Whether this request may read and/or write the cache. Pure."""
    if not settings.enabled:
        return CacheDecision(False, False, "disabled")
    directive = headers.get(HEADER, "").strip().lower()
    if directive in ("no-store", "bypass"):
        return CacheDecision(False, False, f"header:{directive}")
    reason = _uncacheable(req, model, settings)
    if reason is not None:
        return CacheDecision(False, False, reason)
    if directive == "no-cache":
        return CacheDecision(False, True, "header:no-cache")
    return CacheDecision(True, True, None)


# ---- keys -------------------------------------------------------------------------------------

_NOT_ANSWER = {"model", "messages", "stream", "stream_options"}


def _digest(obj: Any) -> str:
    return hashlib.sha256(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)).hexdigest()[:40]


def answer_params(body: dict[str, Any]) -> dict[str, Any]:
    """Every field of the forwarded body that can change the answer (streaming does not)."""
    params = {k: v for k, v in body.items() if k not in _NOT_ANSWER}
    if params.get("n") == 1:
        del params["n"]
    return params


def _scope_key(scope: CacheScope) -> list[str]:
    return ["shared" if scope.tenant is None else f"tenant:{scope.tenant}", scope.model, scope.variant]


def exact_key(scope: CacheScope, body: dict[str, Any]) -> str:
    """`body`: the client's request as forwarded (ChatRequest.upstream_body(): the allow-listed
    fields it set), before the variant fills anything in (the variant is part of the scope)."""
    return _digest(
        {"v": 2, "scope": _scope_key(scope), "messages": body["messages"], "params": answer_params(body)}
    )


def user_turn(req: ChatRequest) -> str | None:
    """The last message's text when it is a user turn of plain text (else: exact layer only)."""
    last = req.messages[-1]
    if last.role != "user":
        return None
    if isinstance(last.content, str):
        text = last.content
    elif last.content and all(p.type == "text" for p in last.content):
        text = "\n".join(p.text for p in last.content if p.type == "text")
    else:
        return None
    text = text.strip()
    return text if 0 < len(text) <= SEMANTIC_MAX_CHARS else None


def semantic_part(scope: CacheScope, body: dict[str, Any], embedder_name: str) -> str:
    """Exact filter for the vector search: same scope, context, parameters and vector space.
    `body` as for exact_key. Template text around the user's own content is added by the cache."""
    return _digest(
        {
            "v": 2,
            "scope": _scope_key(scope),
            "ctx": _digest(body["messages"][:-1]),
            "params": answer_params(body),
            "emb": embedder_name,
        }
    )


# ---- the cache ----------------------------------------------------------------------------------


class ResponseCache:
    """Exact + semantic cache. The caller owns `embedder` (started first, closed last) and `redis`."""

    def __init__(
        self,
        settings: CacheSettings,
        redis: SharedRedis | None,
        embedder: Embedder | None,
        *,
        prefix: str = "llmgw:cache",
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings, self.stats = settings, CacheStats()
        self._semantic = settings.semantic_on
        self._embedder = embedder
        self._vectors = (
            Vectors(embedder, settings.semantic.vector_cache, self.stats.skips, self.stats.vectors)
            if embedder
            else None
        )
        self._templates = TemplateGuard()
        self._backfill = Backfill(self._vectors, self._write_quietly) if self._vectors else None
        self._timeout_s = settings.redis_timeout_s
        self._store: Store = (
            RedisStore(redis, prefix=prefix)
            if redis is not None
            else MemoryStore(max_entries=max_entries, clock=clock)
        )
        # a lookup's own text, semantic partition and vector (if it got one), reused by store()
        self._pending: dict[str, tuple[str, str, np.ndarray | None]] = {}
        self._clock, self._failures, self._resume_at = clock, 0, 0.0

    async def start(self) -> None:
        if self._semantic and (self._embedder is None or not self._embedder.dim):
            raise RuntimeError("cache.semantic is enabled but no started embedder was given")
        await self._store.start(self._embedder.dim if self._semantic and self._embedder else None)

    async def close(self) -> None:
        if self._backfill is not None:
            await self._backfill.close()
        await self._store.close()

    def redis_field(self, key: str) -> tuple[str, str] | None:
        """Where the exact answer for `key` (exact_key()) lives in Redis: (hash key, field); None
        without Redis. The rate limiter reads it in its admission round trip (a request with a
        cached answer costs no tokens) and hands it to fetch() as `peeked`."""
        return (self._store.redis_key(key), "answer") if isinstance(self._store, RedisStore) else None

    async def lookup(self, scope: CacheScope, req: ChatRequest) -> CachedAnswer | None:
        return (await self.fetch(scope, req)).answer

    async def fetch(
        self,
        scope: CacheScope,
        req: ChatRequest,
        key: str | None = None,
        peeked: Peek | None = None,
        *,
        hedge: bool = False,
    ) -> CacheResult:
        """Like lookup(), with the status for the x-gateway-cache header. Never raises.
        `key`: exact_key(scope, req.upstream_body()) when the caller already has it; `peeked`: the
        exact entry as read by the rate limiter's admission (see redis_field), so it is not read
        again. `hedge`: after an exact miss, return at once with the semantic lookup running as
        `semantic` (a task that never raises), so the caller can start the backend meanwhile."""
        if self._clock() < self._resume_at:
            self.stats.bypass_errors += 1
            return CacheResult(None, "bypass")
        key = key or exact_key(scope, req.upstream_body())
        found = await self._guarded(self._exact(key, peeked))
        own = self._own(scope, req, observe=True) if found.status == "miss" else None
        if own is None or self._vectors is None:
            self.stats.misses += found.status == "miss"
            return found
        semantic = self._guarded(self._nearest(key, *own))
        if hedge:
            return CacheResult(None, "miss", asyncio.ensure_future(semantic))
        return await semantic

    async def _guarded(self, work: Awaitable[CacheResult]) -> CacheResult:
        """Redis, index, embedder: on failure the cache steps aside and the request goes on."""
        try:
            result = await work
        except Exception as exc:
            self._failed(exc, "lookup")
            return CacheResult(None, "bypass")
        self._failures = 0
        return result

    async def _exact(self, key: str, peeked: Peek | None) -> CacheResult:
        if peeked is not None:
            raw = peeked.value
        else:
            async with asyncio.timeout(self._timeout_s):
                raw = await self._store.get(key)
        if raw is None:
            return CacheResult(None, "miss")
        self.stats.hits += 1
        if self._backfill is not None:  # a repeated question stored without its vector gets one
            self._backfill.served(key, raw)
        return CacheResult(decode(raw, "hit"), "hit")

    async def _nearest(self, key: str, text: str, part: str) -> CacheResult:
        assert self._vectors is not None
        vector = await self._vectors.lookup(text)
        self._remember(key, text, part, vector)
        if vector is not None:  # else skipped: over budget, too long, or the embedder failed (counted)
            async with asyncio.timeout(self._timeout_s):
                candidates = await self._store.nearest(part, vector, CANDIDATES)
            for cand in candidates:
                if cand.similarity < self.settings.semantic.threshold:
                    break
                why = disagreement(text, cand.text)
                if why is None:
                    self.stats.semantic_hits += 1
                    return CacheResult(decode(cand.answer, "semantic-hit"), "semantic-hit")
                self.stats.rejected_candidates += 1
                log.debug("semantic candidate refused (%s, %.3f)", why, cand.similarity)
        self.stats.misses += 1
        return CacheResult(None, "miss")

    async def store(
        self, scope: CacheScope, req: ChatRequest, answer: CachedAnswer, key: str | None = None
    ) -> None:
        """Store a complete answer (with usage). Never raises; anything else is skipped."""
        if self._clock() < self._resume_at:
            self.stats.store_errors += 1
            return
        try:
            await self._put(scope, req, answer, key or exact_key(scope, req.upstream_body()))
        except Exception as exc:
            self._failed(exc, "store")

    def _failed(self, exc: BaseException, what: str) -> None:
        """Count the failure; after BREAKER_FAILURES in a row, skip the cache for BREAKER_PAUSE_S."""
        if what == "store":
            self.stats.store_errors += 1
        else:
            self.stats.bypass_errors += 1
        self._failures += 1
        if self._failures >= BREAKER_FAILURES:
            self._resume_at = self._clock() + BREAKER_PAUSE_S
            self._failures = 0
        log.warning("cache %s bypassed: %r", what, exc)

    async def _put(self, scope: CacheScope, req: ChatRequest, answer: CachedAnswer, key: str) -> None:
        pending = self._pending.pop(key, None)
        if not is_complete(answer) or usage_of(answer) is None:
            self.stats.store_skipped += 1
            return
        payload = encode(answer)
        semantic = None
        own = pending[:2] if pending is not None else self._own(scope, req, observe=False)
        if own is not None and self._vectors is not None:
            text, part = own
            vector = pending[2] if pending is not None else self._vectors.recent(text)
            if vector is None:
                # the exact entry goes in now (the same request again must not wait for an
                # embedding); the vector follows from the embedder's bounded store lane, if at all
                await self._write(key, payload, None)
                vector = await self._vectors.store(text)
                if vector is None and self._backfill is not None:  # until it is asked again
                    self._backfill.remember(key, text, part)
            if vector is not None:  # without one, the answer is stored for the exact layer only
                semantic = SemanticEntry(part, vector, text)
        if semantic is not None or own is None or self._vectors is None:
            await self._write(key, payload, semantic)
        self.stats.stores += 1
        self._failures = 0

    async def _write(self, key: str, payload: bytes, semantic: SemanticEntry | None) -> None:
        async with asyncio.timeout(self._timeout_s):
            await self._store.put(key, payload, self.settings.ttl_s, semantic)

    async def _write_quietly(self, key: str, payload: bytes, semantic: SemanticEntry) -> None:
        try:
            await self._write(key, payload, semantic)
        except Exception as exc:  # Redis slow or down: the entry stays exact-only
            self._failed(exc, "store")

    def _own(self, scope: CacheScope, req: ChatRequest, *, observe: bool) -> tuple[str, str] | None:
        """(the user's own text, its partition) when the semantic layer may take this request."""
        text = user_turn(req) if self._semantic and self._embedder else None
        if text is None or self._embedder is None:
            return None
        part = semantic_part(scope, req.upstream_body(), self._embedder.name)
        own = self._templates.split(part, text, observe=observe)
        return own.text, _digest([part, own.template]) if own.template else part

    def _remember(self, key: str, text: str, part: str, vector: np.ndarray | None) -> None:
        self._pending[key] = (text, part, vector)
        while len(self._pending) > 1024:  # bounded: misses that never store are forgotten
            del self._pending[next(iter(self._pending))]

    def embedder_depth(self) -> int | None:
        """Texts waiting for the embedder (None without one), for the queue-depth gauge."""
        return self._embedder.queue.depth if self._embedder is not None else None
