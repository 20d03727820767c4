"""Logs, metrics, feedback and ab-report end to end: a real gateway process (one and two workers),
real Redis, the openai SDK, and the vLLM simulator in place of a GPU server."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from loadtest.vllm_sim import SimulatorThread
from proxy.experiments.report import bucket_of, wilson
from tests.conftest import ROOT, SECRET, GatewayProcess, free_port, gateway_config
from tests.unit.test_dashboard import dashboard, grouping_labels, metric_names, queries

REDIS_URL = "redis://127.0.0.1:6379/0"
RUN = uuid.uuid4().hex[:10]  # fresh subjects, prompts and key prefixes for every run
UPSTREAM_KEY = f"sk-upstream-{RUN}-do-not-log"
LOG_FIELDS = set(
    "event level timestamp request_id endpoint worker sub tenant model variant backend tried fallbacks cache "
    "policy stream status error latency_ms ttft_ms prompt_tokens completion_tokens disconnected "
    "completion_id route".split()
)


def _experiment(*variants: str) -> dict[str, Any]:
    """A model whose every completion can be rated (feedback_sample 1)."""
    return {"variants": [{"name": v, "weight": 50, "backends": ["gpu"]} for v in variants], "feedback_sample": 1}


def _offline_config(path: Path, **sections: Any) -> Path:
    """A config for the CLI alone: its backend is never contacted."""
    gpu = {"type": "openai", "url": "http://127.0.0.1:9", "model": "m"}
    config = gateway_config(
        backends={"gpu": gpu}, models={"assistant": _experiment("control", "candidate")}, **sections
    )
    path.write_text(yaml.safe_dump(config))
    return path


def _config(
    sim: SimulatorThread, prefix: str, observability: dict[str, Any] | None = None, **sections: Any
) -> dict[str, Any]:
    gpu = dict(type="vllm", url=sim.url, model="sim-model", api_key=UPSTREAM_KEY, health_interval_s=0.2)
    big = {"requests_per_minute": 100000, "tokens_per_minute": 100000000}
    return gateway_config(
        backends={"gpu": gpu},
        models={"assistant": _experiment("control", "candidate"), "ab": _experiment("control", "b")},
        redis_url=REDIS_URL,
        limits={"tiers": {"default": big, "tiny": {**big, "requests_per_minute": 1}}},
        observability={"log_format": "json", "ab_prefix": prefix, "ab_flush_s": 0.2, **(observability or {})},
        **sections,
    )


def _cleanup(prefix: str) -> None:
    with redis.Redis.from_url(REDIS_URL) as r:
        for key in r.scan_iter(f"{prefix}:*"):
            r.delete(key)


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, module_tmp: Path) -> Iterator[GatewayProcess]:
    prefix = f"test-obs-{RUN}"
    proc = GatewayProcess(_config(sim, prefix), module_tmp).start()
    yield proc
    proc.stop()
    _cleanup(prefix)


def _wait(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll a running process's observable state (harness polling, not test timing)."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def _log_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    records = [json.loads(raw) for raw in gw.log().splitlines() if raw.startswith("{")]
    return [r for r in records if r.get("event") == "request"]


def _line(gw: GatewayProcess, request_id: str) -> dict[str, Any]:
    found = _wait(lambda: [line for line in _log_lines(gw) if line["request_id"] == request_id])
    assert found, f"no log line for {request_id}"
    return found[0]


def _post(gw: GatewayProcess, body: dict[str, Any], sub: str = "", token: str = "") -> httpx.Response:
    auth = {"authorization": f"Bearer {token or gw.token(sub)}"}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=10, headers=auth)


def _ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def _answered(gw: GatewayProcess, alice: str) -> dict[str, Any]:
    stream = gw.client(alice).chat.completions.with_raw_response.create(
        model="assistant", messages=_ask(f"normal prompt {RUN} zebra"), stream=True
    )
    chunks = list(stream.parse())
    cached = {"model": "assistant", "messages": _ask(f"cached prompt {RUN} walrus"), "temperature": 0}
    assert _post(gw, cached, alice).headers["x-gateway-cache"] == "miss"
    hit = _post(gw, cached, alice)
    return {
        "normal": {"rid": stream.headers["x-request-id"], "cid": chunks[0].id},
        "cached": {"rid": hit.headers["x-request-id"], "cache": hit.headers["x-gateway-cache"]},
    }


def _refused(gw: GatewayProcess, sim: SimulatorThread, alice: str) -> dict[str, httpx.Response]:
    out = {
        "blocked": _post(gw, {"model": "assistant", "messages": _ask(f"blocked prompt {RUN} shit")}, alice)
    }
    sim.configure(fault="status", fault_status=500)
    out["failed"] = _post(gw, {"model": "assistant", "messages": _ask(f"failed prompt {RUN} okapi")}, alice)
    sim.reset()
    tiny = gw.token(f"tiny-{RUN}", tier="tiny")  # one request a minute
    out["limited"] = [
        _post(gw, {"model": "assistant", "messages": _ask("hi")}, token=tiny) for _ in range(2)
    ][-1]
    out["unauthenticated"] = _post(gw, {"model": "assistant", "messages": _ask("hi")}, token="a.b.c")
    return out


@pytest.fixture(scope="module")
def traffic(gw: GatewayProcess, sim: SimulatorThread) -> dict[str, Any]:
    """One request of each kind; what the tests below read back from logs, metrics and bodies."""
    alice = f"alice-{RUN}"
    out = _answered(gw, alice)
    refused = _refused(gw, sim, alice)
    for kind in ("blocked", "failed"):
        out[kind] = {"rid": refused[kind].headers["x-request-id"], "status": refused[kind].status_code}
    assert refused["limited"].status_code == 429 and refused["unauthenticated"].status_code == 401
    fb = {"id": out["normal"]["cid"], "score": 1, "comment": f"feedback comment {RUN} narwhal"}
    other = httpx.post(f"{gw.url}/v1/feedback", json=fb, headers=gw.headers(f"bob-{RUN}"))
    out["bodies"] = [r.text for r in refused.values()] + [other.text]
    return out


# -- logs ----------------------------------------------------------------------------------------------
def test_a_normal_stream_is_logged_with_every_field(gw: GatewayProcess, traffic: dict[str, Any]) -> None:
    line = _line(gw, traffic["normal"]["rid"])
    assert set(line) == LOG_FIELDS  # the allow-list, exactly
    assert line["sub"] == hashlib.sha256(f"alice-{RUN}".encode()).hexdigest()[:16]
    assert line["tenant"] == line["sub"]  # no tenant claim: the tenant is the subject, hashed the same
    assert (line["model"], line["backend"], line["tried"], line["cache"]) == (
        "assistant",
        "gpu",
        ["gpu"],
        "bypass",  # sampled (no temperature=0): never cached
    )
    assert line["variant"] in {"control", "candidate"} and line["stream"] is True
    assert line["endpoint"] == "chat"
    assert (line["status"], line["error"], line["policy"], line["disconnected"]) == (200, None, [], False)
    assert 0 < line["ttft_ms"] <= line["latency_ms"]
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] == 16
    assert line["completion_id"] == traffic["normal"]["cid"]


def test_a_cache_hit_is_logged(gw: GatewayProcess, traffic: dict[str, Any]) -> None:
    line = _line(gw, traffic["cached"]["rid"])
    assert traffic["cached"]["cache"] == "hit"
    assert (line["cache"], line["backend"], line["tried"], line["status"]) == ("hit", "cache", [], 200)
    assert line["completion_id"] == traffic["cached"]["rid"]


def test_a_blocked_request_is_logged(gw: GatewayProcess, traffic: dict[str, Any]) -> None:
    line = _line(gw, traffic["blocked"]["rid"])
    assert traffic["blocked"]["status"] == 400
    assert (line["status"], line["error"], line["policy"]) == (400, "content_filter", ["input:block"])
    assert line["backend"] is None and line["tried"] == [] and line["completion_tokens"] == 0


def test_a_failed_request_is_logged(gw: GatewayProcess, traffic: dict[str, Any]) -> None:
    line = _line(gw, traffic["failed"]["rid"])
    assert traffic["failed"]["status"] == 502
    assert (line["status"], line["error"], line["tried"]) == (502, "bad_gateway", ["gpu"])
    assert line["fallbacks"] == ["upstream_5xx"] and line["backend"] is None


def test_no_secret_or_prompt_text_in_logs_or_error_bodies(
    gw: GatewayProcess, traffic: dict[str, Any]
) -> None:
    _line(gw, traffic["failed"]["rid"])  # the log has caught up
    token = gw.token(f"alice-{RUN}")
    header, payload, _signature = token.split(".")
    haystacks = [gw.log(), *traffic["bodies"]]
    prompt_words = "zebra walrus shit okapi narwhal".split()  # one in each prompt and the feedback comment
    # secrets, the token's signed part, prompt text, the raw sub, completion text
    needles = [
        SECRET,
        UPSTREAM_KEY,
        f"{header}.{payload}",
        "Bearer",
        *prompt_words,
        f"alice-{RUN}",
        "Simulated",
    ]
    for text in haystacks:
        for needle in needles:
            assert needle not in text, f"{needle!r} leaked"


# -- metrics -------------------------------------------------------------------------------------------
def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def _total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    return sum(v for n, lab, v in samples if n == name and labels.items() <= lab.items())


def test_metrics_carry_the_expected_labels_after_traffic(gw: GatewayProcess, traffic: dict[str, Any]) -> None:
    _line(gw, traffic["failed"]["rid"])
    samples = _samples(httpx.get(f"{gw.url}/metrics").text)
    requests = [lab for n, lab, _ in samples if n == "llm_gateway_requests_total"]
    assert all(set(lab) == {"model", "variant", "backend", "status", "cache", "endpoint"} for lab in requests)
    assert {lab["endpoint"] for lab in requests} == {"chat"}
    assert {lab["status"] for lab in requests} >= {"200", "400", "429", "502"}
    assert _total(samples, "llm_gateway_requests_total", cache="hit", backend="cache") >= 1
    assert _total(samples, "llm_gateway_time_to_first_token_seconds_count", model="assistant") >= 1
    assert _total(samples, "llm_gateway_inter_token_latency_seconds_count", backend="gpu") >= 1
    assert _total(samples, "llm_gateway_tokens_total", kind="completion", backend="gpu") >= 16
    assert _total(samples, "llm_gateway_cache_lookups_total", layer="exact", result="hit") >= 1
    assert _total(samples, "llm_gateway_policy_actions_total", direction="input", action="block") >= 1
    assert _total(samples, "llm_gateway_ratelimit_rejections_total", kind="requests") >= 1
    assert _total(samples, "llm_gateway_fallbacks_total", reason="upstream_5xx") >= 1
    assert ("llm_gateway_backend_breaker_state", {"backend": "gpu"}, 0.0) in samples
    assert ("llm_gateway_redis_breaker_state", {}, 0.0) in samples  # Redis answered throughout
    assert any(n == "llm_gateway_backend_queue_depth" and lab == {"backend": "gpu"} for n, lab, _ in samples)
    assert _total(samples, "http_requests_total", handler="/v1/chat/completions") >= 6
    values = {v for _, lab, _ in samples for v in lab.values()}
    assert not any(RUN in v for v in values)  # no subject, prompt or id ever becomes a label


def test_every_dashboard_query_finds_its_series_and_labels(
    gw: GatewayProcess, traffic: dict[str, Any]
) -> None:
    _line(gw, traffic["failed"]["rid"])
    samples = _samples(httpx.get(f"{gw.url}/metrics").text)
    labels: dict[str, set[str]] = {}
    for name, lab, _ in samples:
        labels.setdefault(name, set()).update(lab)
    for expr in queries(dashboard()):
        for name in metric_names(expr):
            assert name in labels, f"{name} has no series after traffic"
            assert grouping_labels(expr) - {"le"} <= labels[name] | {""}, expr


# -- feedback and ab-report ---------------------------------------------------------------------------------
def _report(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "proxy.cli", "ab-report", "--config", str(config_path), *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def _ab_traffic(gw: GatewayProcess) -> tuple[Counter[str], dict[str, tuple[str, str]]]:
    """30 users on model "ab" and one blocked request: requests per variant, user -> (id, variant)."""
    variants: Counter[str] = Counter()
    ids: dict[str, tuple[str, str]] = {}
    for i in range(30):
        user = f"user-{RUN}-{i}"
        raw = gw.client(user).chat.completions.with_raw_response.create(model="ab", messages=_ask("hello"))
        variants[raw.headers["x-gateway-variant"]] += 1
        ids[user] = (raw.parse().id, raw.headers["x-gateway-variant"])
    assert _post(gw, {"model": "ab", "messages": _ask("shit")}, f"user-{RUN}-0").status_code == 400
    variants[ids[f"user-{RUN}-0"][1]] += 1  # sticky by sub: blocked after user 0's variant was chosen
    return variants, ids


def test_feedback_and_ab_report_from_live_traffic(gw: GatewayProcess) -> None:
    variants, ids = _ab_traffic(gw)
    user, (cid, rated) = next(iter(ids.items()))

    def rate(body: dict[str, Any], sub: str) -> httpx.Response:
        return httpx.post(f"{gw.url}/v1/feedback", json=body, headers=gw.headers(sub))

    other = rate({"id": cid, "score": 1}, f"mallory-{RUN}")
    assert other.status_code == 403 and other.json()["error"]["code"] == "not_your_completion"
    assert rate({"id": "chatcmpl-nope", "score": 1}, user).status_code == 404
    assert rate({"id": cid, "score": 3}, user).json()["error"]["param"] == "score"
    assert httpx.post(f"{gw.url}/v1/feedback", json={"id": cid, "score": 1}).status_code == 401
    assert rate({"id": cid, "score": 1}, user).json()["replaced"] is False
    assert rate({"id": cid, "score": -0.5, "comment": "changed my mind"}, user).json()["replaced"] is True
    config = gw.workdir / f"gateway-{gw.port}.yaml"

    def report() -> dict[str, Any] | None:  # the gateway flushes every 0.2 s
        got = json.loads(_report(config, "--model", "ab", "--json").stdout)["experiments"]["ab"]["variants"]
        counts = {v: s["requests"] for v, s in got.items() if s["requests"]}
        return got if counts == dict(variants) and got[rated]["feedback"]["n"] == 1 else None

    got = _wait(report)
    assert got, f"ab-report never matched {dict(variants)}"
    assert got[rated]["feedback"]["mean"] == -0.5  # last write wins
    assert sum(s["block_rate"]["count"] for s in got.values()) == 1
    assert all(s["error_rate"]["count"] == 0 for s in got.values())
    text = _report(config, "--model", "ab").stdout
    assert text.startswith("ab  (last 1h; control: control") and "policy-block rate" in text


def test_ab_report_on_seeded_redis_matches_a_hand_computation(tmp_path: Path) -> None:
    prefix = f"test-seed-{RUN}"
    now = int(time.time()) // 60
    lat = f"lat:{bucket_of(0.2)}"
    seed = {  # minute -> variant -> fields: two minutes inside the window, one far outside it
        now: {"control": {"n": 600, "err": 6, "hit": 60, lat: 594}, "candidate": dict(n=500, err=15, hit=50)},
        now - 5: {
            "control": {"n": 400, "err": 4, "hit": 40, lat: 396},
            "candidate": dict(n=500, err=10, hit=50),
        },
        now - 600: {"control": {"n": 99999, "err": 99999}},
    }
    seed[now]["candidate"].update(fb_n=4, fb_s=2.0, fb_q=2.0)  # scores 1, 0, 1, 0
    with redis.Redis.from_url(REDIS_URL) as r:
        for minute, by_variant in seed.items():
            fields = {f"assistant|{v}|{k}": n for v, counts in by_variant.items() for k, n in counts.items()}
            r.hset(f"{prefix}:m:{minute}", mapping=fields)
    config = _offline_config(tmp_path / "gw.yaml", redis_url=REDIS_URL, observability={"ab_prefix": prefix})
    try:
        out = _report(config, "--since", "1h", "--json")
    finally:
        _cleanup(prefix)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)["experiments"]["assistant"]
    control, candidate = rep["variants"]["control"], rep["variants"]["candidate"]
    assert (control["requests"], candidate["requests"]) == (1000, 1000)  # the old minute is outside 1h
    assert (control["error_rate"]["count"], candidate["error_rate"]["count"]) == (10, 25)
    # Wilson 10/1000: centre = (0.01 + 0.0019207) / 1.0038415 = 0.0118751;
    # half = 1.96 * sqrt(9.9e-6 + 9.6036e-7) / 1.0038415 = 0.0064591 / 1.0038415 = 0.0064344
    assert control["error_rate"]["ci"] == pytest.approx([0.0054408, 0.0183095], abs=2e-6)
    assert candidate["error_rate"]["ci"] == pytest.approx(list(wilson(25, 1000)))
    # pooled 35/2000 = 0.0175, se = sqrt(0.0175 * 0.9825 * 0.002) = 0.0058641, z = 2.5579 -> p = 0.01053
    assert candidate["error_rate"]["p"] == pytest.approx(0.01053, abs=1e-4)
    assert candidate["error_rate"]["significant"] is True
    assert candidate["cache_hit_rate"]["rate"] == 0.1 and candidate["cache_hit_rate"]["p"] == pytest.approx(1)
    assert candidate["feedback"]["n"] == 4 and candidate["feedback"]["mean"] == 0.5
    assert control["latency"]["n"] == 990 and control["latency"]["p50"][0] == pytest.approx(0.2, rel=0.13)


def test_ab_report_refuses_without_redis(tmp_path: Path) -> None:
    out = _report(_offline_config(tmp_path / "gateway.yaml"))
    assert out.returncode == 2 and "redis_url" in out.stderr


# -- several workers -------------------------------------------------------------------------------------
def _workers_after(gw: GatewayProcess, sent: int) -> set[int]:
    """The workers named by the request log lines, once all `sent` requests have been logged."""

    def complete() -> list[dict[str, Any]] | None:
        lines = _log_lines(gw)
        return lines if len(lines) == sent else None

    lines = _wait(complete)
    assert lines, f"expected {sent} request log lines"
    return {line["worker"] for line in lines}


def test_two_workers_metrics_add_up_on_the_metrics_port(sim: SimulatorThread, tmp_path: Path) -> None:
    prefix, metrics_port = f"test-mp-{RUN}", free_port()
    config = _config(sim, prefix, {"metrics_port": metrics_port}, server={"workers": 2})
    gw = GatewayProcess(config, tmp_path).start()
    sim.configure(itl_ms=3)  # requests overlap, so both workers take some
    try:
        body = {"model": "assistant", "messages": _ask("hello"), "max_tokens": 8}
        n, workers = 0, set()
        with ThreadPoolExecutor(16) as pool:  # a fresh connection each: the kernel spreads them
            while len(workers) < 2 and n < 200:  # the kernel picks the worker: send until both served
                sent = pool.map(lambda i: _post(gw, body, f"mp-{RUN}-{i}").status_code, range(n, n + 20))
                assert list(sent) == [200] * 20
                n += 20
                workers = _workers_after(gw, n)
        assert len(workers) == 2, "both workers should have served requests"
        for _ in range(3):  # whichever worker answers, the sums are the same
            samples = _samples(httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text)
            assert _total(samples, "llm_gateway_requests_total") == n
            assert _total(samples, "http_requests_total", handler="/v1/chat/completions") == n
            assert _total(samples, "llm_gateway_tokens_total", kind="completion") == 8 * n
            assert any(name == "llm_gateway_backend_breaker_state" for name, _, _ in samples)
        assert httpx.get(f"{gw.url}/metrics").status_code == 404  # not on the public port
    finally:
        sim.reset()
        gw.stop()
        _cleanup(prefix)
