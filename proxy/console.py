"""The web console: its static page (the `console` package's files, held in memory), the data it
reads, and the fleet's recent history.

Off the request path: nothing here runs per chat request. A background task copies a few running
totals (cache lookups, policy actions, routing decisions) into a ring every 10 s; the console's
own requests read the ring and the members' live state. The page and its scripts are public (they
hold no data); every /console/api/* route needs a token whose `auth.admin_claim` claim is `true`
(no token 401, another token 403). Each worker process answers from its own state.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import Counter
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from proxy import errors
from proxy.auth.authenticator import Principal, parse_ttl
from proxy.experiments.report import report_document

if TYPE_CHECKING:
    from backends.pool import Member
    from proxy.observability.observer import Observer
    from proxy.pipeline import Gateway
    from proxy.settings import Settings

log = logging.getLogger("llm_gateway.console")
SNAPSHOT_S = 10.0  # how often the ring takes a copy of the running totals
HISTORY = 30  # copies kept: the fleet page's "last minutes" are five
_READ_TIMEOUT_S = 5.0  # reading the A/B aggregates for the experiments page
_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8", ".js": "text/javascript"}
_HEADERS = {
    "cache-control": "no-cache",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    # the token lives in sessionStorage: no script, style or connection from anywhere else
    "content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
}
_JSON_HEADERS = {"cache-control": "no-store", "x-content-type-options": "nosniff"}
Totals = dict[str, float]


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


def load_assets(package: str = "console") -> dict[str, Asset]:
    """Every page, script and style sheet of the console package (blocking: call it in a thread)."""
    assets: dict[str, Asset] = {}
    for entry in importlib.resources.files(package).iterdir():
        media_type = _TYPES.get(os.path.splitext(entry.name)[1])
        if media_type is not None and entry.is_file():
            body = entry.read_bytes()
            etag = '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'
            assets[entry.name] = Asset(body, media_type, etag)
    if "index.html" not in assets:
        raise RuntimeError(f"the console's page is missing from the {package!r} package")
    return assets


# -- the fleet's recent history ------------------------------------------------------------------------
def counter_totals(counter: Counter, label: str | tuple[str, ...]) -> Totals:
    """A Prometheus counter's running totals summed by one label (or a tuple of labels, joined by
    ':'), read from the counter object itself: this process's own counts."""
    names = (label,) if isinstance(label, str) else label
    out: Totals = {}
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = ":".join(sample.labels.get(n, "") for n in names)
                out[key] = out.get(key, 0.0) + sample.value
    return out


def read_totals(gw: Gateway, observer: Observer) -> Totals:
    """The running totals the fleet page turns into rates: cache lookups by result, policy actions,
    requests the routing policy put first on each pool replica (microseconds: no per-request series
    is read)."""
    c = gw.cache.stats
    totals: Totals = {
        "cache:exact": c.hits,
        "cache:semantic": c.semantic_hits,
        "cache:miss": c.misses,
        "cache:error": c.bypass_errors,
    }
    for key, n in counter_totals(observer.metrics.policy, ("direction", "action")).items():
        totals[f"policy:{key}"] = n
    for name, member in gw.members.items():
        totals[f"routed:{name}"] = float(sum(member.routes.values()))
    return totals


def _delta(new: Totals, old: Totals) -> Totals:
    return {k: v - old.get(k, 0.0) for k, v in new.items() if v - old.get(k, 0.0) > 0}


@dataclass(frozen=True, slots=True)
class Window:
    """What happened between the ring's oldest entry and `now`: totals, and one point per interval."""

    now: float
    seconds: float
    totals: Totals
    series: list[tuple[float, float, Totals]]  # (end time, seconds, totals in the interval)


class FleetHistory:
    """A ring of (time, running totals), one entry every `every_s`; `window` gives what happened
    between the oldest entry and now, and per interval."""

    def __init__(
        self,
        read: Callable[[], Totals],
        *,
        every_s: float = SNAPSHOT_S,
        keep: int = HISTORY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._read, self._clock, self.every_s = read, clock, every_s
        self._ring: deque[tuple[float, Totals]] = deque(maxlen=keep + 1)

    def take(self) -> None:
        self._ring.append((self._clock(), self._read()))

    async def run(self) -> None:
        while True:
            try:
                self.take()
            except Exception:  # a bug here must not end the history for the life of the process
                log.exception("console: taking a fleet snapshot failed")
            await asyncio.sleep(self.every_s)

    def window(self) -> Window:
        now = (self._clock(), self._read())
        points = [*self._ring, now]
        start, base = points[0]
        series = [(b[0], b[0] - a[0], _delta(b[1], a[1])) for a, b in itertools.pairwise(points)]
        return Window(now[0], now[0] - start, _delta(now[1], base), series)


# -- the JSON bodies (pure) ----------------------------------------------------------------------------
def _rate(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def backend_rows(members: Mapping[str, Member], settings: Settings, routed: Totals) -> list[dict[str, Any]]:
    """Every backend's live state, and its share of the routing decisions over the window (the
    requests the routing policy put first on it; fallbacks are tried after those)."""
    total = sum(routed.values())
    rows = []
    for name, m in members.items():
        cfg = settings.backends[name]
        rows.append(
            {
                "name": name,
                "type": cfg.type,
                "model": getattr(cfg, "model", None),
                "healthy": m.healthy,
                "breaker": m.breaker.state,
                "usable": m.usable(),
                "state": "usable" if m.usable() else m.skip_reason(),
                "outstanding": m.outstanding,
                "max_concurrency": m.max_concurrency,
                "waiting": m.waiting,
                "max_waiting": m.max_waiting,
                "running": m.running,
                "kv_usage": m.kv_usage,
                "routed": int(routed.get(name, 0.0)),
                "share": _rate(routed.get(name, 0.0), total),
            }
        )
    return rows


def _section(totals: Totals, prefix: str) -> Totals:
    return {k[len(prefix) :]: v for k, v in totals.items() if k.startswith(prefix)}


def cache_summary(cache: Totals) -> dict[str, Any]:
    lookups = sum(cache.values())
    return {
        "lookups": int(lookups),
        **{k: int(cache.get(k, 0.0)) for k in ("exact", "semantic", "miss", "error")},
        "exact_rate": _rate(cache.get("exact", 0.0), lookups),
        "semantic_rate": _rate(cache.get("semantic", 0.0), lookups),
    }


def fleet_body(
    members: Mapping[str, Member],
    settings: Settings,
    window: Window,
    readiness: dict[str, Any],
) -> dict[str, Any]:
    """GET /console/api/fleet: backends, cache and policy over the window, and one point per interval."""
    totals = window.totals
    return {
        "time": window.now,
        "worker": os.getpid(),
        "window_s": round(window.seconds, 1),
        "status": readiness["status"],
        "degraded": readiness["degraded"],
        "redis": readiness["redis"],
        "models": readiness["models"],
        "backends": backend_rows(members, settings, _section(totals, "routed:")),
        "cache": cache_summary(_section(totals, "cache:")),
        "policy": {k: int(v) for k, v in sorted(_section(totals, "policy:").items())},
        "series": [
            {
                "t": end,
                "s": round(s, 2),
                **{k: int(v) for k, v in _section(d, "cache:").items()},
                "policy": int(sum(_section(d, "policy:").values())),
            }
            for end, s, d in window.series
        ],
    }


def models_body(settings: Settings) -> dict[str, Any]:
    """GET /console/api/models: every model and its variants (the playground's picker)."""
    data = [
        {
            "id": name,
            "description": m.description,
            "variants": [
                {"name": v.name, "weight": v.weight, "backends": v.backends, "fallback": v.fallback}
                for v in m.variants
            ],
        }
        for name, m in settings.models.items()
    ]
    return {"object": "list", "data": data}


def window_of(query: Mapping[str, str], retention_s: int) -> int:
    """The experiments page's `since` (90s, 15m, 1h, 7d), at most the aggregates' retention."""
    text = query.get("since", "1h")
    try:
        seconds = parse_ttl(text)
    except ValueError:
        raise errors.InvalidRequest(
            f"Invalid 'since' {text[:20]!r}: use e.g. 15m, 1h or 7d.", param="since"
        ) from None
    if seconds > retention_s:
        raise errors.InvalidRequest(
            f"'since' is longer than the aggregates are kept ({retention_s} s).", param="since"
        )
    return seconds


# -- routes --------------------------------------------------------------------------------------------
def _json(body: Any) -> Response:
    return Response(orjson.dumps(body), media_type="application/json", headers=_JSON_HEADERS)


class Console:
    """Created by create_app; `start` (in the lifespan) loads the page and starts the history."""

    def __init__(self, settings: Settings, gateway: Callable[[], Gateway], observer: Observer) -> None:
        self.settings, self._gateway, self._observer = settings, gateway, observer
        self._claim = settings.auth.admin_claim
        self._assets: dict[str, Asset] = {}
        self.history: FleetHistory | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._assets = await asyncio.to_thread(load_assets)
        gw = self._gateway()
        self.history = FleetHistory(lambda: read_totals(gw, self._observer))
        self._task = asyncio.create_task(self.history.run(), name="console-history")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def routes(self) -> Iterable[tuple[str, Callable[[Request], Any]]]:
        """(path, GET endpoint) pairs for create_app to register."""
        return (
            ("/console", self.page),
            ("/console/api/fleet", self.fleet),
            ("/console/api/experiments", self.experiments),
            ("/console/api/models", self.models),
            ("/console/{asset}", self.asset),
        )

    async def _admin(self, request: Request) -> Principal:
        principal = await self._gateway().auth.authenticate(request.headers.getlist("authorization"))
        if principal.claims.get(self._claim) is not True:
            raise errors.PermissionDenied(
                f"The console needs a token whose '{self._claim}' claim is true.", code="admin_required"
            )
        return principal

    def _serve(self, name: str, request: Request) -> Response:
        asset = self._assets.get(name)
        if asset is None:
            raise errors.NotFound("No such console file.")
        headers = {**_HEADERS, "etag": asset.etag}
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    async def page(self, request: Request) -> Response:
        return self._serve("index.html", request)

    async def asset(self, request: Request) -> Response:
        return self._serve(request.path_params["asset"], request)

    async def fleet(self, request: Request) -> Response:
        await self._admin(request)
        gw = self._gateway()
        if self.history is None:
            raise errors.ServiceUnavailable("The gateway is starting.")
        return _json(fleet_body(gw.members, self.settings, self.history.window(), await gw.readiness()))

    async def models(self, request: Request) -> Response:
        await self._admin(request)
        return _json(models_body(self.settings))

    async def experiments(self, request: Request) -> Response:
        """The `ab-report --json` document for `since` (and `model`), from the same function."""
        await self._admin(request)
        since_s = window_of(request.query_params, self.settings.observability.ab_retention_s)
        model = request.query_params.get("model") or None
        if model is not None and model not in self.settings.models:
            raise errors.ModelNotFound(f"The model '{model[:100]}' does not exist.", param="model")
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                data = await self._observer.experiments.read(since_s, model)
        except (RedisError, OSError, TimeoutError):
            raise errors.ServiceUnavailable(
                "The A/B aggregates cannot be read right now; retry shortly.", headers={"retry-after": "2"}
            ) from None
        return _json(report_document(self.settings, data, since_s, model))
