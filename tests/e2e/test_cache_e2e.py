"""The response cache through the gateway: real Redis 8 with vector search, the real SDK."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from loadtest.vllm_sim import SimulatorThread
from tests.conftest import WORDS, GatewayProcess, gateway_config

pytestmark = pytest.mark.redis8


@pytest.fixture(scope="module")
def words(module_tmp: Path) -> Path:
    path = module_tmp / "extra.txt"
    path.write_text("# words added while the gateway runs\n")
    return path


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, redis8_url: str, words: Path, module_tmp: Path) -> Iterator[GatewayProcess]:
    config = gateway_config(
        backends={"gpu": {"type": "vllm", "url": sim.url, "model": "sim-model"}},
        models={"assistant": {"variants": [{"name": "c", "weight": 1, "backends": ["gpu"]}]}},
        redis_url=redis8_url,
        cache={"semantic": {"enabled": True}, "ttl_s": 600},
        policies={"words": [*WORDS, str(words)], "output": "mask"},
    )
    proc = GatewayProcess(config, module_tmp).start(timeout=180)
    yield proc
    proc.stop()


def _ask(gw: GatewayProcess, text: str, *, tenant: str = "t1", stream: bool = False, **extra) -> httpx.Response:
    body = {"model": "assistant", "messages": [{"role": "user", "content": text}], "temperature": 0,
            "stream": stream, **extra}
    headers = {"authorization": f"Bearer {gw.token('u-' + tenant, tenant=tenant)}"}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30)


def _frames(r: httpx.Response) -> list[dict]:
    return [orjson.loads(line[6:]) for line in r.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def _text(frames: list[dict]) -> str:
    return "".join(f["choices"][0]["delta"].get("content") or "" for f in frames if f.get("choices"))


def _unique(prefix: str) -> str:
    return f"{prefix} (case {uuid.uuid4().hex[:8]})"


def test_exact_hit_serves_without_the_backend(gw: GatewayProcess, sim: SimulatorThread) -> None:
    q = _unique("How many legs does a spider have?")
    first, second = _ask(gw, q), _ask(gw, q)
    assert first.headers["x-gateway-cache"] == "miss" and second.headers["x-gateway-cache"] == "hit"
    assert first.json()["choices"][0]["message"] == second.json()["choices"][0]["message"]
    assert second.json()["id"] != first.json()["id"]  # a fresh id per response
    assert len(sim.requests()) == 1


def test_stream_replay_keeps_chunk_boundaries_and_usage(gw: GatewayProcess, sim: SimulatorThread) -> None:
    q = _unique("script me")
    sim.configure(scripts={q: ["Hel", "lo wo", "rld"]})
    first = _ask(gw, q, stream=True, stream_options={"include_usage": True})
    second = _ask(gw, q, stream=True, stream_options={"include_usage": True})
    assert second.headers["x-gateway-cache"] == "hit"
    contents = [f["choices"][0]["delta"].get("content") for f in _frames(second) if f.get("choices")]
    assert [c for c in contents if c] == ["Hel", "lo wo", "rld"]
    assert _frames(second)[-1]["usage"] == _frames(first)[-1]["usage"]
    assert second.text.rstrip().endswith("data: [DONE]")
    as_json = _ask(gw, q)  # stream -> JSON
    assert as_json.headers["x-gateway-cache"] == "hit"
    assert as_json.json()["choices"][0]["message"]["content"] == "Hello world"
    assert len(sim.requests()) == 1


def test_json_to_stream_replay(gw: GatewayProcess, sim: SimulatorThread) -> None:
    q = _unique("Tell me a fact about owls.")
    text = _ask(gw, q).json()["choices"][0]["message"]["content"]
    replay = _ask(gw, q, stream=True)
    assert replay.headers["x-gateway-cache"] == "hit"
    frames = _frames(replay)
    assert _text(frames) == text and frames[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_tenants_are_isolated(gw: GatewayProcess, sim: SimulatorThread) -> None:
    q = _unique("What is our internal launch date?")
    sim.configure(scripts={q: ["Tenant A secret: ", "March 3."]})
    a = _ask(gw, q, tenant="acme")
    sim.configure(scripts={q: ["Tenant B answer."]})
    b = _ask(gw, q, tenant="globex")
    assert b.headers["x-gateway-cache"] == "miss"
    assert "secret" not in b.json()["choices"][0]["message"]["content"]
    assert a.json()["choices"][0]["message"]["content"] == "Tenant A secret: March 3."
    assert len(sim.requests()) == 2


def test_parameter_variants_do_not_collide(gw: GatewayProcess, sim: SimulatorThread) -> None:
    q = _unique("List three rivers.")
    _ask(gw, q, max_tokens=5)
    assert _ask(gw, q, max_tokens=6).headers["x-gateway-cache"] == "miss"
    assert _ask(gw, q, max_tokens=5, seed=7).headers["x-gateway-cache"] == "miss"
    assert _ask(gw, q, max_tokens=5).headers["x-gateway-cache"] == "hit"


def test_sampled_requests_bypass(gw: GatewayProcess) -> None:
    q = _unique("Write a haiku.")
    assert _ask(gw, q, temperature=0.8).headers["x-gateway-cache"] == "bypass"


def test_opt_out_headers(gw: GatewayProcess, sim: SimulatorThread) -> None:
    q = _unique("What is two plus two?")
    headers = {"authorization": f"Bearer {gw.token('u-t1', tenant='t1')}", "x-gateway-cache": "no-store"}
    body = {"model": "assistant", "messages": [{"role": "user", "content": q}], "temperature": 0}
    r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
    assert r.headers["x-gateway-cache"] == "bypass"
    assert _ask(gw, q).headers["x-gateway-cache"] == "miss"  # nothing was stored


def test_partial_and_failed_streams_are_not_stored(gw: GatewayProcess, sim: SimulatorThread) -> None:
    q = _unique("Explain tides.")
    sim.configure(fault="drop", drop_after_chunks=4, itl_ms=20)
    broken = _ask(gw, q, stream=True)
    assert "error" in broken.text
    sim.configure(fault="none", itl_ms=0)
    assert _ask(gw, q, stream=True).headers["x-gateway-cache"] == "miss"


def test_semantic_hit_on_a_paraphrase(gw: GatewayProcess, sim: SimulatorThread) -> None:
    tag = uuid.uuid4().hex[:6]
    sim.configure(scripts={tag: ["Paris is the capital of France."]})
    _ask(gw, f"What is the capital of France? {tag}")
    hit = _ask(gw, f"What's the capital city of France? {tag}")
    assert hit.headers["x-gateway-cache"] == "semantic-hit", hit.headers
    assert hit.json()["choices"][0]["message"]["content"] == "Paris is the capital of France."


def _answer(r: httpx.Response, stream: bool) -> str:
    return _text(_frames(r)) if stream else r.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_output_policy_runs_again_on_hits(
    gw: GatewayProcess, sim: SimulatorThread, words: Path, stream: bool
) -> None:
    """A hit skips the output check only while the lists are the ones it was checked under."""
    q = _unique("Name a striped animal.")
    word = f"zebra{uuid.uuid4().hex[:4]}"
    sim.configure(scripts={q: [f"The {word} is striped."]})
    assert word in _answer(_ask(gw, q, stream=stream), stream)
    assert word in _answer(_ask(gw, q, stream=stream), stream)  # a hit, checked under these lists
    words.write_text(words.read_text() + f"{word}\n")
    assert gw.proc is not None
    gw.proc.send_signal(signal.SIGHUP)  # reload the lists now
    for _ in range(100):  # bounded wait for the reload to land
        cached = _ask(gw, q, stream=stream)
        if word not in _answer(cached, stream):
            break
    assert cached.headers["x-gateway-cache"] == "hit"
    assert _answer(cached, stream) == f"The {'*' * len(word)} is striped."


def test_redis_down_means_bypass_not_errors(start_gateway, sim: SimulatorThread) -> None:
    from tests.conftest import free_port

    config = gateway_config(
        backends={"gpu": {"type": "vllm", "url": sim.url, "model": "sim-model"}},
        models={"assistant": {"variants": [{"name": "c", "weight": 1, "backends": ["gpu"]}]}},
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        cache={"semantic": {"enabled": True}, "redis_timeout_s": 0.05},
        limits={"on_redis_error": "fail_open"},
    )
    gw = start_gateway(config)
    for _ in range(3):
        r = _ask(gw, "Is anyone there?")
        assert r.status_code == 200 and r.headers["x-gateway-cache"] == "bypass"
        assert r.elapsed.total_seconds() < 1
