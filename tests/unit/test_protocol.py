"""proxy.protocol.parse_chat_request reads a body as json.loads reads bytes (the encoding detected,
a UTF-8 byte-order mark allowed) and refuses duplicate keys at any depth."""

from __future__ import annotations

import json

import orjson
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


def _refusal(**fields: object) -> RequestValidationError:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(RequestValidationError) as info:
        parse_chat_request(orjson.dumps(body))
    return info.value


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"max_tokens": "16"}, "max_tokens"),
        ({"temperature": "0.5"}, "temperature"),
        ({"logprobs": "true"}, "logprobs"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_values_are_checked_as_json_types_and_the_error_names_the_parameter(
    fields: dict[str, object], param: str
) -> None:
    """OpenAI refuses "stream": "yes" rather than reading it as true, and names the parameter."""
    err = _refusal(**fields)
    assert err.param == param, err.message
    assert param in err.message


def test_integers_are_still_numbers() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1, "stop": ["a"] * 4}
    req = parse_chat_request(orjson.dumps(body))
    assert req.temperature == 1.0 and req.stop == ["a"] * 4
