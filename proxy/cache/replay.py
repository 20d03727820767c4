"""The stored form of a cached answer, and replay to streaming and non-streaming clients. Pure.

A streamed answer is stored as its original chunk dicts (so a replay keeps the original boundaries;
the usage-only chunk is dropped and usage kept aside); a JSON answer as its completion dict. Either
can be replayed either way: a stream to a JSON client is folded into one completion by the same
fold that builds JSON answers from backend streams (backends.collect.CompletionBuilder), a
completion to a streaming client becomes role, reasoning, content, refusal, tool-call and finish
chunks (no artificial splitting, no sleeps), with the trailing usage chunk when the client asked
for `stream_options.include_usage`. Only answers whose every choice ended in stop/length are
stored: a tool-call answer (`tool_calls`) never is, and requests with tools are not cached at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson

from backends.collect import REASONING_FIELDS, CompletionBuilder

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
    """A stream is kept as its chunks' choices only: id, created, model and object are replaced
    on replay anyway (they were ~40% of a stored stream), the usage-only chunk is kept aside."""
    chunks = None
    if answer.chunks is not None:
        chunks = [{"choices": c["choices"]} for c in answer.chunks if c.get("choices")]
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
        for field in (*REASONING_FIELDS, "content", "refusal"):
            if message.get(field):
                deltas.append({field: message[field]})
        for i, call in enumerate(message.get("tool_calls") or ()):
            deltas.append({"tool_calls": [{"index": i, **call}]})
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
    """A stream's chunks folded into one chat.completion object (the backends' fold)."""
    builder = CompletionBuilder()
    for chunk in chunks:
        builder.add(chunk)
    return builder.completion() | {"usage": usage}


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
    fresh = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
    return [fresh | c | fresh for c in chunks]


def replay_completion(answer: CachedAnswer, *, request_id: str, created: int, model: str) -> dict[str, Any]:
    """The JSON body for a non-streaming client, whichever way the answer was first produced."""
    if answer.completion is not None:
        completion = dict(answer.completion)
        completion["usage"] = answer.usage or completion.get("usage")
    else:
        completion = chunks_to_completion(answer.chunks or [], answer.usage)
    return completion | {"id": request_id, "created": created, "model": model, "object": "chat.completion"}
