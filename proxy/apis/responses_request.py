"""OpenAI Responses requests: the allow-list of the wire format (pydantic, OpenAI's wording: `Unknown
parameter: 'x'.`) and the translation of Responses items into the internal chat form.

input (a string or items) -> messages: message items keep their role (developer -> system), their
text parts joined, images as image_url parts; consecutive function_call items -> one assistant
message's tool_calls; function_call_output -> a role "tool" message; reasoning items are dropped
(chat backends take no earlier reasoning). The same conversion turns a stored response's output
items back into messages, so a conversation is rebuilt from stored items alone.
Fields OpenAI accepts that a self-hosted model has no use for (include, prompt_cache_key, service
tier, text.verbosity, reasoning.summary, ...) are accepted and dropped; anything else is refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy import errors
from proxy.protocol import ChatRequest, RequestValidationError, decode_object

Status = Literal["in_progress", "completed", "incomplete"] | None


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InputText(_Model):
    type: Literal["input_text"]
    text: str


class OutputText(_Model):
    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class Refusal(_Model):
    type: Literal["refusal"]
    refusal: str


class InputImage(_Model):
    type: Literal["input_image"]
    image_url: str = Field(max_length=20_000_000)
    detail: Literal["auto", "low", "high"] | None = None


Part = Annotated[InputText | OutputText | Refusal | InputImage, Field(discriminator="type")]


class MessageItem(_Model):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    id: str | None = None
    status: Status = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(_Model):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=64)
    arguments: str
    id: str | None = None
    status: Status = None


class FunctionCallOutputItem(_Model):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[InputText | OutputText]
    id: str | None = None
    status: Status = None


class ReasoningItem(_Model):
    """Accepted so that a client replaying a response's output may send it; never forwarded."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = []
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: Status = None


def _item_kind(value: Any) -> str | None:
    if isinstance(value, dict):
        kind = value.get("type", "message")  # an "easy" message item has no type
        return kind if isinstance(kind, str) else None
    return getattr(value, "type", None)


Item = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_kind),
]


class FunctionTool(_Model):
    type: Literal["function"]
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Model):
    type: Literal["function"]
    name: str = Field(max_length=64)


class TextFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_named(self) -> TextFormat:
        if self.type == "json_schema" and (self.name is None or self.schema_ is None):
            raise ValueError("a json_schema format needs a name and a schema")
        return self


class TextConfig(_Model):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted, dropped


class ReasoningConfig(_Model):
    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None  # accepted, dropped
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # accepted, dropped


class StreamOptions(_Model):
    include_obfuscation: bool | None = None  # accepted, dropped (nothing is obfuscated)


class ResponsesRequest(_Model):
    model: str = Field(min_length=1, max_length=256)
    input: str | Annotated[list[Item], Field(max_length=4096)]
    instructions: str | None = None
    previous_response_id: str | None = Field(None, max_length=256)
    store: bool | None = None
    stream: bool | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = Field(None, max_length=256)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None  # either way an overflow is a 400
    background: Literal[False] | None = None
    # accepted and dropped
    include: list[str] | None = None
    prompt_cache_key: str | None = Field(None, max_length=256)
    prompt_cache_retention: str | None = Field(None, max_length=16)
    safety_identifier: str | None = Field(None, max_length=256)
    service_tier: str | None = Field(None, max_length=32)
    stream_options: StreamOptions | None = None
    max_tool_calls: int | None = Field(None, ge=1)

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, v: Any) -> Any:
        for tool in v if isinstance(v, list) else ():
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tools of type {kind!r} are not supported here; only 'function' tools")
        return v


def parse_request(raw: bytes) -> ResponsesRequest:
    """Decode and validate a body; errors.InvalidRequest in OpenAI's wording when it is not valid."""
    data = _decode(raw)
    try:
        return ResponsesRequest.model_validate(data)
    except ValidationError as exc:
        raise _invalid(exc) from None


def input_items(req: ResponsesRequest) -> list[dict[str, Any]]:
    """This request's input as items (the form that is stored): a string is one user message."""
    if isinstance(req.input, str):
        return [{"type": "message", "role": "user", "content": req.input}]
    return [item.model_dump(exclude_none=True, by_alias=True) for item in req.input]


def to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses items (input or output, as stored) -> chat messages."""
    out: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item))
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}  # fmt: skip
            if out and out[-1]["role"] == "assistant":  # text and calls of one turn: one message
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item["output"]
            text = output if isinstance(output, str) else "\n".join(p["text"] for p in output)
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
    return out


def _message(item: dict[str, Any]) -> dict[str, Any]:
    role = "system" if item["role"] == "developer" else item["role"]
    content = item["content"]
    if isinstance(content, str):
        return {"role": role, "content": content}
    if any(p["type"] == "input_image" for p in content):
        parts = [_chat_part(p) for p in content]
        return {"role": role, "content": parts}
    return {"role": role, "content": "\n".join(p.get("text") or p.get("refusal", "") for p in content)}


def _chat_part(part: dict[str, Any]) -> dict[str, Any]:
    if part["type"] == "input_image":
        image = {"url": part["image_url"], **({"detail": part["detail"]} if "detail" in part else {})}
        return {"type": "image_url", "image_url": image}
    return {"type": "text", "text": part.get("text") or part.get("refusal", "")}


def chat_request(req: ResponsesRequest, messages: list[dict[str, Any]]) -> ChatRequest:
    """The internal chat form of a Responses request whose conversation is `messages`."""
    if req.instructions is not None:
        messages = [{"role": "system", "content": req.instructions}, *messages]
    if not messages:
        raise errors.InvalidRequest("The input has no message for the model.", param="input")
    body: dict[str, Any] = {"model": req.model, "messages": messages}
    for name in ("stream", "temperature", "top_p", "parallel_tool_calls", "user"):
        if (value := getattr(req, name)) is not None:
            body[name] = value
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if req.tools:
        body["tools"] = [_chat_tool(t) for t in req.tools]
    if isinstance(req.tool_choice, FunctionChoice):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    if req.text is not None and req.text.format is not None:
        body["response_format"] = _response_format(req.text.format)
    if req.reasoning is not None and req.reasoning.effort not in (None, "none"):
        body["reasoning_effort"] = req.reasoning.effort
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as exc:  # what the items became does not fit the chat form
        raise errors.InvalidRequest(f"Invalid 'input': {_first_message(exc)}.", param="input") from None


def _chat_tool(tool: FunctionTool) -> dict[str, Any]:
    function = tool.model_dump(exclude_none=True, exclude={"type"})
    return {"type": "function", "function": function}


def _response_format(fmt: TextFormat) -> dict[str, Any]:
    if fmt.type != "json_schema":
        return {"type": fmt.type}
    schema = fmt.model_dump(exclude_none=True, exclude={"type"}, by_alias=True)
    return {"type": "json_schema", "json_schema": schema}


# -- decoding and errors ---------------------------------------------------------------------------
def _decode(raw: bytes) -> dict[str, Any]:
    try:
        return decode_object(raw)
    except RequestValidationError as exc:
        raise errors.InvalidRequest(exc.message) from None


def _invalid(exc: ValidationError) -> errors.InvalidRequest:
    err = max(exc.errors(include_url=False), key=lambda e: len(e["loc"]))  # deepest: most specific
    param = _param(err["loc"])
    if err["type"] == "extra_forbidden":
        return errors.InvalidRequest(f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter")
    if err["type"] == "union_tag_invalid":  # an item type this gateway does not take
        tag = (err.get("ctx") or {}).get("tag", "?")
        return errors.InvalidRequest(
            f"Invalid value for '{param}.type': '{tag}' items are not supported.", param=f"{param}.type",
            code="invalid_value",
        )
    if err["type"] == "missing":
        return errors.InvalidRequest(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    message = err["msg"].removeprefix("Value error, ")
    return errors.InvalidRequest(
        f"Invalid value for '{param}': {message}.", param=param, code="invalid_value"
    )


def _first_message(exc: ValidationError) -> str:
    return str(exc.errors(include_url=False)[0]["msg"]).removeprefix("Value error, ")


_TAGS = frozenset({
    "message", "function_call", "function_call_output", "reasoning", "str",
    "input_text", "output_text", "input_image",
})  # fmt: skip


def _param(loc: tuple[Any, ...]) -> str:
    """pydantic's location as OpenAI's `input[0].content`, without union and tag names."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _TAGS or any(c in part for c in "[(,"):
            continue
        else:
            out += f".{part}" if out else part
    return out or "body"
