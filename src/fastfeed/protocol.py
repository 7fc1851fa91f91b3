"""The wire contract's names and numbers, written once (docs/protocol.md says what they mean).

Everything that speaks the protocol imports these: the gateway, the Python
client and publisher, the reference model, the metrics. The compiled core
keeps C-level copies of the field list and tick sources (it needs them as C
constants); `tests/test_protocol_module.py` holds them, and the web client's
`fastfeed.js`, equal to these.

This module imports nothing: it is the bottom layer, below everything.
"""

from __future__ import annotations

# ---- rows

#: a row's fields, in the order of snapshot rows, update rows and binary records
FIELDS = ("sym", "seq", "ts", "bid", "ask", "last", "bid_size", "ask_size", "last_size", "volume")
#: the fields a tick may set besides sym, seq and ts (all numbers)
VALUE_FIELDS = FIELDS[3:]
#: the integer fields (seq, ts); every value field is a number (a float)
INT_FIELDS = FIELDS[1:3]

# ---- channels (version 1.1): what a subscription is to

#: the version 1 channel, meant by a request that names no `channels`
QUOTE_CHANNEL = "quote"
#: the order book: the best BOOK_DEPTH levels per side
BOOK_CHANNEL = "book"
#: levels per side the gateway serves by default (the book checksum covers them)
BOOK_DEPTH = 10

# ---- subprotocols and binary formats

JSON_SUBPROTOCOL = "fastfeed.v1.json"
BIN_SUBPROTOCOL = "fastfeed.v1.bin"  # update frames binary, everything else JSON
#: update frames' quote rows carry only the fields changed since the previous frame
COMPACT_SUBPROTOCOL = "fastfeed.v1.compact"
#: the same, binary: quote rows in FFC1 frames, everything else as on fastfeed.v1.bin
COMPACT_BIN_SUBPROTOCOL = "fastfeed.v1.compact.bin"
SUBPROTOCOLS = (JSON_SUBPROTOCOL, BIN_SUBPROTOCOL, COMPACT_SUBPROTOCOL,
                COMPACT_BIN_SUBPROTOCOL)  # the gateway's preference
BIN_MAGIC = b"FFB1"  # a binary update frame
COMPACT_BIN_MAGIC = b"FFC1"  # a compact binary update frame
BATCH_MAGIC = b"FFT1"  # a binary tick batch (/ingest, the Redis bus)
TRADE_BATCH_MAGIC = b"FTR1"  # a binary trade batch (/ingest, the Redis bus)

# ---- version 1.1: trades and bars

TYPE_QUOTE = "quote"
TYPE_TRADE = "trade"
TYPE_BOOK = "book"
#: the `type`s /ingest takes (an object without `type` is a quote)
INGEST_TYPES = (TYPE_QUOTE, TYPE_BOOK, TYPE_TRADE)
#: a trade's side: buyer aggressed, seller aggressed, not said
TRADE_SIDES = ("b", "s", "")
#: bar intervals, in item order (bar item id = instrument id * 6 + index)
BAR_INTERVALS = ("1s", "1m", "5m", "15m", "1h", "1d")
#: the symbol of the market-wide tape on the trades channel
TAPE_SYMBOL = "*"
TRADES_CHANNEL = "trades"
#: one channel per bar interval, "bars:1m" and so on
BAR_CHANNELS = tuple(f"bars:{iv}" for iv in BAR_INTERVALS)

# ---- close codes the gateway sends (RFC 6455 7.4), and what each means

CLOSE_IDLE = 1001  # sent by picows: no answer to its pings for --idle-timeout-s
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_TEXT = 1007
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL_ERROR = 1011
CLOSE_RESTART = 1012
CLOSE_TRY_AGAIN_LATER = 1013

CLOSE_MEANINGS = {
    CLOSE_IDLE: "the client answered no protocol ping for --idle-timeout-s",
    CLOSE_PROTOCOL_ERROR: "a framing error, or a close frame with a code no endpoint may send",
    CLOSE_INVALID_TEXT: "a text frame that is not valid UTF-8",
    CLOSE_POLICY: "request flood, unread replies over --max-queued-bytes, too many connections "
                  "from one address, a stall, /ingest from afar without a publisher token",
    CLOSE_TOO_BIG: "a message over the endpoint's size limit",
    CLOSE_INTERNAL_ERROR: "an internal error (a bug) met on this connection",
    CLOSE_RESTART: "draining for a restart: reconnect to any replica, resubscribe with since",
    CLOSE_TRY_AGAIN_LATER: "no market data here yet: reconnect after a backoff",
}
#: every close code the gateway sends by itself (the label set of fastfeed_closes)
CLOSE_CODES = tuple(CLOSE_MEANINGS)
#: close codes that say the client itself did wrong: reconnecting would repeat it
CLIENT_FAULT_CLOSE_CODES = frozenset({1002, 1003, 1007, 1008, 1009, 1010})
#: what an endpoint reports for a close that carried no code: never on the wire (RFC 6455 7.4.1)
CLOSE_NO_STATUS = 1005  # a close frame without a code
CLOSE_ABNORMAL = 1006  # the connection went away without a close frame

# ---- error codes of {"type":"error"} replies (/ws and /ingest)

BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
NOT_SUBSCRIBED = "not_subscribed"
TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
TOO_MANY_WATCHED = "too_many_watched"
RATE_LIMITED = "rate_limited"
FORBIDDEN = "forbidden"
UNAVAILABLE = "unavailable"  # /ingest in Redis mode: the bus is down, nothing published
#: every error code (the label set of fastfeed_errors)
ERROR_CODES = (BAD_REQUEST, UNKNOWN_OP, NOT_SUBSCRIBED, TOO_MANY_SUBSCRIPTIONS,
               TOO_MANY_WATCHED, RATE_LIMITED, FORBIDDEN, UNAVAILABLE)

# ---- status messages

FEED_UP = b'{"type":"status","feed":"up"}'
FEED_DOWN = b'{"type":"status","feed":"down"}'

# ---- metric label sets: exported at 0 from the start, so a rate() or an
# alert sees 0 instead of no series until the first event

TICK_SOURCES = ("ingest", "bus", "simulator")  # the core counts ticks per source in this order
TICK_OUTCOMES = ("applied", "stale", "rejected")
#: HTTP statuses of refused upgrades known in advance (a 500 is counted when it happens)
UPGRADE_STATUSES = (400, 401, 403, 426, 503)
