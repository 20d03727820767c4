"""proxy.protocol.parse_chat_request reads a body as json.loads reads bytes (the encoding detected,
a UTF-8 byte-order mark allowed) and refuses duplicate keys at any depth."""

from __future__ import annotations

import json

import pytest

from proxy.protocol import RequestValidationError, parse_chat_request

TEXT = '{"model": "assistant", "messages": [{"role": "user", "content": "你好, café"}]}'


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-32"])
def test_every_encoding_json_loads_reads_is_read_the_same(encoding: str) -> None:
    raw = TEXT.encode(encoding)
    assert json.loads(raw)["messages"][0]["content"] == "你好, café"
    assert parse_chat_request(raw).messages[0].content == "你好, café"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"model": "a", "model": "b", "messages": []}', "The JSON body has a duplicate key."),
        (b'{"model": "a", "messages": [{"role": "user", "content": "x", "content": "y"}]}',
         "The JSON body has a duplicate key."),
        (b'{"model": "a", "messages": [{"role": "user", "content": "\xff"}]}',
         "We could not parse the JSON body of your request. The body must be valid JSON."),
        (b'{"model": "a",', "We could not parse the JSON body of your request. The body must be valid JSON."),
        (b'["model"]', "The request body must be a JSON object."),
    ],
)
def test_bodies_that_are_not_one_unambiguous_json_object_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(RequestValidationError) as info:
        parse_chat_request(raw)
    assert info.value.message == message and info.value.param is None
