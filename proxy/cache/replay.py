"""The stored form of a cached answer, and replay to streaming and non-streaming clients. Pure.

A streamed answer is stored as its original chunk dicts (so a replay keeps the original boundaries;
the usage-only chunk is dropped and usage kept aside); a JSON answer as its completion dict. Either
can be replayed either way: a stream to a JSON client is folded into one completion, a completion to
a streaming client becomes role, content and finish chunks (no artificial splitting, no sleeps), with
the trailing usage chunk when the client asked for `stream_options.include_usage`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

COMPLETE_FINISH = frozenset({"stop", "length"})


@dataclass
class CachedAnswer:
    """A stream is kept as its original chunks (usage chunk removed, usage kept aside); JSON as is."""

    layer: Literal["hit", "semantic-hit"]
    chunks: list[dict[str, Any]] | None
    completion: dict[str, Any] | None
    usage: dict[str, Any] | None = None
    policy: str | None = None  # the output check it passed (PolicyGuard.output_stamp), if any


def is_complete(answer: CachedAnswer) -> bool:
    """Only whole, successful answers are stored: every choice finished with stop/length, no error."""
    if answer.completion is not None:
        choices = answer.completion.get("choices") or []
        return bool(choices) and all(c.get("finish_reason") in COMPLETE_FINISH for c in choices)
    if not answer.chunks or any("error" in c for c in answer.chunks):
        return False
    seen: dict[int, str | None] = {}
    for chunk in answer.chunks:
        for choice in chunk.get("choices") or []:
            seen[choice.get("index", 0)] = choice.get("finish_reason") or seen.get(choice.get("index", 0))
    return bool(seen) and all(reason in COMPLETE_FINISH for reason in seen.values())


def usage_of(answer: CachedAnswer) -> dict[str, Any] | None:
    """The usage stored with the answer: kept aside, in the completion, or in a usage chunk."""
    return answer.usage or (answer.completion or {}).get("usage") or _chunk_usage(answer.chunks or [])


def encode(answer: CachedAnswer) -> bytes:
    chunks = None
    if answer.chunks is not None:  # the usage-only chunk is dropped; usage is kept aside
        chunks = [{k: v for k, v in c.items() if k != "usage"} for c in answer.chunks if c.get("choices")]
    usage = usage_of(answer)
    return orjson.dumps(
        {"v": 1, "chunks": chunks, "completion": answer.completion, "usage": usage, "policy": answer.policy}
    )


def decode(raw: bytes, layer: Literal["hit", "semantic-hit"]) -> CachedAnswer:
    data = orjson.loads(raw)
    return CachedAnswer(layer, data["chunks"], data["completion"], data["usage"], data.get("policy"))


def _chunk_usage(chunks: list[dict[str, Any]]) -> dict[str, Any] | None:
    usage = [c["usage"] for c in chunks if c.get("usage")]
    return usage[-1] if usage else None


def completion_to_chunks(completion: dict[str, Any], *, include_usage: bool) -> list[dict[str, Any]]:
    """A JSON answer as a stream: role chunk, one content chunk, finish chunk (+ usage chunk)."""
    base: dict[str, Any] = {
        k: completion[k] for k in ("id", "created", "model", "system_fingerprint") if k in completion
    }
    base["object"] = "chat.completion.chunk"
    chunks = []
    for choice in completion.get("choices", []):
        message, index = choice.get("message") or {}, choice.get("index", 0)
        deltas = [{"role": message.get("role", "assistant"), "content": ""}]
        for field in ("reasoning_content", "content", "refusal"):
            if message.get(field):
                deltas.append({field: message[field]})
        for delta in deltas:
            chunks.append(
                base
                | {"choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}
            )
        last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.get("finish_reason")}
        chunks.append(base | {"choices": [last]})
    if include_usage:
        chunks = [c | {"usage": None} for c in chunks]
        chunks.append(base | {"choices": [], "usage": completion.get("usage")})
    return chunks


def chunks_to_completion(chunks: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    """A stream's chunks folded into one chat.completion object."""
    messages: dict[int, dict[str, Any]] = {}
    finish: dict[int, str | None] = {}
    for chunk in chunks:
        for choice in chunk.get("choices") or []:
            index = choice.get("index", 0)
            message = messages.setdefault(index, {"role": "assistant", "content": ""})
            for field, value in (choice.get("delta") or {}).items():
                if field == "role" and value:
                    message["role"] = value
                elif isinstance(value, str):
                    message[field] = message.get(field, "") + value
            finish[index] = choice.get("finish_reason") or finish.get(index)
    first = chunks[0] if chunks else {}
    completion: dict[str, Any] = {
        k: first[k] for k in ("id", "created", "model", "system_fingerprint") if k in first
    }
    completion["object"] = "chat.completion"
    completion["choices"] = [
        {"index": i, "message": messages[i], "logprobs": None, "finish_reason": finish.get(i)}
        for i in sorted(messages)
    ]
    completion["usage"] = usage
    return completion


def replay_chunks(
    answer: CachedAnswer, *, request_id: str, created: int, model: str, include_usage: bool
) -> list[dict[str, Any]]:
    """The chunks to send to a streaming client: original boundaries, fresh id/created, public model."""
    if answer.chunks is None:
        completion = answer.completion or {}
        chunks = completion_to_chunks(
            completion | {"usage": answer.usage or completion.get("usage")}, include_usage=include_usage
        )
    else:
        chunks = [{k: v for k, v in c.items() if k != "usage"} for c in answer.chunks if c.get("choices")]
        if include_usage:
            chunks = [c | {"usage": None} for c in chunks]
            usage = answer.usage or _chunk_usage(answer.chunks)
            chunks.append({"object": "chat.completion.chunk", "choices": [], "usage": usage})
    fresh = {"id": request_id, "created": created, "model": model}
    return [c | fresh for c in chunks]


def replay_completion(answer: CachedAnswer, *, request_id: str, created: int, model: str) -> dict[str, Any]:
    """The JSON body for a non-streaming client, whichever way the answer was first produced."""
    if answer.completion is not None:
        completion = dict(answer.completion)
        completion["usage"] = answer.usage or completion.get("usage")
    else:
        completion = chunks_to_completion(answer.chunks or [], answer.usage)
    return completion | {"id": request_id, "created": created, "model": model, "object": "chat.completion"}
