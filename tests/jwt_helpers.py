"""JWT test helpers shared by the unit, component and e2e auth tests."""

from __future__ import annotations

import base64
from typing import Any

import jwt
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, rsa


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
