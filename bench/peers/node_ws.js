// Node.js `ws` peer: the architecture desks run today.
// Holds the latest row per instrument, takes ticks on /ingest (JSON array of
// tick objects), serves /ws with subscribe -> snapshot, then one update frame
// per tick per subscribed client. Order books (the "book" channel): keeps
// every level of each book, takes {"type":"book",...} on /ingest, answers a
// subscribe with channels ["book"] with the books, then forwards every
// applied book message as its own update frame to the book's subscribers.
// Trades (the "trades" channel): takes {"type":"trade",...} on /ingest (a
// tseq not above the last dropped), keeps the last 100 per instrument for
// the snapshot's "recent", and forwards every trade as its own update frame.
//   node node_ws.js PORT            (or PORT env; BENCH_REDIS=redis://... to also
//                                    take ticks from the Redis channel BENCH_REDIS_CHANNEL)
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const PORT = parseInt(process.argv[2] || process.env.PORT || '8081', 10);
const FIELDS = ['sym', 'seq', 'ts', 'bid', 'ask', 'last', 'bid_size', 'ask_size', 'last_size', 'volume'];
const SYM_RE = /^[A-Za-z0-9._\-:/]{1,32}$/;

const rows = new Map();      // sym -> row array in FIELDS order
const subs = new Map();      // sym -> Set of client sockets
const books = new Map();     // sym -> {seq, bids: Map price -> level, asks: Map price -> level}
const bookSubs = new Map();  // sym -> Set of client sockets
const trades = new Map();    // sym -> {tseq, recent: [[tseq, ts, price, size, side], ...]}
const tradeSubs = new Map(); // sym -> Set of client sockets
const TRADE_RING = 100;

function nowNs() {
  return Math.round((performance.timeOrigin + performance.now()) * 1e6);
}

function applyTick(tick, t) {
  const sym = tick.sym;
  if (typeof sym !== 'string' || !SYM_RE.test(sym) || typeof tick.seq !== 'number') return;
  let row = rows.get(sym);
  if (row === undefined) {
    row = [sym, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    rows.set(sym, row);
  } else if (tick.seq <= row[1]) {
    return;                                   // stale
  }
  for (let i = 1; i < 10; i++) {
    const v = tick[FIELDS[i]];
    if (v !== undefined) row[i] = v;
  }
  const set = subs.get(sym);
  if (set === undefined || set.size === 0) return;
  const frame = Buffer.from('{"type":"update","t":' + t + ',"rows":[' + JSON.stringify(row) + ']}');
  for (const ws of set) ws.send(frame, { binary: false });
}

function applyBook(msg, t) {
  const sym = msg.sym;
  if (typeof sym !== 'string' || !SYM_RE.test(sym) || typeof msg.seq !== 'number') return;
  let book = books.get(sym);
  if (book === undefined) {
    book = { seq: 0, bids: new Map(), asks: new Map() };
    books.set(sym, book);
  } else if (msg.seq <= book.seq) {
    return;                                   // stale
  }
  if (msg.full === true) { book.bids.clear(); book.asks.clear(); }
  for (const side of ['bids', 'asks']) {
    const levels = msg[side];
    if (!Array.isArray(levels)) continue;
    const held = book[side];
    for (const lv of levels) {
      if (lv[1] === 0) held.delete(lv[0]);
      else held.set(lv[0], [lv[0], lv[1], lv[2] || 0]);
    }
  }
  book.seq = msg.seq;
  const set = bookSubs.get(sym);
  if (set === undefined || set.size === 0) return;
  const entry = { sym, seq: msg.seq, bids: msg.bids || [], asks: msg.asks || [] };
  if (msg.full === true) entry.full = true;
  const frame = Buffer.from('{"type":"update","t":' + t + ',"rows":[],"books":[' + JSON.stringify(entry) + ']}');
  for (const ws of set) ws.send(frame, { binary: false });
}

function bookView(sym, book) {
  const bids = [...book.bids.values()].sort((a, b) => b[0] - a[0]);
  const asks = [...book.asks.values()].sort((a, b) => a[0] - b[0]);
  return { sym, seq: book.seq, bids, asks };
}

function applyTrade(msg, t) {
  const sym = msg.sym;
  if (typeof sym !== 'string' || !SYM_RE.test(sym) || typeof msg.tseq !== 'number') return;
  let held = trades.get(sym);
  if (held === undefined) {
    held = { tseq: 0, recent: [] };
    trades.set(sym, held);
  } else if (msg.tseq <= held.tseq) {
    return;                                   // stale
  }
  const item = [msg.tseq, msg.ts, msg.price, msg.size, msg.side || ''];
  held.tseq = msg.tseq;
  held.recent.push(item);
  if (held.recent.length > TRADE_RING) held.recent.shift();
  const set = tradeSubs.get(sym);
  if (set === undefined || set.size === 0) return;
  const frame = Buffer.from('{"type":"update","t":' + t + ',"rows":[],"trades":[{"sym":' +
                            JSON.stringify(sym) + ',"items":[' + JSON.stringify(item) + ']}]}');
  for (const ws of set) ws.send(frame, { binary: false });
}

function apply(msg, t) {
  if (msg && msg.type === 'book') applyBook(msg, t);
  else if (msg && msg.type === 'trade') applyTrade(msg, t);
  else if (msg && typeof msg === 'object') applyTick(msg, t);
}

function ingest(text) {
  let msg;
  try { msg = JSON.parse(text); } catch (e) { return; }
  const t = nowNs();
  if (Array.isArray(msg)) { for (const m of msg) apply(m, t); }
  else apply(msg, t);
}

function onClientMessage(ws, text) {
  let req;
  try { req = JSON.parse(text); } catch (e) { return; }
  if (!req || typeof req !== 'object') return;
  const id = req.id === undefined ? null : req.id;
  const syms = Array.isArray(req.symbols) ? req.symbols.filter((s) => typeof s === 'string') : [];
  const chans = Array.isArray(req.channels) ? req.channels : null;
  if (req.op === 'subscribe' && chans && chans.includes('trades')) {
    const out = [];
    const unknown = [];
    for (const s of syms) {
      const held = trades.get(s);
      if (held === undefined && !rows.has(s)) { unknown.push(s); continue; }
      if (ws.trades.has(s)) continue;
      ws.trades.add(s);
      let set = tradeSubs.get(s);
      if (set === undefined) { set = new Set(); tradeSubs.set(s, set); }
      set.add(ws);
      out.push({ sym: s, recent: held === undefined ? [] : held.recent });
    }
    ws.send(JSON.stringify({ type: 'snapshot', id, rows: [], trades: out, unknown }));
  } else if (req.op === 'subscribe' && chans && chans.includes('book')) {
    const out = [];
    const unknown = [];
    for (const s of syms) {
      const book = books.get(s);
      if (book === undefined) { unknown.push(s); continue; }
      if (ws.books.has(s)) continue;
      ws.books.add(s);
      let set = bookSubs.get(s);
      if (set === undefined) { set = new Set(); bookSubs.set(s, set); }
      set.add(ws);
      out.push(bookView(s, book));
    }
    ws.send(JSON.stringify({ type: 'snapshot', id, rows: [], books: out, unknown }));
  } else if (req.op === 'subscribe') {
    const out = [];
    const unknown = [];
    for (const s of syms) {
      const row = rows.get(s);
      if (row === undefined) { unknown.push(s); continue; }
      if (ws.syms.has(s)) continue;
      ws.syms.add(s);
      let set = subs.get(s);
      if (set === undefined) { set = new Set(); subs.set(s, set); }
      set.add(ws);
      out.push(row);
    }
    ws.send(JSON.stringify({ type: 'snapshot', id, fields: FIELDS, rows: out, unknown }));
  } else if (req.op === 'unsubscribe') {
    for (const s of syms) {
      ws.syms.delete(s); const set = subs.get(s); if (set) set.delete(ws);
      ws.books.delete(s); const bset = bookSubs.get(s); if (bset) bset.delete(ws);
      ws.trades.delete(s); const tset = tradeSubs.get(s); if (tset) tset.delete(ws);
    }
    ws.send(JSON.stringify({ type: 'ack', id, op: 'unsubscribe', symbols: syms }));
  } else if (req.op === 'watch' || req.op === 'unwatch') {
    // every tick is pushed at once anyway
    ws.send(JSON.stringify({ type: 'ack', id, op: req.op, symbols: syms }));
  } else if (req.op === 'ping') {
    ws.send(JSON.stringify({ type: 'pong', id, ts: nowNs() }));
  } else {
    ws.send(JSON.stringify({ type: 'error', id, code: 'unknown_op', message: String(req.op) }));
  }
}

const server = http.createServer((req, res) => {
  if (req.url === '/healthz') { res.writeHead(200); res.end('ok'); return; }
  res.writeHead(404); res.end();
});
const clients = new WebSocketServer({ noServer: true });
const publishers = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024 * 1024 });

server.on('upgrade', (req, socket, head) => {
  const path = req.url.split('?')[0];
  if (path === '/ws') {
    clients.handleUpgrade(req, socket, head, (ws) => {
      ws.syms = new Set();
      ws.books = new Set();
      ws.trades = new Set();
      ws.on('message', (data) => onClientMessage(ws, data));
      ws.on('close', () => {
        for (const s of ws.syms) { const set = subs.get(s); if (set) set.delete(ws); }
        for (const s of ws.books) { const set = bookSubs.get(s); if (set) set.delete(ws); }
        for (const s of ws.trades) { const set = tradeSubs.get(s); if (set) set.delete(ws); }
      });
      ws.on('error', () => {});
    });
  } else if (path === '/ingest') {
    publishers.handleUpgrade(req, socket, head, (ws) => {
      ws.on('message', (data) => ingest(data));
      ws.on('error', () => {});
    });
  } else {
    socket.destroy();
  }
});

if (process.env.BENCH_REDIS) {
  const Redis = require('ioredis');
  const sub = new Redis(process.env.BENCH_REDIS);
  sub.subscribe(process.env.BENCH_REDIS_CHANNEL || 'bench:ticks');
  sub.on('messageBuffer', (_ch, data) => ingest(data));
}

server.listen(PORT, '127.0.0.1', () => {
  process.stdout.write(`node_ws listening on ${PORT}\n`);
});
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
