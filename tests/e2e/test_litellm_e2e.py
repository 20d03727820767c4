"""A litellm-type backend behind the gateway (hosted providers), here pointed at the simulator
through litellm's hosted_vllm/ provider, with fallback to a vLLM-type backend."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from loadtest.vllm_sim import SimulatorThread
from tests.conftest import GatewayProcess, gateway_config

pytestmark = pytest.mark.filterwarnings(
    "ignore:Items? .* on TypedDict class .* using the `ReadOnly` qualifier:UserWarning"
)


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, module_tmp) -> Iterator[GatewayProcess]:
    hosted = {"type": "litellm", "model": "hosted_vllm/sim-model", "api_base": f"{sim.url}/v1",
              "first_token_timeout_s": 2}
    config = gateway_config(
        backends={"hosted": hosted, "gpu": {"type": "vllm", "url": sim.url, "model": "sim-model"}},
        models={"assistant": {"variants": [{"name": "c", "weight": 1, "backends": ["hosted"], "fallback": ["gpu"]}]}},
    )
    proc = GatewayProcess(config, module_tmp).start()
    yield proc
    proc.stop()


def test_hosted_provider_through_litellm(gw: GatewayProcess, sim: SimulatorThread) -> None:
    raw = gw.client().chat.completions.with_raw_response.create(
        model="assistant", messages=[{"role": "user", "content": "hello there"}], max_tokens=8
    )
    assert raw.headers["x-gateway-backend"] == "hosted"
    assert raw.parse().choices[0].message.content.startswith("Simulated")
    chunks = list(gw.client().chat.completions.create(
        model="assistant", messages=[{"role": "user", "content": "stream it"}], stream=True,
        stream_options={"include_usage": True},
    ))
    assert chunks[-1].usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("Simulated")


def test_litellm_failure_falls_over(gw: GatewayProcess, sim: SimulatorThread) -> None:
    sim.reset()
    sim.configure(fault="status", fault_status=503)
    try:
        with pytest.raises(openai.InternalServerError) as info:  # both backends are this simulator
            gw.client().chat.completions.create(model="assistant", messages=[{"role": "user", "content": "x"}])
        assert info.value.status_code == 503  # the backends answered 503: honest, with retry-after
        assert int(info.value.response.headers["retry-after"]) >= 1
        assert len(sim.requests()) == 2  # tried hosted (litellm) once, then the vLLM fallback
    finally:
        sim.reset()
