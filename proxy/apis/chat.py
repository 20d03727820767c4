"""OpenAI chat completions: the internal form is this API's own, so the translator only frames."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from proxy import errors
from proxy.apis.base import Parsed, Stateless
from proxy.protocol import DONE_FRAME, RequestValidationError, chunk_frame, parse_chat_request

if TYPE_CHECKING:
    pass


class ChatRenderer:
    __slots__ = ("_first", "_include_usage")

    def __init__(self, include_usage: bool) -> None:
        self._include_usage = include_usage
        self._first: dict[str, Any] | None = None

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        if self._first is None:
            self._first = chunk
        return chunk_frame(chunk)

    def end(self, usage: dict[str, Any]) -> bytes:
        if not self._include_usage:
            return DONE_FRAME
        first = self._first or {}
        final: dict[str, Any] = {
            "id": first.get("id"),
            "object": "chat.completion.chunk",
            "created": first.get("created"),
            "model": first.get("model"),
            "choices": [],
            "usage": usage,
        }
        return chunk_frame(final) + DONE_FRAME

    def error(self, exc: errors.GatewayError) -> bytes:
        return exc.sse_frame()

    def result(self) -> None:
        return None


class ChatApi(Stateless):
    name = "chat"

    def parse(self, raw: bytes) -> Parsed:
        try:
            return Parsed(parse_chat_request(raw))
        except RequestValidationError as exc:
            raise errors.InvalidRequest(exc.message, param=exc.param) from None

    def render(self, completion: dict[str, Any], parsed: Parsed) -> dict[str, Any]:
        return completion

    def renderer(self, parsed: Parsed) -> ChatRenderer:
        return ChatRenderer(parsed.chat.include_usage)

