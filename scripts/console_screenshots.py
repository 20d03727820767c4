"""Takes the console's screenshots in docs/ (console-playground.png, -fleet.png, -experiments.png).

Starts vLLM simulators (GPU-modelling mode, so KV-cache usage and queues are real readings), a
gateway on a free port with an A/B experiment, sends it a few hundred requests (repeats that the
cache answers, streams, a word the input policy blocks, a burst of backend errors on the candidate,
feedback), then drives headless Chromium (Debian's chromium + chromium-driver) through the three
views. No Redis needed: without redis_url the aggregates live in the gateway process.

    python scripts/console_screenshots.py [--out docs] [--requests 300]
"""

from __future__ import annotations

import argparse
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import openai
import yaml
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.vllm_sim import SimulatorThread  # noqa: E402  (after the project root is importable)

SECRET = "console-screenshots-only-" + "0123456789abcdef" * 2
QUESTIONS = [
    "How do I reset my password?", "What are your opening hours?", "Explain prefix caching in vLLM.",
    "Summarise the refund policy.", "Write a haiku about autumn.", "What is a circuit breaker?",
    "How long does shipping take?", "Translate 'good morning' into French.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(sims: dict[str, SimulatorThread], workdir: Path) -> dict[str, Any]:
    def vllm(name: str) -> dict[str, Any]:
        return {"type": "vllm", "url": sims[name].url, "model": "sim-model", "health_interval_s": 0.5}

    words = [str(ROOT / "config" / "words" / "en.txt"), str(ROOT / "config" / "words" / "zh.txt")]
    return {
        "server": {"state_dir": str(workdir / "state")},
        "auth": {"algorithms": ["HS256"], "secret": SECRET, "audience": "llm-gateway"},
        "limits": {"tiers": {"default": {"requests_per_minute": 100000, "tokens_per_minute": 100000000}}},
        "cache": {"semantic": {"enabled": False}},
        "policies": {"words": words, "input": "block", "output": "mask"},
        "observability": {"log_format": "json", "log_level": "warning", "ab_flush_s": 0.5},
        "backends": {name: vllm(name) for name in sims},
        "models": {
            "assistant": {
                "description": "customer-service assistant",
                "feedback_sample": 1,
                "variants": [
                    {"name": "control", "weight": 70, "backends": ["gpu-a", "gpu-c"]},
                    {"name": "candidate", "weight": 30, "backends": ["gpu-b"],
                     "system_prompt": "Answer in two sentences."},
                ],
            },
        },
    }


@contextmanager
def gateway(cfg: dict[str, Any], workdir: Path) -> Iterator[str]:
    port = free_port()
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(cfg))
    argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", str(path), "--port", str(port)]
    with open(workdir / "gateway.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"the gateway did not start; see {workdir / 'gateway.log'}")
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def token(sub: str, **claims: Any) -> str:
    now = int(time.time())
    payload = {"sub": sub, "iat": now, "exp": now + 3600, "aud": "llm-gateway", **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def one_request(url: str, i: int, rng: random.Random) -> None:
    user = f"user-{i % 60}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=token(user), max_retries=0)
    question = "You are shit." if i % 97 == 0 else rng.choice(QUESTIONS)  # blocked by the word list
    try:
        with client:
            reply = client.chat.completions.with_raw_response.create(
                model="assistant", messages=[{"role": "user", "content": question}], temperature=0,
                max_tokens=rng.choice((24, 48, 96)),
            )
            completion = reply.parse()
            if rng.random() < 0.3:  # some users rate the answer (thumbs: -1..1)
                good = 0.55 if reply.headers.get("x-gateway-variant") == "candidate" else 0.7
                score = 1 if rng.random() < good else -1
                httpx.post(f"{url}/v1/feedback", json={"id": completion.id, "score": score},
                           headers={"authorization": f"Bearer {token(user)}"})
    except openai.APIError:
        pass  # blocked prompts and the simulated backend errors are part of the picture


def streams(url: str, n: int) -> None:
    for i in range(n):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=token(f"reader-{i}"), max_retries=0)
        try:
            with client:
                stream = client.chat.completions.create(
                    model="assistant", stream=True, max_tokens=64,
                    messages=[{"role": "user", "content": f"Tell me a short story number {i}."}],
                )
                for _ in stream:
                    pass
        except openai.APIError:
            pass  # the candidate's breaker may still be open after the burst of errors


def traffic(url: str, sims: dict[str, SimulatorThread], total: int) -> None:
    rng = random.Random(20)
    with ThreadPoolExecutor(8) as pool:

        def batch(numbers: range) -> None:
            list(pool.map(lambda i: one_request(url, i, random.Random(rng.random())), numbers))

        half = total // 2
        batch(range(half))
        sims["gpu-b"].configure(fault="status", fault_status=500)  # a burst of errors on the candidate
        batch(range(half, half + 6))
        sims["gpu-b"].configure(fault="none")
        batch(range(half + 6, total))
        pool.submit(streams, url, 40).result()


@contextmanager
def busy(url: str, workers: int = 12) -> Iterator[None]:
    """Long streams in flight while the fleet page is captured: queues, running requests, KV usage."""
    stop = threading.Event()
    context = " ".join(QUESTIONS) * 10

    def loop(k: int) -> None:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=token(f"busy-{k}"), max_retries=0)
        with client:
            while not stop.is_set():
                try:
                    for _ in client.chat.completions.create(
                        model="assistant", stream=True, max_tokens=300,
                        messages=[{"role": "user", "content": f"Request {k}: {context}"}],
                    ):
                        pass
                except openai.APIError:
                    pass

    with ThreadPoolExecutor(workers) as pool:
        for k in range(workers):
            pool.submit(loop, k)
        try:
            yield
        finally:
            stop.set()


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def full_page(driver: webdriver.Chrome, path: Path) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, max(900, int(height) + 20))
    driver.save_screenshot(str(path))
    driver.set_window_size(1280, 900)


PROMPTS = ("How do I reset my password?", "And if I no longer have access to my email?")


def playground(driver: webdriver.Chrome, wait: WebDriverWait[webdriver.Chrome], url: str, out: Path) -> None:
    driver.get(f"{url}/console#playground")
    login = wait.until(ec.visibility_of_element_located((By.ID, "login-token")))
    login.send_keys(token("ops", admin=True))
    driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
    wait.until(lambda d: len(Select(d.find_element(By.ID, "pg-model")).options) > 0)
    for n, prompt in enumerate(PROMPTS):
        driver.find_element(By.ID, "pg-prompt").send_keys(prompt)
        driver.find_element(By.ID, "pg-send").click()
        answer = (By.CSS_SELECTOR, f"#pg-log li:nth-child({2 * n + 2})[data-done]")
        wait.until(ec.presence_of_element_located(answer))
    driver.save_screenshot(str(out / "console-playground.png"))


def fleet(driver: webdriver.Chrome, wait: WebDriverWait[webdriver.Chrome], url: str, out: Path) -> None:
    with busy(url):
        driver.get(f"{url}/console#fleet")
        down = (By.CSS_SELECTOR, 'tr[data-backend="gpu-c"]')
        wait.until(ec.text_to_be_present_in_element(down, "unhealthy"))
        running = (By.CSS_SELECTOR, 'tr[data-backend="gpu-a"] [data-field="running"]')
        wait.until(lambda d: d.find_element(*running).text not in ("0", "–"))
        full_page(driver, out / "console-fleet.png")


def screenshots(url: str, out: Path) -> None:
    driver = browser()
    wait = WebDriverWait(driver, 30)
    try:
        playground(driver, wait, url, out)
        fleet(driver, wait, url, out)
        driver.get(f"{url}/console#experiments")
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, 'article[data-model="assistant"] svg')))
        full_page(driver, out / "console-experiments.png")
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs"), help="where the PNGs go (default: docs/)")
    parser.add_argument("--requests", type=int, default=300, help="requests sent before the screenshots")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sims = {
        # a small KV cache (2,000 blocks of 16 tokens), so that a few long requests show on its meter
        "gpu-a": SimulatorThread(mode="gpu", gpu_kv_blocks=2000).start(),
        "gpu-b": SimulatorThread(mode="gpu", gpu_kv_blocks=2000, gpu_step_ms=11.0).start(),  # slower
        "gpu-c": SimulatorThread(mode="gpu", gpu_kv_blocks=2000).start(),
    }
    try:
        with tempfile.TemporaryDirectory() as tmp, gateway(config(sims, Path(tmp)), Path(tmp)) as url:
            sims["gpu-c"].stop()  # one replica down: shown unhealthy, and the pool routes around it
            traffic(url, sims, args.requests)
            screenshots(url, out)
    finally:
        for sim in sims.values():
            sim.stop()
    for name in ("playground", "fleet", "experiments"):
        print(out / f"console-{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
