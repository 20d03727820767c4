"""Structured logs (structlog, one line per request from an allow-list of fields), the Observer
that turns a finished `Call` into metrics (proxy/observability/metrics.py), a log line and an A/B sample
(proxy/experiments/aggregates.py), and ownership of the small background tasks a request leaves behind
(cache stores, token refunds), so none is fire-and-forget.

With several workers (PROMETHEUS_MULTIPROC_DIR) every sample goes through prometheus_client's
files; the state copied from the stages (breakers, queues, cache/limiter counters) is synced by
each worker every second, so a scrape sees the other workers' state at most a second late.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import sys
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from proxy import errors
from proxy.experiments.aggregates import ExperimentStore, Sample
from proxy.observability.metrics import (
    MULTIPROC_ENV,
    HttpMetrics,
    RequestMetrics,
    Stages,
    StateMetrics,
    metrics_server,
)
from proxy.settings import ObservabilitySettings

if TYPE_CHECKING:
    from proxy.auth.authenticator import Principal
    from proxy.call import Call

_HITS = frozenset({"hit", "semantic-hit"})
_SYNC_S = 1.0  # with several workers: how often each copies its state into the shared files


def _json_line(event: dict[str, Any], **_kw: Any) -> str:
    """The JSON line via orjson rather than json.dumps; values it cannot encode go through str()."""
    return orjson.dumps(event, default=str).decode()


def _console(settings: ObservabilitySettings) -> bool:
    return settings.log_format == "console" or (settings.log_format == "auto" and sys.stderr.isatty())


def configure_logging(settings: ObservabilitySettings) -> None:
    """Called once per process before serving: JSON lines, or console output on a terminal.
    Standard-library records (guard, cache, limiter warnings) go through the same renderer and
    carry the request id bound by the edge middleware, so every line of a request can be joined."""
    console = _console(settings)
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer(_json_line)
    )
    level = getattr(logging, settings.log_level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *(() if console else (structlog.processors.format_exc_info,)),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]  # replaced, not added: calling this twice must not double every line
    root.setLevel(level)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


class RequestLine:
    """The one line per request, written as configure_logging's JSON renderer writes it (the same
    keys, level and timestamp) without structlog's per-call machinery, which costs ~11 us a line
    against ~4 us here: after the HTTP server and Redis, the largest fixed cost of a cache hit.
    `for_settings` gives None (use structlog) for console output, for a level above info, and when
    stderr has no file descriptor.

    The lines of one event-loop iteration leave in one write at its end (under load, tens of lines
    per system call; to a pipe, one wake-up of its reader instead of one per line). A line waits
    for the loop's current iteration only; `flush` (Observer.close calls it) writes what is left.
    Outside a running loop a line is written at once, with any a closed loop left behind."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending: list[bytes] = []
        self._flushing_on: asyncio.AbstractEventLoop | None = None  # where the flush is scheduled

    @classmethod
    def for_settings(cls, settings: ObservabilitySettings) -> RequestLine | None:
        if _console(settings) or getattr(logging, settings.log_level.upper()) > logging.INFO:
            return None
        try:
            return cls(sys.stderr.fileno())
        except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor
            return None

    def write(self, fields: dict[str, Any]) -> None:
        fields["event"], fields["level"] = "request", "info"
        fields["timestamp"] = _utc_iso(time.time())
        line = orjson.dumps(fields, default=str, option=orjson.OPT_APPEND_NEWLINE)
        self._pending.append(line)
        if len(self._pending) > 1 and self._flushing_on is not None and not self._flushing_on.is_closed():
            return  # the flush scheduled for this iteration takes it
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flushing_on = loop
        loop.call_soon(self.flush)

    def flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]


def _utc_iso(t: float) -> str:
    """structlog's TimeStamper(fmt="iso", utc=True) text for the time `t` (what
    datetime.fromtimestamp(t, UTC).isoformat() gives, "+00:00" as "Z"): 2026-11-24T10:11:12.123456Z,
    without the fraction when it is zero. The date and time of day are formatted once per second."""
    second, fraction = divmod(t, 1.0)
    micro = round(fraction * 1e6)
    if micro == 1_000_000:
        second, micro = second + 1, 0
    prefix = _utc_second(int(second))
    return f"{prefix}.{micro:06d}Z" if micro else f"{prefix}Z"


@functools.lru_cache(maxsize=4)
def _utc_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


class Observer:
    def __init__(
        self,
        settings: ObservabilitySettings,
        registry: CollectorRegistry | None = None,
        *,
        multiprocess_mode: bool | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        # read once, at start-up: the CLI sets it before workers start
        detected = bool(os.environ.get(MULTIPROC_ENV))
        self.multiprocess = detected if multiprocess_mode is None else multiprocess_mode
        self.metrics = RequestMetrics(self.registry)
        self.state = StateMetrics(self.registry)
        self._exposed = self.registry
        if self.multiprocess:
            self._exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._exposed)  # type: ignore[no-untyped-call]
        self.log = structlog.get_logger("llm_gateway.request")
        self._line = RequestLine.for_settings(settings)
        self.started_at, self.pid = time.time(), os.getpid()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gateway: Stages | None = None
        self._experiments: ExperimentStore | None = None
        self._background: list[asyncio.Task[None]] = []
        self._server: asyncio.Server | None = None

    def http_metrics(self, routes: tuple[str, ...]) -> HttpMetrics:
        """Per-route HTTP metrics on the same registry (observed by the app's edge middleware)."""
        return HttpMetrics(self.registry, routes)

    @property
    def experiments(self) -> ExperimentStore:
        if self._experiments is None:
            raise errors.ServiceUnavailable("The gateway is starting.")
        return self._experiments

    async def start(self, gateway: Stages, experiments: ExperimentStore) -> None:
        """After the stages exist: the A/B recorder (owned from here: closed by close()), the state
        sync, the separate metrics port."""
        self._gateway = gateway
        self._experiments = experiments
        await experiments.start()
        if self.multiprocess:
            self._background.append(asyncio.create_task(self._sync_forever(), name="metrics-sync"))
        if self.settings.metrics_port is not None:
            self._server = await asyncio.start_server(
                metrics_server(self.exposition),
                self.settings.metrics_host,
                self.settings.metrics_port,
                reuse_port=True,
            )

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a follow-up (cache store, token settle) after the response, owned until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for bg in self._background:
            bg.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for task in list(self._tasks):
            task.cancel()
        if self._experiments is not None:
            await self._experiments.close()  # after the follow-ups: it flushes what they recorded
        if self._line is not None:
            self._line.flush()
        self._gateway = None
        if self.multiprocess:
            multiprocess.mark_process_dead(self.pid)  # type: ignore[no-untyped-call]  # its live gauges

    # -- /metrics ------------------------------------------------------------------------------------
    def exposition(self) -> bytes:
        if self._gateway is not None:
            self.state.sync(self._gateway, self._experiments, len(self._tasks))
        return generate_latest(self._exposed)

    def metrics_response(self) -> tuple[bytes, str]:
        """For GET /metrics on the main port: 404 when metrics have a port of their own."""
        if self.settings.metrics_port is not None:
            raise errors.NotFound("Metrics are served on the metrics port.")
        return self.exposition(), CONTENT_TYPE_LATEST

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(_SYNC_S)
            if self._gateway is not None:
                self.state.sync(self._gateway, self._experiments, len(self._tasks))

    # -- the end of a request ------------------------------------------------------------------------
    def subject(self, sub: str) -> str:
        return _hashed(sub) if self.settings.hash_sub else sub

    def _tenant(self, principal: Principal) -> str:
        # without a tenant claim the tenant is the subject: hash it like one
        return self.subject(principal.tenant) if principal.tenant == principal.sub else principal.tenant

    def finish(self, call: Call) -> None:
        elapsed = time.monotonic() - call.started
        self._observe(call, elapsed)
        if call.model is not None and call.variant is not None and self._experiments is not None:
            self._record(call, call.model, call.variant, elapsed)
        self._log(call, elapsed)

    def _observe(self, call: Call, elapsed: float) -> None:
        m = self.metrics
        labels = ((call.model or "-") if call.variant else "-", call.variant or "-", call.backend or "-")
        m.count_request(labels, str(call.status), call.cache, call.endpoint)
        ch = m.children(labels)
        ch.duration.observe(elapsed)
        if call.ttft_s is not None:
            ch.ttft.observe(call.ttft_s)
        ch.prompt.inc(call.prompt_tokens)
        ch.completion.inc(call.completion_tokens)
        if call.disconnected:
            ch.disconnects.inc()
        elif call.status == 200 and call.backend not in (None, "cache") and call.completion_tokens > 0:
            ch.speed.observe(call.completion_tokens / elapsed)
            if call.stream and call.ttft_s is not None and call.completion_tokens > 1:
                ch.itl.observe((elapsed - call.ttft_s) / (call.completion_tokens - 1))
        for reason in call.fallback_reasons:
            m.fallbacks.labels(reason).inc()
        for action in call.policy:
            direction, _, what = action.partition(":")
            m.policy.labels(direction, what).inc()
        for key, n in call.pii.items():  # "direction:type:action"
            m.pii.labels(*key.split(":", 2)).inc(n)

    def _record(self, call: Call, model: str, variant: str, elapsed: float) -> None:
        assert self._experiments is not None
        sample = Sample(
            model=model,
            variant=variant,
            status=call.status,
            blocked=any(p.endswith(":block") for p in call.policy),
            cache_hit=call.cache in _HITS,
            disconnected=call.disconnected,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            latency_s=elapsed,
            ttft_s=call.ttft_s,
        )
        self._experiments.record(sample)
        if call.status == 200 and call.principal is not None and call.completion_id:
            self._experiments.remember(call.completion_id, sample, call.principal)

    def _log(self, call: Call, elapsed: float) -> None:
        """The one line per request. An explicit allow-list: never prompt or completion text,
        tokens, keys or headers; `sub` hashed unless observability.hash_sub is off."""
        principal = call.principal
        fields = dict(
            request_id=call.request_id,
            endpoint=call.endpoint,
            worker=self.pid,
            sub=self.subject(principal.sub) if principal else None,
            tenant=self._tenant(principal) if principal else None,
            model=call.model[:100] if call.model else None,
            variant=call.variant,
            backend=call.backend,
            tried=call.tried,
            fallbacks=call.fallback_reasons,
            route=call.route,  # affinity | spill | least_loaded | random | shed
            cache=call.cache,
            policy=call.policy,
            stream=call.stream,
            status=call.status,
            error=call.error,
            latency_ms=round(elapsed * 1000, 2),
            ttft_ms=round(call.ttft_s * 1000, 2) if call.ttft_s is not None else None,
            prompt_tokens=call.prompt_tokens,
            completion_tokens=call.completion_tokens,
            disconnected=call.disconnected,
            completion_id=call.completion_id,
        )
        if call.pii:  # personal data found: counts by "direction:type:action", never a value
            fields["pii"] = call.pii
        if self._line is not None:
            self._line.write(fields)
        else:
            self.log.info("request", **fields)


@functools.lru_cache(maxsize=16_384)  # once per request; the same few callers repeat
def _hashed(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:16]
