"""Affinity routing: conversation keys, rendezvous ranking, bounded load, saturation spill, tier
shedding, vLLM gauge parsing, and the routing config. Pure: no network, no clock, seeded rng."""

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from backends.affinity import conversation_key, load_cap, replica_seed, request_key, session_key, weight
from backends.pool import Breaker, Member, Placements, route
from backends.vllm import parse_gauges
from proxy.settings import RoutingSettings, parse_settings


@dataclass
class FakeBackend:
    name: str


def _pool(*names: str) -> dict[str, Member]:
    return {n: Member(FakeBackend(n), Breaker(1, 60, lambda: 0.0)) for n in names}


def _owner(key: int, names: list[str]) -> str:
    return max(names, key=lambda n: weight(key, replica_seed(n)))


SYSTEM = {"role": "system", "content": "You are the support assistant of Acme. " * 3}


def _chat(opening: str, turns: int) -> list[list[dict[str, str]]]:
    """The message lists a chat client sends at each turn of one conversation."""
    history = [SYSTEM, {"role": "user", "content": opening}]
    sent = [list(history)]
    for i in range(1, turns):
        history += [{"role": "assistant", "content": f"answer {i}"}, {"role": "user", "content": f"q {i}"}]
        sent.append(list(history))
    return sent


# -- keys ---------------------------------------------------------------------------------------------
def test_every_turn_of_a_conversation_has_the_key_of_its_first_turn():
    keys = {conversation_key("t", messages, 256) for messages in _chat("My order is late", 8)}
    assert len(keys) == 1


def test_conversations_differ_by_opening_question_scope_and_session():
    a = conversation_key("t", _chat("My order is late", 1)[0], 256)
    assert a != conversation_key("t", _chat("How do I return shoes?", 1)[0], 256)
    assert a != conversation_key("other-tenant", _chat("My order is late", 1)[0], 256)
    assert session_key("t", "s-1") != session_key("t", "s-2") != session_key("u", "s-1")


def test_a_long_shared_system_prompt_fills_the_key_so_its_conversations_meet():
    long_system = {"role": "system", "content": "Policy text. " * 400}  # 5,200 characters
    one = conversation_key("t", [long_system, {"role": "user", "content": "a"}], 256)
    two = conversation_key("t", [long_system, {"role": "user", "content": "b"}], 256)
    assert one == two
    assert one != conversation_key("t", [long_system, {"role": "user", "content": "a"}], 8192)


def test_the_cut_counts_tokens_so_chinese_and_english_prompts_cut_alike():
    zh_system = {"role": "system", "content": "请务必礼貌回答客户的问题" * 30}  # 360 characters, ~360 tokens
    one = conversation_key("t", [zh_system, {"role": "user", "content": "订单"}], 256)
    two = conversation_key("t", [zh_system, {"role": "user", "content": "退款"}], 256)
    assert one == two  # 2,048 characters would have let the opening question into the key


def test_session_names_the_key_instead_of_the_messages():
    first, later = _chat("hello", 3)[0], _chat("other", 3)[2]
    assert request_key("t", first, "s-9", 256) == request_key("t", later, "s-9", 256)
    assert request_key("t", first, None, 256) == conversation_key("t", first, 256)


def test_keys_are_the_same_in_every_process():
    # Fixed values: a salted hash (Python's hash()) would differ between processes and runs.
    assert conversation_key("t", [{"role": "user", "content": "hi"}], 256) == 3005377042410064693
    assert replica_seed("vllm-a") == 12558384883343527512


# -- rendezvous: balance and minimal movement ---------------------------------------------------------
KEYS = [session_key("t", f"s-{i}") for i in range(8000)]


def test_keys_spread_evenly_over_replicas():
    names = ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]
    counts = Counter(_owner(k, names) for k in KEYS)
    assert all(abs(c - 2000) < 200 for c in counts.values()), counts


def test_a_new_replica_takes_only_its_share():
    four = ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]
    five = [*four, "gpu-4"]
    moved = [k for k in KEYS if _owner(k, four) != _owner(k, five)]
    assert all(_owner(k, five) == "gpu-4" for k in moved)
    assert abs(len(moved) / len(KEYS) - 0.2) < 0.03


def test_a_lost_replica_gives_away_only_its_own_keys():
    four = ["gpu-0", "gpu-1", "gpu-2", "gpu-3"]
    three = ["gpu-0", "gpu-1", "gpu-3"]
    moved = [k for k in KEYS if _owner(k, four) != _owner(k, three)]
    assert moved and all(_owner(k, four) == "gpu-2" for k in moved)


def test_the_pool_order_in_the_config_does_not_change_the_choice():
    m = _pool("a", "b", "c")
    cfg = RoutingSettings()
    for k in KEYS[:200]:
        assert route(m, ["a", "b", "c"], [], cfg, k).chain[0] is route(m, ["c", "a", "b"], [], cfg, k).chain[0]


# -- the load guard -----------------------------------------------------------------------------------
CFG = RoutingSettings()
NAMES = ["a", "b", "c", "d"]


def _ranked(key: int) -> list[str]:
    return sorted(NAMES, key=lambda n: weight(key, replica_seed(n)), reverse=True)


def test_affinity_hit_then_fallbacks():
    m = _pool(*NAMES, "cpu")
    plan = route(m, NAMES, ["cpu"], CFG, KEYS[0])
    assert [x.name for x in plan.chain] == [*_ranked(KEYS[0]), "cpu"]
    assert plan.how == "affinity" and m[_ranked(KEYS[0])[0]].routes == {"affinity": 1}


def test_a_saturated_queue_hands_the_key_to_the_least_loaded_replica():
    m = _pool(*NAMES)
    top, second, *_ = _ranked(KEYS[1])
    m[top].waiting = 300
    for name in NAMES:
        if name not in (top,):
            m[name].outstanding = 5
    least = next(n for n in NAMES if n not in (top, second))
    m[least].outstanding = 0
    plan = route(m, NAMES, [], CFG, KEYS[1])
    assert (plan.chain[0].name, plan.how, plan.reason) == (least, "spill", "waiting")
    assert plan.chain[-1].name == top  # still last resort before the fallbacks
    assert m[top].spills == {"waiting": 1} and m[least].routes == {"spill": 1}
    m[top].waiting = 0  # recovered: the key comes back
    assert route(m, NAMES, [], CFG, KEYS[1]).chain[0].name == top


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [("waiting", 9, "waiting"), ("kv_usage", 0.97, "kv_cache"), ("outstanding", 256, "outstanding")],
)
def test_each_saturation_signal_spills(field, value, reason):
    m = _pool(*NAMES)
    top = _ranked(KEYS[2])[0]
    setattr(m[top], field, value)
    plan = route(m, NAMES, [], CFG, KEYS[2])
    assert plan.chain[0].name != top and plan.reason == reason


def test_below_the_thresholds_the_key_stays():
    m = _pool(*NAMES)
    top = _ranked(KEYS[2])[0]
    m[top].waiting, m[top].kv_usage, m[top].outstanding = 8, 0.94, 7
    assert route(m, NAMES, [], CFG, KEYS[2], home=top).chain[0].name == top


def test_bounded_load_walks_to_the_keys_next_replica_not_the_least_loaded():
    m = _pool(*NAMES)
    top, second, third, fourth = _ranked(KEYS[3])
    m[top].outstanding, m[second].outstanding, m[third].outstanding = 40, 10, 0
    # 50 in flight + this one over 4 replicas: the cap is 1.5 x 12.75 = 19.1
    plan = route(m, NAMES, [], CFG, KEYS[3], home=top)
    assert (plan.chain[0].name, plan.reason) == (second, "bounded_load")
    assert [x.name for x in plan.chain] == [second, top, third, fourth]  # then the key's own order


def test_a_new_key_goes_to_its_replica_only_if_none_has_less_load_then_stays_where_it_went():
    """A key with no home has no cached prefix anywhere: its first request is balanced (prompts
    that share nothing cost nothing over least-loaded); the next ones follow it to its home."""
    m = _pool(*NAMES)
    top, *others = _ranked(KEYS[3])
    assert route(m, NAMES, [], CFG, KEYS[3]).chain[0].name == top  # a tie: its own replica
    m[top].outstanding = 2
    m[others[1]].outstanding = 1
    first = route(m, NAMES, [], CFG, KEYS[3])
    assert first.chain[0].name == others[0] and (first.how, first.reason) == ("spill", "first_request")
    later = route(m, NAMES, [], CFG, KEYS[3], home=others[0])
    assert later.chain[0].name == others[0] and later.how == "affinity"
    assert route(m, NAMES, [], CFG, KEYS[3], home=top).chain[0].name == top  # under the floor: sticky
    m[others[0]].waiting = 300  # a saturated home is left while it is saturated, like any replica
    assert route(m, NAMES, [], CFG, KEYS[3], home=others[0]).chain[0].name != others[0]


def test_placements_are_bounded_and_forget_the_least_recently_used():
    homes = Placements(size=3)
    for key, name in ((1, "a"), (2, "b"), (3, "c")):
        homes.place(key, name)
    assert homes.home(1) == "a"  # now the most recent
    homes.place(4, "d")  # over the bound: 2, the least recently used, is forgotten
    assert [homes.home(k) for k in (1, 2, 3, 4)] == ["a", None, "c", "d"]


def test_the_load_floor_keeps_a_lightly_loaded_pool_sticky():
    m = _pool(*NAMES)
    top = _ranked(KEYS[4])[0]
    m[top].outstanding = 7  # far above the mean (7/4), below the floor of 8
    assert route(m, NAMES, [], CFG, KEYS[4], home=top).how == "affinity"
    assert load_cap(7, 4, 1.5, 8) == 8.0 and load_cap(100, 4, 1.5, 8) == pytest.approx(37.875)


def test_a_dead_replicas_keys_move_to_their_next_replica():
    m = _pool(*NAMES)
    top, second, *_ = _ranked(KEYS[5])
    m[top].healthy = False
    plan = route(m, NAMES, [], CFG, KEYS[5])
    assert (plan.chain[0].name, plan.how, plan.reason) == (second, "spill", "unhealthy")
    assert top not in [x.name for x in plan.chain]


def test_without_the_load_guard_the_key_stays_on_a_saturated_replica():
    m = _pool(*NAMES)
    top = _ranked(KEYS[6])[0]
    m[top].waiting, m[top].outstanding = 500, 90
    plan = route(m, NAMES, [], CFG.model_copy(update={"load_guard": False}), KEYS[6])
    assert (plan.chain[0].name, plan.how) == (top, "affinity")


def test_breaker_concurrency_and_max_waiting_still_exclude_members():
    m = _pool(*NAMES)
    m["a"].breaker.failure()
    m["b"].max_concurrency, m["b"].outstanding = 1, 1
    m["c"].max_waiting, m["c"].waiting = 4, 5
    for k in KEYS[:50]:
        assert [x.name for x in route(m, NAMES, [], CFG, k).chain] == ["d"]


# -- shedding -----------------------------------------------------------------------------------------
def _saturated_pool() -> dict[str, Member]:
    m = _pool("a", "b", "cpu")
    m["a"].waiting, m["b"].kv_usage = 400, 0.99
    m["b"].waiting = 2
    return m


def test_a_saturated_pool_sheds_the_lower_tier_to_its_fallbacks_only():
    m = _saturated_pool()
    plan = route(m, ["a", "b"], ["cpu"], CFG, KEYS[7], priority=1)
    assert (plan.how, plan.reason, [x.name for x in plan.chain]) == ("shed", "waiting", ["cpu"])
    assert route(m, ["a", "b"], [], CFG, KEYS[7], priority=5).chain == []


def test_a_higher_tier_keeps_its_keys_replica_in_a_saturated_pool():
    """With no replica that has room, spilling buys nothing but a cold prefix cache: the key stays
    where its prefix is cached, as long as that replica is under the bounded load."""
    m = _saturated_pool()
    for key in KEYS[:20]:
        ranked = [n for n in _ranked(key) if n in ("a", "b")]
        plan = route(m, ["a", "b"], [], CFG, key, priority=0, home=ranked[0])
        assert [x.name for x in plan.chain] == ranked


def test_in_a_saturated_pool_a_hot_key_still_walks_on_past_the_bound():
    m = _saturated_pool()
    top, other = [n for n in _ranked(KEYS[7]) if n in ("a", "b")]
    m[top].outstanding = 40  # far over c x the mean in flight
    assert route(m, ["a", "b"], [], CFG, KEYS[7], priority=0).chain[0].name == other


def test_a_pool_with_room_anywhere_sheds_nobody():
    m = _saturated_pool()
    m["b"].kv_usage = 0.5
    assert route(m, ["a", "b"], [], CFG, KEYS[7], priority=9).chain[0].name == "b"


def test_a_dead_pool_is_not_saturated_it_fails_over():
    m = _pool("a", "b", "cpu")
    m["a"].healthy = m["b"].healthy = False
    plan = route(m, ["a", "b"], ["cpu"], CFG, KEYS[7], priority=9)
    assert plan.how == "affinity" and [x.name for x in plan.chain] == ["cpu"]


def test_shedding_applies_to_every_policy():
    for policy in ("least_loaded", "random"):
        plan = route(_saturated_pool(), ["a", "b"], [], CFG.model_copy(update={"policy": policy}), 0, 3)
        assert plan.how == "shed"


# -- the other policies -------------------------------------------------------------------------------
def test_least_loaded_is_the_outstanding_order():
    m = _pool("a", "b", "c")
    m["a"].outstanding, m["b"].outstanding = 3, 1
    plan = route(m, ["a", "b", "c"], [], CFG.model_copy(update={"policy": "least_loaded"}), KEYS[0])
    assert [x.name for x in plan.chain] == ["c", "b", "a"] and plan.how == "least_loaded"


def test_random_spreads_over_usable_members_with_the_given_rng():
    m = _pool("a", "b", "c")
    m["c"].healthy = False
    cfg, rng = CFG.model_copy(update={"policy": "random"}), random.Random(7)
    firsts = Counter(route(m, ["a", "b", "c"], [], cfg, 0, 0, rng).chain[0].name for _ in range(400))
    assert set(firsts) == {"a", "b"} and min(firsts.values()) > 150


# -- vLLM gauges --------------------------------------------------------------------------------------
METRICS = b"""\
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="1",model_name="m"} 4.0
vllm:num_requests_waiting_by_reason{reason="capacity"} 99.0
vllm:num_requests_running{engine="0",model_name="m"} 10.0
vllm:num_requests_running{engine="1",model_name="m"} 12.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.7
vllm:gpu_cache_usage_perc{model_name="m"} 0.1
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 5.0
"""


def test_parse_gauges_sums_queues_and_averages_kv_usage():
    g = parse_gauges(METRICS)
    assert (g.waiting, g.running) == (7.0, 22.0) and g.kv_usage == pytest.approx(0.6)


def test_parse_gauges_reads_the_older_kv_name_and_skips_nan():
    g = parse_gauges(b'vllm:gpu_cache_usage_perc{model_name="m"} 0.25\nvllm:num_requests_waiting NaN\n')
    assert (g.waiting, g.running, g.kv_usage) == (0.0, None, 0.25)
    assert parse_gauges(b"") == (0.0, None, None)


# -- config -------------------------------------------------------------------------------------------
def test_routing_config_defaults_and_per_model_overrides():
    s = parse_settings(
        """\
routing: {saturated_waiting: 3, session_header: X-Conversation}
limits: {tiers: {default: {}, free: {priority: 5}}}
backends: {a: {type: vllm, url: http://a:8000, model: m, send_priority: true}}
models:
  m: {routing: {policy: least_loaded}, variants: [{name: v, weight: 1, backends: [a]}]}
  n: {variants: [{name: v, weight: 1, backends: [a]}]}
""",
        env={},
    )
    assert s.routing.policy == "affinity" and s.routing.session_header == "x-conversation"
    m = s.models["m"].routing
    assert m is not None and (m.policy, m.saturated_waiting, m.load_guard) == ("least_loaded", 3, True)
    assert s.models["n"].routing is None
    assert s.limits.tier("free").priority == 5 and s.limits.tier("unknown").priority == 0
