"""OpenAI embeddings (`POST /v1/embeddings`): the request checked against this API's allow-list,
and a backend's list of vectors answered under the public model name. No I/O; the stages that
apply to embeddings are in proxy/embeddings.py (no cache, stream or output policy: a vector has no
text to check).

Vectors pass through as the backend encoded them (`encoding_format` float or base64 is
forwarded; the openai SDK asks for base64 unless told otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from starlette.datastructures import Headers

from proxy import errors
from proxy.protocol import RequestValidationError, parse_request

MAX_INPUTS = 2048  # OpenAI's bound on the texts of one request


def _texts(value: Any) -> Any:
    """One text or a list of texts; token-id inputs refused (their tokenizer is the backend's)."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and value and not all(isinstance(v, str) for v in value):
        if all(isinstance(v, int | list) for v in value):
            raise ValueError("token-id inputs are not supported; send the input as text")
    if isinstance(value, list) and any(isinstance(v, str) and not v for v in value):
        raise ValueError("an input must not be an empty string")
    return value


class EmbeddingRequest(BaseModel):
    """The allow-list of this API: an undeclared field is refused, as on chat completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=256)
    input: Annotated[list[str], BeforeValidator(_texts), Field(min_length=1, max_length=MAX_INPUTS)]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = Field(None, max_length=256)  # accepted, not forwarded (as on chat)

    def body(self, inputs: list[str]) -> dict[str, Any]:
        """What a backend is sent (its own model id added per backend); `inputs`: the texts as
        the input policy left them."""
        body: dict[str, Any] = {"input": inputs}
        if self.encoding_format is not None:
            body["encoding_format"] = self.encoding_format
        if self.dimensions is not None:
            body["dimensions"] = self.dimensions
        return body


@dataclass(slots=True)
class Embedded:
    """A backend's answer: the vectors as it encoded them, and the input tokens it counted."""

    data: list[Any]
    prompt_tokens: int | None


class EmbeddingsApi:
    name = "embeddings"

    def credentials(self, headers: Headers) -> list[str]:
        return headers.getlist("authorization")

    def parse(self, raw: bytes) -> EmbeddingRequest:
        try:
            return parse_request(raw, EmbeddingRequest)
        except RequestValidationError as exc:
            raise errors.InvalidRequest(exc.message, param=exc.param) from None

    @staticmethod
    def embedded(answer: dict[str, Any]) -> Embedded:
        """The parts of a backend's answer the gateway keeps (the backend checked `data`)."""
        tokens = answer["usage"].get("prompt_tokens")
        return Embedded(answer["data"], tokens if isinstance(tokens, int) else None)

    def render(self, embedded: Embedded, model: str, prompt_tokens: int) -> dict[str, Any]:
        """OpenAI's answer: the list of vectors, the public model name, the input tokens."""
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        return {"object": "list", "data": embedded.data, "model": model, "usage": usage}

    def error_body(self, exc: errors.GatewayError) -> bytes:
        return exc.json()
