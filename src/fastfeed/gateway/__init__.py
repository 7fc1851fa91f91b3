"""The gateway: one worker's sockets, sessions and frame clock, in parts.

    app        wiring and lifecycle (start, drain, stop): the only part that knows every other
    routes     the HTTP routes of the one port, and the upgrades to /ws, /ingest, /echo
    session    one client connection (its protocol, limits, flow control)
    registry   the sessions of the worker, connections per address, their limits
    clock      the frame clock and its pacing
    httpfront  the request lines picows refuses (HEAD, HTTP/1.0, OPTIONS)
    framing    what RFC 6455 leaves to the application, for every endpoint

Each imports only parts listed below it (docs/layout.md). This file imports
nothing, so a lower layer (feed/ingest.py takes `framing`) can import one
part without the rest.
"""
