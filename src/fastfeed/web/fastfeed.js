// fastfeed.js: a small browser client for the fastfeed wire protocol, version 1.
//
// No dependencies, no build step: import it as an ES module.
//
//   import { FastfeedClient, F } from "./fastfeed.js";
//   const client = new FastfeedClient("wss://feed.example.com/ws", { token });
//   client.on("update", ({ rows }) => { for (const r of rows) draw(r[F.SYM], r[F.LAST]); });
//   client.on("open", async () => client.subscribe(await client.list("BB*")));
//   client.connect();
//
// The client keeps the latest row of every subscribed instrument in
// `client.rows` (Map sym -> row array in protocol field order), the order
// book of every instrument subscribed with the "book" channel in
// `client.books` (Map sym -> OrderBook, every checksum verified), and on the
// "trades" and "bars:<interval>" channels the tape (`client.trades`) and the
// bars (`client.getBars(sym, interval)`); it resubscribes with `since` (and
// `since_trades`) after a reconnect so only what was missed is resent,
// reports trades the gateway had to drop (`client.tradesLost`, event
// "lost"), re-applies watch and configure, paces its requests under the
// server's rate limit and splits large subscriptions into chunks. See
// docs/fastfeed-js.md.

/** Field names in protocol order. */
export const FIELDS = Object.freeze([
  "sym", "seq", "ts", "bid", "ask", "last", "bid_size", "ask_size", "last_size", "volume",
]);

/** Field indexes: row[F.LAST] is the last price. */
export const F = Object.freeze({
  SYM: 0, SEQ: 1, TS: 2, BID: 3, ASK: 4, LAST: 5,
  BID_SIZE: 6, ASK_SIZE: 7, LAST_SIZE: 8, VOLUME: 9,
});

export const SUBPROTOCOL = "fastfeed.v1.json";
/** Update frames' quote rows carry only the fields changed since the connection's
 * previous frame (docs/protocol.md, "Compact rows"): `compact: true` offers it. */
export const COMPACT_SUBPROTOCOL = "fastfeed.v1.compact";
/** The same rows in binary (FFC1) update frames: `compact: true, binary: true`. */
export const COMPACT_BIN_SUBPROTOCOL = "fastfeed.v1.compact.bin";

/** Channels (protocol version 1.1). A request without channels means "quote". */
export const QUOTE_CHANNEL = "quote";
export const BOOK_CHANNEL = "book";
export const TRADES_CHANNEL = "trades";
/** Levels per side a gateway serves unless it runs with another --book-depth. */
export const BOOK_DEPTH = 10;

/** A trade, as the wire carries it: trade[T.TSEQ]. The market-wide tape's
 * trades have the symbol in front: [sym, tseq, ts, price, size, side]. */
export const T = Object.freeze({ TSEQ: 0, TS: 1, PRICE: 2, SIZE: 3, SIDE: 4 });

/** A bar: bar[B.CLOSE]. */
export const B = Object.freeze({ START: 0, OPEN: 1, HIGH: 2, LOW: 3, CLOSE: 4, VOLUME: 5, COUNT: 6 });

/** Bar intervals, shortest first (channel `bars:<interval>`), and their length in ms (1d: a day). */
export const INTERVALS = Object.freeze(["1s", "1m", "5m", "15m", "1h", "1d"]);
export const INTERVAL_MS = Object.freeze({ "1s": 1e3, "1m": 6e4, "5m": 3e5, "15m": 9e5, "1h": 3.6e6, "1d": 8.64e7 });

/** The symbol of the market-wide tape on the `trades` channel. */
export const MARKET = "*";

/** Close codes that blame the client: no reconnect unless retryClientErrors. */
export const CLIENT_FAULT_CLOSE_CODES = Object.freeze([1002, 1003, 1007, 1008, 1009, 1010]);

/** Connection states, in `client.state`. */
export const State = Object.freeze({
  IDLE: "idle",             // never connected, or closed by close()
  CONNECTING: "connecting", // socket opening
  OPEN: "open",             // socket open
  WAITING: "reconnecting",  // closed, a reconnect is scheduled
});

/**
 * A compact row (fastfeed.v1.compact) made full: `held` is the row the client
 * holds for it (what this connection sent it, or a resume's snapshot skipped),
 * or undefined: the gateway's zero state. `t` is the frame's send time.
 */
export function expandCompact(r, held, t) {
  const row = held ? held.slice() : [r[0], 0, 0, 0, 0, 0, 0, 0, 0, 0];
  const mask = r[2];
  let k = 3;
  row[F.SEQ] = r[1];
  if (mask & 1) row[F.TS] = t - r[k++];
  for (let j = 0; j < 7; j++) if (mask & (2 << j)) row[F.BID + j] = r[k++];
  return row;
}

const P10 = [1, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15];

/**
 * An FFC1 frame (fastfeed.v1.compact.bin; docs/protocol.md) as `{t, rows}`,
 * each row as a JSON compact row: [sym, seq, mask, t - ts if bit 0, values].
 * `buf`: an ArrayBuffer or a Uint8Array. Throws on anything else.
 */
export function decodeCompactBin(buf) {
  const u8 = buf instanceof Uint8Array ? buf : new Uint8Array(buf);
  const dv = new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
  if (u8.length < 16 || String.fromCharCode(u8[0], u8[1], u8[2], u8[3]) !== "FFC1") {
    throw new Error("not a compact binary frame");
  }
  const count = dv.getUint32(4, true);
  // a double, as JSON.parse gives `t` of a text frame
  const t = Number(dv.getBigInt64(8, true));
  let i = 16;
  // integers below 2**53 (every value token is): arithmetic, not 32-bit shifts
  const varint = () => {
    let u = 0;
    for (let scale = 1; ; scale *= 128) {
      if (i >= u8.length || scale > 2 ** 63) throw new Error("compact binary frame: bad varint");
      const b = u8[i++];
      u += (b & 0x7f) * scale;
      if (b < 0x80) return u;
    }
  };
  const rows = new Array(count);
  for (let r = 0; r < count; r++) {
    const n = u8[i];
    const sym = String.fromCharCode.apply(null, u8.subarray(i + 1, i + 1 + n));
    i += 1 + n;
    const mask = u8[i++];
    const row = [sym, varint(), mask];
    if (mask & 1) {
      const z = varint();
      row.push(z % 2 ? -(z + 1) / 2 : z / 2); // zigzag
    }
    for (let j = 0; j < 7; j++) {
      if (!(mask & (2 << j))) continue;
      const u = varint();
      if (u === 31) { // the double's 8 bytes follow
        row.push(dv.getFloat64(i, true));
        i += 8;
      } else {
        // +-m / 10**c (one correctly rounded division, as the gateway
        // checked), or for c 12..15 the exact m * 10**(c - 11)
        const m = Math.floor(u / 32), c = Math.floor(u / 2) % 16;
        const v = c < 12 ? m / P10[c] : m * P10[c - 11];
        row.push(u % 2 ? -v : v);
      }
    }
    rows[r] = row;
  }
  if (i !== u8.length) throw new Error("compact binary frame: bytes after its rows");
  return { t, rows };
}

const DEFAULTS = {
  token: "",                 // appended as ?token= when set
  protocols: null,            // default: [SUBPROTOCOL], or with compact [COMPACT_SUBPROTOCOL, SUBPROTOCOL]
  compact: false,            // offer fastfeed.v1.compact: fewer bytes; `rows` are full rows either way
  binary: false,             // with compact: offer fastfeed.v1.compact.bin first (binary frames)
  chunkSize: 500,            // symbols per subscribe request
  chunkBytes: 48 * 1024,     // and at most this many bytes per request (server default cap: 64 KiB)
  maxSubscriptions: 5000,    // server default per connection
  requestsPerSecond: 40,     // client-side pacing, under the server default of 50/s ...
  requestBurst: 80,          // ... with burst 100
  resume: true,              // resubscribe with `since` after a reconnect
  heartbeatMs: 5000,         // server heartbeat interval; stale after 2x without a message
  deadAfterMs: 0,            // reconnect when nothing arrived this long (0: 3x heartbeat, at least 15 s)
  connectTimeoutMs: 10000,
  backoffInitialMs: 250,
  backoffMaxMs: 15000,
  pingEveryMs: 30000,        // clock offset estimate (0: off)
  retryClientErrors: false,  // also reconnect after a close for the client's own fault (1008, 1009, ...)
  bookDepth: BOOK_DEPTH,     // the gateway's book depth: levels kept per side, and what the checksum covers
  tapeSize: 1000,            // trades kept per symbol (and on the market-wide tape)
  barsSize: 500,             // bars kept per (symbol, interval)
  WebSocket: globalThis.WebSocket,
};

// ---- order books -----------------------------------------------------------

// CRC-32 (IEEE 802.3, reflected, as zlib.crc32), one table built once.
const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32 of `bytes` (a Uint8Array), continuing from `crc` (0 to start). */
export function crc32(bytes, crc = 0) {
  let c = ~crc >>> 0;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return ~c >>> 0;
}

const LEVEL_BYTES = new Uint8Array(16);
const LEVEL_VIEW = new DataView(LEVEL_BYTES.buffer);

/**
 * The contract's book checksum: CRC-32 over, for each of the best `depth`
 * asks and then the best `depth` bids (best first), price and volume as
 * IEEE-754 binary64 little-endian (16 bytes a level). Levels are [price, volume, ...].
 */
export function bookChecksum(bids, asks, depth = BOOK_DEPTH) {
  let crc = 0;
  for (const side of [asks, bids]) {
    const n = Math.min(side.length, depth);
    for (let k = 0; k < n; k++) {
      LEVEL_VIEW.setFloat64(0, side[k][0], true);
      LEVEL_VIEW.setFloat64(8, side[k][1], true);
      crc = crc32(LEVEL_BYTES, crc);
    }
  }
  return crc;
}

/**
 * One instrument's order book as a client holds it: `bids` and `asks` are
 * arrays of [price, volume, orders], best first, at most `depth` long;
 * `seq` is the book's; `stale` is true between a "stale" and an "ok" status.
 */
export class OrderBook {
  constructor(sym, depth = BOOK_DEPTH) {
    this.sym = sym;
    this.depth = depth;
    this.seq = 0;
    this.bids = [];
    this.asks = [];
    this.stale = false;
  }

  /**
   * Apply one `books` entry: a snapshot's (full = true) or an update's
   * (price-keyed changes, volume 0 removes a price; `"full":true` replaces).
   * Returns whether the book now matches the entry's checksum.
   */
  apply(entry, full = Boolean(entry.full)) {
    const bids = entry.bids || [];
    const asks = entry.asks || [];
    if (full) {
      this.bids = bids.filter((l) => l[1] > 0).map(level).sort((a, b) => b[0] - a[0]).slice(0, this.depth);
      this.asks = asks.filter((l) => l[1] > 0).map(level).sort((a, b) => a[0] - b[0]).slice(0, this.depth);
    } else {
      change(this.bids, bids, true, this.depth);
      change(this.asks, asks, false, this.depth);
    }
    if (entry.seq != null) this.seq = entry.seq;
    return entry.checksum == null || this.checksum() === entry.checksum;
  }

  checksum() {
    return bookChecksum(this.bids, this.asks, this.depth);
  }
}

function level(l) {
  return [l[0], l[1], l.length > 2 ? l[2] : 0];
}

// Price-keyed changes into one side, kept best first and `depth` long. A
// side is a few levels: a linear search is the quickest.
function change(side, changes, bids, depth) {
  for (const c of changes) {
    const price = c[0];
    let k = 0;
    const n = side.length;
    if (bids) while (k < n && side[k][0] > price) k++;
    else while (k < n && side[k][0] < price) k++;
    const here = k < n && side[k][0] === price;
    if (c[1] === 0) {
      if (here) side.splice(k, 1);
    } else if (here) {
      side[k] = level(c);
    } else {
      side.splice(k, 0, level(c));
    }
  }
  if (side.length > depth) side.length = depth;
}

/** Raised (as a promise rejection) for `error` replies and for requests cut by a close. */
export class FastfeedError extends Error {
  constructor(code, message, detail = {}) {
    super(message || code);
    this.name = "FastfeedError";
    this.code = code;
    Object.assign(this, detail);
  }
}

export class FastfeedClient {
  /**
   * @param {string} url  ws:// or wss:// URL of the gateway's /ws endpoint
   * @param {object} [options]  see DEFAULTS above and docs/fastfeed-js.md
   */
  constructor(url, options = {}) {
    this.opts = { ...DEFAULTS, ...options };
    this.url = url;
    /** sym -> latest row (array in FIELDS order) */
    this.rows = new Map();
    /** sym -> OrderBook, for symbols subscribed with the "book" channel */
    this.books = new Map();
    /** sym -> Set of channels, for symbols subscribed to more than the quote */
    this.channels = new Map();
    this._resyncing = new Set(); // books resubscribed after a bad checksum
    /** sym -> its last trades, oldest first ([tseq, ts, price, size, side]; MARKET: [sym, ...]) */
    this.trades = new Map();
    /** sym -> trades the gateway dropped for this client, in all (it said so with "lost") */
    this.tradesLost = new Map();
    /** sym -> highest tseq held (for since_trades) */
    this.lastTseq = new Map();
    this._marketLast = new Map(); // the same, on the market-wide tape
    /** `${interval} ${sym}` -> bars, oldest first (the last may be forming); see getBars */
    this.bars = new Map();
    /** symbols this client wants subscribed, in request order (kept across reconnects) */
    this.wanted = new Set();
    /** symbols the server confirmed on the current connection */
    this.subscribed = new Set();
    /** symbols this client wants watched */
    this.watched = new Set();
    this.frameMs = 0;         // 0: server default
    this.state = State.IDLE;
    this.feed = "unknown";    // "up" | "down" | "unknown", from `status` messages
    this.stale = false;
    this.lastMessageAt = 0;   // performance.now() of the last message
    this.clockOffsetMs = 0;   // server clock - local clock, from ping
    this._clock = [];         // recent [rtt, offset] samples
    this.connects = 0;        // successful opens so far
    this.attempt = 0;         // reconnect attempts since the last stable connection
    this.reconnectAt = 0;     // performance.now() of the scheduled reconnect
    this.counters = { messages: 0, updates: 0, rows: 0, bytes: 0, bookEntries: 0, bookResyncs: 0, trades: 0, lost: 0 };
    this._handlers = new Map();
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map();  // id -> {resolve, reject, op}
    this._queue = [];           // outgoing requests waiting for a pacing token
    this._tokens = this.opts.requestBurst;
    this._tokensAt = 0;
    this._pump = null;
    this._timers = new Set();
    this._remap = null;         // snapshot field order -> FIELDS order, if it ever differs
    this._openedAt = 0;
    this._userClosed = false;
    this._watchTimer = null;
    this._resumed = false;      // this connection resubscribed with `since`
    this._noSinceOnce = false;  // the next connection takes full snapshots
  }

  // ---- events ------------------------------------------------------------

  /** Listen for an event; returns a function that removes the listener. */
  on(type, fn) {
    let set = this._handlers.get(type);
    if (!set) this._handlers.set(type, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  off(type, fn) {
    this._handlers.get(type)?.delete(fn);
  }

  _emit(type, detail) {
    const set = this._handlers.get(type);
    if (!set) return;
    for (const fn of set) {
      try {
        fn(detail);
      } catch (err) {
        console.error(`fastfeed: ${type} handler failed`, err);
      }
    }
  }

  // ---- connection --------------------------------------------------------

  /** Open the connection (and keep it open, reconnecting, until close()). */
  connect() {
    this._userClosed = false;
    if (this.state === State.OPEN || this.state === State.CONNECTING) return this;
    this._clearTimers();
    this._open();
    this._startWatchdog();
    return this;
  }

  /** Close for good: no reconnect. */
  close(code = 1000, reason = "") {
    this._userClosed = true;
    this._clearTimers();
    clearInterval(this._watchTimer);
    this._watchTimer = null;
    const ws = this._ws;
    this._ws = null;
    this.state = State.IDLE;
    if (ws) {
      this._detach(ws);
      try { ws.close(code, reason); } catch { /* already closing */ }
    }
    this._failPending(new FastfeedError("closed", "client closed"));
    this._emit("close", { code, reason, willReconnect: false, delayMs: 0 });
  }

  _socketUrl() {
    if (!this.opts.token) return this.url;
    const u = new URL(this.url, globalThis.location?.href);
    u.searchParams.set("token", this.opts.token);
    return u.toString();
  }

  _open() {
    this.state = State.CONNECTING;
    this._emit("connecting", { attempt: this.attempt, url: this.url });
    let ws;
    try {
      const o = this.opts;
      const protocols = o.protocols || (!o.compact ? [SUBPROTOCOL]
        : o.binary ? [COMPACT_BIN_SUBPROTOCOL, COMPACT_SUBPROTOCOL, SUBPROTOCOL]
          : [COMPACT_SUBPROTOCOL, SUBPROTOCOL]);
      ws = new o.WebSocket(this._socketUrl(), protocols);
      ws.binaryType = "arraybuffer";
    } catch (err) {
      this._emit("error", { code: "connect", message: String(err) });
      this._scheduleReconnect(1006, "");
      return;
    }
    this._ws = ws;
    const timeout = this._later(() => {
      if (this._ws === ws && this.state === State.CONNECTING) {
        this._detach(ws);
        try { ws.close(); } catch { /* ignore */ }
        this._ws = null;
        this._scheduleReconnect(1006, "connect timeout");
      }
    }, this.opts.connectTimeoutMs);
    ws.onopen = () => {
      this._cancel(timeout);
      this._onOpen(ws);
    };
    ws.onmessage = (ev) => this._onMessage(ev.data);
    ws.onerror = () => {
      // Always followed by a close event, which does the work.
      this._emit("error", { code: "socket", message: "WebSocket error" });
    };
    ws.onclose = (ev) => {
      this._cancel(timeout);
      if (this._ws !== ws) return;
      this._ws = null;
      this._scheduleReconnect(ev.code, ev.reason);
    };
  }

  _detach(ws) {
    ws.onopen = ws.onmessage = ws.onerror = ws.onclose = null;
  }

  _onOpen(ws) {
    // an older gateway may pick plain JSON: rows are then full already
    this._compact = ws.protocol === COMPACT_SUBPROTOCOL || ws.protocol === COMPACT_BIN_SUBPROTOCOL;
    const reconnect = this.connects > 0;
    this.connects += 1;
    this.state = State.OPEN;
    this._openedAt = performance.now();
    this.lastMessageAt = this._openedAt;
    this._setStale(false);
    // The gateway sends `status` when its upstream goes down or comes back;
    // a fresh connection starts from "up" until told otherwise.
    this.feed = "up";
    this.subscribed.clear();
    this._tokens = this.opts.requestBurst;
    this._tokensAt = performance.now();
    // Restore this connection's state: frame interval, subscriptions (only
    // what was missed, with `since`), then watched symbols.
    if (this.frameMs) this._send({ op: "configure", frame_ms: this.frameMs }).catch(() => {});
    const resume = reconnect && this.opts.resume && !this._noSinceOnce;
    this._resumed = resume;
    this._noSinceOnce = false;
    this._resyncing.clear();
    if (this.wanted.size) {
      const jobs = [];
      for (const [chans, syms] of this._byChannels([...this.wanted])) {
        jobs.push(this._subscribeChunks(syms, resume, chans));
      }
      Promise.all(jobs)
        .then(() => this._rewatch())
        .catch(() => {});
    }
    if (this.opts.pingEveryMs) {
      // A few early samples for the clock offset; the quickest round trip wins.
      this.ping().catch(() => {});
      for (const ms of [1000, 3000]) this._later(() => this.state === State.OPEN && this.ping().catch(() => {}), ms);
    }
    this._emit("open", { reconnect, protocol: ws.protocol });
  }

  _rewatch() {
    const syms = [...this.watched].filter((s) => this.subscribed.has(s));
    if (syms.length) return this._send({ op: "watch", symbols: syms }).catch(() => {});
    return undefined;
  }

  _scheduleReconnect(code, reason) {
    const wasOpen = this.state === State.OPEN;
    this.subscribed.clear();
    this._failPending(new FastfeedError("closed", `connection closed (${code})`, { closeCode: code }));
    this._queue.length = 0;
    if (this._userClosed) return;
    if (CLIENT_FAULT_CLOSE_CODES.includes(code) && !this.opts.retryClientErrors) {
      this.state = State.IDLE;
      clearInterval(this._watchTimer);
      this._watchTimer = null;
      this._emit("close", { code, reason, willReconnect: false, delayMs: 0 });
      return;
    }
    // A connection that stayed up a while resets the backoff.
    if (wasOpen && performance.now() - this._openedAt > 5000) this.attempt = 0;
    const delayMs = this._backoff(code);
    this.attempt += 1;
    this.state = State.WAITING;
    this.reconnectAt = performance.now() + delayMs;
    this._emit("close", { code, reason, willReconnect: true, delayMs });
    this._later(() => {
      if (!this._userClosed && this.state === State.WAITING) this._open();
    }, delayMs);
  }

  /** Milliseconds to wait before the next attempt: jittered exponential backoff. */
  _backoff(code) {
    const { backoffInitialMs: base, backoffMaxMs: cap } = this.opts;
    const ceiling = Math.min(cap, base * 2 ** Math.min(this.attempt, 16));
    let floor = 0;
    if (code === 1012) {
      // Server draining for a deploy: every client gets this at once, so
      // spread the reconnects (to any replica) over a couple of seconds.
      return 100 + Math.random() * Math.max(2000, ceiling);
    }
    if (code === 1013) floor = 2000;       // try again later
    else if (code === 1008) floor = 5000;  // policy: do not hammer
    return floor + Math.random() * ceiling; // "full jitter"
  }

  _later(fn, ms) {
    const t = setTimeout(() => {
      this._timers.delete(t);
      fn();
    }, ms);
    this._timers.add(t);
    return t;
  }

  _cancel(t) {
    clearTimeout(t);
    this._timers.delete(t);
  }

  _clearTimers() {
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    clearTimeout(this._pump);
    this._pump = null;
  }

  // Stale marker and dead-socket detection: the server sends a heartbeat
  // after `heartbeatMs` of silence, so a gap of twice that means trouble.
  _startWatchdog() {
    if (this._watchTimer) return;
    let lastPing = performance.now();
    this._watchTimer = setInterval(() => {
      if (this.state !== State.OPEN) return;
      const now = performance.now();
      const quiet = now - this.lastMessageAt;
      this._setStale(quiet > 2 * this.opts.heartbeatMs);
      const dead = this.opts.deadAfterMs || Math.max(3 * this.opts.heartbeatMs, 15000);
      if (quiet > dead && this._ws) {
        const ws = this._ws;
        this._detach(ws);
        this._ws = null;
        try { ws.close(4000, "no heartbeat"); } catch { /* ignore */ }
        this._scheduleReconnect(1006, "no heartbeat");
        return;
      }
      if (this.opts.pingEveryMs && now - lastPing > this.opts.pingEveryMs) {
        lastPing = now;
        this.ping().catch(() => {});
      }
    }, 250);
  }

  _setStale(stale) {
    if (stale === this.stale) return;
    this.stale = stale;
    this._emit("stale", { stale });
  }

  // ---- requests ----------------------------------------------------------

  /**
   * Send one request; resolves with the reply (snapshot, ack, list, pong),
   * rejects with FastfeedError on an `error` reply or when the connection closes.
   */
  request(msg) {
    return this._send({ ...msg });
  }

  _send(msg) {
    if (this.state !== State.OPEN) {
      return Promise.reject(new FastfeedError("not_connected", "not connected"));
    }
    const id = this._nextId++;
    msg.id = id;
    return new Promise((resolve, reject) => {
      this._pending.set(id, { resolve, reject, op: msg.op });
      this._queue.push(msg);
      this._flush();
    });
  }

  // Token bucket so a burst of chunks never trips the server's rate limit.
  _flush() {
    if (this._pump) return;
    const { requestsPerSecond: rate, requestBurst: burst } = this.opts;
    while (this._queue.length && this._ws && this.state === State.OPEN) {
      const now = performance.now();
      this._tokens = Math.min(burst, this._tokens + ((now - this._tokensAt) * rate) / 1000);
      this._tokensAt = now;
      if (this._tokens < 1) {
        const wait = Math.ceil(((1 - this._tokens) * 1000) / rate);
        this._pump = setTimeout(() => {
          this._pump = null;
          this._flush();
        }, wait);
        return;
      }
      this._tokens -= 1;
      const msg = this._queue.shift();
      this._ws.send(JSON.stringify(msg));
    }
  }

  _failPending(err) {
    const pending = this._pending;
    this._pending = new Map();
    for (const p of pending.values()) p.reject(err);
  }

  /** Symbols the gateway knows (optionally matching a glob such as "BB*"). */
  async list(match) {
    const out = [];
    const msg = match ? { op: "list", match } : { op: "list" };
    for (;;) {
      // The gateway answers in pages: "more" says ask again after "next".
      const reply = await this._send({ ...msg });
      out.push(...(reply.symbols || []));
      if (!reply.more || typeof reply.next !== "string") return out;
      msg.after = reply.next;
    }
  }

  /**
   * Subscribe, in chunks. Symbols are remembered and resubscribed after a
   * reconnect. Resolves with {rows, unknown, forbidden, errors} over all chunks.
   */
  subscribe(symbols, channels) {
    const chans = channels ? channelList(channels) : null;
    const fresh = [];
    for (const s of symbols) {
      if (this.wanted.has(s)) {
        // more channels of a symbol already wanted (the quote of one wanted
        // for its book, say): ask for the new ones
        const held = this._channelsOf(s);
        const want = chans || [QUOTE_CHANNEL];
        if (want.every((c) => held.has(c))) continue;
        for (const c of want) held.add(c);
        this.channels.set(s, held);
        fresh.push(s);
        continue;
      }
      if (this.wanted.size >= this.opts.maxSubscriptions) break;
      this.wanted.add(s);
      if (chans && !(chans.length === 1 && chans[0] === QUOTE_CHANNEL)) this.channels.set(s, new Set(chans));
      fresh.push(s);
    }
    if (this.state !== State.OPEN) return Promise.resolve({ rows: [], unknown: [], forbidden: [], errors: [] });
    return this._subscribeChunks(fresh, false, chans);
  }

  // Symbols grouped by the channels they are subscribed with (null: the quote alone).
  _byChannels(symbols) {
    const groups = new Map();
    for (const s of symbols) {
      const set = this.channels.get(s);
      const key = set ? [...set].sort().join(",") : "";
      let g = groups.get(key);
      if (!g) groups.set(key, (g = []));
      g.push(s);
    }
    return [...groups].map(([key, syms]) => [key ? key.split(",") : null, syms]);
  }

  async _subscribeChunks(symbols, withSince, channels = null) {
    const out = { rows: [], unknown: [], forbidden: [], errors: [] };
    const jobs = [];
    const quote = !channels || channels.includes(QUOTE_CHANNEL);
    const trades = Boolean(channels && channels.includes(TRADES_CHANNEL));
    for (const chunk of this._chunks(symbols, withSince || trades)) {
      const msg = { op: "subscribe", symbols: chunk };
      if (channels) msg.channels = channels;
      // The trades resume after the last tseq held, always (even after a
      // resync): they are events, a snapshot cannot stand in for them.
      if (trades) {
        const since = {};
        let any = false;
        for (const s of chunk) {
          const t = this.lastTseq.get(s);
          if (t !== undefined && s !== MARKET) {
            since[s] = t;
            any = true;
          }
        }
        if (any) msg.since_trades = since;
      }
      if (withSince && quote) {
        const since = {};
        let any = false;
        for (const s of chunk) {
          const row = this.rows.get(s);
          if (row) {
            since[s] = row[F.SEQ];
            any = true;
          }
        }
        if (any) msg.since = since;
      }
      jobs.push(
        this._sendRetry(msg).then(
          (snap) => {
            for (const s of chunk) this.subscribed.add(s);
            for (const s of snap.unknown || []) {
              this.subscribed.delete(s);
              out.unknown.push(s);
            }
            out.rows.push(...(snap.rows || []));
          },
          (err) => {
            if (err.code === "forbidden" && err.symbols) {
              // The rest of the request applied.
              for (const s of chunk) if (!err.symbols.includes(s)) this.subscribed.add(s);
              out.forbidden.push(...err.symbols);
            } else {
              out.errors.push(err);
              // refused whole (say, a channel this gateway does not serve):
              // forget those channels, so a reconnect does not ask again and
              // lose the quote with them
              if (channels && err.code !== "closed" && err.code !== "not_connected") {
                for (const s of chunk) {
                  const held = this.channels.get(s);
                  if (!held) continue;
                  for (const c of channels) if (c !== QUOTE_CHANNEL) held.delete(c);
                  if (!held.size) this.wanted.delete(s); // wanted for those channels alone
                  if (!held.size || (held.size === 1 && held.has(QUOTE_CHANNEL))) this.channels.delete(s);
                }
              }
            }
          },
        ),
      );
    }
    await Promise.all(jobs);
    for (const s of [...out.unknown, ...out.forbidden]) {
      this.wanted.delete(s);
      this._dropData(s, this._channelsOf(s));
      this.channels.delete(s);
    }
    return out;
  }

  /** The channels `sym` is wanted on (a symbol of the quote alone has no entry). */
  _channelsOf(sym) {
    return this.channels.get(sym) || new Set([QUOTE_CHANNEL]);
  }

  // What these channels held of `sym` leaves the local copies.
  _dropData(sym, channels) {
    for (const c of channels) {
      if (c === QUOTE_CHANNEL) this.rows.delete(sym);
      else if (c === BOOK_CHANNEL) this.books.delete(sym);
      else if (c === TRADES_CHANNEL) {
        this.trades.delete(sym);
        this.lastTseq.delete(sym);
        if (sym === MARKET) this._marketLast.clear();
      } else if (c.startsWith("bars:")) this.bars.delete(`${c.slice(5)} ${sym}`);
    }
  }

  /** The bars held of (sym, interval), oldest first ([] if none). */
  getBars(sym, interval) {
    return this.bars.get(`${interval} ${sym}`) || [];
  }

  // A request refused with rate_limited changed nothing: try it again later.
  async _sendRetry(msg, tries = 4) {
    for (let i = 1; ; i++) {
      try {
        return await this._send({ ...msg });
      } catch (err) {
        if (err.code !== "rate_limited" || i >= tries) throw err;
        await new Promise((r) => setTimeout(r, 500 * i + Math.random() * 500));
      }
    }
  }

  *_chunks(symbols, withSince) {
    const { chunkSize, chunkBytes } = this.opts;
    let chunk = [];
    let bytes = 64;
    for (const s of symbols) {
      // symbol in the list, plus "SYM":seq in `since`
      const cost = s.length + 3 + (withSince ? s.length + 24 : 0);
      if (chunk.length && (chunk.length >= chunkSize || bytes + cost > chunkBytes)) {
        yield chunk;
        chunk = [];
        bytes = 64;
      }
      chunk.push(s);
      bytes += cost;
    }
    if (chunk.length) yield chunk;
  }

  /**
   * Unsubscribe and forget the rows (and books, trades, bars). With
   * `channels`, only those channels: a symbol keeps the others.
   */
  async unsubscribe(symbols, channels) {
    const chans = channels ? channelList(channels) : null;
    const syms = symbols.filter((s) => this.wanted.has(s));
    const gone = [];
    for (const s of syms) {
      if (chans) {
        const left = new Set(this._channelsOf(s));
        for (const c of chans) left.delete(c);
        if (left.size) {
          this._dropData(s, chans);
          if (left.size === 1 && left.has(QUOTE_CHANNEL)) this.channels.delete(s);
          else this.channels.set(s, left);
          continue;
        }
      }
      gone.push(s);
      this.wanted.delete(s);
      this.watched.delete(s);
      this._dropData(s, this._channelsOf(s));
      this.channels.delete(s);
    }
    if (this.state !== State.OPEN) return;
    const jobs = [];
    for (const chunk of this._chunks(syms.filter((s) => this.subscribed.has(s)), false)) {
      for (const s of chunk) if (gone.includes(s)) this.subscribed.delete(s);
      const msg = { op: "unsubscribe", symbols: chunk };
      if (chans) msg.channels = chans;
      jobs.push(this._send(msg));
    }
    await Promise.all(jobs);
  }

  /** Watch: the server pushes these at once on every change. Kept across reconnects. */
  async watch(symbols, channels) {
    for (const s of symbols) this.watched.add(s);
    if (this.state !== State.OPEN) return undefined;
    const msg = { op: "watch", symbols: [...symbols] };
    if (channels) msg.channels = channelList(channels);
    try {
      return await this._send(msg);
    } catch (err) {
      if (err.code === "too_many_watched" || err.code === "not_subscribed" || err.code === "forbidden") {
        for (const s of symbols) this.watched.delete(s);
      }
      throw err;
    }
  }

  async unwatch(symbols, channels) {
    if (!channels) for (const s of symbols) this.watched.delete(s);
    if (this.state !== State.OPEN) return undefined;
    const msg = { op: "unwatch", symbols: [...symbols] };
    if (channels) msg.channels = channelList(channels);
    return this._send(msg);
  }

  /** This connection's frame interval (kept across reconnects). */
  async configure(frameMs) {
    this.frameMs = frameMs;
    if (this.state !== State.OPEN) return undefined;
    return this._send({ op: "configure", frame_ms: frameMs });
  }

  /** Round trip; also refreshes `clockOffsetMs` (server clock minus local clock). */
  async ping() {
    const t0 = Date.now();
    const p0 = performance.now();
    const reply = await this._send({ op: "ping" });
    const rtt = performance.now() - p0;
    // Keep the sample with the shortest round trip among the last few: a
    // ping delayed by a busy main thread says little about the clocks.
    this._clock.push([rtt, reply.ts / 1e6 - (t0 + rtt / 2)]);
    if (this._clock.length > 8) this._clock.shift();
    let best = this._clock[0];
    for (const c of this._clock) if (c[0] < best[0]) best = c;
    this.clockOffsetMs = best[1];
    return { rttMs: rtt, ts: reply.ts, clockOffsetMs: this.clockOffsetMs };
  }

  /** Local time as the server's clock reads it, in ms since the epoch. */
  serverNowMs() {
    return Date.now() + this.clockOffsetMs;
  }

  // ---- incoming ----------------------------------------------------------

  _onMessage(data) {
    this.lastMessageAt = performance.now();
    if (this.stale) this._setStale(false);
    const c = this.counters;
    c.messages += 1;
    let msg;
    if (typeof data !== "string") {
      // FFC1 frames (fastfeed.v1.compact.bin); fastfeed.v1.bin's FFB1, which
      // this client does not offer, is refused here too
      c.bytes += data.byteLength;
      try {
        msg = { type: "update", ...decodeCompactBin(data) };
      } catch (err) {
        this._emit("error", { code: "bad_message", message: String(err.message || err) });
        return;
      }
    } else {
      c.bytes += data.length;
      try {
        msg = JSON.parse(data);
      } catch {
        this._emit("error", { code: "bad_message", message: "server sent invalid JSON" });
        return;
      }
    }
    switch (msg.type) {
      case "update": {
        const rows = msg.rows;
        const map = this.rows;
        let backwards = false;
        for (let i = 0; i < rows.length; i++) {
          // compact: [sym, seq, mask, t - ts if bit 0, the values of bits 1..7] on
          // what this client holds; listeners see the full row
          const r = this._compact ? (rows[i] = expandCompact(rows[i], map.get(rows[i][0]), msg.t))
            : rows[i];
          if (!this.wanted.has(r[0])) continue;
          // seq only grows for a given source, so a lower one means the
          // source (or a simulator) started over: what `since` skipped on
          // resume may be wrong. Apply it anyway; the server is the authority.
          const held = map.get(r[0]);
          if (held && r[1] < held[1]) backwards = true;
          map.set(r[0], r);
        }
        if (backwards && this._resumed) this._resync();
        c.updates += 1;
        c.rows += rows.length;
        if (msg.books) this._onBooks(msg.books, false);
        if (msg.trades) this._applyTrades(msg.trades, "items");
        if (msg.bars) this._applyBars(msg.bars);
        this._emit("update", msg);
        return;
      }
      case "heartbeat":
        this._emit("heartbeat", msg);
        return;
      case "status":
        if (msg.book !== undefined) {
          // one book's state, not the feed's
          const book = this.books.get(msg.sym);
          if (book) book.stale = msg.book !== "ok";
          this._emit("bookstatus", { sym: msg.sym, ok: msg.book === "ok" });
          return;
        }
        if ("feed" in msg) this.feed = msg.feed; // others: a delay line filling, a book
        this._emit("status", msg);
        return;
      case "snapshot":
        this._onSnapshot(msg);
        break;
      default:
        break;
    }
    const pending = msg.id != null ? this._pending.get(msg.id) : undefined;
    if (msg.type === "error") {
      const err = new FastfeedError(msg.code, msg.message, { symbols: msg.symbols, requestId: msg.id });
      if (pending) {
        this._pending.delete(msg.id);
        pending.reject(err);
      }
      this._emit("error", msg);
      if (msg.code === "rate_limited" && pending) {
        // Back off the pacing for a second.
        this._tokens = Math.min(this._tokens, -this.opts.requestsPerSecond / 2);
      }
      return;
    }
    if (pending) {
      this._pending.delete(msg.id);
      pending.resolve(msg);
    }
  }

  // Reconnect at once and take full snapshots (no `since`).
  _resync() {
    this._resumed = false;
    const ws = this._ws;
    if (!ws || this.state !== State.OPEN) return;
    this._emit("resync", { reason: "seq went backwards" });
    this._detach(ws);
    this._ws = null;
    try { ws.close(4000, "resync"); } catch { /* ignore */ }
    this._noSinceOnce = true;
    this.subscribed.clear();
    this._failPending(new FastfeedError("closed", "resync"));
    this._queue.length = 0;
    this._open();
  }

  _onSnapshot(msg) {
    if (msg.fields && this._remap === null) {
      const same = msg.fields.length === FIELDS.length && msg.fields.every((f, i) => f === FIELDS[i]);
      this._remap = same ? false : FIELDS.map((f) => msg.fields.indexOf(f));
    }
    let rows = msg.rows || [];
    if (this._remap) {
      const idx = this._remap;
      rows = rows.map((r) => idx.map((i) => (i < 0 ? null : r[i])));
      msg.rows = rows;
    }
    for (const r of rows) this.rows.set(r[0], r);
    if (msg.books) this._onBooks(msg.books, true);
    if (msg.trades) this._applyTrades(msg.trades, "recent");
    if (msg.bars) this._applyBars(msg.bars);
    this._emit("snapshot", msg);
  }

  // Trades of a snapshot ("recent") or an update ("items"): each taken once
  // (a tseq not above the one held is a resume's overlap), "lost" counted
  // and told. Per entry: one "trades" event with the new trades.
  _applyTrades(entries, key) {
    const max = this.opts.tapeSize;
    for (const e of entries) {
      const sym = e.sym;
      if (!this.channels.get(sym)?.has(TRADES_CHANNEL)) continue;
      if (e.lost) {
        this.tradesLost.set(sym, (this.tradesLost.get(sym) || 0) + e.lost);
        this.counters.lost += e.lost;
        this._emit("lost", { sym, n: e.lost });
      }
      const items = e[key];
      if (!items || !items.length) continue;
      let tape = this.trades.get(sym);
      if (!tape) this.trades.set(sym, (tape = []));
      let fresh = items;
      if (sym === MARKET) {
        fresh = this._market(items, key === "recent");
        if (!fresh.length) continue;
      } else {
        const held = this.lastTseq.get(sym);
        if (held !== undefined && items[0][0] <= held) fresh = items.filter((t) => t[0] > held);
        if (!fresh.length) continue;
        this.lastTseq.set(sym, fresh[fresh.length - 1][0]);
      }
      for (let i = 0; i < fresh.length; i++) tape.push(fresh[i]);
      // trimmed in steps, so keeping the last `max` costs O(1) per trade
      if (tape.length > max + (max >> 2)) tape.splice(0, tape.length - max);
      this.counters.trades += fresh.length;
      this._emit("trades", { sym, trades: fresh, snapshot: key === "recent" });
    }
  }

  // The market-wide tape has no since_trades: a resubscribe gets the
  // gateway's ring again. Trades held are skipped by symbol and tseq; a
  // symbol whose first trade there jumps past the one held + 1 had trades in
  // between that neither holds, counted as lost (exact with consecutive tseq).
  _market(items, resumed) {
    const last = this._marketLast;
    const fresh = [];
    const firsts = new Set();
    let gap = 0;
    for (const t of items) {
      const held = last.get(t[0]);
      if (held !== undefined && t[1] <= held) continue;
      if (resumed && held !== undefined && !firsts.has(t[0]) && t[1] > held + 1) gap += t[1] - held - 1;
      firsts.add(t[0]);
      last.set(t[0], t[1]);
      fresh.push(t);
    }
    if (gap) {
      this.tradesLost.set(MARKET, (this.tradesLost.get(MARKET) || 0) + gap);
      this.counters.lost += gap;
      this._emit("lost", { sym: MARKET, n: gap });
    }
    return fresh;
  }

  // Bars: each replaces the held bar with the same start, or is added in order.
  _applyBars(entries) {
    const max = this.opts.barsSize;
    for (const e of entries) {
      const channel = `bars:${e.interval}`;
      if (!this.channels.get(e.sym)?.has(channel)) continue;
      const k = `${e.interval} ${e.sym}`;
      let series = this.bars.get(k);
      if (!series) this.bars.set(k, (series = []));
      for (const bar of e.bars || []) {
        const n = series.length;
        if (!n || bar[0] > series[n - 1][0]) series.push(bar);
        else if (bar[0] === series[n - 1][0]) series[n - 1] = bar;
        else {
          let lo = 0;
          let hi = n;
          while (lo < hi) {
            const mid = (lo + hi) >> 1;
            if (series[mid][0] < bar[0]) lo = mid + 1;
            else hi = mid;
          }
          if (series[lo][0] === bar[0]) series[lo] = bar;
          else series.splice(lo, 0, bar);
        }
      }
      if (series.length > max) series.splice(0, series.length - max);
      this._emit("bars", { sym: e.sym, interval: e.interval, bars: e.bars || [] });
    }
  }

  // Apply `books` entries; a book whose checksum then differs is
  // resubscribed (unsubscribe + subscribe: a full snapshot), and its updates
  // are ignored until that snapshot is in.
  _onBooks(entries, snapshot) {
    for (const e of entries) {
      const sym = e.sym;
      const chans = this.channels.get(sym);
      if (!chans || !chans.has(BOOK_CHANNEL)) continue;
      if (this._resyncing.has(sym)) {
        if (!snapshot) continue;
        this._resyncing.delete(sym);
      }
      let book = this.books.get(sym);
      if (!book) this.books.set(sym, (book = new OrderBook(sym, this.opts.bookDepth)));
      const full = snapshot || Boolean(e.full);
      this.counters.bookEntries += 1;
      if (!book.apply(e, full)) {
        this._resyncBook(sym, e);
        continue;
      }
      if (full) book.stale = false;
      this._emit("book", { sym, book, entry: e, full });
    }
  }

  _resyncBook(sym, entry) {
    if (this._resyncing.has(sym)) return;
    this._resyncing.add(sym);
    this.counters.bookResyncs += 1;
    this._emit("bookresync", { sym, seq: entry.seq, checksum: entry.checksum });
    const one = { symbols: [sym], channels: [BOOK_CHANNEL] };
    this._send({ op: "unsubscribe", ...one })
      .then(() => {
        const chans = this.channels.get(sym);
        if (chans && chans.has(BOOK_CHANNEL)) return this._send({ op: "subscribe", ...one });
        return undefined;
      })
      .catch((err) => {
        if (err.code !== "closed") this._emit("error", { code: err.code, message: `resubscribing the book of ${sym}: ${err.message}` });
      })
      .finally(() => this._resyncing.delete(sym));
  }
}

function channelList(channels) {
  const list = [...new Set(channels)];
  if (!list.length || !list.every((c) => typeof c === "string" && c)) {
    throw new TypeError(`channels must be a non-empty array of names, not ${JSON.stringify(channels)}`);
  }
  return list.sort();
}

/**
 * The default gateway URL for a page served by the gateway itself:
 * ws(s)://<same host>/ws, or the page's ?ws= parameter.
 */
export function defaultUrl(loc = globalThis.location) {
  const params = new URLSearchParams(loc.search);
  const given = params.get("ws");
  if (given) return new URL(given, loc.href.replace(/^http/, "ws")).toString();
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}
