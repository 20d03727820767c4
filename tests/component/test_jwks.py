"""JWKS against a real local HTTP server: start-up fetch, key rotation (background refresh and
unknown-kid refetch), refetch rate limiting, kid injection and an unreachable IdP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.auth.authenticator import Authenticator
from proxy.errors import ServiceUnavailable, Unauthorized
from proxy.settings import AuthSettings
from tests.jwt_helpers import public_jwk


@dataclass
class IdP:
    keys: list[dict[str, Any]] = field(default_factory=list)
    hits: int = 0
    url: str = ""
    served: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def idp() -> AsyncIterator[IdP]:
    state = IdP()

    async def jwks(_: web.Request) -> web.Response:
        state.hits += 1
        state.served.set()
        return web.json_response({"keys": state.keys})

    app = web.Application()
    app.router.add_get("/.well-known/jwks.json", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}/.well-known/jwks.json"
    yield state
    await runner.cleanup()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "a": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "b": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "e": ec.generate_private_key(ec.SECP256R1()),
    }


def token(key: Any, kid: str, alg: str = "RS256") -> str:
    now = int(time.time())
    return jwt.encode({"sub": "alice", "iat": now, "exp": now + 60}, key, algorithm=alg, headers={"kid": kid})


def settings(url: str, **kw: Any) -> AuthSettings:
    return AuthSettings(algorithms=["RS256", "ES256"], jwks_url=url, **kw)


async def test_rotation_through_unknown_kid_refetch(
    idp: IdP, session: aiohttp.ClientSession, keys: dict[str, Any]
) -> None:
    idp.keys = [public_jwk(keys["a"], "a"), public_jwk(keys["e"], "e")]
    auth = Authenticator(settings(idp.url, jwks_min_refetch_s=0), session=session)
    await auth.start()
    try:
        assert (await auth.authenticate([f"Bearer {token(keys['a'], 'a')}"])).sub == "alice"
        assert (await auth.authenticate([f"Bearer {token(keys['e'], 'e', 'ES256')}"])).sub == "alice"
        idp.keys = [public_jwk(keys["b"], "b")]  # the IdP rotates: a and e retired, b introduced
        assert (await auth.authenticate([f"Bearer {token(keys['b'], 'b')}"])).sub == "alice"
        with pytest.raises(Unauthorized):
            await auth.authenticate([f"Bearer {token(keys['a'], 'a')}"])
        assert idp.hits == 3  # start-up, the unknown "b", the now unknown "a"
    finally:
        await auth.close()


async def test_background_refresh_picks_up_rotation(
    idp: IdP, session: aiohttp.ClientSession, keys: dict[str, Any]
) -> None:
    idp.keys = [public_jwk(keys["a"], "a")]
    auth = Authenticator(settings(idp.url, jwks_cache_s=0.2, jwks_min_refetch_s=3600), session=session)
    await auth.start()
    try:
        idp.served.clear()
        idp.keys = [public_jwk(keys["a"], "a"), public_jwk(keys["b"], "b")]
        await asyncio.wait_for(idp.served.wait(), 5)
        await asyncio.sleep(0.05)  # let the refresh that was just served be stored
        assert (await auth.authenticate([f"Bearer {token(keys['b'], 'b')}"])).sub == "alice"
    finally:
        await auth.close()
    hits = idp.hits
    await asyncio.sleep(0.5)
    assert idp.hits == hits  # close() stopped the refresh task


async def test_unknown_kid_flood_is_rate_limited(
    idp: IdP, session: aiohttp.ClientSession, keys: dict[str, Any]
) -> None:
    idp.keys = [public_jwk(keys["a"], "a")]
    now = [time.time()]
    auth = Authenticator(settings(idp.url, jwks_min_refetch_s=10), session=session, clock=lambda: now[0])
    await auth.start()
    try:
        kids = ["../../etc/passwd", "' OR 1=1 --", "a/../a", "*", *(f"rnd-{i}" for i in range(300))]
        started = time.perf_counter()
        for kid in kids:
            with pytest.raises(Unauthorized):
                await auth.authenticate([f"Bearer {token(keys['a'], kid)}"])
        assert time.perf_counter() - started < 2.0
        assert idp.hits == 1
        now[0] += 10
        flood = [auth.authenticate([f"Bearer {token(keys['a'], f'x{i}')}"]) for i in range(100)]
        results = await asyncio.gather(*flood, return_exceptions=True)
        assert all(isinstance(r, Unauthorized) for r in results)
        assert idp.hits == 2
    finally:
        await auth.close()


async def test_unreachable_idp_starts_without_keys_and_answers_503(
    session: aiohttp.ClientSession, keys: dict[str, Any]
) -> None:
    auth = Authenticator(settings("http://127.0.0.1:9/jwks.json", jwks_min_refetch_s=3600), session=session)
    await auth.start()  # no exception: the gateway starts and says what is missing
    try:
        assert auth.keys_missing
        with pytest.raises(ServiceUnavailable) as info:
            await auth.authenticate([f"Bearer {token(keys['a'], 'a')}"])
        assert int(info.value.headers["retry-after"]) >= 1
    finally:
        await auth.close()


async def test_idp_outage_keeps_last_good_keys(
    idp: IdP, session: aiohttp.ClientSession, keys: dict[str, Any]
) -> None:
    idp.keys = [public_jwk(keys["a"], "a")]
    auth = Authenticator(settings(idp.url, jwks_min_refetch_s=0), session=session)
    await auth.start()
    try:
        idp.keys = []  # a broken document: no usable key
        with pytest.raises(Unauthorized):
            await auth.authenticate([f"Bearer {token(keys['b'], 'b')}"])
        assert (await auth.authenticate([f"Bearer {token(keys['a'], 'a')}"])).sub == "alice"
    finally:
        await auth.close()
