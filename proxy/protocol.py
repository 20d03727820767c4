"""OpenAI wire models: the chat request allow-list, and builders for responses and chunks. No I/O.

The request model is the allow-list: a field that is not declared here is refused with OpenAI's
own wording ("Unrecognized request argument supplied"), so nothing a client invents - `api_base`,
`chat_template`, ... - is ever forwarded upstream. Fields OpenAI accepts but a self-hosted server
has no use for are accepted and dropped (`DROPPED`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from backends.base import RAW_PROMPT

# Accepted for SDK compatibility, never forwarded.
DROPPED = frozenset({"store", "metadata", "service_tier", "user", "prediction", "modalities", "audio"})


class _Model(BaseModel):
    # strict: JSON types as OpenAI checks them ("stream": "yes" or "max_tokens": "16" are refused,
    # not coerced); nested objects still validate from dicts
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str = Field(max_length=20_000_000)
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = TextPart | ImagePart


class FunctionCall(_Model):
    name: str = Field(max_length=256)
    arguments: str


class ToolCall(_Model):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(None, max_length=256)
    refusal: str | None = None
    reasoning_content: str | None = None  # vLLM's reasoning, as older servers name it
    reasoning: str | None = None  # and as newer ones do: a client sends back what it was given

    @model_validator(mode="after")
    def _shape(self) -> Message:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self


class FunctionDef(_Model):
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Model):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Model):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class JsonSchemaFormat(_Model):
    name: str = Field(max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


def at_most_four_stops(v: str | list[str] | None) -> str | list[str] | None:
    """`stop`'s validator (chat and completions): OpenAI accepts at most 4 sequences."""
    if isinstance(v, list) and len(v) > 4:
        raise ValueError("at most 4 stop sequences are allowed")
    return v


def stream_options_need_stream(v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
    """`stream_options`' validator (chat and completions): only with `stream: true`."""
    if v is not None and not info.data.get("stream"):
        raise ValueError("stream_options is only allowed when stream is true")
    return v


class ChatRequest(_Model):
    model: str = Field(min_length=1, max_length=256)
    messages: list[Message] = Field(min_length=1, max_length=2048)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    seed: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    # vLLM sampling extras (safe: sampling only, nothing that loads files or templates)
    top_k: int | None = Field(None, ge=-1, le=1000)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    # accepted and dropped (see DROPPED)
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    user: str | None = Field(None, max_length=256)
    prediction: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None

    # field validators, so that the error names the parameter (`param`) as OpenAI does
    _stop = field_validator("stop")(at_most_four_stops)
    _stream_options = field_validator("stream_options")(stream_options_need_stream)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def completion_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def upstream_body(self) -> dict[str, Any]:
        """The allow-listed fields the client set, ready to forward (model still the public one)."""
        body = self.model_dump(exclude_unset=True, exclude=set(DROPPED), by_alias=True)
        return {k: v for k, v in body.items() if v is not None}


class RawPromptRequest(ChatRequest):
    """The internal form of a legacy completions request (proxy/apis/completions.py builds it; no
    client body parses into it): its one user message is a raw prompt, which the backends send
    without the chat template (backends/base.py RAW_PROMPT). The mark is part of the forwarded
    body, so a prompt and a chat turn of the same text never share a cache entry."""

    def upstream_body(self) -> dict[str, Any]:
        return {**super().upstream_body(), RAW_PROMPT: True}


class RequestValidationError(Exception):
    """Raised by parse_chat_request; `param` names the offending field OpenAI-style."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def _param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as OpenAI-style `messages[0].content`, without union/validator noise."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _MODEL_NAMES or any(ch in str(part) for ch in "[(,"):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or None


_MODEL_NAMES = frozenset({"TextPart", "ImagePart", "str", "list", "dict", "bool", "int", "float"})


class _DuplicateKey(ValueError):
    pass


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateKey
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_unique_pairs)  # json.loads would build one per call
M = TypeVar("M", bound=BaseModel)


def parse_chat_request(raw: bytes) -> ChatRequest:
    return parse_request(raw, ChatRequest)


def decode_object(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, as json.loads reads bytes (UTF-8, -16 or -32, detected),
    duplicate keys refused; RequestValidationError (OpenAI wording) otherwise. Every API's parser
    starts here."""
    try:
        data = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except _DuplicateKey:
        raise RequestValidationError("The JSON body has a duplicate key.", None) from None
    except (ValueError, UnicodeDecodeError):
        raise RequestValidationError(
            "We could not parse the JSON body of your request. The body must be valid JSON.", None
        ) from None
    if not isinstance(data, dict):
        raise RequestValidationError("The request body must be a JSON object.", None)
    return data


def parse_request(raw: bytes, model: type[M]) -> M:
    """Decode a request body and validate it as `model` (an allow-list: extra="forbid"). Raises
    RequestValidationError with OpenAI-style text.

    Duplicate keys are refused (parsers disagree on which copy wins, which lets a body say one
    thing to the policy check and another to the backend). This costs ~10 us per typical body
    over orjson; case-variant keys ("Model") are refused by the allow-list models themselves.
    """
    data = decode_object(raw)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))  # deepest: most specific
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            name = _param(loc) or "?"
            return_msg = f"Unrecognized request argument supplied: {name}"
            raise RequestValidationError(return_msg, name) from None
        if err["type"] == "missing":
            raise RequestValidationError(
                f"Missing required parameter: '{_param(loc)}'.", _param(loc)
            ) from None
        msg = err["msg"].removeprefix("Value error, ")
        param = _param(loc)
        raise RequestValidationError(
            f"Invalid value for '{param}': {msg}." if param else msg, param
        ) from None


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def chunk_frame(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


DONE_FRAME = b"data: [DONE]\n\n"


def model_card(model_id: str, created: int, owner: str = "llm-gateway") -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owner}


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """A fast, tokenizer-free upper-leaning estimate used to reserve rate-limit tokens before the
    call (reconciled with the real usage after): ~4 ASCII characters per token, one token per
    other character (CJK is roughly one token per character), 4 tokens per message of framing."""
    total = 0
    for m in messages:
        total += 4
        content = m.get("content")
        texts = (
            [content]
            if isinstance(content, str)
            else [p.get("text", "") for p in content or () if isinstance(p, dict)]
        )
        for text in texts:
            if not text:
                continue
            ascii_len = len(text.encode("ascii", "ignore"))
            total += (ascii_len + 3) // 4 + (len(text) - ascii_len)
    return total
