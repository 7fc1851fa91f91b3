// Bun peer: Bun.serve WebSocket with server.publish on per-instrument topics
// (uWebSockets underneath), default settings (cork batching on).
// Holds the latest row per instrument, takes ticks on /ingest (JSON array of
// tick objects), serves /ws with subscribe -> snapshot, then one update frame
// per tick, published to the instrument's topic. Order books (the "book"
// channel): keeps every level of each book, takes {"type":"book",...} on
// /ingest, answers a subscribe with channels ["book"] with the books, then
// publishes every applied book message as its own update frame to the
// book's topic ("book:" + sym). Trades (the "trades" channel): takes
// {"type":"trade",...} on /ingest (a tseq not above the last dropped), keeps
// the last 100 per instrument for the snapshot's "recent", and publishes every
// trade as its own update frame to the topic "trades:" + sym.
//   bun bun_server.js PORT   (or PORT env)
const PORT = parseInt(process.argv[2] || process.env.PORT || '8082', 10);
const FIELDS = ['sym', 'seq', 'ts', 'bid', 'ask', 'last', 'bid_size', 'ask_size', 'last_size', 'volume'];
const SYM_RE = /^[A-Za-z0-9._\-:/]{1,32}$/;

const rows = new Map();   // sym -> row array in FIELDS order
const books = new Map();  // sym -> {seq, bids: Map price -> level, asks: Map price -> level}
const trades = new Map(); // sym -> {tseq, recent: [[tseq, ts, price, size, side], ...]}
const TRADE_RING = 100;
let server;

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
  if (server.subscriberCount(sym) > 0) {
    server.publish(sym, '{"type":"update","t":' + t + ',"rows":[' + JSON.stringify(row) + ']}');
  }
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
  const topic = 'book:' + sym;
  if (server.subscriberCount(topic) > 0) {
    const entry = { sym, seq: msg.seq, bids: msg.bids || [], asks: msg.asks || [] };
    if (msg.full === true) entry.full = true;
    server.publish(topic, '{"type":"update","t":' + t + ',"rows":[],"books":[' + JSON.stringify(entry) + ']}');
  }
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
  const topic = 'trades:' + sym;
  if (server.subscriberCount(topic) > 0) {
    server.publish(topic, '{"type":"update","t":' + t + ',"rows":[],"trades":[{"sym":' +
                   JSON.stringify(sym) + ',"items":[' + JSON.stringify(item) + ']}]}');
  }
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
      if (ws.isSubscribed('trades:' + s)) continue;
      ws.subscribe('trades:' + s);
      out.push({ sym: s, recent: held === undefined ? [] : held.recent });
    }
    ws.send(JSON.stringify({ type: 'snapshot', id, rows: [], trades: out, unknown }));
  } else if (req.op === 'subscribe' && chans && chans.includes('book')) {
    const out = [];
    const unknown = [];
    for (const s of syms) {
      const book = books.get(s);
      if (book === undefined) { unknown.push(s); continue; }
      if (ws.isSubscribed('book:' + s)) continue;
      ws.subscribe('book:' + s);
      out.push(bookView(s, book));
    }
    ws.send(JSON.stringify({ type: 'snapshot', id, rows: [], books: out, unknown }));
  } else if (req.op === 'subscribe') {
    const out = [];
    const unknown = [];
    for (const s of syms) {
      const row = rows.get(s);
      if (row === undefined) { unknown.push(s); continue; }
      if (ws.isSubscribed(s)) continue;
      ws.subscribe(s);
      out.push(row);
    }
    ws.send(JSON.stringify({ type: 'snapshot', id, fields: FIELDS, rows: out, unknown }));
  } else if (req.op === 'unsubscribe') {
    for (const s of syms) { ws.unsubscribe(s); ws.unsubscribe('book:' + s); ws.unsubscribe('trades:' + s); }
    ws.send(JSON.stringify({ type: 'ack', id, op: 'unsubscribe', symbols: syms }));
  } else if (req.op === 'watch' || req.op === 'unwatch') {
    ws.send(JSON.stringify({ type: 'ack', id, op: req.op, symbols: syms }));
  } else if (req.op === 'ping') {
    ws.send(JSON.stringify({ type: 'pong', id, ts: nowNs() }));
  } else {
    ws.send(JSON.stringify({ type: 'error', id, code: 'unknown_op', message: String(req.op) }));
  }
}

server = Bun.serve({
  port: PORT,
  hostname: '127.0.0.1',
  fetch(req, srv) {
    const path = new URL(req.url).pathname;
    if (path === '/ws' || path === '/ingest') {
      if (srv.upgrade(req, { data: { ingest: path === '/ingest' } })) return undefined;
      return new Response('upgrade required', { status: 426 });
    }
    if (path === '/healthz') return new Response('ok');
    return new Response('not found', { status: 404 });
  },
  websocket: {
    maxPayloadLength: 64 * 1024 * 1024,
    message(ws, msg) {
      if (ws.data.ingest) ingest(msg);
      else onClientMessage(ws, msg);
    },
  },
});
process.stdout.write(`bun_server listening on ${PORT}\n`);
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
