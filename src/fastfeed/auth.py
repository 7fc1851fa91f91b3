"""Client tokens (HS256 JWT) and the entitlements they carry."""

from __future__ import annotations

import fnmatch
import hmac
import re
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import jwt


class AuthError(Exception):
    """The token is missing, malformed, badly signed or expired (HTTP 401)."""


@dataclass(frozen=True)
class Entitlements:
    """What a connection may see: glob patterns over symbols; None means everything."""

    subject: str = "anonymous"
    patterns: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        rx = None
        if self.patterns is not None:
            rx = re.compile("|".join(fnmatch.translate(p) for p in self.patterns) or "(?!)")
        object.__setattr__(self, "_rx", rx)

    def allows(self, sym: str) -> bool:
        rx = self._rx  # type: ignore[attr-defined]
        return rx is None or rx.match(sym) is not None


EVERYTHING = Entitlements()


def token_from_request(path: bytes, headers) -> str | None:
    """The token of an upgrade request, as sent. picows decodes header bytes
    as ASCII with surrogate escapes: a byte over 0x7f stays in the string as
    a lone surrogate, which `verify` and `publisher_ok` refuse as a bad token."""
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    query = parse_qs(urlsplit(path.decode("latin-1")).query)
    vals = query.get("token")
    return vals[0] if vals else None


def verify(token: str | None, secret: str) -> Entitlements:
    if not token:
        raise AuthError("no token: send 'Authorization: Bearer <jwt>' or ?token=<jwt>")
    if not token.isascii():
        raise AuthError("invalid token: a JWT is ASCII (base64url parts and dots)")
    try:
        claims = jwt.decode(token, secret, algorithms=["HS256"],
                            options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError:
        raise AuthError("token expired") from None
    except jwt.InvalidTokenError as e:
        raise AuthError(f"invalid token: {e}") from None
    syms = claims.get("syms")
    if syms is None:
        patterns = None
    elif isinstance(syms, list) and all(isinstance(s, str) for s in syms):
        patterns = tuple(syms)
    else:
        raise AuthError("invalid token: 'syms' must be a list of glob patterns")
    return Entitlements(str(claims["sub"]), patterns)


def issue(secret: str, sub: str, syms: list[str] | None, ttl_s: float) -> str:
    claims: dict = {"sub": sub, "exp": int(time.time() + ttl_s)}
    if syms is not None:
        claims["syms"] = syms
    return jwt.encode(claims, secret, algorithm="HS256")


def publisher_ok(presented: str | None, expected: str) -> bool:
    # surrogateescape: the bytes as sent (see token_from_request), which then cannot match
    return presented is not None and hmac.compare_digest(
        presented.encode("utf-8", "surrogateescape"), expected.encode())
