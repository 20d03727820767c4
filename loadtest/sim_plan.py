"""What a simulated vLLM answers: run-time config, request validation with vLLM's messages and
statuses, the deterministic reply, and the order and timing of SSE frames. No I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from loadtest.sim_agent import REASONING_FIELDS, AgentReply, agent_reply, check_script
from loadtest.sim_gpu import GpuParams
from loadtest.sim_wire import DONE, StreamEncoder, chat_completion

# stall: hold the request before any byte; stall_stream: after `drop_after_chunks` frames (0: after
# the headers), pause `stall_s`; drop / reset: close / reset the connection after that many frames
FAULTS = frozenset({"none", "status", "stall", "stall_stream", "drop", "reset", "slow", "refuse"})
MODES = frozenset({"zero", "gpu"})
_FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do")
_PROMPT_HEAD_WORDS = 8
_TOKENS_PER_MESSAGE = 4


@dataclass(frozen=True)
class SimConfig:
    """Everything a test or load test can change at run time; replaced whole, never mutated."""

    model: str = "sim-model"
    max_model_len: int = 4096
    ttft_ms: float = 0
    itl_ms: float = 0
    reply_tokens: int = 16
    fault: str = "none"
    fault_status: int = 503
    fault_message: str = "Simulated fault."  # the error text of fault="status"
    drop_after_chunks: int = 2
    stall_s: float = 30
    waiting: int = 0
    max_num_seqs: int = 256
    scripts: dict[str, list[str]] = field(default_factory=dict)
    check_model: bool = True  # vLLM answers 404 for a model it does not serve
    legacy_errors: bool = False  # vLLM < 0.10 error body: {"object": "error", ...}
    # reasoning and tool calls on request (loadtest/sim_agent.py): exact pieces by prompt substring
    agent_scripts: dict[str, dict[str, Any]] = field(default_factory=dict)
    reasoning_field: str = "reasoning"  # | "reasoning_content" (older vLLM) | "both"
    # mode="gpu" models one GPU replica (loadtest/sim_gpu.py, SIM_GPU.md); "zero" is fixed delays.
    mode: str = "zero"
    scheduling_policy: str = "fcfs"  # vLLM's --scheduling-policy (gpu mode): fcfs | priority
    gpu_kv_blocks: int = 25_000
    gpu_block_size: int = 16
    gpu_max_batched_tokens: int = 8192
    gpu_prefill_tok_s: float = 20_000.0
    gpu_step_ms: float = 7.0
    gpu_step_ms_per_seq: float = 0.111

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault must be one of {sorted(FAULTS)}, got {self.fault!r}")
        for name in ("max_model_len", "reply_tokens", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("ttft_ms", "itl_ms", "drop_after_chunks", "stall_s", "waiting"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 100 <= self.fault_status <= 599:
            raise ValueError("fault_status must be an HTTP status")
        for key, chunks in self.scripts.items():
            if not chunks or not all(isinstance(c, str) for c in chunks) or not isinstance(key, str):
                raise ValueError(f"script {key!r} must map to a non-empty list of strings")
        for key, script in self.agent_scripts.items():
            check_script(key, script)
        if self.reasoning_field not in REASONING_FIELDS:
            raise ValueError(f"reasoning_field must be one of {sorted(REASONING_FIELDS)}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {sorted(MODES)}, got {self.mode!r}")
        self.gpu_params()  # validates the gpu_* fields in either mode

    def gpu_params(self) -> GpuParams:
        return GpuParams(
            num_blocks=self.gpu_kv_blocks,
            block_size=self.gpu_block_size,
            max_num_seqs=self.max_num_seqs,
            max_batched_tokens=self.gpu_max_batched_tokens,
            prefill_tok_s=self.gpu_prefill_tok_s,
            step_ms=self.gpu_step_ms,
            step_ms_per_seq=self.gpu_step_ms_per_seq,
            policy=self.scheduling_policy,
        )

    def replace(self, changes: Mapping[str, Any]) -> SimConfig:
        """A validated copy with `changes` applied; unknown keys are an error."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_json(self) -> bytes:
        return orjson.dumps(dataclasses.asdict(self))


class RequestError(Exception):
    """A request vLLM would refuse before generating: rendered as vLLM's error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True)
class Plan:
    """What one chat completion will produce: every choice streams the same tokens."""

    rid: str
    model: str
    n: int
    tokens: tuple[str, ...]
    finish: str
    prompt_tokens: int
    stream: bool
    include_usage: bool
    continuous: bool
    agent: AgentReply | None = None  # reasoning / tool calls; `tokens` are then its steps' texts


@functools.lru_cache(maxsize=4096)
def default_reply(prompt_head: str, reply_tokens: int) -> tuple[str, ...]:
    """The default reply, `Simulated answer to: <first prompt words> lorem ipsum ...`, cut to
    `reply_tokens` tokens; a token is a word with its leading space, so joined they are the text."""
    words = ["Simulated", "answer", "to:", *prompt_head.split()]
    words += [_FILLER[i % len(_FILLER)] for i in range(max(0, reply_tokens - len(words)))]
    words = words[:reply_tokens]
    return (words[0], *(" " + w for w in words[1:]))


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text parts count
        return " ".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def _read_prompt(messages: list[dict[str, Any]]) -> tuple[int, str]:
    """(prompt token estimate, last user message): words + 4 per message, a stand-in for a tokenizer."""
    count, last_user = 0, ""
    for message in messages:
        text = _text(message.get("content"))
        count += len(text.split()) + _TOKENS_PER_MESSAGE
        if message.get("role") == "user":
            last_user = text
    return count, last_user


def _reply(cfg: SimConfig, last_user: str) -> tuple[str, ...]:
    for key, chunks in cfg.scripts.items():
        if key in last_user:
            return tuple(chunks)
    return default_reply(" ".join(last_user.split()[:_PROMPT_HEAD_WORDS]), cfg.reply_tokens)


def _int_param(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and (type(value) is not int or value < 1):
        raise RequestError(400, f"{name} must be at least 1, got {value}.")
    return value


def build_plan(body: Any, cfg: SimConfig, rid: str) -> Plan:
    """Validate a request the way vLLM does (same messages, same statuses) and plan its answer."""
    if not isinstance(body, dict):
        raise RequestError(400, "Request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise RequestError(400, "'messages' must be a non-empty list of message objects.")
    model = body.get("model")
    if cfg.check_model and model is not None and model != cfg.model:
        raise RequestError(404, f"The model `{model}` does not exist.")
    n = _int_param(body, "n") or 1
    max_tokens = _int_param(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int_param(body, "max_tokens")
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise RequestError(400, "Stream options can only be defined when `stream=True`.")
    prompt_tokens, last_user = _read_prompt(messages)
    limit = cfg.max_model_len
    if prompt_tokens >= limit:
        raise RequestError(
            400,
            f"This model's maximum context length is {limit} tokens. However, your "
            f"request has {prompt_tokens} input tokens. Please reduce the length of the "
            "input messages.",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > limit:
        raise RequestError(
            400,
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This "
            f"model's maximum context length is {limit} tokens and your request has "
            f"{prompt_tokens} input tokens ({max_tokens} > {limit} - {prompt_tokens}).",
        )
    tokens = _reply(cfg, last_user)
    agent = agent_reply(body, last_user, cfg.agent_scripts, cfg.reasoning_field, tokens)
    if agent is not None:
        tokens = agent.tokens()
    budget = max_tokens if max_tokens is not None else limit - prompt_tokens
    include_usage = bool(options and options.get("include_usage"))
    return Plan(
        rid=rid,
        model=cfg.model,
        n=n,
        tokens=tokens[:budget],
        finish="length" if budget < len(tokens) else "stop",
        prompt_tokens=prompt_tokens,
        stream=stream,
        include_usage=include_usage,
        continuous=include_usage and bool(options and options.get("continuous_usage_stats")),
        agent=agent,
    )


def stream_frames(plan: Plan, ttft: float, itl: float) -> Iterator[tuple[float, bytes]]:
    """(delay before it, frame) for every SSE frame, in vLLM's order: the role chunks and the
    first token after the time to first token, then one chunk per choice per token."""
    enc = StreamEncoder(plan.rid, int(time.time()), plan.model)
    prompt = plan.prompt_tokens
    yield ttft, enc.role(0, prompt if plan.continuous else None)
    for i in range(1, plan.n):
        yield 0.0, enc.role(i, prompt if plan.continuous else None)
    last = len(plan.tokens) - 1
    if plan.agent is not None:
        yield from _agent_frames(enc, plan, plan.agent, itl)
        return
    for step, token in enumerate(plan.tokens):
        finish = plan.finish if step == last else None
        usage = (prompt, step + 1) if plan.continuous else None
        for i in range(plan.n):
            yield (itl if step and not i else 0.0), enc.content(i, token, finish, usage)
    if plan.include_usage:
        yield 0.0, enc.usage(prompt, plan.n * len(plan.tokens))
    yield 0.0, DONE


def _agent_frames(
    enc: StreamEncoder, plan: Plan, agent: AgentReply, itl: float
) -> Iterator[tuple[float, bytes]]:
    """The steps of an agent-shaped answer (after the role chunks): one frame per choice each."""
    prompt, last = plan.prompt_tokens, len(plan.tokens) - 1
    for step, delta in enumerate(agent.deltas(len(plan.tokens))):
        finish = agent.finish_reason(plan.finish) if step == last else None
        usage = (prompt, step + 1) if plan.continuous else None
        for i in range(plan.n):
            yield (itl if step and not i else 0.0), enc.delta(i, delta, finish, usage)
    if plan.include_usage:
        yield 0.0, enc.usage(prompt, plan.n * len(plan.tokens))
    yield 0.0, DONE


def completion_body(plan: Plan) -> bytes:
    """The non-stream answer: every choice says the same."""
    usage = plan.n * len(plan.tokens)
    if plan.agent is None:
        contents = [("".join(plan.tokens), plan.finish)] * plan.n
        return chat_completion(plan.rid, plan.model, contents, plan.prompt_tokens, usage)
    finish = plan.agent.finish_reason(plan.finish)
    message = plan.agent.message(len(plan.tokens))
    return chat_completion(plan.rid, plan.model, [("", finish)] * plan.n, plan.prompt_tokens, usage, message)
