"""Rate limits end to end: two real gateway processes sharing the real Redis, the vLLM simulator as the
backend. Exact request limits under concurrency, token reservation and refund, the rate-limit headers,
a Redis outage under both policies (on a private redis-server this module starts and stops), and that
refused identities never spend a victim's quota.

Every test uses its own `sub` (a uuid), so no two tests share a limiter key in Redis."""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import shutil
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from loadtest.vllm_sim import SimulatorThread
from proxy.auth.authenticator import Principal
from proxy.limits.limiter import _identity
from proxy.protocol import estimate_prompt_tokens
from tests.conftest import SECRET, GatewayProcess, free_port, gateway_config

REDIS_URL = "redis://127.0.0.1:6379/0"
MESSAGES = [{"role": "user", "content": "Say hello in five words."}]
CHAT = {"model": "assistant", "messages": MESSAGES, "max_tokens": 4}
RL_HEADERS = (
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
)  # fmt: skip
TIERS = {
    "default": {"requests_per_minute": 100000, "tokens_per_minute": 100000000},
    "e2e": {"requests_per_minute": 37, "tokens_per_minute": 10**9},
    "hdr": {"requests_per_minute": 10, "tokens_per_minute": 6000},
    "tok": {"requests_per_minute": 1000, "tokens_per_minute": 600},
    "victim": {"requests_per_minute": 20, "tokens_per_minute": 10**9},
    "small": {"requests_per_minute": 4, "tokens_per_minute": 10**9},
}


def config(sim: SimulatorThread, *, redis_url: str = REDIS_URL, **limits: Any) -> dict[str, Any]:
    gpu = {"type": "vllm", "url": sim.url, "model": "sim-model", "health_interval_s": 0.5}
    return gateway_config(
        backends={"gpu": gpu},
        models={"assistant": {"variants": [{"name": "only", "weight": 100, "backends": ["gpu"]}]}},
        limits={"tiers": TIERS, **limits},
        cache={"enabled": False},  # every admitted request reaches the simulator, and costs real usage
        redis_url=redis_url,
    )


@pytest.fixture(scope="module")
def pair(sim: SimulatorThread, module_tmp: Path) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    """Two gateway processes with one config, sharing the real Redis."""
    cfg = config(sim)
    a, b = GatewayProcess(cfg, module_tmp), GatewayProcess(cfg, module_tmp)
    try:
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(GatewayProcess.start, [a, b]))
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


def new_sub(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def auth(gw: GatewayProcess, sub: str, tier: str) -> dict[str, str]:
    return {"authorization": f"Bearer {gw.token(sub, tier=tier)}"}


def chat(http: httpx.Client, gw: GatewayProcess, headers: dict[str, str], **body: Any) -> httpx.Response:
    return http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, **body}, headers=headers)


_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?")


def seconds(text: str) -> float:
    """OpenAI's Go-style durations ('20ms', '1s', '6m0s', '1h2m3.5s') -> seconds."""
    if re.fullmatch(r"\d+ms", text):
        return int(text[:-2]) / 1000
    m = _DURATION.fullmatch(text)
    assert m and text, f"not a duration: {text!r}"
    h, mi, s = m.groups()
    return int(h or 0) * 3600 + int(mi or 0) * 60 + float(s or 0)


def assert_rl_headers(r: httpx.Response, rpm: int, tpm: int) -> dict[str, float]:
    """All six x-ratelimit-* headers, well formed; returns them as numbers."""
    missing = [h for h in RL_HEADERS if h not in r.headers]
    assert not missing, (missing, dict(r.headers))
    assert r.headers["x-ratelimit-limit-requests"] == str(rpm)
    assert r.headers["x-ratelimit-limit-tokens"] == str(tpm)
    out = {h: float(r.headers[h]) for h in RL_HEADERS if "reset" not in h}
    for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
        out[h] = seconds(r.headers[h])
        assert 0 <= out[h] <= 60.001, (h, r.headers[h])
    assert 0 <= out["x-ratelimit-remaining-requests"] < rpm
    assert out["x-ratelimit-remaining-tokens"] <= tpm
    return out


def assert_openai_error(r: httpx.Response, status: int, type_: str, code: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err: dict[str, Any] = body["error"]
    assert err["type"] == type_ and err["code"] == code, body
    return err


def retry_after(r: httpx.Response) -> int:
    value = r.headers["retry-after"]
    assert value.isdigit() and int(value) >= 1, value
    assert int(r.headers["retry-after-ms"]) >= 1
    assert int(value) == math.ceil(int(r.headers["retry-after-ms"]) / 1000)
    return int(value)


# -- exact request limit across processes --------------------------------------------------------


def start_pair(start_gateway: Any, cfg: dict[str, Any]) -> tuple[GatewayProcess, GatewayProcess]:
    with ThreadPoolExecutor(2) as pool:  # both start at once
        a, b = pool.map(start_gateway, [cfg, cfg])
    return a, b


@pytest.mark.parametrize(
    "redis_timeout_s",
    [
        pytest.param(None, id="default_timeout"),
        pytest.param(5.0, id="timeout_5s"),
    ],
)
async def test_exact_request_limit_under_200_concurrent_requests_across_two_processes(
    sim: SimulatorThread, start_gateway: Any, redis_timeout_s: float | None
) -> None:
    cfg = config(sim)
    if redis_timeout_s is not None:
        cfg["redis"] = {"timeout_s": redis_timeout_s}
    a, b = start_pair(start_gateway, cfg)
    sub = new_sub("burst")
    headers = {**auth(a, sub, "e2e"), "content-type": "application/json"}
    body = orjson.dumps(CHAT)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)

    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one(i: int) -> tuple[int, httpx.Response, float]:
            r = await client.post(f"{(a, b)[i % 2].url}/v1/chat/completions", content=body, headers=headers)
            return i % 2, r, time.time()

        t0 = time.time()
        results = await asyncio.gather(*(one(i) for i in range(200)))

        statuses = Counter(r.status_code for _, r, _ in results)
        tripped = [gw.url for gw in (a, b) if "Redis failed" in gw.log()]
        assert statuses == {200: 37, 429: 163}, (statuses, f"Redis considered down by {tripped}")
        assert {proc for proc, r, _ in results if r.status_code == 429} == {0, 1}  # both refused some
        sim.wait_for(lambda recs: len(recs) >= 37)
        assert len(sim.requests()) == 37  # exactly the admitted ones reached the backend

        accepted = [assert_rl_headers(r, 37, 10**9) for _, r, _ in results if r.status_code == 200]
        remaining = [h["x-ratelimit-remaining-requests"] for h in accepted]
        assert min(remaining) == 0 and max(remaining) <= 36
        for _, r, received in results:
            if r.status_code != 429:
                continue
            err = assert_openai_error(r, 429, "requests", "rate_limit_exceeded")
            assert "37" in err["message"] and sub not in r.text
            h = assert_rl_headers(r, 37, 10**9)
            assert h["x-ratelimit-remaining-requests"] == 0
            # the real reset: the oldest admitted request (sent after t0) leaves the window 60 s later
            ra = retry_after(r)
            assert t0 + 60 - received - 1 <= ra <= 61, (ra, received - t0)
            assert abs(h["x-ratelimit-reset-requests"] - ra) <= 1

        # the window is full on both processes; another principal on the same tier is untouched
        for gw in (a, b):
            r = await client.post(f"{gw.url}/v1/chat/completions", content=body, headers=headers)
            assert r.status_code == 429
        other = {**auth(a, new_sub("burst-other"), "e2e"), "content-type": "application/json"}
        r = await client.post(f"{b.url}/v1/chat/completions", content=body, headers=other)
        assert r.status_code == 200 and r.headers["x-ratelimit-remaining-requests"] == "36"
    for gw in (a, b):  # Redis was never considered down: the count was the shared one throughout
        assert "Redis failed" not in gw.log()


# -- headers on success --------------------------------------------------------------------------
def test_headers_on_success_and_remaining_decreasing(
    pair: tuple[GatewayProcess, GatewayProcess], http: httpx.Client
) -> None:
    a, b = pair
    headers = auth(a, new_sub("hdr"), "hdr")
    seen = []
    for i in range(4):
        r = chat(http, (a, b)[i % 2], headers, max_tokens=20)
        assert r.status_code == 200, r.text
        h = assert_rl_headers(r, 10, 6000)
        seen.append(h)
        assert 45 <= h["x-ratelimit-reset-requests"] <= 60.001
        # the tokens reset is the time to refill what is missing at 6000/min = 100/s
        assert h["x-ratelimit-reset-tokens"] == pytest.approx(
            (6000 - h["x-ratelimit-remaining-tokens"]) / 100, abs=0.02
        )
    assert [h["x-ratelimit-remaining-requests"] for h in seen] == [9, 8, 7, 6]
    tokens = [h["x-ratelimit-remaining-tokens"] for h in seen]
    assert all(x > y for x, y in itertools.pairwise(tokens)), tokens

    with http.stream(
        "POST", f"{b.url}/v1/chat/completions", json={**CHAT, "stream": True}, headers=headers
    ) as stream:  # a streamed answer carries them too
        assert stream.status_code == 200
        h = assert_rl_headers(stream, 10, 6000)
        assert h["x-ratelimit-remaining-requests"] == 5
        assert b"[DONE]" in b"".join(stream.iter_bytes())


# -- token reservation and refund ----------------------------------------------------------------
def _bucket_tokens(sub: str) -> float | None:
    """The shared token bucket's stored level for (tenant=sub, sub); None when it is full (deleted)."""
    principal = Principal(sub=sub, tenant=sub, tier="tok", allowed_models=None, claims={})
    with redis.Redis.from_url(REDIS_URL) as r:
        value = r.hget(f"llmgw:rl:{{{_identity(principal)}}}:tok", "t")
    return None if value is None else float(value)


def test_token_reservation_refund_and_retry_after(
    pair: tuple[GatewayProcess, GatewayProcess], sim: SimulatorThread, http: httpx.Client
) -> None:
    a, b = pair
    sub = new_sub("tok")
    headers = auth(a, sub, "tok")  # 600 tokens per minute: refills 10 per second
    prompt = estimate_prompt_tokens(MESSAGES)

    # 1. the whole of prompt + max_tokens is reserved at admission
    t1 = time.monotonic()
    r1 = chat(http, a, headers, max_tokens=400)
    assert r1.status_code == 200, r1.text
    after_reservation = assert_rl_headers(r1, 1000, 600)["x-ratelimit-remaining-tokens"]
    assert after_reservation == 600 - (prompt + 400)
    usage = r1.json()["usage"]
    used = usage["prompt_tokens"] + usage["completion_tokens"]
    assert used < 400

    # 2. the unused part comes back once the answer is settled (bounded wait for the refund's write)
    deadline = time.monotonic() + 3
    while (level := _bucket_tokens(sub)) is not None and level < 600 - used - 1:
        assert time.monotonic() < deadline, f"no refund: bucket at {level}"
        time.sleep(0.01)
    r2 = chat(http, b, headers, max_tokens=10)  # through the other process
    assert r2.status_code == 200, r2.text
    remaining2 = assert_rl_headers(r2, 1000, 600)["x-ratelimit-remaining-tokens"]
    elapsed = time.monotonic() - t1
    assert remaining2 > after_reservation
    assert 600 - used - (prompt + 10) - 1 <= remaining2 <= 600 - used - (prompt + 10) + 10 * elapsed + 1

    # 3. a request that does not fit what is left: 429 with a retry-after that matches the refill
    fits_later = 600 - prompt  # prompt + max_tokens == the whole capacity
    sim.reset()
    sent_at = time.monotonic()
    r3 = chat(http, a, headers, max_tokens=fits_later)
    err = assert_openai_error(r3, 429, "tokens", "rate_limit_exceeded")
    assert "tokens per minute" in err["message"].lower()
    h = assert_rl_headers(r3, 1000, 600)
    ra = retry_after(r3)
    missing = 600 - h["x-ratelimit-remaining-tokens"]  # floor() of what is there: up to 1 token more
    assert math.ceil((missing - 1) / 10) <= ra <= math.ceil(missing / 10)
    assert sim.requests() == []

    # ... and the same request is admitted once that time has passed (bounded poll), not much sooner
    exact_wait = int(r3.headers["retry-after-ms"]) / 1000
    deadline = sent_at + exact_wait + 5
    while (
        r := chat(http, (a, b)[int(time.monotonic() * 10) % 2], headers, max_tokens=fits_later)
    ).status_code == 429:
        assert time.monotonic() < deadline, "still refused well after retry-after"
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    # not sooner than promised (the refusal was computed after sent_at); refused polls took nothing
    assert time.monotonic() - sent_at >= exact_wait - 0.05

    # 4. larger than the whole capacity: never fits, so 429 that says not to retry
    r4 = chat(http, b, headers, max_tokens=1000)
    err = assert_openai_error(r4, 429, "tokens", "rate_limit_exceeded")
    assert "max_tokens" in err["message"] and r4.headers.get("x-should-retry") == "false"


# -- refused identities spend nobody's quota ------------------------------------------------------
def _forged(sub: str, gw: GatewayProcess) -> list[dict[str, str]]:
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    good = {"sub": sub, "tier": "victim", "iat": now, "exp": now + 600, "aud": "llm-gateway", "iss": "tests"}

    def signed(payload: dict[str, Any], key: bytes = SECRET.encode(), header: Any = None) -> str:
        signing = f"{b64(orjson.dumps(header or {'alg': 'HS256'}))}.{b64(orjson.dumps(payload))}"
        return f"{signing}.{b64(hmac.new(key, signing.encode(), hashlib.sha256).digest())}"

    valid = gw.token(sub, tier="victim")
    tokens = [
        signed(good, b"wrong-secret-" * 4),
        signed({**good, "exp": now - 120}),
        signed({**good, "aud": "other"}),
        signed({**good, "iss": "tests.evil"}),
        signed({**good, "nbf": now + 3600}),
        signed(good, header={"alg": "HS256", "crit": ["exp"]}),
        signed(good, header={"alg": "none"}),
        f"{b64(orjson.dumps({'alg': 'none'}))}.{b64(orjson.dumps(good))}.",
        valid.rsplit(".", 1)[0] + "." + b64(b"x" * 32),
    ]
    return [{"authorization": f"Bearer {t}"} for t in tokens] + [{"authorization": "Bearer " + valid + "x"}]


def test_auth_failures_do_not_consume_the_victims_quota(
    pair: tuple[GatewayProcess, GatewayProcess], sim: SimulatorThread, http: httpx.Client
) -> None:
    a, b = pair
    victim = new_sub("victim")
    headers = auth(a, victim, "victim")
    first = chat(http, a, headers)
    assert first.status_code == 200
    assert assert_rl_headers(first, 20, 10**9)["x-ratelimit-remaining-requests"] == 19
    sim.reset()

    forged = _forged(victim, a)
    for i in range(60):  # 3 x the victim's whole per-minute quota, over both processes
        gw = (a, b)[i % 2]
        r = chat(http, gw, forged[i % len(forged)])
        assert r.status_code == 401, r.text
        assert not any(k.startswith("x-ratelimit") for k in r.headers)
    # duplicate Authorization headers carrying the victim's own valid token
    dup = [("authorization", headers["authorization"])] * 2
    assert http.post(f"{b.url}/v1/chat/completions", json=CHAT, headers=dup).status_code == 401
    assert sim.requests() == []

    after = chat(http, b, headers)
    assert after.status_code == 200
    assert assert_rl_headers(after, 20, 10**9)["x-ratelimit-remaining-requests"] == 18


# -- Redis outage --------------------------------------------------------------------------------
class PrivateRedis:
    """A throwaway redis-server on its own port (no persistence), stopped and restarted by the test."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary, self.workdir, self.port = binary, workdir, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.ping():
            assert self.proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def timed(http: httpx.Client, gw: GatewayProcess, headers: dict[str, str]) -> httpx.Response:
    start = time.monotonic()
    r = chat(http, gw, headers)
    took = time.monotonic() - start
    assert took < 1.0, f"{gw.url} took {took:.2f}s to answer {r.status_code}"
    assert r.status_code != 500, r.text
    return r


def test_redis_outage_fail_open_and_fail_closed_then_recovery(
    private_redis: PrivateRedis, sim: SimulatorThread, start_gateway: Any, http: httpx.Client
) -> None:
    with ThreadPoolExecutor(2) as pool:
        gw_open, gw_closed = pool.map(
            start_gateway,
            [
                config(sim, redis_url=private_redis.url, on_redis_error=policy)
                for policy in ("fail_open", "fail_closed")
            ],
        )
    both = (gw_open, gw_closed)

    def shared_quota_of_4_holds() -> None:
        headers = auth(gw_open, new_sub("shared"), "small")
        for i in range(4):
            r = timed(http, both[i % 2], headers)
            assert r.status_code == 200, r.text
            assert r.headers["x-ratelimit-remaining-requests"] == str(3 - i)
        for gw in both:
            assert timed(http, gw, headers).status_code == 429

    shared_quota_of_4_holds()

    private_redis.stop()
    headers = auth(gw_open, new_sub("outage"), "small")
    # fail_open: answered, from per-process limits (the tier's 4 per minute still holds locally)
    got = [timed(http, gw_open, headers).status_code for _ in range(6)]
    assert got == [200, 200, 200, 200, 429, 429], got
    # fail_closed: 503 in OpenAI's shape, with a retry-after
    for _ in range(6):
        r = timed(http, gw_closed, headers)
        assert_openai_error(r, 503, "server_error", "service_unavailable")
        assert r.headers["retry-after"] == "1"
    # either way this process answers (a JSON 503 at worst): it stays in rotation, degraded, and
    # the shared Redis breaker is open in its metrics
    ready = http.get(f"{gw_open.url}/readyz")
    assert ready.status_code == 200 and ready.json()["degraded"] == ["redis unreachable"]
    assert ready.json()["redis"] == "unreachable"
    ready = http.get(f"{gw_closed.url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "degraded"
    assert ready.json()["degraded"] == ["redis unreachable (fail_closed: requests get 503)"]
    for gw in both:
        assert http.get(f"{gw.url}/healthz").status_code == 200
        metrics = http.get(f"{gw.url}/metrics").text
        assert re.search(r"^llm_gateway_redis_breaker_state [12]\.0$", metrics, re.M)  # open, or probing

    private_redis.start()  # same port, empty
    deadline = time.monotonic() + 10
    while True:  # shared again: one quota seen through both processes, in order
        probe = auth(gw_open, new_sub("probe"), "small")
        r1, r2 = timed(http, gw_open, probe), timed(http, gw_closed, probe)
        if (r1.status_code, r2.status_code) == (200, 200) and (
            r1.headers["x-ratelimit-remaining-requests"],
            r2.headers["x-ratelimit-remaining-requests"],
        ) == ("3", "2"):
            break
        assert time.monotonic() < deadline, "limits not shared again 10 s after Redis came back"
        time.sleep(0.1)
    shared_quota_of_4_holds()
    for gw in both:
        assert http.get(f"{gw.url}/readyz").json()["status"] == "ready"
