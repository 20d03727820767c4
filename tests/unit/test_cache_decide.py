"""proxy.cache.response_cache: what may be cached (decide), request keys, stored form and replay. Pure, table-driven."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.cache.replay import decode, encode, is_complete
from proxy.cache.response_cache import (
    CachedAnswer,
    CacheScope,
    chunks_to_completion,
    completion_to_chunks,
    decide,
    exact_key,
    replay_chunks,
    replay_completion,
    semantic_part,
    user_turn,
)
from proxy.protocol import ChatRequest
from proxy.settings import CacheSettings, ModelSettings

USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def req(**kw: Any) -> ChatRequest:
    body: dict[str, Any] = {"model": "assistant", "messages": [{"role": "user", "content": "hi"}]}
    return ChatRequest.model_validate(body | kw)


def model(*, cache_sampled: bool = False, temperature: float | None = None) -> ModelSettings:
    variant = {"name": "a", "weight": 1, "backends": ["b"], "defaults": {"temperature": temperature}}
    return ModelSettings.model_validate({"cache_sampled": cache_sampled, "variants": [variant]})


TOOL = {"type": "function", "function": {"name": "f", "parameters": {}}}
TOOL_MSGS = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "42"},
]


@pytest.mark.parametrize(
    ("request_kw", "headers", "model_kw", "settings_kw", "expected"),
    [
        ({"temperature": 0}, {}, {}, {}, (True, True, None)),
        ({}, {}, {}, {}, (False, False, "temperature>0")),  # unset: the backend default samples
        ({}, {}, {"temperature": 0}, {}, (True, True, None)),  # ... unless every variant pins 0
        ({"temperature": 0.7}, {}, {}, {}, (False, False, "temperature>0")),
        ({"temperature": 0.7}, {}, {"cache_sampled": True}, {}, (True, True, None)),
        ({"temperature": 0.7}, {}, {}, {"cache_sampled": True}, (True, True, None)),
        ({"temperature": 0, "tools": [TOOL]}, {}, {}, {}, (False, False, "tools")),
        ({"temperature": 0, "tool_choice": "none"}, {}, {}, {}, (False, False, "tools")),
        ({"temperature": 0, "messages": TOOL_MSGS}, {}, {}, {}, (False, False, "tool-messages")),
        ({"temperature": 0, "n": 2}, {}, {}, {}, (False, False, "n>1")),
        ({"temperature": 0, "n": 1}, {}, {}, {}, (True, True, None)),
        ({"temperature": 0, "logprobs": True}, {}, {}, {}, (False, False, "logprobs")),
        ({"temperature": 0}, {"x-gateway-cache": "no-store"}, {}, {}, (False, False, "header:no-store")),
        ({"temperature": 0}, {"x-gateway-cache": "Bypass"}, {}, {}, (False, False, "header:bypass")),
        ({"temperature": 0}, {"x-gateway-cache": "no-cache"}, {}, {}, (False, True, "header:no-cache")),
        ({"temperature": 0, "n": 3}, {"x-gateway-cache": "no-cache"}, {}, {}, (False, False, "n>1")),
        ({"temperature": 0}, {"x-gateway-cache": "whatever"}, {}, {}, (True, True, None)),
        ({"temperature": 0}, {}, {}, {"enabled": False}, (False, False, "disabled")),
    ],
)
def test_decide(
    request_kw: dict[str, Any],
    headers: dict[str, str],
    model_kw: dict[str, Any],
    settings_kw: dict[str, Any],
    expected: tuple[bool, bool, str | None],
) -> None:
    d = decide(req(**request_kw), headers, model(**model_kw), CacheSettings(**settings_kw))
    assert (d.read, d.write, d.reason) == expected


SCOPE = CacheScope("acme", "assistant", "control")


def _key(scope: CacheScope, r: ChatRequest) -> str:
    return exact_key(scope, r.upstream_body())


def _part(scope: CacheScope, r: ChatRequest, embedder: str) -> str:
    return semantic_part(scope, r.upstream_body(), embedder)


@pytest.mark.parametrize(
    "variant",
    [
        {"temperature": 0.0, "top_p": 0.5},
        {"temperature": 0.0, "max_tokens": 10},
        {"temperature": 0.0, "seed": 1},
        {"temperature": 0.0, "stop": ["\n"]},
        {"temperature": 0.0, "presence_penalty": 1.0},
        {"temperature": 0.0, "response_format": {"type": "json_object"}},
        {"temperature": 0.0, "tools": [TOOL]},
        {"temperature": 0.0, "n": 2},
        {"temperature": 0.1},
        {
            "temperature": 0.0,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        },
    ],
)
def test_parameter_variants_get_other_keys(variant: dict[str, Any]) -> None:
    base = req(temperature=0.0)
    other = req(**variant)
    assert _key(SCOPE, base) != _key(SCOPE, other)
    assert _part(SCOPE, base, "e") != _part(SCOPE, other, "e")


def test_streaming_and_defaults_do_not_change_the_key() -> None:
    plain = req(temperature=0)
    for same in (
        req(temperature=0, stream=True),
        req(temperature=0, stream=True, stream_options={"include_usage": True}),
        req(temperature=0, n=1),
        req(temperature=0, user="someone", metadata={"k": "v"}),
    ):
        assert _key(SCOPE, same) == _key(SCOPE, plain)


@pytest.mark.parametrize(
    "scope",
    [
        CacheScope("other", "assistant", "control"),
        CacheScope(None, "assistant", "control"),
        CacheScope("acme", "other-model", "control"),
        CacheScope("acme", "assistant", "candidate"),
    ],
)
def test_scope_is_part_of_every_key(scope: CacheScope) -> None:
    r = req(temperature=0)
    assert _key(scope, r) != _key(SCOPE, r)
    assert _part(scope, r, "e") != _part(SCOPE, r, "e")


def test_same_last_turn_with_other_history_is_another_partition() -> None:
    def chat(history: str) -> ChatRequest:
        messages = [
            {"role": "user", "content": history},
            {"role": "assistant", "content": "..."},
            {"role": "user", "content": "继续"},
        ]
        return req(temperature=0, messages=messages)

    a, b = chat("写一首关于春天的诗"), chat("解释一下量子计算")
    assert user_turn(a) == user_turn(b) == "继续"
    assert _part(SCOPE, a, "e") != _part(SCOPE, b, "e")
    assert _part(SCOPE, req(temperature=0, messages=[{"role": "user", "content": "x"}]), "e") == (
        _part(SCOPE, req(temperature=0, messages=[{"role": "user", "content": "y"}]), "e")
    )
    assert _part(SCOPE, a, "e") != _part(SCOPE, a, "another-embedder")


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "  hello  "}], "hello"),
        (
            [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "a\nb",
        ),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}], None),
        ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "prefill"}], None),
        ([{"role": "user", "content": "x" * 1001}], None),
        ([{"role": "user", "content": "   "}], None),
    ],
)
def test_user_turn(messages: list[dict[str, Any]], expected: str | None) -> None:
    assert user_turn(req(messages=messages)) == expected


# ---- stored form and replay ----------------------------------------------------------------------


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return {
        "id": "up-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "qwen",
        "choices": [choice],
    } | extra


STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Hel"}),
    chunk({"content": "lo, wor"}),
    chunk({"content": "ld"}),
    chunk({}, "stop"),
    {
        "id": "up-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "qwen",
        "choices": [],
        "usage": USAGE,
    },
]
COMPLETION: dict[str, Any] = {
    "id": "up-2",
    "object": "chat.completion",
    "created": 1,
    "model": "qwen",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello, world"}, "finish_reason": "stop"}
    ],
    "usage": USAGE,
}


def content_of(chunks: list[dict[str, Any]]) -> list[str]:
    return [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]


def test_stream_replay_keeps_boundaries_and_adds_usage_chunk() -> None:
    stored = decode(encode(CachedAnswer("hit", STREAM, None)), "hit")
    assert stored.usage == USAGE and all(c["choices"] for c in stored.chunks or [])
    out = replay_chunks(stored, request_id="chatcmpl-new", created=99, model="assistant", include_usage=True)
    assert content_of(out) == ["", "Hel", "lo, wor", "ld", ""]
    assert all(c["id"] == "chatcmpl-new" and c["created"] == 99 and c["model"] == "assistant" for c in out)
    assert [c["usage"] for c in out[:-1]] == [None] * 5
    assert out[-1]["choices"] == [] and out[-1]["usage"] == USAGE
    assert out[-2]["choices"][0]["finish_reason"] == "stop"


def test_stream_replay_without_include_usage_has_no_usage_field() -> None:
    out = replay_chunks(
        CachedAnswer("hit", STREAM, None, USAGE), request_id="r", created=1, model="m", include_usage=False
    )
    assert len(out) == 5 and all("usage" not in c for c in out)


def test_json_answer_replayed_as_stream() -> None:
    out = replay_chunks(
        CachedAnswer("hit", None, COMPLETION),
        request_id="r",
        created=5,
        model="assistant",
        include_usage=True,
    )
    assert content_of(out) == ["", "Hello, world", ""]
    assert out[0]["choices"][0]["delta"]["role"] == "assistant"
    assert out[-2]["choices"][0]["finish_reason"] == "stop"
    assert out[-1]["usage"] == USAGE and out[-1]["choices"] == []
    assert {c["object"] for c in out} == {"chat.completion.chunk"}


def test_stream_answer_replayed_as_json() -> None:
    out = replay_completion(
        CachedAnswer("semantic-hit", STREAM[:-1], None, USAGE), request_id="r", created=5, model="assistant"
    )
    assert out["object"] == "chat.completion" and out["id"] == "r" and out["model"] == "assistant"
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello, world"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert out["usage"] == USAGE


def test_json_answer_replayed_as_json_gets_fresh_identity() -> None:
    out = replay_completion(
        CachedAnswer("hit", None, COMPLETION), request_id="r", created=5, model="assistant"
    )
    assert (out["id"], out["created"], out["model"]) == ("r", 5, "assistant")
    assert out["choices"] == COMPLETION["choices"] and out["usage"] == USAGE


def test_converters_round_trip() -> None:
    chunks = completion_to_chunks(COMPLETION, include_usage=False)
    back = chunks_to_completion(chunks, USAGE)
    assert back["choices"][0]["message"] == COMPLETION["choices"][0]["message"]
    assert back["choices"][0]["finish_reason"] == "stop"


def test_reasoning_content_survives_both_ways() -> None:
    stream = [
        chunk({"role": "assistant", "reasoning_content": "think"}),
        chunk({"content": "ok"}),
        chunk({}, "stop"),
    ]
    completion = chunks_to_completion(stream, USAGE)
    assert completion["choices"][0]["message"] == {
        "role": "assistant",
        "content": "ok",
        "reasoning_content": "think",
    }
    again = completion_to_chunks(completion, include_usage=False)
    assert [c["choices"][0]["delta"] for c in again][1:3] == [
        {"reasoning_content": "think"},
        {"content": "ok"},
    ]


@pytest.mark.parametrize(
    ("answer", "complete"),
    [
        (CachedAnswer("hit", STREAM, None), True),
        (CachedAnswer("hit", STREAM[:3], None), False),  # cut off: no finish_reason
        (CachedAnswer("hit", [*STREAM[:3], {"error": {"message": "upstream died"}}], None), False),
        (CachedAnswer("hit", [*STREAM[:3], chunk({}, "content_filter")], None), False),
        (CachedAnswer("hit", [*STREAM[:3], chunk({}, "length")], None), True),
        (CachedAnswer("hit", [], None), False),
        (CachedAnswer("hit", None, COMPLETION), True),
        (CachedAnswer("hit", None, COMPLETION | {"choices": [{"index": 0, "finish_reason": None}]}), False),
        (
            CachedAnswer(
                "hit", None, COMPLETION | {"choices": [{"index": 0, "finish_reason": "tool_calls"}]}
            ),
            False,
        ),
        (CachedAnswer("hit", None, COMPLETION | {"choices": []}), False),
    ],
)
def test_only_complete_answers_are_storable(answer: CachedAnswer, complete: bool) -> None:
    assert is_complete(answer) is complete


def test_encoded_form_is_json() -> None:
    data = orjson.loads(encode(CachedAnswer("hit", None, COMPLETION, policy="stamp")))
    assert data == {"v": 1, "chunks": None, "completion": COMPLETION, "usage": USAGE, "policy": "stamp"}
    assert decode(encode(CachedAnswer("hit", None, COMPLETION, policy="stamp")), "hit").policy == "stamp"
