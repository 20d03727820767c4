"""Circuit breaker with an injected clock, and the attempt order over a pool plus fallbacks."""

import asyncio
from dataclasses import dataclass

from backends.pool import Breaker, Gauges, Member, attempt_order, probe_forever


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_breaker_opens_after_threshold_and_half_opens_after_reset():
    clock = Clock()
    b = Breaker(failures=3, reset_s=10, clock=clock)
    for _ in range(2):
        b.failure()
    assert b.state == "closed" and b.allow()
    b.failure()
    assert b.state == "open" and not b.allow()
    clock.t = 10
    assert b.state == "half_open"
    assert b.allow() and not b.allow()  # exactly one trial
    b.failure()
    assert b.state == "open"
    clock.t = 25
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.allow() and b.allow()


def test_retry_after_is_when_the_breaker_reopens_and_never_below_a_second():
    """The 503 a client gets when no backend can take it says when one may again."""
    clock = Clock()
    member = Member(FakeBackend("a"), Breaker(failures=1, reset_s=10, clock=clock))
    assert member.retry_after() == 1.0  # closed: only busy
    member.breaker.failure()
    clock.t = 2.5
    assert member.breaker.reopens_in() == 7.5 and member.retry_after() == 7.5
    clock.t = 9.8
    assert member.retry_after() == 1.0  # the trial is due: a second, not less


def test_success_resets_the_failure_count():
    b = Breaker(failures=2, reset_s=1, clock=Clock())
    b.failure()
    b.success()
    b.failure()
    assert b.state == "closed"


@dataclass
class FakeBackend:
    name: str


def _members(**outstanding):
    return {n: Member(FakeBackend(n), Breaker(1, 60, Clock()), outstanding=o) for n, o in outstanding.items()}


def test_least_outstanding_first_then_fallbacks_in_order():
    m = _members(a=5, b=1, c=0, cpu=0)
    chain = attempt_order(m, ["a", "b"], ["c", "cpu"])
    assert [x.name for x in chain] == ["b", "a", "c", "cpu"]


def test_unusable_members_are_skipped():
    m = _members(a=0, b=0, cpu=0)
    m["a"].healthy = False
    m["b"].breaker.failure()
    assert [x.name for x in attempt_order(m, ["a", "b"], ["cpu"])] == ["cpu"]
    assert m["a"].skip_reason() == "unhealthy" and m["b"].skip_reason() == "breaker_open"


def test_queue_depth_and_concurrency_bounds():
    m = _members(a=0, b=3, cpu=0)
    m["a"].max_waiting, m["a"].waiting = 4, 9
    m["b"].max_concurrency = 3
    assert [x.name for x in attempt_order(m, ["a", "b"], ["cpu"])] == ["cpu"]
    assert m["a"].skip_reason() == "queue_too_deep" and m["b"].skip_reason() == "saturated"


class GaugedBackend:
    """A backend whose probe reports vLLM's gauges, then fails."""

    name = "g"

    def __init__(self):
        self.readings = [Gauges(12.0, 30.0, 0.5), None]

    async def health(self):
        return True

    async def gauges(self):
        return self.readings.pop(0) if self.readings else None

    async def load(self):  # the plain probe: never used when gauges() exists
        raise AssertionError("load() called")


async def _probed(member, until):
    task = asyncio.create_task(probe_forever(member))
    for _ in range(100):  # yields to the loop, no wall-clock wait
        await asyncio.sleep(0)
        if until(member):
            break
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_probe_records_queue_running_and_kv_usage_then_forgets_them():
    member = Member(GaugedBackend(), Breaker(1, 60, Clock()), probe_interval_s=0)
    seen = []

    def until(m):
        seen.append((m.waiting, m.running, m.kv_usage))
        return len(seen) > 4 and m.waiting is None

    await _probed(member, until)
    assert (12.0, 30.0, 0.5) in seen
    assert (member.waiting, member.running, member.kv_usage) == (None, None, None)  # an unreadable /metrics
