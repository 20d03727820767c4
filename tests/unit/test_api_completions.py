"""/v1/completions: the translator (proxy/apis/completions.py) and the backend seam
(backends/text_completion.py). A prompt becomes the internal chat form marked raw, which keeps it
apart from chat in the cache and sends it to the completions route; text chunks become chat
chunks and back, log probabilities included."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from backends.base import RAW_PROMPT, raw_prompt
from backends.text_completion import chat_chunk, completion_body
from proxy import errors
from proxy.apis.completions import CompletionRenderer, CompletionsApi
from proxy.cache.response_cache import CacheScope, exact_key
from proxy.protocol import RawPromptRequest, RequestValidationError, parse_chat_request

API = CompletionsApi()


def parse(body: dict[str, Any]) -> RawPromptRequest:
    chat = API.parse(orjson.dumps({"model": "m", **body})).chat
    assert isinstance(chat, RawPromptRequest)
    return chat


def frames(raw: bytes) -> list[Any]:
    return [orjson.loads(f[6:]) if f != b"data: [DONE]" else "[DONE]" for f in raw.split(b"\n\n") if f]


# -- the request --------------------------------------------------------------------------------------
def test_a_prompt_becomes_one_raw_user_turn_with_openais_default_length() -> None:
    req = parse({"prompt": "Once upon", "user": "u1", "seed": 7, "stop": ["\n"]})
    assert req.upstream_body() == {
        "model": "m", "messages": [{"role": "user", "content": "Once upon"}], "seed": 7, "stop": ["\n"],
        "max_tokens": 16, RAW_PROMPT: True,
    }
    assert req.user == "u1"  # kept for session routing, never forwarded


def test_a_list_holding_one_prompt_is_that_prompt() -> None:
    assert parse({"prompt": ["only one"]}).messages[0].content == "only one"


def test_logprobs_become_chats_top_logprobs() -> None:
    body = parse({"prompt": "x", "logprobs": 3, "max_tokens": 4}).upstream_body()
    assert (body["logprobs"], body["top_logprobs"], body["max_tokens"]) == (True, 3, 4)


def test_stream_options_follow_the_stream() -> None:
    req = parse({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    assert req.stream and req.include_usage


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": ["a", "b"]}, "prompt", "one prompt per request"),
        ({"prompt": [1, 2, 3]}, "prompt", "token-id prompts are not supported"),
        ({"prompt": [[1, 2]]}, "prompt", "token-id prompts are not supported"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": {"text": "x"}}, "prompt", "valid string"),
        ({}, "prompt", "Missing required parameter"),
        ({"prompt": "x", "echo": True}, "echo", "echo is not supported"),
        ({"prompt": "x", "suffix": "y"}, "suffix", "suffix is not supported"),
        ({"prompt": "x", "logprobs": 6}, "logprobs", "less than or equal to 5"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
        ({"prompt": "x", "best_of": 2}, "best_of", "Unrecognized request argument"),
        ({"prompt": "x", "messages": []}, "messages", "Unrecognized request argument"),
        ({"prompt": "x", "raw_prompt": False}, "raw_prompt", "Unrecognized request argument"),
    ],
)
def test_what_is_refused_names_the_parameter(body: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        parse(body)
    assert info.value.param == param and words in info.value.message


def test_a_chat_client_cannot_mark_its_request_raw() -> None:
    with pytest.raises(RequestValidationError, match="Unrecognized request argument supplied: raw_prompt"):
        parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "raw_prompt": true}')


def test_a_prompt_and_a_chat_turn_of_the_same_text_never_share_a_cache_entry() -> None:
    chat = parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 16}')
    scope = CacheScope(tenant="t", model="m", variant="a")
    assert exact_key(scope, chat.upstream_body()) != exact_key(scope, parse({"prompt": "x"}).upstream_body())


# -- the backend seam -----------------------------------------------------------------------------------
def test_the_internal_body_becomes_a_completions_body() -> None:
    internal = {
        "model": "served", "messages": [{"role": "system", "content": "variant prompt"}, {"role": "user", "content": "Hi"}],
        RAW_PROMPT: True, "max_tokens": 9, "logprobs": True, "top_logprobs": 2, "stream": True,
        "stream_options": {"include_usage": True}, "cache_salt": "s", "priority": 1, "temperature": 0,
    }
    assert raw_prompt(internal) == "Hi"  # the user's prompt, whatever a variant prepended
    assert completion_body(internal) == {
        "model": "served", "prompt": "Hi", "max_tokens": 9, "logprobs": 2, "stream": True,
        "stream_options": {"include_usage": True}, "cache_salt": "s", "priority": 1, "temperature": 0,
    }
    assert raw_prompt({"messages": [{"role": "user", "content": "Hi"}]}) is None  # chat


def test_a_text_chunk_becomes_a_chat_chunk() -> None:
    text = {
        "id": "cmpl-1", "object": "text_completion", "created": 5, "model": "served",
        "choices": [{"index": 0, "text": " Hello", "finish_reason": "stop", "stop_reason": None,
                     "logprobs": {"tokens": [" Hello"], "token_logprobs": [-0.5], "top_logprobs": [{" Hello": -0.5, " Hi": -1.5}],
                                  "text_offset": [3]}}],
    }
    assert chat_chunk(text) == {
        "id": "cmpl-1", "created": 5, "model": "served", "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": " Hello"}, "finish_reason": "stop", "logprobs": {"content": [
            {"token": " Hello", "logprob": -0.5, "bytes": None, "top_logprobs": [
                {"token": " Hello", "logprob": -0.5, "bytes": None}, {"token": " Hi", "logprob": -1.5, "bytes": None}]}]}}],
    }
    usage = {"prompt_tokens": 2, "total_tokens": 3, "completion_tokens": 1}
    assert chat_chunk({"id": "cmpl-1", "choices": [], "usage": usage})["usage"] == usage
    assert chat_chunk({"choices": [{"index": 0, "text": ""}]})["choices"][0]["delta"] == {}


@pytest.mark.parametrize("chunk", [{"choices": None}, {"choices": ["x"]}, {"choices": [{"text": 3}]}])
def test_a_chunk_that_is_not_a_text_completion_is_refused(chunk: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        chat_chunk(chunk)


# -- the answer -------------------------------------------------------------------------------------
LOGPROBS = {"content": [
    {"token": "Hel", "logprob": -0.1, "bytes": None, "top_logprobs": [{"token": "Hel", "logprob": -0.1, "bytes": None}]},
    {"token": "lo", "logprob": -0.2, "bytes": None, "top_logprobs": []},
]}


def test_a_chat_completion_renders_as_a_text_completion() -> None:
    completion = {
        "id": "cmpl-1", "object": "chat.completion", "created": 5, "model": "public",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": LOGPROBS,
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
    }
    assert API.render(completion, API.parse(b'{"model": "public", "prompt": "x"}')) == {
        "id": "cmpl-1", "object": "text_completion", "created": 5, "model": "public",
        "choices": [{"index": 0, "text": "Hello", "finish_reason": "length", "logprobs": {
            "tokens": ["Hel", "lo"], "token_logprobs": [-0.1, -0.2], "top_logprobs": [{"Hel": -0.1}, {}],
            "text_offset": [0, 3]}}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
    }


def _chunk(index: int, delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    return {"id": "cmpl-1", "object": "chat.completion.chunk", "created": 5, "model": "public", "choices": [choice]}


def test_a_stream_renders_text_chunks_and_skips_empty_ones() -> None:
    out = CompletionRenderer(include_usage=True)
    assert out.chunk(_chunk(0, {"role": "assistant", "content": ""})) == b""
    first = frames(out.chunk(_chunk(0, {"content": "Hel"}, logprobs={"content": LOGPROBS["content"][:1]})))
    second = frames(out.chunk(_chunk(0, {"content": "lo"}, "stop", {"content": LOGPROBS["content"][1:]})))
    assert first == [{"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "public", "choices": [
        {"index": 0, "text": "Hel", "finish_reason": None,
         "logprobs": {"tokens": ["Hel"], "token_logprobs": [-0.1], "top_logprobs": [{"Hel": -0.1}], "text_offset": [0]}}]}]
    assert second[0]["choices"][0]["logprobs"]["text_offset"] == [3]  # counted on from the first chunk
    assert second[0]["choices"][0]["finish_reason"] == "stop"
    usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    assert frames(out.end(usage)) == [
        {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "public", "choices": [], "usage": usage},
        "[DONE]",
    ]


def test_each_choice_keeps_its_own_offsets_and_usage_only_when_asked() -> None:
    out = CompletionRenderer(include_usage=False)
    out.chunk(_chunk(0, {"content": "abc"}))
    lp = {"content": [{"token": "d", "logprob": -1.0, "top_logprobs": []}]}
    assert frames(out.chunk(_chunk(1, {"content": "d"}, logprobs=lp)))[0]["choices"][0]["logprobs"]["text_offset"] == [0]
    assert frames(out.chunk(_chunk(0, {"content": "d"}, logprobs=lp)))[0]["choices"][0]["logprobs"]["text_offset"] == [3]
    assert out.end({}) == b"data: [DONE]\n\n"


def test_a_failure_after_the_first_byte_is_an_error_event() -> None:
    frame = CompletionRenderer(include_usage=True).error(errors.BadGateway("gone"))
    assert frames(frame) == [{"error": {"message": "gone", "type": "server_error", "param": None, "code": "bad_gateway"}}]
