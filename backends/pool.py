"""Replicas and their health: circuit breakers, probes, least-outstanding pick, the attempt order.

A `Member` wraps one backend with its live state (outstanding requests, last probe, breaker).
`attempt_order` turns a variant's pool and fallback list into the ordered backends to try.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from backends.base import Backend

log = logging.getLogger("llm_gateway.pool")


class Breaker:
    """Closed -> open after `failures` consecutive failures; after `reset_s` one trial is let through
    (half-open); its success closes the breaker, its failure opens it again."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_out = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self._clock() - self._opened_at >= self._reset_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half_open" and not self._trial_out:
            self._trial_out = True
            return True
        return False

    def available(self) -> bool:
        """Like allow() but without taking the half-open trial (for ordering decisions)."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self._trial_out)

    def success(self) -> None:
        self._failures, self._opened_at, self._trial_out = 0, None, False

    def failure(self) -> None:
        self._failures += 1
        self._trial_out = False
        if self._opened_at is not None or self._failures >= self._threshold:
            self._opened_at = self._clock()


@dataclass
class Member:
    backend: Backend
    breaker: Breaker
    max_concurrency: int | None = None
    max_waiting: int | None = None
    outstanding: int = 0
    healthy: bool = True
    waiting: float | None = None
    probe_interval_s: float = 5.0
    last_probe: float = field(default=0.0)

    @property
    def name(self) -> str:
        return self.backend.name

    def usable(self) -> bool:
        if not self.healthy or not self.breaker.available():
            return False
        if self.max_concurrency is not None and self.outstanding >= self.max_concurrency:
            return False
        deep = self.max_waiting is not None and self.waiting is not None and self.waiting > self.max_waiting
        return not deep

    def skip_reason(self) -> str:
        if not self.healthy:
            return "unhealthy"
        if not self.breaker.available():
            return "breaker_open"
        if self.max_concurrency is not None and self.outstanding >= self.max_concurrency:
            return "saturated"
        return "queue_too_deep"


def attempt_order(members: dict[str, Member], pool: Iterable[str], fallback: Iterable[str]) -> list[Member]:
    """Usable pool members, least outstanding first (ties keep config order), then usable fallbacks."""
    primary = sorted((members[n] for n in pool), key=lambda m: m.outstanding)
    chain = [m for m in primary if m.usable()]
    chain.extend(m for m in (members[n] for n in fallback) if m.usable() and m not in chain)
    return chain


async def probe_forever(member: Member) -> None:
    """Periodic health and load probe for one member; runs until cancelled by the lifespan."""
    while True:
        try:
            healthy = await member.backend.health()
            waiting = await member.backend.load()
        except Exception:  # a probe must never die: any failure just marks the member unhealthy
            log.warning("health probe failed", extra={"backend": member.name}, exc_info=True)
            healthy, waiting = False, None
        if healthy != member.healthy:
            log.warning("backend %s is now %s", member.name, "healthy" if healthy else "unhealthy")
        member.healthy, member.waiting, member.last_probe = healthy, waiting, time.monotonic()
        await asyncio.sleep(member.probe_interval_s)
