"""PolicyGuard: actions on requests, completions and streams; loading and hot reload."""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import ContentFiltered
from proxy.guard import PolicyGuard
from proxy.settings import ConfigError, PolicySettings

ZH = "# sample\n洗钱\n!洗钱包\n"
EN = "\ufeff# sample\r\nfuck*\r\nbitch\r\n"


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    zh, en = tmp_path / "zh.txt", tmp_path / "en.txt"
    zh.write_text(ZH, encoding="utf-8")
    en.write_text(EN, encoding="utf-8")
    return [zh, en]


def settings(files: list[Path], **kw: Any) -> PolicySettings:
    return PolicySettings(words=[str(p) for p in files], **kw)


@pytest.fixture
async def guard(files: list[Path]) -> AsyncIterator[PolicyGuard]:
    g = PolicyGuard(settings(files, input="block", output="mask"))
    await g.start()
    try:
        yield g
    finally:
        await g.close()


def request(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "assistant", "messages": list(messages), **extra}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


CALL = {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"q": "\\u6d17\\u94b1"}'}}
TOOL = {"type": "function", "function": {"name": "f", "description": "ｂｉｔｃｈ"}}
PLACES = [
    ("system role", request({"role": "system", "content": "say 洗錢"}, user("hi"))),
    ("split across parts", request(user([{"type": "text", "text": "fu"}, {"type": "text", "text": "ck"}]))),
    ("tool result", request({"role": "tool", "tool_call_id": "1", "content": "you b.i.t.c.h"})),
    ("name", request({"role": "user", "name": "FUCKER", "content": "hi"})),
    ("tool call arguments with escapes", request({"role": "assistant", "tool_calls": [CALL]})),
    ("assistant turn", request({"role": "assistant", "content": "洗 钱"})),
    ("reasoning text", request({"role": "assistant", "content": "ok", "reasoning": "我要洗钱"})),
    ("tool definition", request(user("hi"), tools=[TOOL])),
]


@pytest.mark.parametrize(("name", "body"), PLACES, ids=[p[0] for p in PLACES])
async def test_block_input_everywhere(guard: PolicyGuard, name: str, body: dict[str, Any]) -> None:
    with pytest.raises(ContentFiltered) as err:
        guard.check_input(body)
    assert err.value.status == 400 and err.value.code == "content_filter"
    message = err.value.message.lower()
    assert not any(w in message for w in ("洗", "钱", "fuck", "bitch")), name
    assert guard.counts["input", "block"] == 1


async def test_benign_input_passes_unchanged(guard: PolicyGuard) -> None:
    body = request(user("the class passage, 洗钱包"))
    assert guard.check_input(body) == (body, None)


async def test_mask_input(files: list[Path]) -> None:
    g = PolicyGuard(settings(files, input="mask"))
    await g.start()
    body = request(user("oh fuck, 洗钱"))
    original = copy.deepcopy(body)
    new, action = g.check_input(body)
    assert action == "mask" and new["messages"][0]["content"] == "oh ****, **"
    assert body == original
    await g.close()


async def test_flag_input_logs_without_the_word(files: list[Path], caplog: pytest.LogCaptureFixture) -> None:
    g = PolicyGuard(settings(files, input="flag"))
    await g.start()
    body = request(user("bitch"))
    with caplog.at_level(logging.WARNING, logger="llm_gateway.policy"):
        assert g.check_input(body) == (body, "flag")
    assert g.counts["input", "flag"] == 1
    assert "messages[0].content (en.txt:3)" in caplog.text and "bitch" not in caplog.text
    await g.close()


async def test_off_does_nothing(files: list[Path]) -> None:
    g = PolicyGuard(settings(files, input="off", output="off"))
    await g.start()
    body = request(user("fuck"))
    assert g.check_input(body) == (body, None)
    assert g.stream_filter() is None
    await g.close()


def completion(*contents: str) -> dict[str, Any]:
    choices = [
        {"index": i, "message": {"content": c}, "logprobs": None, "finish_reason": "stop"}
        for i, c in enumerate(contents)
    ]
    return {"id": "x", "object": "chat.completion", "choices": choices}


async def test_mask_output(guard: PolicyGuard) -> None:
    new, action = guard.filter_output(completion("well fuck", "fine"))
    assert action == "mask"
    assert [c["message"]["content"] for c in new["choices"]] == ["well ****", "fine"]


async def test_block_output_empties_the_choice(files: list[Path]) -> None:
    g = PolicyGuard(settings(files, output="block"))
    await g.start()
    new, action = g.filter_output(completion("fine", "洗钱 please"))
    assert action == "block"
    assert new["choices"][0]["message"]["content"] == "fine"
    assert new["choices"][0]["finish_reason"] == "stop"
    assert new["choices"][1]["message"]["content"] == ""
    assert new["choices"][1]["finish_reason"] == "content_filter"
    flt = g.stream_filter()
    assert flt is not None and flt.action == "block"
    assert g.stream_block_error().code == "content_filter"
    await g.close()


async def test_reload_swaps_the_matcher(guard: PolicyGuard, files: list[Path]) -> None:
    old = guard.matcher
    files[1].write_text(EN + "newword\n", encoding="utf-8")
    assert guard.changed()
    assert await guard.reload_now()
    assert guard.matcher is not old and guard.reloads == 1
    with pytest.raises(ContentFiltered):
        guard.check_input(request(user("a NEWWORD here")))
    assert not guard.changed()


@pytest.mark.parametrize("broken", [b"fuck\n\xff\xfe\n", b"ok\n!\n", b"x\nsecret\n!secret\n"])
async def test_broken_file_keeps_the_old_lists(
    guard: PolicyGuard, files: list[Path], broken: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    old = guard.matcher
    files[1].write_bytes(broken)
    with caplog.at_level(logging.ERROR, logger="llm_gateway.policy"):
        assert not await guard.reload_now()
    assert guard.matcher is old and guard.reload_errors == 1
    assert "en.txt" in caplog.text and "secret" not in caplog.text
    with pytest.raises(ContentFiltered):
        guard.check_input(request(user("fuck")))
    assert not guard.changed()  # the broken version is not retried until it changes again


async def test_missing_file_is_a_startup_error(files: list[Path]) -> None:
    g = PolicyGuard(settings([*files, files[0].with_name("missing.txt")]))
    with pytest.raises(ConfigError, match=r"missing\.txt"):
        await g.start()


async def test_change_detection_uses_mtime(guard: PolicyGuard, files: list[Path]) -> None:
    assert not guard.changed()
    st = files[0].stat()
    os.utime(files[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert guard.changed()


async def test_watcher_reloads_a_changed_file(files: list[Path]) -> None:
    g = PolicyGuard(settings(files, reload_interval_s=0.01))
    await g.start()
    reloaded = g.next_reload()
    files[0].write_text(ZH + "新词\n", encoding="utf-8")
    await asyncio.wait_for(reloaded, timeout=10)
    assert g.reloads == 1
    with pytest.raises(ContentFiltered):
        g.check_input(request(user("新詞")))
    await g.close()


async def test_sighup_reloads(guard: PolicyGuard) -> None:
    if not guard.handles_sighup:
        pytest.skip("not on the main thread: no SIGHUP handler")
    reloaded = guard.next_reload()
    os.kill(os.getpid(), signal.SIGHUP)
    await asyncio.wait_for(reloaded, timeout=10)
    assert guard.reloads == 1


async def test_close_stops_the_watcher_and_the_handler(files: list[Path]) -> None:
    g = PolicyGuard(settings(files))
    await g.start()
    await g.close()
    assert not g.handles_sighup
    await g.close()  # idempotent


async def test_output_stamp_changes_with_the_lists_and_the_action(guard: PolicyGuard, files: list[Path]) -> None:
    stamp = guard.output_stamp
    assert guard.output_checked(stamp) and not guard.output_checked(None)
    twin = PolicyGuard(settings(files, input="block", output="mask"))  # another replica, same lists
    blocking = PolicyGuard(settings(files, input="block", output="block"))
    await twin.start()
    await blocking.start()
    try:
        assert twin.output_stamp == stamp
        assert blocking.output_stamp != stamp
    finally:
        await twin.close()
        await blocking.close()
    files[1].write_text(EN + "newword\n", encoding="utf-8")
    assert await guard.reload_now()
    assert not guard.output_checked(stamp)  # answers checked under the old lists are checked again


async def test_block_output_drops_reasoning_and_tool_calls(files: list[Path]) -> None:
    g = PolicyGuard(settings(files, output="block"))
    await g.start()
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"q": "ok"}'}}
    message = {"role": "assistant", "content": None, "reasoning": "so: 洗钱", "tool_calls": [call]}
    body = {"choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls"}]}
    new, action = g.filter_output(body)
    assert action == "block" and new["choices"][0]["finish_reason"] == "content_filter"
    assert new["choices"][0]["message"] == {"role": "assistant", "content": ""}
    await g.close()
