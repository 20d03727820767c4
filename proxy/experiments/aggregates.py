"""Per-variant A/B aggregates shared by every replica, and the feedback that rates a completion.

A request ends in `record()`, which only adds to a local buffer (no I/O on the response path);
every `ab_flush_s` the buffer is added to per-minute Redis hashes, so all replicas contribute and
`--since` is a range of minutes. Without redis_url the same layout lives in this process.

Redis layout (prefix = observability.ab_prefix, default "llmgw:ab"):
  {prefix}:m:{epoch_minute}  HASH "{model}|{variant}|{field}" -> number, EXPIRE ab_retention_s
      n err blk hit disc tin tout, tps_n/_s/_q (tokens/s), fb_n/_s/_q (feedback), lat:{i} ttft:{i}
  {prefix}:c:{completion_id} HASH owner model variant minute [score comment], EXPIRE feedback_ttl_s
      only for the share `models.<name>.feedback_sample` of a model's completions (default none):
      ~200 B each (loadtest/redis_memory.py): every completion rateable for an hour (the default
      feedback_ttl_s) at 1,000 requests/s holds ~0.7 GB
Feedback is last-write-wins: rating a completion again replaces its score in the aggregates.
Whether a completion can be rated is a pure function of its id (every replica agrees).
While Redis is skipped (its breaker is open) the buffers are kept for the next flush: nothing was
sent, so nothing can be counted twice; a flush that fails once sent is dropped and counted.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from proxy import errors
from proxy.auth.authenticator import Principal
from proxy.experiments.report import FEEDBACK_SCALES, Aggregate, bucket_of
from proxy.experiments.store import AbBackend, Fields, MemoryBackend, RedisBackend
from proxy.redis import RedisUnavailable, SharedRedis
from proxy.settings import ObservabilitySettings, RedisSettings

log = logging.getLogger("llm_gateway.experiments")
_MAX_IDS = 100_000  # completion ids waiting for a flush (Redis skipped for a while); beyond: dropped


@dataclass(frozen=True, slots=True)
class Sample:
    """What one finished request contributes to its variant (built by the Observer from a Call)."""

    model: str
    variant: str
    status: int
    blocked: bool
    cache_hit: bool
    disconnected: bool
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float | None


def sample_fields(s: Sample) -> Fields:
    """The hash fields a request increments. Errors are 5xx; latency, TTFT and tokens/s count only
    complete answers (200, client stayed); tokens/s = completion tokens / latency, cache hits excluded."""
    f: Fields = {"n": 1, "tin": s.prompt_tokens, "tout": s.completion_tokens}
    for name, flag in (
        ("err", s.status >= 500),
        ("blk", s.blocked),
        ("hit", s.cache_hit),
        ("disc", s.disconnected),
    ):
        if flag:
            f[name] = 1
    if s.status != 200 or s.disconnected:
        return f
    f[f"lat:{bucket_of(s.latency_s)}"] = 1
    if s.ttft_s is not None:
        f[f"ttft:{bucket_of(s.ttft_s)}"] = 1
    if not s.cache_hit and s.completion_tokens > 0 and s.latency_s > 0:
        speed = s.completion_tokens / s.latency_s
        f.update(tps_n=1, tps_s=speed, tps_q=speed * speed)
    return f


def owner_of(principal: Principal) -> str:
    """Who received a completion: a digest of (tenant, sub), never the raw subject."""
    return _owner(principal.tenant, principal.sub)


@functools.lru_cache(maxsize=16_384)  # every request records its owner; the same few callers repeat
def _owner(tenant: str, sub: str) -> str:
    return hashlib.sha256(f"{tenant}\x00{sub}".encode()).hexdigest()[:32]


class FeedbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(min_length=1, max_length=256)
    score: float
    comment: str | None = Field(None, max_length=2000)


def parse_feedback(raw: bytes, scale: str) -> FeedbackIn:
    """Decode and validate a feedback body; OpenAI-shaped 400s name the bad parameter."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise errors.InvalidRequest("The request body must be valid JSON.") from None
    if not isinstance(data, dict):
        raise errors.InvalidRequest("The request body must be a JSON object.")
    try:
        fb = FeedbackIn.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise errors.InvalidRequest(f"Invalid value for '{param}': {err['msg']}.", param=param) from None
    low, high = FEEDBACK_SCALES[scale]
    if not low <= fb.score <= high:
        raise errors.InvalidRequest(f"'score' must be between {low:g} and {high:g}.", param="score")
    return fb


@dataclass
class ExperimentStats:
    flushes: int = 0
    flush_errors: int = 0  # Redis failures while flushing; those counts are dropped, never double-counted
    mapping_errors: int = 0  # completion id -> variant writes that failed


def feedback_sampled(completion_id: str, share: float) -> bool:
    """Whether a completion can be rated: a pure function of its id, so every replica agrees."""
    if share >= 1.0 or share <= 0.0:
        return share >= 1.0
    digest = hashlib.blake2b(completion_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64


class ExperimentStore:
    """Buffers per-variant counts, flushes them on a timer, maps completion ids to variants, and
    applies feedback. Started and closed by the Observer (close flushes what is left).
    `redis`: the process's shared client, or a URL for a client of its own (`ab-report`), or
    None/"" for process memory. `feedback`: model -> share of its completions that can be rated."""

    def __init__(
        self,
        redis: SharedRedis | str | None,
        settings: ObservabilitySettings,
        *,
        feedback: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.time,
        backend: AbBackend | None = None,
    ) -> None:
        self.settings, self._clock = settings, clock
        self._feedback = dict(feedback or {})
        self._own = SharedRedis(redis, RedisSettings()) if isinstance(redis, str) and redis else None
        shared = self._own or (redis if isinstance(redis, SharedRedis) else None)
        self._backend: AbBackend = backend or (
            RedisBackend(shared, settings) if shared is not None else MemoryBackend(settings, clock)
        )
        self._buffer: dict[int, dict[str, Fields]] = {}
        # completion id -> mapping, written with the counts on the next flush (no I/O per request)
        self._ids: dict[str, dict[str, str]] = {}
        self._flusher: asyncio.Task[None] | None = None
        self.stats = ExperimentStats()

    @property
    def _timeout_s(self) -> float:
        return self.settings.ab_redis_timeout_s * 4  # a pipeline or script, not a single command

    async def start(self, *, flusher: bool = True) -> None:
        if flusher:
            self._flusher = asyncio.create_task(self._flush_forever(), name="ab-flush")

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
            self._flusher = None
        await self.flush()
        await self._backend.close()
        if self._own is not None:
            await self._own.close()

    # -- the request path: memory only ---------------------------------------------------------------
    def record(self, sample: Sample) -> None:
        pairs = self._buffer.setdefault(int(self._clock()) // 60, {})
        fields = pairs.setdefault(f"{sample.model}|{sample.variant}|", {})
        for name, value in sample_fields(sample).items():
            fields[name] = fields.get(name, 0.0) + value

    def remember(self, completion_id: Any, sample: Sample, principal: Principal) -> None:
        """Map a completion id to its variant and receiver, if its model collects feedback for
        it; written on the next flush."""
        if not isinstance(completion_id, str) or not 0 < len(completion_id) <= 256:
            return
        if not feedback_sampled(completion_id, self._feedback.get(sample.model, 0.0)):
            return
        if len(self._ids) >= _MAX_IDS:
            self.stats.mapping_errors += 1
            return
        self._ids[completion_id] = {
            "owner": owner_of(principal),
            "model": sample.model,
            "variant": sample.variant,
            "minute": str(int(self._clock()) // 60),
        }

    # -- off the request path ------------------------------------------------------------------------
    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.ab_flush_s)
            try:
                await self.flush()
            except Exception:  # a bug here must not end the flushing for the life of the process
                log.exception("A/B flush failed unexpectedly")

    async def flush(self) -> None:
        await self._flush_ids()
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, {}
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._backend.apply(batch)
            self.stats.flushes += 1
        except RedisUnavailable:  # not sent: kept for the next flush
            for minute, pairs in batch.items():
                self._buffer[minute] = _merged(pairs, self._buffer.get(minute, {}))
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.flush_errors += 1
            log.warning("A/B: flush failed, %d minute(s) of counts dropped: %r", len(batch), exc)

    async def _flush_ids(self) -> None:
        if not self._ids:
            return
        ids, self._ids = self._ids, {}
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._backend.remember_many(ids)
        except RedisUnavailable:  # kept for the next flush (a batch written before is written again)
            self._ids = ids | self._ids
        except (RedisError, OSError, TimeoutError) as exc:
            self.stats.mapping_errors += len(ids)
            log.warning("A/B: could not store %d completion id mapping(s): %r", len(ids), exc)

    async def feedback(self, principal: Principal, raw: bytes) -> dict[str, Any]:
        """POST /v1/feedback: 400 bad body or score, 404 unknown id, 403 not the receiver."""
        fb = parse_feedback(raw, self.settings.feedback_scale)
        try:
            async with asyncio.timeout(self._timeout_s * 2):
                result = await self._rate(fb, owner_of(principal))
        except (RedisError, OSError, TimeoutError):
            raise errors.ServiceUnavailable(
                "Feedback cannot be recorded right now; retry shortly.", headers={"retry-after": "1"}
            ) from None
        if result == 0:
            raise errors.NotFound(
                f"No completion with id '{fb.id[:100]}' can be rated (unknown, expired, or its model "
                "does not collect feedback for it).",
                param="id",
                code="completion_not_found",
            )
        if result < 0:
            raise errors.PermissionDenied(
                "Only the caller that received this completion can rate it.",
                param="id",
                code="not_your_completion",
            )
        return {"object": "feedback", "id": fb.id, "score": fb.score, "replaced": result == 2}

    async def _rate(self, fb: FeedbackIn, owner: str) -> int:
        if fb.id in self._ids:  # the answer went out before its mapping was flushed
            await self._flush_ids()
        record = await self._backend.lookup(fb.id)
        if record is None:
            return 0
        if record.get("owner") != owner:
            return -1
        prefix = f"{record['model']}|{record['variant']}|"
        return await self._backend.rate(fb.id, int(record["minute"]), prefix, owner, fb.score, fb.comment)

    async def read(self, since_s: float, model: str | None = None) -> dict[str, dict[str, Aggregate]]:
        """model -> variant -> totals over the minutes that overlap the last `since_s` seconds."""
        await self.flush()
        now = self._clock()
        out: dict[str, dict[str, Aggregate]] = {}
        for bucket in await self._backend.read(range(int(now - since_s) // 60, int(now) // 60 + 1)):
            for name, value in bucket.items():
                m, v, field = name.rsplit("|", 2)  # model names may hold '|'; variant names may not
                if model is None or m == model:
                    out.setdefault(m, {}).setdefault(v, Aggregate()).add(field, value)
        return out


def _merged(older: dict[str, Fields], newer: dict[str, Fields]) -> dict[str, Fields]:
    """Two buffers of one minute added together."""
    out = {pair: dict(fields) for pair, fields in older.items()}
    for pair, fields in newer.items():
        into = out.setdefault(pair, {})
        for name, value in fields.items():
            into[name] = into.get(name, 0.0) + value
    return out
