"""JWT verification -> Principal, the first-run secret and token minting (JWKS keys: proxy.auth.jwks).

Algorithms come from configuration only; the token's `alg` merely selects among them, and each
algorithm family is bound to its own key (HS* to the secret, RS*/ES* to a public key), so an
HS/RS confusion cannot happen. Time claims are checked here against an injectable clock.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import aiohttp
import jwt
import orjson
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from proxy.auth.jwks import MAX_KID_CHARS, JwksCache, key_fits
from proxy.errors import PermissionDenied, ServiceUnavailable, Unauthorized
from proxy.settings import AuthSettings

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 8192
_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}  # RFC 7518 3.2: at least the hash size
_MAX_ID_CHARS = 256  # sub, tenant (kid: see jwks.MAX_KID_CHARS)
_MAX_TIER_CHARS = 64
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_TTL_RE = re.compile(r"\s*(\d{1,9})\s*([smhd]?)\s*")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_VERIFIED_MAX = 4096  # tokens whose signature check is remembered (a client reuses its token)

MISSING = "Missing API key: send 'Authorization: Bearer <token>'."
INVALID = "Invalid or expired API key."
KEYS_UNAVAILABLE = "The gateway cannot verify API keys right now (its key server is unreachable)."
_KEYS_RETRY_AFTER_S = 5


class _Reject(Exception):
    """Internal: why a token was refused (logged at debug level, never sent to the client)."""


@dataclass(frozen=True, slots=True)
class Principal:
    sub: str
    tenant: str
    tier: str
    allowed_models: frozenset[str] | None  # None: every model
    claims: Mapping[str, Any]


def _min_secret(algorithms: Iterable[str]) -> int:
    return max((_MIN_SECRET_BYTES[a] for a in algorithms if a in _MIN_SECRET_BYTES), default=32)


class _Verified(NamedTuple):
    """A token whose signature was checked: what it says, and the (alg, kid) key that checked it."""

    principal: Principal
    key: Any
    alg: str
    kid: str | None


class Authenticator:
    """Verifies bearer JWTs from the Authorization header and turns them into a Principal."""

    def __init__(
        self,
        settings: AuthSettings,
        *,
        secret: str = "",
        public_key: str = "",
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings, self._clock = settings, clock
        self._algorithms = frozenset(settings.algorithms)
        self._jws = jwt.PyJWS(
            algorithms=sorted(self._algorithms), options={"enforce_minimum_key_length": True}
        )
        self._static = self._static_keys(secret, public_key)
        self._session, self._own_session = session, False
        self._jwks: JwksCache | None = None
        self._refresher: asyncio.Task[None] | None = None
        # token -> (principal, the key that verified it): a client sends the same token on every
        # request, and PyJWT's decode is ~60% of authentication. Claims and the time window are
        # still checked on every request; the entry is dropped once its key is no longer current.
        self._verified: dict[str, _Verified] = {}
        missing = self._algorithms - self._static.keys()
        if missing and not settings.jwks_url:
            raise ValueError(f"auth: no key for algorithm(s) {', '.join(sorted(missing))}")

    def _static_keys(self, secret: str, public_key: str) -> dict[str, Any]:
        keys: dict[str, Any] = {}
        hs = {a for a in self._algorithms if a.startswith("HS")}
        if hs:
            if len(secret.encode()) < _min_secret(hs):
                raise ValueError(
                    f"auth: {', '.join(sorted(hs))} need a secret of at least {_min_secret(hs)} bytes"
                )
            keys.update(dict.fromkeys(hs, secret.encode()))
        if not public_key and self._settings.public_key_file:
            public_key = Path(self._settings.public_key_file).read_text(encoding="utf-8")
        if public_key:
            loaded = load_pem_public_key(public_key.encode())
            keys.update({a: loaded for a in self._algorithms - hs if key_fits(a, loaded)})
        return keys

    async def start(self) -> None:
        """With a JWKS URL: fetch the keys once, then keep them fresh in the background. A key
        server that cannot be reached does not stop the gateway: until its keys load, tokens that
        need them get a 503 with retry-after (see `authenticate`) and readiness says why."""
        url = self._settings.jwks_url
        if not url:
            return
        if self._session is None:
            self._session, self._own_session = aiohttp.ClientSession(), True
        asym = frozenset(a for a in self._algorithms if not a.startswith("HS"))
        self._jwks = JwksCache(url, asym, self._settings, self._session, self._clock)
        await self._jwks.refresh()
        self._refresher = asyncio.create_task(self._jwks.run(), name="jwks-refresh")

    @property
    def keys_missing(self) -> bool:
        """True while a configured JWKS has never loaded (tokens signed with its keys cannot be checked)."""
        return self._jwks is not None and not self._jwks.loaded

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            await asyncio.gather(self._refresher, return_exceptions=True)
            self._refresher = None
        if self._jwks is not None:
            await self._jwks.close()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def authenticate(self, authorization: list[str]) -> Principal:
        """`authorization`: every value of the Authorization header. Raises Unauthorized."""
        if not authorization:
            raise Unauthorized(MISSING)
        try:
            token = _bearer(authorization)
            known = self._verified.get(token)
            if known is not None and self._current_key(known.alg, known.kid) is known.key:
                try:
                    self._check_times(known.principal.claims)
                except _Reject:
                    del self._verified[token]
                    raise
                return known.principal
            header = _header(token)
            key = await self._key(header)
            payload = orjson.loads(
                self._jws.decode_complete(token, key=key, algorithms=[header["alg"]])["payload"]
            )
            principal = self._principal(payload)
            self._remember(token, _Verified(principal, key, header["alg"], header.get("kid")))
            return principal
        except (_Reject, jwt.PyJWTError, orjson.JSONDecodeError) as exc:
            log.debug("token refused: %s", type(exc).__name__ if not isinstance(exc, _Reject) else exc)
            raise Unauthorized(INVALID) from None

    async def _key(self, header: dict[str, Any]) -> Any:
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str) or alg not in self._algorithms:
            raise _Reject("algorithm not allowed")
        if "crit" in header or "b64" in header:
            raise _Reject("critical header extensions are not supported")
        if kid is not None and (not isinstance(kid, str) or len(kid) > MAX_KID_CHARS):
            raise _Reject("bad kid")
        key = self._static.get(alg)
        if key is None and self._jwks is not None:
            key = await self._jwks.key_for(kid, alg)
            if key is None and not self._jwks.loaded:
                raise ServiceUnavailable(KEYS_UNAVAILABLE, headers={"retry-after": str(_KEYS_RETRY_AFTER_S)})
        if key is None:
            raise _Reject("no key for this kid/alg")
        return key

    def _remember(self, token: str, entry: _Verified) -> None:
        if len(self._verified) >= _VERIFIED_MAX:  # forget the oldest entry
            del self._verified[next(iter(self._verified))]
        self._verified[token] = entry

    def _current_key(self, alg: str, kid: str | None) -> Any:
        """The key that verifies (alg, kid) now, without fetching; None when there is none."""
        key = self._static.get(alg)
        if key is None and self._jwks is not None:
            key = self._jwks.current_key(kid, alg)
        return key

    def _principal(self, payload: Any) -> Principal:
        if not isinstance(payload, dict):
            raise _Reject("payload is not an object")
        self._check_times(payload)
        self._check_audience_issuer(payload)
        s = self._settings
        sub = _text(payload.get("sub"), "sub", _MAX_ID_CHARS)
        tenant = _text(payload.get(s.tenant_claim, sub), "tenant", _MAX_ID_CHARS)
        tier = _text(payload.get(s.tier_claim, "default"), "tier", _MAX_TIER_CHARS)
        models = payload.get(s.models_claim)
        if models is not None and (
            not isinstance(models, list) or not all(isinstance(m, str) for m in models)
        ):
            raise _Reject("models claim must be a list of strings")
        allowed = None if models is None else frozenset(models)
        return Principal(sub, tenant, tier, allowed, MappingProxyType(payload))

    def _check_times(self, payload: Mapping[str, Any]) -> None:
        now, leeway = self._clock(), self._settings.leeway_s
        exp, iat, nbf = (_number(payload, c) for c in ("exp", "iat", "nbf"))
        if exp is None or iat is None:
            raise _Reject("exp and iat are required")
        if exp <= now - leeway:
            raise _Reject("expired")
        if iat > now + leeway or (nbf is not None and nbf > now + leeway):
            raise _Reject("not yet valid")

    def _check_audience_issuer(self, payload: dict[str, Any]) -> None:
        s = self._settings
        if s.issuer and payload.get("iss") != s.issuer:
            raise _Reject("issuer")
        if s.audience:
            aud = payload.get("aud")
            auds = [aud] if isinstance(aud, str) else aud
            if not isinstance(auds, list) or s.audience not in [a for a in auds if isinstance(a, str)]:
                raise _Reject("audience")

    def check_model(self, principal: Principal, model: str) -> None:
        if principal.allowed_models is not None and model not in principal.allowed_models:
            shown = model if len(model) <= 100 else model[:100] + "..."
            raise PermissionDenied(f"This API key is not allowed to use the model '{shown}'.", param="model")


def _bearer(values: list[str]) -> str:
    if len(values) != 1:
        raise _Reject("Authorization header sent more than once")
    value = values[0]
    if len(value) > MAX_HEADER_BYTES:
        raise _Reject("oversized Authorization header")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not _TOKEN_RE.fullmatch(token):
        raise _Reject("not a bearer JWT")
    return token


def _header(token: str) -> dict[str, Any]:
    segment = token.partition(".")[0]
    try:
        header = orjson.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError) as exc:
        raise _Reject("undecodable header") from exc
    if not isinstance(header, dict):
        raise _Reject("header is not an object")
    return header


def _number(payload: Mapping[str, Any], claim: str) -> float | None:
    value = payload.get(claim)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _Reject(f"{claim} is not a number")
    return float(value)


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        raise _Reject(f"{what} must be a non-empty string of at most {limit} characters")
    return value


def read_secret(settings: AuthSettings, state_dir: Path) -> str:
    """The HS secret, never creating one: the configured one, else the one in `state_dir/jwt_secret`;
    "" when that file does not exist (yet) or no HS* is configured. Minting reads it this way."""
    need = _min_secret(settings.algorithms)
    if settings.secret:
        if len(settings.secret.encode()) < need:
            raise ValueError(
                f"auth.secret is shorter than {need} bytes; use a long random value, e.g. "
                "python -c 'import secrets; print(secrets.token_urlsafe(48))'"
            )
        return settings.secret
    if not any(a.startswith("HS") for a in settings.algorithms):
        return ""
    return _read_secret(state_dir / "jwt_secret", need)


def ensure_secret(settings: AuthSettings, state_dir: Path) -> tuple[str, bool]:
    """The HS secret: `read_secret`'s, else one generated into `state_dir/jwt_secret` (mode 0600; only
    `serve` calls this). Returns (secret, generated_now); ("", False) when no HS* is configured."""
    existing = read_secret(settings, state_dir)
    if existing or not any(a.startswith("HS") for a in settings.algorithms):
        return existing, False
    need = _min_secret(settings.algorithms)
    path = state_dir / "jwt_secret"
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    tmp = state_dir / f".jwt_secret.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(secret + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # atomic, and fails if another process won the race
    except FileExistsError:
        return _read_secret(path, need) or secret, False
    finally:
        tmp.unlink(missing_ok=True)
    return secret, True


def _read_secret(path: Path, need: int) -> str:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return ""
    if mode & 0o077:
        log.warning("%s was readable by group/others; setting its mode to 0600", path)
        os.chmod(path, 0o600)
    secret = path.read_text(encoding="utf-8").strip()
    if len(secret.encode()) < need:
        raise ValueError(f"{path} holds a secret shorter than {need} bytes; delete it to regenerate")
    return secret


def mint_token(
    *,
    key: str,
    algorithm: str,
    sub: str,
    tenant: str | None,
    tier: str | None,
    models: list[str] | None,
    ttl_s: int,
    audience: str,
    issuer: str,
    settings: AuthSettings,
    admin: bool = False,
    now: float | None = None,
) -> str:
    """A signed token with the configured claim names (`key`: the HS secret or a PEM private key);
    `admin` adds the claim that opens the web console's data (`auth.admin_claim`)."""
    if algorithm.startswith("HS") and len(key.encode()) < _min_secret({algorithm}):
        raise ValueError(f"{algorithm} secrets must be at least {_min_secret({algorithm})} bytes")
    if ttl_s <= 0:
        raise ValueError("ttl must be positive")
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "sub": sub,
        "iat": issued,
        "exp": issued + ttl_s,
        "jti": secrets.token_urlsafe(12),
    }
    if audience:
        payload["aud"] = audience
    if issuer:
        payload["iss"] = issuer
    if tenant:
        payload[settings.tenant_claim] = tenant
    if tier:
        payload[settings.tier_claim] = tier
    if models is not None:
        payload[settings.models_claim] = list(models)
    if admin:
        payload[settings.admin_claim] = True
    return jwt.encode(payload, key, algorithm=algorithm)


def parse_ttl(text: str) -> int:
    """'90s', '15m', '1h', '7d' (a bare number is seconds) -> seconds."""
    m = _TTL_RE.fullmatch(text)
    if m is None or int(m.group(1)) == 0:
        raise ValueError(f"invalid ttl {text!r}: use e.g. 90s, 15m, 1h or 7d")
    return int(m.group(1)) * _TTL_UNITS[m.group(2)]
