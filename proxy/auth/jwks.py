"""Public keys from a JWKS URL, by `kid`: fetched with the gateway's aiohttp session, refreshed every
`jwks_cache_s`, and refetched on an unknown kid at most once per `jwks_min_refetch_s`."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.settings import AuthSettings

log = logging.getLogger(__name__)

MAX_KID_CHARS = 256
_MIN_RSA_BITS = 2048
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1"}
_JWKS_MAX_BYTES = 1 << 20
_JWKS_TIMEOUT_S = 5.0
_JWKS_RETRY_S = 30.0  # after a failed background refresh (the longest wait while none ever loaded)
_JWKS_FIRST_RETRY_S = 1.0  # while no key set ever loaded: retry after 1 s, doubling up to _JWKS_RETRY_S


def key_fits(alg: str, key: Any) -> bool:
    """Whether an asymmetric public key can verify `alg` (RSA for RS*, the right curve for ES*)."""
    if alg.startswith("RS"):
        return isinstance(key, rsa.RSAPublicKey) and key.key_size >= _MIN_RSA_BITS
    return isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _CURVES.get(alg)


class JwksCache:
    """Public keys by `kid` from a JWKS URL: refreshed every `jwks_cache_s`, and on an unknown kid at
    most once per `jwks_min_refetch_s` (single flight), so random kids cannot hammer the IdP."""

    def __init__(
        self,
        url: str,
        algorithms: frozenset[str],
        settings: AuthSettings,
        session: aiohttp.ClientSession,
        clock: Callable[[], float],
    ) -> None:
        self._url, self._algorithms, self._session, self._clock = url, algorithms, session, clock
        self._cache_s, self._min_refetch_s = settings.jwks_cache_s, settings.jwks_min_refetch_s
        self._keys: dict[str, tuple[frozenset[str], Any]] = {}
        self._last_attempt = -math.inf
        self._inflight: asyncio.Task[bool] | None = None
        self._last_ok = False
        self.fetches = 0  # completed fetch attempts, for metrics and tests

    async def key_for(self, kid: str | None, alg: str) -> Any | None:
        if self._lookup(kid) is None and self._clock() - self._last_attempt >= self._min_refetch_s:
            await self.refresh()
        return self.current_key(kid, alg)

    def current_key(self, kid: str | None, alg: str) -> Any | None:
        """The key for (kid, alg) in the set held now, without fetching."""
        entry = self._lookup(kid)
        return entry[1] if entry is not None and alg in entry[0] else None

    def _lookup(self, kid: str | None) -> tuple[frozenset[str], Any] | None:
        if kid is None:  # tolerated only while the set holds exactly one key
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def refresh(self) -> bool:
        """Fetch now, sharing one in-flight request among all callers. True when keys were loaded."""
        if self._inflight is None:
            self._last_attempt = self._clock()
            self._inflight = asyncio.create_task(self._fetch(), name="jwks-fetch")
            self._inflight.add_done_callback(self._clear_inflight)
        return await asyncio.shield(self._inflight)

    def _clear_inflight(self, _task: asyncio.Task[bool]) -> None:
        self._inflight = None

    async def _fetch(self) -> bool:
        try:
            timeout = aiohttp.ClientTimeout(total=_JWKS_TIMEOUT_S)
            async with self._session.get(self._url, timeout=timeout) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = await resp.content.read(_JWKS_MAX_BYTES + 1)
            if len(body) > _JWKS_MAX_BYTES:
                raise ValueError("JWKS document too large")
            keys = self._parse(orjson.loads(body))
        except (aiohttp.ClientError, TimeoutError, ValueError, TypeError) as exc:
            # the type too: a timeout or a refused connection has no text of its own
            reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            log.warning("JWKS fetch from %s failed: %s", self._url, reason)
            self._last_ok = False
            return False
        finally:
            self.fetches += 1
        self._keys, self._last_ok = keys, True
        return True

    def _parse(self, doc: Any) -> dict[str, tuple[frozenset[str], Any]]:
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError("not a JWKS document")
        keys: dict[str, tuple[frozenset[str], Any]] = {}
        for jwk in doc["keys"]:
            parsed = self._parse_key(jwk)
            if parsed is not None:
                keys[parsed[0]] = parsed[1]
        if not keys:
            raise ValueError("JWKS holds no usable signing key")
        return keys

    def _parse_key(self, jwk: Any) -> tuple[str, tuple[frozenset[str], Any]] | None:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig" or jwk.get("kty") not in ("RSA", "EC"):
            return None  # symmetric ("oct") keys are never taken from a URL
        kid = jwk.get("kid", "")
        if not isinstance(kid, str) or len(kid) > MAX_KID_CHARS:
            return None
        wanted = {jwk["alg"]} if isinstance(jwk.get("alg"), str) else self._algorithms
        family = sorted(
            a for a in wanted & self._algorithms if a.startswith("RS" if jwk["kty"] == "RSA" else "ES")
        )
        if not family:
            return None
        try:
            key = jwt.PyJWK(jwk, algorithm=family[0]).key
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            return None
        if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            key = key.public_key()
        algs = frozenset(a for a in family if key_fits(a, key))
        return (kid, (algs, key)) if algs else None

    @property
    def loaded(self) -> bool:
        """Whether a key set was ever loaded (a later failed refresh keeps the last good one)."""
        return bool(self._keys)

    async def run(self) -> None:
        """Background refresh: every `jwks_cache_s`, sooner after a failure (from 1 s, doubling,
        while no set ever loaded); keeps the last good set."""
        backoff = _JWKS_FIRST_RETRY_S
        while True:
            if self._last_ok:
                wait, backoff = self._cache_s, _JWKS_FIRST_RETRY_S
            elif self.loaded:
                wait = _JWKS_RETRY_S
            else:
                wait, backoff = backoff, min(backoff * 2, _JWKS_RETRY_S)
            await asyncio.sleep(min(wait, self._cache_s))
            await self.refresh()

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
            await asyncio.gather(self._inflight, return_exceptions=True)
