"""What reaches a model server besides the client's request: vLLM's `cache_salt` per tenant (no
prefix-cache timing across tenants), and nothing the client sets in its place. Also a gateway with
the cache switched off, which must start on a plain Redis 7 whatever its semantic section says."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from loadtest.vllm_sim import SimulatorThread
from tests.conftest import GatewayProcess, gateway_config

REDIS7_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, module_tmp: Path) -> Iterator[GatewayProcess]:
    vllm = {"type": "vllm", "url": sim.url, "model": "sim-model", "health_interval_s": 0.5}
    plain = {"type": "openai", "url": sim.url, "model": "sim-model"}
    one = {"variants": [{"name": "a", "weight": 1, "backends": ["vllm"]}]}
    config = gateway_config(
        backends={"vllm": vllm, "plain": plain},
        models={
            "isolated": one,
            "shared-prefix": {**one, "isolate_prefix_cache": False},
            "plain": {"variants": [{"name": "a", "weight": 1, "backends": ["plain"]}]},
        },
        redis_url=REDIS7_URL,
        # the cache off: the semantic section below must then load nothing (no embedder, no index)
        cache={"enabled": False, "semantic": {"enabled": True}},
    )
    proc = GatewayProcess(config, module_tmp).start()
    yield proc
    proc.stop()


def _chat(gw: GatewayProcess, model: str, tenant: str, **extra: object) -> httpx.Response:
    token = gw.token(f"user-of-{tenant}", tenant=tenant)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=10,
                      headers={"authorization": f"Bearer {token}"})


def _salt_sent(sim: SimulatorThread) -> object:
    return sim.requests()[-1]["body"].get("cache_salt")


def test_each_tenant_salts_vllms_prefix_cache(gw: GatewayProcess, sim: SimulatorThread) -> None:
    salts = {}
    for tenant in ("acme", "globex", "acme"):
        assert _chat(gw, "isolated", tenant).status_code == 200
        salt = _salt_sent(sim)
        assert isinstance(salt, str) and len(salt) >= 16 and tenant not in salt
        salts.setdefault(tenant, set()).add(salt)
    assert len(salts["acme"]) == 1 and salts["acme"] != salts["globex"]


def test_a_model_may_share_prefix_caches_and_other_servers_get_no_salt(
    gw: GatewayProcess, sim: SimulatorThread
) -> None:
    assert _chat(gw, "shared-prefix", "acme").status_code == 200
    assert _salt_sent(sim) is None
    assert _chat(gw, "plain", "acme").status_code == 200  # an OpenAI-compatible server may refuse it
    assert _salt_sent(sim) is None


def test_a_client_cannot_choose_the_salt(gw: GatewayProcess, sim: SimulatorThread) -> None:
    r = _chat(gw, "isolated", "acme", cache_salt="globex-salt")
    assert r.status_code == 400 and r.json()["error"]["param"] == "cache_salt"
    assert sim.requests() == []


def test_with_the_cache_off_the_gateway_serves_on_plain_redis(gw: GatewayProcess) -> None:
    r = _chat(gw, "isolated", "acme", temperature=0)
    assert r.status_code == 200 and r.headers["x-gateway-cache"] == "bypass"
    assert "embedder" not in gw.log().lower()
