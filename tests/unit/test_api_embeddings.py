"""/v1/embeddings: the translator (proxy/apis/embeddings.py) and the choice of backends
(proxy/embeddings.py): only the variant's backends that embed are tried, and a variant without
one is the client's error (400), not an outage."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from backends.base import Body, EmbeddingBackend
from backends.breaker import Breaker
from backends.pool import Member
from proxy import errors
from proxy.apis.embeddings import EmbeddingRequest, EmbeddingsApi
from proxy.call import Call
from proxy.dispatch import Dispatch
from proxy.embeddings import _chain, _embedders
from proxy.settings import VariantSettings

API = EmbeddingsApi()


def parse(body: dict[str, Any]) -> EmbeddingRequest:
    return API.parse(orjson.dumps({"model": "m", **body}))


# -- the request ---------------------------------------------------------------------------------------
def test_one_text_or_a_list_of_texts_is_forwarded_as_a_list() -> None:
    assert parse({"input": "hello"}).body(["hello"]) == {"input": ["hello"]}
    req = parse({"input": ["a", "b"], "encoding_format": "base64", "dimensions": 8, "user": "u"})
    assert req.body(["a", "*"]) == {"input": ["a", "*"], "encoding_format": "base64", "dimensions": 8}


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"input": [1, 2, 3]}, "input", "token-id inputs are not supported"),
        ({"input": [[1, 2], [3]]}, "input", "token-id inputs are not supported"),
        ({"input": []}, "input", "at least 1 item"),
        ({"input": ["a", ""]}, "input", "must not be an empty string"),
        ({"input": ["a", 3]}, "input[1]", "valid string"),
        ({"input": ["a"] * 2049}, "input", "at most 2048 items"),
        ({}, "input", "Missing required parameter"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format", "'float' or 'base64'"),
        ({"input": "a", "dimensions": 0}, "dimensions", "greater than or equal to 1"),
        ({"input": "a", "api_base": "http://x"}, "api_base", "Unrecognized request argument"),
    ],
)
def test_what_is_refused_names_the_parameter(body: dict[str, Any], param: str, words: str) -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        parse(body)
    assert info.value.param == param and words in info.value.message


# -- the answer --------------------------------------------------------------------------------------
def test_the_answer_carries_the_public_model_and_the_counted_tokens() -> None:
    answer = {"id": "embd-1", "object": "list", "model": "served", "created": 1,
              "data": [{"index": 0, "object": "embedding", "embedding": "AAAA"}],
              "usage": {"prompt_tokens": 5, "total_tokens": 5, "completion_tokens": 0}}
    embedded = API.embedded(answer)
    assert embedded.prompt_tokens == 5
    assert API.render(embedded, "public", 5) == {
        "object": "list", "data": answer["data"], "model": "public", "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }
    assert API.embedded({"data": [], "usage": {}}).prompt_tokens is None  # the estimate stands


# -- which backends are tried ---------------------------------------------------------------------------
class Embeds:
    def __init__(self, name: str) -> None:
        self.name, self.model = name, f"{name}-model"

    async def embeddings(self, body: Body) -> Body:
        return {"data": [], "usage": {}}


class ChatOnly:
    def __init__(self, name: str) -> None:
        self.name, self.model = name, f"{name}-model"


def gateway(*backends: Any) -> Any:
    members = {b.name: Member(b, Breaker(3, 10.0)) for b in backends}
    return SimpleNamespace(members=members, dispatch=Dispatch(members))


def variant(backends: list[str], fallback: list[str]) -> VariantSettings:
    return VariantSettings(name="a", weight=1, backends=backends, fallback=fallback)


def test_backends_that_cannot_embed_are_left_out() -> None:
    assert isinstance(Embeds("x"), EmbeddingBackend) and not isinstance(ChatOnly("x"), EmbeddingBackend)
    gw = gateway(Embeds("gpu-a"), ChatOnly("cpu"), Embeds("gpu-b"), Embeds("spare"))
    assert _embedders(gw, "m", variant(["gpu-a", "cpu", "gpu-b"], ["cpu", "spare"])) == (["gpu-a", "gpu-b"], ["spare"])


def test_a_variant_with_no_backend_that_embeds_is_a_400_naming_the_model() -> None:
    with pytest.raises(errors.InvalidRequest) as info:
        _embedders(gateway(ChatOnly("cpu")), "local", variant(["cpu"], []))
    assert info.value.status == 400 and info.value.param == "model" and info.value.code == "unsupported_model"
    assert "'local' does not support embeddings" in info.value.message


def test_the_chain_is_least_outstanding_first_then_the_fallbacks_and_says_why_one_is_skipped() -> None:
    gw = gateway(Embeds("a"), Embeds("b"), Embeds("spare"))
    gw.members["a"].outstanding = 2
    gw.members["b"].healthy = False
    call = Call("req", 0.0, "embeddings")
    assert [m.name for m in _chain(gw, ["a", "b"], ["spare"], call)] == ["a", "spare"]
    assert call.fallback_reasons == ["unhealthy"] and call.route == "least_loaded"
    gw.members["a"].healthy = gw.members["spare"].healthy = False
    with pytest.raises(errors.ServiceUnavailable) as info:
        _chain(gw, ["a", "b"], ["spare"], Call("req", 0.0, "embeddings"))
    assert int(info.value.headers["retry-after"]) >= 1
