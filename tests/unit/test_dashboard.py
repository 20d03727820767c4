"""The Grafana dashboard, checked without a screenshot: every query names metrics the gateway
exports (the registry of an app built from a config, as /metrics would list it), and the
provisioning files point at the dashboard and its data source."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from proxy.app import create_app
from proxy.call import Call
from proxy.observability.observer import Observer
from proxy.settings import ObservabilitySettings, Settings

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "gauge": ("",),
}
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def dashboard() -> dict[str, Any]:
    return json.loads((GRAFANA / "dashboard.json").read_text())


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def queries(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(dash) for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression: identifiers outside label matchers, ranges and
    grouping clauses that are neither functions nor keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"label_values\(([^,)]*),[^)]*\)", r"\1", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[m.end() :].lstrip()[:1]
        if following != "(" and m.group() not in _KEYWORDS:
            names.add(m.group())
    return names


def grouping_labels(expr: str) -> set[str]:
    return {label.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", expr) for label in group.split(",")}


def exported(registry: CollectorRegistry) -> set[str]:
    """The series names a scrape can contain, from the registry's metric families."""
    return {f.name + suffix for f in registry.collect() for suffix in _SUFFIXES.get(f.type, ("",))}


def _settings() -> Settings:
    return Settings.model_validate(
        {
            "backends": {"gpu": {"type": "openai", "url": "http://127.0.0.1:9", "model": "m"}},
            "models": {"assistant": {"variants": [{"name": "control", "weight": 1, "backends": ["gpu"]}]}},
        }
    )


@pytest.fixture(scope="module")
def names() -> set[str]:
    registry = CollectorRegistry()
    create_app(_settings(), registry=registry)  # no lifespan: nothing starts, every metric is registered
    return exported(registry)


def test_every_panel_has_a_query_and_the_dashboard_is_well_formed() -> None:
    dash = dashboard()
    assert dash["uid"] == "llm-gateway" and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    graphs = [p for p in panels(dash) if p["type"] != "row"]
    assert len(graphs) >= 15
    for p in graphs:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "prometheus"
        assert 0 <= p["gridPos"]["x"] < 24 and p["gridPos"]["w"] <= 24


def test_every_query_names_only_exported_metrics(names: set[str]) -> None:
    for expr in queries(dashboard()):
        used = metric_names(expr)
        assert used, f"no metric in {expr!r}"
        assert used <= names, f"{sorted(used - names)} in {expr!r} are not exported"


def test_the_dashboard_covers_what_the_issue_asks_for() -> None:
    used = set().union(*(metric_names(e) for e in queries(dashboard())))
    for needed in (
        "llm_gateway_requests_total",
        "llm_gateway_time_to_first_token_seconds_bucket",
        "llm_gateway_request_duration_seconds_bucket",
        "llm_gateway_tokens_total",
        "llm_gateway_cache_lookups_total",
        "llm_gateway_policy_actions_total",
        "llm_gateway_ratelimit_rejections_total",
        "llm_gateway_backend_breaker_state",
        "llm_gateway_backend_queue_depth",
        "llm_gateway_inter_token_latency_seconds_bucket",
    ):
        assert needed in used, needed


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, variant) (rate(llm_gateway_ttft_bucket{model=~"$model"}'
        "[$__rate_interval]))) / on (variant) group_left sum(up)"
    )
    assert metric_names(expr) == {"llm_gateway_ttft_bucket", "up"}
    assert grouping_labels(expr) == {"le", "variant"}
    assert metric_names("label_values(llm_gateway_requests_total, model)") == {"llm_gateway_requests_total"}


def test_provisioning_points_at_the_dashboard_and_its_data_source() -> None:
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "llm-gateway.yaml").read_text())
    assert provider["providers"][0]["type"] == "file"
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert source["datasources"][0]["uid"] == "prometheus"
    assert source["datasources"][0]["type"] == "prometheus"


def test_metric_labels_never_carry_client_values() -> None:
    """A client-sent model name that matched no experiment, or a subject, never becomes a label."""
    registry = CollectorRegistry()
    observer = Observer(ObservabilitySettings(), registry, multiprocess_mode=False)
    observer.finish(Call(request_id="req_1", started=0.0, model="../../etc/passwd", status=404))
    observer.finish(
        Call(request_id="req_2", started=0.0, model="assistant", variant="control", backend="gpu")
    )
    text = generate_latest(registry).decode()
    assert "passwd" not in text
    assert (
        'llm_gateway_requests_total{backend="-",cache="bypass",endpoint="chat",model="-",status="404",variant="-"} 1.0'
        in text
    )
    assert 'model="assistant"' in text
