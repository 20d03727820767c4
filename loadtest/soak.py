"""Soak under faults (a script that prints figures, not a test): mixed traffic for N minutes
against a real gateway in front of two simulated vLLM servers, with a fault injected into one of
them every few seconds (stalls before and after the headers, resets, drops, 5xx, refusals, slow
drips) and clients that leave at random moments. Every minute it prints the gateway's RSS, open
file descriptors, event-loop tasks and Redis client connections; at the end, whether each ended
flat (within 10% of its value after the warm-up).

    python -m loadtest.soak --minutes 30            # the full run
    python -m loadtest.soak --minutes 3 --warmup 1  # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis
import yaml

from loadtest.run_load import ROOT, Stack, free_port, wait_http

SECRET = "soak-only-secret-0123456789abcdef0123456789abcd"
REDIS_URL = "redis://127.0.0.1:6379/0"
FAULTS: list[dict[str, Any]] = [
    {"fault": "none"},
    {"fault": "stall", "stall_s": 20},
    {"fault": "stall_stream", "drop_after_chunks": 0, "stall_s": 20},
    {"fault": "stall_stream", "drop_after_chunks": 4, "stall_s": 20},
    {"fault": "reset", "drop_after_chunks": 3},
    {"fault": "drop", "drop_after_chunks": 2},
    {"fault": "status", "fault_status": 500},
    {"fault": "status", "fault_status": 503},
    {"fault": "refuse"},
    {"fault": "none", "itl_ms": 400, "reply_tokens": 40},  # a slow drip: the request deadline ends it
]
_TASKS = re.compile(rb"^llm_gateway_event_loop_tasks(?:\{[^}]*\})? ([0-9.e+]+)$", re.M)


def _config(sims: list[str]) -> dict[str, Any]:
    def backend(url: str) -> dict[str, Any]:
        return {
            "type": "vllm",
            "url": url,
            "model": "sim-model",
            "first_token_timeout_s": 2,
            "idle_timeout_s": 2,
            "request_timeout_s": 8,
            "health_interval_s": 1,
            "breaker": {"failures": 5, "reset_s": 3},
        }

    return {
        "redis_url": REDIS_URL,
        "auth": {"algorithms": ["HS256"], "secret": SECRET, "audience": "llm-gateway", "issuer": "soak"},
        "limits": {"tiers": {"default": {"requests_per_minute": 10**6, "tokens_per_minute": 10**9}}},
        "cache": {"semantic": {"enabled": False}},
        "policies": {"words": [str(ROOT / "config/words/zh.txt"), str(ROOT / "config/words/en.txt")]},
        "observability": {"log_format": "json", "ab_prefix": f"soak-{os.getpid()}", "feedback_ttl_s": 60},
        "backends": {"a": backend(sims[0]), "b": backend(sims[1])},
        "models": {
            "assistant": {"variants": [{"name": "v", "weight": 1, "backends": ["a"], "fallback": ["b"]}]}
        },
    }


def _token(sub: str) -> str:
    from proxy.auth.authenticator import mint_token
    from proxy.settings import AuthSettings

    auth = AuthSettings(secret=SECRET, audience="llm-gateway", issuer="soak")
    return mint_token(
        key=SECRET,
        algorithm="HS256",
        sub=sub,
        tenant=None,
        tier=None,
        models=None,
        ttl_s=86_400,
        audience=auth.audience,
        issuer=auth.issuer,
        settings=auth,
    )


class Traffic:
    """Open-loop mixed requests: streams and JSON, cacheable and not, some clients leaving early."""

    def __init__(self, url: str, rate: float, rng: random.Random) -> None:
        self.url, self.rate, self.rng = url, rate, rng
        self.outcomes: Counter[str] = Counter()
        self.headers = {"authorization": f"Bearer {_token('soak')}", "content-type": "application/json"}

    async def one(self, session: aiohttp.ClientSession) -> None:
        rng = self.rng
        stream = rng.random() < 0.5
        body = {
            "model": "assistant",
            "stream": stream,
            "max_tokens": 32,
            "messages": [{"role": "user", "content": f"soak question {rng.randrange(200)}"}],
            "temperature": 0 if rng.random() < 0.5 else 0.7,
        }
        leave_after = rng.uniform(0.05, 3.0) if rng.random() < 0.2 else None
        try:
            async with asyncio.timeout(leave_after or 60):
                async with session.post(
                    f"{self.url}/v1/chat/completions", data=orjson.dumps(body), headers=self.headers
                ) as r:
                    await r.read()
                    self.outcomes[str(r.status)] += 1
        except TimeoutError:
            self.outcomes["left" if leave_after else "client_timeout"] += 1
        except aiohttp.ClientError:
            self.outcomes["client_error"] += 1

    async def run(self, until: float) -> None:
        tasks: set[asyncio.Task[None]] = set()
        connector = aiohttp.TCPConnector(limit=256, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            while time.monotonic() < until:
                task = asyncio.create_task(self.one(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                await asyncio.sleep(self.rng.expovariate(self.rate))
            await asyncio.gather(*tasks, return_exceptions=True)


async def inject_faults(admin: list[str], every_s: float, until: float, rng: random.Random) -> Counter[str]:
    injected: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < until:
            target = rng.choice(admin)
            fault = rng.choice(FAULTS)
            await session.post(f"{target}/_sim/reset")
            async with session.post(f"{target}/_sim/config", data=orjson.dumps(fault)) as r:
                r.raise_for_status()
            injected[fault["fault"] if "itl_ms" not in fault else "drip"] += 1
            await asyncio.sleep(every_s)
        for target in admin:
            await session.post(f"{target}/_sim/reset")
    return injected


def sample(pid: int, gw_url: str, rds: redis.Redis) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    import urllib.request

    with urllib.request.urlopen(f"{gw_url}/metrics", timeout=5) as r:
        found = _TASKS.search(r.read())
    tasks = float(found.group(1)) if found else float("nan")
    clients = float(rds.info("clients")["connected_clients"])
    return {"rss_mb": rss_kb / 1024, "fds": fds, "tasks": tasks, "redis_clients": clients}


async def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    logs = Path(tempfile.mkdtemp(prefix="soak-"))
    stack = Stack(logs)
    py = sys.executable
    try:
        sims, admin = [], []
        for i in range(2):
            port, admin_port = free_port(), free_port()
            stack.start(
                f"sim{i}",
                [
                    py,
                    "-m",
                    "loadtest.vllm_sim",
                    "--port",
                    str(port),
                    "--admin-port",
                    str(admin_port),
                    "--ttft-ms",
                    "30",
                    "--itl-ms",
                    "10",
                    "--reply-tokens",
                    "24",
                ],
            )
            sims.append(f"http://127.0.0.1:{port}")
            admin.append(f"http://127.0.0.1:{admin_port}")
        for url in admin:
            wait_http(f"{url}/_sim/config", 30)
        gw_port = free_port()
        config = logs / "gateway.yaml"
        config.write_text(yaml.safe_dump(_config(sims)))
        gw = stack.start(
            "gateway", [py, "-m", "proxy.cli", "serve", "--config", str(config), "--port", str(gw_port)]
        )
        gw_url = f"http://127.0.0.1:{gw_port}"
        wait_http(f"{gw_url}/healthz", 120, gw)
        rds = redis.Redis.from_url(REDIS_URL)
        started = time.monotonic()
        until = started + args.minutes * 60
        traffic = Traffic(gw_url, args.rate, rng)
        load = asyncio.create_task(traffic.run(until))
        faults = asyncio.create_task(inject_faults(admin, args.fault_every, until, rng))
        rows: list[dict[str, float]] = []
        print(
            f"soak: {args.minutes} min at {args.rate}/s, a fault every {args.fault_every} s; logs in {logs}"
        )
        print(f"{'min':>4} {'RSS MB':>8} {'fds':>5} {'tasks':>6} {'redis':>6}  outcomes so far")
        for minute in range(1, args.minutes + 1):
            await asyncio.sleep(max(0.0, started + minute * 60 - time.monotonic()))
            row = await asyncio.to_thread(sample, gw.pid, gw_url, rds)
            rows.append(row)
            print(f"{_row(str(minute), row)}  {dict(sorted(traffic.outcomes.items()))}", flush=True)
        await load
        injected = await faults
        await asyncio.sleep(3)  # in-flight requests and follow-ups settle
        final = await asyncio.to_thread(sample, gw.pid, gw_url, rds)
        print(_row("idle", final))
        print(f"faults injected: {dict(sorted(injected.items()))}")
        return verdict(rows, final, args.warmup)
    finally:
        stack.stop()


def _row(label: str, row: dict[str, float]) -> str:
    rss, fds, tasks, clients = row["rss_mb"], row["fds"], row["tasks"], row["redis_clients"]
    return f"{label:>4} {rss:>8.1f} {fds:>5.0f} {tasks:>6.0f} {clients:>6.0f}"


def verdict(rows: list[dict[str, float]], idle: dict[str, float], warmup: int) -> int:
    """Memory: the last minute's sample against the one just after the warm-up, within 10%.
    Descriptors, tasks and Redis connections move with the requests in flight at the moment of a
    sample, so the sample taken once traffic has stopped is what must be back within 10% (plus a
    few: pooled keep-alive connections stay open) of the after-warm-up one: a leak grows past it."""
    if len(rows) <= warmup:
        print("too short to judge: more minutes than --warmup are needed")
        return 1
    base = rows[warmup - 1] if warmup else rows[0]
    failed = 0
    for key, end, band in (
        ("rss_mb", rows[-1], 0.0),
        ("fds", idle, 5.0),
        ("tasks", idle, 10.0),
        ("redis_clients", idle, 3.0),
    ):
        ok = end[key] <= base[key] * 1.10 + band
        failed += not ok
        when = "last minute" if end is rows[-1] else "idle at the end"
        print(f"{key:>14}: after warm-up {base[key]:.1f}, {when} {end[key]:.1f}  {'flat' if ok else 'GREW'}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--minutes", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2, help="minutes before the baseline sample")
    p.add_argument("--rate", type=float, default=40.0, help="requests per second (Poisson)")
    p.add_argument("--fault-every", type=float, default=4.0, help="seconds between fault changes")
    p.add_argument("--seed", type=int, default=1)
    return asyncio.run(soak(p.parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
