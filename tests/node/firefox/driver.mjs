// Drives pages in Firefox over WebDriver BiDi with puppeteer-core, which
// downloads no browser: the browser is the system's (Debian's firefox-esr).
// tests/test_browser_firefox.py drives it: one JSON command per line on
// stdin, one JSON line per answer or event on stdout.
//
//   {"id":1,"cmd":"launch","executable":"/usr/bin/firefox-esr","profile":"/tmp/…"}
//   {"id":2,"cmd":"open","page":"a","url":"http://…/","width":1280,"height":800}
//   {"id":3,"cmd":"wait","page":"a","js":"n => …","arg":5,"timeout_ms":20000}
//   {"id":4,"cmd":"eval","page":"a","js":"() => …","arg":null}
//   {"id":5,"cmd":"click","page":"a","selector":"#x"}
//   {"id":6,"cmd":"fill","page":"a","selector":"#search","text":"bb"}    types it
//   {"id":7,"cmd":"select","page":"a","selector":"#frame-ms","value":"250"}
//   {"id":8,"cmd":"screenshot","page":"a","path":"…/board.png"}
//   {"id":9,"cmd":"close","page":"a"}      {"id":10,"cmd":"exit"}
//
// Every command is answered by {"id":N,"ok":true,"value":…} or
// {"id":N,"ok":false,"error":"…"}. `js` is the source of a function run in
// the page (with `arg`); `wait` polls it every 100 ms until it returns a
// truthy value. What the page reports on its own comes as events:
// {"ev":"pageerror","page":…,"message":…} (an uncaught exception) and
// {"ev":"console","page":…,"type":"error"|"warn",…}.
//
// Every page records its WebSocket traffic in `window.__wsrec` before any of
// its own scripts run: the control messages it sent and received (updates and
// heartbeats are only counted) and the subprotocol of each connection that
// opened. Chromium's DevTools protocol shows frames; BiDi does not (yet).

import readline from "node:readline";
import puppeteer from "puppeteer-core";

let browser = null;
const pages = new Map();

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

// Runs in the page before its scripts: a WebSocket that keeps a record.
function recordWebSockets() {
  const rec = { sent: [], received: [], updates: 0, opened: [] };
  window.__wsrec = rec;
  const Native = window.WebSocket;
  const parse = (data) => {
    try { return typeof data === "string" ? JSON.parse(data) : null; } catch { return null; }
  };
  class RecordingWebSocket extends Native {
    constructor(...args) {
      super(...args);
      this.addEventListener("open", () => rec.opened.push(this.protocol));
      this.addEventListener("message", (ev) => {
        const m = parse(ev.data);
        if (m === null) return;
        if (m.type === "update" || m.type === "heartbeat") rec.updates += 1;
        else rec.received.push(m);
      });
    }
    send(data) {
      const m = parse(data);
      if (m !== null) rec.sent.push(m);
      return super.send(data);
    }
  }
  window.WebSocket = RecordingWebSocket;
}

function page(name) {
  const p = pages.get(name);
  if (!p) throw new Error(`no page named ${JSON.stringify(name)}`);
  return p;
}

// The function whose source is `js`, as a function puppeteer can send.
function fn(js) {
  const f = (0, eval)(`(${js})`);
  if (typeof f !== "function") throw new Error(`not a function: ${js.slice(0, 80)}`);
  return f;
}

const commands = {
  async launch({ executable, profile }) {
    browser = await puppeteer.launch({
      browser: "firefox",
      executablePath: executable,
      userDataDir: profile,
      headless: true,
      // launch() adds the preferences that keep Firefox quiet under automation
      // (no updates, no telemetry, no first-run pages) to the profile.
    });
    return await browser.version();
  },

  async open({ page: name, url, width, height }) {
    const p = await browser.newPage();
    pages.set(name, p);
    p.on("pageerror", (err) => emit({ ev: "pageerror", page: name, message: String(err) }));
    p.on("console", (msg) => {
      const type = msg.type();
      if (type === "error" || type === "warn") {
        emit({ ev: "console", page: name, type, text: msg.text() });
      }
    });
    await p.setViewport({ width, height });
    await p.evaluateOnNewDocument(recordWebSockets);
    await p.goto(url);
    return null;
  },

  async wait({ page: name, js, arg, timeout_ms: timeout }) {
    const handle = await page(name).waitForFunction(fn(js), { polling: 100, timeout }, arg);
    const value = await handle.jsonValue();
    await handle.dispose();
    return value;
  },

  async eval({ page: name, js, arg }) {
    return await page(name).evaluate(fn(js), arg);
  },

  async click({ page: name, selector }) {
    await page(name).click(selector);
    return null;
  },

  // As a person does it: focus, select all, delete, type. (Locator.fill("")
  // clears the value without an input event.)
  async fill({ page: name, selector, text }) {
    const p = page(name);
    await p.focus(selector);
    await p.keyboard.down("Control");
    await p.keyboard.press("KeyA");
    await p.keyboard.up("Control");
    await p.keyboard.press("Backspace");
    if (text) await p.keyboard.type(text);
    return null;
  },

  async select({ page: name, selector, value }) {
    return await page(name).select(selector, value);
  },

  async screenshot({ page: name, path }) {
    await page(name).screenshot({ path });
    return path;
  },

  async close({ page: name }) {
    await page(name).close();
    pages.delete(name);
    return null;
  },

  async exit() {
    if (browser) await browser.close();
    browser = null;
    return null;
  },
};

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  const msg = JSON.parse(line);
  const run = commands[msg.cmd];
  try {
    if (!run) throw new Error(`unknown command ${JSON.stringify(msg.cmd)}`);
    const value = await run(msg);
    emit({ id: msg.id, ok: true, value: value === undefined ? null : value });
  } catch (err) {
    emit({ id: msg.id, ok: false, error: String(err && err.stack ? err.stack : err) });
  }
  if (msg.cmd === "exit") break;
}
if (browser) await browser.close();
process.exit(0);
