// The board's own client, fastfeed.js, run in Node.js on `ws` (the pinned
// WebSocket of tests/node/package.json) for tests/test_fastfeed_js.py: one
// JSON command per line on stdin, one JSON event per line on stdout.
//
//   {"id":1,"cmd":"connect","url":"ws://…/ws"}
//   {"id":2,"cmd":"subscribe","symbols":[…],"channels":["trades","bars:1s"]}
//   {"id":3,"cmd":"drop"}      the socket dies without a close frame (1006): fastfeed.js reconnects
//   {"id":4,"cmd":"state"}     -> {"ev":"state","trades":{sym:[tseq,…]},"lost":{…},"bars":{…},…}
//   {"id":5,"cmd":"exit"}
//
// Every command is answered by {"ev":"done","id":N} (or {"ev":"failed",…});
// the client's "open", "close" and "lost" events are reported as they come.

import readline from "node:readline";
import WebSocket from "ws";
import { FastfeedClient, INTERVALS, MARKET } from "../../src/fastfeed/web/fastfeed.js";

let client = null;

function emit(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

function state() {
  const trades = {};
  for (const [sym, tape] of client.trades) {
    trades[sym] = sym === MARKET ? tape.map((t) => [t[0], t[1]]) : tape.map((t) => t[0]);
  }
  const bars = {};
  for (const iv of INTERVALS) {
    for (const sym of client.channels.get(`bars:${iv}`) || []) bars[`${iv} ${sym}`] = client.getBars(sym, iv);
  }
  return {
    ev: "state",
    state: client.state,
    connects: client.connects,
    trades,
    lost: Object.fromEntries(client.tradesLost),
    bars,
    counters: client.counters,
  };
}

const commands = {
  connect({ url }) {
    client = new FastfeedClient(url, { WebSocket, backoffInitialMs: 50, backoffMaxMs: 200, pingEveryMs: 0, tapeSize: 100000 });
    client.on("open", (e) => emit({ ev: "open", reconnect: e.reconnect }));
    client.on("close", (e) => emit({ ev: "close", code: e.code, willReconnect: e.willReconnect }));
    client.on("lost", (e) => emit({ ev: "lost", sym: e.sym, n: e.n }));
    client.connect();
  },
  async subscribe({ symbols, channels }) {
    const res = await client.subscribe(symbols, { channels });
    emit({ ev: "subscribed", unknown: res.unknown, forbidden: res.forbidden, errors: res.errors.map(String) });
  },
  drop() {
    client._ws.terminate();
  },
  state() {
    emit(state());
  },
  exit() {
    client?.close();
    setTimeout(() => process.exit(0), 10);
  },
};

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", async (line) => {
  const msg = JSON.parse(line);
  try {
    await commands[msg.cmd](msg);
    emit({ ev: "done", id: msg.id });
  } catch (err) {
    emit({ ev: "failed", id: msg.id, error: String(err && err.stack) });
  }
});
