"""The legacy completions wire (`POST /v1/completions`) at the backend seam: the internal chat body
of a raw prompt (marked RAW_PROMPT) as a completions body, and `text_completion` chunks as
`chat.completion.chunk` dicts, so that every stage after the backend sees one form.

Log probabilities change shape on the way: the completions form (`tokens`, `token_logprobs`,
`top_logprobs` as {token: logprob}, `text_offset`) becomes chat's `{"content": [...]}`; the
/v1/completions translator (proxy/apis/completions.py) turns them back. Pure functions.
"""

from __future__ import annotations

from typing import Any

from backends.base import RAW_PROMPT, Body, Chunk, raw_prompt

# chat fields with no completions counterpart, or one under another name (set below)
_NOT_SENT = frozenset(
    {
        "messages",
        RAW_PROMPT,
        "max_completion_tokens",
        "logprobs",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning_effort",
    }
)
_HEAD = ("id", "created", "model", "system_fingerprint")


def completion_body(body: Body) -> Body:
    """The /v1/completions body for an internal chat body marked RAW_PROMPT."""
    out = {k: v for k, v in body.items() if k not in _NOT_SENT}
    out["prompt"] = raw_prompt(body)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if limit is not None:
        out["max_tokens"] = limit
    if body.get("logprobs"):
        out["logprobs"] = body.get("top_logprobs") or 0
    return out


def chat_chunk(chunk: Chunk) -> Chunk:
    """A `text_completion` chunk as a `chat.completion.chunk` (usage, id and model kept). Raises
    ValueError when the chunk is not a completion chunk."""
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise ValueError("a completion chunk has a list of choices")
    out: Chunk = {k: chunk[k] for k in _HEAD if k in chunk}
    out["object"] = "chat.completion.chunk"
    out["choices"] = [_choice(c) for c in choices]
    if chunk.get("usage"):
        out["usage"] = chunk["usage"]
    return out


def _choice(choice: Any) -> dict[str, Any]:
    if not isinstance(choice, dict) or not isinstance(choice.get("text", ""), str):
        raise ValueError("a completion choice has a text")
    text = choice.get("text")
    out: dict[str, Any] = {
        "index": int(choice.get("index") or 0),
        "delta": {"content": text} if text else {},
        "logprobs": chat_logprobs(choice.get("logprobs")),
        "finish_reason": choice.get("finish_reason"),
    }
    if choice.get("stop_reason") is not None:
        out["stop_reason"] = choice["stop_reason"]
    return out


def chat_logprobs(logprobs: Any) -> dict[str, Any] | None:
    """Completions log probabilities -> chat's `{"content": [{token, logprob, top_logprobs}]}`."""
    if not isinstance(logprobs, dict) or not logprobs.get("tokens"):
        return None
    values = logprobs.get("token_logprobs") or []
    tops = logprobs.get("top_logprobs") or []
    content = []
    for i, token in enumerate(logprobs["tokens"]):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        content.append(
            {
                "token": token,
                "logprob": values[i] if i < len(values) else None,
                "bytes": None,
                "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in top.items()],
            }
        )
    return {"content": content}
