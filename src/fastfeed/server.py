"""The gateway process, for callers of its old place: see `fastfeed.gateway.app`."""

from .gateway.app import SUBPROTOCOLS, Gateway, serve

__all__ = ["SUBPROTOCOLS", "Gateway", "serve"]
