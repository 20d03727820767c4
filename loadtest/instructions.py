"""Instructions the gateway executes per cache hit and per cache miss, counted by valgrind's callgrind
(prints figures). The gateway is configured as `bench.py --features full` (JWT, limits and cache in
Redis, the shipped word lists, a zero-delay vLLM simulator behind it).

Wall-clock throughput on a shared VM drifts by +-10% within a minute, which hides a change worth a
few percent; an instruction count does not drift (the same code and inputs give the same count to
within ~0.1%). It leaves out what the kernel does (sockets, the log write) and memory stalls, so it
complements bench.py rather than replacing it. The gateway runs ~50x slower under valgrind: requests
are sent at a low fixed rate, and start-up takes a minute or two.

    .venv/bin/python -m loadtest.instructions [--requests 400] [--rounds 3] [--redis URL]

Needs valgrind (Debian package `valgrind`). Each round counts `--requests` hits (one stored prompt)
and as many misses (a new prompt each, exact cache on, temperature 0); the lowest count per kind
over the rounds is reported (background work - the A/B flush, backend probes - only adds).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop
import yaml

from loadtest import openloop
from loadtest.bench import _body, _config, _token, _wait_http, fresh_bodies


def _total(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


class Counted:
    """The gateway under callgrind, counting from start-up; `measure` zeroes, runs, dumps."""

    def __init__(self, cfg: Path, port: int, out: Path) -> None:
        self.out = out
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        cmd += [sys.executable, "-m", "proxy.cli", "serve", "--config", str(cfg), "--port", str(port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.dumps = 0

    def _control(self, *args: str) -> None:
        subprocess.run(["callgrind_control", *args, str(self.proc.pid)], check=True, capture_output=True)

    async def measure(self, url: str, bodies: list[bytes], headers: dict[str, str], n: int) -> float:
        """Instructions per request over `n` requests sent in 10 s (a rate it keeps up with)."""
        self._control("--zero")
        result = await openloop.run(url, bodies, headers, n / 10, 10, warmup=0)
        self.dumps += 1
        self._control(f"--dump=m{self.dumps}")
        await asyncio.sleep(0.5)  # the dump is written asynchronously
        dump = max(self.out.parent.glob(self.out.name + "*"), key=os.path.getmtime)
        done = len(result.latencies) + result.errors
        if result.errors:  # a failed request cost instructions too; counted, but say so
            print(f"  ({result.errors} of {done} requests failed)", flush=True)
        return _total(dump) / done


async def measure(args: argparse.Namespace, gateway: Counted, sim_port: int, gw_port: int) -> None:
    await _wait_http(f"http://127.0.0.1:{sim_port}/health")
    await _wait_http(f"http://127.0.0.1:{gw_port}/healthz", 600)
    url = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
    headers = {"content-type": "application/json", "authorization": f"Bearer {_token()}"}
    run = time.time_ns()
    hit = [_body(1, False, temperature=0)]
    await openloop.run(url, hit, headers, 20, 10, warmup=0)  # stores the hit; code paths warmed up
    await openloop.run(url, fresh_bodies(f"{run}-warm", 200), headers, 20, 10, warmup=0)
    counts: dict[str, list[float]] = {"hit": [], "miss": []}
    for r in range(args.rounds):
        counts["hit"].append(await gateway.measure(url, hit, headers, args.requests))
        misses = fresh_bodies(f"{run}-{r}", args.requests)
        counts["miss"].append(await gateway.measure(url, misses, headers, args.requests))
        print(f"  round {r}: hit {counts['hit'][-1] / 1e3:,.0f}k  miss {counts['miss'][-1] / 1e3:,.0f}k "
              "instructions per request", flush=True)
    hit_i, miss_i = min(counts["hit"]), min(counts["miss"])
    print(f"instructions per request (lowest of {args.rounds} rounds of {args.requests}): "
          f"hit {hit_i / 1e3:,.0f}k, miss {miss_i / 1e3:,.0f}k, miss/hit {miss_i / hit_i:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("valgrind is not installed (apt-get install valgrind)")
    sim_port, gw_port = openloop.free_port(), openloop.free_port()
    tmp = Path(tempfile.mkdtemp())
    cfg = tmp / "gateway.yaml"
    cfg.write_text(yaml.safe_dump(_config(f"http://127.0.0.1:{sim_port}", "full", args.redis)))
    sim = subprocess.Popen(
        [sys.executable, "-m", "loadtest.vllm_sim", "--port", str(sim_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    gateway = Counted(cfg, gw_port, tmp / "callgrind.out")
    print("features=full under callgrind (start-up takes a minute or two)", flush=True)
    try:
        uvloop.run(measure(args, gateway, sim_port, gw_port))
    finally:
        for proc in (gateway.proc, sim):
            proc.terminate()
        for proc in (gateway.proc, sim):
            proc.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
