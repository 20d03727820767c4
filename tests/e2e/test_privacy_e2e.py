"""Personal data end to end (issue 19): a gateway process with the default privacy settings (no
`privacy:` section: prompts pseudonymized), the simulator as the model server, Redis as the cache.
The model server sees placeholders only; the client gets its own values back (JSON, and a stream
whose placeholders are split across chunks); the cache holds placeholders, and a hit serves
another user of the tenant with that user's values; the log never holds a value."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
import redis
from stdnum.cn import ric

from loadtest.vllm_sim import SimulatorThread
from tests.conftest import GatewayProcess, gateway_config

REDIS_URL = "redis://127.0.0.1:6379/0"
RUN = uuid.uuid4().hex[:10]
RNG = random.Random(RUN)
USED: list[str] = []  # every value this module sent: none may be logged


def mobile() -> str:
    USED.append(RNG.choice(["138", "139", "186", "150"]) + f"{RNG.randint(0, 99_999_999):08d}")
    return USED[-1]


def resident_id() -> str:
    born = f"{RNG.randint(1950, 2005)}{RNG.randint(1, 12):02d}{RNG.randint(1, 28):02d}"
    body = f"110105{born}{RNG.randint(0, 999):03d}"
    USED.append(body + ric.calc_check_digit(body + "0"))
    return USED[-1]


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, module_tmp: Any) -> Iterator[GatewayProcess]:
    config = gateway_config(
        backends={"gpu": {"type": "vllm", "url": sim.url, "model": "sim-model"}},
        models={"assistant": {"variants": [{"name": "c", "weight": 1, "backends": ["gpu"]}]}},
        redis_url=REDIS_URL,
        cache={"semantic": {"enabled": False}},
    )
    assert "privacy" not in config  # the defaults are what is tested
    proc = GatewayProcess(config, module_tmp).start()
    yield proc
    proc.stop()


def client(gw: GatewayProcess, sub: str) -> openai.OpenAI:
    """A caller of tenant `acme-RUN` (the cache is per tenant)."""
    token = gw.token(sub, tenant=f"acme-{RUN}")
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=token, max_retries=0)


def sent_to_model(sim: SimulatorThread) -> bytes:
    return orjson.dumps([r["body"] for r in sim.requests()])


def stored_entries() -> dict[bytes, dict[bytes, bytes]]:
    r = redis.Redis.from_url(REDIS_URL)
    try:
        return {key: r.hgetall(key) for key in r.scan_iter(match="llmgw:cache:e:*", count=1000)}
    finally:
        r.close()


def test_the_model_sees_placeholders_and_the_client_its_values(
    gw: GatewayProcess, sim: SimulatorThread
) -> None:
    phone, idn = mobile(), resident_id()
    sim.configure(scripts={f"{RUN}-json": ["已为您登记手机", "[PHONE_1]", "，证件[ID_1]。"]})
    completion = client(gw, "alice").chat.completions.create(
        model="assistant",
        messages=[
            {"role": "system", "content": f"客户档案：身份证 {idn}"},
            {"role": "user", "content": f"{RUN}-json 我的手机{phone}，身份证{idn}，请登记"},
        ],
    )
    assert completion.choices[0].message.content == f"已为您登记手机{phone}，证件{idn}。"
    seen = sent_to_model(sim)
    assert phone.encode() not in seen and idn.encode() not in seen
    assert "我的手机[PHONE_1]，身份证[ID_1]".encode() in seen and "身份证 [ID_1]".encode() in seen


def test_a_stream_gets_placeholders_split_across_chunks_back_whole(
    gw: GatewayProcess, sim: SimulatorThread
) -> None:
    phone, idn = mobile(), resident_id()
    pieces = ["您的手机[PHO", "NE_1]", "，证件[", "ID_", "1", "]已更新。"]
    spaced = f"+86 {phone[:3]} {phone[3:7]} {phone[7:]}"
    sim.configure(scripts={f"{RUN}-stream": pieces})
    stream = client(gw, "alice").chat.completions.create(
        model="assistant",
        messages=[{"role": "user", "content": f"{RUN}-stream 手机 {spaced}，证件{idn}"}],
        stream=True,
    )
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(deltas) == f"您的手机{spaced}，证件{idn}已更新。"  # as the user wrote it
    assert not any("[" in d or "]" in d for d in deltas)  # never half a placeholder
    seen = sent_to_model(sim)
    assert phone[7:].encode() not in seen and idn.encode() not in seen


def test_other_apis_get_the_same_stage(gw: GatewayProcess, sim: SimulatorThread) -> None:
    """Anthropic Messages (stream) and embeddings: placeholders out, the user's values back."""
    phone = mobile()
    sim.configure(scripts={f"{RUN}-messages": ["记下了：[PHONE", "_1]"]})
    claude = anthropic.Anthropic(base_url=gw.url, api_key=gw.token("dave"), max_retries=0)
    with claude.messages.stream(
        model="assistant", max_tokens=64, messages=[{"role": "user", "content": f"{RUN}-messages {phone}"}]
    ) as stream:
        text = "".join(stream.text_stream)
    assert text == f"记下了：{phone}"
    vectors = client(gw, "dave").embeddings.create(model="assistant", input=[f"call {phone}", "plain"])
    assert len(vectors.data) == 2
    [embedded] = [r["body"] for r in sim.requests() if r["path"] == "/v1/embeddings"]
    assert embedded["input"] == ["call [PHONE_1]", "plain"]
    assert phone.encode() not in sent_to_model(sim)


@pytest.mark.parametrize("stream", [False, True])
def test_the_cache_keeps_placeholders_and_serves_each_user_their_own(
    gw: GatewayProcess, sim: SimulatorThread, stream: bool
) -> None:
    marker = f"{RUN}-cache-{stream}"
    sim.configure(scripts={marker: [f"{marker} 好的，", "已记住 [PHO", "NE_1]"]})
    shown = {}
    for sub in ("alice", "bob"):  # same tenant, same question, different numbers
        phone = mobile()
        raw = client(gw, sub).chat.completions.with_raw_response.create(
            model="assistant",
            messages=[{"role": "user", "content": f"{marker} 请记住我的手机{phone}"}],
            temperature=0,
            stream=stream,
        )
        answer = raw.parse()
        text = (
            "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
            if stream
            else answer.choices[0].message.content
        )
        shown[sub] = (phone, text, raw.headers["x-gateway-cache"])
        if sub == "alice":
            _wait_for_entry(marker.encode())
    assert shown["alice"][1:] == (f"{marker} 好的，已记住 {shown['alice'][0]}", "miss")
    assert shown["bob"][1:] == (f"{marker} 好的，已记住 {shown['bob'][0]}", "hit")  # bob's own number
    assert len(sim.requests()) == 1
    everything = orjson.dumps([list(map(bytes.decode, e.values())) for e in stored_entries().values()])
    assert b"[PHONE_1]" in everything
    for phone, _, _ in shown.values():
        assert phone.encode() not in everything


def _request_line(gw: GatewayProcess, rid: str) -> dict[str, Any]:
    for _ in range(200):  # the line leaves at the end of the loop iteration that answered
        for text in gw.log().splitlines():
            line = orjson.loads(text) if text.startswith("{") else {}
            if line.get("request_id") == rid and line.get("event") == "request":
                return line
        time.sleep(0.025)  # harness polling for another process's write, not a test's timing
    raise AssertionError(f"no request line for {rid}")


def _wait_for_entry(marker: bytes) -> None:
    for _ in range(200):  # the store is a follow-up task of the first request
        if any(marker in b"".join(e.values()) for e in stored_entries().values()):
            return
        time.sleep(0.025)  # harness polling for another process's write, not a test's timing
    raise AssertionError("the answer was not stored")


def test_the_log_and_metrics_count_by_type_and_never_hold_a_value(
    gw: GatewayProcess, sim: SimulatorThread
) -> None:
    phone, idn, email = mobile(), resident_id(), f"li.{RUN}@example.com"
    sim.configure(scripts={f"{RUN}-log": ["ok [EMAIL_1]"]})
    completion = client(gw, "carol").chat.completions.with_raw_response.create(
        model="assistant",
        messages=[{"role": "user", "content": f"{RUN}-log {phone} {idn} {email} {phone}"}],
    )
    assert completion.parse().choices[0].message.content == f"ok {email}"
    line = _request_line(gw, completion.headers["x-request-id"])
    assert line["pii"] == {
        "input:cn_mobile:pseudonymize": 2,
        "input:cn_resident_id:pseudonymize": 1,
        "input:email:pseudonymize": 1,
    }
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert 'llm_gateway_pii_values_total{action="pseudonymize",direction="input",type="cn_mobile"}' in metrics
    log = gw.log()
    for value in (*USED, email):  # this test's values and every earlier one of the module
        assert value not in log
    assert len(USED) >= 8
