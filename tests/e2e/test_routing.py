"""Affinity routing end to end: real gateway processes, the openai SDK, five vLLM simulators.

Which replica served a turn is read from the simulators' own request records; a conversation
is named by its opening question, and its turn by how many user messages it sent."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest

from loadtest.vllm_sim import SimulatorThread
from tests.conftest import GatewayProcess, gateway_config

NAMES = [f"gpu-{i}" for i in range(5)]


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, SimulatorThread]]:
    started = {name: SimulatorThread().start() for name in NAMES}
    yield started
    for s in started.values():
        s.stop()


@pytest.fixture(autouse=True)
def _fresh(sims: dict[str, SimulatorThread]) -> Iterator[None]:
    for s in sims.values():
        s.reset()
    yield
    for s in sims.values():
        s.reset()


def _config(sims: dict[str, SimulatorThread], names: list[str], send_priority: bool = False,
            fallback: list[str] | None = None) -> dict[str, Any]:
    backends: dict[str, Any] = {
        n: {"type": "vllm", "url": sims[n].url, "model": "sim-model", "health_interval_s": 0.1,
            "first_token_timeout_s": 5, "send_priority": send_priority, "breaker": {"failures": 1, "reset_s": 30}}
        for n in names
    }
    variant = {"name": "v", "weight": 1, "backends": names, "fallback": fallback or []}
    tiers = {"default": {"requests_per_minute": 100000, "tokens_per_minute": 100000000},
             "pro": {"requests_per_minute": 100000, "tokens_per_minute": 100000000, "priority": 0},
             "free": {"requests_per_minute": 100000, "tokens_per_minute": 100000000, "priority": 5}}
    return gateway_config(backends, {"chat": {"variants": [variant]}}, limits={"tiers": tiers})


def _where(sims: dict[str, SimulatorThread]) -> dict[tuple[str, int], str]:
    """(opening question, turn) -> the simulator that served it."""
    out: dict[tuple[str, int], str] = {}
    for name, s in sims.items():
        for rec in s.requests():
            messages = rec["body"]["messages"]
            users = [m["content"] for m in messages if m["role"] == "user"]
            out[(users[0], len(users))] = name
    return out


def _converse(client: Any, histories: dict[str, list[dict[str, str]]], turn: int, **kw: Any) -> None:
    """One more turn of every conversation, as a chat client sends it: the whole history."""
    for opening, history in histories.items():
        history.append({"role": "user", "content": opening if turn == 1 else f"and then ({turn})?"})
        reply = client.chat.completions.create(model="chat", messages=history, max_tokens=4, **kw)
        history.append({"role": "assistant", "content": reply.choices[0].message.content})


def _conversations(n: int, prefix: str = "conversation") -> dict[str, list[dict[str, str]]]:
    return {f"{prefix} {i}: my parcel is late": [{"role": "system", "content": "You help."}] for i in range(n)}


def _wait_queue(gw: GatewayProcess, backend: str, depth: float) -> None:
    """Until the gateway's probe has seen `depth` requests waiting at `backend`."""
    line = f'llm_gateway_backend_queue_depth{{backend="{backend}"}} {float(depth)}'
    deadline = time.monotonic() + 10
    while line not in httpx.get(f"{gw.url}/metrics", timeout=5).text:
        assert time.monotonic() < deadline, f"the gateway never saw {line}"
        time.sleep(0.05)  # polling another process's probe


def test_every_turn_of_a_conversation_lands_on_one_replica(sims, start_gateway) -> None:
    gw = start_gateway(_config(sims, NAMES[:4]))
    histories, client = _conversations(12), gw.client()
    for turn in range(1, 5):
        _converse(client, histories, turn)
    where = _where(sims)
    for opening in histories:
        assert len({where[(opening, t)] for t in range(1, 5)}) == 1, where
    assert len(set(where.values())) >= 2  # and the conversations are spread


def test_two_gateway_processes_send_a_conversation_to_the_same_replica(sims, start_gateway) -> None:
    one, two = start_gateway(_config(sims, NAMES[:4])), start_gateway(_config(sims, NAMES[:4]))
    histories = _conversations(10)
    _converse(one.client(), histories, 1)
    _converse(two.client(), histories, 2)
    where = _where(sims)
    assert all(where[(o, 1)] == where[(o, 2)] for o in histories), where


def test_the_user_field_names_the_session(sims, start_gateway) -> None:
    gw = start_gateway(_config(sims, NAMES[:4]))
    client = gw.client()
    for user in ("u-1", "u-2", "u-3"):
        _converse(client, _conversations(6, prefix=user), 1, user=user)
    by_user: dict[str, set[str]] = {}
    for (opening, _), name in _where(sims).items():
        by_user.setdefault(opening.split()[0], set()).add(name)
    assert all(len(names) == 1 for names in by_user.values()), by_user


def test_a_saturated_replica_gets_no_new_work_then_gets_its_conversations_back(sims, start_gateway) -> None:
    gw = start_gateway(_config(sims, NAMES[:4]))
    histories, client = _conversations(16), gw.client()
    _converse(client, histories, 1)
    first = {o: n for (o, t), n in _where(sims).items()}
    busiest = max(NAMES[:4], key=lambda n: sum(1 for v in first.values() if v == n))
    sims[busiest].configure(waiting=300)
    _wait_queue(gw, busiest, 300)
    _converse(client, histories, 2)
    second = _where(sims)
    assert not [k for k, n in second.items() if n == busiest and k[1] == 2]
    assert all(second[(o, 2)] == first[o] for o in histories if first[o] != busiest)  # the rest stay
    metrics = httpx.get(f"{gw.url}/metrics", timeout=5).text
    moved = sum(1 for o in histories if first[o] == busiest)
    assert f'llm_gateway_route_spills_total{{backend="{busiest}",reason="waiting"}} {float(moved)}' in metrics
    assert f'llm_gateway_routes_total{{backend="{busiest}",route="affinity"}} {float(moved)}' in metrics
    sims[busiest].configure(waiting=0)
    _wait_queue(gw, busiest, 0)
    _converse(client, histories, 3)
    third = _where(sims)
    assert all(third[(o, 3)] == first[o] for o in histories)


def test_a_dead_replicas_conversations_move_without_errors(sims, start_gateway) -> None:
    gw = start_gateway(_config(sims, NAMES[:4]))
    histories, client = _conversations(16), gw.client()
    _converse(client, histories, 1)
    first = {o: n for (o, t), n in _where(sims).items()}
    dead = max(NAMES[:4], key=lambda n: sum(1 for v in first.values() if v == n))
    sims[dead].configure(fault="refuse")  # connections refused: before the probe notices, a fall-over
    for turn in (2, 3):
        _converse(client, histories, turn)  # raises on any client-visible error
    where = _where(sims)
    for opening in histories:
        if first[opening] == dead:
            assert where[(opening, 2)] != dead and where[(opening, 2)] == where[(opening, 3)]
        else:
            assert where[(opening, 2)] == where[(opening, 3)] == first[opening]


def test_a_new_replica_takes_only_its_share(sims, start_gateway) -> None:
    four, five = start_gateway(_config(sims, NAMES[:4])), start_gateway(_config(sims, NAMES))
    histories = _conversations(40)
    _converse(four.client(), {o: list(h) for o, h in histories.items()}, 1)
    before = {o: n for (o, _), n in _where(sims).items()}
    for s in sims.values():
        s.reset()
    _converse(five.client(), histories, 1)
    after = {o: n for (o, _), n in _where(sims).items()}
    moved = [o for o in histories if before[o] != after[o]]
    assert moved and all(after[o] == "gpu-4" for o in moved)
    assert len(moved) <= 16  # about a fifth of 40


def test_a_higher_tier_is_served_while_a_lower_tier_is_shed(sims, start_gateway) -> None:
    gw = start_gateway(_config(sims, NAMES[:2], send_priority=True))
    for name in NAMES[:2]:
        sims[name].configure(waiting=300)
        _wait_queue(gw, name, 300)
    free = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.token("bob", tier="free"), max_retries=0)
    pro = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.token("carol", tier="pro"), max_retries=0)
    try:
        hi = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.InternalServerError) as shed:
            free.chat.completions.create(model="chat", messages=hi, max_tokens=4)
        assert shed.value.status_code == 503 and int(shed.value.response.headers["retry-after"]) >= 1
        assert shed.value.body["code"] == "service_unavailable"
        assert pro.chat.completions.create(model="chat", messages=hi, max_tokens=4).choices
        records = [r for name in NAMES[:2] for r in sims[name].requests()]
        assert [r["body"]["priority"] for r in records] == [0]  # only pro's request reached a replica
        for name in NAMES[:2]:
            sims[name].configure(waiting=0)
            _wait_queue(gw, name, 0)
        free.chat.completions.create(model="chat", messages=hi, max_tokens=4)  # served again
        assert sorted(r["body"]["priority"] for n in NAMES[:2] for r in sims[n].requests()) == [0, 5]
    finally:
        free.close()
        pro.close()


def test_priority_is_not_sent_unless_the_backend_asks_for_it(sims, start_gateway) -> None:
    gw = start_gateway(_config(sims, NAMES[:2]))
    free = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.token("bob", tier="free"), max_retries=0)
    try:
        free.chat.completions.create(model="chat", messages=[{"role": "user", "content": "x"}], max_tokens=4)
    finally:
        free.close()
    (record,) = [r for n in NAMES[:2] for r in sims[n].requests()]
    assert "priority" not in record["body"]


def test_the_session_header_names_the_conversation(sims, start_gateway) -> None:
    gw = start_gateway(_config(sims, NAMES[:4]))
    client = gw.client()
    for sid in ("s-1", "s-2", "s-3", "s-4"):
        histories = _conversations(5, prefix=sid)
        _converse(client, histories, 1, user="ignored-when-a-header-names-it", extra_headers={"X-Session-Id": sid})
    by_session: dict[str, set[str]] = {}
    for (opening, _), name in _where(sims).items():
        by_session.setdefault(opening.split()[0], set()).add(name)
    assert all(len(names) == 1 for names in by_session.values()), by_session


def test_the_log_line_says_how_each_request_was_routed(sims, start_gateway) -> None:
    gw = start_gateway(_config(sims, NAMES[:2]))
    histories, client = _conversations(6), gw.client()
    _converse(client, histories, 1)
    for name in NAMES[:2]:
        sims[name].configure(waiting=300 if name == "gpu-0" else 0)
    _wait_queue(gw, "gpu-0", 300)
    _converse(client, histories, 2)
    lines = [orjson.loads(x) for x in gw.log().splitlines() if x.startswith("{")]
    routes = [x["route"] for x in lines if x.get("event") == "request"]
    first = {o: n for (o, t), n in _where(sims).items() if t == 1}
    spilled = sum(1 for n in first.values() if n == "gpu-0")
    assert routes[:6] == ["affinity"] * 6
    assert sorted(routes[6:]) == sorted(["spill"] * spilled + ["affinity"] * (6 - spilled))
