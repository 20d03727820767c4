"""The simulator's legacy completions and embeddings speak vLLM's wire format (loadtest/sim_text.py):
field sets and order as vLLM serializes them, no role chunk, vectors that depend on the text alone."""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson
import pytest

from loadtest.sim_plan import RequestError, SimConfig
from loadtest.sim_text import (
    COMPLETIONS_PATH,
    TextPlan,
    embeddings_body,
    plan_body,
    plan_frames,
    plan_request,
    vector,
)

CFG = SimConfig(scripts={"two:": ["Hel", "lo"]})


def plan(body: dict[str, Any]) -> TextPlan:
    made, chat = plan_request(COMPLETIONS_PATH, {"model": "sim-model", **body}, CFG, "cmpl-1")
    assert isinstance(made, TextPlan) and chat["messages"][0]["role"] == "user"
    return made


def test_a_stream_is_vllms_text_completion_chunks_without_a_role_chunk() -> None:
    frames = [f for _, f in plan_frames(plan({"prompt": "two: go", "stream": True}), 0, 0)]
    assert frames[-1] == b"data: [DONE]\n\n"
    first = orjson.loads(frames[0][6:])
    assert list(first) == ["id", "object", "created", "model", "choices"]
    assert first["choices"] == [{"index": 0, "text": "Hel", "logprobs": None, "finish_reason": None,
                                 "stop_reason": None, "prompt_token_ids": None, "token_ids": None}]
    assert orjson.loads(frames[1][6:])["choices"][0]["finish_reason"] == "stop"
    assert len(frames) == 3


def test_usage_comes_last_as_vllm_sends_it() -> None:
    body = {"prompt": "two: go", "stream": True, "stream_options": {"include_usage": True}}
    frames = [f for _, f in plan_frames(plan(body), 0, 0)]
    usage = orjson.loads(frames[-2][6:])
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 6, "total_tokens": 8, "completion_tokens": 2}


def test_a_json_answer_has_every_field_of_vllms_completion_response_in_order() -> None:
    answer = orjson.loads(plan_body(plan({"prompt": "two: go", "logprobs": 1})))
    assert list(answer) == ["id", "object", "created", "model", "choices", "service_tier", "system_fingerprint",
                            "usage", "kv_transfer_params", "ec_transfer_params", "metrics"]
    choice = answer["choices"][0]
    assert list(choice) == ["index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids",
                            "prompt_logprobs", "prompt_token_ids", "routed_experts"]
    assert choice["text"] == "Hello" and choice["logprobs"]["tokens"] == ["Hel", "lo"]
    assert choice["logprobs"]["text_offset"] == [0, 3] and len(choice["logprobs"]["top_logprobs"][0]) == 2


def test_vllms_default_of_sixteen_tokens_applies() -> None:
    assert len(plan({"prompt": "a long answer", "max_tokens": None}).tokens) == 16


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": ""}, "Either prompt or prompt_embeds must be provided and non-empty."),
        ({}, "Either prompt or prompt_embeds must be provided and non-empty."),
        ({"prompt": "x", "suffix": "y"}, "suffix is not currently supported"),
        ({"prompt": "x", "logprobs": -2}, "`logprobs` must be a positive value or -1."),
    ],
)
def test_what_vllm_refuses(body: dict[str, Any], message: str) -> None:
    with pytest.raises(RequestError) as info:
        plan(body)
    assert info.value.status == 400 and info.value.message == message


def test_embeddings_are_unit_vectors_of_the_text_in_either_encoding() -> None:
    raw = orjson.loads(embeddings_body({"model": "sim-model", "input": ["a b", "c"]}, CFG, "embd-1"))
    assert list(raw) == ["id", "object", "created", "model", "data", "usage"]
    assert raw["data"][0] == {"index": 0, "object": "embedding", "embedding": vector("a b", 384)}
    assert raw["usage"] == {"prompt_tokens": 7, "total_tokens": 7, "completion_tokens": 0, "prompt_tokens_details": None}
    assert sum(v * v for v in vector("a b", 384)) == pytest.approx(1.0)
    b64 = orjson.loads(embeddings_body({"input": "a b", "encoding_format": "base64", "dimensions": 4}, CFG, "e"))
    decoded = struct.unpack("<4f", base64.b64decode(b64["data"][0]["embedding"]))
    assert decoded == pytest.approx(vector("a b", 4), abs=1e-6)
    tokens = orjson.loads(embeddings_body({"input": [1, 2, 3]}, CFG, "e"))  # vLLM takes token ids too
    assert len(tokens["data"]) == 1


@pytest.mark.parametrize(
    ("body", "status"),
    [({"model": "other", "input": "x"}, 404), ({"input": []}, 400), ({"input": "x", "encoding_format": "int8"}, 400),
     ({"input": "x", "dimensions": 0}, 400), ({"input": " ".join(["w"] * 5000)}, 400)],
)
def test_embedding_requests_vllm_refuses(body: dict[str, Any], status: int) -> None:
    with pytest.raises(RequestError) as info:
        embeddings_body(body, CFG, "e")
    assert info.value.status == status
