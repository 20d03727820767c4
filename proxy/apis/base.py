"""What every API translator provides: its request parsed into the internal chat form, and the
internal results (a chat.completion, chat.completion.chunk dicts) rendered as its own JSON, its own
SSE events and its own error shape. Translators do no I/O; the pipeline runs the stages."""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from starlette.datastructures import Headers

from proxy import errors
from proxy.protocol import ChatRequest

if TYPE_CHECKING:
    from proxy.auth.authenticator import Principal


@dataclass(slots=True)
class Parsed:
    """A request in the internal chat form, with what its API needs to render the answer."""

    chat: ChatRequest
    native: Any = None  # the API's own view of the request (e.g. Responses' input items)


class StreamRenderer(Protocol):
    """One per streamed answer: internal chunks in, the API's SSE bytes out."""

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        """One internal chat.completion.chunk (choices non-empty) -> zero or more events."""
        ...

    def end(self, usage: dict[str, Any]) -> bytes:
        """After the last chunk of a complete answer: the usage and the stream's terminator."""
        ...

    def error(self, exc: errors.GatewayError) -> bytes:
        """After the first byte, a failure ends the stream as an error event (no terminator)."""
        ...

    def result(self) -> dict[str, Any] | None:
        """After `end`: the whole answer as the API's JSON object, where the API keeps answers
        (Responses); None otherwise."""
        ...


class Api(Protocol):
    """A client-facing API: `name` labels the log line and metrics (the endpoint)."""

    name: str

    def credentials(self, headers: Headers) -> list[str]:
        """The Authorization header values the JWT may come in (e.g. x-api-key as a Bearer)."""
        ...

    def parse(self, raw: bytes) -> Parsed:
        """The body -> the internal chat form; errors.InvalidRequest (its own wording) when invalid."""
        ...

    async def resolve(self, parsed: Parsed, principal: Principal) -> None:
        """Complete `parsed.chat` with what the request refers to and the API keeps (Responses: the
        conversation so far, by previous_response_id); nothing for most APIs."""
        ...

    def completed(
        self, parsed: Parsed, principal: Principal, result: dict[str, Any]
    ) -> Awaitable[None] | None:
        """A complete answer (`render`'s or the stream renderer's `result`) was delivered: keep
        what later requests may refer to. None when the API keeps nothing."""
        ...

    def render(self, completion: dict[str, Any], parsed: Parsed) -> dict[str, Any]:
        """An internal chat.completion (already policy-filtered) -> the API's JSON answer."""
        ...

    def renderer(self, parsed: Parsed) -> StreamRenderer:
        ...

    def error_body(self, exc: errors.GatewayError) -> bytes:
        """The API's JSON error body for a failure before any byte of the answer."""
        ...


class Stateless:
    """Defaults for an API that takes the JWT as a Bearer token, keeps nothing between requests and
    answers errors in OpenAI's shape; a translator overrides what differs."""

    def credentials(self, headers: Headers) -> list[str]:
        return headers.getlist("authorization")

    async def resolve(self, parsed: Parsed, principal: Principal) -> None:
        return None

    def completed(self, parsed: Parsed, principal: Principal, result: dict[str, Any]) -> None:
        return None

    def error_body(self, exc: errors.GatewayError) -> bytes:
        return exc.json()
