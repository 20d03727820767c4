"""The simulated vLLM's legacy completions and embeddings: request checks with vLLM's messages, the
`text_completion` wire format (stream and JSON) and deterministic embedding vectors. No I/O.

A completions request is planned as a chat turn holding the prompt (sim_plan.build_plan: the same
replies, scripts, faults and timing), then spoken in vLLM's completions format, as its server
serializes it (vllm/entrypoints/openai/completion/{protocol,serving}.py): stream chunks are
`model_dump_json(exclude_unset=True)` with every choice field set (so nulls included) and no role
chunk; the trailing usage chunk is `exclude_none=True`; the JSON answer is `model_dump()`.
Embeddings follow vllm/entrypoints/pooling/embed (`embd-` id, `object: list`, float or base64
float32 vectors, usage without completion tokens).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from loadtest.sim_plan import Plan, RequestError, SimConfig, build_plan, completion_body, stream_frames
from loadtest.sim_wire import DONE

COMPLETIONS_PATH = "/v1/completions"
EMBED_DIM = 384  # multilingual-e5-small's, a common vLLM embedding model
DEFAULT_MAX_TOKENS = 16  # vLLM's CompletionRequest default
_SPECIAL_TOKENS = 2  # an encoder's [CLS] ... [SEP] around each embedded text


@dataclass(slots=True)
class TextPlan(Plan):
    """A completions answer: the chat plan of its prompt, spoken as `text_completion`."""

    logprobs: int | None = None  # top alternatives per token, when the request asked for logprobs


def plan_request(path: str, body: Any, cfg: SimConfig, rid: str) -> tuple[Plan, Any]:
    """(the plan, the chat-form body the engine reads) for a request to `path`."""
    if path != COMPLETIONS_PATH:
        return build_plan(body, cfg, rid), body
    chat = _chat_form(body)
    plan = build_plan(chat, cfg, rid)
    fields = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)} | {"agent": None}
    return TextPlan(**fields, logprobs=body.get("logprobs")), chat


def _chat_form(body: Any) -> dict[str, Any]:
    """A completions body checked as vLLM checks it, as the chat turn the planner reads."""
    if not isinstance(body, dict):
        raise RequestError(400, "Request body must be a JSON object.")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError(400, "Either prompt or prompt_embeds must be provided and non-empty.")
    if body.get("suffix") is not None:
        raise RequestError(400, "suffix is not currently supported")
    logprobs = body.get("logprobs")
    if logprobs is not None and (type(logprobs) is not int or logprobs < -1):
        raise RequestError(400, "`logprobs` must be a positive value or -1.")
    chat = {k: v for k, v in body.items() if k not in ("prompt", "logprobs", "echo", "suffix")}
    chat["messages"] = [{"role": "user", "content": prompt}]
    if chat.get("max_tokens") is None:
        chat["max_tokens"] = DEFAULT_MAX_TOKENS
    return chat


def plan_frames(plan: Plan, ttft: float, itl: float) -> Iterator[tuple[float, bytes]]:
    """(delay before it, frame) for every SSE frame of the plan's answer, in its wire format."""
    if not isinstance(plan, TextPlan):
        yield from stream_frames(plan, ttft, itl)
        return
    created = int(time.time())
    last, sent = len(plan.tokens) - 1, [0] * plan.n
    for step, token in enumerate(plan.tokens):
        for i in range(plan.n):
            choice = _choice(plan, i, (token,), sent[i], plan.finish if step == last else None)
            sent[i] += len(token)
            chunk = _head(plan, created) | {"choices": [choice]}
            if plan.continuous:
                chunk["usage"] = _usage(plan.prompt_tokens, step + 1)
            yield (ttft if step == 0 and i == 0 else itl if i == 0 else 0.0), _frame(chunk)
    if plan.include_usage:
        usage = _usage(plan.prompt_tokens, plan.n * len(plan.tokens))
        yield 0.0, _frame(_head(plan, created) | {"choices": [], "usage": usage})
    yield 0.0, DONE


def plan_body(plan: Plan) -> bytes:
    """The non-stream answer of the plan, in its wire format."""
    if not isinstance(plan, TextPlan):
        return completion_body(plan)
    choices = []
    for i in range(plan.n):
        streamed = _choice(plan, i, plan.tokens, 0, plan.finish)
        extra = {"prompt_logprobs": None, "prompt_token_ids": None, "routed_experts": None}
        choices.append({k: streamed[k] for k in _JSON_CHOICE} | extra)
    usage = _usage(plan.prompt_tokens, plan.n * len(plan.tokens)) | {"prompt_tokens_details": None}
    return orjson.dumps(
        _head(plan, int(time.time()))
        | {"choices": choices, "service_tier": None, "system_fingerprint": None, "usage": usage}
        | {"kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
    )


_JSON_CHOICE = ("index", "text", "logprobs", "finish_reason", "stop_reason", "token_ids")


def _head(plan: Plan, created: int) -> dict[str, Any]:
    return {"id": plan.rid, "object": "text_completion", "created": created, "model": plan.model}


def _choice(
    plan: TextPlan, index: int, tokens: tuple[str, ...], offset: int, finish: str | None
) -> dict[str, Any]:
    """A stream choice (a JSON answer's takes its first fields): `tokens` from `offset` on."""
    return {
        "index": index,
        "text": "".join(tokens),
        "logprobs": None if plan.logprobs is None else _logprobs(tokens, offset, plan.logprobs),
        "finish_reason": finish,
        "stop_reason": None,
        "prompt_token_ids": None,
        "token_ids": None,
    }


def _logprobs(tokens: tuple[str, ...], offset: int, alternatives: int) -> dict[str, Any]:
    """Made-up but well-formed log probabilities: each token's, and `alternatives` others."""
    out: dict[str, list[Any]] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for token in tokens:
        value = -0.05 * (1 + offset % 7)
        out["text_offset"].append(offset)
        out["token_logprobs"].append(value)
        out["tokens"].append(token)
        others = {f"<alt{j}>": value - j for j in range(1, alternatives + 1)}
        out["top_logprobs"].append({token: value} | others)
        offset += len(token)
    return out


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


def _frame(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


# -- embeddings -----------------------------------------------------------------------------------
def embeddings_body(body: Any, cfg: SimConfig, rid: str) -> bytes:
    """vLLM's EmbeddingResponse for `body`, or RequestError as vLLM would refuse it."""
    if not isinstance(body, dict):
        raise RequestError(400, "Request body must be a JSON object.")
    model = body.get("model")
    if cfg.check_model and model is not None and model != cfg.model:
        raise RequestError(404, f"The model `{model}` does not exist.")
    texts = _inputs(body.get("input"))
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise RequestError(400, f"Unsupported encoding_format: {fmt}")
    dims = body.get("dimensions")
    if dims is not None and (type(dims) is not int or not 1 <= dims <= EMBED_DIM):
        raise RequestError(400, f"dimensions must be between 1 and {EMBED_DIM}.")
    counts = [len(t.split()) + _SPECIAL_TOKENS for t in texts]
    if max(counts) > cfg.max_model_len:
        raise RequestError(
            400,
            f"This model's maximum context length is {cfg.max_model_len} tokens. However, you requested "
            f"{max(counts)} tokens in the input for embedding generation. Please reduce the length of "
            "the input.",
        )
    data = [
        {"index": i, "object": "embedding", "embedding": _encode(vector(t, dims or EMBED_DIM), fmt)}
        for i, t in enumerate(texts)
    ]
    total = sum(counts)
    usage = _usage(total, 0) | {"prompt_tokens_details": None}
    head = {"id": rid, "object": "list", "created": int(time.time()), "model": cfg.model}
    return orjson.dumps(head | {"data": data, "usage": usage})


def _inputs(value: Any) -> list[str]:
    """The texts to embed; token-id inputs are read as their ids' text (vLLM takes them too)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RequestError(400, "input must be a non-empty string or list.")
    if all(isinstance(v, int) for v in value):
        return [" ".join(map(str, value))]
    texts = []
    for v in value:
        if isinstance(v, list) and all(isinstance(t, int) for t in v):
            v = " ".join(map(str, v))
        if not isinstance(v, str):
            raise RequestError(400, "input must be a string, a list of strings or of token ids.")
        texts.append(v)
    return texts


def vector(text: str, dims: int) -> list[float]:
    """A unit vector that depends on the text alone (the same text, the same vector)."""
    raw = b""
    counter = 0
    while len(raw) < 4 * dims:
        raw += hashlib.blake2b(text.encode(), digest_size=64, salt=struct.pack("<Q", counter)).digest()
        counter += 1
    values = [v / 2**31 - 1.0 for v in struct.unpack(f"<{dims}I", raw[: 4 * dims])]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _encode(values: list[float], fmt: str) -> list[float] | str:
    if fmt == "float":
        return values
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
