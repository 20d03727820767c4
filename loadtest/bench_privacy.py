"""Benchmark the personal-data stage (proxy/privacy.py) on the hot path, and its validators
against the kept libraries.

Usage: python -m loadtest.bench_privacy [--runs 7] [--n 2000] [--checks]
Prints microseconds per request for the input stage (a chat body of a system prompt and three
turns, ~160 characters: no digits, digits but no personal data, two values; and twelve turns),
for an answer put back (JSON, and a stream of three characters a chunk, less the cost of making
the chunks) and for the output check (flag, mask). `--checks` adds the cost of one validator
call: the hand checks in policies/pii_checks.py against python-stdnum and phonenumbers. Figures
are medians of `--runs` runs of `--n` calls on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

from policies import pii_checks as checks
from proxy.privacy import Privacy
from proxy.settings import PrivacySettings

SYSTEM = "你是某电商平台的客服助手，回答要简洁、礼貌，涉及退款和物流时先核实订单信息。"
TURNS = {
    "no digits": [
        "你好，我上周买的蓝牙耳机一直没有发货，能帮我催一下吗？页面上显示已付款，但是物流信息是空的。",
        "您好，已为您查询，仓库显示正在打包，预计明天发出，请耐心等待。",
        "好的，另外如果我想换成白色的，还来得及吗？我不想再重新下单了，麻烦帮我改一下颜色，谢谢。",
    ],
    "digits, no personal data": [
        "你好，订单202311051234567890一直没有发货，11月5日下单，金额299元，能帮我催一下吗？",
        "您好，已为您查询，仓库显示正在打包，预计11月7日发出，运单号SF1402938475612。",
        "好的，另外如果我想换成白色的，还来得及吗？第2件半价的活动还有吗？谢谢。",
    ],
    "two values": [
        "你好，我的手机号13812345678收不到验证码，订单202311051234567890一直没有发货，能帮我查一下吗？",
        "您好，请提供下单时登记的身份证号后四位以便核实。",
        "身份证是11010519491231002X，麻烦尽快处理，谢谢。",
    ],
}
ANSWER = (
    "您好，已为您核实：手机[PHONE_1]已绑定，证件[ID_1]校验通过。订单预计11月7日发出，发出后会有短信通知，"
    "请留意查收。如需更换颜色，可以在订单详情页申请修改，或者回复“改色”由人工客服为您处理。"
)
PLAIN_ANSWER = ANSWER.replace("[PHONE_1]", "手机").replace("[ID_1]", "证件")


TURNS["12 turns, two values"] = [*TURNS["no digits"], *TURNS["digits, no personal data"][:2],
                                 *TURNS["no digits"], *TURNS["digits, no personal data"][:1],
                                 *TURNS["two values"]]


def body(turns: list[str]) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}] + [
        {"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)
    ]
    return {"model": "assistant", "messages": messages, "temperature": 0}


def per_call_us(fn: Callable[..., Any], n: int, runs: int) -> float:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t) / n)
    return statistics.median(times) * 1e6


def stage(output: str = "off") -> Privacy:
    privacy = Privacy(PrivacySettings.model_validate({"output": output}))
    asyncio.run(privacy.start())
    return privacy


def bench_stage(n: int, runs: int) -> None:
    privacy = stage()
    off = Privacy(PrivacySettings(input="off", output="off"))
    size = 0
    print(f"{'input stage (pseudonymize)':44} {'us/request':>10}")
    for name, turns in TURNS.items():
        b = body(turns)
        size = sum(len(m["content"]) for m in b["messages"])
        us = per_call_us(lambda b=b: privacy._input(b, {}), n, runs)
        print(f"  {name + f' ({size} chars)':42} {us:10.1f}")
    b = body(TURNS["two values"])
    us = per_call_us(lambda: _drive(off.check_input(b, 1, {})), n, runs)
    print(f"  {'privacy off (the awaited check)':42} {us:10.1f}")
    for output in ("off", "flag", "mask"):
        p = stage(output)
        _, restorer = p._input(b, {})
        assert restorer is not None
        completion = {"choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}}]}
        json_us = per_call_us(lambda r=restorer, c=completion: r.completion(c), n, runs)
        loop_us = per_call_us(lambda: _stream(_PassThrough(), ANSWER), n // 10, runs)  # the chunks' own cost
        plain_us = per_call_us(lambda r=restorer: _stream(r, PLAIN_ANSWER), n // 10, runs) - loop_us
        held_us = per_call_us(lambda r=restorer: _stream(r, ANSWER), n // 10, runs) - loop_us
        print(f"answer, output {output:5}: JSON {json_us:5.1f} us; a stream of {len(ANSWER) // 3} chunks: "
              f"{plain_us:6.1f} us without placeholders, {held_us:6.1f} us with two")


class _PassThrough:
    def stream(self) -> _PassThrough:
        return self

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        return [chunk]


def _stream(restorer: Any, text: str) -> None:
    """One streamed answer, three characters a chunk (about a token each)."""
    s = restorer.stream()
    for i in range(0, len(text), 3):
        s.feed({"choices": [{"index": 0, "delta": {"content": text[i : i + 3]}, "finish_reason": None}]})
    s.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})


def _drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends, without an event loop's overhead."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the coroutine suspended")


def bench_checks(n: int, runs: int) -> None:
    import phonenumbers
    from stdnum import luhn
    from stdnum.cn import ric
    from stdnum.us import ssn

    cases = [
        ("PRC ID (check, date, county)", lambda: checks.cn_resident_id("11010519491231002X"),
         lambda: ric.is_valid("11010519491231002X")),
        ("Luhn, 16 digits", lambda: checks.luhn("4111111111111111"),
         lambda: luhn.is_valid("4111111111111111")),
        ("card: network + length + Luhn", lambda: checks.bank_card("4111111111111111"),
         lambda: luhn.is_valid("4111111111111111")),
        ("US SSN", lambda: checks.us_ssn("536904399"), lambda: ssn.is_valid("536-90-4399")),
        ("US phone (NANP)", lambda: checks.nanp("2125552368"),
         lambda: phonenumbers.is_valid_number(phonenumbers.parse("+12125552368"))),
        ("CN mobile", lambda: checks.cn_mobile("13812345678"),
         lambda: phonenumbers.is_valid_number(phonenumbers.parse("+8613812345678"))),
    ]
    print(f"{'validator, one call':32} {'hand us':>8} {'library us':>10}")
    for name, hand, library in cases:
        print(f"{name:32} {per_call_us(hand, n, runs):8.2f} {per_call_us(library, n, runs):10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--checks", action="store_true")
    args = parser.parse_args()
    bench_stage(args.n, args.runs)
    if args.checks:
        bench_checks(args.n, args.runs)


if __name__ == "__main__":
    main()
