"""proxy.observability.observer.RequestLine: the per-request line written past structlog reads exactly like the
line structlog's JSON configuration writes, and steps aside where structlog must render."""

from __future__ import annotations

import asyncio
import datetime
import io
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog

from proxy.observability.observer import RequestLine, _utc_iso, configure_logging
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


@pytest.mark.parametrize(
    "t", [0.0, 1_795_000_000.0, 1_795_000_000.5, 1_795_000_000.9999996, 1_795_000_059.000001, 1_700_000_000.123]
)
def test_the_timestamp_is_isoformat_in_utc_with_a_z(t: float) -> None:
    expected = datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat().replace("+00:00", "Z")
    assert _utc_iso(t) == expected


async def test_the_lines_of_one_loop_iteration_leave_together_in_order() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    try:
        line = RequestLine(write_end)
        for n in range(3):
            line.write({"request_id": f"req_{n}"})
        with pytest.raises(BlockingIOError):  # nothing written yet: the iteration is not over
            os.read(read_end, 65536)
        await asyncio.sleep(0)  # the loop runs its next iteration, where the flush was scheduled
        lines = [orjson.loads(raw) for raw in os.read(read_end, 65536).splitlines()]
        assert [entry["request_id"] for entry in lines] == ["req_0", "req_1", "req_2"]
        line.write({"request_id": "req_3"})
        line.flush()  # what Observer.close does: nothing waits for a loop that is ending
        assert orjson.loads(os.read(read_end, 65536))["request_id"] == "req_3"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_without_a_running_loop_a_line_is_written_at_once() -> None:
    read_end, write_end = os.pipe()
    try:
        RequestLine(write_end).write({"request_id": "req_9"})
        assert orjson.loads(os.read(read_end, 65536))["request_id"] == "req_9"
    finally:
        os.close(read_end)
        os.close(write_end)


def test_lines_left_by_a_loop_closed_before_its_flush_go_out_with_the_next_line() -> None:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    try:
        line = RequestLine(write_end)

        def log_and_stop() -> None:
            line.write({"request_id": "req_a"})  # its flush is scheduled for the next iteration
            loop.stop()  # which never comes

        loop = asyncio.new_event_loop()
        loop.call_soon(log_and_stop)
        loop.run_forever()
        loop.close()
        line.write({"request_id": "req_b"})
        lines = [orjson.loads(raw) for raw in os.read(read_end, 65536).splitlines()]
        assert [entry["request_id"] for entry in lines] == ["req_a", "req_b"]
    finally:
        os.close(read_end)
        os.close(write_end)
