"""The personal-data stage (proxy/privacy.py) and its actions on bodies (policies/pii_text.py)."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from policies.pii import BUILTIN_NAMES, CustomPattern, Recognizer
from policies.pii_text import AnswerCheck, Pseudonyms
from proxy.cache.response_cache import CacheScope, exact_key, semantic_part, user_turn
from proxy.errors import ContentFiltered
from proxy.guard import OFF_LOOP_SCAN_BYTES
from proxy.privacy import Privacy
from proxy.protocol import ChatRequest
from proxy.settings import PiiPatternSettings, PrivacySettings, load_settings
from tests.conftest import ROOT

PHONE, PHONE2, ID = "13812345678", "13987654321", "11010519491231002X"
CARD = "4111 1111 1111 1111"
IMAGE = {"type": "image_url", "image_url": {"url": "u"}}


async def stage(**settings: Any) -> Privacy:
    privacy = Privacy(PrivacySettings(**settings))
    await privacy.start()
    return privacy


def chat(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), "temperature": 0}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def answer(text: str, **message: Any) -> dict[str, Any]:
    msg = {"role": "assistant", "content": text, **message}
    choice = {"index": 0, "message": msg, "finish_reason": "stop"}
    return {"id": "c", "object": "chat.completion", "choices": [choice]}


async def test_pseudonymize_reaches_every_role_part_and_tool_argument() -> None:
    privacy, counts = await stage(), {}
    args = orjson.dumps({"phone": PHONE, "note": "你好", "n": 1}).decode()
    args = args.replace("你好", "\\u4f60\\u597d")  # an escape elsewhere stays an escape
    body = chat(
        {"role": "system", "content": f"客户身份证 {ID}"},
        {"role": "user", "content": [{"type": "text", "text": f"手机 {PHONE}"}, IMAGE]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "t", "type": "function", "function": {"name": "lookup", "arguments": args}}]},
        {"role": "tool", "tool_call_id": "t", "content": f"found {PHONE2} and +86 138-1234-5678"},
        user(f"again {PHONE} and {CARD}"),
    )
    before = copy.deepcopy(body)
    new, restorer = await privacy.check_input(body, 100, counts)
    assert body == before  # the client's body is never changed
    text = orjson.dumps(new).decode()
    for value in (PHONE, PHONE2, ID, "4111", "138-1234"):
        assert value not in text
    msgs = new["messages"]
    assert msgs[0]["content"] == "客户身份证 [ID_1]"
    assert msgs[1]["content"] == [{"type": "text", "text": "手机 [PHONE_1]"}, IMAGE]
    arguments = msgs[2]["tool_calls"][0]["function"]["arguments"]
    assert orjson.loads(arguments) == {"phone": "[PHONE_1]", "note": "你好", "n": 1}
    assert "\\u4f60\\u597d" in arguments
    assert msgs[3]["content"] == "found [PHONE_2] and [PHONE_1]"  # same value, same placeholder
    assert msgs[4]["content"] == "again [PHONE_1] and [BANK_CARD_1]"
    assert counts == {"input:cn_resident_id:pseudonymize": 1, "input:cn_mobile:pseudonymize": 5,
                      "input:bank_card:pseudonymize": 1}
    assert restorer is not None and restorer.changed
    shown = restorer.completion(answer("已记录 [PHONE_1]、[PHONE_2]、[ID_1]，[PHONE_9] 不存在"))
    assert shown["choices"][0]["message"]["content"] == f"已记录 {PHONE}、{PHONE2}、{ID}，[PHONE_9] 不存在"


async def test_answers_are_restored_in_copies_and_tool_arguments_stay_json() -> None:
    custom = [PiiPatternSettings(name="member", pattern=r'M"\d{4}', label="MEMBER")]
    privacy, counts = await stage(patterns=custom), {}
    _, restorer = await privacy.check_input(chat(user('member M"1234 here')), 10, counts)
    assert restorer is not None
    stored = answer("[MEMBER_1]", tool_calls=[{"id": "x", "type": "function",
                                             "function": {"name": "f", "arguments": '{"m": "[MEMBER_1]"}'}}])
    kept = copy.deepcopy(stored)
    shown = restorer.completion(stored)
    assert stored == kept  # the cache may hold the original: never changed
    message = shown["choices"][0]["message"]
    assert message["content"] == 'M"1234'
    assert orjson.loads(message["tool_calls"][0]["function"]["arguments"]) == {"m": 'M"1234'}


async def test_mask_puts_nothing_back_and_flag_changes_nothing() -> None:
    masked, counts = await stage(input="mask"), {}
    new, restorer = await masked.check_input(chat(user(f"call {PHONE}")), 10, counts)
    assert new["messages"][0]["content"] == "call [PHONE_1]"
    assert restorer is not None and restorer.completion(answer("[PHONE_1]")) == answer("[PHONE_1]")
    assert restorer.stream() is None  # nothing to put back, no output check
    flagged, counts = await stage(input="flag"), {}
    body = chat(user(f"call {PHONE}"))
    new, restorer = await flagged.check_input(body, 10, counts)
    assert new is body and restorer is None and counts == {"input:cn_mobile:flag": 1}


async def test_block_names_the_types_never_the_values() -> None:
    privacy, counts = await stage(input="block"), {}
    with pytest.raises(ContentFiltered) as exc:
        await privacy.check_input(chat(user(f"{PHONE} {ID}")), 10, counts)
    assert "cn_mobile" in exc.value.message and "cn_resident_id" in exc.value.message
    assert PHONE not in exc.value.message and exc.value.param == "messages"
    body = chat(user("nothing personal"))
    assert await privacy.check_input(body, 10, {}) == (body, None)


async def test_off_and_unstarted_do_nothing() -> None:
    body = chat(user(f"call {PHONE}"))
    for privacy in (await stage(input="off", output="off"), Privacy(PrivacySettings())):
        assert await privacy.check_input(body, 10, {}) == (body, None)
        assert await privacy.check_texts([PHONE], 10, {}) == [PHONE]


async def test_big_bodies_are_scanned_off_the_loop_with_the_same_result() -> None:
    privacy = await stage()
    body = chat(user(f"call {PHONE} " + "x" * OFF_LOOP_SCAN_BYTES))
    small, _ = await privacy.check_input(body, 10, {})
    big, _ = await privacy.check_input(body, OFF_LOOP_SCAN_BYTES + 1, {})
    assert big == small and big["messages"][0]["content"].startswith("call [PHONE_1] ")


async def test_output_check_masks_or_blocks_what_the_model_wrote_itself() -> None:
    counts: dict[str, int] = {}
    _, restorer = await (await stage(output="mask")).check_input(chat(user(f"my phone {PHONE}")), 10, counts)
    assert restorer is not None
    shown = restorer.completion(answer(f"[PHONE_1] saved; our agent is on {PHONE2}"))
    assert shown["choices"][0]["message"]["content"] == f"{PHONE} saved; our agent is on [PHONE_2]"
    assert counts["output:cn_mobile:mask"] == 1  # the user's own value, put back, is not counted
    _, restorer = await (await stage(output="block")).check_input(chat(user("hi")), 10, {})
    assert restorer is not None
    blocked = restorer.completion(answer(f"call {PHONE2}"))["choices"][0]
    assert blocked["finish_reason"] == "content_filter" and blocked["message"]["content"] == ""


async def test_the_cache_reads_placeholders_only() -> None:
    privacy = await stage()
    req = ChatRequest.model_validate(chat(user("hello"), {"role": "assistant", "content": "hi"},
                                          user(f"my phone is {PHONE}, id {ID}")))
    new, restorer = await privacy.check_input(req.upstream_body(), 10, {})
    assert restorer is not None
    cached = restorer.cache_request(req, new)
    assert user_turn(cached) == "my phone is [PHONE_1], id [ID_1]"
    scope = CacheScope("t", "m", "v")
    assert cached.upstream_body() == new
    assert exact_key(scope, cached.upstream_body()) == exact_key(scope, new)
    assert semantic_part(scope, cached.upstream_body(), "e") == semantic_part(scope, new, "e")
    other = ChatRequest.model_validate(chat(user("hello"), {"role": "assistant", "content": "hi"},
                                            user(f"my phone is {PHONE2}, id {ID}")))
    new2, _ = await privacy.check_input(other.upstream_body(), 10, {})
    assert exact_key(scope, new2) == exact_key(scope, new)  # another user's same question: same entry
    _, restorer = await privacy.check_input(chat(user("hello")), 10, {})
    assert restorer is None


async def test_embedding_inputs_are_masked_or_refused() -> None:
    counts: dict[str, int] = {}
    assert await (await stage()).check_texts([f"a {PHONE}", "b"], 10, counts) == ["a [PHONE_1]", "b"]
    assert counts == {"input:cn_mobile:pseudonymize": 1}
    with pytest.raises(ContentFiltered) as exc:
        await (await stage(input="block")).check_texts([f"a {ID}"], 10, {})
    assert exc.value.param == "input"


def test_placeholders_number_per_label_and_values_as_written() -> None:
    r = Recognizer(custom=[CustomPattern("ticket", r"T-\d{4}", label="PHONE")])
    names = Pseudonyms(keep=True)
    found = r.find(f"T-1234 {PHONE} +86 {PHONE} T-1234")
    assert [names.placeholder(r.labels[f.kind], f) for f in found] == [
        "[PHONE_1]", "[PHONE_2]", "[PHONE_2]", "[PHONE_1]"
    ]
    assert names.values == {"[PHONE_1]": "T-1234", "[PHONE_2]": PHONE}  # the first spelling
    check = AnswerCheck(None, "off", names, lambda f: None)
    assert check.text("[PHONE_2][PHONE_1][PHONE_3]") == f"{PHONE}T-1234[PHONE_3]"


@pytest.mark.parametrize("name", ["gateway.yaml", "gateway.load.yaml", "gateway.gpu.yaml"])
def test_shipped_configs_pseudonymize_prompts(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_JWT_SECRET", "x" * 40)  # the GPU config requires it
    privacy = load_settings(ROOT / "config" / name).privacy
    assert privacy.input == "pseudonymize" and privacy.output == "off"  # a bare YAML `off`
    assert privacy.types == list(BUILTIN_NAMES)


@pytest.mark.parametrize(
    ("pattern", "error"),
    [
        ("(?P<id>x)", "named groups"),
        (r"(\d)\1", "back-references"),
        ("a(?i)b", "not a regular expression"),
        ("x*", "matches empty text"),
    ],
)
def test_a_pattern_that_cannot_join_the_recognizers_is_refused(pattern: str, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        PiiPatternSettings(name="custom", pattern=pattern)


def test_pattern_names_are_unique_and_not_built_in() -> None:
    with pytest.raises(ValidationError, match="email"):
        PrivacySettings(patterns=[PiiPatternSettings(name="email", pattern="x")])
    twice = [PiiPatternSettings(name="emp", pattern="E"), PiiPatternSettings(name="emp", pattern="F")]
    with pytest.raises(ValidationError, match="emp"):
        PrivacySettings(patterns=twice)
