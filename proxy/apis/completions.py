"""OpenAI legacy completions (`POST /v1/completions`): a prompt in, `text_completion` JSON and SSE
chunks out.

The internal form is the chat form with the prompt as its one user message, marked raw
(protocol.RawPromptRequest): every stage (input policy, cache, limits, A/B, relay, output policy)
applies unchanged, and the backends send the prompt to the model's completions endpoint without a
chat template. Log probabilities travel in chat's shape and are turned back here.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from proxy import errors
from proxy.apis.base import Parsed, Stateless
from proxy.protocol import (
    DONE_FRAME,
    RawPromptRequest,
    RequestValidationError,
    StreamOptions,
    at_most_four_stops,
    chunk_frame,
    parse_request,
    stream_options_need_stream,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's (and vLLM's) when a completions request sets none
# this API's fields that are not the internal form's, or are under another name there
_NOT_CHAT = frozenset({"prompt", "logprobs", "echo", "suffix"})


def _one_prompt(value: Any) -> Any:
    """One text prompt (a list holding one string is one prompt); several, or token ids, refused."""
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        elif value and all(isinstance(v, str) for v in value):
            raise ValueError("one prompt per request is supported, not a list of several")
        elif value:
            raise ValueError("token-id prompts are not supported; send the prompt as text")
    if isinstance(value, str) and not value:
        raise ValueError("the prompt must not be empty")
    return value


class CompletionRequest(BaseModel):
    """The allow-list of this API: an undeclared field is refused, as on chat completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=256)
    prompt: Annotated[str, BeforeValidator(_one_prompt)]
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = None
    suffix: str | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = Field(None, max_length=256)
    # vLLM sampling extras, as on chat completions
    top_k: int | None = Field(None, ge=-1, le=1000)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=2)

    _stop = field_validator("stop")(at_most_four_stops)
    _stream_options = field_validator("stream_options")(stream_options_need_stream)

    @field_validator("echo")
    @classmethod
    def _echo(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError("suffix is not supported")
        return v

    def internal(self) -> RawPromptRequest:
        """The internal chat form: the prompt as the one user message, logprobs as chat's."""
        fields = self.model_dump(exclude_unset=True, exclude=set(_NOT_CHAT))
        fields["messages"] = [{"role": "user", "content": self.prompt}]
        if self.max_tokens is None:
            fields["max_tokens"] = DEFAULT_MAX_TOKENS
        if self.logprobs is not None:
            fields["logprobs"], fields["top_logprobs"] = True, self.logprobs
        return RawPromptRequest.model_validate(fields)


def completion_logprobs(logprobs: Any, offset: int) -> dict[str, Any] | None:
    """Chat's `{"content": [...]}` -> the completions form; `text_offset` counts from `offset`
    (the characters of this choice already sent)."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not content:
        return None
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for item in content:
        token = item.get("token") or ""
        out["tokens"].append(token)
        out["token_logprobs"].append(item.get("logprob"))
        out["top_logprobs"].append({t.get("token"): t.get("logprob") for t in item.get("top_logprobs") or ()})
        out["text_offset"].append(offset)
        offset += len(token)
    return out


class CompletionRenderer:
    """Internal chunks -> `text_completion` chunks; chunks with nothing to say (a role chunk) are
    not sent."""

    __slots__ = ("_first", "_include_usage", "_offsets")

    def __init__(self, include_usage: bool) -> None:
        self._include_usage = include_usage
        self._first: dict[str, Any] | None = None
        self._offsets: dict[int, int] = {}  # characters sent per choice (logprobs' text_offset)

    def chunk(self, chunk: dict[str, Any]) -> bytes:
        if self._first is None:
            self._first = chunk
        choices = [c for c in map(self._choice, chunk.get("choices") or ()) if c is not None]
        return chunk_frame(_head(chunk) | {"choices": choices}) if choices else b""

    def _choice(self, choice: dict[str, Any]) -> dict[str, Any] | None:
        index = int(choice.get("index") or 0)
        text = (choice.get("delta") or {}).get("content") or ""
        at = self._offsets.get(index, 0)
        logprobs = completion_logprobs(choice.get("logprobs"), at)
        finish = choice.get("finish_reason")
        if not text and logprobs is None and not finish:
            return None
        self._offsets[index] = at + len(text)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def end(self, usage: dict[str, Any]) -> bytes:
        if not self._include_usage:
            return DONE_FRAME
        return chunk_frame(_head(self._first or {}) | {"choices": [], "usage": usage}) + DONE_FRAME

    def error(self, exc: errors.GatewayError) -> bytes:
        return exc.sse_frame()

    def result(self) -> None:
        return None


def _head(chunk: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": chunk.get("id"),
        "object": "text_completion",
        "created": chunk.get("created"),
        "model": chunk.get("model"),
    }


class CompletionsApi(Stateless):
    name = "completions"

    def parse(self, raw: bytes) -> Parsed:
        try:
            return Parsed(parse_request(raw, CompletionRequest).internal())
        except RequestValidationError as exc:
            raise errors.InvalidRequest(exc.message, param=exc.param) from None

    def render(self, completion: dict[str, Any], parsed: Parsed) -> dict[str, Any]:
        """A chat.completion (policy-filtered) as a `text_completion`."""
        choices = [
            {
                "index": choice.get("index", i),
                "text": (choice.get("message") or {}).get("content") or "",
                "logprobs": completion_logprobs(choice.get("logprobs"), 0),
                "finish_reason": choice.get("finish_reason"),
            }
            for i, choice in enumerate(completion.get("choices") or ())
        ]
        out = _head(completion) | {"choices": choices}
        if completion.get("usage"):
            out["usage"] = completion["usage"]
        return out

    def renderer(self, parsed: Parsed) -> CompletionRenderer:
        return CompletionRenderer(parsed.chat.include_usage)

