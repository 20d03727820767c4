"""The routing benchmark's workload and client: multi-turn conversations per tenant (a long shared
system prompt, Chinese or English), Poisson arrivals into idle conversations, streamed turns sent
in order, and the figures of one measured window (TTFT percentiles, tokens/s, errors).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

_EN = (
    "account order refund delivery invoice password reset shipping address payment card update status "
    "customer support ticket product warranty return policy exchange discount coupon subscription plan "
    "upgrade cancel renewal billing cycle charge receipt tracking number package courier delay damaged "
    "item replacement store hours contact phone email chat agent escalate manager please always never "
    "polite answer question verify identity security privacy data request form within days business"
).split()
_ZH = "账户订单退款配送发票密码重置地址支付银行卡更新状态客户支持工单产品保修退货政策换货折扣优惠券订阅计划升级取消续费账单扣款收据物流单号包裹快递延迟损坏商品补发门店营业时间联系电话邮件人工客服经理请务必礼貌回答问题核实身份安全隐私数据申请表格工作日"  # noqa: E501


def _text(rng: random.Random, tokens: int, chinese: bool) -> str:
    """About `tokens` simulator tokens: one per CJK character, one per English word."""
    if chinese:
        return "".join(rng.choices(_ZH, k=tokens))
    return " ".join(rng.choices(_EN, k=tokens))


@dataclass
class Workload:
    tenants: int
    users_per_tenant: int
    system_tokens: int
    turn_tokens: tuple[int, int] = (20, 60)
    turns: tuple[int, int] = (4, 10)
    shared: bool = True  # False: every conversation has its own system prompt and one turn
    seed: int = 1

    def system_prompt(self, tenant: int, rng: random.Random) -> str:
        if not self.shared:
            return _text(rng, self.system_tokens, chinese=rng.random() < 0.5)
        own = random.Random(f"{self.seed}-tenant-{tenant}")
        head = f"Tenant {tenant} service rules. 租户{tenant}客服规则。"
        return head + _text(own, self.system_tokens, chinese=tenant % 2 == 1)


@dataclass(eq=False)
class User:
    tenant: int
    auth: str
    messages: list[dict[str, str]] = field(default_factory=list)
    turns_left: int = 0
    busy: bool = False


@dataclass
class Turn:
    ok: bool
    ttft: float | None = None
    tokens: int = 0
    error: str = ""
    finished: float = 0.0


class Trace:
    """The users and their conversations; `pick()` gives an idle user its next turn."""

    def __init__(self, workload: Workload, tokens: dict[str, str]) -> None:
        self.workload = workload
        self.rng = random.Random(workload.seed)
        self.users = [
            User(t, "Bearer " + tokens[f"t{t}-u{u}"])
            for t in range(workload.tenants)
            for u in range(workload.users_per_tenant)
        ]
        self._prompts: dict[int, str] = {}

    def pick(self) -> User | None:
        idle = [u for u in self.users if not u.busy]  # cheap enough at a few thousand users
        if not idle:
            return None
        user = self.rng.choice(idle)
        self.start_turn(user)
        return user

    def start_turn(self, user: User) -> None:
        """A new conversation when the last one ended, then the user's next question."""
        wl = self.workload
        if user.turns_left <= 0:
            if wl.shared:
                system = self._prompts.get(user.tenant) or wl.system_prompt(user.tenant, self.rng)
                self._prompts[user.tenant] = system
            else:
                system = wl.system_prompt(user.tenant, self.rng)
            user.messages = [{"role": "system", "content": system}]
            user.turns_left = self.rng.randint(*wl.turns) if wl.shared else 1
        chinese = user.tenant % 2 == 1 if wl.shared else self.rng.random() < 0.5
        question = _text(self.rng, self.rng.randint(*wl.turn_tokens), chinese)
        user.messages.append({"role": "user", "content": question})
        user.busy = True

    def done(self, user: User, answer: str | None) -> None:
        user.busy = False
        if answer is None:
            user.turns_left = 0  # a failed turn ends the conversation
            return
        user.messages.append({"role": "assistant", "content": answer})
        user.turns_left -= 1


async def send_turn(
    session: aiohttp.ClientSession, url: str, user: User, model: str
) -> tuple[Turn, str | None]:
    """One streamed turn: time to the first content token, content chunks, the answer text."""
    body = orjson.dumps({"model": model, "messages": user.messages, "stream": True, "temperature": 0.7})
    start = time.monotonic()
    parts: list[str] = []
    turn = Turn(ok=False)
    try:
        async with session.post(
            url, data=body, headers={"authorization": user.auth, "content-type": "application/json"}
        ) as resp:
            if resp.status != 200:
                turn.error = f"http {resp.status}"
                await resp.read()
                return _end(turn), None
            async for line in resp.content:
                if not line.startswith(b"data: {"):
                    turn.ok = turn.ok or line.startswith(b"data: [DONE]")
                    continue
                doc: dict[str, Any] = orjson.loads(line[6:])
                if "error" in doc:
                    turn.error = "stream error"
                    return _end(turn), None
                choices = doc.get("choices") or ()
                if choices and (text := choices[0]["delta"].get("content")):
                    if turn.ttft is None:
                        turn.ttft = time.monotonic() - start
                    parts.append(text)
    except (TimeoutError, aiohttp.ClientError) as exc:
        turn.error = type(exc).__name__
        return _end(turn), None
    turn.tokens = len(parts)
    if not turn.ok:
        turn.error = "no [DONE]"
    return _end(turn), ("".join(parts) if turn.ok else None)


def _end(turn: Turn) -> Turn:
    turn.finished = time.monotonic()
    return turn


@dataclass
class Window:
    """What one rate produced: every turn sent in the window, and arrivals no idle user could take."""

    rate: float
    seconds: float
    turns: list[Turn]
    no_idle_user: int = 0

    def ttft(self, q: float) -> float:
        values = sorted(t.ttft for t in self.turns if t.ok and t.ttft is not None)
        if not values:
            return float("inf")
        return values[min(len(values) - 1, int(q * len(values)))]

    @property
    def errors(self) -> int:
        return sum(not t.ok for t in self.turns) + self.no_idle_user

    def tokens_per_s(self, start: float) -> float:
        done = [t.finished for t in self.turns if t.ok]
        span = max(done, default=start + self.seconds) - start
        return sum(t.tokens for t in self.turns if t.ok) / max(span, self.seconds)


async def prime(
    session: aiohttp.ClientSession, url: str, trace: Trace, model: str, parallel: int = 16
) -> int:
    """One turn for the first user of every tenant (a pool whose tenants' prompts are hot, as in
    production); returns the number of failed turns."""
    users = {u.tenant: u for u in reversed(trace.users)}
    gate = asyncio.Semaphore(parallel)
    failed = 0

    async def one(user: User) -> None:
        nonlocal failed
        async with gate:
            trace.start_turn(user)
            turn, answer = await send_turn(session, url, user, model)
            trace.done(user, answer)
            failed += not turn.ok

    await asyncio.gather(*(one(u) for u in users.values()))
    return failed


async def drive(
    session: aiohttp.ClientSession, url: str, trace: Trace, rate: float, seconds: float, model: str
) -> tuple[Window, float]:
    """Poisson arrivals at `rate` for `seconds`; waits for every turn it started. Returns the
    window and its start time (monotonic)."""
    loop = asyncio.get_running_loop()
    start = time.monotonic()
    window = Window(rate, seconds, [])
    tasks: set[asyncio.Task[None]] = set()

    async def run(user: User) -> None:
        turn, answer = await send_turn(session, url, user, model)
        trace.done(user, answer)
        window.turns.append(turn)

    due = loop.time()
    end = due + seconds
    while (due := due + trace.rng.expovariate(rate)) < end:
        await asyncio.sleep(max(0.0, due - loop.time()))
        user = trace.pick()
        if user is None:
            window.no_idle_user += 1
            continue
        task = loop.create_task(run(user))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks))
    return window, start
