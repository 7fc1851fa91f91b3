"""`fastfeed serve | publish | token`."""

from __future__ import annotations

import argparse
import logging
import sys

from . import config, logs

log = logging.getLogger("fastfeed")


def _serve(ns: argparse.Namespace) -> int:
    cfg = config.from_sources(ns)
    logs.setup(cfg.log_level, cfg.log_format)
    from . import workers

    return workers.main(cfg)


def _token(ns: argparse.Namespace) -> int:
    from . import auth

    cfg = config.from_sources(None)
    secret = ns.secret or cfg.secret()
    if not secret:
        print("fastfeed token: no secret: pass --secret, or set FASTFEED_JWT_SECRET "
              "or FASTFEED_JWT_SECRET_FILE", file=sys.stderr)
        return 2
    syms = [s for s in ns.syms.split(",") if s] if ns.syms else None
    rt = [s for s in ns.rt.split(",") if s] if ns.rt else None
    if ns.delay < 0:
        print("fastfeed token: --delay is seconds, 0 or more", file=sys.stderr)
        return 2
    if rt and not ns.delay:
        print("fastfeed token: --rt names symbols real time despite --delay: give --delay too",
              file=sys.stderr)
        return 2
    print(auth.issue(secret, ns.sub, syms, ns.ttl, ns.delay, rt))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fastfeed", description="Real-time market-data WebSocket gateway.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser(
        "serve", help="run the gateway",
        description="Run the gateway. Every flag can also be set as FASTFEED_<FLAG> in the "
                    "environment (e.g. FASTFEED_FRAME_MS=16); a flag wins over the environment.")
    config.add_arguments(p)
    p.set_defaults(func=_serve)
    t = sub.add_parser("token", help="print a client token (HS256 JWT) for operators")
    t.add_argument("--sub", default="anonymous",
                   help="who the token is for, as the gateway's logs name its clients "
                        "(default anonymous: one token for many users, such as the "
                        "delayed token of an app's free tier)")
    t.add_argument("--syms", default="",
                   help="comma-separated symbol globs it may see (default all)")
    t.add_argument("--delay", type=int, default=0,
                   help="seconds its data is delayed (e.g. 900: 15 minutes; default 0, real "
                        "time); a gateway refuses a token over its --max-delay-s")
    t.add_argument("--rt", default="",
                   help="comma-separated symbol globs it sees in real time despite --delay")
    t.add_argument("--ttl", type=float, default=86400.0, help="seconds until it expires")
    t.add_argument("--secret", default="",
                   help="signing secret (default: FASTFEED_JWT_SECRET[_FILE])")
    t.set_defaults(func=_token)
    from .feed import publish

    publish.add_publish_parser(sub)
    ns = parser.parse_args(argv)
    return ns.func(ns)


if __name__ == "__main__":
    sys.exit(main())
