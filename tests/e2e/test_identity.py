"""Identity end to end: a real gateway process (HS256 + RS256 keys, real Redis), the vLLM simulator as
its backend, and hostile bearer values. Every refusal must be a 401 in OpenAI's error shape that echoes
nothing the client sent, and must never reach a backend (the simulator records every chat request).

Also: JWKS key rotation against a local JWKS server, the per-token model allow-list, and which routes
need a token at all."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from loadtest.vllm_sim import SimulatorThread
from tests.conftest import SECRET, GatewayProcess, free_port, gateway_config
from tests.jwt_helpers import DROP, b64, public_jwk, with_claims

AUD, ISS = "llm-gateway", "tests"
REDIS_URL = "redis://127.0.0.1:6379/0"
INVALID = "Invalid or expired API key."
MISSING = "Missing API key: send 'Authorization: Bearer <token>'."
CHAT = {"model": "assistant", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}


# -- token crafting (by hand, so that every malformed variant is possible) --------------------------
def seg(obj: Any) -> str:
    return b64(obj if isinstance(obj, bytes) else orjson.dumps(obj))


def hs_token(header: Any, payload: Any, key: bytes = SECRET.encode(), digest: Any = hashlib.sha256) -> str:
    signing = f"{seg(header)}.{seg(payload)}"
    return f"{signing}.{b64(hmac.new(key, signing.encode(), digest).digest())}"


def rs_token(header: Any, payload: Any, key: rsa.RSAPrivateKey) -> str:
    signing = f"{seg(header)}.{seg(payload)}"
    return f"{signing}.{b64(key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256()))}"


def claims(sub: str, /, **over: Any) -> dict[str, Any]:
    now = int(time.time())
    return with_claims({"sub": sub, "iat": now, "exp": now + 600, "aud": AUD, "iss": ISS}, over)


def hs(sub: str, /, **over: Any) -> str:
    return hs_token({"alg": "HS256", "typ": "JWT"}, claims(sub, **over))


def pem(public: Any) -> bytes:
    data: bytes = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


@dataclass(frozen=True)
class Keys:
    gw_rsa: rsa.RSAPrivateKey  # its public half is the main gateway's configured public key
    rogue_rsa: rsa.RSAPrivateKey  # never configured anywhere
    rogue_ec: ec.EllipticCurvePrivateKey
    jwks_a: rsa.RSAPrivateKey  # published by the module's JWKS server as kid "a"
    jwks_b: rsa.RSAPrivateKey  # ... and as kid "b"


@pytest.fixture(scope="module")
def keys() -> Keys:
    def gen() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    return Keys(gen(), gen(), ec.generate_private_key(ec.SECP256R1()), gen(), gen())


# -- a JWKS server (a thread with the stdlib HTTP server) ----------------------------------------
@dataclass
class JwksServer:
    keys: list[dict[str, Any]] = field(default_factory=list)
    hits: int = 0
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def publish(self, *jwks: dict[str, Any]) -> None:
        with self.lock:
            self.keys = list(jwks)


def serve_jwks(state: JwksServer, port: int = 0) -> Callable[[], None]:
    """Serve `state.keys` on 127.0.0.1 from a thread; returns the function that stops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with state.lock:
                state.hits += 1
                body = orjson.dumps({"keys": state.keys})
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="jwks", daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop


# -- gateways ------------------------------------------------------------------------------------
def _config(sim: SimulatorThread, auth: dict[str, Any]) -> dict[str, Any]:
    gpu = {"type": "vllm", "url": sim.url, "model": "sim-model", "health_interval_s": 0.5}
    one = {"variants": [{"name": "only", "weight": 100, "backends": ["gpu"]}]}
    return gateway_config(
        backends={"gpu": gpu},
        models={"assistant": one, "other": one, "third": one},
        auth=auth,
        cache={"enabled": False},
        redis_url=REDIS_URL,
    )


@pytest.fixture(scope="module")
def gw(sim: SimulatorThread, keys: Keys, module_tmp: Path) -> Iterator[GatewayProcess]:
    """HS256 (the shared test secret) and RS256 (a static public key file) both accepted."""
    key_file = module_tmp / "rs256.pub.pem"
    key_file.write_bytes(pem(keys.gw_rsa.public_key()))
    proc = GatewayProcess(
        _config(sim, {"algorithms": ["HS256", "RS256"], "public_key_file": str(key_file)}), module_tmp
    ).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def jwks_gw(
    sim: SimulatorThread, keys: Keys, module_tmp: Path
) -> Iterator[tuple[GatewayProcess, JwksServer]]:
    """RS256 only, keys from a JWKS URL publishing kids "a" and "b" (default refetch interval, 10 s)."""
    idp = JwksServer(keys=[public_jwk(keys.jwks_a, "a"), public_jwk(keys.jwks_b, "b")])
    stop = serve_jwks(idp)
    proc = GatewayProcess(_config(sim, {"algorithms": ["RS256"], "jwks_url": idp.url}), module_tmp)
    try:
        proc.start()
        yield proc, idp
    finally:
        proc.stop()
        stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as client:
        yield client


# -- assertions ----------------------------------------------------------------------------------
def assert_openai_error(
    r: httpx.Response, status: int, code: str, type_: str = "invalid_request_error"
) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == type_ and err["code"] == code, err
    return err


def assert_refused(r: httpx.Response, sent: list[str | bytes], sim: SimulatorThread, *secrets_: str) -> None:
    """401 in OpenAI's shape, nothing the client sent echoed, no rate-limit bookkeeping, no backend call."""
    err = assert_openai_error(r, 401, "invalid_api_key")
    assert r.headers["www-authenticate"].startswith("Bearer")  # RFC 6750: how to authenticate
    assert err["param"] is None
    assert err["message"] in (INVALID, MISSING)
    assert r.headers.get("x-should-retry") == "false"
    text = r.text + "".join(f"{k}:{v}" for k, v in r.headers.items())
    fragments = [*secrets_]
    for value in sent:
        value = value.decode("latin-1") if isinstance(value, bytes) else value
        for word in value.split():
            fragments += [word, *word.split(".")]
    for fragment in fragments:
        if len(fragment) >= 12:
            assert fragment not in text, f"echoed {fragment[:40]!r}"
    assert not any(k.startswith("x-ratelimit") for k in r.headers)  # refused before the limiter
    assert sim.requests() == []


def send(
    http: httpx.Client, gw: GatewayProcess, endpoint: str, auth: list[str | bytes], query: str = ""
) -> httpx.Response:
    headers = [(b"authorization", v if isinstance(v, bytes) else v.encode("latin-1")) for v in auth]
    if endpoint == "chat":
        headers.append((b"content-type", b"application/json"))
        return http.post(f"{gw.url}/v1/chat/completions{query}", content=orjson.dumps(CHAT), headers=headers)
    if endpoint == "models":
        return http.get(f"{gw.url}/v1/models{query}", headers=headers)
    return http.get(f"{gw.url}/v1/models/assistant{query}", headers=headers)


ENDPOINTS = ["chat", "models", "model"]


def count_is(n: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda records: len(records) == n


# -- the refusal table ---------------------------------------------------------------------------
def _unsigned(alg: str, sub: str) -> str:
    return f"{seg({'alg': alg, 'typ': 'JWT'})}.{seg(claims(sub))}"


def _tamper(token: str, sub: str) -> str:
    head, _payload, sig = token.split(".")
    return f"{head}.{seg(claims(sub + '-admin', models=None))}.{sig}"


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Keys, str], list[str | bytes]]  # (keys, sub) -> Authorization values
    query: str = ""


def B(token: str) -> list[str | bytes]:
    return [f"Bearer {token}"]


def now_s() -> int:
    return int(time.time())


CASES = [
    # algorithm attacks
    Case("alg_none_no_signature", lambda k, s: B(_unsigned("none", s) + ".")),
    Case("alg_none_fake_signature", lambda k, s: B(_unsigned("none", s) + "." + b64(b"sig"))),
    Case("alg_NONE_uppercase", lambda k, s: B(_unsigned("NONE", s) + "." + b64(b"sig"))),
    Case("alg_none_with_valid_hmac", lambda k, s: B(hs_token({"alg": "none"}, claims(s)))),
    Case("alg_missing", lambda k, s: B(hs_token({"typ": "JWT"}, claims(s)))),
    Case(
        "hs_rs_confusion_public_pem_as_hmac_secret",
        lambda k, s: B(hs_token({"alg": "HS256"}, claims(s), pem(k.gw_rsa.public_key()))),
    ),
    Case(
        "hs_rs_confusion_public_der_as_hmac_secret",
        lambda k, s: B(
            hs_token(
                {"alg": "HS256"},
                claims(s),
                k.gw_rsa.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                ),
            )
        ),
    ),
    Case(
        "hs512_not_configured",
        lambda k, s: B(hs_token({"alg": "HS512"}, claims(s), SECRET.encode() * 2, hashlib.sha512)),
    ),
    Case("rs256_signed_by_another_key", lambda k, s: B(rs_token({"alg": "RS256"}, claims(s), k.rogue_rsa))),
    Case("es256_not_configured", lambda k, s: B(jwt.encode(claims(s), k.rogue_ec, algorithm="ES256"))),
    Case(
        "embedded_jwk_header_attacker_key",
        lambda k, s: B(
            rs_token({"alg": "RS256", "jwk": public_jwk(k.rogue_rsa, "x")}, claims(s), k.rogue_rsa)
        ),
    ),
    Case(
        "jku_header_attacker_url",
        lambda k, s: B(
            rs_token(
                {"alg": "RS256", "jku": "http://127.0.0.1:9/jwks.json", "kid": "x"}, claims(s), k.rogue_rsa
            )
        ),
    ),
    Case("wrong_hmac_secret", lambda k, s: B(hs_token({"alg": "HS256"}, claims(s), b"x" * 64))),
    Case("tampered_payload", lambda k, s: B(_tamper(hs(s), s))),
    Case("signature_stripped", lambda k, s: B(hs(s).rpartition(".")[0] + ".")),
    # time claims (leeway 30 s)
    Case("expired_beyond_leeway", lambda k, s: B(hs(s, iat=now_s() - 600, exp=now_s() - 45))),
    Case("expired_long_ago", lambda k, s: B(hs(s, iat=now_s() - 86400 * 2, exp=now_s() - 86400))),
    Case("missing_exp", lambda k, s: B(hs(s, exp=DROP))),
    Case("missing_iat", lambda k, s: B(hs(s, iat=DROP))),
    Case("exp_as_string", lambda k, s: B(hs(s, exp=str(now_s() + 600)))),
    Case("exp_as_boolean", lambda k, s: B(hs(s, exp=True))),
    Case("future_nbf", lambda k, s: B(hs(s, nbf=now_s() + 3600))),
    Case("nbf_just_beyond_leeway", lambda k, s: B(hs(s, nbf=now_s() + 90))),
    Case("future_iat", lambda k, s: B(hs(s, iat=now_s() + 3600))),
    # identity claims
    Case("missing_sub", lambda k, s: B(hs(s, sub=DROP))),
    Case("empty_sub", lambda k, s: B(hs(s, sub=""))),
    Case("numeric_sub", lambda k, s: B(hs(s, sub=12345))),
    Case("oversized_sub", lambda k, s: B(hs(s, sub=s + "x" * 300))),
    Case("tenant_not_a_string", lambda k, s: B(hs(s, tenant=["acme"]))),
    Case("models_not_a_list", lambda k, s: B(hs(s, models="assistant"))),
    Case("payload_is_a_list", lambda k, s: B(hs_token({"alg": "HS256"}, [claims(s)]))),
    Case("header_is_a_list", lambda k, s: B(hs_token(["HS256"], claims(s)))),
    # audience / issuer
    Case("wrong_aud", lambda k, s: B(hs(s, aud="billing-service"))),
    Case("missing_aud", lambda k, s: B(hs(s, aud=DROP))),
    Case("aud_superstring", lambda k, s: B(hs(s, aud=AUD + "-staging"))),
    Case("aud_substring", lambda k, s: B(hs(s, aud=AUD[:-1]))),
    Case("aud_list_without_ours", lambda k, s: B(hs(s, aud=["billing", AUD.upper()]))),
    Case("wrong_iss", lambda k, s: B(hs(s, iss="https://evil.example.com"))),
    Case("missing_iss", lambda k, s: B(hs(s, iss=DROP))),
    Case("iss_substring", lambda k, s: B(hs(s, iss=ISS[:-1]))),
    Case("iss_superstring_suffix", lambda k, s: B(hs(s, iss=ISS + ".evil.example"))),
    Case("iss_superstring_prefix", lambda k, s: B(hs(s, iss="https://evil.example/" + ISS))),
    Case("iss_in_a_list", lambda k, s: B(hs(s, iss=[ISS]))),
    # header extensions and kid (static keys: kid is not a key selector here, but is still checked)
    Case("crit_header", lambda k, s: B(hs_token({"alg": "HS256", "crit": ["exp"], "exp": 1}, claims(s)))),
    Case(
        "crit_b64_false", lambda k, s: B(hs_token({"alg": "HS256", "crit": ["b64"], "b64": False}, claims(s)))
    ),
    Case(
        "kid_path_traversal_empty_key",
        lambda k, s: B(hs_token({"alg": "HS256", "kid": "../../../../../../dev/null"}, claims(s), b"")),
    ),
    Case(
        "kid_sql_injection",
        lambda k, s: B(hs_token({"alg": "HS256", "kid": "x' UNION SELECT 'k'--"}, claims(s), b"k")),
    ),
    Case(
        "kid_oversized_valid_signature",
        lambda k, s: B(hs_token({"alg": "HS256", "kid": "k" * 300}, claims(s))),
    ),
    Case(
        "kid_not_a_string_valid_signature",
        lambda k, s: B(hs_token({"alg": "HS256", "kid": {"$ne": 1}}, claims(s))),
    ),
    # transport of the token
    Case("token_in_query_access_token", lambda k, s: [], query="?access_token={token}"),
    Case("token_in_query_api_key", lambda k, s: [], query="?api_key={token}"),
    Case("no_authorization_header", lambda k, s: []),
    Case("duplicate_authorization_same_valid_token", lambda k, s: [f"Bearer {hs(s)}"] * 2),
    Case("duplicate_authorization_valid_then_garbage", lambda k, s: [f"Bearer {hs(s)}", "Bearer x"]),
    Case("duplicate_authorization_garbage_then_valid", lambda k, s: ["Bearer x", f"Bearer {hs(s)}"]),
    # garbage and oversized values
    Case("bearer_garbage", lambda k, s: ["Bearer garbage-garbage-garbage"]),
    Case("bearer_three_garbage_segments", lambda k, s: ["Bearer aaaaaaaa.bbbbbbbb.cccccccc"]),
    Case("bearer_four_segments", lambda k, s: B(hs(s) + ".extra")),
    Case("bearer_base64_padding", lambda k, s: B(hs(s) + "==")),
    Case("bearer_nothing", lambda k, s: ["Bearer"]),
    Case("bearer_twice", lambda k, s: [f"Bearer Bearer {hs(s)}"]),
    Case("empty_header_value", lambda k, s: [""]),
    Case("basic_scheme", lambda k, s: ["Basic dXNlcjpwYXNzd29yZA=="]),
    Case("token_scheme_valid_token", lambda k, s: [f"Token {hs(s)}"]),
    Case("no_scheme_valid_token", lambda k, s: [hs(s)]),
    Case("space_inside_token", lambda k, s: [f"Bearer {hs(s)[:30]} {hs(s)[30:]}"]),
    Case("non_ascii_bytes", lambda k, s: [b"Bearer \xff\xfe\xfd." + hs(s).encode()]),
    Case("oversized_garbage_9k", lambda k, s: ["Bearer " + "A" * 4500 + "." + "B" * 4500 + ".C"]),
    Case("oversized_validly_signed_12k", lambda k, s: B(hs(s, pad="p" * 9000))),
]


def _case_headers(case: Case, keys: Keys, sub: str) -> tuple[list[str | bytes], str, list[str]]:
    values = case.build(keys, sub)
    valid = hs(sub)
    query = case.query.format(token=valid) if case.query else ""
    secrets_ = [valid] if query else []
    return values, query, secrets_


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_token_is_401_openai_shaped_and_never_forwarded(
    gw: GatewayProcess, sim: SimulatorThread, keys: Keys, http: httpx.Client, case: Case, endpoint: str
) -> None:
    sub = f"victim-{uuid.uuid4().hex}"
    values, query, secrets_ = _case_headers(case, keys, sub)
    r = send(http, gw, endpoint, values, query)
    assert_refused(r, values, sim, *secrets_)
    if not values:
        assert r.json()["error"]["message"] == MISSING
    else:
        assert r.json()["error"]["message"] == INVALID


def test_positive_controls_reach_the_backend(
    gw: GatewayProcess, sim: SimulatorThread, keys: Keys, http: httpx.Client
) -> None:
    """The crafting helpers are right: unaltered tokens of each kind pass, and then reach the backend."""
    sub = f"ok-{uuid.uuid4().hex}"
    now = int(time.time())
    good: list[list[str | bytes]] = [
        B(hs(sub)),
        B(rs_token({"alg": "RS256", "typ": "JWT"}, claims(sub), keys.gw_rsa)),
        B(gw.token(sub)),
        [f"bearer {hs(sub)}"],  # the scheme is case-insensitive
        B(hs(sub, iat=now - 600, exp=now - 10)),  # expired, but within the 30 s leeway
        B(hs(sub, nbf=now + 10)),  # not yet valid, but within the leeway
        B(hs(sub, aud=["billing", AUD])),
        B(hs_token({"alg": "HS256", "kid": "anything"}, claims(sub))),  # static keys: kid selects nothing
    ]
    for n, values in enumerate(good, 1):
        r = send(http, gw, "chat", values)
        assert r.status_code == 200, (n, r.text)
        assert r.json()["choices"][0]["message"]["content"]
        sim.wait_for(count_is(n))
    for values in good[:2]:
        assert send(http, gw, "models", values).status_code == 200


def test_oversized_header_block_is_431_openai_shaped(
    gw: GatewayProcess, sim: SimulatorThread, http: httpx.Client
) -> None:
    """Beyond server.max_header_bytes (16 KiB) the connection layer answers before any route: 431."""
    sub = f"big-{uuid.uuid4().hex}"
    token = hs(sub, pad="p" * 20000)
    r = send(http, gw, "chat", [f"Bearer {token}"])
    assert_openai_error(r, 431, "headers_too_large")
    assert token.split(".")[1][:40] not in r.text
    assert sim.requests() == []


# -- JWKS ----------------------------------------------------------------------------------------
def _rs(key: rsa.RSAPrivateKey, sub: str, kid: Any = None, /, **over: Any) -> str:
    header: dict[str, Any] = {"alg": "RS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return rs_token(header, claims(sub, **over), key)


KID_CASES: list[tuple[str, Callable[[Keys], tuple[rsa.RSAPrivateKey, Any]]]] = [
    ("unknown_kid_signed_by_published_key", lambda k: (k.jwks_a, "zz-unknown")),
    ("unknown_kid_rogue_key", lambda k: (k.rogue_rsa, "zz-unknown")),
    ("published_kid_rogue_key", lambda k: (k.rogue_rsa, "a")),
    ("kid_of_the_other_published_key", lambda k: (k.jwks_a, "b")),
    ("no_kid_with_two_published_keys", lambda k: (k.jwks_a, None)),
    ("kid_path_traversal", lambda k: (k.jwks_a, "../../../../etc/passwd")),
    ("kid_path_suffix", lambda k: (k.jwks_a, "a/../a")),
    ("kid_sql_injection", lambda k: (k.jwks_a, "a' OR '1'='1")),
    ("kid_url", lambda k: (k.jwks_a, "http://127.0.0.1:9/evil.json")),
    ("kid_nul_byte", lambda k: (k.jwks_a, "a\u0000")),
    ("kid_trailing_space", lambda k: (k.jwks_a, "a ")),
    ("kid_wildcard", lambda k: (k.jwks_a, "*")),
    ("kid_jndi", lambda k: (k.jwks_a, "${jndi:ldap://127.0.0.1:9/x}")),
    ("kid_oversized", lambda k: (k.jwks_a, "a" * 5000)),
    ("kid_list", lambda k: (k.jwks_a, ["a"])),
]


def test_jwks_kid_attacks_refused_without_hammering_the_idp(
    jwks_gw: tuple[GatewayProcess, JwksServer], sim: SimulatorThread, keys: Keys, http: httpx.Client
) -> None:
    gw, idp = jwks_gw
    sub = f"kid-{uuid.uuid4().hex}"
    ok = send(http, gw, "chat", B(_rs(keys.jwks_a, sub, "a")))
    assert ok.status_code == 200, ok.text
    assert send(http, gw, "chat", B(_rs(keys.jwks_b, sub, "b"))).status_code == 200
    sim.reset()
    hits_before, started = idp.hits, time.monotonic()
    for name, pick in KID_CASES:
        key, kid = pick(keys)
        for endpoint in ENDPOINTS:
            values = B(_rs(key, sub, kid))
            r = send(http, gw, endpoint, values)
            assert r.status_code == 401, (name, endpoint, r.text)
            assert_refused(r, values, sim)
    # the HS/RS confusion against a JWKS-only gateway, with the published key as the HMAC secret
    for values in (
        B(hs_token({"alg": "HS256", "kid": "a"}, claims(sub), pem(keys.jwks_a.public_key()))),
        B(hs(sub)),
    ):
        assert_refused(send(http, gw, "chat", values), values, sim)
    # 15 x 3 unknown kids: at most one refetch per refetch interval (10 s), not one per request
    assert idp.hits - hits_before <= 1 + (time.monotonic() - started) // 10


def test_jwks_rotation(sim: SimulatorThread, module_tmp: Path, http: httpx.Client) -> None:
    idp = JwksServer()
    stop_idp = serve_jwks(idp)
    old, new, newer = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3))
    idp.publish(public_jwk(old, "2024-old"))
    auth = {"algorithms": ["RS256"], "jwks_url": idp.url, "jwks_cache_s": 1.0, "jwks_min_refetch_s": 0.2}
    gw = GatewayProcess(_config(sim, auth), module_tmp)
    try:
        gw.start()
        sub = f"rot-{uuid.uuid4().hex}"
        assert send(http, gw, "chat", B(_rs(old, sub, "2024-old"))).status_code == 200
        assert send(http, gw, "chat", B(_rs(new, sub, "2025-new"))).status_code == 401  # not published yet

        # rotate: the old key is removed, the new one published
        idp.publish(public_jwk(new, "2025-new"))
        deadline = time.monotonic() + 5
        while (r := send(http, gw, "chat", B(_rs(new, sub, "2025-new")))).status_code != 200:
            assert r.status_code == 401 and time.monotonic() < deadline, r.text
            time.sleep(0.05)
        sim.reset()
        for token in (_rs(old, sub, "2024-old"), _rs(old, sub, None)):  # a freshly signed one too
            assert_refused(send(http, gw, "chat", B(token)), B(token), sim)

        # an overlapping rotation: both published; then the older one withdrawn (background refresh)
        idp.publish(public_jwk(new, "2025-new"), public_jwk(newer, "2026-newer"))
        deadline = time.monotonic() + 5
        while send(http, gw, "chat", B(_rs(newer, sub, "2026-newer"))).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert send(http, gw, "chat", B(_rs(new, sub, "2025-new"))).status_code == 200
        idp.publish(public_jwk(newer, "2026-newer"))
        deadline = time.monotonic() + 5  # jwks_cache_s is 1 s: the next refresh drops "2025-new"
        while send(http, gw, "chat", B(_rs(new, sub, "2025-new"))).status_code != 401:
            assert time.monotonic() < deadline, "a withdrawn key was still accepted after 5 s"
            time.sleep(0.1)
        assert send(http, gw, "chat", B(_rs(newer, sub, "2026-newer"))).status_code == 200
    finally:
        gw.stop()
        stop_idp()


def test_an_unreachable_key_server_does_not_stop_the_gateway(
    sim: SimulatorThread, module_tmp: Path, http: httpx.Client
) -> None:
    """The gateway starts without its JWKS, says so in /readyz and the log, answers tokens it
    cannot check with a 503 and retry-after (they may be valid), and recovers by itself."""
    port = free_port()
    idp = JwksServer(url=f"http://127.0.0.1:{port}/.well-known/jwks.json")
    auth = {"algorithms": ["RS256"], "jwks_url": idp.url, "jwks_cache_s": 60.0, "jwks_min_refetch_s": 0.2}
    gw = GatewayProcess(_config(sim, auth), module_tmp)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stop_idp = None
    try:
        gw.start()
        ready = http.get(f"{gw.url}/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
        assert any("JWKS" in d for d in ready.json()["degraded"])
        assert "JWKS fetch from" in gw.log() and "ClientConnectorError" in gw.log()  # a reason, not ""
        sub = f"jwks-down-{uuid.uuid4().hex}"
        r = send(http, gw, "chat", B(_rs(key, sub, "k1")))
        err = assert_openai_error(r, 503, "service_unavailable", "server_error")
        assert int(r.headers["retry-after"]) >= 1 and sim.requests() == []
        assert "unreachable" in err["message"]

        idp.publish(public_jwk(key, "k1"))
        stop_idp = serve_jwks(idp, port)
        deadline = time.monotonic() + 10
        while (r := send(http, gw, "chat", B(_rs(key, sub, "k1")))).status_code != 200:
            assert r.status_code == 503 and time.monotonic() < deadline, r.text
            time.sleep(0.1)
        assert http.get(f"{gw.url}/readyz").json()["status"] == "ready"
    finally:
        gw.stop()
        if stop_idp is not None:
            stop_idp()


# -- model allow-list ----------------------------------------------------------------------------
def test_model_allow_list(gw: GatewayProcess, sim: SimulatorThread, http: httpx.Client) -> None:
    sub = f"ml-{uuid.uuid4().hex}"
    only_other = {"authorization": f"Bearer {gw.token(sub, models=['other'])}"}
    r = http.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers=only_other)
    err = assert_openai_error(r, 403, "model_not_allowed")
    assert err["param"] == "model" and "assistant" in err["message"]
    assert r.headers.get("x-should-retry") == "false"
    assert sim.requests() == []
    r = http.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "model": "other"}, headers=only_other)
    assert r.status_code == 200 and r.json()["model"] == "other"

    listed = http.get(f"{gw.url}/v1/models", headers=only_other)
    assert listed.status_code == 200
    assert [m["id"] for m in listed.json()["data"]] == ["other"]
    assert http.get(f"{gw.url}/v1/models/other", headers=only_other).status_code == 200
    hidden = http.get(f"{gw.url}/v1/models/assistant", headers=only_other)
    assert_openai_error(hidden, 404, "model_not_found")

    none_allowed = {"authorization": f"Bearer {gw.token(sub, models=[])}"}
    assert http.get(f"{gw.url}/v1/models", headers=none_allowed).json()["data"] == []
    assert_openai_error(
        http.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers=none_allowed), 403, "model_not_allowed"
    )

    everything = {"authorization": f"Bearer {gw.token(sub)}"}
    assert sorted(m["id"] for m in http.get(f"{gw.url}/v1/models", headers=everything).json()["data"]) == [
        "assistant",
        "other",
        "third",
    ]
    assert sim.wait_for(lambda recs: len(recs) == 1)[0]["body"]["model"] == "sim-model"


# -- which routes need a token -------------------------------------------------------------------
def test_probes_need_no_token_api_routes_do(
    gw: GatewayProcess, sim: SimulatorThread, http: httpx.Client
) -> None:
    assert http.get(f"{gw.url}/healthz").json() == {"status": "ok"}
    ready = http.get(f"{gw.url}/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready", ready.text
    metrics = http.get(f"{gw.url}/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    # a bad token on a probe is ignored, not refused
    assert http.get(f"{gw.url}/healthz", headers={"authorization": "Bearer nope"}).status_code == 200

    for method, path in (
        ("GET", "/v1/models"),
        ("GET", "/v1/models/assistant"),
        ("POST", "/v1/chat/completions"),
    ):
        r = http.request(method, f"{gw.url}{path}", json=CHAT if method == "POST" else None)
        err = assert_openai_error(r, 401, "invalid_api_key")
        assert err["message"] == MISSING
    assert sim.requests() == []
