"""Client tokens (HS256 JWT) and the entitlements they carry."""

from __future__ import annotations

import fnmatch
import hmac
import re
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

import jwt

DEFAULT_MAX_DELAY_S = 900  # --max-delay-s: the longest delay a token may ask for


class AuthError(Exception):
    """The token is missing, malformed, badly signed or expired (HTTP 401)."""


class DelayRefused(AuthError):
    """A valid token asking for a longer delay than this gateway keeps (HTTP 403:
    who it is is known, and sending it again will not help)."""


def _globs(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(fnmatch.translate(p) for p in patterns) or "(?!)")


@dataclass(frozen=True)
class Entitlements:
    """What a connection may see: glob patterns over symbols; None means everything.

    `delay` (seconds, 0: real time) is how old everything it sees must be,
    except the symbols matching `rt` (docs/protocol.md, "Delayed data")."""

    subject: str = "anonymous"
    patterns: tuple[str, ...] | None = None
    delay: int = 0
    rt: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        rx = None
        if self.patterns is not None:
            rx = _globs(self.patterns)
        object.__setattr__(self, "_rx", rx)
        object.__setattr__(self, "_rt", _globs(self.rt))

    def allows(self, sym: str) -> bool:
        rx = self._rx  # type: ignore[attr-defined]
        return rx is None or rx.match(sym) is not None

    def sees_every_symbol(self) -> bool:
        """May see every symbol (the market-wide tape asks it): no `syms` claim
        or a pattern `*`. Delayed or not: see `tape_delayed`."""
        return self.patterns is None or "*" in self.patterns

    def tape_delayed(self) -> bool:
        """Is the market-wide tape served to this holder delayed? Yes unless
        `rt` holds the pattern `*` itself: the tape mixes every symbol, so any
        narrower `rt` (even one that matches the string "*") leaves it delayed."""
        return self.delay > 0 and "*" not in self.rt

    def delayed(self, sym: str) -> bool:
        """Is `sym` served to this holder delayed (by `delay` seconds)?"""
        return self.delay > 0 and self._rt.match(sym) is None  # type: ignore[attr-defined]


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


def verify(token: str | None, secret: str,
           max_delay_s: int = DEFAULT_MAX_DELAY_S) -> Entitlements:
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
    delay = claims.get("delay", 0)
    if not isinstance(delay, int) or isinstance(delay, bool) or delay < 0:
        raise AuthError("invalid token: 'delay' must be a whole number of seconds, 0 or more")
    rt = claims.get("rt", [])
    if not isinstance(rt, list) or not all(isinstance(s, str) for s in rt):
        raise AuthError("invalid token: 'rt' must be a list of glob patterns")
    if delay > max_delay_s:
        raise DelayRefused(
            f"token asks for data delayed {delay}s; this gateway keeps at most "
            f"{max_delay_s}s of past (--max-delay-s): mint it with a delay of at most "
            f"{max_delay_s}, or raise the gateway's --max-delay-s")
    return Entitlements(str(claims["sub"]), patterns, delay, tuple(rt))


def issue(secret: str, sub: str, syms: list[str] | None, ttl_s: float, delay: int = 0,
          rt: list[str] | None = None) -> str:
    claims: dict = {"sub": sub, "exp": int(time.time() + ttl_s)}
    if syms is not None:
        claims["syms"] = syms
    if delay:
        claims["delay"] = delay
    if rt:
        claims["rt"] = rt
    return jwt.encode(claims, secret, algorithm="HS256")


def publisher_ok(presented: str | None, expected: str) -> bool:
    # surrogateescape: the bytes as sent (see token_from_request), which then cannot match
    return presented is not None and hmac.compare_digest(
        presented.encode("utf-8", "surrogateescape"), expected.encode())
