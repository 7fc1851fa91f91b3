// Bun peer: Bun.serve WebSocket with server.publish on per-instrument topics
// (uWebSockets underneath), default settings (cork batching on).
// Holds the latest row per instrument, takes ticks on /ingest (JSON array of
// tick objects), serves /ws with subscribe -> snapshot, then one update frame
// per tick, published to the instrument's topic.
//   bun bun_server.js PORT   (or PORT env)
const PORT = parseInt(process.argv[2] || process.env.PORT || '8082', 10);
const FIELDS = ['sym', 'seq', 'ts', 'bid', 'ask', 'last', 'bid_size', 'ask_size', 'last_size', 'volume'];
const SYM_RE = /^[A-Za-z0-9._\-:/]{1,32}$/;

const rows = new Map();   // sym -> row array in FIELDS order
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

function ingest(text) {
  let msg;
  try { msg = JSON.parse(text); } catch (e) { return; }
  const t = nowNs();
  if (Array.isArray(msg)) { for (const tick of msg) applyTick(tick, t); }
  else if (msg && typeof msg === 'object') applyTick(msg, t);
}

function onClientMessage(ws, text) {
  let req;
  try { req = JSON.parse(text); } catch (e) { return; }
  if (!req || typeof req !== 'object') return;
  const id = req.id === undefined ? null : req.id;
  const syms = Array.isArray(req.symbols) ? req.symbols.filter((s) => typeof s === 'string') : [];
  if (req.op === 'subscribe') {
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
    for (const s of syms) ws.unsubscribe(s);
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
