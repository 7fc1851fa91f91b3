"""The HTTP routes of the one port, and the upgrades to /ws, /ingest and /echo."""

from __future__ import annotations

import logging
import mimetypes
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from picows import (
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
)

from .. import auth, metrics
from .. import protocol as P
from ..config import Config
from ..feed.ingest import IngestSource
from .framing import EchoListener, FramingContext
from .registry import Registry
from .session import Session, SessionContext

log = logging.getLogger("fastfeed.server")
INTERNAL_ERROR_LOG_EVERY_S = 60.0  # one log line per kind of unexpected error


def _tokens(headers, name: str) -> set[str]:
    """The comma-separated tokens of every `name` header, lowercased."""
    return {t.strip().lower() for v in headers.getall(name, ()) for t in v.split(",")}


def _shown(value: str, limit: int = 100) -> str:
    """A header value fit to quote in a reply: picows decodes header bytes as
    ASCII with surrogate escapes, so a byte over 0x7f comes back as \\xNN."""
    try:
        text = value.encode("ascii", "surrogateescape").decode("ascii", "backslashreplace")
    except UnicodeEncodeError:
        text = ascii(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _resp(status: int, body: bytes, ctype: str = "text/plain; charset=utf-8", **headers: str):
    hdrs = {"Content-Type": ctype, "Cache-Control": "no-store", **headers}
    if status == 200:
        r = WSUpgradeResponse.create_ok_response(body, extra_headers=hdrs)
    else:
        r = WSUpgradeResponse.create_error_response(status, body, extra_headers=hdrs)
    return WSUpgradeResponseWithListener(r, None)


def _load_web() -> dict[bytes, tuple[bytes, str]]:
    out = {}
    root = resources.files("fastfeed") / "web"
    if root.is_dir():
        for f in root.iterdir():
            if f.is_file():
                ctype = mimetypes.guess_type(f.name)[0] or "application/octet-stream"
                if f.name.endswith(".js"):
                    ctype = "text/javascript"
                if ctype.startswith("text/"):
                    ctype += "; charset=utf-8"
                out[b"/" + f.name.encode()] = (f.read_bytes(), ctype)
    if b"/index.html" in out:
        out[b"/"] = out[b"/index.html"]
    return out


class Routes:
    """picows' listener factory, and the HTTP router: what each request gets."""

    def __init__(self, cfg: Config, *, registry: Registry, metrics: Any, link: FramingContext,
                 session_ctx: SessionContext, ingest: IngestSource,
                 draining: Callable[[], bool], ready_reasons: Callable[[], list[str]]) -> None:
        self.registry = registry
        self.metrics = metrics
        self.link = link
        self.session_ctx = session_ctx
        self.ingest = ingest
        self.draining = draining
        self.ready_reasons = ready_reasons
        self.max_connections = cfg.max_connections
        self.echo = cfg.conformance_echo
        self.secret = cfg.secret()
        self.publisher_token = cfg.publisher_secret()
        self.origins = {o.strip() for o in cfg.allowed_origins.split(",") if o.strip()}
        self.web = _load_web()
        self._internal_errors: dict[str, float] = {}
        self.max_delay_s = cfg.max_delay_s
        self._delay_refused_logged_at = -INTERNAL_ERROR_LOG_EVERY_S

    def safely(self, route: Callable[[WSUpgradeRequest], Any], req: WSUpgradeRequest):
        """`route(req)`, which never raises: an unexpected error is logged and
        answered with a plain 500, never with the exception's text (picows
        would put that in the body)."""
        try:
            return route(req)
        except Exception as e:
            kind = type(e).__name__
            now = time.monotonic()
            if now - self._internal_errors.get(kind, -1e9) >= INTERNAL_ERROR_LOG_EVERY_S:
                self._internal_errors[kind] = now
                log.error("unexpected %s answering %s %s: answered 500 (logged once a minute "
                          "per kind)", kind, req.method.decode("latin-1"),
                          _shown(req.path.decode("latin-1")), exc_info=True)
            self.metrics.rejected_upgrades.labels("500").inc()
            return _resp(500, b"internal error; it is logged at the gateway\n")

    def route(self, req: WSUpgradeRequest):
        path = req.path.split(b"?", 1)[0]
        if path == b"/ws":
            return self._upgrade_client(req)
        if path == b"/ingest":
            return self._upgrade_ingest(req)
        if path == b"/echo" and self.echo:
            return self._upgrade_echo(req)
        if path == b"/healthz":
            return _resp(200, b"ok\n")
        if path == b"/readyz":
            reasons = self.ready_reasons()
            if reasons:
                return _resp(503, ("not ready: " + "; ".join(reasons) + "\n").encode())
            return _resp(200, b"ready\n")
        if path == b"/metrics":
            body, ctype = metrics.render()
            return _resp(200, body, ctype)
        page = self.web.get(path)
        if page is not None:
            return _resp(200, page[0], page[1])
        return _resp(404, b"not found: try /, /ws, /ingest, /healthz, /readyz, /metrics\n")

    def _refuse(self, status: int, why: str, **headers: str):
        self.metrics.rejected_upgrades.labels(str(status)).inc()
        return _resp(status, (why + "\n").encode("utf-8", "backslashreplace"), **headers)

    def _not_upgradable(self, req: WSUpgradeRequest, path: str):
        """A refusal, or None for a WebSocket handshake picows will accept.

        RFC 6455 asks that Connection *contain* the token "upgrade" and Upgrade
        the token "websocket"; picows, validating after this factory, compares
        the whole first header of each (`Connection: keep-alive, Upgrade` from
        older Firefox and some proxies would get its 400). So the request's
        headers are normalised here to what picows reads, once checked."""
        h = req.headers
        if "websocket" not in _tokens(h, "Upgrade"):
            return self._refuse(426, f"upgrade required: {path} is a WebSocket endpoint",
                                Upgrade="websocket")
        if "upgrade" not in _tokens(h, "Connection"):
            return self._refuse(400, "a WebSocket handshake needs 'upgrade' in its Connection "
                                     "header")
        for name in ("Sec-WebSocket-Key", "Sec-WebSocket-Version", "Sec-WebSocket-Protocol"):
            for v in h.getall(name, ()):
                if not v.isascii():  # picows would fail on it with an encoding error
                    return self._refuse(400, f"{name} is not ASCII: {_shown(v)}")
        h["Upgrade"] = "websocket"
        h["Connection"] = "Upgrade"
        return None

    def _upgrade_client(self, req: WSUpgradeRequest):
        refusal = self._not_upgradable(req, "/ws")
        if refusal is not None:
            return refusal
        if self.draining():
            return self._refuse(503, "draining for a restart: connect to another replica")
        if len(self.registry) >= self.max_connections:
            return self._refuse(503, f"worker is at its {self.max_connections} connections")
        if self.origins:
            origin = req.headers.get("Origin")
            if origin is not None and origin not in self.origins:
                return self._refuse(403, f"origin {_shown(origin)} is not allowed")
        ent = auth.EVERYTHING
        if self.secret:
            try:
                ent = auth.verify(auth.token_from_request(req.path, req.headers), self.secret,
                                  self.max_delay_s)
                if ent.delay and self.session_ctx.delayed is not None:
                    self.session_ctx.delayed(ent.delay)  # its channels, made now or refused
            except auth.DelayRefused as e:
                # a valid token this gateway cannot serve: the operator's mismatch, so logged
                now = time.monotonic()
                if now - self._delay_refused_logged_at >= INTERNAL_ERROR_LOG_EVERY_S:
                    self._delay_refused_logged_at = now
                    log.warning("refused a client token (403): %s (logged once a minute)", e)
                return self._refuse(403, str(e))
            except auth.AuthError as e:
                return self._refuse(401, str(e))
        offered = [p.strip() for p in req.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        offered = [p for p in offered if p]
        chosen = next((p for p in offered if p in P.SUBPROTOCOLS), None)
        if offered and chosen is None:
            return self._refuse(
                400, f"unsupported subprotocol; offer one of {', '.join(P.SUBPROTOCOLS)}")
        session = Session(self.session_ctx, ent,
                          chosen in (P.BIN_SUBPROTOCOL, P.COMPACT_BIN_SUBPROTOCOL), "",
                          compact=chosen in (P.COMPACT_SUBPROTOCOL, P.COMPACT_BIN_SUBPROTOCOL))
        headers = {"Sec-WebSocket-Protocol": chosen} if chosen else None
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_101_response(extra_headers=headers), session)

    def _upgrade_ingest(self, req: WSUpgradeRequest):
        refusal = self._not_upgradable(req, "/ingest")
        if refusal is not None:
            return refusal
        if self.publisher_token:
            if not auth.publisher_ok(auth.token_from_request(req.path, req.headers),
                                     self.publisher_token):
                return self._refuse(401, "publisher token missing or wrong")
            return self.ingest.session(trusted=True)
        return self.ingest.session(trusted=False)

    def _upgrade_echo(self, req: WSUpgradeRequest):
        """A testing aid (--conformance-echo): an echo on the framing /ws uses."""
        refusal = self._not_upgradable(req, "/echo")
        if refusal is not None:
            return refusal
        return EchoListener(self.link)
