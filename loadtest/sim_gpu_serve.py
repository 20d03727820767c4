"""The GPU-modelling mode on the simulator's event loop: one engine-step loop per replica, turning
requests into engine sequences (vLLM's `priority` and `cache_salt` fields) and pacing each
request's tokens by the engine's steps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import Any

from loadtest.sim_gpu import Engine, GpuParams, Seq, block_hashes, render_prompt, text_pieces
from loadtest.sim_plan import Plan, RequestError

ZERO_GPU_COUNTERS = dict.fromkeys(
    ("prefix_cache_queries_total", "prefix_cache_hits_total", "num_preemptions_total"), 0.0
)
_MAX_LAG_S = 0.05  # behind the modelled schedule by more than this: the host was busy, start afresh


@dataclasses.dataclass(eq=False)
class Ticket:
    """A handler's view of its sequence: woken whenever the engine produced a token for it."""

    seq: Seq
    woken: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class GpuReplica:
    """One simulated GPU. Steps run back to back while there is work; each step's modelled
    duration is slept (against a running deadline, so event-loop latency does not add up)."""

    def __init__(
        self,
        params: GpuParams,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.params = params
        self.engine = Engine(params)
        self._sleep, self._clock = sleep, clock
        self._tickets: dict[Seq, Ticket] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._retired = False

    def prepare(self, plan: Plan, body: dict[str, Any], max_model_len: int) -> tuple[Plan, Ticket]:
        """Validate vLLM's engine-side fields and tokenize; the plan's answer is re-split into the
        engine's tokens (the same text) and its prompt count is the engine's."""
        priority = body.get("priority", 0)
        if type(priority) is not int:
            raise RequestError(400, "priority must be an integer.")
        if priority != 0 and self.params.policy != "priority":
            raise RequestError(400, f"Got priority {priority} but Priority scheduling is not enabled.")
        salt = body.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise RequestError(400, "Parameter 'cache_salt' must be a non-empty string if provided.")
        prompt = render_prompt(body["messages"])
        if len(prompt) >= max_model_len:
            raise RequestError(
                400,
                f"This model's maximum context length is {max_model_len} tokens. However, your "
                f"request has {len(prompt)} input tokens. Please reduce the length of the input messages.",
            )
        out = text_pieces("".join(plan.tokens)) or ("",)
        finish = plan.finish
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if limit is not None and len(out) > limit:
            out, finish = out[:limit], "length"
        plan = dataclasses.replace(plan, tokens=out, finish=finish, prompt_tokens=len(prompt))
        hashes = block_hashes([*prompt, *out], self.params.block_size, salt)
        seq = Seq(prompt_len=len(prompt), out_len=len(out), hashes=hashes, priority=priority)
        return plan, Ticket(seq)

    def submit(self, ticket: Ticket) -> None:
        if self._retired:
            raise RuntimeError("replica retired")
        self._tickets[ticket.seq] = ticket
        self.engine.add(ticket.seq)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-gpu-engine")

    async def wait_tokens(self, ticket: Ticket, count: int) -> None:
        """Until the sequence has produced `count` tokens, or has ended."""
        seq = ticket.seq
        while seq.generated < count and seq.state not in ("finished", "aborted"):
            ticket.woken.clear()
            await ticket.woken.wait()

    def pacer(self, ticket: Ticket) -> Callable[[float], Awaitable[None]]:
        """A stand-in for `asyncio.sleep` in the stream writer: the k-th wait is for token k."""
        calls = 0

        async def wait(_delay: float) -> None:
            nonlocal calls
            calls += 1
            await self.wait_tokens(ticket, calls)

        return wait

    def release(self, ticket: Ticket) -> None:
        """The handler is done (or its client left): an unfinished sequence is aborted."""
        self._tickets.pop(ticket.seq, None)
        if ticket.seq.state in ("waiting", "running"):
            self.engine.abort(ticket.seq)

    def metrics(self, extra_waiting: int) -> tuple[dict[str, float], dict[str, float]]:
        """(gauges, counters) under vLLM's metric names, without the `vllm:` prefix."""
        engine, stats = self.engine, self.engine.stats
        gauges = {
            "num_requests_running": len(engine.running),
            "num_requests_waiting": extra_waiting + engine.waiting,
            "kv_cache_usage_perc": engine.usage(),
        }
        counters: dict[str, float] = {
            "prompt_tokens_total": stats.prompt_tokens,
            "generation_tokens_total": stats.generation_tokens,
            "prefix_cache_queries_total": stats.prefix_queries,
            "prefix_cache_hits_total": stats.prefix_hits,
            "num_preemptions_total": stats.preemptions,
        }
        return gauges, counters

    def retire(self) -> None:
        """Replaced by a new replica: finish what is in flight, then stop the loop."""
        self._retired = True
        self._wake.set()

    async def close(self) -> None:
        self.retire()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        deadline: float | None = None
        while True:
            step = self.engine.plan_step()
            if step is None:
                if self._retired:
                    return
                deadline = None
                self._wake.clear()
                await self._wake.wait()
                continue
            now = self._clock()
            deadline = now + step if deadline is None or deadline < now - _MAX_LAG_S else deadline + step
            await self._sleep(max(0.0, deadline - now))
            for seq in self.engine.finish_step():
                ticket = self._tickets.get(seq)
                if ticket is not None:
                    ticket.woken.set()
