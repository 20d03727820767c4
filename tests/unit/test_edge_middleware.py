"""proxy.app.EdgeMiddleware, outermost: chat completions go straight to their endpoint (past
Starlette), everything else through Starlette; either way every response carries `x-request-id`
and is counted in the HTTP metrics with the status the client got. Driven as an ASGI app, with no
lifespan: nothing starts, so the gateway answers "starting" unless a test puts a failing one in."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from proxy import app as app_module
from proxy.settings import Settings

SETTINGS = Settings.model_validate(
    {
        "backends": {"gpu": {"type": "openai", "url": "http://127.0.0.1:9", "model": "m"}},
        "models": {"assistant": {"variants": [{"name": "control", "weight": 1, "backends": ["gpu"]}]}},
    }
)


async def _request(app: Any, method: str, path: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"model": "assistant"}', "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-not-a-jwt")],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    start, body = sent[0], b"".join(m.get("body", b"") for m in sent[1:])
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, orjson.loads(body)


def _count(registry: CollectorRegistry, path: str, method: str, status: str) -> float:
    labels = {"handler": path, "method": method, "status": status}
    return registry.get_sample_value("http_requests_total", labels) or 0.0


async def test_direct_and_routed_responses_carry_an_id_and_are_counted() -> None:
    registry = CollectorRegistry()
    app = app_module.create_app(SETTINGS, registry=registry)
    status, headers, body = await _request(app, "POST", "/v1/chat/completions")  # direct
    assert status == 503 and body["error"]["message"] == "The gateway is starting."
    assert headers["x-request-id"].startswith("req_") and len(headers["x-request-id"]) == 36
    status, headers, body = await _request(app, "GET", "/v1/chat/completions")  # routed: 405
    assert status == 405 and body["error"]["type"] == "invalid_request_error"
    assert headers["x-request-id"].startswith("req_")
    await _request(app, "GET", "/nowhere")
    assert _count(registry, "/v1/chat/completions", "POST", "5xx") == 1
    assert _count(registry, "/v1/chat/completions", "GET", "4xx") == 1
    assert _count(registry, "none", "GET", "4xx") == 1


async def test_an_unexpected_error_on_the_direct_path_is_an_openai_500_without_its_text(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        async def chat_completions(self, request: Any, call: Any) -> None:
            raise RuntimeError("bug near sk-live-secret")

    monkeypatch.setattr(app_module.Runtime, "gw", property(lambda self: Broken()))
    registry = CollectorRegistry()
    app = app_module.create_app(SETTINGS, registry=registry)
    with caplog.at_level(logging.ERROR, logger="llm_gateway.app"):
        status, headers, body = await _request(app, "POST", "/v1/chat/completions")
    assert status == 500 and body["error"]["message"] == "The gateway hit an internal error. It has been logged."
    assert "sk-live-secret" not in orjson.dumps(body).decode() and "Traceback" not in str(body)
    assert headers["x-request-id"].startswith("req_") and headers["content-type"] == "application/json"
    assert [r.getMessage() for r in caplog.records] == ["unhandled error"]
    assert _count(registry, "/v1/chat/completions", "POST", "5xx") == 1
