"""JWT verification, the model allow-list, the first-run secret and token minting (no network, no sleeps)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.auth.authenticator import INVALID, MISSING, Authenticator, ensure_secret, mint_token, parse_ttl
from proxy.errors import PermissionDenied, ServiceUnavailable, Unauthorized
from proxy.settings import AuthSettings
from tests.jwt_helpers import DROP, b64, public_jwk, with_claims

NOW = 1_700_000_000.0
SECRET = "unit-test-secret-0123456789abcdef0123456789abcdef"
ISSUER = "https://issuer.example.com"
AUD = "llm-gateway"
SETTINGS = AuthSettings(algorithms=["HS256"], secret=SECRET, audience=AUD, issuer=ISSUER, leeway_s=30)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem_public(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def claims(**over: Any) -> dict[str, Any]:
    return with_claims(
        {"sub": "alice", "iat": int(NOW), "exp": int(NOW) + 600, "aud": AUD, "iss": ISSUER}, over
    )


def hs(
    payload: dict[str, Any] | None = None, *, key: str | bytes = SECRET, alg: str = "HS256", **headers: Any
) -> str:
    return jwt.encode(payload or claims(), key, algorithm=alg, headers=headers or None)


def raw_token(header: dict[str, Any], payload: Any, key: bytes = SECRET.encode()) -> str:
    """A token built by hand, HMAC-SHA256 signed with `key` whatever the header says."""
    signing = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(payload))}"
    sig = hmac.new(key, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(sig)}"


def make_auth(settings: AuthSettings = SETTINGS, **kw: Any) -> Authenticator:
    kw.setdefault("secret", SECRET)
    return Authenticator(settings, clock=lambda: NOW, **kw)


def bearer(token: str) -> list[str]:
    return [f"Bearer {token}"]


# --- table: HS256 verifier, tokens that must be accepted or refused ---------------------------------

CASES: list[tuple[str, Callable[[], list[str]], bool]] = [
    ("valid", lambda: bearer(hs()), True),
    ("lowercase bearer scheme", lambda: [f"bearer {hs()}"], True),
    ("uppercase bearer scheme", lambda: [f"BEARER {hs()}"], True),
    ("surrounding whitespace", lambda: [f"  Bearer   {hs()}  "], True),
    ("expired within leeway", lambda: bearer(hs(claims(exp=int(NOW) - 10))), True),
    ("expired beyond leeway", lambda: bearer(hs(claims(exp=int(NOW) - 31))), False),
    ("missing exp", lambda: bearer(hs(claims(exp=DROP))), False),
    ("missing iat", lambda: bearer(hs(claims(iat=DROP))), False),
    ("missing sub", lambda: bearer(hs(claims(sub=DROP))), False),
    ("empty sub", lambda: bearer(hs(claims(sub=""))), False),
    ("numeric sub", lambda: bearer(raw_token({"alg": "HS256"}, claims(sub=42))), False),
    ("exp as string", lambda: bearer(raw_token({"alg": "HS256"}, claims(exp="9999999999"))), False),
    ("exp as boolean", lambda: bearer(raw_token({"alg": "HS256"}, claims(exp=True))), False),
    ("future iat beyond leeway", lambda: bearer(hs(claims(iat=int(NOW) + 120))), False),
    ("future iat within leeway", lambda: bearer(hs(claims(iat=int(NOW) + 20))), True),
    ("future nbf beyond leeway", lambda: bearer(hs(claims(nbf=int(NOW) + 120))), False),
    ("future nbf within leeway", lambda: bearer(hs(claims(nbf=int(NOW) + 20))), True),
    ("past nbf", lambda: bearer(hs(claims(nbf=int(NOW) - 100))), True),
    ("wrong audience", lambda: bearer(hs(claims(aud="other"))), False),
    ("missing audience", lambda: bearer(hs(claims(aud=DROP))), False),
    ("audience list containing ours", lambda: bearer(hs(claims(aud=["x", AUD]))), True),
    ("audience substring", lambda: bearer(hs(claims(aud="llm-gateway-evil"))), False),
    ("wrong issuer", lambda: bearer(hs(claims(iss="https://evil.example.com"))), False),
    ("issuer with suffix", lambda: bearer(hs(claims(iss=ISSUER + ".evil"))), False),
    ("issuer prefix only", lambda: bearer(hs(claims(iss="https://issuer.example"))), False),
    ("issuer in a list", lambda: bearer(raw_token({"alg": "HS256"}, claims(iss=[ISSUER]))), False),
    ("missing issuer", lambda: bearer(hs(claims(iss=DROP))), False),
    ("wrong secret", lambda: bearer(hs(key="another-secret-0123456789abcdef0123456789abcdef")), False),
    ("tampered payload", lambda: bearer(_tamper(hs())), False),
    ("alg not configured (HS512)", lambda: bearer(hs(key=SECRET * 2, alg="HS512")), False),
    ("alg none, no signature", lambda: bearer(_unsigned("none") + "."), False),
    ("alg none, fake signature", lambda: bearer(_unsigned("none") + ".c2ln"), False),
    ("alg NONE", lambda: bearer(_unsigned("NONE") + ".c2ln"), False),
    ("crit header", lambda: bearer(raw_token({"alg": "HS256", "crit": ["exp"], "exp": 1}, claims())), False),
    (
        "crit b64 header",
        lambda: bearer(raw_token({"alg": "HS256", "crit": ["b64"], "b64": True}, claims())),
        False,
    ),
    ("kid not a string", lambda: bearer(raw_token({"alg": "HS256", "kid": 7}, claims())), False),
    ("header not an object", lambda: bearer(_with_header(b"[1,2]")), False),
    ("header not JSON", lambda: bearer(_with_header(b"{nope")), False),
    ("payload is a list", lambda: bearer(raw_token({"alg": "HS256"}, [1, 2])), False),
    ("payload not JSON", lambda: bearer(_raw_payload(b"\xff\xfe")), False),
    ("models not a list", lambda: bearer(hs(claims(models="a,b"))), False),
    ("models with a number", lambda: bearer(hs(claims(models=["a", 1]))), False),
    ("tenant not a string", lambda: bearer(hs(claims(tenant=["acme"]))), False),
    ("oversized sub", lambda: bearer(hs(claims(sub="a" * 300))), False),
    ("no token after scheme", lambda: ["Bearer"], False),
    ("blank token", lambda: ["Bearer    "], False),
    ("empty header value", lambda: [""], False),
    ("two segments", lambda: ["Bearer abc.def"], False),
    ("garbage", lambda: ["Bearer %%%.$$$.!!!"], False),
    ("garbage segments", lambda: ["Bearer aaaa.bbbb.cccc"], False),
    ("basic scheme", lambda: ["Basic dXNlcjpwYXNzd29yZA=="], False),
    ("token scheme", lambda: [f"Token {hs()}"], False),
    ("no scheme", lambda: [hs()], False),
    ("space inside token", lambda: [f"Bearer {hs()[:20]} {hs()[20:]}"], False),
    ("oversized value", lambda: ["Bearer " + "a" * 4000 + "." + "b" * 4000 + "." + "c" * 200], False),
    ("two Authorization values", lambda: [f"Bearer {hs()}", f"Bearer {hs()}"], False),
    ("valid then garbage", lambda: [f"Bearer {hs()}", "Bearer x"], False),
]


def _unsigned(alg: str) -> str:
    return f"{b64(orjson.dumps({'alg': alg, 'typ': 'JWT'}))}.{b64(orjson.dumps(claims()))}"


def _tamper(token: str) -> str:
    head, _, rest = token.partition(".")
    _, _, sig = rest.partition(".")
    return f"{head}.{b64(orjson.dumps(claims(sub='mallory')))}.{sig}"


def _with_header(header: bytes) -> str:
    signing = f"{b64(header)}.{b64(orjson.dumps(claims()))}"
    return f"{signing}.{b64(hmac.new(SECRET.encode(), signing.encode(), hashlib.sha256).digest())}"


def _raw_payload(payload: bytes) -> str:
    signing = f"{b64(orjson.dumps({'alg': 'HS256'}))}.{b64(payload)}"
    return f"{signing}.{b64(hmac.new(SECRET.encode(), signing.encode(), hashlib.sha256).digest())}"


@pytest.mark.parametrize(("name", "values", "ok"), CASES, ids=[c[0] for c in CASES])
async def test_hs256_table(name: str, values: Callable[[], list[str]], ok: bool) -> None:
    auth = make_auth()
    headers = values()
    if ok:
        principal = await auth.authenticate(headers)
        assert principal.sub == "alice"
        return
    with pytest.raises(Unauthorized) as info:
        await auth.authenticate(headers)
    assert info.value.status == 401
    assert info.value.message == INVALID
    for value in headers:  # the message never echoes what the client sent
        for part in value.split():
            if len(part) > 8:
                assert part not in info.value.json().decode()


async def test_no_authorization_header_says_missing() -> None:
    with pytest.raises(Unauthorized) as info:
        await make_auth().authenticate([])
    assert info.value.message == MISSING


async def test_principal_from_custom_claim_names() -> None:
    settings = AuthSettings(
        algorithms=["HS256"], secret=SECRET, tenant_claim="org", tier_claim="plan", models_claim="llms"
    )
    token = hs(
        {"sub": "bob", "iat": int(NOW), "exp": int(NOW) + 60, "org": "acme", "plan": "pro", "llms": ["a"]}
    )
    principal = await make_auth(settings).authenticate(bearer(token))
    assert (principal.sub, principal.tenant, principal.tier) == ("bob", "acme", "pro")
    assert principal.allowed_models == frozenset({"a"})
    assert principal.claims["org"] == "acme"
    with pytest.raises(TypeError):
        principal.claims["org"] = "evil"  # type: ignore[index]


async def test_defaults_tenant_is_sub_tier_default_all_models() -> None:
    principal = await make_auth().authenticate(bearer(hs()))
    assert (principal.tenant, principal.tier, principal.allowed_models) == ("alice", "default", None)


async def test_audience_and_issuer_unchecked_when_not_configured() -> None:
    auth = make_auth(AuthSettings(algorithms=["HS256"], secret=SECRET))
    assert (await auth.authenticate(bearer(hs(claims(aud="anything", iss="anyone"))))).sub == "alice"


# --- asymmetric keys and algorithm confusion --------------------------------------------------------


async def test_rs256_and_es256_with_public_keys(rsa_key: rsa.RSAPrivateKey, ec_key: Any) -> None:
    settings = AuthSettings(algorithms=["RS256"], audience=AUD, issuer=ISSUER)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256")
    assert (
        await make_auth(settings, secret="", public_key=pem_public(rsa_key)).authenticate(bearer(token))
    ).sub
    settings = AuthSettings(algorithms=["ES256"], audience=AUD, issuer=ISSUER)
    token = jwt.encode(claims(), ec_key, algorithm="ES256")
    assert (
        await make_auth(settings, secret="", public_key=pem_public(ec_key)).authenticate(bearer(token))
    ).sub


@pytest.mark.parametrize("algorithms", [["RS256"], ["HS256", "RS256"]])
async def test_hs_rs_confusion_with_public_key_as_hmac_secret(
    rsa_key: rsa.RSAPrivateKey, algorithms: list[str]
) -> None:
    """A token HMAC-signed with the RSA public key PEM (the classic confusion attack) is refused."""
    public = pem_public(rsa_key)
    settings = AuthSettings(algorithms=algorithms, audience=AUD, issuer=ISSUER)  # type: ignore[arg-type]
    auth = make_auth(settings, secret=SECRET, public_key=public)
    forged = raw_token({"alg": "HS256", "typ": "JWT"}, claims(), key=public.encode())
    with pytest.raises(Unauthorized):
        await auth.authenticate(bearer(forged))
    # and an RS256 token is not accepted by an HS-only verifier either
    hs_only = make_auth()
    with pytest.raises(Unauthorized):
        await hs_only.authenticate(bearer(jwt.encode(claims(), rsa_key, algorithm="RS256")))


async def test_ec_key_wrong_curve_for_alg(ec_key: Any) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    settings = AuthSettings(algorithms=["ES256"], audience=AUD, issuer=ISSUER)
    with pytest.raises(ValueError, match="no key"):
        Authenticator(settings, public_key=pem_public(p384))


def test_start_up_errors() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Authenticator(AuthSettings(algorithms=["HS256"]), secret="short")
    with pytest.raises(ValueError, match="at least 64 bytes"):
        Authenticator(AuthSettings(algorithms=["HS512"]), secret=SECRET)
    with pytest.raises(ValueError, match="no key for algorithm"):
        Authenticator(AuthSettings(algorithms=["RS256"]))
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="no key for algorithm"):
        Authenticator(AuthSettings(algorithms=["RS256"]), public_key=pem_public(small))


# --- JWKS through a fake session (the I/O seam): unknown kids, kid injection, refetch limits ---------


class FakeResponse:
    def __init__(self, body: bytes, status: int = 200) -> None:
        self.status, self._body = status, body
        self.content = self

    async def read(self, n: int = -1) -> bytes:
        await asyncio.sleep(0)  # yield once, like a real read, so concurrent callers overlap
        return self._body if n < 0 else self._body[:n]

    async def __aenter__(self) -> FakeResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class FakeSession:
    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys, self.calls = keys, 0

    def get(self, url: str, **_: Any) -> FakeResponse:
        self.calls += 1
        return FakeResponse(orjson.dumps({"keys": self.keys}))


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


async def jwks_auth(session: FakeSession, clock: Clock) -> Authenticator:
    settings = AuthSettings(
        algorithms=["RS256"], jwks_url="https://idp.example/jwks", jwks_min_refetch_s=10, jwks_cache_s=300
    )
    auth = Authenticator(settings, session=session, clock=clock)  # type: ignore[arg-type]
    await auth.start()
    return auth


def rs_token(key: rsa.RSAPrivateKey, kid: Any, clock: Clock) -> str:
    payload = {"sub": "alice", "iat": int(clock.now), "exp": int(clock.now) + 60}
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": kid})


KID_INJECTIONS = [
    "../../etc/passwd",
    "' OR 1=1 --",
    "k1\x00",
    "*",
    "k1 ",
    "K1",
    "${jndi:ldap://x}",
    "x" * 300,
]


async def test_jwks_unknown_and_injected_kids_refused_without_hammering(rsa_key: rsa.RSAPrivateKey) -> None:
    session, clock = FakeSession([public_jwk(rsa_key, "k1")]), Clock()
    auth = await jwks_auth(session, clock)
    try:
        assert (await auth.authenticate(bearer(rs_token(rsa_key, "k1", clock)))).sub == "alice"
        for kid in [*KID_INJECTIONS, *(f"random-{i}" for i in range(200))]:
            with pytest.raises(Unauthorized):
                await auth.authenticate(bearer(rs_token(rsa_key, kid, clock)))
        assert session.calls == 1  # within jwks_min_refetch_s of the start-up fetch: no refetch at all
        clock.now += 11
        results = await asyncio.gather(
            *(auth.authenticate(bearer(rs_token(rsa_key, f"flood-{i}", clock))) for i in range(50)),
            return_exceptions=True,
        )
        assert all(isinstance(r, Unauthorized) for r in results)
        assert session.calls == 2  # one shared refetch for the whole flood
    finally:
        await auth.close()


async def test_jwks_rotation_picked_up_on_unknown_kid_after_min_interval(rsa_key: rsa.RSAPrivateKey) -> None:
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    session, clock = FakeSession([public_jwk(rsa_key, "k1")]), Clock()
    auth = await jwks_auth(session, clock)
    try:
        session.keys = [public_jwk(new_key, "k2")]
        clock.now += 5
        with pytest.raises(Unauthorized):  # too soon after the last fetch
            await auth.authenticate(bearer(rs_token(new_key, "k2", clock)))
        clock.now += 10
        assert (await auth.authenticate(bearer(rs_token(new_key, "k2", clock)))).sub == "alice"
        with pytest.raises(Unauthorized):  # the retired key is gone
            await auth.authenticate(bearer(rs_token(rsa_key, "k1", clock)))
        assert session.calls == 2
    finally:
        await auth.close()


async def test_jwks_key_with_other_alg_or_kid_for_wrong_key_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    session = FakeSession([{**public_jwk(rsa_key, "k1"), "alg": "RS512"}, public_jwk(other, "k2")])
    clock = Clock()
    auth = await jwks_auth(session, clock)
    try:
        with pytest.raises(Unauthorized):  # k1 is declared RS512, not configured
            await auth.authenticate(bearer(rs_token(rsa_key, "k1", clock)))
        with pytest.raises(Unauthorized):  # signed by rsa_key but names k2
            await auth.authenticate(bearer(rs_token(rsa_key, "k2", clock)))
    finally:
        await auth.close()


async def test_jwks_without_usable_keys_starts_degraded_and_recovers(rsa_key: rsa.RSAPrivateKey) -> None:
    """A key server that serves nothing usable (or cannot be reached) does not stop the gateway:
    tokens that need its keys get a 503 with retry-after (not a 401: they may well be valid), and
    the first request after the key server is back loads the keys."""
    session, clock = FakeSession([{"kty": "oct", "k": b64(SECRET.encode()), "kid": "sym"}]), Clock()
    auth = await jwks_auth(session, clock)
    try:
        assert auth.keys_missing
        with pytest.raises(ServiceUnavailable) as info:
            await auth.authenticate(bearer(rs_token(rsa_key, "k1", clock)))
        assert info.value.status == 503 and int(info.value.headers["retry-after"]) >= 1
        assert "unreachable" in info.value.message and session.calls == 1  # no refetch within 10 s
        session.keys = [public_jwk(rsa_key, "k1")]
        clock.now += 11
        assert (await auth.authenticate(bearer(rs_token(rsa_key, "k1", clock)))).sub == "alice"
        assert not auth.keys_missing and session.calls == 2
        with pytest.raises(Unauthorized):  # with keys loaded, an unknown kid is an invalid key again
            await auth.authenticate(bearer(rs_token(rsa_key, "k9", clock)))
    finally:
        await auth.close()


# --- model allow-list ---------------------------------------------------------------------------------


async def test_model_allow_list() -> None:
    auth = make_auth()
    limited = await auth.authenticate(bearer(hs(claims(models=["small"]))))
    auth.check_model(limited, "small")
    with pytest.raises(PermissionDenied) as info:
        auth.check_model(limited, "large")
    assert info.value.status == 403
    with pytest.raises(PermissionDenied):
        auth.check_model(await auth.authenticate(bearer(hs(claims(models=[])))), "small")
    auth.check_model(await auth.authenticate(bearer(hs())), "anything")  # no claim: every model


# --- first-run secret, minting, ttl -------------------------------------------------------------------


def test_ensure_secret_generates_0600_and_reuses(tmp_path: Path) -> None:
    state = tmp_path / "state"
    settings = AuthSettings(algorithms=["HS256"])
    secret, generated = ensure_secret(settings, state)
    assert generated and len(secret) >= 64
    path = state / "jwt_secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert ensure_secret(settings, state) == (secret, False)
    path.chmod(0o644)
    assert ensure_secret(settings, state) == (secret, False)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list(state.iterdir()) == [path]  # no temporary files left behind
    Authenticator(AuthSettings(algorithms=["HS512"]), secret=secret)  # long enough for every HS*


def test_ensure_secret_configured_and_rejects_short(tmp_path: Path) -> None:
    assert ensure_secret(AuthSettings(secret=SECRET), tmp_path) == (SECRET, False)
    with pytest.raises(ValueError, match="shorter than 32 bytes"):
        ensure_secret(AuthSettings(secret="changeme"), tmp_path)
    with pytest.raises(ValueError, match="shorter than 64 bytes"):
        ensure_secret(AuthSettings(algorithms=["HS512"], secret=SECRET), tmp_path)
    assert ensure_secret(AuthSettings(algorithms=["RS256"]), tmp_path) == ("", False)
    assert not (tmp_path / "jwt_secret").exists()
    (tmp_path / "jwt_secret").write_text("short\n")
    with pytest.raises(ValueError, match="delete it"):
        ensure_secret(AuthSettings(), tmp_path)


async def test_mint_token_round_trip() -> None:
    settings = AuthSettings(
        algorithms=["HS256"], secret=SECRET, audience=AUD, issuer=ISSUER, tier_claim="plan"
    )
    token = mint_token(
        key=SECRET, algorithm="HS256", sub="alice", tenant="acme", tier="pro", models=["a", "b"],
        ttl_s=3600, audience=AUD, issuer=ISSUER, settings=settings, now=NOW,
    )  # fmt: skip
    principal = await make_auth(settings).authenticate(bearer(token))
    assert (principal.sub, principal.tenant, principal.tier) == ("alice", "acme", "pro")
    assert principal.allowed_models == frozenset({"a", "b"})
    assert principal.claims["exp"] - principal.claims["iat"] == 3600
    expired = mint_token(
        key=SECRET, algorithm="HS256", sub="alice", tenant=None, tier=None, models=None,
        ttl_s=60, audience=AUD, issuer=ISSUER, settings=settings, now=NOW - 3600,
    )  # fmt: skip
    with pytest.raises(Unauthorized):
        await make_auth(settings).authenticate(bearer(expired))
    with pytest.raises(ValueError):
        mint_token(
            key="short", algorithm="HS256", sub="a", tenant=None, tier=None, models=None,
            ttl_s=60, audience="", issuer="", settings=settings,
        )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800), ("45", 45), (" 2h ", 7200)]
)
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "-5m", "1w", "1.5h", "h", "1h30m", "9999999999s"])
def test_parse_ttl_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_ttl(text)


# --- the verified-token cache: a repeated token skips the signature check, nothing else ----------


async def test_repeated_token_is_verified_once_but_its_times_are_checked_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    auth = Authenticator(SETTINGS, secret=SECRET, clock=clock)
    decodes = 0
    real = auth._jws.decode_complete

    def counting(*args: Any, **kw: Any) -> Any:
        nonlocal decodes
        decodes += 1
        return real(*args, **kw)

    monkeypatch.setattr(auth._jws, "decode_complete", counting)
    token = hs(claims(exp=int(NOW) + 60))
    for _ in range(5):
        assert (await auth.authenticate(bearer(token))).sub == "alice"
    assert decodes == 1
    tampered = token[:-2] + ("AA" if token[-2:] != "AA" else "BB")
    with pytest.raises(Unauthorized):
        await auth.authenticate(bearer(tampered))
    clock.now += 60 + SETTINGS.leeway_s + 1  # past exp and the leeway: the cached entry is refused
    with pytest.raises(Unauthorized):
        await auth.authenticate(bearer(token))
    assert token not in auth._verified


async def test_cached_token_refused_once_its_jwks_key_is_retired(rsa_key: rsa.RSAPrivateKey) -> None:
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    session, clock = FakeSession([public_jwk(rsa_key, "k1")]), Clock()
    auth = await jwks_auth(session, clock)
    try:
        token = rs_token(rsa_key, "k1", clock)
        assert (await auth.authenticate(bearer(token))).sub == "alice"
        session.keys = [public_jwk(new_key, "k2")]
        assert await auth._jwks.refresh()  # type: ignore[union-attr]  # the periodic refresh
        with pytest.raises(Unauthorized):
            await auth.authenticate(bearer(token))
    finally:
        await auth.close()
