"""The backends stage: which backends a request tries and in what order (the pool's routing
policy), what each is sent (its model id, the tenant's cache_salt, the tier's priority, max_tokens
fitted to its context), the fallback walk, and what the client is told when no backend answers.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from backends.affinity import request_key
from backends.base import BackendError, ChunkStream, ErrorKind
from backends.pool import Exhausted, Member, Placements, first_success, route, shed_retry_after
from backends.vllm import VllmBackend
from proxy import errors
from proxy.call import Call
from proxy.settings import RoutingSettings, VariantSettings

T = TypeVar("T")
Attempt = Callable[[Member, dict[str, Any]], Awaitable[T]]
_UNAVAILABLE_KINDS = frozenset({ErrorKind.CONNECT, ErrorKind.OVERLOADED, ErrorKind.RATE_LIMITED})


@dataclass(slots=True, frozen=True)
class Target:
    """Where one request may go, decided once per request (not again per attempt)."""

    variant: VariantSettings
    routing: RoutingSettings  # the model's routing (its own keys over the top-level section)
    session: str | None  # the conversation's name: the session header's value, or `user`
    priority: int  # the caller's tier's priority (vLLM's: lower runs first)
    salt: str | None  # vLLM's cache_salt for this tenant, when the model isolates prefix caches
    max_tokens: int | None  # the client's own completion limit (a variant's default is fitted)


class Dispatch:
    def __init__(self, members: dict[str, Member]) -> None:
        self.members = members
        self.placements = Placements()  # where each affinity key's first request went lately

    async def first_success(
        self, target: Target, call: Call, body: dict[str, Any], attempt: Attempt[T]
    ) -> tuple[Member, T]:
        """The pool's fallback walk over this request's chain, each backend sent its own body.
        The winner stays leased: the caller releases `outstanding` when the answer is over."""

        async def attempt_one(member: Member) -> T:
            return await attempt(member, self._forward_body(body, member, target, call))

        def failed(_member: Member, exc: BackendError) -> None:
            call.fallback_reasons.append(exc.kind.value)

        try:
            return await first_success(self._chain(target, body, call), attempt_one, failed)
        except Exhausted as exc:
            message = "No backend for this model can take the request right now."
            raise failure_error(exc.last, lambda: self.unavailable(_names(target.variant), message)) from None

    def unavailable(self, names: Iterable[str], message: str) -> errors.ServiceUnavailable:
        """503 with an honest retry-after: the soonest any of these backends may take work again."""
        wait = min(self.members[n].retry_after() for n in names)
        return errors.ServiceUnavailable(message, headers={"retry-after": str(max(1, math.ceil(wait)))})

    def _chain(self, target: Target, body: dict[str, Any], call: Call) -> Sequence[Member]:
        """The backends to try, by the model's routing policy (backends/pool.py `route`): its key
        is the request's session or conversation head, hashed once here."""
        cfg, variant = target.routing, target.variant
        key, home = 0, None
        if cfg.policy == "affinity":
            key = request_key(target.salt or "", body["messages"], target.session, cfg.prefix_tokens)
            home = self.placements.home(key)
        plan = route(self.members, variant.backends, variant.fallback, cfg, key, target.priority, home=home)
        first = plan.chain[0].name if plan.chain else None
        if cfg.policy == "affinity" and home is None and first in variant.backends:
            self.placements.place(key, first)
        call.route = plan.how
        for name in (*variant.backends, *variant.fallback):
            member = self.members[name]
            if member not in plan.chain:
                call.fallback_reasons.append("shed" if member.usable() else member.skip_reason())
        if not plan.chain and plan.how == "shed":
            wait = shed_retry_after((self.members[n] for n in variant.backends), plan.reason)
            raise errors.ServiceUnavailable(
                "The model's servers are saturated; requests of this tier wait until they recover.",
                headers={"retry-after": str(wait)},
            )
        if not plan.chain:
            raise self.unavailable(_names(variant), "No backend for this model is available right now.")
        return plan.chain

    def _forward_body(
        self, body: dict[str, Any], member: Member, target: Target, call: Call
    ) -> dict[str, Any]:
        """The body for one backend: its own model id, and, where the backend counts the prompt's
        tokens itself (llama.cpp), max_tokens fitted to its context (a client's max_tokens beyond
        it is a 400 naming the parameter, as vLLM answers). An estimate is never used for this: an
        under-estimate would fill in a limit the server refuses."""
        call.tried.append(member.name)
        fwd = dict(body)
        fwd["model"] = member.backend.model
        if target.salt is not None and isinstance(member.backend, VllmBackend):
            fwd["cache_salt"] = target.salt
        if member.send_priority:
            fwd["priority"] = target.priority
        ctx = member.backend.context_length
        prompt = member.backend.count_tokens(body["messages"]) if ctx is not None else None
        if ctx is None or prompt is None:  # only the server knows its count: it checks (vLLM's 400)
            return fwd
        room = ctx - prompt
        if room < 1:
            raise errors.InvalidRequest(
                f"This model's maximum context length is {ctx} tokens; the messages use {prompt}.",
                param="messages",
                code="context_length_exceeded",
            )
        key = "max_completion_tokens" if "max_completion_tokens" in fwd else "max_tokens"
        if target.max_tokens is not None and target.max_tokens > room:
            raise errors.InvalidRequest(
                f"This model's maximum context length is {ctx} tokens and the messages use {prompt}: "
                f"{key} can be at most {room}, not {target.max_tokens}.",
                param=key,
                code="context_length_exceeded",
            )
        fwd[key] = min(int(fwd.get(key) or room), room)
        return fwd


def _names(variant: VariantSettings) -> tuple[str, ...]:
    return (*variant.backends, *variant.fallback)


def failure_error(
    last: BackendError | None, unavailable: Callable[[], errors.ServiceUnavailable]
) -> errors.GatewayError:
    """The one mapping (every endpoint's) from how the last backend failed to what the client is
    told: no backend able to take the request is an overload (`unavailable`: 503 + when to retry);
    504 when the last one ran out of time; 502 only when a backend answered with something invalid."""
    kind = last.kind if last is not None else ErrorKind.OVERLOADED
    if last is not None and kind is ErrorKind.BAD_REQUEST:
        return errors.InvalidRequest(last.message, param=last.param)
    if kind is ErrorKind.TIMEOUT:
        return errors.GatewayTimeout("The model server did not answer in time.")
    if kind in _UNAVAILABLE_KINDS or (last is not None and last.status == 503):
        return unavailable()
    return errors.BadGateway("The model server failed; no fallback could answer.")


@functools.lru_cache(maxsize=4096)
def salt(tenant: str) -> str:
    """vLLM's cache_salt for a tenant: distinct per tenant, and not the tenant's name itself."""
    return hashlib.blake2b(tenant.encode(), digest_size=16, person=b"llmgw-kv-salt").hexdigest()


async def chat(member: Member, body: dict[str, Any]) -> dict[str, Any]:
    return await member.backend.chat(body)


async def open_stream(member: Member, body: dict[str, Any]) -> tuple[ChunkStream, dict[str, Any]]:
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


async def chain_first(first: dict[str, Any], upstream: ChunkStream) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for chunk in upstream:
        yield chunk
