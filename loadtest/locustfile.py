"""Locust scenarios for llm-gateway: many users, each with its own JWT, realistic zh/en prompts.

    locust -f loadtest/locustfile.py --headless -u 200 -r 100 -t 60s --host http://127.0.0.1:8300 \
        --per-user-rps 1 --min-rps 190 --max-failure-ratio 0 --max-p99-ms 1000

(`python -m loadtest.run_load` starts the simulator and the gateway and runs this for you.)

Every user mints its own token (secret: --jwt-secret / LOADTEST_JWT_SECRET), alternating between
the tenants of --tenants, with the tier claim --tier. Each task sends one chat completion:
  kind  fresh | repeat (exact-cache hit) | paraphrase (semantic-cache hit) | listed (a word from
        config/words/*.txt: the input policy answers 400 content_filter, which counts as success)
  mode  stream (share --stream-share) or not
Entries in Locust's statistics:
  chat, chat cached, chat semantic  non-stream, answered by a backend / the exact / the semantic cache
  stream ttft[ cached| semantic]    time to the first content chunk of a stream
  stream full[ cached| semantic]    the whole stream, to `data: [DONE]`
  blocked                           listed-word prompts refused with 400 content_filter
  rejected                          429 / 503 answers (failures; their latency shows overload is quick)
Requests/s counts HTTP requests, so the ttft entries are left out of it.

At the end a verdict is printed against --min-rps, --max-failure-ratio, --max-p99-ms,
--max-added-p99-ms (p99 minus the backend's own p99: --floor-ttft-ms / --floor-full-ms /
--floor-chat-ms, computed from the simulator's timings or measured by a run straight at it),
--max-reject-p99-ms and --clean-failures; the exit code is 1 on FAIL. --verdict-json writes it.
"""

from __future__ import annotations

import itertools
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, events, task
from locust.env import Environment

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.prompts import PromptBook
from proxy.auth.authenticator import mint_token
from proxy.settings import AuthSettings

DEFAULT_SECRET = "loadtest-only-secret-0123456789abcdef0123456789"  # = config/gateway.load.yaml
KINDS = ("fresh", "repeat", "paraphrase", "listed")
_next_user = itertools.count()
_RUN_SEED = time.time_ns()  # fresh questions differ between runs (the cache may still hold the last run's)


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def _options(parser: Any) -> None:
    g = parser.add_argument_group("llm-gateway load mix")
    add = g.add_argument
    add("--model", default="assistant", env_var="LOADTEST_MODEL", help="public model name")
    add("--tenants", default="acme,globex", env_var="LOADTEST_TENANTS",
        help="comma-separated; users alternate")
    add("--tier", default="load", env_var="LOADTEST_TIER", help="tier claim in every token")
    add("--jwt-secret", default=DEFAULT_SECRET, env_var="LOADTEST_JWT_SECRET")
    add("--jwt-audience", default="llm-gateway", env_var="LOADTEST_JWT_AUDIENCE")
    add("--jwt-issuer", default="llm-gateway-load", env_var="LOADTEST_JWT_ISSUER")
    add("--per-user-rps", type=float, default=1.0, env_var="LOADTEST_PER_USER_RPS",
        help="task runs per second per user (users x this = the offered rate); 0: no wait")
    add("--stream-share", type=float, default=0.5, env_var="LOADTEST_STREAM_SHARE")
    add("--repeat-share", type=float, default=0.2, env_var="LOADTEST_REPEAT_SHARE")
    add("--paraphrase-share", type=float, default=0.1, env_var="LOADTEST_PARAPHRASE_SHARE")
    add("--listed-share", type=float, default=0.05, env_var="LOADTEST_LISTED_SHARE")
    add("--sampled-share", type=float, default=0.2, env_var="LOADTEST_SAMPLED_SHARE",
        help="share of fresh questions sent with temperature 0.7 (not cacheable)")
    add("--zh-share", type=float, default=0.5, env_var="LOADTEST_ZH_SHARE")
    add("--max-tokens", type=int, default=64, env_var="LOADTEST_MAX_TOKENS")
    add("--request-timeout", type=float, default=30.0, env_var="LOADTEST_REQUEST_TIMEOUT")
    add("--seed", type=int, default=0, env_var="LOADTEST_SEED", help="0: a new sequence every run")
    v = parser.add_argument_group("llm-gateway verdict")
    add = v.add_argument
    add("--min-rps", type=float, default=0.0, help="requests/s after ramp-up (ttft entries excluded)")
    add("--max-failure-ratio", type=float, default=0.0)
    add("--max-p99-ms", type=float, default=0.0, help="bound on every entry's p99 (0: off)")
    add("--max-added-p99-ms", type=float, default=0.0, help="bound on p99 minus the floor (0: off)")
    add("--floor-ttft-ms", type=float, default=0.0, help="the backend's own time to first token")
    add("--floor-full-ms", type=float, default=0.0, help="the backend's own time for a whole stream")
    add("--floor-chat-ms", type=float, default=None, help="... for a non-stream answer (default: full)")
    add("--max-reject-p99-ms", type=float, default=0.0, help="bound on the p99 of 429/503 answers (0: off)")
    add("--clean-failures", action="store_true", help="every failure must be a 429 or 503 (no timeouts)")
    add("--verdict-json", default="", help="also write the verdict here")


_ENVIRONMENTS: list[Environment] = []  # the one Environment of this process (for the quit event)


@events.init.add_listener  # type: ignore[untyped-decorator]
def _init(environment: Environment, **_kw: Any) -> None:
    environment.load_tally = Counter()  # type: ignore[attr-defined]
    _ENVIRONMENTS[:] = [environment]
    o = environment.parsed_options
    if o is not None:
        ChatUser.network_timeout = ChatUser.connection_timeout = o.request_timeout


class ChatUser(FastHttpUser):
    host = "http://127.0.0.1:8300"
    network_timeout = 30.0
    connection_timeout = 30.0
    max_retries = 0

    def wait_time(self) -> float:
        rps: float = _opts(self.environment).per_user_rps
        if rps <= 0:
            return 0.0
        # constant_throughput: start a task every 1/rps seconds whatever the task took (if shorter)
        now = time.perf_counter()
        self._due = max(getattr(self, "_due", now), now - 1 / rps) + 1 / rps
        return max(0.0, self._due - now)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.tally: Counter[str] = self.environment.load_tally
        index = next(_next_user)
        tenants = [t for t in o.tenants.split(",") if t]
        settings = AuthSettings(secret=o.jwt_secret, audience=o.jwt_audience, issuer=o.jwt_issuer)
        token = mint_token(
            key=o.jwt_secret, algorithm="HS256", sub=f"load-user-{index}",
            tenant=tenants[index % len(tenants)] if tenants else None, tier=o.tier or None,
            models=None, ttl_s=24 * 3600, audience=o.jwt_audience, issuer=o.jwt_issuer, settings=settings,
        )
        self.headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        self.rng = random.Random(f"{o.seed or _RUN_SEED}:{index}")
        self.book = PromptBook(self.rng, o.zh_share)
        shares = [o.repeat_share, o.paraphrase_share, o.listed_share]
        self.weights = [max(0.0, 1 - sum(shares)), *shares]
        # Locust starts the users of each ramp-up second together; each begins at its own random
        # phase within its period, so the offered load is a steady rate rather than bursts of them.
        if o.per_user_rps > 0:
            gevent.sleep(self.rng.random() / o.per_user_rps)

    @task
    def chat(self) -> None:
        o = self.environment.parsed_options
        kind = self.rng.choices(KINDS, self.weights)[0]
        stream = self.rng.random() < o.stream_share
        sampled = kind == "fresh" and self.rng.random() < o.sampled_share
        body: dict[str, Any] = {
            "model": o.model,
            "messages": [{"role": "user", "content": getattr(self.book, kind)()}],
            "max_tokens": o.max_tokens,
            "temperature": 0.7 if sampled else 0,
        }
        if stream:
            body["stream"] = True
            if self.rng.random() < 0.5:
                body["stream_options"] = {"include_usage": True}
        self.tally[f"sent {kind}"] += 1
        start = time.perf_counter()
        resp = self.client.request(
            "POST", "/v1/chat/completions", data=json.dumps(body, ensure_ascii=False).encode(),  # type: ignore[arg-type]
            headers=self.headers, stream=stream, catch_response=True, name="chat",
        )
        mode = "stream" if stream else "chat"
        error = resp.request_meta.get("exception") if resp.status_code == 0 else None
        if error is not None:
            return self._fail(mode, start, error, _why(error, "connection"))
        headers: Any = resp.headers or {}
        cache, variant = headers.get("x-gateway-cache", "?"), headers.get("x-gateway-variant", "?")
        status = resp.status_code
        if status != 200:
            return self._refused(kind, mode, start, status, resp.content or b"")
        self.tally[f"{kind} cache {cache}"] += 1
        self.tally[f"variant {variant}"] += 1
        cached = {"hit": " cached", "semantic-hit": " semantic"}.get(cache, "")
        if kind == "listed":
            unblocked = AssertionError("listed word was not blocked")
            return self._fail(mode + cached, start, unblocked, "unblocked")
        if stream:
            return self._read_stream(resp, start, cached)
        content = resp.content or b""
        ok = b'"choices"' in content and b'"message"' in content
        exc = None if ok else AssertionError(f"not a completion: {content[:120]!r}")
        self._fire("POST", "chat" + cached, start, len(content), exc, "bad body")

    def _read_stream(self, resp: Any, start: float, cached: str) -> None:
        raw, ttft, size, done = resp._response, None, 0, False
        error: BaseException | None = None
        try:
            while True:
                line = raw.readline(b"\n")
                if not line:
                    break
                size += len(line)
                if not line.startswith(b"data: "):
                    continue
                data = line[6:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                if data.startswith(b'{"error"'):
                    error = AssertionError(f"SSE error frame: {data[:160]!r}")
                    break
                if ttft is None and _has_content(data):
                    ttft = time.perf_counter()
                    self._fire("SSE", "stream ttft" + cached, start, 0, None, "", end=ttft)
        except Exception as exc:  # a timeout or a reset in the middle of the stream
            error = exc
        try:  # drain to the end (the connection goes back to the pool) or close an unfinished one
            raw.read() if done else raw.release()
        except Exception:
            raw.release()
        if error is None and not done:
            error = AssertionError("stream ended without data: [DONE]")
        if error is None and ttft is None:
            error = AssertionError("stream had no content")
        why = _why(error, "stream")
        self._fire("POST", "stream full" + cached, start, size, error, why)

    def _refused(self, kind: str, mode: str, start: float, status: int, content: bytes) -> None:
        code = _error_code(content)
        if status == 400 and code == "content_filter":
            self.tally[f"{kind} blocked"] += 1
            exc = None if kind == "listed" else AssertionError(f"{kind} prompt was blocked")
            return self._fire("POST", "blocked", start, len(content), exc, "false block")
        if status in (429, 503):
            exc = AssertionError(f"HTTP {status} {code}")
            return self._fire("POST", "rejected", start, len(content), exc, f"http {status}")
        exc = AssertionError(f"HTTP {status} {code}")
        self._fire("POST", mode, start, len(content), exc, f"http {status}")

    def _fail(self, name: str, start: float, exc: BaseException, why: str) -> None:
        if name.startswith("stream") and not name.startswith("stream full"):
            name = "stream full" + name.removeprefix("stream")
        self._fire("POST", name, start, 0, exc, why)

    def _fire(self, rtype: str, name: str, start: float, size: int, exc: BaseException | None,
              why: str, end: float | None = None) -> None:
        if exc is not None:
            self.tally[f"failure {why}"] += 1
        self.environment.events.request.fire(
            request_type=rtype, name=name, response_time=((end or time.perf_counter()) - start) * 1000,
            response_length=size, exception=exc, context={},
        )


def _opts(environment: Environment) -> Any:
    """The parsed command line (Locust's options plus the ones added above)."""
    return environment.parsed_options


def _why(error: BaseException | None, default: str) -> str:
    return "timeout" if error is not None and "imeout" in type(error).__name__ else default


def _has_content(data: bytes) -> bool:
    i = data.find(b'"content":"')
    return i >= 0 and data[i + 11 : i + 12] != b'"'


def _error_code(content: bytes) -> str:
    try:
        return str(json.loads(content)["error"].get("code") or "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return "?"


# ---- verdict ------------------------------------------------------------------------------------


def _floor(name: str, o: Any) -> float:
    if name.endswith(("cached", "semantic")) or name in ("blocked", "rejected"):
        return 0.0
    if name.startswith("stream ttft"):
        return float(o.floor_ttft_ms)
    if name.startswith("chat") and o.floor_chat_ms is not None:
        return float(o.floor_chat_ms)
    return float(o.floor_full_ms)


def verdict(environment: Environment) -> dict[str, Any]:
    o, stats = _opts(environment), environment.stats
    tally: Counter[str] = getattr(environment, "load_tally", None) or Counter()
    seconds = max(1e-9, (stats.total.last_request_timestamp or 0) - stats.total.start_time)
    entries = sorted(stats.entries.values(), key=lambda e: e.name)
    http = [e for e in entries if not e.name.startswith("stream ttft")]
    requests = sum(e.num_requests for e in http)
    failures = sum(e.num_failures for e in http)
    ok = sum(e.num_requests - e.num_failures for e in http)
    generated = sum(e.num_requests - e.num_failures for e in http if e.name in ("chat", "stream full"))
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    for e in entries:
        p50, p99 = e.get_response_time_percentile(0.5), e.get_response_time_percentile(0.99)
        added = p99 - _floor(e.name, o) if e.num_requests else 0.0
        rows.append({"name": e.name, "requests": e.num_requests, "failures": e.num_failures,
                     "p50_ms": p50, "p99_ms": p99, "added_p99_ms": added})
    rps, ratio = requests / seconds, failures / max(1, requests)

    def check(name: str, passed: bool, detail: str) -> None:
        checks.append({"check": name, "pass": bool(passed), "detail": detail})

    check("min rps", rps >= o.min_rps, f"{rps:.1f} req/s >= {o.min_rps:g}")
    check("failure ratio", ratio <= o.max_failure_ratio, f"{ratio:.4f} <= {o.max_failure_ratio:g}")
    served = [r for r in rows if r["name"] != "rejected" and r["requests"]]
    none: dict[str, Any] = {"name": "-", "p99_ms": 0.0, "added_p99_ms": 0.0}
    if o.max_p99_ms:
        worst = max(served, key=lambda r: r["p99_ms"], default=none)
        check("p99", worst["p99_ms"] <= o.max_p99_ms,
              f"worst {worst['name']} {worst['p99_ms']:.0f} ms <= {o.max_p99_ms:g}")
    if o.max_added_p99_ms:
        worst = max(served, key=lambda r: r["added_p99_ms"], default=none)
        check("added p99", worst["added_p99_ms"] <= o.max_added_p99_ms,
              f"worst {worst['name']} {worst['added_p99_ms']:+.0f} ms <= {o.max_added_p99_ms:g}")
    rejected = next((r for r in rows if r["name"] == "rejected"), None)
    if o.max_reject_p99_ms and rejected:
        check("429/503 p99", rejected["p99_ms"] <= o.max_reject_p99_ms,
              f"{rejected['p99_ms']:.0f} ms <= {o.max_reject_p99_ms:g}")
    if o.clean_failures:
        unclean = {k: v for k, v in tally.items() if k.startswith("failure ") and k not in
                   ("failure http 429", "failure http 503")}
        check("clean failures", not unclean, "only 429/503" if not unclean else json.dumps(unclean))
    return {
        "pass": all(c["pass"] for c in checks), "seconds": round(seconds, 1), "requests": requests,
        "failures": failures, "rps": round(rps, 1), "ok_rps": round(ok / seconds, 1),
        "model_rps": round(generated / seconds, 2),
        "failure_ratio": ratio, "entries": rows, "checks": checks, "tally": dict(sorted(tally.items())),
    }


def format_verdict(v: dict[str, Any]) -> str:
    lines = [f"=== llm-gateway load verdict: {'PASS' if v['pass'] else 'FAIL'} ===",
             f"{v['requests']} requests in {v['seconds']} s: {v['rps']} req/s "
             f"({v['ok_rps']} req/s answered, {v['model_rps']} req/s generated by a model), "
             f"failures {v['failures']} ({v['failure_ratio']:.2%})",
             f"{'entry':22s} {'requests':>8s} {'fail':>6s} {'p50 ms':>8s} {'p99 ms':>8s} {'added p99':>10s}"]
    for r in v["entries"]:
        lines.append(f"{r['name']:22s} {r['requests']:8d} {r['failures']:6d} {r['p50_ms']:8.0f} "
                     f"{r['p99_ms']:8.0f} {r['added_p99_ms']:+10.0f}")
    lines.append("mix: " + ", ".join(f"{k}={n}" for k, n in v["tally"].items()))
    lines += [f"[{'PASS' if c['pass'] else 'FAIL'}] {c['check']}: {c['detail']}" for c in v["checks"]]
    return "\n".join(lines)


@events.quitting.add_listener  # type: ignore[untyped-decorator]
def _decide(environment: Environment, **_kw: Any) -> None:
    v = verdict(environment)
    environment.load_verdict = v  # type: ignore[attr-defined]
    if _opts(environment).verdict_json:
        Path(_opts(environment).verdict_json).write_text(json.dumps(v, indent=1))
    environment.process_exit_code = 0 if v["pass"] else 1


@events.quit.add_listener  # type: ignore[untyped-decorator]
def _print(**_kw: Any) -> None:
    """After Locust's own tables, so the verdict is the last thing on the screen."""
    for env in _ENVIRONMENTS:
        if hasattr(env, "load_verdict"):
            print(format_verdict(env.load_verdict), flush=True)
