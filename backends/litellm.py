"""Hosted providers (OpenAI, Anthropic, Azure, ...) through litellm's async API.

litellm is an optional extra, slow to import (~3 s): start() imports it, never the path of other
backend types. This is the one seam where litellm's exceptions become BackendError kinds.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import AsyncGenerator
from typing import Any, Protocol

import aiohttp

from backends.base import REFUSALS, BackendError, Body, Chunk, ErrorKind, raw_prompt

# The allow-listed request fields litellm receives; it maps them per provider and refuses the
# ones a provider lacks (UnsupportedParamsError -> BAD_REQUEST) rather than dropping them silently.
_PASSED = (
    "temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "stop", "presence_penalty",
    "frequency_penalty", "logit_bias", "logprobs", "top_logprobs", "seed", "response_format", "tools",
    "tool_choice", "parallel_tool_calls", "reasoning_effort", "top_k", "min_p", "repetition_penalty",
)  # fmt: skip
# litellm's additions to OpenAI's shape, dropped when empty so clients (and the cache) see OpenAI's.
_EXTRAS = frozenset({"provider_specific_fields", "citations", "token_ids", "stop_reason", "audio",
                     "function_call", "prompt_logprobs", "prompt_token_ids", "prompt_text",
                     "kv_transfer_params", "ec_transfer_params", "metrics", "service_tier"})  # fmt: skip
_URL = re.compile(r"\b(?:https?|wss?)://\S+")
_SECRET = re.compile(r"\b(?:sk|pk|key|rk)-[A-Za-z0-9_*.-]{6,}|Bearer\s+\S+", re.IGNORECASE)
_PARAMS = re.compile(r"does not support parameters: (\[[^\]]*\])")


class LiteLLMSettings(Protocol):
    """What this backend reads: proxy.settings.LiteLLMBackendSettings fits (no import of the edge)."""

    @property
    def model(self) -> str: ...
    @property
    def api_base(self) -> str: ...
    @property
    def api_key(self) -> str: ...
    @property
    def first_token_timeout_s(self) -> float: ...
    @property
    def request_timeout_s(self) -> float: ...
    @property
    def context_length(self) -> int | None: ...


def _upstream_message(exc: Exception) -> str | None:
    """The provider's own `error.message` from the JSON litellm embeds in its exception text."""
    text = str(getattr(exc, "message", "") or "")
    try:
        data, _ = json.JSONDecoder().raw_decode(text, text.index("{"))
    except ValueError:  # no "{" at all, or no JSON object from there
        return None
    err = data.get("error", data) if isinstance(data, dict) else None
    message = err.get("message") if isinstance(err, dict) else None
    if not isinstance(message, str) or not message:
        return None
    return _SECRET.sub("<redacted>", _URL.sub("<url>", message))[:500]  # no URLs, no keys


def _caused_by(exc: BaseException, types: tuple[type[BaseException], ...]) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, types):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def translate(exc: Exception, lm: Any, *, mid_stream: bool = False) -> BackendError:
    """One litellm exception as a BackendError. Transport causes are checked first: litellm wraps
    a refused connection in InternalServerError (500), which must stay a CONNECT."""
    import httpx  # a litellm dependency: present whenever lm is

    if mid_stream:
        return BackendError(ErrorKind.MID_STREAM, "The model server failed while streaming.")
    code = getattr(exc, "status_code", None)
    status = code if isinstance(code, int) else None
    if isinstance(exc, lm.Timeout) or _caused_by(exc, (httpx.TimeoutException, TimeoutError)):
        return BackendError(ErrorKind.TIMEOUT, "The model server timed out.", status=status)
    transport = (httpx.TransportError, aiohttp.ClientConnectionError, ConnectionError)
    if isinstance(exc, lm.APIConnectionError) or _caused_by(exc, transport):
        return BackendError(ErrorKind.CONNECT, "The model server could not be reached.")
    if isinstance(exc, lm.RateLimitError) or status == 429:
        return BackendError(ErrorKind.RATE_LIMITED, "The model server is rate limiting.", status=429)
    if isinstance(exc, lm.ContextWindowExceededError):
        message = _upstream_message(exc) or "The request is longer than the model's context window."
        return BackendError(ErrorKind.BAD_REQUEST, message, status=400, param="messages")
    if isinstance(exc, lm.UnsupportedParamsError):
        found = _PARAMS.search(str(exc))
        message = f"The model does not support a parameter{f': {found[1]}' if found else ''}."
        return BackendError(ErrorKind.BAD_REQUEST, message, status=400)
    if status in REFUSALS:  # the provider refuses our key or model id; its text may quote the key
        return BackendError(
            ErrorKind.REFUSED, f"The model server refused the gateway ({status}).", status=status
        )
    if status is not None and 400 <= status < 500:
        said = _upstream_message(exc) if status in (400, 422) else None  # validation: what to fix
        message = said or f"The model server rejected the request ({status})."
        return BackendError(ErrorKind.BAD_REQUEST, message, status=400)
    what = f" ({status})" if status is not None and status >= 500 else ""
    return BackendError(ErrorKind.UPSTREAM_5XX, f"The model server failed{what}.", status=status)


def _tidy(obj: Any) -> Any:
    """Drops litellm's extras, at any depth, where they say nothing (None, or a dict of Nones)."""
    if isinstance(obj, list):
        return [_tidy(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    return {k: _tidy(v) for k, v in obj.items() if not (k in _EXTRAS and _says_nothing(v))}


def _says_nothing(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and all(v is None for v in value.values()))


def _chunk(raw: Any) -> Chunk:
    """litellm's usage chunk carries a placeholder choice; OpenAI's (and the pipeline's) has none."""
    chunk: Chunk = _tidy(raw.model_dump())
    if chunk.get("usage") and all(
        not c.get("finish_reason") and not any((c.get("delta") or {}).values()) for c in chunk["choices"]
    ):
        chunk["choices"] = []
    return chunk


class LiteLLMChunkStream:
    """One litellm stream as chunk dicts. The first chunk must come by `first_deadline` (loop time)."""

    def __init__(self, raw: Any, lm: Any, first_deadline: float) -> None:
        self._raw = raw
        self._lm = lm
        self._first_deadline = first_deadline
        self._iter = self._chunks()  # one iterator: the first chunk and the rest come from it

    def __aiter__(self) -> AsyncGenerator[Chunk, None]:
        return self._iter

    async def _chunks(self) -> AsyncGenerator[Chunk, None]:
        try:
            async with asyncio.timeout_at(self._first_deadline):
                first = await anext(self._raw, None)
        except TimeoutError:
            raise BackendError(ErrorKind.TIMEOUT, "The model server sent no first token in time.") from None
        except Exception as exc:
            raise translate(exc, self._lm) from exc
        if first is None:
            raise BackendError(ErrorKind.CONNECT, "The model server ended the stream early.")
        yield _chunk(first)
        try:
            async for raw in self._raw:
                yield _chunk(raw)
        except Exception as exc:
            raise translate(exc, self._lm, mid_stream=True) from exc

    async def aclose(self) -> None:
        """Idempotent; closes the upstream HTTP response, so the provider stops generating."""
        try:
            await self._iter.aclose()
        finally:
            await self._raw.aclose()


class LiteLLMBackend:
    """One litellm model string (e.g. "anthropic/claude-..." or "hosted_vllm/<model>")."""

    def __init__(self, name: str, settings: LiteLLMSettings) -> None:
        self.name = name
        self.model: str = settings.model
        self.context_length: int | None = settings.context_length
        self._s = settings
        self._lm: Any = None

    async def start(self) -> None:
        # Without this, importing litellm fetches a price list from GitHub (retrying in a thread).
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        try:
            import litellm
        except ImportError as exc:
            hint = "install the extra with pip install 'llm-gateway[litellm]'"
            raise RuntimeError(f"backend {self.name} has type litellm: {hint}") from exc
        litellm.suppress_debug_info = True  # no "Give Feedback / Get Help" banners on errors
        self._lm = litellm

    async def close(self) -> None:
        """Closes litellm's HTTP clients: they are cached process-wide (per event loop), so every
        litellm backend shares them, and this is for shutdown only."""
        if self._lm is None:
            return
        await self._lm.close_litellm_async_clients()
        self._lm.in_memory_llm_clients_cache.flush_cache()

    def _kwargs(self, body: Body, *, stream: bool) -> dict[str, Any]:
        if raw_prompt(body) is not None:  # a legacy completion must not be sent as a chat turn
            raise BackendError(
                ErrorKind.BAD_REQUEST, "This model's backend does not serve legacy completions.", status=400
            )
        kwargs = {k: body[k] for k in _PASSED if body.get(k) is not None}
        if stream:
            kwargs |= {"stream": True, "stream_options": body.get("stream_options")}
        return {
            "model": self.model,
            "messages": body["messages"],
            "api_base": self._s.api_base or None,
            "api_key": self._s.api_key or None,
            "timeout": self._s.request_timeout_s,
            "num_retries": 0,  # the pool retries and falls over; litellm must not multiply that
            "max_retries": 0,
            **kwargs,
        }

    def _started(self) -> Any:
        if self._lm is None:
            raise RuntimeError(f"backend {self.name} used before start()")
        return self._lm

    async def chat(self, body: Body) -> Body:
        lm, kwargs = self._started(), self._kwargs(body, stream=False)
        try:
            async with asyncio.timeout(self._s.request_timeout_s):
                resp = await lm.acompletion(**kwargs)
        except TimeoutError:
            raise BackendError(ErrorKind.TIMEOUT, "The model server timed out.") from None
        except Exception as exc:
            raise translate(exc, lm) from exc
        return dict(_tidy(resp.model_dump()))

    async def stream(self, body: Body) -> LiteLLMChunkStream:
        lm, kwargs = self._started(), self._kwargs(body, stream=True)
        deadline = asyncio.get_running_loop().time() + self._s.first_token_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                raw = await lm.acompletion(**kwargs)
        except TimeoutError:
            raise BackendError(ErrorKind.TIMEOUT, "The model server timed out before answering.") from None
        except Exception as exc:
            raise translate(exc, lm) from exc
        return LiteLLMChunkStream(raw, lm, deadline)

    async def health(self) -> bool:
        return True  # hosted providers have no cheap probe: the breaker decides

    async def load(self) -> float | None:
        return None

    def count_tokens(self, messages: list[Any]) -> int | None:
        return None
