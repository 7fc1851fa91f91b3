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
// `client.rows` (Map sym -> row array in protocol field order), resubscribes
// with `since` after a reconnect so only missed rows are resent, re-applies
// watch and configure, paces its requests under the server's rate limit and
// splits large subscriptions into chunks. See docs/fastfeed-js.md.

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

/** Close codes that blame the client: no reconnect unless retryClientErrors. */
export const CLIENT_FAULT_CLOSE_CODES = Object.freeze([1002, 1003, 1007, 1008, 1009, 1010]);

/** Connection states, in `client.state`. */
export const State = Object.freeze({
  IDLE: "idle",             // never connected, or closed by close()
  CONNECTING: "connecting", // socket opening
  OPEN: "open",             // socket open
  WAITING: "reconnecting",  // closed, a reconnect is scheduled
});

const DEFAULTS = {
  token: "",                 // appended as ?token= when set
  protocols: [SUBPROTOCOL],
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
  WebSocket: globalThis.WebSocket,
};

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
    this.counters = { messages: 0, updates: 0, rows: 0, bytes: 0 };
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
      ws = new this.opts.WebSocket(this._socketUrl(), this.opts.protocols);
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
    if (this.wanted.size) {
      const syms = [...this.wanted];
      this._subscribeChunks(syms, resume)
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
    const reply = await this._send(match ? { op: "list", match } : { op: "list" });
    return reply.symbols;
  }

  /**
   * Subscribe, in chunks. Symbols are remembered and resubscribed after a
   * reconnect. Resolves with {rows, unknown, forbidden, errors} over all chunks.
   */
  subscribe(symbols) {
    const fresh = [];
    for (const s of symbols) {
      if (this.wanted.has(s)) continue;
      if (this.wanted.size >= this.opts.maxSubscriptions) break;
      this.wanted.add(s);
      fresh.push(s);
    }
    if (this.state !== State.OPEN) return Promise.resolve({ rows: [], unknown: [], forbidden: [], errors: [] });
    return this._subscribeChunks(fresh, false);
  }

  async _subscribeChunks(symbols, withSince) {
    const out = { rows: [], unknown: [], forbidden: [], errors: [] };
    const jobs = [];
    for (const chunk of this._chunks(symbols, withSince)) {
      const msg = { op: "subscribe", symbols: chunk };
      if (withSince) {
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
            }
          },
        ),
      );
    }
    await Promise.all(jobs);
    for (const s of out.unknown) this.wanted.delete(s);
    for (const s of out.forbidden) this.wanted.delete(s);
    return out;
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

  /** Unsubscribe and forget the rows. */
  async unsubscribe(symbols) {
    const syms = symbols.filter((s) => this.wanted.has(s));
    for (const s of syms) {
      this.wanted.delete(s);
      this.watched.delete(s);
      this.rows.delete(s);
    }
    if (this.state !== State.OPEN) return;
    const jobs = [];
    for (const chunk of this._chunks(syms.filter((s) => this.subscribed.has(s)), false)) {
      for (const s of chunk) this.subscribed.delete(s);
      jobs.push(this._send({ op: "unsubscribe", symbols: chunk }));
    }
    await Promise.all(jobs);
  }

  /** Watch: the server pushes these at once on every change. Kept across reconnects. */
  async watch(symbols) {
    for (const s of symbols) this.watched.add(s);
    if (this.state !== State.OPEN) return undefined;
    try {
      return await this._send({ op: "watch", symbols: [...symbols] });
    } catch (err) {
      if (err.code === "too_many_watched" || err.code === "not_subscribed" || err.code === "forbidden") {
        for (const s of symbols) this.watched.delete(s);
      }
      throw err;
    }
  }

  async unwatch(symbols) {
    for (const s of symbols) this.watched.delete(s);
    if (this.state !== State.OPEN) return undefined;
    return this._send({ op: "unwatch", symbols: [...symbols] });
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
    if (typeof data !== "string") {
      // Binary update frames belong to fastfeed.v1.bin, which this client
      // does not offer; ignore rather than fail.
      return;
    }
    c.bytes += data.length;
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      this._emit("error", { code: "bad_message", message: "server sent invalid JSON" });
      return;
    }
    switch (msg.type) {
      case "update": {
        const rows = msg.rows;
        const map = this.rows;
        let backwards = false;
        for (let i = 0; i < rows.length; i++) {
          const r = rows[i];
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
        this._emit("update", msg);
        return;
      }
      case "heartbeat":
        this._emit("heartbeat", msg);
        return;
      case "status":
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
    this._emit("snapshot", msg);
  }
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
