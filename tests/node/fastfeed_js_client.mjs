// fastfeed.js (the module the board ships) run in Node.js on the `ws`
// WebSocket. tests/test_fastfeed_js.py drives it: one JSON command per line
// on stdin, one JSON event per line on stdout.
//
//   {"id":1,"cmd":"connect","url":"ws://…/ws"}
//   {"id":2,"cmd":"subscribe","symbols":["BBCA"],"channels":["book"]}
//   {"id":3,"cmd":"unsubscribe","symbols":["BBCA"],"channels":["book"]}
//   {"id":4,"cmd":"list","match":"BB*"}                 -> {"ev":"done","id":4,"result":[…]}
//   {"id":5,"cmd":"state"}                              -> books, rows, counters
//   {"id":6,"cmd":"checksum","bids":[…],"asks":[…]}     bookChecksum of these levels
//   {"id":7,"cmd":"crc32","hex":"00ff…"}                crc32 of these bytes
//   {"id":8,"cmd":"exit"}
//
// Every command is answered by {"ev":"done","id":N,"result":…} (or
// {"ev":"failed","id":N,"message":…}); the client's "bookresync" and
// "bookstatus" events are reported as they happen.

import readline from "node:readline";
import WebSocket from "ws";

const lib = await import(process.argv[2]);
const { FastfeedClient, bookChecksum, crc32 } = lib;

let client = null;

function emit(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

function state() {
  const books = {};
  for (const [sym, b] of client.books) {
    books[sym] = { seq: b.seq, bids: b.bids, asks: b.asks, stale: b.stale, checksum: b.checksum() };
  }
  return { books, rows: Object.fromEntries(client.rows), counters: client.counters, state: client.state };
}

async function run(cmd) {
  switch (cmd.cmd) {
    case "connect": {
      client = new FastfeedClient(cmd.url, { WebSocket, pingEveryMs: 0, backoffInitialMs: 50, backoffMaxMs: 200 });
      client.on("bookresync", (e) => emit({ ev: "bookresync", ...e }));
      client.on("bookstatus", (e) => emit({ ev: "bookstatus", ...e }));
      const opened = new Promise((resolve) => client.on("open", resolve));
      client.connect();
      await opened;
      return null;
    }
    case "subscribe": {
      const res = await client.subscribe(cmd.symbols, cmd.channels);
      return { unknown: res.unknown, errors: res.errors.map((e) => e.code) };
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
