"""The chat-completions pipeline: one short, linear function per endpoint kind.

authenticate -> parse -> rate limit -> choose variant -> input policy -> cache lookup
  -> backends with fallback (before the first byte only) -> output policy -> cache store -> usage/logs

Every stage is an object built and started by the lifespan (proxy/app.py) and injected here.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request

from backends.affinity import request_key
from backends.base import BackendError, ChunkStream, ErrorKind
from backends.pool import Member, Placements, route, shed_retry_after
from backends.vllm import VllmBackend
from policies.stream import ChunkFilter
from proxy import errors
from proxy.auth.authenticator import Authenticator
from proxy.cache.response_cache import (
    CachedAnswer,
    CacheDecision,
    CacheScope,
    ResponseCache,
    decide,
    exact_key,
    replay_chunks,
    replay_completion,
)
from proxy.call import Call
from proxy.edge import read_body
from proxy.experiments.assign import Router, apply_variant, sticky_key
from proxy.guard import PolicyGuard
from proxy.limits.limiter import Admission, RateLimiter
from proxy.observability.observer import Observer
from proxy.protocol import (
    DONE_FRAME,
    ChatRequest,
    RequestValidationError,
    chunk_frame,
    dumps,
    estimate_prompt_tokens,
    parse_chat_request,
)
from proxy.settings import RoutingSettings, Settings, VariantSettings
from proxy.streaming import DisconnectWatch, JSONBytesResponse, SSEResponse, StreamTap, usage_chunk

T = TypeVar("T")
Reply = SSEResponse | JSONBytesResponse
Attempt = Callable[[Member, dict[str, Any]], Awaitable[T]]
DEFAULT_COMPLETION_RESERVE = 512  # reserved when the client sets no max_tokens; refunded after
OFF_LOOP_SCAN_BYTES = 64 * 1024


@dataclass(slots=True)
class Prepared:
    req: ChatRequest
    body: dict[str, Any]
    variant: VariantSettings
    scope: CacheScope
    decision: CacheDecision
    admission: Admission
    key: str | None  # the exact cache key, when the cache is read or written
    routing: RoutingSettings  # the model's routing (its own keys over the top-level section)
    session: str | None  # the conversation's name: the session header's value, or `user`
    priority: int  # the caller's tier's priority (vLLM's: lower runs first)
    salt: str | None  # vLLM's cache_salt for this tenant, when the model isolates prefix caches


class Gateway:
    """The stages, wired. Created unstarted by create_app; the lifespan starts and closes it."""

    def __init__(
        self,
        settings: Settings,
        members: dict[str, Member],
        auth: Authenticator,
        limiter: RateLimiter,
        guard: PolicyGuard,
        cache: ResponseCache,
        observer: Observer,
    ) -> None:
        self.settings = settings
        self.router = Router(settings)
        self.members = members
        self.placements = Placements()  # where each affinity key's first request went lately
        self.auth, self.limiter, self.guard, self.cache, self.observer = auth, limiter, guard, cache, observer

    async def readiness(self) -> tuple[list[str], list[str]]:
        """(problems, degradations). Problems take this replica out of rotation. A Redis outage is
        only a degradation under fail_open: every replica shares Redis, so making them all unready
        at once would turn a degraded service into no service."""
        problems: list[str] = []
        degraded: list[str] = []
        for name, experiment in self.router.experiments.items():
            names = {n for v in experiment.settings.variants for n in (*v.backends, *v.fallback)}
            if not any(self.members[n].usable() for n in names):
                problems.append(f"model {name}: no usable backend")
        if self.auth.keys_missing:  # every replica shares the key server: degraded, not unready
            degraded.append("auth: signing keys not loaded (JWKS unreachable)")
        if self.settings.redis_url and not await self.limiter.redis_ok():
            fail_closed = self.settings.limits.on_redis_error == "fail_closed"
            (problems if fail_closed else degraded).append("redis unreachable")
        return problems, degraded

    # -- entry point -------------------------------------------------------------------------------
    async def chat_completions(self, request: Request, call: Call) -> Reply:
        call.principal = await self.auth.authenticate(request.headers.getlist("authorization"))
        raw = await read_body(
            request, self.settings.server.max_body_bytes, self.settings.server.body_timeout_s
        )
        prep = await self._prepare(request, raw, call)
        try:
            if prep.decision.read:
                peeked = prep.admission.peek  # read in the admission round trip (Redis only)
                found = await self.cache.fetch(prep.scope, prep.req, prep.key, peeked)  # never raises
                if found.answer is not None:
                    return self._serve_hit(found.answer, prep, call)
                call.cache = found.status
            else:
                call.cache = "bypass"
            return await self._from_backends(prep, call, DisconnectWatch(request.receive).start())
        except BaseException:  # no response took the request over: settle here (idempotent)
            await prep.admission.settle(call.prompt_tokens + call.completion_tokens)
            raise

    async def _from_backends(self, prep: Prepared, call: Call, watch: DisconnectWatch) -> Reply:
        """From here on a backend works for this request: a client that leaves cancels it at once
        (the upstream request is closed, nothing is stored, the reservation is settled)."""
        handed_over = False
        try:
            if prep.req.stream:
                reply = await self._stream(prep, call, watch)
                handed_over = True
                return reply
            return await self._complete(prep, call)
        except asyncio.CancelledError:
            if not watch.absorb():
                raise
            call.disconnected = True
            raise errors.ClientDisconnected("The client closed the connection.") from None
        finally:
            if not handed_over:
                watch.stop()

    async def _prepare(self, request: Request, raw: bytes, call: Call) -> Prepared:
        try:
            req = parse_chat_request(raw)
        except RequestValidationError as exc:
            raise errors.InvalidRequest(exc.message, param=exc.param) from None
        call.model, call.stream = req.model, bool(req.stream)
        experiment = self.router.get(req.model)
        principal = call.principal
        assert principal is not None
        if experiment is None:
            raise errors.ModelNotFound(f"The model '{req.model[:100]}' does not exist.", param="model")
        self.auth.check_model(principal, req.model)
        key = sticky_key(
            experiment.settings.sticky_by,
            sub=principal.sub,
            tenant=principal.tenant,
            headers=request.headers,
            request_id=call.request_id,
        )
        variant = experiment.choose(key)
        call.variant = variant.name
        client_body = req.upstream_body()
        body = apply_variant(client_body, variant)
        try:
            if len(raw) > OFF_LOOP_SCAN_BYTES:  # ~40 ms per MB: keep big scans off the event loop
                body, action = await asyncio.to_thread(self.guard.check_input, body)
            else:
                body, action = self.guard.check_input(body)
        except errors.ContentFiltered:
            call.policy.append("input:block")
            raise
        if action:
            call.policy.append(f"input:{action}")
        tenant = None if experiment.settings.shared_cache else principal.tenant
        scope = CacheScope(tenant=tenant, model=req.model, variant=variant.name)
        decision = decide(req, request.headers, experiment.settings, self.settings.cache)
        if action == "mask":
            decision = CacheDecision(read=False, write=False, reason="policy_mask")
        cache_key = exact_key(scope, client_body) if decision.read or decision.write else None
        call.prompt_tokens = estimate_prompt_tokens(body["messages"])
        reserve = call.prompt_tokens + (req.completion_budget or DEFAULT_COMPLETION_RESERVE)
        free_if = self.cache.redis_field(cache_key) if cache_key is not None and decision.read else None
        admission = await self.limiter.admit(principal, reserve, free_if=free_if)
        call.headers.update(admission.headers)
        salt = _salt(principal.tenant) if experiment.settings.isolate_prefix_cache else None
        routing = experiment.settings.routing or self.settings.routing
        session = request.headers.get(routing.session_header) or (routing.session_from_user and req.user)
        priority = self.settings.limits.tier(principal.tier).priority
        return Prepared(
            req,
            body,
            variant,
            scope,
            decision,
            admission,
            cache_key,
            routing,
            session or None,
            priority,
            salt,
        )

    # -- cache hit --------------------------------------------------------------------------------
    def _serve_hit(self, hit: CachedAnswer, prep: Prepared, call: Call) -> Reply:
        call.cache = hit.layer
        call.backend = "cache"
        call.completion_id = call.request_id  # replays carry the request id as their completion id
        rid, created, model = call.request_id, int(time.time()), prep.req.model
        self._set_route_headers(call)
        checked = self.guard.output_checked(hit.policy)  # stored filtered: re-check only if lists changed
        if prep.req.stream:
            include_usage = prep.req.include_usage
            chunks = replay_chunks(
                hit, request_id=rid, created=created, model=model, include_usage=include_usage
            )
            filt = None if checked else self.guard.stream_filter()
            return SSEResponse(self._replay(chunks, filt, prep, call), call.headers)
        completion = replay_completion(hit, request_id=rid, created=created, model=model)
        if not checked:
            completion = self._filter_output(completion, call)
        call.completion_tokens = int((completion.get("usage") or {}).get("completion_tokens", 0))
        if prep.admission.reserved:  # a semantic hit: refund; an exact hit reserved nothing
            self._spawn(prep.admission.settle(0))
        return self._json(completion, call)

    async def _replay(
        self, chunks: list[dict[str, Any]], filt: ChunkFilter | None, prep: Prepared, call: Call
    ) -> AsyncIterator[bytes]:
        try:
            call.ttft_s = time.monotonic() - call.started
            for chunk in chunks:
                for out in filt.feed(chunk) if filt else (chunk,):
                    yield chunk_frame(out)
                if filt and filt.blocked:
                    yield self._blocked_end(filt, call)
                    return
            yield DONE_FRAME
        finally:
            self._count_stream_policy(filt, call)
            await prep.admission.settle(0)  # a cache hit costs the backends nothing
            self.observer.finish(call)

    # -- non-stream -------------------------------------------------------------------------------
    async def _first_success(
        self, prep: Prepared, call: Call, body: dict[str, Any], attempt: Attempt[T]
    ) -> tuple[Member, T]:
        """Try the chain in order until one attempt succeeds. Falls over only on retryable errors
        (nothing has reached the client yet). The winner's `outstanding` stays counted: the
        caller releases it when the response is over."""
        last_error: BackendError | None = None
        for member in self._chain(prep, call):
            fwd = self._forward_body(body, member, prep, call)
            member.outstanding += 1
            try:
                result = await attempt(member, fwd)
            except BackendError as exc:
                member.outstanding -= 1
                last_error = exc
                if not self._note_failure(member, exc, call):
                    break
                continue
            except BaseException:
                member.outstanding -= 1
                raise
            member.breaker.success()
            return member, result
        raise self._exhausted(prep, last_error)

    async def _complete(self, prep: Prepared, call: Call) -> JSONBytesResponse:
        member, completion = await self._first_success(prep, call, prep.body, _chat)
        member.outstanding -= 1
        return self._finish_completion(completion, member, prep, call)

    def _finish_completion(
        self, completion: dict[str, Any], member: Member, prep: Prepared, call: Call
    ) -> JSONBytesResponse:
        call.backend = member.name
        call.completion_id = completion.get("id")
        self._set_route_headers(call)
        completion["model"] = prep.req.model
        usage = completion.get("usage") or {}
        call.prompt_tokens = int(usage.get("prompt_tokens", call.prompt_tokens))
        call.completion_tokens = int(usage.get("completion_tokens", 0))
        policy = self.guard.output_stamp  # the check applied below, recorded with the cached answer
        filtered = self._filter_output(completion, call)
        if prep.decision.write and _complete_choices(filtered):  # a blocked answer ends in content_filter
            answer = CachedAnswer("hit", None, filtered, policy=policy)
            self._spawn(self.cache.store(prep.scope, prep.req, answer, prep.key))
        self._spawn(prep.admission.settle(call.prompt_tokens + call.completion_tokens))
        return self._json(filtered, call)

    # -- stream -----------------------------------------------------------------------------------
    async def _stream(self, prep: Prepared, call: Call, watch: DisconnectWatch) -> Reply:
        body = dict(prep.body)
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        member, (upstream, first) = await self._first_success(prep, call, body, _open_stream)
        call.backend = member.name
        call.ttft_s = time.monotonic() - call.started
        call.completion_id = first.get("id")
        self._set_route_headers(call)
        return SSEResponse(self._relay(upstream, first, member, prep, call), call.headers, watch=watch)

    async def _relay(
        self, upstream: ChunkStream, first: dict[str, Any], member: Member, prep: Prepared, call: Call
    ) -> AsyncIterator[bytes]:
        tap, filt = StreamTap(policy=self.guard.output_stamp), self.guard.stream_filter()
        include_usage, model = prep.req.include_usage, prep.req.model
        chunks = _chain_first(first, upstream)
        try:
            async for chunk in chunks:
                chunk["model"] = model
                if not chunk.get("choices") and chunk.get("usage"):
                    tap.usage = chunk["usage"]
                    continue
                for out in filt.feed(chunk) if filt else (chunk,):
                    tap.observe(out)
                    tap.chunks.append(out)
                    yield chunk_frame(out)
                if filt and filt.blocked:
                    tap.blocked = True
                    yield self._blocked_end(filt, call)
                    return
            for out in filt.flush_chunks() if filt else ():  # upstream ended without finish_reason
                tap.chunks.append(out)
                yield chunk_frame(out)
            if include_usage:
                yield chunk_frame(usage_chunk(first, self._final_usage(tap, call)))
            tap.complete = bool(tap.finish_reasons)
            yield DONE_FRAME
        except BackendError as exc:
            failure: errors.GatewayError = (
                errors.GatewayTimeout("The model server stopped answering in time; the answer is incomplete.")
                if exc.cause is ErrorKind.TIMEOUT
                else errors.BadGateway("The model server failed while streaming; the answer is incomplete.")
            )
            call.status, call.error = failure.status, exc.kind.value
            yield failure.sse_frame()
        except (asyncio.CancelledError, GeneratorExit):
            call.disconnected = True  # the client went away; finally closes the upstream request
            raise
        finally:
            await upstream.aclose()
            member.outstanding -= 1
            self._count_stream_policy(filt, call)
            self._end_stream(tap, prep, call)

    def _end_stream(self, tap: StreamTap, prep: Prepared, call: Call) -> None:
        call.completion_tokens = tap.completion_tokens
        if tap.usage:
            call.prompt_tokens = int(tap.usage.get("prompt_tokens", call.prompt_tokens))
        if tap.complete and not tap.blocked and prep.decision.write and call.status == 200:
            answer = CachedAnswer("hit", tap.chunks, None, self._final_usage(tap, call), tap.policy)
            self._spawn(self.cache.store(prep.scope, prep.req, answer, prep.key))
        self._spawn(prep.admission.settle(call.prompt_tokens + call.completion_tokens))
        self.observer.finish(call)

    # -- shared pieces ----------------------------------------------------------------------------
    def _chain(self, prep: Prepared, call: Call) -> list[Member]:
        """The backends to try, by the model's routing policy (backends/pool.py `route`): its key
        is the request's session or conversation head, hashed once here."""
        cfg, variant = prep.routing, prep.variant
        key, home = 0, None
        if cfg.policy == "affinity":
            key = request_key(prep.salt or "", prep.body["messages"], prep.session, cfg.prefix_tokens)
            home = self.placements.home(key)
        plan = route(self.members, variant.backends, variant.fallback, cfg, key, prep.priority, home=home)
        first = plan.chain[0].name if plan.chain else None
        if cfg.policy == "affinity" and home is None and first in variant.backends:
            self.placements.place(key, first)
        call.route = plan.how
        chain = plan.chain
        for name in (*variant.backends, *variant.fallback):
            member = self.members[name]
            if member not in chain:
                call.fallback_reasons.append("shed" if member.usable() else member.skip_reason())
        if not chain and plan.how == "shed":
            wait = shed_retry_after((self.members[n] for n in variant.backends), plan.reason)
            raise errors.ServiceUnavailable(
                "The model's servers are saturated; requests of this tier wait until they recover.",
                headers={"retry-after": str(wait)},
            )
        if not chain:
            raise self._unavailable(prep, "No backend for this model is available right now.")
        return chain

    def _forward_body(
        self, body: dict[str, Any], member: Member, prep: Prepared, call: Call
    ) -> dict[str, Any]:
        """The body for one backend: its own model id, and max_tokens fitted to its context."""
        call.tried.append(member.name)
        fwd = dict(body)
        fwd["model"] = member.backend.model
        if prep.salt is not None and isinstance(member.backend, VllmBackend):
            fwd["cache_salt"] = prep.salt
        if member.send_priority:
            fwd["priority"] = prep.priority
        ctx = member.backend.context_length
        if ctx is None:
            return fwd
        prompt = member.backend.count_tokens(body["messages"]) or call.prompt_tokens
        room = ctx - prompt
        if room < 1:
            raise errors.InvalidRequest(
                f"This model's maximum context length is {ctx} tokens; the messages use {prompt}.",
                param="messages",
                code="context_length_exceeded",
            )
        key = "max_completion_tokens" if "max_completion_tokens" in fwd else "max_tokens"
        fwd[key] = min(int(fwd.get(key) or room), room)
        return fwd

    def _note_failure(self, member: Member, exc: BackendError, call: Call) -> bool:
        """Record a failed attempt; True when the next backend may be tried."""
        call.fallback_reasons.append(exc.kind.value)
        if exc.kind in _BREAKER_KINDS:
            member.breaker.failure()
        return exc.retryable

    def _exhausted(self, prep: Prepared, last: BackendError | None) -> errors.GatewayError:
        """The one mapping from how the last backend failed to what the client is told: no backend
        able to take the request is an overload (503 + when to retry); 504 when the last one ran
        out of time; 502 only when a backend answered with something invalid."""
        kind = last.kind if last is not None else ErrorKind.OVERLOADED
        if last is not None and kind is ErrorKind.BAD_REQUEST:
            return errors.InvalidRequest(last.message, param=last.param)
        if kind is ErrorKind.TIMEOUT:
            return errors.GatewayTimeout("The model server did not answer in time.")
        if kind in _UNAVAILABLE_KINDS or (last is not None and last.status == 503):
            return self._unavailable(prep, "No backend for this model can take the request right now.")
        return errors.BadGateway("The model server failed; no fallback could answer.")

    def _unavailable(self, prep: Prepared, message: str) -> errors.ServiceUnavailable:
        names = (*prep.variant.backends, *prep.variant.fallback)
        wait = min(self.members[n].retry_after() for n in names)
        return errors.ServiceUnavailable(message, headers={"retry-after": str(max(1, math.ceil(wait)))})

    def _filter_output(self, completion: dict[str, Any], call: Call) -> dict[str, Any]:
        filtered, action = self.guard.filter_output(completion)
        if action:
            call.policy.append(f"output:{action}")
        return filtered

    def _blocked_end(self, filt: ChunkFilter, call: Call) -> bytes:
        """After a block mid-stream: a chunk ending every choice with content_filter, then an
        error frame (the SDK raises), and no [DONE]. The caller's return closes the upstream."""
        frames = b"".join(chunk_frame(c) for c in filt.finish_chunks())
        return frames + self.guard.stream_block_error().sse_frame()

    def _count_stream_policy(self, filt: ChunkFilter | None, call: Call) -> None:
        if filt is not None and filt.hits:
            call.policy.append(f"output:{filt.action}")
            self.guard.stream_finished(filt)

    def _final_usage(self, tap: StreamTap, call: Call) -> dict[str, Any]:
        if tap.usage:
            return tap.usage
        prompt, completion = call.prompt_tokens, tap.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _set_route_headers(self, call: Call) -> None:
        call.headers["x-gateway-cache"] = call.cache
        if call.variant:
            call.headers["x-gateway-variant"] = call.variant
        if call.backend:
            call.headers["x-gateway-backend"] = call.backend

    def _json(self, payload: dict[str, Any], call: Call) -> JSONBytesResponse:
        self.observer.finish(call)
        return JSONBytesResponse(dumps(payload), call.headers)

    def _spawn(self, coro: Any) -> None:
        self.observer.spawn(coro)


_UNAVAILABLE_KINDS = frozenset({ErrorKind.CONNECT, ErrorKind.OVERLOADED, ErrorKind.RATE_LIMITED})
_BREAKER_KINDS = frozenset(
    {ErrorKind.CONNECT, ErrorKind.TIMEOUT, ErrorKind.UPSTREAM_5XX, ErrorKind.PROTOCOL, ErrorKind.REFUSED}
)


@functools.lru_cache(maxsize=4096)
def _salt(tenant: str) -> str:
    """vLLM's cache_salt for a tenant: distinct per tenant, and not the tenant's name itself."""
    return hashlib.blake2b(tenant.encode(), digest_size=16, person=b"llmgw-kv-salt").hexdigest()


def _complete_choices(completion: dict[str, Any]) -> bool:
    choices = completion.get("choices") or []
    return bool(choices) and all(c.get("finish_reason") in ("stop", "length") for c in choices)


async def _chat(member: Member, body: dict[str, Any]) -> dict[str, Any]:
    return await member.backend.chat(body)


async def _open_stream(member: Member, body: dict[str, Any]) -> tuple[ChunkStream, dict[str, Any]]:
    """Open the stream and wait for its first chunk (the backend enforces the first-token
    timeout), so a failure here can still fall over. Closes the stream on failure."""
    upstream = await member.backend.stream(body)
    try:
        async for chunk in upstream:
            return upstream, chunk
    except BaseException:
        await upstream.aclose()
        raise
    await upstream.aclose()
    raise BackendError(ErrorKind.CONNECT, "The model server ended the stream before any token.")


async def _chain_first(first: dict[str, Any], upstream: ChunkStream) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for chunk in upstream:
        yield chunk
