"""OpenAI Responses (`POST /v1/responses`, `GET`/`DELETE /v1/responses/{id}`) with conversations kept
by the gateway: a request naming `previous_response_id` continues the stored chain of responses.

The translator does no I/O itself: the response store is injected (`ResponseStore`, implemented in
proxy/conversations.py). `resolve` loads the chain and rebuilds the conversation in the internal chat
form (this request's instructions, every earlier turn's input and output items, then this input;
earlier instructions are not carried over, as at OpenAI); `completed` stores the delivered response
unless the request said `store: false`. Wire format: responses_request.py (parse), responses_render.py.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from starlette.datastructures import Headers

from proxy import errors
from proxy.apis.base import Parsed
from proxy.apis.responses_render import ResponsesStream, envelope, render_completion
from proxy.apis.responses_request import (
    ResponsesRequest,
    chat_request,
    input_items,
    parse_request,
    to_messages,
)

if TYPE_CHECKING:
    from proxy.auth.authenticator import Principal

RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{32}$")  # ours; any other id is unknown without a lookup


@dataclass(frozen=True, slots=True)
class StoredTurn:
    """What is kept of one response: the Response object as the client got it, and its request's
    input items (the conversation is rebuilt from these alone)."""

    response: dict[str, Any]
    input: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Chain:
    """A conversation up to a stored response: its turns and their ids, oldest first."""

    turns: list[StoredTurn]
    ids: list[str]


class ResponseStore(Protocol):
    async def chain(self, tenant: str, response_id: str) -> Chain | None:
        """The chain ending at `response_id`; None when the tenant has no such response.
        errors.InvalidRequest when an earlier link is gone or the chain is at its maximum length."""
        ...

    async def put(self, tenant: str, response_id: str, turn: StoredTurn, ancestors: list[str]) -> None:
        """Keep a response whose chain before it is `ancestors`. Never raises (a failure is logged)."""
        ...

    async def get(self, tenant: str, response_id: str) -> dict[str, Any] | None: ...

    async def delete(self, tenant: str, response_id: str) -> bool: ...


@dataclass(slots=True)
class Turn:
    """Parsed.native for this API: the request, its input items, the Response object's envelope
    (id, created_at, echoed parameters) and, once resolved, the ids of the chain it continues."""

    request: ResponsesRequest
    input: list[dict[str, Any]]
    envelope: dict[str, Any]
    chain: list[str] = field(default_factory=list)


def new_response_id() -> str:
    return f"resp_{os.urandom(16).hex()}"


class ResponsesApi:
    name = "responses"

    def __init__(
        self,
        store: Callable[[], ResponseStore],
        *,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = new_response_id,
    ) -> None:
        self._store, self._clock, self._new_id = store, clock, new_id

    def credentials(self, headers: Headers) -> list[str]:
        return headers.getlist("authorization")

    def parse(self, raw: bytes) -> Parsed:
        req = parse_request(raw)
        items = input_items(req)
        turn = Turn(req, items, envelope(req, self._new_id(), int(self._clock())))
        return Parsed(chat_request(req, to_messages(items)), turn)

    async def resolve(self, parsed: Parsed, principal: Principal) -> None:
        turn: Turn = parsed.native
        previous = turn.request.previous_response_id
        if previous is None:
            return
        chain = await self._store().chain(principal.tenant, previous) if RESPONSE_ID.match(previous) else None
        if chain is None:  # another tenant's response is not found either
            raise errors.InvalidRequest(
                f"Previous response with id '{previous[:100]}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        earlier = [item for t in chain.turns for item in (*t.input, *t.response.get("output", ()))]
        turn.chain = chain.ids
        parsed.chat = chat_request(turn.request, to_messages(earlier) + to_messages(turn.input))

    def completed(
        self, parsed: Parsed, principal: Principal, result: dict[str, Any]
    ) -> Awaitable[None] | None:
        turn: Turn = parsed.native
        if turn.request.store is False:
            return None
        return self._store().put(principal.tenant, result["id"], StoredTurn(result, turn.input), turn.chain)

    def render(self, completion: dict[str, Any], parsed: Parsed) -> dict[str, Any]:
        return render_completion(completion, parsed.native.envelope)

    def renderer(self, parsed: Parsed) -> ResponsesStream:
        return ResponsesStream(parsed.native.envelope)

    def error_body(self, exc: errors.GatewayError) -> bytes:
        return exc.json()

    # -- GET / DELETE /v1/responses/{id} -----------------------------------------------------------
    async def retrieve(self, principal: Principal, response_id: str) -> dict[str, Any]:
        known = RESPONSE_ID.match(response_id)
        found = await self._store().get(principal.tenant, response_id) if known else None
        if found is None:
            raise _not_found(response_id)
        return found

    async def delete(self, principal: Principal, response_id: str) -> dict[str, Any]:
        deleted = RESPONSE_ID.match(response_id) and await self._store().delete(principal.tenant, response_id)
        if not deleted:
            raise _not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}


def _not_found(response_id: str) -> errors.NotFound:
    return errors.NotFound(f"Response with id '{response_id[:100]}' not found.", param="response_id")
