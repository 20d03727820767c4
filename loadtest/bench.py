"""Gateway overhead benchmark: direct-to-simulator versus through-the-gateway (prints figures).

Layout on a 2-core machine: the gateway (one worker) is pinned to core 0; the zero-delay vLLM
simulator, the load generators and (for auth/full) a local Redis share core 1. Measured:
  * max requests/s, non-stream (wrk, closed loop, 64 connections) direct vs gateway
  * at fixed 200 and 500 requests/s (open loop, loadtest/openloop.py): latency p50/p99,
    non-stream, and time to first token for streams, direct vs gateway, and the difference
    (what the gateway adds)

    .venv/bin/python loadtest/bench.py [--seconds 10] [--features core|auth|policies|full] [--redis URL]

--features core: auth with a valid token, generous limits in memory, policies and cache off.
--features auth: the same with limits in Redis (--redis) - the cost of identity and limits.
--features policies: core + input and output word policies (the shipped lists) + the personal-data
stage (`--privacy pseudonymize`, the shipped default, or `off`).
--features full: auth + Redis limits + policies + exact cache. The fixed-rate runs leave temperature
  unset (sampled: the cache is bypassed); it also prints max req/s for exact misses (temperature 0,
  a new prompt every request) and exact hits (temperature 0, one prompt) in --rounds alternating
  runs, the median hit/miss ratio, and the gateway CPU per hit and per miss below saturation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from loadtest import openloop  # noqa: E402

SECRET = "bench-secret-0123456789abcdef0123456789abcdef"


def _config(sim_url: str, features: str, redis_url: str, privacy: str) -> dict[str, Any]:
    words = [str(ROOT / "config/words/zh.txt"), str(ROOT / "config/words/en.txt")]
    full = features == "full"
    policies = features in ("full", "policies")
    return {
        "redis_url": redis_url if features in ("auth", "full") else "",
        "auth": {"secret": SECRET, "audience": "llm-gateway", "issuer": "bench"},
        "limits": {"tiers": {"default": {"requests_per_minute": 10**9, "tokens_per_minute": 10**12}}},
        "cache": {"enabled": full, "semantic": {"enabled": False}},
        "policies": {
            "words": words if policies else [],
            "input": "block" if policies else "off",
            "output": "mask" if policies else "off",
        },
        "privacy": {"input": privacy if policies else "off"},  # personal data: the shipped default
        "observability": {"log_level": "info", "log_format": "json"},  # the per-request line is paid
        "backends": {"gpu": {"type": "vllm", "url": sim_url, "model": "sim-model", "health_interval_s": 5}},
        "models": {"assistant": {"variants": [{"name": "control", "weight": 1, "backends": ["gpu"]}]}},
    }


def _token() -> str:
    from proxy.auth.authenticator import mint_token
    from proxy.settings import AuthSettings

    auth = AuthSettings(secret=SECRET, audience="llm-gateway", issuer="bench")
    return mint_token(
        key=SECRET,
        algorithm="HS256",
        sub="bench",
        tenant=None,
        tier=None,
        models=None,
        ttl_s=3600,
        audience=auth.audience,
        issuer=auth.issuer,
        settings=auth,
    )


async def _wait_http(url: str, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _body(i: int, stream: bool, model: str = "assistant", **extra: Any) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": f"Question number {i}?"}],
            "max_tokens": 16,
            "stream": stream,
            **extra,
        }
    )


def fresh_bodies(tag: str, n: int) -> list[bytes]:
    """`n` deterministic (temperature 0) questions no earlier run asked: each an exact-cache miss."""
    template = _body(0, False, temperature=0)
    return [template.replace(b"number 0?", f"{tag}-{i}?".encode()) for i in range(n)]


async def open_loop(
    url: str, headers: dict[str, str], rate: float, seconds: float, stream: bool
) -> list[float]:
    """Fixed-rate load (loadtest/openloop.py); returns latencies, or times to first token for streams."""
    model = headers.get("x-bench-model", "assistant")
    bodies = [_body(i, stream, model) for i in range(1000)]
    sent = {k: v for k, v in headers.items() if k != "x-bench-model"}
    result = await openloop.run(url, bodies, sent, rate, seconds)
    if result.errors:
        print(f"    ({result.errors} errors)")
    return result.ttfts if stream else result.latencies


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))] * 1000


def wrk_max(
    url: str, headers: dict[str, str], seconds: int, *, unique: bool = False, **extra: Any
) -> float | None:
    """Closed-loop max throughput; `unique`: every request a different prompt (never a cache hit)."""
    if not shutil.which("wrk"):
        return None
    hdrs = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in headers.items())
    model = headers.get("x-bench-model", "assistant")
    body = _body(1, False, model, **extra).decode()
    script = f'wrk.method = "POST"\nwrk.body = {orjson.dumps(body).decode()}\n{hdrs}'
    if unique:  # a run id and a counter in the prompt: a fresh question every time
        template = _body(0, False, model, **extra).decode().replace("number 0?", f"{time.time_ns()}-%d?")
        script += (
            f"local n = 0\nlocal template = {orjson.dumps(template).decode()}\n"
            "request = function()\n  n = n + 1\n"
            "  return wrk.format(nil, nil, nil, string.format(template, n))\nend\n"
        )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    out = subprocess.run(
        ["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{seconds}s", "-s", f.name, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(f.name)
    for line in out.splitlines():
        if line.strip().startswith("Non-2xx or 3xx responses:"):
            raise RuntimeError(f"wrk against {url}: {line.strip()}")
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    return None


def start_services(args: argparse.Namespace) -> tuple[list[subprocess.Popen[bytes]], int, int]:
    """The simulator on core 1, the gateway (one worker) on core 0."""
    sim_port, gw_port = openloop.free_port(), openloop.free_port()
    py = sys.executable
    sim_cmd = ["taskset", "-c", "1", py, "-m", "loadtest.vllm_sim", "--port", str(sim_port)]
    procs = [subprocess.Popen(sim_cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "bench.yaml"
    config = _config(f"http://127.0.0.1:{sim_port}", args.features, args.redis, args.privacy)
    cfg.write_text(yaml.safe_dump(config))
    gw_cmd = [
        "taskset",
        "-c",
        "0",
        py,
        "-m",
        "proxy.cli",
        "serve",
        "--config",
        str(cfg),
        "--port",
        str(gw_port),
    ]
    with open(tmp / "gw.log", "w") as log:
        procs.append(subprocess.Popen(gw_cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log))
    return procs, sim_port, gw_port


def _report(rate: float, stream: bool, d: list[float], g: list[float]) -> str:
    what = "ttft" if stream else "latency"
    added50, added99 = _pct(g, 50) - _pct(d, 50), _pct(g, 99) - _pct(d, 99)
    return (
        f"  {rate:4.0f} req/s {'stream' if stream else 'non-stream':10s} {what}: "
        f"direct p50 {_pct(d, 50):.2f} ms p99 {_pct(d, 99):.2f} ms | "
        f"gateway p50 {_pct(g, 50):.2f} ms p99 {_pct(g, 99):.2f} ms | "
        f"added p50 {added50:+.2f} ms p99 {added99:+.2f} ms "
        f"(n={len(g)}, mean {statistics.fmean(g) * 1000:.2f} ms)"
    )


async def cpu_per_request(
    via: tuple[str, dict[str, str]], gw_pid: int, seconds: int, rate: float
) -> None:
    """The gateway's own CPU per exact miss and per exact hit at a fixed rate below saturation: a
    steadier ratio than two closed-loop maxima (each run's luck with the scheduler differs)."""
    warmup = 200
    misses = fresh_bodies(str(time.time_ns()), int(rate * seconds) + warmup)
    hits = [_body(1, False, temperature=0)]
    out = {}
    for name, bodies in (("miss", misses), ("hit", hits)):
        before = openloop.cpu_seconds(gw_pid)
        result = await openloop.run(via[0], bodies, via[1], rate, seconds, warmup=warmup)
        sent = len(result.latencies) + result.errors + warmup
        out[name] = (openloop.cpu_seconds(gw_pid) - before) / sent * 1e6
    print(
        f"  gateway CPU per request at {rate:.0f} req/s: miss {out['miss']:.0f} us, hit {out['hit']:.0f} us "
        f"({out['miss'] / out['hit']:.2f}x)"
    )


async def measure(args: argparse.Namespace, sim_port: int, gw_port: int, gw_pid: int) -> None:
    await _wait_http(f"http://127.0.0.1:{sim_port}/health")
    await _wait_http(f"http://127.0.0.1:{gw_port}/healthz")
    direct = (
        f"http://127.0.0.1:{sim_port}/v1/chat/completions",
        {"content-type": "application/json", "x-bench-model": "sim-model"},
    )
    via = (
        f"http://127.0.0.1:{gw_port}/v1/chat/completions",
        {"content-type": "application/json", "authorization": f"Bearer {_token()}"},
    )
    print(f"features={args.features} seconds={args.seconds} (gateway: 1 worker on core 0)")
    for name, (url, hdrs) in (("direct", direct), ("gateway", via)):
        rps = wrk_max(url, hdrs, args.seconds)
        print(f"  max non-stream req/s {name:8s}: {rps if rps is not None else 'n/a (install wrk)'}")
    if args.features == "full":
        # the body above leaves temperature unset (sampled): the cache is bypassed, the backend
        # answers every time. With temperature 0 a fresh prompt is an exact miss (looked up, then
        # stored); the same body again is a cache hit after the first.
        # Alternating rounds: this VM's speed drifts by +-10% over a minute, so one hit run and one
        # miss run can land on different luck; the median of the per-round ratios is steadier.
        rounds = []
        for _ in range(args.rounds):
            miss = wrk_max(via[0], via[1], args.seconds, unique=True, temperature=0)
            hit = wrk_max(via[0], via[1], args.seconds, temperature=0)
            if hit and miss:
                rounds.append((hit, miss))
                print(f"  max non-stream req/s cache hit {hit:7.0f} / miss {miss:7.0f} = {hit / miss:.2f}x")
        if rounds:
            ratios = sorted(h / m for h, m in rounds)
            print(f"  hit / miss: median {statistics.median(ratios):.2f}x over {len(ratios)} rounds "
                  f"(min {ratios[0]:.2f}x, max {ratios[-1]:.2f}x)")
        # well below the miss path's maximum: at saturation requests batch up and cost less each
        slowest = min((m for _, m in rounds), default=1000.0)
        await cpu_per_request(via, gw_pid, args.seconds, rate=min(1000.0, round(0.6 * slowest, -1)))
    for stream in (False, True):
        for rate in args.rates:
            d = await open_loop(direct[0], direct[1], rate, args.seconds, stream)
            g = await open_loop(via[0], via[1], rate, args.seconds, stream)
            print(_report(rate, stream, d, g))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rates", type=float, nargs="+", default=[200, 500])
    parser.add_argument("--features", choices=["core", "auth", "policies", "full"], default="core")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=5, help="full: alternating cache miss/hit runs")
    parser.add_argument("--privacy", choices=["pseudonymize", "off"], default="pseudonymize",
                        help="policies/full: the personal-data stage's input action")
    args = parser.parse_args()
    procs, sim_port, gw_port = start_services(args)
    redis_cores = _pin_redis(args.redis) if args.features in ("auth", "full") else None
    try:
        os.sched_setaffinity(0, {1})  # the load generator shares core 1 with the simulator
        uvloop.run(measure(args, sim_port, gw_port, procs[1].pid))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)
        if redis_cores is not None:
            os.sched_setaffinity(redis_cores[0], redis_cores[1])


def _pin_redis(url: str) -> tuple[int, set[int]] | None:
    """Keep a local Redis off the gateway's core for the run (in production it is another host):
    otherwise the scheduler sometimes runs it on core 0 and its CPU is billed to the gateway.
    Returns (pid, previous cores) to restore, or None when Redis is not local or not ours to move."""
    import redis

    try:
        pid = int(redis.Redis.from_url(url).info("server")["process_id"])
        before = os.sched_getaffinity(pid)
        os.sched_setaffinity(pid, {1})
    except (redis.RedisError, OSError, KeyError, ValueError) as exc:
        print(f"  (Redis not pinned to core 1: {exc!r})")
        return None
    return pid, before


if __name__ == "__main__":
    main()
