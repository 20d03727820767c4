"""Replicas and their health: circuit breakers, probes, the routing policy, the fallback walk.

A `Member` wraps one backend with its live state (outstanding requests, last probe, breaker).
`route` turns a variant's pool and fallback list into the ordered backends to try, by the
configured policy (affinity with a load guard, least outstanding, random); backends/affinity.py
holds its pure hashing parts. `first_success` walks that order: it leases each member while its
attempt runs and records failures in the member's breaker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, TypeVar, runtime_checkable

from backends.affinity import load_cap, replica_seed, weight
from backends.base import Backend, BackendError, ErrorKind
from backends.breaker import Breaker

log = logging.getLogger("llm_gateway.pool")


@dataclass(eq=False)  # a replica is itself: compared by identity, never field by field
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
    running: float | None = None  # vllm:num_requests_running, as last probed
    kv_usage: float | None = None  # vllm:kv_cache_usage_perc (0..1), as last probed
    send_priority: bool = False  # forward the tier's priority (vLLM with --scheduling-policy priority)
    seed: int = field(init=False, default=0)
    routes: dict[str, int] = field(default_factory=dict)  # requests routed here first, by route
    spills: dict[str, int] = field(default_factory=dict)  # preferred here but sent elsewhere, by reason

    def __post_init__(self) -> None:
        self.seed = replica_seed(self.backend.name)

    @property
    def name(self) -> str:
        return self.backend.name

    def saturation(self, cfg: RoutingConfig) -> str | None:
        """Why this replica should take no new work while another has room; None when it has room."""
        if self.waiting is not None and self.waiting > cfg.saturated_waiting:
            return "waiting"
        if self.kv_usage is not None and self.kv_usage >= cfg.saturated_kv_usage:
            return "kv_cache"
        limit = cfg.saturated_outstanding
        if limit is not None and self.outstanding >= limit:
            return "outstanding"
        return None

    def next_probe_in(self) -> float:
        """Seconds until the next probe may show that this replica's load has changed."""
        return max(0.0, self.last_probe + self.probe_interval_s - time.monotonic())

    def usable(self) -> bool:
        if not self.healthy or not self.breaker.available():
            return False
        if self.max_concurrency is not None and self.outstanding >= self.max_concurrency:
            return False
        deep = self.max_waiting is not None and self.waiting is not None and self.waiting > self.max_waiting
        return not deep

    def retry_after(self) -> float:
        """An honest estimate of when this member may take a request again: its breaker's
        reopening, or the next health probe when it is marked unhealthy; 1 s when only busy."""
        return max(1.0, self.next_probe_in() if not self.healthy else self.breaker.reopens_in())

    def skip_reason(self) -> str:
        if not self.healthy:
            return "unhealthy"
        if not self.breaker.available():
            return "breaker_open"
        if self.max_concurrency is not None and self.outstanding >= self.max_concurrency:
            return "saturated"
        return "queue_too_deep"


T = TypeVar("T")
BREAKER_KINDS = frozenset(
    {ErrorKind.CONNECT, ErrorKind.TIMEOUT, ErrorKind.UPSTREAM_5XX, ErrorKind.PROTOCOL, ErrorKind.REFUSED}
)


class Exhausted(Exception):
    """No member of the chain answered; `last` is how the last one tried failed (None: none tried)."""

    def __init__(self, last: BackendError | None) -> None:
        super().__init__(last.message if last else "no backend tried")
        self.last = last


async def first_success(
    chain: Sequence[Member],
    attempt: Callable[[Member], Awaitable[T]],
    failed: Callable[[Member, BackendError], None],
) -> tuple[Member, T]:
    """Try the chain in order until one attempt succeeds; fall over only on retryable errors
    (nothing has reached the client yet). The winner stays leased (`outstanding` counted): the
    caller releases it when the response is over. `failed` hears of every failed attempt."""
    last: BackendError | None = None
    for member in chain:
        member.outstanding += 1
        try:
            result = await attempt(member)
        except BackendError as exc:
            member.outstanding -= 1
            last = exc
            if exc.kind in BREAKER_KINDS:
                member.breaker.failure()
            failed(member, exc)
            if not exc.retryable:
                break
            continue
        except BaseException:
            member.outstanding -= 1
            raise
        member.breaker.success()
        return member, result
    raise Exhausted(last)


def attempt_order(members: dict[str, Member], pool: Iterable[str], fallback: Iterable[str]) -> list[Member]:
    """Usable pool members, least outstanding first (ties keep config order), then usable fallbacks."""
    primary = sorted((members[n] for n in pool), key=lambda m: m.outstanding)
    chain = [m for m in primary if m.usable()]
    chain.extend(m for m in (members[n] for n in fallback) if m.usable() and m not in chain)
    return chain


class RoutingConfig(Protocol):
    """What `route` reads of proxy.settings.RoutingSettings (structurally: backends import no proxy)."""

    @property
    def policy(self) -> str: ...
    @property
    def load_guard(self) -> bool: ...
    @property
    def load_factor(self) -> float: ...
    @property
    def load_floor(self) -> int: ...
    @property
    def saturated_waiting(self) -> int: ...
    @property
    def saturated_kv_usage(self) -> float: ...
    @property
    def saturated_outstanding(self) -> int | None: ...
    @property
    def shed_priority(self) -> int: ...


ROUTES = ("affinity", "spill", "least_loaded", "random")  # how the first member of a chain was chosen
# why a key's preferred replica was left: its saturation, the bounded load, or why it is unusable
SPILL_REASONS = (
    "waiting",
    "kv_cache",
    "outstanding",
    "bounded_load",
    "first_request",
    "unhealthy",
    "breaker_open",
    "saturated",
    "queue_too_deep",
)
_RNG = random.Random()  # spreads load; nothing secret depends on it


@dataclass(slots=True)
class Route:
    chain: list[Member]  # the usable pool members in the order to try, then the usable fallbacks
    how: str  # one of ROUTES, or "shed": the pool is saturated and this request's tier yields
    reason: str | None = None  # spill: why the preferred replica was left; shed: the saturation


def route(
    members: dict[str, Member],
    pool: Sequence[str],
    fallback: Iterable[str],
    cfg: RoutingConfig,
    key: int = 0,
    priority: int = 0,
    rng: random.Random = _RNG,
    home: str | None = None,
) -> Route:
    """The attempt order for one request. `key` is its affinity key (backends/affinity.py) and
    `priority` its tier's (lower first); `home`: where this gateway placed the key's first request
    lately (Placements), where its prefix is cached; None: no replica is known to hold it. A shed
    request is offered only the fallbacks."""
    replicas = [members[n] for n in pool]
    if priority >= cfg.shed_priority:
        saturated = _pool_saturation(replicas, cfg)
        if saturated is not None:
            return Route(_fallbacks(members, fallback, ()), "shed", saturated)
    if cfg.policy == "affinity":
        plan = _affinity(replicas, cfg, key, home)
    elif cfg.policy == "random":
        usable = [m for m in replicas if m.usable()]
        plan = Route(rng.sample(usable, len(usable)), "random")
    else:
        plan = Route(attempt_order(members, pool, ()), "least_loaded")
    if plan.chain:
        first = plan.chain[0]
        first.routes[plan.how] = first.routes.get(plan.how, 0) + 1
    plan.chain.extend(_fallbacks(members, fallback, plan.chain))
    return plan


def _affinity(replicas: list[Member], cfg: RoutingConfig, key: int, home: str | None) -> Route:
    """Rendezvous order for the key, its home (if known and in the pool) first; with the load
    guard, the first replica in that order that is neither saturated nor over the bounded load,
    except that a saturated preferred replica hands over to the replica with the most room (its
    queue is the problem, not the key's balance)."""
    ranked = sorted(replicas, key=lambda m: weight(key, m.seed), reverse=True)
    placed = next((m for m in ranked if m.name == home), None) if home is not None else None
    if placed is not None and placed is not ranked[0]:
        ranked.remove(placed)
        ranked.insert(0, placed)
    fresh = home is None
    usable = [m for m in ranked if m.usable()]
    if not usable:
        return Route(usable, "affinity")
    chain = _guarded(usable, cfg, fresh) if cfg.load_guard else usable
    top = ranked[0]
    if chain[0] is top:
        return Route(chain, "affinity")
    reason = _left_because(top, cfg, fresh)
    top.spills[reason] = top.spills.get(reason, 0) + 1
    return Route(chain, "spill", reason)


def _guarded(usable: list[Member], cfg: RoutingConfig, fresh: bool) -> list[Member]:
    """`usable` is in rendezvous order; returns the order to try (unsaturated first). One pass and
    two lists: this runs for every request."""
    room: list[Member] = []
    full: list[Member] = []
    in_flight = 0
    for m in usable:
        in_flight += m.outstanding
        (room if m.saturation(cfg) is None else full).append(m)
    if not room:  # every replica saturated (and this tier is not shed): no replica has room to
        room, full = full, []  # offer, so locality (cached prefixes: less prefill) is worth most
    full.sort(key=_load)
    chosen = room[0]
    if chosen is not usable[0]:  # the key's replica is saturated: the one with the most room
        chosen = min(room, key=_load)
    elif fresh:  # nothing of it is cached anywhere yet: its replica only if none has less load
        least = min(room, key=_load)
        chosen = least if _load(least) < _load(chosen) else chosen
    else:
        cap = load_cap(in_flight, len(usable), cfg.load_factor, cfg.load_floor)
        if chosen.outstanding + 1 > cap:  # a hot key: on to its next replica that is under the bound
            chosen = next((m for m in room if m.outstanding + 1 <= cap), None) or min(room, key=_load)
    if chosen is not room[0]:
        room.remove(chosen)
        room.insert(0, chosen)
    room.extend(full)
    return room


def _left_because(top: Member, cfg: RoutingConfig, fresh: bool) -> str:
    if not top.usable():
        return top.skip_reason()
    return top.saturation(cfg) or ("first_request" if fresh else "bounded_load")


def _load(member: Member) -> float:
    """Requests this gateway has in flight there plus the server's own queue (as last probed)."""
    return member.outstanding + (member.waiting or 0.0)


def _pool_saturation(replicas: list[Member], cfg: RoutingConfig) -> str | None:
    """The first usable replica's saturation when every usable replica is saturated, else None.
    A pool with no usable replica is not "saturated": it is down, and fails over as such."""
    found: str | None = None
    for member in replicas:
        if member.usable():
            state = member.saturation(cfg)
            if state is None:
                return None
            found = found or state
    return found


def shed_retry_after(replicas: Iterable[Member], reason: str | None) -> int:
    """Seconds a shed client should wait: until the next probe may show the pool's queues shorter
    (our own in-flight count, by contrast, falls as soon as a request ends)."""
    if reason == "outstanding":
        return 1
    return max(1, math.ceil(min((m.next_probe_in() for m in replicas), default=1.0)))


def _fallbacks(
    members: dict[str, Member], fallback: Iterable[str], taken: Collection[Member]
) -> list[Member]:
    return [m for m in (members[n] for n in fallback) if m.usable() and m not in taken]


class Gauges(NamedTuple):
    """A replica's load as its server reports it (vLLM: /metrics)."""

    waiting: float
    running: float | None = None
    kv_usage: float | None = None


@runtime_checkable
class GaugeSource(Protocol):
    """A backend that reports more than its queue (backends/vllm.py)."""

    async def gauges(self) -> Gauges | None: ...


async def _probe(member: Member, source: GaugeSource | None) -> tuple[bool, Gauges | None]:
    healthy = await member.backend.health()
    if source is not None:
        return healthy, await source.gauges()
    waiting = await member.backend.load()
    return healthy, None if waiting is None else Gauges(waiting)


async def probe_forever(member: Member) -> None:
    """Periodic health and load probe for one member; runs until cancelled by the lifespan."""
    source = member.backend if isinstance(member.backend, GaugeSource) else None
    while True:
        try:
            healthy, gauges = await _probe(member, source)
        except Exception:  # a probe must never die: any failure just marks the member unhealthy
            log.warning("health probe failed", extra={"backend": member.name}, exc_info=True)
            healthy, gauges = False, None
        if healthy != member.healthy:
            log.warning("backend %s is now %s", member.name, "healthy" if healthy else "unhealthy")
        member.healthy, member.last_probe = healthy, time.monotonic()
        member.waiting, member.running, member.kv_usage = gauges or (None, None, None)
        await asyncio.sleep(member.probe_interval_s)


class Placements:
    """Where this gateway sent the first request of each affinity key lately (bounded, the least
    recently used forgotten first). A key without a placement has no prefix known to be cached
    on any replica: its first request may go to a less loaded replica than the key's own without
    losing a cache hit, and the requests after it follow it there. Prompts that share nothing
    then cost nothing over least-loaded routing."""

    def __init__(self, size: int = 65_536) -> None:
        self._size = size
        self._homes: dict[int, str] = {}

    def home(self, key: int) -> str | None:
        homes = self._homes
        name = homes.pop(key, None)
        if name is not None:
            homes[key] = name  # most recent last
        return name

    def place(self, key: int, name: str) -> None:
        self._homes[key] = name
        if len(self._homes) > self._size:
            del self._homes[next(iter(self._homes))]
