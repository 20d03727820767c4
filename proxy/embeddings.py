"""The stages of `POST /v1/embeddings`, run on the Gateway's parts: authenticate, read and parse
the body, the model and its allow-list, the A/B variant, the input policy over every input text,
the request and token limits (tokens: an estimate of the input, settled to the backend's count),
the fallback walk before the first byte over the variant's backends that embed (backends/pool.py
`first_success`, least outstanding first), the disconnect watch, metrics and the log line
(endpoint "embeddings").

No cache, stream or output policy: a vector carries no text to check. A variant whose backends
include none that embeds (the embedded llama.cpp chat model does not) answers 400.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

from starlette.requests import Request

from backends.base import BackendError, Body, EmbeddingBackend
from backends.pool import Exhausted, Member, attempt_order, first_success
from proxy import errors
from proxy.apis.embeddings import Embedded, EmbeddingRequest, EmbeddingsApi
from proxy.call import Call
from proxy.dispatch import failure_error
from proxy.edge import read_body
from proxy.protocol import dumps, estimate_prompt_tokens
from proxy.settings import VariantSettings
from proxy.streaming import DisconnectWatch, JSONBytesResponse

if TYPE_CHECKING:
    from proxy.pipeline import Gateway


async def embed(gw: Gateway, api: EmbeddingsApi, request: Request, call: Call) -> JSONBytesResponse:
    """One embeddings request through its stages; errors are GatewayErrors (the edge renders them)."""
    call.principal = principal = await gw.auth.authenticate(api.credentials(request.headers))
    server = gw.settings.server
    raw = await read_body(request, server.max_body_bytes, server.body_timeout_s)
    req = api.parse(raw)
    call.model = req.model
    _, variant = gw.choose_variant(req.model, request, call)
    pool, fallback = _embedders(gw, req.model, variant)
    inputs = await _checked_input(gw, req, len(raw), call)
    call.prompt_tokens = estimate_prompt_tokens([{"content": text} for text in inputs])
    admission = await gw.limiter.admit(principal, call.prompt_tokens)
    call.headers.update(admission.headers)
    try:
        embedded = await _from_backends(gw, req.body(inputs), (pool, fallback), request, call)
    except BaseException:
        await admission.settle(call.prompt_tokens)
        raise
    if embedded.prompt_tokens is not None:
        call.prompt_tokens = embedded.prompt_tokens
    gw.observer.spawn(admission.settle(call.prompt_tokens))
    call.headers["x-gateway-cache"] = call.cache  # "bypass": embeddings are never cached
    call.headers["x-gateway-variant"] = variant.name
    call.headers["x-gateway-backend"] = call.backend or ""
    gw.observer.finish(call)
    return JSONBytesResponse(dumps(api.render(embedded, req.model, call.prompt_tokens)), call.headers)


def _embedders(gw: Gateway, model: str, variant: VariantSettings) -> tuple[list[str], list[str]]:
    """The variant's pool and fallback list, less the backends that cannot embed (400 if none is
    left: the request is wrong for this model, not the servers down)."""

    def embeds(name: str) -> bool:
        return isinstance(gw.members[name].backend, EmbeddingBackend)

    pool = [n for n in variant.backends if embeds(n)]
    fallback = [n for n in variant.fallback if embeds(n)]
    if not pool and not fallback:
        raise errors.InvalidRequest(
            f"The model '{model[:100]}' does not support embeddings.", param="model", code="unsupported_model"
        )
    return pool, fallback


async def _checked_input(gw: Gateway, req: EmbeddingRequest, size: int, call: Call) -> list[str]:
    """The input policy over every text (as the user turns of a chat body): block refuses the
    request before any backend sees it, mask forwards the masked texts. Personal data first, as in
    the pipeline (proxy/privacy.py)."""
    texts = await gw.privacy.check_texts(req.input, size, call.pii)
    body: dict[str, Any] = {"messages": [{"role": "user", "content": text} for text in texts]}
    try:
        body, action = await gw.guard.screen_input(body, size)
    except errors.ContentFiltered as exc:
        call.policy.append("input:block")
        raise errors.ContentFiltered(exc.message, param="input") from None
    if action:
        call.policy.append(f"input:{action}")
    return [message["content"] for message in body["messages"]]


async def _from_backends(
    gw: Gateway, body: Body, names: tuple[list[str], list[str]], request: Request, call: Call
) -> Embedded:
    """The first backend of the chain that answers; a client that leaves cancels the upstream."""
    assert call.principal is not None
    priority = gw.settings.limits.tier(call.principal.tier).priority
    chain = _chain(gw, *names, call)

    async def attempt(member: Member) -> Body:
        call.tried.append(member.name)
        backend = cast(EmbeddingBackend, member.backend)  # _embedders kept no other kind
        fwd = {**body, "model": backend.model}
        if member.send_priority:
            fwd["priority"] = priority
        return await backend.embeddings(fwd)

    def failed(_member: Member, exc: BackendError) -> None:
        call.fallback_reasons.append(exc.kind.value)

    watch = DisconnectWatch(request.receive).start()
    try:
        member, answer = await first_success(chain, attempt, failed)
    except Exhausted as exc:
        everyone = (*names[0], *names[1])
        message = "No backend for this model can take the request right now."
        raise failure_error(exc.last, lambda: gw.dispatch.unavailable(everyone, message)) from None
    except asyncio.CancelledError:
        if not watch.absorb():
            raise
        call.disconnected = True
        raise errors.ClientDisconnected("The client closed the connection.") from None
    finally:
        watch.stop()
    member.outstanding -= 1
    call.backend = member.name
    return EmbeddingsApi.embedded(answer)


def _chain(gw: Gateway, pool: list[str], fallback: list[str], call: Call) -> list[Member]:
    """The usable embedding backends: the pool least outstanding first, then the fallbacks."""
    chain = attempt_order(gw.members, pool, fallback)
    for name in (*pool, *fallback):
        if (member := gw.members[name]) not in chain:
            call.fallback_reasons.append(member.skip_reason())
    if not chain:
        raise gw.dispatch.unavailable((*pool, *fallback), "No backend for this model is available right now.")
    call.route = "least_loaded"
    return chain
