"""Per-request cost of JWT verification and of admit()+settle() against a real Redis.

    python -m loadtest.bench_auth_limits [--redis-url redis://127.0.0.1:6379] [-n 5000] [--no-uvloop]

Prints wall-clock p50/p99 per call and this process's CPU per call (Redis's own CPU excluded).
Figures only; CI times nothing. Uses uvloop when installed, as uvicorn[standard] does.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from proxy.auth.authenticator import Authenticator, Principal, mint_token
from proxy.limits.limiter import RateLimiter
from proxy.redis import SharedRedis
from proxy.settings import AuthSettings, LimitSettings, RedisSettings, TierLimits

USERS = 1000  # admissions spread over this many principals, as real traffic is


async def measure(name: str, n: int, step: Callable[[int], Awaitable[object]]) -> None:
    for i in range(min(n // 10, 500)):  # warm-up: connections, scripts, caches
        await step(i)
    samples = []
    cpu_started = time.process_time()
    for i in range(n):
        started = time.perf_counter_ns()
        await step(i)
        samples.append(time.perf_counter_ns() - started)
    cpu = (time.process_time() - cpu_started) / n * 1e6
    samples.sort()
    p50, p99 = samples[n // 2] / 1000, samples[int(n * 0.99)] / 1000
    print(f"{name:<36} p50 {p50:7.1f} µs  p99 {p99:7.1f} µs  cpu {cpu:6.1f} µs/op  (n={n})")


async def bench_auth(n: int) -> Principal:
    secret = secrets.token_urlsafe(48)
    settings = AuthSettings(algorithms=["HS256"], secret=secret, audience="llm-gateway", issuer="bench")
    auth = Authenticator(settings, secret=secret)
    token = mint_token(
        key=secret, algorithm="HS256", sub="alice", tenant="acme", tier="default", models=["m"],
        ttl_s=3600, audience="llm-gateway", issuer="bench", settings=settings,
    )  # fmt: skip
    header = [f"Bearer {token}"]
    await measure("authenticate() HS256, repeated token", n, lambda _: auth.authenticate(header))
    fresh = [  # a token seen for the first time: the signature is checked
        [f"Bearer {mint_token(key=secret, algorithm='HS256', sub=f'u{i}', tenant=None, tier=None, models=None, ttl_s=3600, audience='llm-gateway', issuer='bench', settings=settings)}"]  # noqa: E501
        for i in range(n + min(n // 10, 500))
    ]
    unseen = iter(fresh)
    await measure("authenticate() HS256, new token", n, lambda _: auth.authenticate(next(unseen)))

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    es_settings = AuthSettings(algorithms=["ES256"], audience="llm-gateway", issuer="bench")
    es_auth = Authenticator(es_settings, public_key=pem.decode())
    es_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    es_token = mint_token(
        key=es_pem, algorithm="ES256", sub="alice", tenant=None, tier=None, models=None,
        ttl_s=3600, audience="llm-gateway", issuer="bench", settings=es_settings,
    )  # fmt: skip
    await measure(
        "authenticate() ES256, repeated token", n, lambda _: es_auth.authenticate([f"Bearer {es_token}"])
    )
    return await auth.authenticate(header)


async def bench_limits(n: int, redis_url: str, label: str) -> None:
    settings = LimitSettings(
        tiers={"default": TierLimits(requests_per_minute=600, tokens_per_minute=10_000_000)},
    )
    prefix = f"bench-rl-{secrets.token_hex(4)}"
    redis = SharedRedis(redis_url, RedisSettings(timeout_s=1.0)) if redis_url else None
    limiter = RateLimiter(settings, redis, key_prefix=prefix)
    await limiter.start()
    principals = [Principal(f"user-{i}", "acme", "default", None, {}) for i in range(USERS)]

    async def admit_settle(i: int) -> None:
        admission = await limiter.admit(principals[i % USERS], 1500)
        await admission.settle(700)

    async def admit_only(i: int) -> None:
        await limiter.admit(principals[(i + 7) % USERS], 0)

    try:
        await measure(f"admit()+settle() {label}", n, admit_settle)
        await measure(f"admit() alone {label}", n, admit_only)
        print(f"  stats: {limiter.stats}")
    finally:
        await limiter.close()
        if redis is not None:
            keys = [k async for k in redis.client.scan_iter(match=f"{prefix}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await redis.client.delete(*keys[i : i + 500])
            await redis.close()


async def main(args: argparse.Namespace) -> None:
    await bench_auth(args.n)
    await bench_limits(args.n, args.redis_url, "(Redis)")
    await bench_limits(args.n, "", "(in-memory)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--no-uvloop", action="store_true")
    args = parser.parse_args()
    if args.no_uvloop:
        asyncio.run(main(args))
    else:
        try:
            import uvloop
        except ImportError:
            asyncio.run(main(args))
        else:
            uvloop.run(main(args))
