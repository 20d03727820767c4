"""proxy.observability.metrics.HttpMetrics: route-template labels stay bounded whatever clients send."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from proxy.observability.metrics import HttpMetrics

ROUTES = ("/v1/chat/completions", "/v1/models", "/v1/models/{model_id}", "/healthz")


def test_labels_are_route_templates_status_classes_and_known_methods() -> None:
    registry = CollectorRegistry()
    http = HttpMetrics(registry, ROUTES)
    assert http.handler("/v1/models") == "/v1/models"
    assert http.handler("/v1/models/some/odd/name") == "/v1/models/{model_id}"
    assert http.handler("/wp-admin/../etc/passwd") == "none"
    http.observe(http.handler("/v1/chat/completions"), "POST", 429, 0.01)
    http.observe(http.handler("/nope"), "BREW", 404, 0.02)
    count = registry.get_sample_value
    labels = {"handler": "/v1/chat/completions", "method": "POST", "status": "4xx"}
    assert count("http_requests_total", labels) == 1
    assert count("http_requests_total", {"handler": "none", "method": "other", "status": "4xx"}) == 1
    assert count("http_request_duration_seconds_count", {"handler": "none", "method": "other"}) == 1
