"""The hardened edge, at the socket level: header limits, slow clients, body size."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from loadtest.vllm_sim import SimulatorThread
from tests.conftest import GatewayProcess, gateway_config


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, module_tmp) -> Iterator[GatewayProcess]:
    config = gateway_config(
        backends={"gpu": {"type": "vllm", "url": sim.url, "model": "sim-model"}},
        models={"assistant": {"variants": [{"name": "c", "weight": 1, "backends": ["gpu"]}]}},
        server={"max_headers": 20, "max_header_bytes": 4096, "header_timeout_s": 1, "body_timeout_s": 1,
                "max_body_bytes": 4096},
    )
    proc = GatewayProcess(config, module_tmp).start()
    yield proc
    proc.stop()


def _exchange(gw: GatewayProcess, payload: bytes, *, pause_after: int | None = None, wait: float = 0) -> bytes:
    """Send raw bytes (optionally stalling after `pause_after` bytes) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        if pause_after is None:
            s.sendall(payload)
        else:
            s.sendall(payload[:pause_after])
            time.sleep(wait)  # the test *is* a slow client
            try:
                s.sendall(payload[pause_after:])
            except OSError:
                pass
        out = b""
        while chunk := s.recv(65536):
            out += chunk
            if b"\r\n\r\n" in out and _complete(out):
                break
        return out


def _complete(raw: bytes) -> bool:
    head, _, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def _status_and_error(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


def _request(gw: GatewayProcess, extra_headers: str = "", body: bytes = b"{}") -> bytes:
    token = gw.token()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n{extra_headers}\r\n"
    ).encode() + body


def test_too_many_headers_gets_431(gw: GatewayProcess, sim: SimulatorThread) -> None:
    extra = "".join(f"x-h{i}: v\r\n" for i in range(30))
    status, err = _status_and_error(_exchange(gw, _request(gw, extra)))
    assert status == 431 and err["code"] == "headers_too_large"
    assert sim.requests() == []


def test_oversized_header_gets_431(gw: GatewayProcess) -> None:
    status, err = _status_and_error(_exchange(gw, _request(gw, f"x-big: {'a' * 5000}\r\n")))
    assert status == 431 and err["type"] == "invalid_request_error"


def test_slow_headers_are_cut_off(gw: GatewayProcess) -> None:
    start = time.monotonic()
    raw = _exchange(gw, _request(gw), pause_after=20, wait=2.5)
    status, err = _status_and_error(raw)
    assert status == 408 and err["code"] == "request_timeout"
    assert time.monotonic() - start < 5


def test_slow_body_is_cut_off(gw: GatewayProcess, sim: SimulatorThread) -> None:
    body = json.dumps({"model": "assistant", "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = _request(gw, body=body)
    status, err = _status_and_error(_exchange(gw, request, pause_after=len(request) - 10, wait=2.5))
    assert status == 400 and err["code"] == "body_timeout"
    assert sim.requests() == []


def test_declared_oversized_body_is_refused_before_reading(gw: GatewayProcess) -> None:
    head = _request(gw).replace(b"content-length: 2", b"content-length: 999999")
    status, err = _status_and_error(_exchange(gw, head[: head.index(b"\r\n\r\n") + 4]))
    assert status == 413 and err["code"] == "request_too_large"


def test_errors_that_retrying_cannot_fix_say_so(gw: GatewayProcess) -> None:
    raw = _exchange(gw, _request(gw, body=b"{"))
    assert b"x-should-retry: false" in raw.lower()
