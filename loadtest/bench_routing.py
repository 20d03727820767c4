"""Trace-driven routing benchmark: multi-turn tenant conversations at rising Poisson rates into 4
GPU-modelling simulator replicas behind the real gateway, once per routing policy; prints TTFT,
tokens/s, prefix-cache hit rate (from the replicas' /metrics), errors and the sustained rate.

    .venv/bin/python -m loadtest.bench_routing            # the default run, about 10 minutes

Figures are compared within one run only. `--token-scale k` divides prompt and KV sizes and the
prefill rate by k (same prefill seconds per prompt, same working set / KV ratio, k x fewer bytes);
`--time-scale s` makes the modelled GPU s x slower and the arrival rates s x lower (every queue
behaves the same; TTFTs are printed divided by s, in H100 seconds). Both keep the issue's ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import yaml

from loadtest.routing_pool import (
    KV_TOKENS,
    MODEL,
    POLICIES,
    PREFILL_TOK_S,
    Replica,
    mint_tokens,
    scrape,
    start_gateway,
    start_replicas,
)
from loadtest.routing_trace import Trace, Window, Workload, drive, prime


@dataclass
class Row:
    policy: str
    rate: float  # H100-equivalent requests/s
    window: Window
    start: float
    hit_rate: float
    shares: list[float]
    scale: float

    @property
    def p50(self) -> float:
        return self.window.ttft(0.5) / self.scale

    @property
    def p90(self) -> float:
        return self.window.ttft(0.9) / self.scale

    @property
    def tok_s(self) -> float:
        return self.window.tokens_per_s(self.start) * self.scale

    def passed(self, threshold: float) -> bool:
        sent = len(self.window.turns) + self.window.no_idle_user
        return self.p90 <= threshold and self.window.errors <= 0.01 * max(1, sent)

    def line(self) -> str:
        w = self.window
        shares = "/".join(f"{x:.0%}" for x in self.shares)
        return (
            f"{self.policy:<17} {self.rate:>6.1f} {len(w.turns):>6} {w.errors:>6} {self.p50:>7.2f} "
            f"{self.p90:>7.2f} {self.tok_s:>8.0f} {self.hit_rate:>6.1%}  {shares}"
        )


HEADER = (
    f"{'policy':<17} {'req/s':>6} {'sent':>6} {'errors':>6} {'p50 s':>7} {'p90 s':>7} {'tok/s':>8} {'hit':>6}"
    "  share"
)


async def measure(
    url: str, replicas: list[Replica], trace: Trace, policy: str, rate: float, args: argparse.Namespace
) -> Row:
    s = args.time_scale
    before = scrape(replicas)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        window, start = await drive(
            session, url + "/v1/chat/completions", trace, rate / s, args.duration * s, MODEL
        )
    after = scrape(replicas)
    queries = sum(
        a.get("prefix_cache_queries_total", 0) - b.get("prefix_cache_queries_total", 0)
        for a, b in zip(after, before, strict=True)
    )
    hits = sum(
        a.get("prefix_cache_hits_total", 0) - b.get("prefix_cache_hits_total", 0)
        for a, b in zip(after, before, strict=True)
    )
    done = [
        a.get("request_success_total", 0) - b.get("request_success_total", 0)
        for a, b in zip(after, before, strict=True)
    ]
    shares = [d / max(1.0, sum(done)) for d in done]
    return Row(policy, rate, window, start, hits / queries if queries else 0.0, shares, s)


async def prime_all(url: str, trace: Trace) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        failed = await prime(session, url + "/v1/chat/completions", trace, MODEL, parallel=48)
    if failed:
        print(f"  (priming: {failed} turns failed)")


def run_policy(
    policy: str,
    workload: Workload,
    rates: list[float],
    replicas: list[Replica],
    tokens: dict[str, str],
    args: argparse.Namespace,
    tmp: Path,
) -> list[Row]:
    for r in replicas:
        httpx.post(r.admin + "/_sim/reset", timeout=10).raise_for_status()
    gateway, url = start_gateway(policy, replicas, args, tmp)
    rows: list[Row] = []
    try:
        trace = Trace(workload, tokens)
        if workload.shared:
            asyncio.run(prime_all(url, trace))
        if args.warmup > 0:
            warm = argparse.Namespace(**{**vars(args), "duration": args.warmup})
            asyncio.run(measure(url, replicas, trace, policy, rates[0], warm))
        for rate in rates:
            row = asyncio.run(measure(url, replicas, trace, policy, rate, args))
            rows.append(row)
            print(row.line(), flush=True)
            if not row.passed(args.threshold):
                break
    finally:
        gateway.stop()
    return rows


def sustained(rows: list[Row], threshold: float) -> float:
    best = 0.0
    for row in rows:
        if not row.passed(threshold):
            break
        best = row.rate
    return best


def summary(results: dict[str, list[Row]], unique: dict[str, Row], args: argparse.Namespace) -> None:
    th = args.threshold
    print(f"\nhighest rate sustained with p90 TTFT <= {th:g} s and <= 1% errors (H100 req/s):")
    best = {p: sustained(rows, th) for p, rows in results.items()}
    for policy, value in best.items():
        print(f"  {policy:<17} {value:.1f}")
    ll, aff = results.get("least_loaded"), results.get("affinity")
    if ll and aff and best["least_loaded"] > 0:
        target = 0.75 * best["least_loaded"]
        common = [
            r.rate for r in ll if r.rate <= 0.8 * best["least_loaded"] and any(a.rate == r.rate for a in aff)
        ]
        if common:
            ref = min(common, key=lambda x: abs(x - target))
            a = next(r for r in aff if r.rate == ref)
            b = next(r for r in ll if r.rate == ref)
            print(f"at {ref:.1f} req/s ({ref / best['least_loaded']:.0%} of least_loaded's sustained rate):")
            print(
                f"  p90 TTFT least_loaded / affinity = {b.p90:.2f} / {a.p90:.2f} s = "
                f"{b.p90 / a.p90:.1f}x (target >= 3x)"
            )
            print(
                f"  prefix hit rate affinity / least_loaded = {a.hit_rate:.1%} / {b.hit_rate:.1%} = "
                f"{a.hit_rate / max(b.hit_rate, 1e-9):.2f}x (target >= 1.5x)"
            )
        print(
            f"  sustained affinity / least_loaded = {best['affinity'] / best['least_loaded']:.2f}x "
            "(target >= 1.3x)"
        )
    if "least_loaded" in unique and "affinity" in unique:
        a, b = unique["affinity"], unique["least_loaded"]
        print(
            f"no shared prefixes at {a.rate:.1f} req/s: p90 TTFT affinity / least_loaded = "
            f"{a.p90:.2f} / {b.p90:.2f} s ({a.p90 / b.p90 - 1:+.1%}); tokens/s {a.tok_s:.0f} / {b.tok_s:.0f} "
            f"({a.tok_s / b.tok_s - 1:+.1%}) (target: within 5%)"
        )


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench_routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--tenants", type=int, default=150)
    p.add_argument("--users", type=int, default=4, help="users per tenant, one conversation each at a time")
    p.add_argument("--system-tokens", type=int, default=6000, help="per tenant, before --token-scale")
    p.add_argument("--reply-tokens", type=int, default=32)
    p.add_argument("--token-scale", type=float, default=4.0)
    p.add_argument("--time-scale", type=float, default=2.0)
    p.add_argument("--rates", default="8,14,20,26,32,40", help="H100-equivalent requests/s, rising")
    p.add_argument("--duration", type=float, default=7.0, help="H100-equivalent seconds per rate")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds at the first rate before measuring")
    p.add_argument("--threshold", type=float, default=2.0, help="p90 TTFT bound for the sustained rate")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument(
        "--unique-rate",
        type=float,
        default=0.0,
        help="the no-shared-prefix run's rate (0: 75%% of "
        "the prefill-bound capacity; negative: skip the run)",
    )
    p.add_argument("--unique-duration", type=float, default=20.0)
    p.add_argument("--gateway-workers", type=int, default=1)
    p.add_argument(
        "--routing",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a routing setting for the affinity policies (e.g. load_factor=1.25); repeatable",
    )
    args = p.parse_args(argv)
    args.routing = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.routing)}
    return args


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    k = args.token_scale
    workload = Workload(
        args.tenants,
        args.users,
        int(args.system_tokens / k),
        turn_tokens=(max(2, int(20 / k)), max(4, int(60 / k))),
    )
    rates = [float(r) for r in args.rates.split(",")]
    ws = args.tenants * workload.system_tokens
    kv = KV_TOKENS / k
    print(
        f"{args.tenants} tenants x {workload.system_tokens} system tokens = {ws:,} tokens of shared "
        "prefixes; "
        f"KV cache {kv:,.0f} tokens per replica x {args.replicas} = {kv * args.replicas:,.0f} "
        f"(token scale {k:g}, time scale {args.time_scale:g}; TTFT in H100 seconds)"
    )
    tokens = mint_tokens(workload)
    with tempfile.TemporaryDirectory(prefix="bench-routing-") as name:
        tmp = Path(name)
        replicas = start_replicas(args, tmp)
        try:
            print(HEADER)
            results = {
                p: run_policy(p, workload, rates, replicas, tokens, args, tmp)
                for p in args.policies.split(",")
            }
            unique = run_unique(workload, replicas, args, tmp)
        finally:
            for r in replicas:
                r.proc.stop()
    summary(results, unique, args)


def run_unique(
    workload: Workload, replicas: list[Replica], args: argparse.Namespace, tmp: Path
) -> dict[str, Row]:
    if args.unique_rate < 0:
        return {}
    rate = args.unique_rate or 0.75 * args.replicas * PREFILL_TOK_S / args.system_tokens
    uniq = Workload(args.tenants, args.users, workload.system_tokens, workload.turn_tokens, shared=False)
    tokens = mint_tokens(uniq)
    once = argparse.Namespace(
        **{**vars(args), "duration": args.unique_duration, "warmup": 0.0, "threshold": float("inf")}
    )
    print(f"\nno shared prefixes (every request its own {uniq.system_tokens}-token prompt, one turn):")
    out: dict[str, Row] = {}
    for policy in ("least_loaded", "affinity"):
        rows = run_policy(policy, uniq, [rate], replicas, tokens, once, tmp)
        out[policy] = rows[0]
    return out


if __name__ == "__main__":
    main()
