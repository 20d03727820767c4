"""The pipeline: one set of stages for every API the clients speak (proxy/apis/ translates each
API to the internal chat form and back).

authenticate -> parse -> rate limit -> choose variant -> personal data -> input policy -> cache lookup
  -> backends with fallback (before the first byte only) -> output policy -> cache store
  -> the user's values put back -> usage/logs

Every stage is an object built and started by the lifespan (proxy/app.py) and injected here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from backends.base import BackendError, ChunkStream, ErrorKind
from backends.pool import Member
from policies.stream import ChunkFilter
from proxy import errors
from proxy.apis.base import Api, Parsed
from proxy.auth.authenticator import Authenticator
from proxy.cache.response_cache import (
    CachedAnswer,
    CacheDecision,
    CacheResult,
    CacheScope,
    ResponseCache,
    decide,
    exact_key,
    replay_chunks,
    replay_completion,
    usage_of,
)
from proxy.call import Call
from proxy.dispatch import Dispatch, Target, chain_first, chat, open_stream, salt
from proxy.edge import read_body
from proxy.experiments.assign import Experiment, Router, apply_variant, sticky_key
from proxy.guard import PolicyGuard
from proxy.limits.limiter import Admission, RateLimiter
from proxy.observability.observer import Observer
from proxy.privacy import Privacy, Restorer
from proxy.protocol import ChatRequest, dumps, estimate_prompt_tokens
from proxy.settings import Settings, VariantSettings
from proxy.streaming import DisconnectWatch, JSONBytesResponse, Relay, SSEResponse, StreamTap

Reply = SSEResponse | JSONBytesResponse
DEFAULT_COMPLETION_RESERVE = 512  # reserved when the client sets no max_tokens; refunded after


@dataclass(slots=True)
class Prepared:
    api: Api
    parsed: Parsed
    req: ChatRequest  # parsed.chat: the request in the internal chat form
    body: dict[str, Any]
    target: Target
    scope: CacheScope
    decision: CacheDecision
    admission: Admission
    key: str | None  # the exact cache key, when the cache is read or written
    restorer: Restorer | None = None  # personal data: the answer's output check, values put back


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
        privacy: Privacy | None = None,  # None: off
    ) -> None:
        self.settings = settings
        self.privacy = privacy or Privacy(settings.privacy)  # unstarted: does nothing
        self.router = Router(settings)
        self.members = members
        self.dispatch = Dispatch(members)
        self.auth, self.limiter, self.guard, self.cache, self.observer = auth, limiter, guard, cache, observer
        self._hedge = settings.cache.semantic.hedge

    async def readiness(self) -> dict[str, Any]:
        """/readyz's body. A started process can serve: it answers every request, with a JSON 503
        and `retry-after` where it cannot do better, and cache hits need no backend. So nothing
        here takes it out of rotation: every replica shares the backends, Redis and the key
        server, and making them all unready at once would turn a degraded service into refused
        connections. What is wrong is reported under `degraded` (and in metrics)."""
        degraded: list[str] = []
        models: dict[str, dict[str, int]] = {}
        for name, experiment in self.router.experiments.items():
            names = {n for v in experiment.settings.variants for n in (*v.backends, *v.fallback)}
            usable = sum(self.members[n].usable() for n in names)
            models[name] = {"backends": len(names), "usable": usable}
            if not usable:
                degraded.append(f"model {name}: no usable backend (requests get 503 + retry-after)")
        backends = {
            name: {"healthy": m.healthy, "breaker": m.breaker.state, "usable": m.usable()}
            for name, m in self.members.items()
        }
        redis = None
        if self.settings.redis_url:
            redis = "ok" if await self.limiter.redis_ok() else "unreachable"
            if redis == "unreachable":
                closed = self.settings.limits.on_redis_error == "fail_closed"
                degraded.append("redis unreachable" + (" (fail_closed: requests get 503)" if closed else ""))
        if self.auth.keys_missing:
            degraded.append("auth: signing keys not loaded (JWKS unreachable)")
        return {
            "status": "degraded" if degraded else "ready",
            "degraded": degraded,
            "models": models,
            "backends": backends,
            "redis": redis,
        }

    # -- entry point -------------------------------------------------------------------------------
    async def handle(self, api: Api, request: Request, call: Call) -> Reply:
        call.principal = await self.auth.authenticate(api.credentials(request.headers))
        raw = await read_body(
            request, self.settings.server.max_body_bytes, self.settings.server.body_timeout_s
        )
        prep = await self._prepare(api, request, raw, call)
        semantic: asyncio.Task[CacheResult] | None = None
        try:
            if prep.decision.read:
                peeked = prep.admission.peek  # read in the admission round trip (Redis only)
                found = await self.cache.fetch(prep.scope, prep.req, prep.key, peeked, hedge=self._hedge)
                if found.answer is not None:
                    return await self._serve_hit(found.answer, prep, call)
                call.cache, semantic = found.status, found.semantic
            else:
                call.cache = "bypass"
            return await self._from_backends(prep, call, DisconnectWatch(request.receive).start(), semantic)
        except BaseException:  # no response took the request over: settle here (idempotent)
            if semantic is not None:
                semantic.cancel()
            await prep.admission.settle(call.prompt_tokens + call.completion_tokens)
            raise

    async def _from_backends(
        self, prep: Prepared, call: Call, watch: DisconnectWatch, semantic: asyncio.Task[CacheResult] | None
    ) -> Reply:
        """From here on a backend works for this request: a client that leaves cancels it at once
        (the upstream request is closed, nothing is stored, the reservation is settled)."""
        handed_over = False
        try:
            opened = await (self._open(prep, call) if semantic is None else self._race(prep, call, semantic))
            if isinstance(opened, CachedAnswer):
                return await self._serve_hit(opened, prep, call)
            member, answer = opened
            if prep.req.stream:
                reply = self._stream(member, answer, prep, call, watch)
                handed_over = True
                return reply
            member.outstanding -= 1  # the whole answer is in
            return await self._finish_completion(answer, member, prep, call)
        except asyncio.CancelledError:
            if not watch.absorb():
                raise
            call.disconnected = True
            raise errors.ClientDisconnected("The client closed the connection.") from None
        finally:
            if not handed_over:
                watch.stop()

    async def _open(self, prep: Prepared, call: Call) -> tuple[Member, Any]:
        """The first backend in the request's chain that answers: its whole completion (JSON), or its
        stream and first chunk. The member stays leased until the answer is over."""
        if not prep.req.stream:
            return await self.dispatch.first_success(prep.target, call, prep.body, chat)
        body = dict(prep.body)
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        return await self.dispatch.first_success(prep.target, call, body, open_stream)

    async def _race(
        self, prep: Prepared, call: Call, semantic: asyncio.Task[CacheResult]
    ) -> tuple[Member, Any] | CachedAnswer:
        """The backend starts while the semantic lookup finishes (cache.semantic.hedge): a miss, most
        lookups, waits for nothing more; a hit cancels the backend request, which by then has spent
        at most the lookup's wait on it, and is served instead."""
        opening = asyncio.ensure_future(self._open(prep, call))
        try:
            found = await semantic
        except BaseException:
            opening.cancel()
            await self._abandon(opening, prep)
            raise
        if found.answer is None:
            call.cache = found.status
            return await opening
        opening.cancel()
        await self._abandon(opening, prep)
        self.cache.stats.hedges_cancelled += 1
        return found.answer

    @staticmethod
    async def _abandon(opening: asyncio.Future[tuple[Member, Any]], prep: Prepared) -> None:
        """Wait for a cancelled backend attempt to end; if it had already answered, release it."""
        done: tuple[Member, Any] | BaseException
        (done,) = await asyncio.gather(opening, return_exceptions=True)
        if isinstance(done, tuple):
            member, answer = done
            member.outstanding -= 1
            if prep.req.stream:
                await answer[0].aclose()

    def choose_variant(self, model: str, request: Request, call: Call) -> tuple[Experiment, VariantSettings]:
        """The model (404 when unknown, 403 when the caller may not use it) and its A/B variant."""
        principal = call.principal
        assert principal is not None
        experiment = self.router.get(model)
        if experiment is None:
            raise errors.ModelNotFound(f"The model '{model[:100]}' does not exist.", param="model")
        self.auth.check_model(principal, model)
        key = sticky_key(
            experiment.settings.sticky_by,
            sub=principal.sub,
            tenant=principal.tenant,
            headers=request.headers,
            request_id=call.request_id,
        )
        variant = experiment.choose(key)
        call.variant = variant.name
        return experiment, variant

    async def _prepare(self, api: Api, request: Request, raw: bytes, call: Call) -> Prepared:
        parsed = api.parse(raw)
        principal = call.principal
        assert principal is not None
        await api.resolve(parsed, principal)
        req = parsed.chat
        call.model, call.stream = req.model, bool(req.stream)
        experiment, variant = self.choose_variant(req.model, request, call)
        client_body, restorer = await self.privacy.check_input(req.upstream_body(), len(raw), call.pii)
        body = apply_variant(client_body, variant)
        try:
            body, action = await self.guard.screen_input(body, len(raw))
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
        if restorer is not None and cache_key is not None:  # the semantic layer reads placeholders too
            req = restorer.cache_request(req, client_body)
        call.prompt_tokens = estimate_prompt_tokens(body["messages"])
        reserve = call.prompt_tokens + (req.completion_budget or DEFAULT_COMPLETION_RESERVE)
        free_if = self.cache.redis_field(cache_key) if cache_key is not None and decision.read else None
        admission = await self.limiter.admit(principal, reserve, free_if=free_if)
        call.headers.update(admission.headers)
        routing = experiment.settings.routing or self.settings.routing
        session = request.headers.get(routing.session_header) or (routing.session_from_user and req.user)
        target = Target(
            variant,
            routing,
            session or None,
            self.settings.limits.tier(principal.tier).priority,
            salt(principal.tenant) if experiment.settings.isolate_prefix_cache else None,
            req.completion_budget,
        )
        return Prepared(api, parsed, req, body, target, scope, decision, admission, cache_key, restorer)

    # -- cache hit --------------------------------------------------------------------------------
    async def _serve_hit(self, hit: CachedAnswer, prep: Prepared, call: Call) -> Reply:
        call.cache = hit.layer
        call.backend = "cache"
        call.completion_id = call.request_id  # replays carry the request id as their completion id
        rid, created, model = call.request_id, int(time.time()), prep.req.model
        self._set_route_headers(call)
        checked = self.guard.output_checked(hit.policy)  # stored filtered: re-check only if lists changed
        if prep.req.stream:
            chunks = replay_chunks(hit, request_id=rid, created=created, model=model, include_usage=False)
            filt = None if checked else self.guard.stream_filter()
            usage = usage_of(hit) or self._estimated_usage(call, 0)
            return SSEResponse(self._replay(chunks, usage, filt, prep, call), call.headers)
        completion = replay_completion(hit, request_id=rid, created=created, model=model)
        if not checked:
            completion = self._filter_output(completion, call)
        call.completion_tokens = int((completion.get("usage") or {}).get("completion_tokens", 0))
        if prep.admission.reserved:  # a semantic hit: refund; an exact hit reserved nothing
            self._spawn(prep.admission.settle(0))
        return await self._answer(completion, prep, call)

    async def _replay(
        self,
        chunks: list[dict[str, Any]],
        usage: dict[str, Any],
        filt: ChunkFilter | None,
        prep: Prepared,
        call: Call,
    ) -> AsyncIterator[bytes]:
        out = prep.api.renderer(prep.parsed)
        restore = prep.restorer.stream() if prep.restorer else None
        relay = Relay(out, filt, StreamTap(), prep.req.model, self.guard.stream_block_error, restore)
        try:
            call.ttft_s = time.monotonic() - call.started
            async for frame in relay.frames(_aiter(chunks), lambda: usage):
                if relay.tap.complete:  # the last frame: the API keeps the answer before it goes out
                    await self._keep(out.result(), prep, call)
                yield frame
        finally:
            self._count_stream_policy(filt, call)
            await prep.admission.settle(0)  # a cache hit costs the backends nothing
            self.observer.finish(call)

    # -- non-stream -------------------------------------------------------------------------------
    async def _finish_completion(
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
        return await self._answer(filtered, prep, call)

    # -- stream -----------------------------------------------------------------------------------
    def _stream(
        self, member: Member, opened: tuple[ChunkStream, dict[str, Any]], prep: Prepared, call: Call,
        watch: DisconnectWatch,
    ) -> SSEResponse:  # fmt: skip
        upstream, first = opened
        call.backend = member.name
        call.ttft_s = time.monotonic() - call.started
        call.completion_id = first.get("id")
        self._set_route_headers(call)
        return SSEResponse(self._relay(upstream, first, member, prep, call), call.headers, watch=watch)

    async def _relay(
        self, upstream: ChunkStream, first: dict[str, Any], member: Member, prep: Prepared, call: Call
    ) -> AsyncIterator[bytes]:
        tap, filt = StreamTap(policy=self.guard.output_stamp), self.guard.stream_filter()
        out = prep.api.renderer(prep.parsed)
        restore = prep.restorer.stream() if prep.restorer else None
        relay = Relay(out, filt, tap, prep.req.model, self.guard.stream_block_error, restore)
        chunks = chain_first(first, upstream)
        try:
            async for frame in relay.frames(chunks, lambda: self._final_usage(tap, call)):
                if tap.complete:  # the last frame: the API keeps the answer before it goes out
                    await self._keep(out.result(), prep, call)
                yield frame
        except BackendError as exc:
            failure: errors.GatewayError = (
                errors.GatewayTimeout("The model server stopped answering in time; the answer is incomplete.")
                if exc.cause is ErrorKind.TIMEOUT
                else errors.BadGateway("The model server failed while streaming; the answer is incomplete.")
            )
            call.status, call.error = failure.status, exc.kind.value
            yield out.error(failure)
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
    def _filter_output(self, completion: dict[str, Any], call: Call) -> dict[str, Any]:
        filtered, action = self.guard.filter_output(completion)
        if action:
            call.policy.append(f"output:{action}")
        return filtered

    def _count_stream_policy(self, filt: ChunkFilter | None, call: Call) -> None:
        if filt is not None and filt.hits:
            call.policy.append(f"output:{filt.action}")
            self.guard.stream_finished(filt)

    def _final_usage(self, tap: StreamTap, call: Call) -> dict[str, Any]:
        return tap.usage or self._estimated_usage(call, tap.completion_tokens)

    @staticmethod
    def _estimated_usage(call: Call, completion: int) -> dict[str, Any]:
        prompt = call.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _set_route_headers(self, call: Call) -> None:
        call.headers["x-gateway-cache"] = call.cache
        if call.variant:
            call.headers["x-gateway-variant"] = call.variant
        if call.backend:
            call.headers["x-gateway-backend"] = call.backend

    async def _answer(self, completion: dict[str, Any], prep: Prepared, call: Call) -> JSONBytesResponse:
        """A complete JSON answer in the API's shape, kept by the API before it goes out."""
        if prep.restorer is not None:  # after the cache store: the stored answer keeps placeholders
            completion = prep.restorer.completion(completion)
        rendered = prep.api.render(completion, prep.parsed)
        await self._keep(rendered, prep, call)
        return self._json(rendered, call)

    async def _keep(self, result: dict[str, Any] | None, prep: Prepared, call: Call) -> None:
        """Where the API keeps answers (Responses), the answer is kept before its last byte is
        sent: a client that continues at once, on any replica, finds it. Its id is the one the
        client saw (feedback maps it back to the variant)."""
        if result is None:
            return
        assert call.principal is not None
        call.completion_id = result.get("id") or call.completion_id
        kept = prep.api.completed(prep.parsed, call.principal, result)
        if kept is not None:
            await kept

    def _json(self, payload: dict[str, Any], call: Call) -> JSONBytesResponse:
        self.observer.finish(call)
        return JSONBytesResponse(dumps(payload), call.headers)

    def _spawn(self, coro: Any) -> None:
        self.observer.spawn(coro)


def _complete_choices(completion: dict[str, Any]) -> bool:
    choices = completion.get("choices") or []
    return bool(choices) and all(c.get("finish_reason") in ("stop", "length") for c in choices)


async def _aiter(chunks: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for chunk in chunks:
        yield chunk
