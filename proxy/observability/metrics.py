"""Prometheus metrics with bounded labels: the per-request series, the state copied from the
stages at scrape time, multiprocess set-up for several workers, and the separate metrics port.

Label values are bounded: model and variant come from the config (a model is labelled only once
a variant was chosen for it, so an unknown model name sent by a client never becomes a label),
backend is a configured backend or "cache", and reasons, actions and kinds are fixed sets.
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from backends.pool import Member
    from proxy.cache.response_cache import ResponseCache
    from proxy.experiments.aggregates import ExperimentStore
    from proxy.guard import PolicyGuard
    from proxy.limits.limiter import RateLimiter

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1)
_SPEED_BUCKETS = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000)
_BREAKER = {"closed": 0, "half_open": 1, "open": 2}
_LABELS = ("model", "variant", "backend")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_Total = tuple[Counter, tuple[str, ...], float]  # a counter, its labels, a stage's running total


class Stages(Protocol):
    """The running stages whose state the scrape-time metrics read (the pipeline's Gateway)."""

    members: dict[str, Member]
    cache: ResponseCache
    limiter: RateLimiter
    guard: PolicyGuard


def prepare_multiprocess(workers: int) -> str | None:
    """Before several workers start: a fresh PROMETHEUS_MULTIPROC_DIR they share, removed at exit.
    A directory the operator already set is used as it is (and must be emptied between runs)."""
    if workers <= 1 and not os.environ.get(MULTIPROC_ENV):
        return None
    if not os.environ.get(MULTIPROC_ENV):
        path = tempfile.mkdtemp(prefix="llm-gateway-metrics-")
        os.environ[MULTIPROC_ENV] = path
        atexit.register(shutil.rmtree, path, ignore_errors=True)
    return os.environ[MULTIPROC_ENV]


class _Children:
    """The per-(model, variant, backend) series, resolved once instead of on every request."""

    def __init__(self, m: RequestMetrics, labels: tuple[str, str, str]) -> None:
        self.duration = m.duration.labels(*labels)
        self.ttft = m.ttft.labels(*labels)
        self.itl = m.itl.labels(*labels)
        self.speed = m.speed.labels(*labels)
        self.prompt = m.tokens.labels(*labels, "prompt")
        self.completion = m.tokens.labels(*labels, "completion")
        self.disconnects = m.disconnects.labels(*labels)


class RequestMetrics:
    """Observed once per request, in Observer.finish."""

    def __init__(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "llm_gateway_requests",
            "Requests through the pipeline by outcome and API endpoint",
            (*_LABELS, "status", "cache", "endpoint"),
            registry=r,
        )
        self.duration = Histogram(
            "llm_gateway_request_duration_seconds",
            "End-to-end latency",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "llm_gateway_time_to_first_token_seconds",
            "Time to first token",
            _LABELS,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "llm_gateway_inter_token_latency_seconds",
            "Mean gap between tokens of one stream: (end - first token) / (completion tokens - 1)",
            _LABELS,
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.speed = Histogram(
            "llm_gateway_output_tokens_per_second",
            "Completion tokens / request latency, per complete answer (cache hits excluded)",
            _LABELS,
            buckets=_SPEED_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("llm_gateway_tokens", "Tokens by kind", (*_LABELS, "kind"), registry=r)
        self.disconnects = Counter(
            "llm_gateway_client_disconnects", "Streams the client left early", _LABELS, registry=r
        )
        self.fallbacks = Counter(
            "llm_gateway_fallbacks", "Backends skipped or failed before one answered", ("reason",), registry=r
        )
        self.policy = Counter(
            "llm_gateway_policy_actions", "Policy actions", ("direction", "action"), registry=r
        )
        self.pii = Counter(
            "llm_gateway_pii_values",
            "Personal-data values found, by direction, type and the action taken (proxy/privacy.py)",
            ("direction", "type", "action"),
            registry=r,
        )
        self._children: dict[tuple[str, str, str], _Children] = {}
        self._outcomes: dict[tuple[str, ...], Any] = {}

    def children(self, labels: tuple[str, str, str]) -> _Children:
        found = self._children.get(labels)
        if found is None:
            found = self._children[labels] = _Children(self, labels)
        return found

    def count_request(self, labels: tuple[str, str, str], status: str, cache: str, endpoint: str) -> None:
        key = (*labels, status, cache, endpoint)
        child = self._outcomes.get(key)
        if child is None:
            child = self._outcomes[key] = self.requests.labels(*key)
        child.inc()


class HttpMetrics:
    """Every HTTP request by route template (the names prometheus-fastapi-instrumentator used:
    `http_requests_total{handler,method,status}` with status grouped as 2xx..5xx, and
    `http_request_duration_seconds{handler,method}`). Observed by the edge middleware."""

    def __init__(self, r: CollectorRegistry, routes: tuple[str, ...]) -> None:
        self.requests = Counter(
            "http_requests",
            "HTTP requests by route and status class",
            ("handler", "method", "status"),
            registry=r,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration by route (a stream: until its last byte)",
            ("handler", "method"),
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._exact = frozenset(path for path in routes if "{" not in path)
        self._prefixes = [(path.split("{")[0], path) for path in routes if "{" in path]
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def handler(self, path: str) -> str:
        """The route template for a path; "none" for a path no route serves (bounded labels)."""
        if path in self._exact:
            return path
        for prefix, template in self._prefixes:
            if path.startswith(prefix):
                return template
        return "none"

    def observe(self, handler: str, method: str, status: int, seconds: float) -> None:
        key = (handler, method, status)
        pair = self._children.get(key)
        if pair is None:
            if len(self._children) > 1024:  # methods are client-chosen: keep the cache bounded
                self._children.clear()
            method = method if method in _METHODS else "other"
            pair = self._children[key] = (
                self.requests.labels(handler, method, f"{status // 100}xx"),
                self.duration.labels(handler, method),
            )
        pair[0].inc()
        pair[1].observe(seconds)


class StateMetrics:
    """Copied from the stages' own state and counters when /metrics is scraped (and every second
    with several workers), instead of threading Prometheus objects through those modules."""

    def __init__(self, r: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, labels: tuple[str, ...], mode: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r, multiprocess_mode=mode)  # type: ignore[arg-type]

        b = ("backend",)
        self.breaker = gauge(
            "llm_gateway_backend_breaker_state", "0 closed, 1 half-open, 2 open", b, "mostrecent"
        )
        self.queue = gauge(
            "llm_gateway_backend_queue_depth",
            "Requests waiting at the backend, as last probed",
            b,
            "mostrecent",
        )
        self.healthy = gauge("llm_gateway_backend_healthy", "1 when the last probe passed", b, "mostrecent")
        self.redis_breaker = gauge(
            "llm_gateway_redis_breaker_state",
            "The breaker every Redis-using stage consults: 0 closed, 1 half-open, 2 open",
            (),
            "mostrecent",
        )
        self.outstanding = gauge("llm_gateway_backend_outstanding", "Requests in flight to it", b, "livesum")
        self.followups = gauge(
            "llm_gateway_followup_tasks", "Cache stores and refunds in flight", (), "livesum"
        )
        self.loop_tasks = gauge(
            "llm_gateway_event_loop_tasks", "Tasks alive on the event loop (a leak grows it)", (), "livesum"
        )
        self.cache = Counter("llm_gateway_cache_lookups", "Cache lookups", ("layer", "result"), registry=r)
        self.stores = Counter("llm_gateway_cache_stores", "Cache stores by result", ("result",), registry=r)
        self.rejections = Counter(
            "llm_gateway_ratelimit_rejections", "Requests refused by a limit", ("kind",), registry=r
        )
        self.degraded = Counter(
            "llm_gateway_ratelimit_degraded_admits",
            "Admitted by the local cap while Redis was down",
            registry=r,
        )
        self.redis_errors = Counter(
            "llm_gateway_redis_errors", "Redis failures (cache: embedder too)", ("component",), registry=r
        )
        self.reloads = Counter("llm_gateway_policy_reloads", "Word-list reloads", ("result",), registry=r)
        self.routes = Counter(
            "llm_gateway_routes",
            "Requests a pool replica was put first for, by route (affinity: its key's own replica; "
            "spill: the key's replica was left for it; least_loaded; random)",
            ("backend", "route"),
            registry=r,
        )
        self.spills = Counter(
            "llm_gateway_route_spills",
            "Requests whose affinity replica was left, by reason (waiting, kv_cache, outstanding, "
            "bounded_load, or why it was unusable)",
            ("backend", "reason"),
            registry=r,
        )
        self.kv_usage = gauge(
            "llm_gateway_backend_kv_cache_usage", "vLLM KV-cache usage (0-1), as last probed", b, "mostrecent"
        )
        self.semantic_skips = Counter(
            "llm_gateway_semantic_skips",
            "Semantic layer skipped: stage lookup|store, reason budget|late|full|window|error",
            ("stage", "reason"),
            registry=r,
        )
        self.vectors = Counter(
            "llm_gateway_semantic_vectors", "Vectors by source (embedded | reused)", ("source",), registry=r
        )
        self.hedges = Counter(
            "llm_gateway_semantic_hedges_cancelled",
            "Backend requests started beside a semantic lookup (cache.semantic.hedge), cancelled by its hit",
            registry=r,
        )
        self.embed_queue = gauge(
            "llm_gateway_embedder_queue_depth", "Texts waiting for the embedder", (), "livesum"
        )
        self.embed_wait = gauge(
            "llm_gateway_semantic_wait_max_seconds", "Longest wait of a lookup for its vector", (), "max"
        )
        self._seen: dict[tuple[Any, ...], float] = {}

    def sync(self, gw: Stages, store: ExperimentStore | None, followups: int) -> None:
        for name, member in gw.members.items():
            self.breaker.labels(name).set(_BREAKER.get(member.breaker.state, 2))
            self.healthy.labels(name).set(1 if member.healthy else 0)
            self.outstanding.labels(name).set(member.outstanding)
            if member.waiting is not None:
                self.queue.labels(name).set(member.waiting)
            if member.kv_usage is not None:
                self.kv_usage.labels(name).set(member.kv_usage)
        self.followups.set(followups)
        if (state := gw.limiter.redis_breaker_state) is not None:
            self.redis_breaker.set(_BREAKER.get(state, 2))
        if (depth := gw.cache.embedder_depth()) is not None:
            self.embed_queue.set(depth)
            self.embed_wait.set(gw.cache.stats.vectors.max_wait_s)
        self.loop_tasks.set(len(asyncio.all_tasks()))
        for counter, labels, total in self._totals(gw, store):
            self._count(counter, labels, total)

    def _totals(self, gw: Stages, store: ExperimentStore | None) -> list[_Total]:
        c, lim, guard = gw.cache.stats, gw.limiter.stats, gw.guard
        totals: list[_Total] = [
            (self.cache, ("exact", "hit"), c.hits),
            (self.cache, ("semantic", "hit"), c.semantic_hits),
            (self.cache, ("semantic", "rejected"), c.rejected_candidates),
            (self.cache, ("all", "miss"), c.misses),
            (self.cache, ("all", "error"), c.bypass_errors),
            (self.stores, ("stored",), c.stores),
            (self.stores, ("skipped",), c.store_skipped),
            (self.stores, ("error",), c.store_errors),
            (self.degraded, (), lim.degraded_admits),
            (self.redis_errors, ("ratelimit",), lim.redis_errors + lim.settle_errors),
            (self.redis_errors, ("cache",), c.bypass_errors + c.store_errors),
            (self.reloads, ("ok",), guard.reloads),
            (self.reloads, ("error",), guard.reload_errors),
            (self.vectors, ("embedded",), c.vectors.embedded),
            (self.vectors, ("reused",), c.vectors.reused),
            (self.hedges, (), c.hedges_cancelled),
        ]
        totals += [(self.rejections, (kind,), n) for kind, n in lim.rejected.items()]
        for name, member in gw.members.items():
            totals += [(self.routes, (name, how), n) for how, n in member.routes.items()]
            totals += [(self.spills, (name, why), n) for why, n in member.spills.items()]
        totals += [(self.semantic_skips, stage_reason, n) for stage_reason, n in c.skips.items()]
        if store is not None:
            errors_ = store.stats.flush_errors + store.stats.mapping_errors
            totals.append((self.redis_errors, ("experiments",), errors_))
        return totals

    def _count(self, counter: Counter, labels: tuple[str, ...], total: float) -> None:
        """Advance a Prometheus counter to a stage's running total (the series exists from the first sync)."""
        key = (counter, *labels)
        child = counter.labels(*labels) if labels else counter
        delta = total - self._seen.get(key, 0.0)
        if delta > 0:
            child.inc(delta)
            self._seen[key] = total


def metrics_server(
    exposition: Callable[[], bytes],
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    """A minimal HTTP/1.1 responder for the separate metrics port: GET /metrics, else 404."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b" ", 2)
            if method == b"GET" and target.split(b"?")[0] == b"/metrics":
                status, ctype, body = b"200 OK", CONTENT_TYPE_LATEST.encode(), exposition()
            else:
                status, ctype, body = b"404 Not Found", b"text/plain", b"not found\n"
            writer.write(
                b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (status, ctype, len(body), body)
            )
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a broken or slow scrape: just close
        finally:
            writer.close()

    return serve
