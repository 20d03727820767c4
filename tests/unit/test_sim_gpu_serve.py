"""The GPU replica's engine loop on a virtual clock: request fields, token pacing by steps, the
running deadline, aborts and retirement."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from loadtest.sim_gpu import GpuParams
from loadtest.sim_gpu_serve import GpuReplica, Ticket
from loadtest.sim_plan import RequestError, SimConfig, build_plan


class VirtualClock:
    """`sleep` advances virtual time instead of waiting; `lag` adds host latency to every sleep."""

    def __init__(self, lag: float = 0.0) -> None:
        self.now, self.lag = 0.0, lag
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.sleep(0)  # whoever was woken by the last step sees the time it ended
        self.now += seconds + self.lag


def request(content: str = "hello there", **fields: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": [{"role": "user", "content": content}], **fields}


def prepared(replica: GpuReplica, body: dict[str, Any], max_model_len: int = 4096) -> Ticket:
    plan = build_plan(body, SimConfig(reply_tokens=5), "chatcmpl-x")
    _, ticket = replica.prepare(plan, body, max_model_len)
    return ticket


def replica(clock: VirtualClock, **params: Any) -> GpuReplica:
    defaults: dict[str, Any] = {"step_ms": 10, "step_ms_per_seq": 0, "prefill_tok_s": 1000}
    return GpuReplica(GpuParams(**{**defaults, **params}), sleep=clock.sleep, clock=clock)


async def test_tokens_arrive_at_the_end_of_their_steps() -> None:
    clock = VirtualClock()
    gpu = replica(clock)
    ticket = prepared(gpu, request())
    gpu.submit(ticket)
    prompt = ticket.seq.prompt_len  # <|user|> hello there <|eot|> <|assistant|>
    await gpu.wait_tokens(ticket, 1)
    assert prompt == 5
    assert clock.now == pytest.approx(0.010 + prompt / 1000)
    await gpu.wait_tokens(ticket, 5)
    assert clock.now == pytest.approx(0.010 + prompt / 1000 + 4 * 0.010)
    assert ticket.seq.state == "finished"
    await gpu.close()


async def test_host_latency_does_not_add_up_across_steps() -> None:
    clock = VirtualClock(lag=0.002)  # every wake-up is 2 ms late
    gpu = replica(clock)
    ticket = prepared(gpu, request())
    gpu.submit(ticket)
    await gpu.wait_tokens(ticket, 5)
    assert clock.slept[1:] == pytest.approx([0.008] * 4)  # each step sleeps the lateness off
    await gpu.close()


async def test_the_pacer_waits_for_the_kth_token() -> None:
    clock = VirtualClock()
    gpu = replica(clock)
    ticket = prepared(gpu, request())
    gpu.submit(ticket)
    wait = gpu.pacer(ticket)
    await wait(1.0)
    assert ticket.seq.generated == 1
    await wait(1.0)
    assert ticket.seq.generated == 2
    await gpu.close()


async def test_release_aborts_an_unfinished_request() -> None:
    clock = VirtualClock()
    gpu = replica(clock)
    ticket = prepared(gpu, request())
    gpu.submit(ticket)
    await gpu.wait_tokens(ticket, 2)
    gpu.release(ticket)
    assert ticket.seq.state == "aborted" and not gpu.engine.running and gpu.engine.usage() == 0
    await gpu.close()


async def test_retired_replica_finishes_in_flight_work_then_stops() -> None:
    clock = VirtualClock()
    gpu = replica(clock)
    ticket = prepared(gpu, request())
    gpu.submit(ticket)
    gpu.retire()
    await gpu.wait_tokens(ticket, 5)
    assert ticket.seq.state == "finished"
    with pytest.raises(RuntimeError):
        gpu.submit(prepared(gpu, request()))
    await gpu.close()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"priority": 2}, "Got priority 2 but Priority scheduling is not enabled."),
        ({"priority": "high"}, "priority must be an integer."),
        ({"cache_salt": ""}, "Parameter 'cache_salt' must be a non-empty string if provided."),
    ],
)
def test_engine_fields_are_validated_like_vllm(fields: dict[str, Any], message: str) -> None:
    gpu = replica(VirtualClock())
    with pytest.raises(RequestError) as err:
        prepared(gpu, request(**fields))
    assert (err.value.status, err.value.message) == (400, message)


def test_priority_and_salt_reach_the_sequence() -> None:
    gpu = replica(VirtualClock(), policy="priority")
    a = prepared(gpu, request(priority=-3, cache_salt="t1"))
    b = prepared(gpu, request(cache_salt="t2"))
    assert a.seq.priority == -3
    assert a.seq.hashes != b.seq.hashes or not a.seq.hashes


def test_prompt_over_the_context_length_is_refused() -> None:
    gpu = replica(VirtualClock())
    with pytest.raises(RequestError, match="maximum context length is 50 tokens"):
        prepared(gpu, request(" ".join(["w"] * 60)), max_model_len=50)


def test_the_answer_is_resplit_into_engine_tokens_and_cut_by_max_tokens() -> None:
    gpu = replica(VirtualClock())
    body = request("你好", max_tokens=4)
    plan = build_plan(body, SimConfig(reply_tokens=16), "chatcmpl-x")
    plan, ticket = gpu.prepare(plan, body, 4096)
    assert plan.tokens == ("Simulated", " answer", " to:", " 你")
    assert (plan.finish, ticket.seq.out_len, plan.prompt_tokens) == ("length", 4, 5)
