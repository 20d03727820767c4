"""A newcomer's first minutes, as real processes: `token` before `serve` fails and creates nothing;
`serve` (from another working directory) generates the secret beside its config, says so, and
reports the model load; `token` from a third directory mints a token that server accepts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, SMOLLM, free_port

pytestmark = pytest.mark.model


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "proxy.cli", *args]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)


def _wait_ready(proc: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, "serve exited early"
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # harness polling for a subprocess, not a test's timing
    raise AssertionError("serve did not start")


def test_first_run_serve_then_token_from_elsewhere(tmp_path: Path) -> None:
    folder, serve_cwd, token_cwd = tmp_path / "cfg", tmp_path / "a", tmp_path / "b"
    for d in (folder / "words", serve_cwd, token_cwd):
        d.mkdir(parents=True)
    shutil.copy(ROOT / "config/words/en.txt", folder / "words/en.txt")
    config = {
        "server": {"state_dir": ".state"},
        "auth": {"audience": "llm-gateway", "issuer": "first-run"},
        "cache": {"semantic": {"enabled": False}},
        "policies": {"words": ["words/en.txt"]},
        "backends": {"cpu": SMOLLM},
        "models": {"assistant": {"variants": [{"name": "control", "weight": 1, "backends": ["cpu"]}]}},
    }
    path = folder / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))

    before = _cli(token_cwd, "token", "--config", str(path), "--sub", "alice")
    assert before.returncode == 1 and "no signing secret" in before.stderr and "Traceback" not in before.stderr
    assert not (folder / ".state").exists() and not any(token_cwd.iterdir())

    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path), "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=serve_cwd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}")
        minted = _cli(token_cwd, "token", "--config", str(path), "--sub", "alice")
        assert minted.returncode == 0, minted.stderr
        headers = {"authorization": f"Bearer {minted.stdout.strip()}"}
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers, timeout=10)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "assistant"
    finally:
        proc.terminate()
        proc.wait(15)
    text = log.read_text()
    assert f"Generated a JWT signing secret in {folder / '.state/jwt_secret'}" in text
    loading = next(line for line in text.splitlines() if line.startswith("llama.cpp: loading "))
    assert "MB) for 'cpu'" in loading
    assert any(line.startswith("llama.cpp: ") and " loaded in " in line for line in text.splitlines())
    assert (folder / ".state/jwt_secret").is_file() and not any(serve_cwd.iterdir())
