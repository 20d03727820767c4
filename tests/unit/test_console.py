"""proxy/console.py's pure parts: the fleet history ring, the JSON bodies, the window parameter, the
page's files; and the histogram the shared A/B report document carries."""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from backends.breaker import Breaker
from backends.pool import Member
from proxy import errors
from proxy.cache.response_cache import CacheStats
from proxy.console import (
    FleetHistory,
    Window,
    cache_summary,
    counter_totals,
    fleet_body,
    load_assets,
    models_body,
    read_totals,
    window_of,
)
from proxy.experiments.report import Aggregate, bucket_of, bucket_upper, report_document
from proxy.observability.metrics import RequestMetrics
from proxy.settings import Settings
from tests.unit.fake_backend import FakeBackend, answer


def settings() -> Settings:
    http = {"type": "openai", "url": "http://upstream.test", "model": "m"}
    variants = [
        {"name": "control", "weight": 90, "backends": ["a", "b"], "fallback": ["cpu"]},
        {"name": "candidate", "weight": 10, "backends": ["b"]},
    ]
    return Settings.model_validate(
        {
            "auth": {"algorithms": ["HS256"], "secret": "s" * 32},
            "cache": {"semantic": {"enabled": False}},
            "observability": {"feedback_scale": "stars"},
            "backends": {"a": http, "b": http, "cpu": http},
            "models": {"assistant": {"variants": variants, "description": "the default"}},
        }
    )


def member(name: str, **state: Any) -> Member:
    m = Member(FakeBackend(name, answer("x")), Breaker(3, 5.0), max_concurrency=8)
    for key, value in state.items():
        setattr(m, key, value)
    return m


def test_history_gives_the_window_and_one_point_per_interval() -> None:
    now, totals = [0.0], {"cache:exact": 0.0, "cache:miss": 0.0}
    history = FleetHistory(lambda: dict(totals), keep=3, clock=lambda: now[0])
    for t, exact, miss in ((0, 0, 0), (10, 2, 5), (20, 2, 9), (30, 7, 9), (40, 8, 10)):
        now[0], totals["cache:exact"], totals["cache:miss"] = t, exact, miss
        history.take()
    now[0], totals["cache:exact"] = 43.0, 11.0
    window = history.window()
    # keep=3: the four newest copies (t=10..40) bound three full intervals, then the partial one
    assert window.now == 43.0 and window.seconds == 33.0
    assert window.totals == {"cache:exact": 9.0, "cache:miss": 5.0}
    assert [(end, s, d) for end, s, d in window.series] == [
        (20, 10, {"cache:miss": 4.0}),
        (30, 10, {"cache:exact": 5.0}),
        (40, 10, {"cache:exact": 1.0, "cache:miss": 1.0}),
        (43.0, 3.0, {"cache:exact": 3.0}),
    ]


def test_history_before_its_first_copy_covers_nothing() -> None:
    window = FleetHistory(lambda: {"cache:exact": 5.0}, clock=lambda: 7.0).window()
    assert (window.seconds, window.totals, window.series) == (0.0, {}, [])


def test_counter_totals_sum_by_label() -> None:
    requests = Counter("r", "doc", ("backend", "status"), registry=CollectorRegistry())
    requests.labels("a", "200").inc(3)
    requests.labels("a", "503").inc(1)
    requests.labels("cache", "200").inc(2)
    assert counter_totals(requests, "backend") == {"a": 4.0, "cache": 2.0}
    assert counter_totals(requests, ("backend", "status"))["a:503"] == 1.0


def test_read_totals_copies_cache_policy_and_routing_counts() -> None:
    stats = CacheStats(hits=4, semantic_hits=2, misses=7, bypass_errors=1)
    members = {"a": member("a", routes={"affinity": 5, "spill": 2}), "b": member("b")}
    metrics = RequestMetrics(CollectorRegistry())
    metrics.policy.labels("input", "block").inc(3)
    metrics.policy.labels("output", "mask").inc()
    gw = SimpleNamespace(cache=SimpleNamespace(stats=stats), members=members)
    totals = read_totals(gw, SimpleNamespace(metrics=metrics))  # type: ignore[arg-type]
    assert totals == {
        "cache:exact": 4, "cache:semantic": 2, "cache:miss": 7, "cache:error": 1,
        "policy:input:block": 3.0, "policy:output:mask": 1.0, "routed:a": 7.0, "routed:b": 0.0,
    }


def test_fleet_body_reports_live_state_and_shares_over_the_window() -> None:
    members = {
        "a": member("a", outstanding=3, waiting=2.0, running=5.0, kv_usage=0.5),
        "b": member("b", healthy=False),
        "cpu": member("cpu"),
    }
    totals = {"routed:a": 30.0, "routed:b": 10.0, "cache:exact": 60.0,
              "cache:semantic": 20.0, "cache:miss": 20.0, "policy:input:block": 2.0}
    series = [(110.0, 10.0, {"cache:exact": 4.0, "policy:output:mask": 1.0, "policy:input:block": 1.0})]
    readiness = {"status": "ready", "degraded": [], "redis": "ok", "models": {}}
    body = fleet_body(members, settings(), Window(110.0, 60.0, totals, series), readiness)
    a, b, cpu = body["backends"]
    assert (a["name"], a["outstanding"], a["waiting"], a["kv_usage"], a["state"]) == ("a", 3, 2.0, 0.5, "usable")
    assert a["routed"] == 30 and a["share"] == 0.75
    assert (b["healthy"], b["usable"], b["state"], b["share"]) == (False, False, "unhealthy", 0.25)
    assert cpu["share"] == 0.0 and cpu["max_concurrency"] == 8 and cpu["type"] == "openai"
    assert body["cache"] == {"lookups": 100, "exact": 60, "semantic": 20, "miss": 20, "error": 0,
                             "exact_rate": 0.6, "semantic_rate": 0.2}
    assert body["policy"] == {"input:block": 2}
    assert body["series"] == [{"t": 110.0, "s": 10.0, "exact": 4, "policy": 2}]
    assert body["window_s"] == 60.0 and body["time"] == 110.0


def test_cache_summary_without_lookups_has_no_rates() -> None:
    assert cache_summary({})["exact_rate"] is None


def test_models_body_lists_variants_in_config_order() -> None:
    (model,) = models_body(settings())["data"]
    assert model["id"] == "assistant" and model["description"] == "the default"
    assert [(v["name"], v["weight"], v["backends"], v["fallback"]) for v in model["variants"]] == [
        ("control", 90, ["a", "b"], ["cpu"]),
        ("candidate", 10, ["b"], []),
    ]


@pytest.mark.parametrize(("text", "seconds"), [("15m", 900), ("1h", 3600), ("7d", 604800), ("90", 90)])
def test_window_of_reads_durations(text: str, seconds: int) -> None:
    assert window_of({"since": text}, 8 * 86400) == seconds


def test_window_of_defaults_to_an_hour_and_refuses_bad_or_too_long_windows() -> None:
    assert window_of({}, 86400) == 3600
    for bad in ("forever", "0s", "9d"):
        with pytest.raises(errors.InvalidRequest) as info:
            window_of({"since": bad}, 8 * 86400)
        assert info.value.param == "since"


def test_the_page_and_every_file_it_loads_are_in_the_package() -> None:
    assets = load_assets()
    assert assets["index.html"].media_type.startswith("text/html")
    assert assets["app.js"].media_type == "text/javascript" and assets["console.css"].media_type.startswith("text/css")
    page = assets["index.html"].body.decode()
    wanted = set(re.findall(r'(?:href|src)="/console/([^"]+)"', page))
    for name, asset in assets.items():
        if name.endswith(".js"):
            wanted |= set(re.findall(r'from "\./([^"]+)"', asset.body.decode()))
    assert wanted and wanted <= set(assets), wanted - set(assets)
    assert not re.search(r'(?:href|src)="(?:https?:)?//', page)  # nothing from another origin
    assert len({a.etag for a in assets.values()}) == len(assets)


def test_report_document_carries_each_distribution() -> None:
    slow, fast = bucket_of(0.2), bucket_of(0.012)
    control = Aggregate()
    for name, value in (("n", 10), (f"ttft:{fast}", 6), (f"ttft:{slow}", 3), ("lat:0", 1)):
        control.add(name, value)
    doc = report_document(settings(), {"assistant": {"control": control}}, 900)
    assert doc["window_s"] == 900 and list(doc["experiments"]["assistant"]["variants"]) == ["control", "candidate"]
    stats = doc["experiments"]["assistant"]["variants"]["control"]
    assert stats["ttft"]["histogram"] == [
        [bucket_upper(fast - 1), bucket_upper(fast), 6],
        [bucket_upper(slow - 1), bucket_upper(slow), 3],
    ]
    assert stats["latency"]["histogram"] == [[0.0, bucket_upper(0), 1]]
    assert doc["experiments"]["assistant"]["variants"]["candidate"]["ttft"]["histogram"] == []
