"""Structured logs (structlog, one line per request from an allow-list of fields), Prometheus
metrics with bounded labels, and ownership of the small background tasks a request leaves behind
(cache stores, token refunds), so none is fire-and-forget.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

from proxy.settings import ObservabilitySettings

if TYPE_CHECKING:
    from proxy.pipeline import Call

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


def configure_logging(settings: ObservabilitySettings) -> None:
    """Called once by the CLI before serving: JSON lines, or console output on a terminal."""
    console = settings.log_format == "console" or (settings.log_format == "auto" and sys.stderr.isatty())
    renderer: Any = structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    level = getattr(logging, settings.log_level.upper())
    logging.basicConfig(level=level, stream=sys.stderr, format="%(message)s")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("model", "variant", "backend")
        self.requests = Counter(
            "llm_gateway_requests",
            "Chat requests by outcome",
            (*labels, "status", "cache"),
            registry=registry,
        )
        self.latency = Histogram(
            "llm_gateway_request_seconds",
            "End-to-end latency",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "llm_gateway_ttft_seconds",
            "Time to first token",
            labels,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter("llm_gateway_tokens", "Tokens", (*labels, "kind"), registry=registry)
        self.fallbacks = Counter(
            "llm_gateway_fallbacks", "Backends skipped or failed", ("reason",), registry=registry
        )
        self.policy = Counter(
            "llm_gateway_policy_actions", "Policy actions", ("direction", "action"), registry=registry
        )


class Observer:
    def __init__(self, settings: ObservabilitySettings, registry: CollectorRegistry | None = None) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.log = structlog.get_logger("llm_gateway.request")
        self.started_at = time.time()
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a follow-up (cache store, token settle) after the response, owned until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        for task in list(self._tasks):
            task.cancel()

    def subject(self, sub: str) -> str:
        return hashlib.sha256(sub.encode()).hexdigest()[:16] if self.settings.hash_sub else sub

    def finish(self, call: Call) -> None:
        elapsed = time.monotonic() - call.started
        model, variant, backend = call.model or "-", call.variant or "-", call.backend or "-"
        m = self.metrics
        m.requests.labels(model, variant, backend, str(call.status), call.cache).inc()
        m.latency.labels(model, variant, backend).observe(elapsed)
        if call.ttft_s is not None:
            m.ttft.labels(model, variant, backend).observe(call.ttft_s)
        m.tokens.labels(model, variant, backend, "prompt").inc(call.prompt_tokens)
        m.tokens.labels(model, variant, backend, "completion").inc(call.completion_tokens)
        for reason in call.fallback_reasons:
            m.fallbacks.labels(reason).inc()
        for action in call.policy:
            direction, _, what = action.partition(":")
            m.policy.labels(direction, what).inc()
        self.log.info(
            "request",
            request_id=call.request_id,
            sub=self.subject(call.principal.sub) if call.principal else None,
            tenant=call.principal.tenant if call.principal else None,
            model=call.model,
            variant=call.variant,
            backend=call.backend,
            tried=call.tried,
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
        )
