"""proxy.observability.RequestLine: the per-request line written past structlog reads exactly like the
line structlog's JSON configuration writes, and steps aside where structlog must render."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from proxy.observability import RequestLine, configure_logging
from proxy.settings import ObservabilitySettings

FIELDS: dict[str, Any] = {
    "request_id": "req_1",
    "worker": 7,
    "sub": "0123456789abcdef",
    "tried": ["gpu", "cpu"],
    "error": None,
    "latency_ms": 1.25,
    "stream": True,
    "policy": ["output:mask"],
}


@pytest.fixture
def logging_reset() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()
    logging.getLogger().handlers = []


def test_the_line_matches_structlogs_json_line_key_for_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logging_reset: None
) -> None:
    path = tmp_path / "stderr.log"
    with path.open("w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)  # here, not in a fixture: pytest's capture resets it
        settings = ObservabilitySettings(log_format="json", log_level="info")
        configure_logging(settings)
        structlog.contextvars.bind_contextvars(request_id="req_1")  # as the edge middleware binds it
        structlog.get_logger("llm_gateway.request").info("request", **FIELDS)
        line = RequestLine.for_settings(settings)
        assert line is not None
        line.write(dict(FIELDS))
    via_structlog, direct = (orjson.loads(raw) for raw in path.read_text().splitlines())
    assert list(direct) == list(via_structlog)  # same keys in the same order
    assert direct["timestamp"].endswith("Z") and len(direct["timestamp"]) == len(via_structlog["timestamp"])
    del direct["timestamp"], via_structlog["timestamp"]
    assert direct == via_structlog == {**FIELDS, "event": "request", "level": "info"}


@pytest.mark.parametrize(
    ("log_format", "log_level"), [("console", "info"), ("json", "warning"), ("json", "error")]
)
def test_structlog_keeps_the_line_for_console_output_and_quieter_levels(
    log_format: str, log_level: str
) -> None:
    settings = ObservabilitySettings(log_format=log_format, log_level=log_level)  # type: ignore[arg-type]
    assert RequestLine.for_settings(settings) is None


def test_a_stderr_without_a_descriptor_falls_back_to_structlog(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert RequestLine.for_settings(ObservabilitySettings(log_format="json")) is None
