"""JWT test helpers shared by the unit, component and e2e auth tests."""

from __future__ import annotations

import base64
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa

DROP = object()  # a claim value meaning "leave this claim out"


def with_claims(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` applied; a claim set to DROP is removed."""
    out = dict(base)
    for k, v in over.items():
        if v is DROP:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def b64(data: bytes) -> str:
    """base64url without padding, as JWS segments are written."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def public_jwk(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    """The public half of `key` as a JWKS entry with `kid` and use "sig"."""
    if isinstance(key, rsa.RSAPrivateKey):
        data = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())
    else:
        data = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())
    return {**orjson.loads(data), "kid": kid, "use": "sig"}
