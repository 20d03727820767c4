"""A/B assignment: weights honoured, sticky, agreed by every replica; variant body changes."""

from collections import Counter

from proxy.experiments.assign import Router, apply_variant, sticky_key
from proxy.settings import VariantSettings, parse_settings

CONFIG = """\
backends:
  a: {type: vllm, url: http://a:8000, model: m}
models:
  assistant:
    variants:
      - {name: control, weight: 70, backends: [a]}
      - {name: candidate, weight: 20, backends: [a]}
      - {name: tiny, weight: 10, backends: [a]}
"""


def test_split_over_2000_users_matches_weights_within_3_points():
    experiment = Router(parse_settings(CONFIG, env={})).get("assistant")
    counts = Counter(experiment.choose(f"sub:user-{i}").name for i in range(2000))
    for name, weight in (("control", 70), ("candidate", 20), ("tiny", 10)):
        assert abs(counts[name] / 2000 * 100 - weight) < 3, counts


def test_same_user_same_variant_on_every_replica():
    one = Router(parse_settings(CONFIG, env={})).get("assistant")
    two = Router(parse_settings(CONFIG, env={})).get("assistant")  # another process, same config
    for i in range(300):
        key = f"sub:u{i}"
        assert one.choose(key).name == two.choose(key).name == one.choose(key).name


def test_zero_weight_variant_never_chosen():
    experiment = Router(parse_settings(CONFIG.replace("weight: 10", "weight: 0"), env={})).get("assistant")
    assert all(experiment.choose(f"k{i}").name != "tiny" for i in range(3000))


def test_sticky_key_sources():
    kw = {"sub": "alice", "tenant": "acme", "headers": {"x-session": "s1"}, "request_id": "r9"}
    assert sticky_key("sub", **kw) == "sub:alice"
    assert sticky_key("tenant", **kw) == "tenant:acme"
    assert sticky_key("request", **kw) == "req:r9"
    assert sticky_key("header:x-session", **kw) == "hdr:s1"
    assert sticky_key("header:x-missing", **kw) == "sub:alice"


def _variant(**kw):
    return VariantSettings(name="v", weight=1, backends=["a"], **kw)


def test_variant_defaults_fill_only_unset_params():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.1}
    out = apply_variant(body, _variant(defaults={"temperature": 0.9, "top_p": 0.5, "max_tokens": 64}))
    assert out["temperature"] == 0.1 and out["top_p"] == 0.5 and out["max_tokens"] == 64
    assert "top_p" not in body  # the input is not mutated
    out = apply_variant({**body, "max_completion_tokens": 5}, _variant(defaults={"max_tokens": 64}))
    assert "max_tokens" not in out


def test_variant_system_prompt_prepend_and_replace():
    msgs = [{"role": "system", "content": "client"}, {"role": "user", "content": "hi"}]
    pre = apply_variant({"messages": msgs}, _variant(system_prompt="house"))
    assert [m["content"] for m in pre["messages"]] == ["house", "client", "hi"]
    rep = apply_variant({"messages": msgs}, _variant(system_prompt="house", system_prompt_mode="replace"))
    assert [m["content"] for m in rep["messages"]] == ["house", "hi"]
