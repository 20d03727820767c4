"""Faults, end to end: a real gateway process in front of simulators that stall, refuse, reset,
fail and drip, for streams and JSON answers alike, and clients that leave at every moment.

What each case asserts: the status the client sees, that it arrives within the configured
deadlines (first token 1 s, idle 1 s, whole request 3 s), that the upstream request is closed
within 1 s of a client leaving, that the token reservation is given back, and that nothing
incomplete is cached.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from loadtest.vllm_sim import SimulatorThread
from tests.conftest import GatewayProcess, gateway_config

FIRST_TOKEN_S, IDLE_S, REQUEST_S = 1.0, 1.0, 3.0
SLACK_S = 1.5  # process scheduling on a busy 2-core machine; the deadlines are what is checked
TOKENS_PER_MINUTE = 1_000_000
RESERVE = 4_000  # max_tokens of every request here (the simulator's context is 4,096): a refund is plain to see


def _backend(url: str) -> dict[str, Any]:
    return {
        "type": "vllm", "url": url, "model": "sim-model", "connect_timeout_s": 1.0,
        "first_token_timeout_s": FIRST_TOKEN_S, "idle_timeout_s": IDLE_S, "request_timeout_s": REQUEST_S,
        "health_interval_s": 0.2, "breaker": {"failures": 100000, "reset_s": 1},
    }


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, spare: SimulatorThread, module_tmp: Path) -> Iterator[GatewayProcess]:
    config = gateway_config(
        limits={"tiers": {"default": {"requests_per_minute": 100000, "tokens_per_minute": TOKENS_PER_MINUTE}}},
        backends={"gpu": _backend(sim.url), "spare": _backend(spare.url)},
        models={
            "fallback": {"variants": [{"name": "a", "weight": 1, "backends": ["gpu"], "fallback": ["spare"]}]},
            "solo": {"variants": [{"name": "a", "weight": 1, "backends": ["gpu"]}]},
        },
    )
    proc = GatewayProcess(config, module_tmp).start()
    yield proc
    proc.stop()


def _body(model: str, stream: bool, text: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], "stream": stream,
            "max_tokens": RESERVE, "temperature": 0}


def _post(gw: GatewayProcess, body: dict[str, Any], sub: str) -> tuple[httpx.Response, str, float]:
    """(response, its body text, seconds it took) with a client whose own timeout is far away."""
    started = time.monotonic()
    with httpx.Client(timeout=30) as http, http.stream(
        "POST", f"{gw.url}/v1/chat/completions", json=body, headers=gw.headers(sub)
    ) as r:
        text = "".join(r.iter_text())
    return r, text, time.monotonic() - started


def _frames(text: str) -> list[Any]:
    return [json.loads(line[6:]) if line[6:] != "[DONE]" else "[DONE]"
            for line in text.splitlines() if line.startswith("data: ")]


def _tokens_left(gw: GatewayProcess, sub: str) -> int:
    """What the limiter has left for `sub`, read off a cheap request that spends nothing."""
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers=gw.headers(sub), timeout=10,
                   json={"model": "solo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1})
    return int(r.headers["x-ratelimit-remaining-tokens"]) + r.json().get("usage", {}).get("total_tokens", 0)


def _assert_refunded(gw: GatewayProcess, sub: str) -> None:
    # without the refund the RESERVE would still be held for a minute
    assert _tokens_left(gw, sub) > TOKENS_PER_MINUTE - RESERVE // 2


def _healthy_again(gw: GatewayProcess) -> None:
    """After a fault, wait for the gateway's next probe to see the backend back (harness polling)."""
    deadline = time.monotonic() + 5
    while httpx.get(f"{gw.url}/readyz", timeout=5).json()["status"] != "ready":
        assert time.monotonic() < deadline, "the backend did not come back"
        time.sleep(0.05)


def _assert_not_cached(gw: GatewayProcess, body: dict[str, Any], sub: str, sim: SimulatorThread) -> None:
    sim.reset()
    _healthy_again(gw)
    r, _, _ = _post(gw, body, sub)
    assert r.status_code == 200 and r.headers["x-gateway-cache"] == "miss"


# -- faults before the first byte: a JSON answer and a stream both fall over ------------------------
BEFORE_FIRST_BYTE = {
    "stall before headers": {"fault": "stall", "stall_s": 30},
    "stall after headers": {"fault": "stall_stream", "drop_after_chunks": 0, "stall_s": 30},
    "connection refused": {"fault": "refuse"},
    "reset before a token": {"fault": "reset", "drop_after_chunks": 0},
    "5xx": {"fault": "status", "fault_status": 500},
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("fault", list(BEFORE_FIRST_BYTE))
def test_a_fault_before_the_first_byte_falls_over_within_the_first_token_deadline(
    gw: GatewayProcess, sim: SimulatorThread, spare: SimulatorThread, fault: str, stream: bool
) -> None:
    sim.configure(**BEFORE_FIRST_BYTE[fault])
    r, text, took = _post(gw, _body("fallback", stream, f"fall over: {fault} {stream}"), "fo")
    assert r.status_code == 200, text
    assert r.headers["x-gateway-backend"] == "spare"
    assert took < FIRST_TOKEN_S + SLACK_S
    answer = _frames(text) if stream else [json.loads(text)]
    assert answer[-1] == "[DONE]" if stream else answer[0]["choices"][0]["finish_reason"] == "stop"
    if fault.startswith("stall"):  # the abandoned attempt was closed, not left generating
        assert sim.wait_for(lambda recs: recs and recs[-1]["finished"] is not None, timeout=1.0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(
    ("fault", "status"),
    [("connection refused", 503), ("stall before headers", 504), ("stall after headers", 504), ("5xx", 502)],
)
def test_with_no_backend_left_the_status_says_why(
    gw: GatewayProcess, sim: SimulatorThread, fault: str, status: int, stream: bool
) -> None:
    sim.configure(**BEFORE_FIRST_BYTE[fault])
    body = _body("solo", stream, f"alone: {fault} {stream}")
    r, text, took = _post(gw, body, f"solo-{fault}-{stream}")
    assert r.status_code == status, text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert took < FIRST_TOKEN_S + SLACK_S
    if status == 503:  # nothing could take the request: when to come back, honestly
        assert int(r.headers["retry-after"]) >= 1
    _assert_refunded(gw, f"solo-{fault}-{stream}")
    _assert_not_cached(gw, body, f"solo-{fault}-{stream}", sim)


def test_an_upstream_503_is_a_503_with_retry_after(gw: GatewayProcess, sim: SimulatorThread) -> None:
    sim.configure(fault="status", fault_status=503)
    r, text, _ = _post(gw, _body("solo", False, "busy"), "busy")
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1, text


# -- faults after the first token --------------------------------------------------------------------
AFTER_FIRST_TOKEN = {
    "stall mid-stream": ({"fault": "stall_stream", "drop_after_chunks": 3, "stall_s": 30}, IDLE_S),
    "reset mid-stream": ({"fault": "reset", "drop_after_chunks": 3, "itl_ms": 50}, 0.0),
    "drop mid-stream": ({"fault": "drop", "drop_after_chunks": 3, "itl_ms": 50}, 0.0),
    "slow drip": ({"itl_ms": 0.8 * IDLE_S * 1000, "reply_tokens": 40}, REQUEST_S),
}


@pytest.mark.parametrize("fault", list(AFTER_FIRST_TOKEN))
def test_a_stream_that_fails_after_its_first_token_ends_with_an_error_frame(
    gw: GatewayProcess, sim: SimulatorThread, fault: str
) -> None:
    changes, bound = AFTER_FIRST_TOKEN[fault]
    sim.configure(**changes)
    body = _body("solo", True, f"mid-stream: {fault}")
    r, text, took = _post(gw, body, f"mid-{fault}")
    assert r.status_code == 200
    frames = _frames(text)
    assert frames[0]["choices"][0]["delta"] is not None  # the first tokens did reach the client
    assert "[DONE]" not in frames and "error" in frames[-1]
    assert not any(f.get("choices") and f["choices"][0].get("finish_reason") for f in frames[:-1])  # no fake stop
    assert took < bound + 1.0 + SLACK_S
    assert sim.wait_for(lambda recs: recs and recs[-1]["finished"] is not None, timeout=1.0)
    _assert_refunded(gw, f"mid-{fault}")
    _assert_not_cached(gw, body, f"mid-{fault}", sim)


@pytest.mark.parametrize("fault", list(AFTER_FIRST_TOKEN))
def test_a_json_answer_that_fails_part_way_falls_over(
    gw: GatewayProcess, sim: SimulatorThread, spare: SimulatorThread, fault: str
) -> None:
    """Nothing of a JSON answer has reached the client, so a failure part-way is still a failure
    before the first byte: the next backend answers, within the deadlines."""
    changes, bound = AFTER_FIRST_TOKEN[fault]
    sim.configure(**changes)
    r, text, took = _post(gw, _body("fallback", False, f"json part-way: {fault}"), "json-part")
    assert r.status_code == 200, text
    assert r.headers["x-gateway-backend"] == "spare"
    assert json.loads(text)["choices"][0]["finish_reason"] == "stop"
    assert took < bound + 1.0 + SLACK_S


# -- a client that leaves cancels the upstream request at once ---------------------------------------
class RawClient:
    """One request on a raw socket, so the test decides the exact moment the client leaves."""

    def __init__(self, gw: GatewayProcess, body: dict[str, Any], sub: str) -> None:
        payload = orjson.dumps(body)
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
            f"authorization: {gw.headers(sub)['authorization']}\r\ncontent-length: {len(payload)}\r\n\r\n"
        )
        self.sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
        self.sock.sendall(head.encode() + payload)

    def read_some(self) -> bytes:
        return self.sock.recv(65536)

    def leave(self) -> float:
        self.sock.close()
        return time.monotonic()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()  # idempotent; also when an assertion failed before leave()


def _upstream_gone_within_a_second(sim: SimulatorThread, left_at: float) -> None:
    recs = sim.wait_for(lambda recs: recs and recs[-1]["finished"] is not None, timeout=2.0)
    assert recs[-1]["finished"] - left_at < 1.0
    assert not recs[-1]["completed"]


LEAVE_AT = {
    "while the backend holds the request": ({"fault": "stall", "stall_s": 30}, lambda rec: True),
    "after headers, before the first token": (
        {"fault": "stall_stream", "drop_after_chunks": 0, "stall_s": 30}, lambda rec: rec["stalled"]),
    "while the answer is generated": ({"itl_ms": 100, "reply_tokens": 200}, lambda rec: rec["status"] == 200),
    "mid-stream, the backend stalled": (
        {"fault": "stall_stream", "drop_after_chunks": 3, "stall_s": 30}, lambda rec: rec["stalled"]),
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("moment", list(LEAVE_AT))
def test_a_client_that_leaves_cancels_the_upstream_within_a_second(
    gw: GatewayProcess, sim: SimulatorThread, moment: str, stream: bool
) -> None:
    changes, reached = LEAVE_AT[moment]
    sim.configure(**changes)
    sub = f"leaver-{moment}-{stream}"
    body = _body("solo", stream, f"leaving {moment} {stream}")
    with RawClient(gw, body, sub) as client:
        sim.wait_for(lambda recs: bool(recs) and reached(recs[-1]), timeout=5.0)
        if stream and moment == "while the answer is generated":
            assert b"data: " in client.read_some()  # tokens are reaching the client
        left_at = client.leave()
    _upstream_gone_within_a_second(sim, left_at)
    _assert_refunded(gw, sub)
    _assert_not_cached(gw, body, sub, sim)
    lines = [json.loads(raw) for raw in gw.log().splitlines() if raw.startswith("{")]
    gone = [line for line in lines if line.get("event") == "request" and line.get("disconnected")]
    assert gone and gone[-1]["status"] in (200, 499)  # 200: a stream's head had gone out already


# -- readiness: a process that can answer stays in rotation -------------------------------------------
def test_with_every_backend_down_the_process_stays_ready_serves_hits_and_answers_503(module_tmp: Path) -> None:
    """Readiness means this process can serve: with its only backend gone it still answers a cached
    question and gives the rest a JSON 503 with retry-after, instead of leaving the Service (every
    replica shares the backend: all of them would leave at once, and clients would get refused
    connections). /readyz says what is wrong in its body."""
    lone = SimulatorThread().start()
    config = gateway_config(
        backends={"gpu": _backend(lone.url)},
        models={"solo": {"variants": [{"name": "a", "weight": 1, "backends": ["gpu"]}]}},
    )
    (module_tmp / "lone").mkdir(exist_ok=True)
    gw = GatewayProcess(config, module_tmp / "lone").start()
    try:
        cached = _body("solo", False, "what is a gateway?")
        r, _, _ = _post(gw, cached, "ready-user")
        assert r.status_code == 200 and r.headers["x-gateway-cache"] == "miss"
        lone.stop()
        deadline = time.monotonic() + 5
        while (ready := httpx.get(f"{gw.url}/readyz", timeout=5)).json()["status"] == "ready":
            assert time.monotonic() < deadline, "the probe never saw the backend go"
            time.sleep(0.05)
        body = ready.json()
        assert ready.status_code == 200 and body["status"] == "degraded"
        assert body["models"]["solo"] == {"backends": 1, "usable": 0}
        assert body["backends"]["gpu"]["healthy"] is False
        assert body["degraded"] == ["model solo: no usable backend (requests get 503 + retry-after)"]
        r, text, _ = _post(gw, cached, "ready-user")
        assert r.status_code == 200 and r.headers["x-gateway-cache"] == "hit"
        r, text, _ = _post(gw, _body("solo", False, "something never asked"), "ready-user")
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert json.loads(text)["error"]["code"] == "service_unavailable"
    finally:
        gw.stop()
        lone.stop()
