// A fastfeed client built on Node.js `ws`, a WebSocket library fastfeed does
// not share code with. tests/test_node_client.py drives it: one JSON command
// per line on stdin, one JSON event per line on stdout.
//
//   {"id":1,"cmd":"open","name":"a","url":"ws://…/ws","protocol":"fastfeed.v1.json"}
//   {"id":2,"cmd":"send","name":"a","text":"…","repeat":1}     text frame (text × repeat)
//   {"id":3,"cmd":"send_binary","name":"a","hex":"00ff"}       binary frame
//   {"id":4,"cmd":"pause","name":"a"} / {"cmd":"resume",…}     stop / restart reading the socket
//   {"id":5,"cmd":"state","name":"a"}                          -> {"ev":"state","rows":{…},…}
//   {"id":6,"cmd":"close","name":"a","code":1000}
//   {"id":7,"cmd":"exit"}
//
// Every command is answered by {"ev":"done","id":N} (or {"ev":"failed",…}).
// Snapshot and update rows are merged into the connection's rows the way the
// protocol says (a row replaces the held one only with a higher seq); update
// frames and heartbeats are counted, every other message is reported as
// {"ev":"message","name":…,"msg":…}, and the socket's life as "open",
// "close" (with code and reason) and "error" events.

import readline from "node:readline";
import WebSocket from "ws";

const conns = new Map();

function emit(event) {
  process.stdout.write(JSON.stringify(event) + "\n");
}

function merge(conn, rows) {
  for (const row of rows) {
    const held = conn.rows[row[0]];
    if (held === undefined || row[1] > held[1]) conn.rows[row[0]] = row;
  }
}

function open(name, url, protocol) {
  const ws = new WebSocket(url, protocol ? [protocol] : [], { maxPayload: 64 * 1024 * 1024 });
  const conn = { ws, rows: {}, updates: 0, heartbeats: 0, binaryFrames: 0 };
  conns.set(name, conn);
  ws.on("open", () => emit({ ev: "open", name, protocol: ws.protocol }));
  ws.on("message", (data, isBinary) => {
    if (isBinary) {
      conn.binaryFrames += 1;
      return;
    }
    const msg = JSON.parse(data.toString("utf8"));
    if (msg.type === "update") {
      conn.updates += 1;
      merge(conn, msg.rows);
    } else if (msg.type === "heartbeat") {
      conn.heartbeats += 1;
    } else {
      if (msg.type === "snapshot") merge(conn, msg.rows);
      emit({ ev: "message", name, msg });
    }
  });
  ws.on("close", (code, reason) => emit({ ev: "close", name, code, reason: reason.toString() }));
  ws.on("error", (err) => emit({ ev: "error", name, message: String(err && err.message) }));
}

function run(c) {
  const conn = c.name === undefined ? undefined : conns.get(c.name);
  switch (c.cmd) {
    case "open":
      open(c.name, c.url, c.protocol);
      break;
    case "send":
      conn.ws.send(c.text.repeat(c.repeat ?? 1));
      break;
    case "send_binary":
      conn.ws.send(Buffer.from(c.hex, "hex"), { binary: true });
      break;
    case "pause":
      conn.ws.pause();
      break;
    case "resume":
      conn.ws.resume();
      break;
    case "state":
      emit({
        ev: "state",
        name: c.name,
        rows: conn.rows,
        updates: conn.updates,
        heartbeats: conn.heartbeats,
        binaryFrames: conn.binaryFrames,
        paused: conn.ws.isPaused,
        readyState: conn.ws.readyState,
      });
      break;
    case "close":
      conn.ws.close(c.code ?? 1000);
      break;
    case "exit":
      emit({ ev: "done", id: c.id });
      process.exit(0);
      break;
    default:
      throw new Error(`unknown command ${c.cmd}`);
  }
}

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  let c;
  try {
    c = JSON.parse(line);
    run(c);
    emit({ ev: "done", id: c.id });
  } catch (err) {
    emit({ ev: "failed", id: c && c.id, message: String(err && err.stack) });
  }
}).on("close", () => process.exit(0)); // the test is gone: so are we
