"""proxy.edge.read_body over ASGI messages: parts joined, 413 as soon as the size is known to be
too large, a disconnect before the end is ClientDisconnected (not an internal error)."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.requests import Request

from proxy import errors
from proxy.edge import read_body


def _request(messages: list[dict[str, Any]], headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    pending = iter(messages)

    async def receive() -> dict[str, Any]:
        return next(pending)

    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers or []}, receive)


def _part(body: bytes, more: bool) -> dict[str, Any]:
    return {"type": "http.request", "body": body, "more_body": more}


async def test_parts_are_joined_in_order() -> None:
    request = _request([_part(b'{"a":', True), _part(b"", True), _part(b" 1}", False)])
    assert await read_body(request, 100, 5) == b'{"a": 1}'


async def test_a_body_over_the_limit_is_refused_by_its_header_or_as_soon_as_it_grows_past_it() -> None:
    with pytest.raises(errors.PayloadTooLarge):
        await read_body(_request([], [(b"content-length", b"101")]), 100, 5)
    parts = [_part(b"x" * 60, True), _part(b"x" * 60, True), _part(b"x", False)]
    request = _request(parts)
    with pytest.raises(errors.PayloadTooLarge):
        await read_body(request, 100, 5)
    assert await request.receive() is parts[2]  # refused at the second part: the third is never read


async def test_a_client_gone_before_the_end_of_its_body_is_a_disconnect() -> None:
    with pytest.raises(errors.ClientDisconnected) as info:
        await read_body(_request([_part(b"{", True), {"type": "http.disconnect"}]), 100, 5)
    assert info.value.status == 499
