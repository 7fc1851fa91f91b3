"""Gateway settings: one dataclass, filled from flags, then `FASTFEED_*` env vars.

Every field is a `fastfeed serve` flag (`--frame-ms`) and an environment
variable (`FASTFEED_FRAME_MS`). A flag given on the command line wins over the
environment; the environment wins over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _opt(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # network
    host: str = _opt("0.0.0.0", "address to listen on")
    port: int = _opt(8080, "TCP port for /ws, /ingest, /healthz, /readyz, /metrics and /")
    # feed
    simulate: int = _opt(0, "run the built-in simulated feed with N instruments (0: off)")
    rate: float = _opt(2000.0, "simulated ticks per second, all instruments together")
    seed: int = _opt(0, "random seed of the simulated feed (0: random)")
    trades_per_tick: float = _opt(0.25, "simulated trades per simulated quote tick: they print "
                                        "at the quoted best bid or ask (0: no trades)")
    record: str = _opt("", "append every tick this gateway applies, with its arrival time, to "
                           "this file (docs/replay.md; one worker only)")
    replay: str = _opt("", "play this recording back as a source (docs/replay.md)")
    replay_speed: str = _opt("1", "replay speed: 1 keeps the recorded timing, 10 is ten times "
                                  "faster, max as fast as possible", aliases=("--speed",))
    # frames
    frame_ms: int = _opt(16, "default update frame interval per connection, milliseconds")
    min_frame_ms: int = _opt(16, "smallest frame interval a client may ask for with configure")
    max_frame_ms: int = _opt(40, "under load, frame intervals stretch evenly up to this "
                                 "(the latency budget) instead of saturating the worker")
    heartbeat_s: float = _opt(5.0, "send a heartbeat after this many quiet seconds")
    # scale-out
    workers: str = _opt("1", "worker processes: a number, or 'auto' for one per usable CPU")
    redis: str = _opt("", "Redis URL for the tick bus and state store "
                                  "(redis://, rediss://, unix://, redis+sentinel://HOST:PORT,.../"
                                  "NAME for Sentinel, or redis+cluster://HOST:PORT,HOST:PORT,"
                                  "... for a Redis Cluster; empty: embedded mode)")
    redis_channels: int = _opt(16, "pub/sub channels ticks are partitioned over, by symbol")
    redis_prefix: str = _opt("fastfeed", "prefix of every Redis key and channel")
    feed_grace_s: float = _opt(5.0, "seconds the feed may be down before /readyz turns 503")
    # limits
    max_message_bytes: int = _opt(65536, "largest client message; over it: close 1009")
    max_ingest_bytes: int = _opt(4 * 1024 * 1024, "largest /ingest message; over it: close 1009")
    requests_per_s: float = _opt(50.0, "client requests per second (token bucket refill)")
    request_burst: int = _opt(100, "client request burst (token bucket size)")
    abuse_strikes: int = _opt(20, "rate_limited replies in a row before closing with 1008")
    max_subscriptions: int = _opt(5000, "subscribed symbols per connection")
    max_watched: int = _opt(50, "watched symbols per connection")
    book_depth: int = _opt(10, "order book levels served per side (snapshots, updates, "
                               "checksum): 1..50")
    book_levels: int = _opt(50, "order book levels kept per side (the served depth and the next "
                                "ones, which come into view as better ones go): depth..1000; "
                                "every gateway on one Redis prefix must agree")
    max_instruments: int = _opt(1_000_000, "instruments the table holds; ticks for new symbols "
                                           "past it are refused (logged, counted)")
    trade_ring: int = _opt(100, "recent trades held per instrument: the trades snapshot, and "
                                "the most a connection can be behind before it gets lost:N")
    trade_backlog: int = _opt(1000, "trade change stamps held per instrument (8 bytes each): "
                                    "lost:N is exact for a connection up to this many trades "
                                    "of one instrument behind, a lower bound beyond")
    tape_ring: int = _opt(1000, "trades held on the market-wide tape (symbol * on trades)")
    bars_history: int = _opt(200, "bars held per instrument and interval")
    bars_tz: str = _opt("UTC", "time zone whose midnight starts the 1d bars (e.g. Asia/Jakarta)")
    max_connections: int = _opt(20000, "client connections per worker; over it: HTTP 503")
    max_connections_per_ip: int = _opt(2000, "client connections per remote address per worker")
    ingest_rate: float = _opt(1_000_000.0, "ticks per second one /ingest publisher may push")
    high_water_bytes: int = _opt(256 * 1024,
                                 "socket write buffer above which a client is conflated")
    max_queued_bytes: int = _opt(1024 * 1024,
                                 "bytes a client may leave unread (replies, errors, update "
                                 "frames) before it is closed with 1008; above "
                                 "--high-water-bytes its requests are not read until it drains")
    max_list_symbols: int = _opt(10000, "symbols in one list reply; more: the reply says "
                                        "\"more\":true and the client asks again with after")
    stall_s: float = _opt(30.0, "close a client with 1008 after it has not drained for this long")
    handshake_timeout_s: float = _opt(5.0, "seconds to complete the HTTP upgrade")
    idle_timeout_s: float = _opt(60.0, "close a connection that answers no ping for this long")
    # auth
    jwt_secret: str = _opt("", "HS256 secret for client tokens (empty: no auth)", secret=True)
    jwt_secret_file: str = _opt("", "file holding the client token secret")
    publisher_token: str = _opt("", "token /ingest publishers must present", secret=True)
    publisher_token_file: str = _opt("", "file holding the publisher token")
    # delayed data (docs/protocol.md "Delayed data", docs/operations.md)
    max_delay_s: int = _opt(900, "longest delay a client token may ask for, in seconds; the "
                                 "delay line keeps this much past (0: no delayed data)")
    delay_slot_ms: int = _opt(100, "the delay line's time slot: within one, only each "
                                   "instrument's latest state is kept")
    delay_budget_mb: int = _opt(256, "memory the delay line may use; over it, its slots "
                                     "get coarser (and the log says so)")
    delay_gates_ready: bool = _opt(False, "/readyz answers 503 until the delay line holds "
                                          "--max-delay-s of past (for pods serving delayed "
                                          "clients: see docs/operations.md)")
    allowed_origins: str = _opt("", "comma-separated browser Origins allowed on /ws (empty: any)")
    # operations
    drain_s: float = _opt(20.0, "on SIGTERM, spread client closes (1012) over this many seconds")
    drain_delay_s: float = _opt(2.0,
                                "on SIGTERM, keep accepting this long so load balancers see 503")
    metrics_dir: str = _opt("", "prometheus multiprocess directory (default: a temp dir per pod)")
    log_level: str = _opt("info", "debug, info, warning or error")
    log_format: str = _opt("text", "text or json")
    # testing
    conformance_echo: bool = _opt(False, "also serve /echo, a WebSocket echo on the framing of /ws "
                                         "with 16 MiB messages, for conformance tests only")

    def secret(self) -> str:
        return _read_secret(self.jwt_secret, self.jwt_secret_file)

    def publisher_secret(self) -> str:
        return _read_secret(self.publisher_token, self.publisher_token_file)

    def public(self) -> dict[str, Any]:
        """The settings with secrets masked, for logs."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = "***" if f.metadata.get("secret") and v else v
        return out


def _read_secret(value: str, path: str) -> str:
    if value:
        return value
    if path:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    return ""


def _positive(raw: str) -> bool:
    try:
        return float(raw) > 0
    except ValueError:
        return False


def _parse_bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("", "0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def env_name(name: str) -> str:
    return "FASTFEED_" + name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        kind = type(f.default)
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=f"{f.metadata['help']} (env "
                                f"{env_name(f.name)}=1, default {'on' if f.default else 'off'})")
            continue
        parser.add_argument(
            flag,
            *f.metadata.get("aliases", ()),
            dest=f.name,
            type=kind,
            default=None,
            metavar=f.name.upper() if kind is str else kind.__name__.upper(),
            help=f"{f.metadata['help']} (env {env_name(f.name)}, default {f.default!r})",
        )


def from_sources(ns: argparse.Namespace | None = None,
                 env: Mapping[str, str] | None = None) -> Config:
    environ: Mapping[str, str] = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Config):
        given = getattr(ns, f.name, None) if ns is not None else None
        if given is None and env_name(f.name) in environ:
            raw = environ[env_name(f.name)]
            kind: Any = _parse_bool if isinstance(f.default, bool) else type(f.default)
            try:
                given = kind(raw)
            except ValueError:
                raise SystemExit(
                    f"fastfeed: {env_name(f.name)}={raw!r} is not a valid "
                    f"{type(f.default).__name__}"
                ) from None
        if given is not None:
            values[f.name] = given
    cfg = Config(**values)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    problems = []
    if not 0 <= cfg.port <= 65535:
        problems.append(f"port {cfg.port} is outside 0..65535")
    if cfg.min_frame_ms < 1:
        problems.append("min-frame-ms must be at least 1")
    if not cfg.min_frame_ms <= cfg.frame_ms <= 60000:
        problems.append(f"frame-ms {cfg.frame_ms} must lie in min-frame-ms..60000")
    if not cfg.frame_ms <= cfg.max_frame_ms <= 60000:
        problems.append(f"max-frame-ms {cfg.max_frame_ms} must lie in frame-ms..60000")
    if cfg.workers != "auto" and not (cfg.workers.isdigit() and int(cfg.workers) >= 1):
        problems.append(f"workers must be a positive number or 'auto', not {cfg.workers!r}")
    if cfg.simulate < 0 or cfg.rate < 0 or cfg.trades_per_tick < 0:
        problems.append("simulate, rate and trades-per-tick must not be negative")
    if cfg.max_queued_bytes < cfg.high_water_bytes:
        problems.append("max-queued-bytes must be at least high-water-bytes")
    if cfg.max_list_symbols < 1:
        problems.append("max-list-symbols must be at least 1")
    if not 1 <= cfg.book_depth <= 50:
        problems.append(f"book-depth {cfg.book_depth} must lie in 1..50")
    elif not cfg.book_depth <= cfg.book_levels <= 1000:
        problems.append(f"book-levels {cfg.book_levels} must lie in book-depth "
                        f"({cfg.book_depth})..1000")
    if not 1 <= cfg.trade_ring <= cfg.trade_backlog <= 1_000_000:
        problems.append(f"trade-ring {cfg.trade_ring} and trade-backlog {cfg.trade_backlog} must "
                        "satisfy 1 <= trade-ring <= trade-backlog <= 1000000")
    if not 1 <= cfg.tape_ring <= 1_000_000:
        problems.append(f"tape-ring {cfg.tape_ring} must lie in 1..1000000")
    if not 1 <= cfg.bars_history <= 100_000:
        problems.append(f"bars-history {cfg.bars_history} must lie in 1..100000")
    try:
        zoneinfo.ZoneInfo(cfg.bars_tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        problems.append(f"bars-tz {cfg.bars_tz!r} is not a known time zone (IANA name, "
                        "e.g. Asia/Jakarta)")
    if not 1 <= cfg.max_instruments <= 2**31 - 1:
        problems.append(f"max-instruments {cfg.max_instruments} must lie in 1..{2**31 - 1}")
    elif cfg.simulate > cfg.max_instruments:
        problems.append(f"simulate {cfg.simulate} is over max-instruments {cfg.max_instruments}")
    if (cfg.record or cfg.replay) and cfg.workers != "1":
        problems.append("--record and --replay run in one worker: use --workers 1")
    if cfg.record and cfg.record == cfg.replay:
        problems.append("--record and --replay must be different files")
    if cfg.replay_speed != "max" and not _positive(cfg.replay_speed):
        problems.append(f"replay-speed must be a positive number or max, not {cfg.replay_speed!r}")
    if cfg.max_delay_s < 0:
        problems.append("max-delay-s must not be negative")
    if not 1 <= cfg.delay_slot_ms <= 60000:
        problems.append(f"delay-slot-ms {cfg.delay_slot_ms} must lie in 1..60000")
    if cfg.delay_budget_mb < 1:
        problems.append("delay-budget-mb must be at least 1")
    if cfg.log_format not in ("text", "json"):
        problems.append("log-format must be text or json")
    if problems:
        raise SystemExit("fastfeed: bad configuration: " + "; ".join(problems))
