"""The web console in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven
by Selenium, against a real gateway process, vLLM simulators and the real Redis.

Waits are explicit DOM conditions (WebDriverWait), never sleeps. The fleet page polls every 2 s and
the gateway probes its backends every 0.2 s, so a stopped simulator shows within a few seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import redis
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from loadtest.vllm_sim import SimulatorThread
from tests.conftest import ROOT, SECRET, GatewayProcess, gateway_config

REDIS_URL = "redis://127.0.0.1:6379/0"
RUN = uuid.uuid4().hex[:10]
PREFIX = f"test-console-{RUN}"
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_S = 20


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, SimulatorThread]]:
    started = {name: SimulatorThread(ttft_ms=20).start() for name in ("gpu-a", "gpu-b", "spare")}
    yield started
    for s in started.values():
        s.stop()


@pytest.fixture(scope="module")
def gw(sims: dict[str, SimulatorThread], module_tmp: Path) -> Iterator[GatewayProcess]:
    def backend(name: str) -> dict[str, Any]:
        return {"type": "vllm", "url": sims[name].url, "model": "sim-model", "health_interval_s": 0.2}

    variants = [
        {"name": "control", "weight": 50, "backends": ["gpu-a", "gpu-b"]},
        {"name": "candidate", "weight": 50, "backends": ["gpu-b"]},
    ]
    config = gateway_config(
        backends={name: backend(name) for name in sims},
        models={
            "assistant": {"variants": variants},
            "spare": {"variants": [{"name": "only", "weight": 1, "backends": ["spare"]}]},
        },
        redis_url=REDIS_URL,
        observability={"log_format": "json", "ab_prefix": PREFIX, "ab_flush_s": 0.2},
    )
    proc = GatewayProcess(config, module_tmp).start()
    yield proc
    proc.stop()
    with redis.Redis.from_url(REDIS_URL) as r:
        for key in r.scan_iter(f"{PREFIX}:*"):
            r.delete(key)


def token(gw: GatewayProcess, sub: str, **claims: Any) -> str:
    now = int(time.time())
    auth = gw.config["auth"]
    payload = {"sub": sub, "iat": now, "exp": now + 3600, "aud": auth["audience"], "iss": auth["issuer"], **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    if not (shutil.which(CHROMIUM) and shutil.which(DRIVER)):
        pytest.fail("the console's browser tests need Debian's chromium and chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def wait(browser: webdriver.Chrome) -> WebDriverWait[webdriver.Chrome]:
    return WebDriverWait(browser, WAIT_S)


def sign_in(browser: webdriver.Chrome, gw: GatewayProcess, jwt_token: str, view: str = "playground") -> None:
    browser.get(f"{gw.url}/console#{view}")
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    field = wait(browser).until(ec.visibility_of_element_located((By.ID, "login-token")))
    field.send_keys(jwt_token)
    browser.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()


def field(el: WebElement, name: str) -> str:
    return el.find_element(By.CSS_SELECTOR, f'[data-field="{name}"]').text


def test_data_needs_an_admin_token_and_the_page_says_so(gw: GatewayProcess, browser: webdriver.Chrome) -> None:
    page = httpx.get(f"{gw.url}/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    admin = {"authorization": f"Bearer {token(gw, 'root', admin=True)}"}
    user = {"authorization": f"Bearer {token(gw, 'alice')}"}
    for path in ("/console/api/fleet", "/console/api/experiments?since=1h", "/console/api/models"):
        none = httpx.get(gw.url + path)
        assert none.status_code == 401 and none.json()["error"]["code"] == "invalid_api_key", path
        refused = httpx.get(gw.url + path, headers=user)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required", path
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
        assert httpx.get(gw.url + path, headers=admin).status_code == 200, path
    bad = httpx.get(f"{gw.url}/console/api/experiments?since=forever", headers=admin)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "since"

    sign_in(browser, gw, token(gw, "alice", admin="yes"))  # only the JSON value true makes an admin
    message = wait(browser).until(ec.visibility_of_element_located((By.ID, "login-error")))
    wait(browser).until(lambda _: "403" in message.text)
    assert "admin" in message.text and browser.find_element(By.ID, "nav").get_attribute("hidden") is not None


def send(browser: webdriver.Chrome, prompt: str) -> WebElement:
    count = len(browser.find_elements(By.CSS_SELECTOR, "#pg-log .turn.assistant"))
    box = browser.find_element(By.ID, "pg-prompt")
    box.send_keys(prompt)
    browser.find_element(By.ID, "pg-send").click()
    turn = (By.CSS_SELECTOR, f"#pg-log .turn.assistant:nth-of-type({2 * (count + 1)})[data-done]")
    return wait(browser).until(ec.presence_of_element_located(turn))


def test_playground_streams_an_answer_with_its_metadata(gw: GatewayProcess, browser: webdriver.Chrome) -> None:
    sign_in(browser, gw, token(gw, f"console-{RUN}", admin=True))
    wait(browser).until(lambda b: len(Select(b.find_element(By.ID, "pg-model")).options) == 2)
    Select(browser.find_element(By.ID, "pg-model")).select_by_value("assistant")
    prompt = f"Tell me about sailing {RUN}"

    first = send(browser, prompt)
    assert first.get_attribute("data-done") == "ok"
    answer = first.find_element(By.CLASS_NAME, "bubble").text
    assert answer.startswith(f"Simulated answer to: Tell me about sailing {RUN}")
    assert field(first, "variant") in {"control", "candidate"}
    assert field(first, "backend") in {"gpu-a", "gpu-b"} and field(first, "cache") == "miss"
    assert field(first, "ttft").endswith(" ms") and int(field(first, "ttft").split()[0]) >= 20
    prompt_tokens, completion_tokens = field(first, "tokens").replace(" in / ", " ").split()[:2]
    assert int(prompt_tokens) > 0 and completion_tokens == "16"  # the simulator's reply length

    again = first
    for _ in range(5):  # the same first turn again: served from the cache once the answer is stored
        browser.find_element(By.ID, "pg-new").click()  # (stored right after the response, off its path)
        again = send(browser, prompt)
        if field(again, "cache") == "hit":
            break
    assert field(again, "cache") == "hit" and field(again, "backend") == "cache"
    assert again.find_element(By.CLASS_NAME, "bubble").text == answer

    browser.find_element(By.ID, "pg-new").click()
    browser.find_element(By.ID, "pg-nocache").click()  # x-gateway-cache: no-cache: not read
    fresh = send(browser, prompt)
    assert field(fresh, "cache") == "bypass" and field(fresh, "backend") in {"gpu-a", "gpu-b"}


def test_fleet_shows_a_stopped_backend_go_unhealthy(
    gw: GatewayProcess, browser: webdriver.Chrome, sims: dict[str, SimulatorThread]
) -> None:
    sign_in(browser, gw, token(gw, f"console-{RUN}", admin=True), view="fleet")
    health = (By.CSS_SELECTOR, 'tr[data-backend="spare"] [data-field="health"]')
    wait(browser).until(ec.text_to_be_present_in_element(health, "healthy"))
    assert browser.find_element(*health).text.startswith("healthy")
    rows = browser.find_elements(By.CSS_SELECTOR, "#fleet-backends tbody tr")
    assert [r.get_attribute("data-backend") for r in rows] == ["gpu-a", "gpu-b", "spare"]

    sims["spare"].stop()
    wait(browser).until(ec.text_to_be_present_in_element(health, "unhealthy"))
    status = browser.find_element(By.ID, "fleet-status")
    wait(browser).until(lambda _: status.get_attribute("data-status") == "degraded")
    assert "model spare: no usable backend" in browser.find_element(By.ID, "fleet-degraded").text


def ab_report(gw: GatewayProcess, since: str) -> dict[str, Any]:
    config = gw.workdir / f"gateway-{gw.port}.yaml"
    argv = [sys.executable, "-m", "proxy.cli", "ab-report", "--config", str(config), "--since", since, "--json"]
    out = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    return dict(json.loads(out.stdout))


def requests_seen(gw: GatewayProcess) -> int:
    headers = {"authorization": f"Bearer {token(gw, 'root', admin=True)}"}
    doc = httpx.get(f"{gw.url}/console/api/experiments?since=1h&model=assistant", headers=headers).json()
    return sum(v["requests"] for v in doc["experiments"]["assistant"]["variants"].values())


def chart_rows(browser: webdriver.Chrome, model: str) -> dict[tuple[str, str], dict[str, str]]:
    """(variant, metric) -> the data-* numbers of each chart row of one experiment."""
    script = """
      return [...document.querySelectorAll(`article[data-model="${arguments[0]}"] svg g.row`)]
        .map((g) => Object.assign({}, g.dataset));"""
    rows = browser.execute_script(script, model)
    return {(r["variant"], r["metric"]): r for r in rows}


def test_experiment_charts_match_ab_report_for_the_same_window(
    gw: GatewayProcess, browser: webdriver.Chrome
) -> None:
    before = requests_seen(gw)
    for i in range(24):
        client = gw.client(f"ab-{RUN}-{i}")
        reply = client.chat.completions.create(  # half streamed: those have a time to first token
            model="assistant", messages=[{"role": "user", "content": f"hello there {i}"}], max_tokens=32,
            stream=i % 2 == 0,
        )
        if i % 2 == 0:
            assert "".join(c.choices[0].delta.content or "" for c in reply if c.choices)
    blocked = httpx.post(f"{gw.url}/v1/chat/completions", headers=gw.headers(f"ab-{RUN}-0"),
                         json={"model": "assistant", "messages": [{"role": "user", "content": "shit"}]})
    assert blocked.status_code == 400
    deadline = time.monotonic() + WAIT_S  # every request recorded (a stream is, once its last byte is out)
    while requests_seen(gw) < before + 25 and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for the condition, not timing anything
    assert requests_seen(gw) == before + 25

    sign_in(browser, gw, token(gw, f"console-{RUN}", admin=True), view="experiments")
    Select(wait(browser).until(ec.element_to_be_clickable((By.ID, "ex-since")))).select_by_value("1h")
    wait(browser).until(lambda b: len(chart_rows(b, "assistant")) == 16)  # 2 variants x 8 charts
    shown = chart_rows(browser, "assistant")
    report = ab_report(gw, "1h")
    assert report["window_s"] == 3600
    assert browser.find_element(By.ID, "ex-list").get_attribute("data-window-s") == "3600"
    variants = report["experiments"]["assistant"]["variants"]
    assert sum(v["requests"] for v in variants.values()) >= 25 and all(v["requests"] for v in variants.values())
    for name, stats in variants.items():
        for metric in ("error_rate", "block_rate", "cache_hit_rate", "disconnect_rate"):
            row, entry = shown[(name, metric)], stats[metric]
            assert float(row["rate"]) == entry["rate"] and int(row["count"]) == entry["count"], (name, metric)
            assert [float(row["low"]), float(row["high"])] == entry["ci"], (name, metric)
            assert ("p" in row) == (entry.get("p") is not None) and float(row.get("p", 0)) == (entry.get("p") or 0)
        for metric in ("tokens_per_s", "feedback"):
            row, entry = shown[(name, metric)], stats[metric]
            assert int(row["n"]) == entry["n"] and (entry["mean"] is None or float(row["mean"]) == entry["mean"])
            assert entry["ci"] is None or [float(row["low"]), float(row["high"])] == entry["ci"]
        for metric in ("ttft", "latency"):
            row, entry = shown[(name, metric)], stats[metric]
            assert int(row["n"]) == entry["n"] > 0, (name, metric)
            assert float(row["p50"]) == entry["p50"][0] and float(row["p95"]) == entry["p95"][0]
    verdicts = browser.find_element(By.CSS_SELECTOR, 'article[data-model="assistant"] .verdicts').text
    assert "candidate's error rate" in verdicts and "control's" in verdicts
