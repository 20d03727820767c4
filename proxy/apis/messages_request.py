"""Anthropic Messages requests: the allow-list of the wire format (pydantic, Anthropic's own error
wording: `max_tokens: Field required`) and its translation into the internal chat form.

system -> a system message; tool_use blocks -> an assistant message's tool_calls; tool_result
blocks -> role "tool" messages (placed before the rest of their user turn, as OpenAI requires);
thinking blocks -> the assistant message's reasoning_content; images -> image_url parts. Fields
Anthropic accepts that a self-hosted model has no use for (cache_control, service_tier, thinking,
...) are accepted and dropped; anything else is refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from proxy import errors
from proxy.protocol import ChatRequest, RequestValidationError, decode_object

Dropped = dict[str, Any] | None  # cache_control and the like: accepted, never forwarded


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextBlock(_Model):
    type: Literal["text"]
    text: str
    cache_control: Dropped = None
    citations: list[dict[str, Any]] | None = None


class Base64Source(_Model):
    type: Literal["base64"]
    media_type: Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
    data: str = Field(max_length=20_000_000)


class UrlSource(_Model):
    type: Literal["url"]
    url: str = Field(max_length=20_000)


class ImageBlock(_Model):
    type: Literal["image"]
    source: Annotated[Base64Source | UrlSource, Field(discriminator="type")]
    cache_control: Dropped = None


class ToolUseBlock(_Model):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    input: dict[str, Any]
    cache_control: Dropped = None
    caller: Dropped = None  # echoed back by clients as they received the block
    toolset_name: str | None = None


class ToolResultBlock(_Model):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[Annotated[TextBlock | ImageBlock, Field(discriminator="type")]] | None = None
    is_error: bool | None = None
    cache_control: Dropped = None


class ThinkingBlock(_Model):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Model):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]
_USER_ONLY = ("tool_result", "image")
_ASSISTANT_ONLY = ("tool_use", "thinking", "redacted_thinking")


class MessageParam(_Model):
    role: Literal["user", "assistant"]
    content: str | list[Block]

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> MessageParam:
        wrong = _ASSISTANT_ONLY if self.role == "user" else _USER_ONLY
        for block in self.content if isinstance(self.content, list) else ():
            if block.type in wrong:
                raise ValueError(f"`{block.type}` blocks are not allowed in `{self.role}` messages")
        return self


class ToolDef(_Model):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    strict: bool | None = None
    cache_control: Dropped = None


class ToolChoice(_Model):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, max_length=64)
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if (self.type == "tool") != (self.name is not None):
            raise ValueError("`name` is required for tool_choice of type `tool`, and only for it")
        return self


class Thinking(_Model):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1024)
    display: Literal["summarized", "omitted"] | None = None


class Metadata(_Model):
    user_id: str | None = Field(None, max_length=256)


class OutputFormat(_Model):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Model):
    format: OutputFormat | None = None
    effort: Literal["low", "medium", "high", "max"] | None = None  # accepted, dropped


class MessagesRequest(_Model):
    """POST /v1/messages (and count_tokens, where max_tokens is not required)."""

    model: str = Field(min_length=1, max_length=256)
    messages: list[MessageParam] = Field(min_length=1, max_length=2048)
    max_tokens: int | None = Field(None, ge=1)
    system: str | list[TextBlock] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1, le=1000)
    stop_sequences: list[str] | None = Field(None, max_length=4)
    stream: bool | None = None
    metadata: Metadata | None = None
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    # accepted and dropped
    cache_control: Dropped = None
    service_tier: Literal["auto", "standard_only"] | None = None
    inference_geo: str | None = None
    speed: Literal["standard", "fast"] | None = None
    context_management: Dropped = None

    @model_validator(mode="after")
    def _thinking_fits(self) -> MessagesRequest:
        budget = self.thinking.budget_tokens if self.thinking else None
        if budget is not None and self.max_tokens is not None and budget >= self.max_tokens:
            raise ValueError("`max_tokens` must be greater than `thinking.budget_tokens`")
        return self


def parse(raw: bytes, *, require_max_tokens: bool) -> tuple[MessagesRequest, ChatRequest]:
    """Validate a body and translate it; errors.InvalidRequest with Anthropic's wording."""
    data = _decode(raw)
    try:
        req = MessagesRequest.model_validate(data)
    except ValidationError as exc:
        raise errors.InvalidRequest(_describe(exc)) from None
    if require_max_tokens and req.max_tokens is None:
        raise errors.InvalidRequest("max_tokens: Field required", param="max_tokens")
    try:
        return req, ChatRequest.model_validate(to_chat(req))
    except ValidationError as exc:  # a constraint of the internal form the wire models do not repeat
        raise errors.InvalidRequest(_describe(exc)) from None


def to_chat(req: MessagesRequest) -> dict[str, Any]:
    """The internal chat request: only the fields the client set (the cache key reads them)."""
    chat: dict[str, Any] = {"model": req.model, "messages": _messages(req)}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "stream"):
        value = getattr(req, name)
        if value is not None:
            chat[name] = value
    if req.stop_sequences:
        chat["stop"] = list(req.stop_sequences)
    if req.metadata is not None and req.metadata.user_id:
        chat["user"] = req.metadata.user_id
    if req.tools:
        chat["tools"] = [_tool(t) for t in req.tools]
    if req.tool_choice is not None:
        chat.update(_tool_choice(req.tool_choice))
    if req.output_config is not None and req.output_config.format is not None:
        schema = req.output_config.format.schema_
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    return chat


def _messages(req: MessagesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    system = req.system if isinstance(req.system, str) else "\n\n".join(b.text for b in req.system or ())
    if system:
        out.append({"role": "system", "content": system})
    for message in req.messages:
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
        elif message.role == "user":
            out.extend(_user_turn(message.content))
        else:
            out.append(_assistant_turn(message.content))
    return out


def _user_turn(blocks: list[Any]) -> list[dict[str, Any]]:
    """Tool results become tool messages, in order; the rest stays one user message after them."""
    out: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in blocks:
        if block.type == "tool_result":
            content = block.content if isinstance(block.content, list) else ()
            text = block.content if isinstance(block.content, str) else "\n".join(
                b.text for b in content if b.type == "text"
            )
            out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": text})
            parts.extend(_image(b) for b in content if b.type == "image")  # a tool message is text only
        elif block.type == "text":
            parts.append({"type": "text", "text": block.text})
        else:
            parts.append(_image(block))
    if parts:
        single_text = len(parts) == 1 and parts[0]["type"] == "text"
        out.append({"role": "user", "content": parts[0]["text"] if single_text else parts})
    return out


def _assistant_turn(blocks: list[Any]) -> dict[str, Any]:
    text = "".join(b.text for b in blocks if b.type == "text")
    thinking = "".join(b.thinking for b in blocks if b.type == "thinking")
    calls = [
        {"id": b.id, "type": "function", "function": {"name": b.name, "arguments": _json(b.input)}}
        for b in blocks
        if b.type == "tool_use"
    ]
    message: dict[str, Any] = {"role": "assistant"}
    if text or not calls:
        message["content"] = text
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = thinking
    return message


def _image(block: ImageBlock) -> dict[str, Any]:
    src = block.source
    url = src.url if isinstance(src, UrlSource) else f"data:{src.media_type};base64,{src.data}"
    return {"type": "image_url", "image_url": {"url": url}}


def _tool(tool: ToolDef) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    if tool.strict is not None:
        function["strict"] = tool.strict
    return {"type": "function", "function": function}


def _tool_choice(choice: ToolChoice) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if choice.type == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        out["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if choice.disable_parallel_tool_use:
        out["parallel_tool_calls"] = False
    return out


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        return decode_object(raw)
    except RequestValidationError as exc:
        raise errors.InvalidRequest(exc.message) from None


def _describe(exc: ValidationError) -> str:
    """pydantic's most specific error as Anthropic words it: `messages.0.content: Field required`."""
    err = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))
    path = ".".join(str(p) for p in err["loc"] if not _noise(p))
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"{path}: {message}" if path else message


def _noise(part: Any) -> bool:
    """Union branch names in an error location (`str`, `list[...]`), not fields."""
    text = str(part)
    return isinstance(part, str) and (text in _TYPE_NAMES or any(ch in text for ch in "[(,"))


_TYPE_NAMES = frozenset({"str", "list", "dict", "bool", "int", "float", "none"})
