"""create_app(settings) -> the ASGI app (the edge middleware around Starlette). The lifespan creates
every resource and closes it in reverse.

A plain Starlette app: FastAPI's extra middleware layers (exit stack, telemetry, body limit) cost
~10% of a request's CPU here and we use none of its features. Routes are plain endpoints (the protocol
module parses with orjson + pydantic and errors come out in OpenAI's shape, never `{"detail"}`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import structlog
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from backends.base import Backend
from backends.pool import Breaker, Member, probe_forever
from proxy import errors
from proxy.auth.authenticator import Authenticator, ensure_secret
from proxy.cache.embedding import build_embedder
from proxy.cache.response_cache import ResponseCache
from proxy.call import Call
from proxy.edge import read_body
from proxy.guard import PolicyGuard
from proxy.limits.limiter import RateLimiter
from proxy.observability.metrics import HttpMetrics
from proxy.observability.observer import Observer, configure_logging
from proxy.pipeline import Gateway, Reply
from proxy.protocol import model_card
from proxy.settings import Settings, load_settings

log = logging.getLogger("llm_gateway.app")
_GC_GEN0 = 10_000  # allocations between young-generation collections (CPython's default: 700)
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# (scope, receive, send, request id) -> the status it sent
DirectEndpoint = Callable[[Scope, Receive, Send, str], Awaitable[int]]


def build_backend(name: str, cfg: Any, session: aiohttp.ClientSession) -> Backend:
    """One backend object per configured backend; optional kinds are imported only when used."""
    if cfg.type == "vllm":
        from backends.vllm import VllmBackend

        return VllmBackend(name, cfg, session)
    if cfg.type == "openai":
        from backends.openai_http import OpenAIHTTPBackend

        return OpenAIHTTPBackend(name, cfg, session)
    if cfg.type == "llamacpp":
        from backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(name, cfg)
    from backends.litellm import LiteLLMBackend  # the optional extra: a clear ImportError if missing

    return LiteLLMBackend(name, cfg)


class Runtime:
    """What the routes need, filled in by the lifespan (nothing exists before start-up)."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None) -> None:
        self.settings = settings
        self.observer = Observer(settings.observability, registry)
        self.gateway: Gateway | None = None

    @property
    def gw(self) -> Gateway:
        if self.gateway is None:
            raise errors.ServiceUnavailable("The gateway is starting.")
        return self.gateway

    @asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        s = self.settings
        async with AsyncExitStack() as stack:
            connector = aiohttp.TCPConnector(limit=4096, limit_per_host=1024, ttl_dns_cache=300)
            session = aiohttp.ClientSession(
                connector=connector, json_serialize=lambda o: orjson.dumps(o).decode()
            )
            stack.push_async_callback(session.close)
            members = await self._start_backends(stack, session)
            secret, _ = await asyncio.to_thread(ensure_secret, s.auth, Path(s.server.state_dir))
            auth = Authenticator(s.auth, secret=secret, session=session)  # reads public_key_file itself
            limiter = RateLimiter(s.limits, s.redis_url)
            guard = PolicyGuard(s.policies)
            embedder = build_embedder(s.cache.semantic, session) if s.cache.semantic_on else None
            cache = ResponseCache(s.cache, s.redis_url, embedder)
            for part in (auth, limiter, guard, *((embedder,) if embedder else ()), cache):
                await part.start()
                stack.push_async_callback(part.close)
            stack.push_async_callback(self.observer.close)
            self.gateway = Gateway(s, members, auth, limiter, guard, cache, self.observer)
            await self.observer.start(self.gateway, s.redis_url)
            _settle_garbage_collector()
            try:
                yield
            finally:
                self.gateway = None

    async def _start_backends(
        self, stack: AsyncExitStack, session: aiohttp.ClientSession
    ) -> dict[str, Member]:
        members: dict[str, Member] = {}
        for name, cfg in self.settings.backends.items():
            backend = build_backend(name, cfg, session)
            stack.push_async_callback(backend.close)
            await backend.start()
            members[name] = Member(
                backend,
                Breaker(cfg.breaker.failures, cfg.breaker.reset_s),
                max_concurrency=getattr(cfg, "max_concurrency", None),
                max_waiting=getattr(cfg, "max_waiting", None),
                probe_interval_s=getattr(cfg, "health_interval_s", 5.0),
                send_priority=getattr(cfg, "send_priority", False),
            )
        tasks = [asyncio.create_task(probe_forever(m), name=f"probe:{m.name}") for m in members.values()]

        async def stop_probes() -> None:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        stack.push_async_callback(stop_probes)
        return members


def _settle_garbage_collector() -> None:
    """Everything built at start-up (modules, config, word automata, models) lives as long as the
    process: move it out of the collector's sight, so that a full collection walks only what
    requests allocate (measured: a 14-46 ms pause every so often under load became ~1 ms).
    A larger first generation runs the collector every few requests instead of every request."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_GEN0, *gc.get_threshold()[1:])


class EdgeMiddleware:
    """Pure ASGI and outermost: it wraps the Starlette app, Starlette's own error middleware
    included. Gives every request an id (bound into the log context, echoed as `x-request-id`)
    and observes the per-route HTTP metrics (not for /metrics itself).

    `direct`: (method, path) -> a DirectEndpoint called straight from here, past Starlette's
    middleware, router and endpoint wrappers. A direct endpoint puts `x-request-id` on its
    responses itself, turns every error into a response (an unexpected one into OpenAI's 500) and
    returns the status it sent; any other path goes through Starlette, and a send wrapper adds the
    id."""

    def __init__(
        self, app: ASGIApp, http: HttpMetrics, direct: dict[tuple[str, str], DirectEndpoint]
    ) -> None:
        self.app, self.http, self.direct = app, http, direct

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = f"req_{os.urandom(16).hex()}"  # 128 random bits: a quarter of uuid4().hex's cost
        status = 500  # what the client gets if the app ends without a response
        direct = self.direct.get((scope["method"], scope["path"]))
        structlog.contextvars.bind_contextvars(request_id=rid)
        try:
            if direct is not None:
                status = await direct(scope, receive, send, rid)
            else:
                scope.setdefault("state", {})["request_id"] = rid
                raw = rid.encode()

                async def send_with_id(message: Message) -> None:
                    nonlocal status
                    if message["type"] == "http.response.start":
                        status = message["status"]
                        message["headers"] = [*message.get("headers", ()), (b"x-request-id", raw)]
                    await send(message)

                await self.app(scope, receive, send_with_id)
        finally:
            structlog.contextvars.unbind_contextvars("request_id")
            handler = self.http.handler(scope["path"])
            if handler != "/metrics":
                self.http.observe(handler, scope["method"], status, time.perf_counter() - started)


def _error_response(exc: errors.GatewayError, extra: dict[str, str] | None = None) -> Response:
    headers = {**(extra or {}), **exc.response_headers()}
    return Response(exc.json(), status_code=exc.status, media_type="application/json", headers=headers)


def _internal_error(exc: Exception, extra: dict[str, str] | None = None) -> Response:
    """Anything unexpected: logged with its traceback, answered with OpenAI's 500 and none of its text."""
    log.error("unhandled error", exc_info=exc)
    return _error_response(errors.InternalError(), extra)


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None) -> ASGIApp:
    rt = Runtime(settings, registry)
    app = Starlette(lifespan=rt.lifespan)

    async def chat_completions(request: Request, rid: str) -> Reply | Response:
        call = Call(request_id=rid, started=time.monotonic(), headers={"x-request-id": rid})
        try:
            return await rt.gw.chat_completions(request, call)
        except errors.GatewayError as exc:
            call.status, call.error = exc.status, exc.code or exc.type
            rt.observer.finish(call)
            return _error_response(exc, call.headers)
        except Exception as exc:  # what Starlette's error middleware does for routed endpoints
            return _internal_error(exc, {"x-request-id": rid})

    async def chat_direct(scope: Scope, receive: Receive, send: Send, rid: str) -> int:
        response = await chat_completions(Request(scope, receive, send), rid)
        await response(scope, receive, send)
        return response.status_code

    async def chat_routed(request: Request) -> Reply | Response:  # see add_route below
        return await chat_completions(request, request.state.request_id)

    async def list_models(request: Request) -> Response:
        principal = await rt.gw.auth.authenticate(request.headers.getlist("authorization"))
        created = int(rt.observer.started_at)
        data = [
            model_card(name, created)
            for name in settings.models
            if principal.allowed_models is None or name in principal.allowed_models
        ]
        return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")

    async def get_model(request: Request) -> Response:
        principal = await rt.gw.auth.authenticate(request.headers.getlist("authorization"))
        name = request.path_params["model_id"]
        allowed = principal.allowed_models is None or name in principal.allowed_models
        if name not in settings.models or not allowed:
            raise errors.ModelNotFound(f"The model '{name[:100]}' does not exist.", param="model")
        return Response(
            orjson.dumps(model_card(name, int(rt.observer.started_at))), media_type="application/json"
        )

    async def healthz(_request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    async def readyz(_request: Request) -> Response:
        problems, degraded = await rt.gw.readiness()
        status = "not_ready" if problems else "degraded" if degraded else "ready"
        body = orjson.dumps({"status": status, "problems": problems, "degraded": degraded})
        return Response(body, status_code=503 if problems else 200, media_type="application/json")

    async def metrics(_request: Request) -> Response:
        body, content_type = rt.observer.metrics_response()
        return Response(body, media_type=content_type)

    async def feedback(request: Request) -> Response:
        principal = await rt.gw.auth.authenticate(request.headers.getlist("authorization"))
        raw = await read_body(request, 16_384, settings.server.body_timeout_s)
        result = await rt.observer.experiments.feedback(principal, raw)
        return Response(orjson.dumps(result), media_type="application/json")

    # registered so that other methods get the router's 405; a POST never gets this far (the edge
    # middleware calls chat_direct)
    app.add_route("/v1/chat/completions", chat_routed, methods=["POST"])  # type: ignore[arg-type]
    app.add_route("/v1/models", list_models, methods=["GET"])
    app.add_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
    app.add_route("/healthz", healthz, methods=["GET"])
    app.add_route("/readyz", readyz, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    app.add_route("/v1/feedback", feedback, methods=["POST"])

    async def _gateway_error(_request: Request, exc: errors.GatewayError) -> Response:
        return _error_response(exc)

    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return _error_response(errors.from_status(exc.status_code, str(exc.detail)))

    async def _unexpected(_request: Request, exc: Exception) -> Response:
        return _internal_error(exc)

    app.add_exception_handler(errors.GatewayError, _gateway_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)

    routes = (*(r.path.replace(":path", "") for r in app.routes if isinstance(r, Route)),)
    direct: dict[tuple[str, str], DirectEndpoint] = {("POST", "/v1/chat/completions"): chat_direct}
    return EdgeMiddleware(app, rt.observer.http_metrics(routes), direct)


def app_from_env() -> ASGIApp:
    """Factory for `uvicorn --factory` / several workers: the CLI passes the config path by env."""
    settings = load_settings(os.environ.get("LLM_GATEWAY_CONFIG", "config/gateway.yaml"))
    configure_logging(settings.observability)  # spawned workers start with a bare logging setup
    return create_app(settings)
