"""Redis memory per key family for the default settings, measured: drives the default load mix
(loadtest/locustfile.py's shares) through a gateway process against a fresh Redis 8 with search,
reads every key's MEMORY USAGE and TTL and the vector index's size, and prints a markdown table:
bytes per key and the steady state at --rate requests/s given each family's lifetime. A feedback
mapping (feedback_sample 1; off by default) and a stored /v1/responses turn are measured apart.

    python -m loadtest.redis_memory                          # 3,000 requests at 25/s, 50 callers
    python -m loadtest.redis_memory --redis redis://127.0.0.1:6391/0   # an empty Redis 8 of yours

Steady state: keys that requests add live their TTL (memory = bytes per request x rate x TTL);
the limiter's are per caller, each sending one request a second (a minute's log of 60 entries);
A/B buckets are one a minute whatever the rate. The simulator answers max_tokens (64) tokens;
--pace keeps the embedder up with the traffic, so every cacheable answer gets its vector.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
import yaml

ROOT = Path(__file__).resolve().parent.parent
SECRET = "redis-memory-only-secret-0123456789abcdef0123456789"
SHARES = {"fresh": 0.65, "repeat": 0.2, "paraphrase": 0.1, "listed": 0.05}  # locustfile defaults
STREAM_SHARE, SAMPLED_SHARE, MAX_TOKENS = 0.5, 0.2, 64
FAMILIES = {  # the keys the gateway writes, under the default prefixes
    "limits: request logs": re.compile(r"^llmgw:rl:\{[0-9a-f]+\}:req$"),
    "limits: token buckets": re.compile(r"^llmgw:rl:\{[0-9a-f]+\}:tok$"),
    "cache entries": re.compile(r"^llmgw:cache:e:"),
    "A/B minute buckets": re.compile(r"^llmgw:ab:m:\d+$"),
    "feedback mappings": re.compile(r"^llmgw:ab:c:"),
    "stored responses": re.compile(r"^llmgw:resp:"),
}


def family_of(key: str) -> str:
    return next((name for name, pattern in FAMILIES.items() if pattern.match(key)), "other")


@dataclass
class Family:
    keys: int = 0
    bytes: int = 0
    ttls: list[int] = field(default_factory=list)


async def scan_keys(client: aioredis.Redis) -> dict[str, Family]:
    """Every key: its family, MEMORY USAGE (exact: SAMPLES 0) and TTL (-1: none, -2: gone)."""
    out: dict[str, Family] = {}
    keys = [k.decode() if isinstance(k, bytes) else k async for k in client.scan_iter(count=1000)]
    for start in range(0, len(keys), 500):
        batch = keys[start : start + 500]
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key, samples=0)
            pipe.ttl(key)
        replies = await pipe.execute()
        for key, size, ttl in zip(batch, replies[::2], replies[1::2], strict=True):
            fam = out.setdefault(family_of(key), Family())
            fam.keys, fam.bytes = fam.keys + 1, fam.bytes + int(size or 0)
            fam.ttls.append(int(ttl))
    return out


def config(redis_url: str, sim_url: str, state: Path) -> dict[str, Any]:
    """The settings model's defaults, plus what a deployment must name."""
    gpu = {"type": "vllm", "url": sim_url, "model": "sim-model"}
    variants = [
        {"name": n, "weight": w, "backends": ["gpu"]} for n, w in (("control", 90), ("candidate", 10))
    ]
    return {
        "redis_url": redis_url,
        "server": {"state_dir": str(state)},
        "auth": {"secret": SECRET, "audience": "llm-gateway", "issuer": "redis-memory"},
        "policies": {"words": [str(ROOT / "config/words/zh.txt"), str(ROOT / "config/words/en.txt")]},
        "observability": {"log_format": "json", "log_level": "warning"},
        "backends": {"gpu": gpu},
        "models": {
            "assistant": {"variants": variants},
            "rated": {"variants": variants[:1], "feedback_sample": 1},  # only for the mapping's size
        },
    }


def tokens(users: int) -> list[str]:
    from proxy.auth.authenticator import mint_token
    from proxy.settings import AuthSettings

    auth = AuthSettings(secret=SECRET, audience="llm-gateway", issuer="redis-memory")
    claims: dict[str, Any] = dict(key=SECRET, algorithm="HS256", tier=None, models=None, ttl_s=3600)
    claims |= dict(audience=auth.audience, issuer=auth.issuer, settings=auth)
    return [mint_token(sub=f"user-{i}", tenant=("acme", "globex")[i % 2], **claims) for i in range(users)]


def chat_bodies(n: int, seed: int) -> list[dict[str, Any]]:
    """The locustfile's default mix: fresh / repeat / paraphrase / listed, half streamed."""
    from loadtest.prompts import PromptBook

    rng = random.Random(seed)
    book = PromptBook(rng, 0.5)
    kinds, weights = list(SHARES), list(SHARES.values())
    bodies = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        sampled = kind == "fresh" and rng.random() < SAMPLED_SHARE
        messages = [{"role": "user", "content": getattr(book, kind)()}]
        body: dict[str, Any] = {"model": "assistant", "messages": messages, "max_tokens": MAX_TOKENS}
        body["temperature"] = 0.7 if sampled else 0
        if rng.random() < STREAM_SHARE:
            body["stream"] = True
        bodies.append(body)
    return bodies


async def drive(
    url: str, bodies: list[dict[str, Any]], auth: list[str], concurrency: int, pace: float
) -> Counter[str]:
    """Send every body (user i % len(auth)) at `pace` requests/s (0: as fast as answered); count
    statuses and x-gateway-cache values."""
    seen: Counter[str] = Counter()
    queue, t0 = list(enumerate(bodies))[::-1], time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:

        async def worker() -> None:
            while queue:
                i, body = queue.pop()
                if pace:
                    await asyncio.sleep(max(0.0, t0 + i / pace - time.monotonic()))
                headers = {"authorization": f"Bearer {auth[i % len(auth)]}"}
                r = await client.post("/v1/chat/completions", json=body, headers=headers)
                seen[f"status {r.status_code}"] += 1
                seen[f"cache {r.headers.get('x-gateway-cache', '-')}"] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return seen


async def side_families(url: str, auth: str, n: int) -> None:
    """n rateable completions (one rated) and n two-turn /v1/responses conversations."""
    headers = {"authorization": f"Bearer {auth}"}
    async with httpx.AsyncClient(base_url=url, timeout=60, headers=headers) as client:
        for i in range(n):
            body = {"model": "rated", "messages": [{"role": "user", "content": f"Rate me, answer {i}."}]}
            cid = (await client.post("/v1/chat/completions", json=body)).raise_for_status().json()["id"]
            first = {"model": "assistant", "input": f"My name is Ada and my lucky number is {i}."}
            rid = (await client.post("/v1/responses", json=first)).raise_for_status().json()["id"]
            second = {"model": "assistant", "input": "What is my name?", "previous_response_id": rid}
            (await client.post("/v1/responses", json=second)).raise_for_status()
        (await client.post("/v1/feedback", json={"id": cid, "score": 1})).raise_for_status()


async def index_bytes(client: aioredis.Redis) -> int:
    """Memory of the semantic cache's vector index (FT.INFO: the vectors' HNSW graph is apart)."""
    size = 0
    for name in await client.execute_command("FT._LIST"):  # type: ignore[no-untyped-call]
        raw = await client.execute_command("FT.INFO", name)  # type: ignore[no-untyped-call]
        info = {_s(k): v for k, v in zip(raw[::2], raw[1::2], strict=True)}
        for part in ("total_index_memory_sz_mb", "vector_index_sz_mb"):
            size += int(float(_s(info.get(part, b"0"))) * 1_048_576)
    return size


@dataclass
class CacheDetail:
    kinds: dict[str, Family] = field(default_factory=dict)  # without their vector fields
    vectors: int = 0
    vector_fields: int = 0  # bytes of vec + text + part in the entries that have them


async def cache_detail(client: aioredis.Redis) -> CacheDetail:
    """Entries by kind (a stream is stored as its chunks, a completion as one body), vectors apart."""
    out = CacheDetail()
    async for key in client.scan_iter(match="llmgw:cache:e:*", count=1000):
        answer, vec = await client.hmget(key, ["answer", "vec"])
        size = int(await client.memory_usage(key, samples=0) or 0)
        if vec:
            extra = sum([await client.hstrlen(key, f) for f in ("vec", "text", "part")])
            out.vectors, out.vector_fields, size = out.vectors + 1, out.vector_fields + extra, size - extra
        kind = "completions" if b'"chunks":null' in (answer or b"") else "streams"
        fam = out.kinds.setdefault(kind, Family())
        fam.keys, fam.bytes = fam.keys + 1, fam.bytes + size
    return out


async def log_entries(client: aioredis.Redis) -> int:
    """Requests held in every caller's sliding log now."""
    return sum([await client.zcard(k) async for k in client.scan_iter(match="llmgw:rl:*:req", count=1000)])


async def full_bucket(client: aioredis.Redis, variants: list[str]) -> int:
    """Bytes of an A/B minute bucket with every field of every variant counted once (every
    latency and time-to-first-token bucket touched): the most a bucket can hold."""
    from proxy.experiments.report import MAX_BUCKET

    names = "n err blk hit disc tin tout tps_n tps_s tps_q fb_n fb_s fb_q".split()
    names += [f"{h}:{i}" for h in ("lat", "ttft") for i in range(MAX_BUCKET + 1)]
    fields = {f"assistant|{v}|{n}": 12345 for v in variants for n in names}
    await client.hset("redis-memory:scratch", mapping=fields)
    size = int(await client.memory_usage("redis-memory:scratch", samples=0) or 0)
    await client.delete("redis-memory:scratch")
    return size


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class Run:
    requests: int
    users: int
    seen: Counter[str]
    families: dict[str, Family]
    cache: CacheDetail
    index: int  # the vector index's bytes beyond the empty one
    log_entries: int
    full_bucket: int
    used_memory: int  # INFO used_memory after the run minus before


Row = tuple[str, str, str, str, float]  # family, one key, bytes, lifetime, bytes at the rate


def _row(family: str, what: str, size: str, lifetime_s: float, steady: float) -> Row:
    return family, what, size, _duration(lifetime_s), steady


def rows(run: Run, rate: float) -> list[Row]:
    """The default mix's families at `rate` requests/s, callers sending one request a second each."""
    from proxy.settings import CacheSettings, ObservabilitySettings

    ttl, keep, fam = CacheSettings().ttl_s, ObservabilitySettings().ab_retention_s, run.families.get
    logs, buckets = fam("limits: request logs", Family()), fam("limits: token buckets", Family())
    ab = fam("A/B minute buckets", Family())
    entry, bucket = logs.bytes / max(1, run.log_entries), buckets.bytes / max(1, buckets.keys)
    out = [
        _row(
            "limits: request logs",
            "sorted set per caller",
            f"{entry:,.0f} per request",
            60,
            rate * 60 * entry,
        ),
        _row("limits: token buckets", "hash per caller", f"{bucket:,.0f}", 60, bucket * rate),
    ]
    for kind, f in sorted(run.cache.kinds.items()):
        what = f"hash per answer, {1000 * f.keys / run.requests:.0f} per 1,000 requests"
        steady = f.bytes / run.requests * rate * ttl
        out.append(_row(f"cache entries: {kind}", what, f"{f.bytes / f.keys:,.0f}", ttl, steady))
    if run.cache.vectors:
        per, share = (
            (run.cache.vector_fields + run.index) / run.cache.vectors,
            run.cache.vectors / run.requests,
        )
        what = f"fields + index, {1000 * share:.0f} per 1,000 requests"
        out.append(_row("cache: semantic vectors", what, f"{per:,.0f}", ttl, per * share * rate * ttl))
    size = f"{ab.bytes / max(1, ab.keys):,.0f} (at most {run.full_bucket:,})"
    out.append(_row("A/B minute buckets", "hash per minute", size, keep, run.full_bucket * keep / 60))
    return out


def side_rows(run: Run, rate: float) -> list[Row]:
    """What the default mix does not write: per rateable completion, per stored response."""
    from proxy.settings import ObservabilitySettings, ResponsesSettings

    out = []
    for name, what, life in (
        (
            "feedback mappings",
            "hash per completion (feedback_sample 1)",
            ObservabilitySettings().feedback_ttl_s,
        ),
        ("stored responses", "string per /v1/responses turn", ResponsesSettings().ttl_s),
    ):
        f = run.families.get(name, Family())
        per = f.bytes / max(1, f.keys)
        out.append(_row(name, what, f"{per:,.0f}", life, per * rate * life))
    return out


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def _size(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def report(run: Run, rate: float) -> str:
    head = f"| key family | one key | bytes per key | lifetime | at {rate:,.0f} requests/s |"
    lines = [head, "|---|---|---:|---|---:|"]
    main = rows(run, rate)
    lines += [f"| {a} | {b} | {c} | {d} | {_size(e)} |" for a, b, c, d, e in main]
    lines.append(f"| **default settings, total** | | | | **{_size(sum(r[4] for r in main))}** |")
    lines += [f"| {a} | {b} | {c} | {d} | {_size(e)} |" for a, b, c, d, e in side_rows(run, rate)]
    keys = sum(f.keys for f in run.families.values())
    no_ttl = sum(t == -1 for f in run.families.values() for t in f.ttls)
    measured = sum(f.bytes for f in run.families.values()) + run.index
    lines += [
        "",
        f"{run.requests} requests from {run.users} callers: {dict(sorted(run.seen.items()))}",
        f"keys: {keys} ({no_ttl} without a TTL); MEMORY USAGE + index {_size(measured)}; "
        f"INFO used_memory grew {_size(run.used_memory)}",
    ]
    return "\n".join(lines)


async def measure(args: argparse.Namespace, redis_url: str, gateway_url: str) -> Run:
    client = aioredis.Redis.from_url(redis_url, protocol=2)
    try:
        if await client.dbsize():
            raise SystemExit(f"{redis_url} is not empty: the figures need a fresh Redis")
        before, empty_index = int((await client.info("memory"))["used_memory"]), await index_bytes(client)
        *auth, side = tokens(args.users + 1)
        bodies = chat_bodies(args.requests, args.seed)
        seen = await drive(gateway_url, bodies, auth, args.concurrency, args.pace)
        await side_families(gateway_url, side, 20)
        await asyncio.sleep(3.0)  # the A/B flush (every second) and cache stores waiting for vectors
        used = int((await client.info("memory"))["used_memory"]) - before
        families, entries = await scan_keys(client), await log_entries(client)
        index, cache = await index_bytes(client) - empty_index, await cache_detail(client)
        bucket = await full_bucket(client, ["control", "candidate"])
    finally:
        await client.aclose()
    return Run(args.requests, args.users, seen, families, cache, index, entries, bucket, used)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.redis_memory", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--users", type=int, default=0, help="callers (default: requests / 60)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--pace", type=float, default=25.0, help="requests/s sent (0: unpaced), for the embedder")
    ap.add_argument("--rate", type=float, default=1000.0, help="requests/s of the steady-state column")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--redis", default="", help="an empty Redis 8 with search (default: start one)")
    args = ap.parse_args(argv)
    args.users = args.users or max(1, args.requests // 60)
    sys.path.insert(0, str(ROOT))
    from loadtest.run_load import free_port, wait_http
    from loadtest.vllm_sim import SimulatorThread
    from tests.redis8 import start_redis8, stop

    proc, redis_url = (None, args.redis) if args.redis else start_redis8(free_port())
    try:
        with SimulatorThread(reply_tokens=MAX_TOKENS) as sim, tempfile.TemporaryDirectory() as tmp:
            gateway, url = start_gateway(Path(tmp), config(redis_url, sim.url, Path(tmp) / "state"))
            try:
                wait_http(f"{url}/readyz", 120, gateway)
                run = asyncio.run(measure(args, redis_url, url))
            finally:
                gateway.terminate()
                gateway.wait(15)
    finally:
        if proc is not None:
            stop(proc)
    print(report(run, args.rate))
    return 0


def start_gateway(workdir: Path, cfg: dict[str, Any]) -> tuple[Any, str]:
    import subprocess

    from loadtest.run_load import free_port

    port = free_port()  # a gateway process of its own: what a deployment runs
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(workdir / "gateway.log", "wb")  # the process writes it until it ends
    cmd = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}"


if __name__ == "__main__":
    sys.exit(main())
