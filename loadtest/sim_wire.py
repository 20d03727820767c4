"""vLLM's OpenAI wire format as bytes: chat bodies, SSE chunks, errors, model list, metrics.

Pure functions, no I/O. Field sets and order follow vLLM's pydantic models as serialized by its
server (vllm/entrypoints/openai/chat_completion/{protocol,serving}.py, serve/engine/protocol.py):
non-stream bodies are `model_dump()` (every field, nulls included), stream chunks are
`model_dump_json(exclude_unset=True)`, the trailing usage chunk also `exclude_none=True`.
Stream chunks are assembled from precomputed byte templates: this is the load target's hot path.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import Any

import orjson

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
JSON_HEADERS = {"Content-Type": "application/json"}

_CHOICE_OPEN = b'{"index":%d,"delta":{"content":'
_MID = b'},"logprobs":null,"finish_reason":null,"token_ids":null}'
_LAST = b'},"logprobs":null,"finish_reason":"%s","stop_reason":null,"token_ids":null}'
_ROLE = b'{"index":%d,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}'
_DELTA_OPEN = b'{"index":%d,"delta":'
_USAGE = b',"usage":{"prompt_tokens":%d,"total_tokens":%d,"completion_tokens":%d'


def error_type(status: int) -> str:
    """vLLM's `type` for a status: the HTTP phrase in CamelCase, ending in "Error"."""
    try:
        name = HTTPStatus(status).phrase.title().replace(" ", "").replace("-", "")
    except ValueError:
        name = "Unknown"
    return name if name.endswith("Error") else name + "Error"


def error_body(status: int, message: str, *, legacy: bool = False) -> bytes:
    """vLLM's ErrorResponse. Current vLLM nests it under "error" (OpenAI's shape); vLLM before
    0.10 answered a flat `{"object": "error", ...}`, kept behind `legacy`."""
    info: dict[str, Any] = {"message": message, "type": error_type(status), "param": None, "code": status}
    return orjson.dumps({"object": "error", **info} if legacy else {"error": info})


def error_frame(status: int, message: str) -> bytes:
    """The SSE frame vLLM sends when generation fails after the stream has started."""
    return b"data: " + error_body(status, message) + b"\n\n"


class StreamEncoder:
    """The `data: {...}` frames of one chat completion stream; id/created/model fixed per response."""

    __slots__ = ("_head",)

    def __init__(self, rid: str, created: int, model: str) -> None:
        self._head = (
            b'data: {"id":'
            + orjson.dumps(rid)
            + b',"object":"chat.completion.chunk","created":'
            + b"%d" % created
            + b',"model":'
            + orjson.dumps(model)
            + b',"choices":['
        )

    def role(self, index: int, prompt_tokens: int | None = None) -> bytes:
        """First chunk of a choice; usage (continuous stats) counts no completion tokens yet."""
        usage = b"" if prompt_tokens is None else _usage(prompt_tokens, 0, details=True)
        return self._head + _ROLE % index + b"]" + usage + b',"prompt_token_ids":null,"prompt_text":null}\n\n'

    def content(
        self, index: int, text: str, finish: str | None = None, usage: tuple[int, int] | None = None
    ) -> bytes:
        """One token of a choice; the last one carries `finish_reason` (and vLLM's `stop_reason`)."""
        tail = _MID if finish is None else _LAST % finish.encode()
        extra = b"" if usage is None else _usage(usage[0], usage[1], details=True)
        return self._head + _CHOICE_OPEN % index + orjson.dumps(text) + tail + b"]" + extra + b"}\n\n"

    def delta(
        self,
        index: int,
        delta: dict[str, Any],
        finish: str | None = None,
        usage: tuple[int, int] | None = None,
    ) -> bytes:
        """A chunk with any delta (reasoning, tool calls, or empty on a closing token)."""
        tail = _MID if finish is None else _LAST % finish.encode()
        extra = b"" if usage is None else _usage(usage[0], usage[1], details=True)
        body = orjson.dumps(delta)[:-1]  # the closing brace comes with the tail
        return self._head + _DELTA_OPEN % index + body + tail + b"]" + extra + b"}\n\n"

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The trailing `choices: []` chunk sent with `stream_options.include_usage`."""
        return self._head + b"]" + _usage(prompt_tokens, completion_tokens, details=False) + b"}\n\n"


def _usage(prompt: int, completion: int, *, details: bool) -> bytes:
    # Continuous-usage chunks set completion_tokens_details explicitly (to None), so
    # exclude_unset keeps it; the final usage chunk is also exclude_none, which drops it.
    tail = b',"completion_tokens_details":null}' if details else b"}"
    return _USAGE % (prompt, prompt + completion, completion) + tail


def chat_completion(
    rid: str,
    model: str,
    contents: list[tuple[str, str]],
    prompt_tokens: int,
    completion_tokens: int,
    message: dict[str, Any] | None = None,
) -> bytes:
    """A non-stream ChatCompletionResponse; `contents` is (text, finish_reason) per choice, and
    `message`, when given, every choice's message instead of one built from the text."""
    choices = [
        {
            "index": i,
            "message": message
            or {
                "role": "assistant",
                "content": text,
                "refusal": None,
                "annotations": None,
                "audio": None,
                "function_call": None,
                "reasoning": None,
            },
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "token_ids": None,
            "routed_experts": None,
        }
        for i, (text, finish) in enumerate(contents)
    ]
    return orjson.dumps(
        {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "completion_tokens": completion_tokens,
                "prompt_tokens_details": None,
                "completion_tokens_details": None,
            },
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }
    )


def model_list(model: str, max_model_len: int, created: int, perm_id: str) -> bytes:
    """GET /v1/models: vLLM's ModelList with one ModelCard and its ModelPermission."""
    permission = {
        "id": perm_id,
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": model,
        "parent": None,
        "max_model_len": max_model_len,
        "permission": [permission],
    }
    return orjson.dumps({"object": "list", "data": [card]})


_GAUGES = (
    ("num_requests_running", "Number of requests in model execution batches."),
    ("num_requests_waiting", "Number of requests waiting to be processed."),
    ("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
    ("gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage (deprecated name)."),
)
_COUNTERS = (
    ("prompt_tokens_total", "Number of prefill tokens processed."),
    ("generation_tokens_total", "Number of generation tokens processed."),
    ("prefix_cache_queries_total", "Prefix cache queries, in terms of number of queried tokens."),
    ("prefix_cache_hits_total", "Prefix cache hits, in terms of number of cached tokens."),
    ("num_preemptions_total", "Cumulative number of preemption from the engine."),
)


def metrics_text(
    model: str, gauges: dict[str, float], counters: dict[str, float], success: dict[str, int]
) -> bytes:
    """Prometheus text exposition with vLLM's metric names and its `engine`/`model_name` labels."""
    labels = f'{{engine="0",model_name={orjson.dumps(model).decode()}}}'
    lines: list[str] = []
    for kind, table, values in (("gauge", _GAUGES, gauges), ("counter", _COUNTERS, counters)):
        for name, help_text in table:
            full = "vllm:" + name
            lines += [
                f"# HELP {full} {help_text}",
                f"# TYPE {full} {kind}",
                f"{full}{labels} {float(values[name])}",
            ]
    lines += [
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
    ]
    for reason in ("stop", "length"):
        lab = labels[:-1] + f',finished_reason="{reason}"}}'
        lines.append(f"vllm:request_success_total{lab} {float(success.get(reason, 0))}")
    return ("\n".join(lines) + "\n").encode()
