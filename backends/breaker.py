"""The circuit breaker shared by everything that calls a dependency which can go away: each
backend replica has one (backends/pool.py), and Redis has one for every stage (proxy/redis.py).

Closed -> open after `failures` consecutive failures; after `reset_s` it is half-open: one trial
call is let through, its success closes the breaker, its failure opens it again for `reset_s`.
A trial that ends with neither (the caller was cancelled) gives its turn back with `release()`,
so an abandoned trial never leaves the breaker half-open for good. Any success closes the breaker,
also one from a call that started before it opened: it proves the dependency answers.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Breaker:
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

    @property
    def closed(self) -> bool:
        return self._opened_at is None

    def allow(self) -> bool:
        """Whether a call may go now; in the half-open state only the first caller gets the trial."""
        if self._opened_at is None:
            return True
        if self.state == "half_open" and not self._trial_out:
            self._trial_out = True
            return True
        return False

    def reopens_in(self) -> float:
        """Seconds until the half-open trial may go (0 when the breaker lets requests through)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._reset_s - (self._clock() - self._opened_at))

    def available(self) -> bool:
        """Like allow() but without taking the half-open trial (for ordering decisions)."""
        state = self.state
        return state == "closed" or (state == "half_open" and not self._trial_out)

    def success(self) -> bool:
        """Record a success; True when it closed an open breaker."""
        was_open = self._opened_at is not None
        self._failures, self._opened_at, self._trial_out = 0, None, False
        return was_open

    def failure(self) -> bool:
        """Record a failure; True when it opened a closed breaker (an open one only starts its
        reset interval again)."""
        self._failures += 1
        self._trial_out = False
        if self._opened_at is None and self._failures < self._threshold:
            return False
        opened = self._opened_at is None
        self._opened_at = self._clock()
        return opened

    def release(self) -> None:
        """The trial ended without a verdict (cancelled, or given up for a local reason): the next
        caller may try."""
        self._trial_out = False
