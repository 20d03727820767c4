"""The routing benchmark's processes: GPU-mode simulator replicas and a gateway per routing policy
(each a child process with its log), its JWTs, and the replicas' vLLM counters.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml

from loadtest.routing_trace import Workload

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-only-secret-0123456789abcdef0123456789abcdef"
MODEL = "assistant"
POLICIES = {
    "random": {"policy": "random"},
    "least_loaded": {"policy": "least_loaded"},
    "affinity_noguard": {"policy": "affinity", "load_guard": False},
    "affinity": {"policy": "affinity", "load_guard": True},
}
# H100 calibration (loadtest/SIM_GPU.md) before scaling
KV_TOKENS, PREFILL_TOK_S, STEP_MS, STEP_MS_PER_SEQ, BATCHED_TOKENS = 400_000, 20_000.0, 7.0, 0.111, 8192


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child process with its log in `tmp`, ready once `health` answers 200."""

    def __init__(self, name: str, argv: list[str], tmp: Path, health: str) -> None:
        self.name, self.health = name, health
        self.log = tmp / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited:\n{self.log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(health, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{name} did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@dataclass
class Replica:
    proc: Proc
    url: str
    admin: str


def start_replicas(args: argparse.Namespace, tmp: Path) -> list[Replica]:
    k, s = args.token_scale, args.time_scale
    out = []
    for i in range(args.replicas):
        port, admin = free_port(), free_port()
        argv = [
            sys.executable,
            "-m",
            "loadtest.vllm_sim",
            "--port",
            str(port),
            "--admin-port",
            str(admin),
            "--mode",
            "gpu",
            "--max-model-len",
            "131072",
            "--max-num-seqs",
            "1024",
            "--reply-tokens",
            str(args.reply_tokens),
            "--gpu-kv-blocks",
            str(int(KV_TOKENS / k / 16)),
            "--gpu-max-batched-tokens",
            str(max(16, int(BATCHED_TOKENS / k))),
            "--gpu-prefill-tok-s",
            str(PREFILL_TOK_S / k / s),
            "--gpu-step-ms",
            str(STEP_MS * s),
            "--gpu-step-ms-per-seq",
            str(STEP_MS_PER_SEQ * s),
        ]
        url = f"http://127.0.0.1:{port}"
        out.append(Replica(Proc(f"sim{i}", argv, tmp, url + "/health"), url, f"http://127.0.0.1:{admin}"))
    return out


def start_gateway(
    policy: str, replicas: list[Replica], args: argparse.Namespace, tmp: Path
) -> tuple[Proc, str]:
    backends = {
        f"gpu{i}": {
            "type": "vllm",
            "url": r.url,
            "model": "sim-model",
            "max_concurrency": 4096,
            "first_token_timeout_s": 120.0,
            "health_interval_s": 1.0,  # fresh vLLM gauges for the load guard, as the README advises
        }
        for i, r in enumerate(replicas)
    }
    config = {
        "server": {"state_dir": str(tmp / "state"), "workers": args.gateway_workers},
        "auth": {"algorithms": ["HS256"], "secret": SECRET, "audience": "llm-gateway", "issuer": "bench"},
        "limits": {"tiers": {"default": {"requests_per_minute": 10**8, "tokens_per_minute": 10**12}}},
        "cache": {"enabled": False},
        "observability": {"log_level": "warning", "log_format": "json"},
        "backends": backends,
        "models": {MODEL: {"variants": [{"name": "main", "weight": 1, "backends": list(backends)}]}},
        "routing": {**POLICIES[policy], **(args.routing if POLICIES[policy]["policy"] == "affinity" else {})},
    }
    path = tmp / f"gateway-{policy}.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path), "--port", str(port)]
    return Proc(f"gateway-{policy}", argv, tmp, url + "/healthz"), url


def mint_tokens(workload: Workload) -> dict[str, str]:
    from proxy.auth.authenticator import mint_token
    from proxy.settings import AuthSettings

    auth = AuthSettings(algorithms=["HS256"], secret=SECRET, audience="llm-gateway", issuer="bench")
    return {
        f"t{t}-u{u}": mint_token(
            key=SECRET,
            algorithm="HS256",
            sub=f"t{t}-u{u}",
            tenant=f"tenant{t}",
            tier=None,
            models=None,
            ttl_s=86400,
            audience="llm-gateway",
            issuer="bench",
            settings=auth,
        )
        for t in range(workload.tenants)
        for u in range(workload.users_per_tenant)
    }


_METRIC = re.compile(
    r"^vllm:(prefix_cache_queries_total|prefix_cache_hits_total|request_success_total)\{[^}]*\} (\S+)$", re.M
)


def scrape(replicas: list[Replica]) -> list[dict[str, float]]:
    out = []
    for r in replicas:
        sums: dict[str, float] = {}
        for name, value in _METRIC.findall(httpx.get(r.url + "/metrics", timeout=10).text):
            sums[name] = sums.get(name, 0.0) + float(value)
        out.append(sums)
    return out
