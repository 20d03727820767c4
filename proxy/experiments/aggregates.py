"""Per-variant A/B aggregates shared by every replica, and the feedback that rates a completion.

A request ends in `record()`, which only adds to a local buffer (no I/O on the response path);
every `ab_flush_s` the buffer is added to per-minute Redis hashes, so all replicas contribute and
`--since` is a range of minutes. Without redis_url the same layout lives in this process.

Redis layout (prefix = observability.ab_prefix, default "llmgw:ab"):
  {prefix}:m:{epoch_minute}  HASH "{model}|{variant}|{field}" -> number, EXPIRE ab_retention_s
      n err blk hit disc tin tout, tps_n/_s/_q (tokens/s), fb_n/_s/_q (feedback), lat:{i} ttft:{i}
  {prefix}:c:{completion_id} HASH owner model variant minute [score comment], EXPIRE feedback_ttl_s
Feedback is last-write-wins: rating a completion again replaces its score in the aggregates.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from proxy import errors
from proxy.auth.authenticator import Principal
from proxy.experiments.report import Aggregate, bucket_of, experiment_report, render_text
from proxy.experiments.store import AbBackend, Fields, MemoryBackend, RedisBackend
from proxy.settings import ObservabilitySettings, Settings

log = logging.getLogger("llm_gateway.experiments")
_SCALES = {"thumbs": (-1.0, 1.0), "stars": (0.0, 5.0)}


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
    low, high = _SCALES[scale]
    if not low <= fb.score <= high:
        raise errors.InvalidRequest(f"'score' must be between {low:g} and {high:g}.", param="score")
    return fb


@dataclass
class ExperimentStats:
    flushes: int = 0
    flush_errors: int = 0  # Redis failures while flushing; those counts are dropped, never double-counted
    mapping_errors: int = 0  # completion id -> variant writes that failed


class ExperimentStore:
    """Buffers per-variant counts, flushes them on a timer, maps completion ids to variants, and
    applies feedback. Started and closed by the Observer (close flushes what is left)."""

    def __init__(
        self,
        redis_url: str,
        settings: ObservabilitySettings,
        *,
        clock: Callable[[], float] = time.time,
        backend: AbBackend | None = None,
    ) -> None:
        self.settings, self._clock = settings, clock
        self._backend: AbBackend = backend or (
            RedisBackend(redis_url, settings) if redis_url else MemoryBackend(settings, clock)
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

    # -- the request path: memory only ---------------------------------------------------------------
    def record(self, sample: Sample) -> None:
        pairs = self._buffer.setdefault(int(self._clock()) // 60, {})
        fields = pairs.setdefault(f"{sample.model}|{sample.variant}|", {})
        for name, value in sample_fields(sample).items():
            fields[name] = fields.get(name, 0.0) + value

    def remember(self, completion_id: Any, sample: Sample, principal: Principal) -> None:
        """Map a completion id to its variant and receiver; written on the next flush."""
        if not isinstance(completion_id, str) or not 0 < len(completion_id) <= 256:
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
                f"No completion with id '{fb.id[:100]}' can be rated.",
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


# -- `llm-gateway ab-report` -------------------------------------------------------------------------
def control_of(variants: list[str]) -> str:
    """The variant named 'control', else the first one configured."""
    return "control" if "control" in variants else variants[0]


async def _load(settings: Settings, since_s: float, model: str | None) -> dict[str, dict[str, Aggregate]]:
    store = ExperimentStore(settings.redis_url, settings.observability)
    try:
        return await store.read(since_s, model)
    finally:
        await store.close()


def build_reports(
    settings: Settings, data: dict[str, dict[str, Aggregate]], model: str | None
) -> dict[str, Any]:
    """One report per experiment: configured variants first (in config order), then any others seen."""
    names = [model] if model else [*settings.models, *(m for m in data if m not in settings.models)]
    reports: dict[str, Any] = {}
    for name in names:
        seen = data.get(name, {})
        configured = [v.name for v in settings.models[name].variants] if name in settings.models else []
        order = [*configured, *sorted(v for v in seen if v not in configured)]
        if not order:
            continue
        variants = {v: seen.get(v, Aggregate()) for v in order}
        reports[name] = experiment_report(variants, control_of(order))
    return reports


def ab_report(settings: Settings, *, model: str | None, since_s: float, window: str, as_json: bool) -> int:
    if not settings.redis_url:
        print(
            "ab-report reads the A/B aggregates from Redis: set redis_url (without it they live only "
            "inside the gateway process)",
            file=sys.stderr,
        )
        return 2
    if model is not None and model not in settings.models:
        print(f"ab-report: unknown model {model!r} (known: {', '.join(settings.models)})", file=sys.stderr)
        return 2
    try:
        data = asyncio.run(_load(settings, since_s, model))
    except (RedisError, OSError, TimeoutError) as exc:
        print(f"ab-report: cannot read Redis: {exc}", file=sys.stderr)
        return 1
    reports = build_reports(settings, data, model)
    if as_json:
        print(
            orjson.dumps({"window_s": since_s, "experiments": reports}, option=orjson.OPT_INDENT_2).decode()
        )
    else:
        print(render_text(reports, window))
    return 0
