// fastfeed.js (the module the board ships) run in Node.js on the `ws`
// WebSocket. tests/test_fastfeed_js.py drives it: one JSON command per line
// on stdin, one JSON event per line on stdout.
//
//   {"id":1,"cmd":"connect","url":"ws://…/ws","compact":true,"binary":true}   (both optional)
//   {"id":2,"cmd":"subscribe","symbols":["BBCA"],"channels":["book"]}
//   {"id":3,"cmd":"unsubscribe","symbols":["BBCA"],"channels":["book"]}
//   {"id":4,"cmd":"list","match":"BB*"}                 -> {"ev":"done","id":4,"result":[…]}
//   {"id":5,"cmd":"state"}                              -> books, rows, counters
//   {"id":6,"cmd":"checksum","bids":[…],"asks":[…]}     bookChecksum of these levels
//   {"id":7,"cmd":"crc32","hex":"00ff…"}                crc32 of these bytes
//   {"id":8,"cmd":"drop"}      the socket dies without a close frame (1006): fastfeed.js reconnects
//   {"id":9,"cmd":"exit"}
//
// Every command is answered by {"ev":"done","id":N,"result":…} (or
// {"ev":"failed","id":N,"message":…}); the client's "bookresync",
// "bookstatus", "open" and "lost" events are reported as they happen. The
// state has the tapes (a symbol's: its tseqs; the market's: [sym, tseq]),
// the trades lost and the bars.

import readline from "node:readline";
import WebSocket from "ws";

const lib = await import(process.argv[2]);
const { FastfeedClient, INTERVALS, MARKET, bookChecksum, crc32 } = lib;

let client = null;

function emit(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

function state() {
  const books = {};
  for (const [sym, b] of client.books) {
    books[sym] = { seq: b.seq, bids: b.bids, asks: b.asks, stale: b.stale, checksum: b.checksum() };
  }
  const trades = {};
  for (const [sym, tape] of client.trades) {
    trades[sym] = sym === MARKET ? tape.map((t) => [t[0], t[1]]) : tape.map((t) => t[0]);
  }
  const bars = {};
  for (const [sym, chans] of client.channels) {
    for (const iv of INTERVALS) if (chans.has(`bars:${iv}`)) bars[`${iv} ${sym}`] = client.getBars(sym, iv);
  }
  return {
    books, rows: Object.fromEntries(client.rows), counters: client.counters, state: client.state,
    connects: client.connects, trades, lost: Object.fromEntries(client.tradesLost), bars,
    wanted: [...client.wanted], protocol: client._ws ? client._ws.protocol : null,
  };
}

async function run(cmd) {
  switch (cmd.cmd) {
    case "connect": {
      client = new FastfeedClient(cmd.url, {
        WebSocket, pingEveryMs: 0, backoffInitialMs: 50, backoffMaxMs: 200, tapeSize: 100000,
        compact: Boolean(cmd.compact), binary: Boolean(cmd.binary),
      });
      client.on("update", (m) => { if (cmd.compact) emit({ ev: "rows", rows: m.rows }); });
      client.on("bookresync", (e) => emit({ ev: "bookresync", ...e }));
      client.on("bookstatus", (e) => emit({ ev: "bookstatus", ...e }));
      client.on("open", (e) => emit({ ev: "open", reconnect: e.reconnect }));
      client.on("lost", (e) => emit({ ev: "lost", sym: e.sym, n: e.n }));
      const opened = new Promise((resolve) => client.on("open", resolve));
      client.connect();
      await opened;
      return null;
    }
    case "subscribe": {
      const res = await client.subscribe(cmd.symbols, cmd.channels);
      return { unknown: res.unknown, forbidden: res.forbidden, errors: res.errors.map((e) => e.code) };
    }
    case "unsubscribe":
      await client.unsubscribe(cmd.symbols, cmd.channels);
      return null;
    case "list":
      return client.list(cmd.match);
    case "state":
      return state();
    case "checksum":
      return bookChecksum(cmd.bids, cmd.asks, cmd.depth);
    case "crc32":
      return crc32(Uint8Array.from(Buffer.from(cmd.hex, "hex")));
    case "drop":
      client._ws.terminate();
      return null;
    case "exit":
      if (client) client.close();
      setTimeout(() => process.exit(0), 10);
      return null;
    default:
      throw new Error(`unknown command ${cmd.cmd}`);
  }
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  const cmd = JSON.parse(line);
  run(cmd).then(
    (result) => emit({ ev: "done", id: cmd.id, result }),
    (err) => emit({ ev: "failed", id: cmd.id, message: String(err && err.message), code: err && err.code }),
  );
});
