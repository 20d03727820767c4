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
from backends.breaker import Breaker
from backends.pool import Member, probe_forever
from proxy import errors
from proxy.apis.base import Api
from proxy.apis.chat import ChatApi
from proxy.apis.completions import CompletionsApi
from proxy.apis.embeddings import EmbeddingsApi
from proxy.apis.messages import MessagesApi, count_input_tokens
from proxy.apis.responses import ResponsesApi, ResponseStore
from proxy.auth.authenticator import Authenticator, Principal, ensure_secret
from proxy.cache.embedding import build_embedder
from proxy.cache.response_cache import ResponseCache
from proxy.call import Call
from proxy.console import Console
from proxy.conversations import Conversations, build_conversations
from proxy.edge import read_body
from proxy.embeddings import embed
from proxy.experiments.aggregates import ExperimentStore
from proxy.guard import PolicyGuard
from proxy.limits.limiter import RateLimiter
from proxy.observability.metrics import HttpMetrics
from proxy.observability.observer import Observer, configure_logging
from proxy.pipeline import Gateway, Reply
from proxy.privacy import Privacy
from proxy.protocol import model_card
from proxy.redis import SharedRedis
from proxy.settings import Settings, load_settings

log = logging.getLogger("llm_gateway.app")
_GC_GEN0 = 10_000  # allocations between young-generation collections (CPython's default: 700)
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# (scope, receive, send, request id) -> the status it sent
DirectEndpoint = Callable[[Scope, Receive, Send, str], Awaitable[int]]
# the endpoints that run the pipeline, each with its API's translator
MESSAGES = MessagesApi()
PIPELINE_APIS: dict[str, Api] = {
    "/v1/chat/completions": ChatApi(),
    "/v1/messages": MESSAGES,
    "/v1/completions": CompletionsApi(),
}
# /v1/embeddings runs the stages that apply to it (proxy/embeddings.py): no cache, stream or output policy
EMBEDDINGS = EmbeddingsApi()
Endpoint = Api | EmbeddingsApi


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
        self.console = Console(settings, lambda: self.gw, self.observer)  # off the request path
        self.gateway: Gateway | None = None
        self.conversations: Conversations | None = None

    @property
    def gw(self) -> Gateway:
        if self.gateway is None:
            raise errors.ServiceUnavailable("The gateway is starting.")
        return self.gateway

    def response_store(self) -> ResponseStore:
        if self.conversations is None:
            raise errors.ServiceUnavailable("The gateway is starting.")
        return self.conversations

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
            redis = SharedRedis(s.redis_url, s.redis) if s.redis_url else None  # one for every stage
            if redis is not None:
                stack.push_async_callback(redis.close)  # after every stage that uses it
            limiter = RateLimiter(s.limits, redis)
            guard = PolicyGuard(s.policies)
            privacy = Privacy(s.privacy)
            embedder = build_embedder(s.cache.semantic, session) if s.cache.semantic_on else None
            cache = ResponseCache(s.cache, redis, embedder)
            for part in (auth, limiter, guard, privacy, *((embedder,) if embedder else ()), cache):
                await part.start()
                stack.push_async_callback(part.close)
            stack.push_async_callback(self.observer.close)
            self.gateway = Gateway(s, members, auth, limiter, guard, cache, self.observer, privacy)
            self.conversations = build_conversations(s.responses, redis)  # /v1/responses' store
            await self.conversations.start()
            stack.push_async_callback(self.conversations.close)
            feedback = {name: m.feedback_sample for name, m in s.models.items()}
            await self.observer.start(
                self.gateway, ExperimentStore(redis, s.observability, feedback=feedback)
            )
            await self.console.start()  # its page in memory, the fleet history's task
            stack.push_async_callback(self.console.close)
            _settle_garbage_collector()
            try:
                yield
            finally:
                self.gateway = self.conversations = None

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


def _error_response(
    exc: errors.GatewayError, extra: dict[str, str] | None = None, api: Endpoint | None = None
) -> Response:
    headers = {**(extra or {}), **exc.response_headers()}
    body = api.error_body(exc) if api is not None else exc.json()
    return Response(body, status_code=exc.status, media_type="application/json", headers=headers)


def _internal_error(
    exc: Exception, extra: dict[str, str] | None = None, api: Endpoint | None = None
) -> Response:
    """Anything unexpected: logged with its traceback, answered with a 500 and none of its text."""
    log.error("unhandled error", exc_info=exc)
    return _error_response(errors.InternalError(), extra, api)


def _tokenizer(gw: Gateway, principal: Principal, model: str) -> Callable[[list[Any]], int | None]:
    """The model's first backend's own token counter (None from it: use the gateway's estimate)."""
    experiment = gw.router.get(model)
    if experiment is None:
        raise errors.ModelNotFound(f"The model '{model[:100]}' does not exist.", param="model")
    gw.auth.check_model(principal, model)
    return gw.members[experiment.settings.variants[0].backends[0]].backend.count_tokens


def create_app(settings: Settings, *, registry: CollectorRegistry | None = None) -> ASGIApp:
    rt = Runtime(settings, registry)
    app = Starlette(lifespan=rt.lifespan)
    responses = ResponsesApi(rt.response_store)  # its store exists once the lifespan has run
    apis: dict[str, Endpoint] = {**PIPELINE_APIS, "/v1/responses": responses, "/v1/embeddings": EMBEDDINGS}

    async def through_pipeline(api: Endpoint, request: Request, rid: str) -> Reply | Response:
        call = Call(rid, time.monotonic(), api.name, headers={"x-request-id": rid})
        try:
            if isinstance(api, EmbeddingsApi):
                return await embed(rt.gw, api, request, call)
            return await rt.gw.handle(api, request, call)
        except errors.GatewayError as exc:
            call.status, call.error = exc.status, exc.code or exc.type
            rt.observer.finish(call)
            return _error_response(exc, call.headers, api)
        except Exception as exc:  # what Starlette's error middleware does for routed endpoints
            return _internal_error(exc, {"x-request-id": rid}, api)

    def direct_endpoint(api: Endpoint) -> DirectEndpoint:
        async def endpoint(scope: Scope, receive: Receive, send: Send, rid: str) -> int:
            response = await through_pipeline(api, Request(scope, receive, send), rid)
            await response(scope, receive, send)
            return response.status_code

        return endpoint

    async def never_routed(_request: Request) -> Response:  # see add_route below
        raise AssertionError("the edge middleware dispatches the pipeline's endpoints")

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

    async def readyz(_request: Request) -> Response:  # 503 only while starting (rt.gw raises)
        return Response(orjson.dumps(await rt.gw.readiness()), media_type="application/json")

    async def metrics(_request: Request) -> Response:
        body, content_type = rt.observer.metrics_response()
        return Response(body, media_type=content_type)

    async def feedback(request: Request) -> Response:
        principal = await rt.gw.auth.authenticate(request.headers.getlist("authorization"))
        raw = await read_body(request, 16_384, settings.server.body_timeout_s)
        result = await rt.observer.experiments.feedback(principal, raw)
        return Response(orjson.dumps(result), media_type="application/json")

    async def response_by_id(request: Request) -> Response:
        """GET or DELETE a stored response of /v1/responses (the caller's tenant's only)."""
        principal = await rt.gw.auth.authenticate(responses.credentials(request.headers))
        response_id = request.path_params["response_id"]
        if request.method == "DELETE":
            body = await responses.delete(principal, response_id)
        else:
            body = await responses.retrieve(principal, response_id)
        return Response(orjson.dumps(body), media_type="application/json")

    async def count_tokens(request: Request) -> Response:
        """Anthropic's count_tokens: counts against the caller's request limit, spends no tokens."""
        try:
            gw = rt.gw
            principal = await gw.auth.authenticate(MESSAGES.credentials(request.headers))
            raw = await read_body(request, settings.server.max_body_bytes, settings.server.body_timeout_s)
            parsed = MESSAGES.parse_count(raw)
            tokenizer = _tokenizer(gw, principal, parsed.chat.model)
            admission = await gw.limiter.admit(principal, 0)
        except errors.GatewayError as exc:
            return _error_response(exc, None, MESSAGES)
        body = orjson.dumps({"input_tokens": count_input_tokens(parsed, tokenizer)})
        return Response(body, media_type="application/json", headers=admission.headers)

    # registered so that other methods get the router's 405; a POST never gets this far (the edge
    # middleware calls the pipeline directly)
    for path in apis:
        app.add_route(path, never_routed, methods=["POST"])
    app.add_route("/v1/models", list_models, methods=["GET"])
    app.add_route("/v1/models/{model_id:path}", get_model, methods=["GET"])
    app.add_route("/healthz", healthz, methods=["GET"])
    app.add_route("/readyz", readyz, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    app.add_route("/v1/feedback", feedback, methods=["POST"])
    app.add_route("/v1/messages/count_tokens", count_tokens, methods=["POST"])
    app.add_route("/v1/responses/{response_id}", response_by_id, methods=["GET", "DELETE"])
    for path, endpoint in rt.console.routes():  # the web console: page public, data admin-only
        app.add_route(path, endpoint, methods=["GET"])

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
    direct = {("POST", path): direct_endpoint(api) for path, api in apis.items()}
    return EdgeMiddleware(app, rt.observer.http_metrics(routes), direct)


def app_from_env() -> ASGIApp:
    """Factory for `uvicorn --factory` / several workers: the CLI passes the config path by env."""
    settings = load_settings(os.environ.get("LLM_GATEWAY_CONFIG", "config/gateway.yaml"))
    configure_logging(settings.observability)  # spawned workers start with a bare logging setup
    return create_app(settings)
