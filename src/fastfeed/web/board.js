// The live board: every instrument the gateway knows, virtually scrolled.
//
// Messages only touch plain data (rows, a dirty set); the DOM is written in
// one requestAnimationFrame callback, and only for rows on screen whose text
// actually changed (every cell remembers what it shows). Clicking a row
// opens its depth ladder (the "book" channel), painted in the same frame, and
// shows its trades and bars in the side panel (trades-panel.js).

import { BOOK_CHANNEL, F, FastfeedClient, MARKET, defaultUrl } from "./fastfeed.js";
import { mountTradesPanel } from "./trades-panel.js";

const ROW_H = 24;        // px, matches --row in style.css
const OVERSCAN = 6;      // rows drawn above and below the viewport
const FLASH_MS = 600;    // how long an up/down flash stays on
const MIN_ROWS = 6;      // rows written per frame, at the least
const COLS = ["star", "sym", "bid", "ask", "last", "change", "spread", "volume", "time"];
const DEPTH_ROWS = 10;   // ladder levels per side
const DEPTH_COLS = ["bid_orders", "bid_volume", "bid", "ask", "ask_volume", "ask_orders"];
// (symbol, channel) pairs the board leaves free under the subscription limit:
// the ladder's one book (and the side panel's own, its `reserve`). Without it
// a gateway with as many instruments as the limit refuses the book
// (too_many_subscriptions) and no ladder opens.
const LADDER_PAIRS = 1;

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

// ---- formatting -------------------------------------------------------------

const numberFormats = [];
function fmt(v, dp) {
  if (v == null || Number.isNaN(v)) return "–";
  let nf = numberFormats[dp];
  if (!nf) {
    nf = numberFormats[dp] = new Intl.NumberFormat("en-US", {
      minimumFractionDigits: dp,
      maximumFractionDigits: dp,
    });
  }
  return nf.format(v);
}

function decimals(v) {
  if (typeof v !== "number" || Number.isInteger(v) || !Number.isFinite(v)) return 0;
  const s = v.toFixed(8);
  let end = s.length;
  while (s.charCodeAt(end - 1) === 48) end--; // trailing "0"
  return Math.max(0, end - s.indexOf(".") - 1);
}

const tzOffsetMs = new Date().getTimezoneOffset() * 60000;
const pad2 = (n) => (n < 10 ? "0" : "") + n;
function fmtTime(tsNs) {
  if (!tsNs) return "–";
  const ms = Math.floor(tsNs / 1e6) - tzOffsetMs;
  const d = ((ms % 86400000) + 86400000) % 86400000;
  const h = Math.floor(d / 3600000);
  const m = Math.floor(d / 60000) % 60;
  const s = Math.floor(d / 1000) % 60;
  const milli = d % 1000;
  return `${pad2(h)}:${pad2(m)}:${pad2(s)}.${String(milli).padStart(3, "0")}`;
}

// A row the gateway holds for an instrument that has never traded yet.
const hasData = (row) => row[F.TS] > 0;

// ---- state -------------------------------------------------------------------

const WATCH_KEY = "fastfeed.watched";

class Board {
  constructor(client) {
    this.client = client;
    this.all = [];              // every symbol the board shows, sorted
    this.meta = new Map();      // sym -> {first, dp, dir[3], at[3], bid, ask, last}
    this.watched = [];          // starred symbols, in starring order (pinned on top)
    this.delayed = new Set();   // symbols this token sees delayed (snapshots' "delayed")
    this.delayText = "";        // "delayed 15 min", or "" for real time
    this.filter = "";
    this.view = [];             // what the grid shows: pinned then the rest, filtered
    this.dirty = new Set();     // syms changed since the last paint
    this.layoutDirty = true;    // the view or the scroll position changed
    this.barDirty = true;       // status bar text changed
    this.pool = [];             // pooled <tr>s
    this.first = 0;             // view index of pool[0]
    this.raf = 0;
    this.stats = { paints: 0, cellWrites: 0, paintMs: 0, maxPaintMs: 0 };
    this.budget = 1000;         // rows written per frame (adapted)
    this.lastPaintTs = 0;
    this.visLo = 0;             // pool rows on screen: [visLo, visHi)
    this.visHi = 0;
    this.rr = 0;                // round-robin start
    this.chained = false;       // the last paint asked for the next frame
    this.pinnedCount = 0;
    this.bar = {};              // status texts to paint
    this.selected = params.get("sym") || null; // the symbol the side panels show
    this.note = "";
    this.rateWindow = { rows: 0, msgs: 0, lat: [], age: [] };
    try {
      this.watched = JSON.parse(localStorage.getItem(WATCH_KEY) || "[]").filter((s) => typeof s === "string");
    } catch {
      this.watched = [];
    }

    this.ladder = new Ladder(this);
    this.viewport = $("board");
    this.sizer = $("sizer");
    this.table = $("body");
    this.tbody = $("rows");
    this.empty = $("empty");
    this.paint = this.paint.bind(this);
  }

  // -- data in ---------------------------------------------------------------

  setSymbols(symbols) {
    const seen = new Set(this.all);
    let added = false;
    for (const s of symbols) {
      if (!seen.has(s)) {
        seen.add(s);
        this.all.push(s);
        added = true;
      }
    }
    if (added) {
      this.all.sort();
      this.rebuildView();
    }
  }

  // Called for every row of every snapshot and update, before any paint.
  touch(row) {
    const sym = row[F.SYM];
    let m = this.meta.get(sym);
    const now = performance.now();
    if (!hasData(row)) {
      this.dirty.add(sym);
      return;
    }
    if (!m) {
      m = { first: row[F.LAST], dp: 0, dir: [0, 0, 0], at: [0, 0, 0], px: [row[F.BID], row[F.ASK], row[F.LAST]] };
      this.meta.set(sym, m);
    } else {
      const px = m.px;
      for (let i = 0; i < 3; i++) {
        const v = row[F.BID + i];
        if (v !== px[i]) {
          if (v != null && px[i] != null) {
            m.dir[i] = v > px[i] ? 1 : -1;
            m.at[i] = now;
          }
          px[i] = v;
        }
      }
      if (m.first == null) m.first = row[F.LAST];
    }
    this.dirty.add(sym);
  }

  onRows(rows) {
    for (let i = 0; i < rows.length; i++) this.touch(rows[i]);
    this.schedule();
  }

  // -- the view ---------------------------------------------------------------

  rebuildView() {
    const q = this.filter;
    const match = q ? (s) => s.toUpperCase().includes(q) : () => true;
    const pinned = new Set(this.watched);
    const view = this.watched.filter(match);
    for (const s of this.all) if (!pinned.has(s) && match(s)) view.push(s);
    this.view = view;
    this.pinnedCount = this.watched.filter(match).length;
    this.layoutDirty = true;
    this.setBar("count", this.countText());
    this.schedule();
  }

  countText() {
    const n = this.all.length;
    if (!n) return "";
    const shown = this.view.length;
    const base = shown === n ? `${n.toLocaleString("en-US")} instruments` : `${shown.toLocaleString("en-US")} of ${n.toLocaleString("en-US")}`;
    return this.pinnedCount ? `${base} · ${this.pinnedCount} watched` : base;
  }

  setFilter(text) {
    const q = text.trim().toUpperCase();
    if (q === this.filter) return;
    this.filter = q;
    this.viewport.scrollTop = 0;
    this.rebuildView();
  }

  isWatched(sym) {
    return this.watched.includes(sym);
  }

  async toggleWatch(sym) {
    const on = !this.isWatched(sym);
    // Optimistic: pin at once, undo if the server refuses.
    if (on) this.watched.push(sym);
    else this.watched = this.watched.filter((s) => s !== sym);
    this.saveWatched();
    this.rebuildView();
    this.dirty.add(sym);
    try {
      if (on) await this.client.watch([sym]);
      else await this.client.unwatch([sym]);
      this.setNote("");
    } catch (err) {
      if (err.code === "not_connected" || err.code === "closed") return; // re-sent on reconnect
      if (on) this.watched = this.watched.filter((s) => s !== sym);
      this.saveWatched();
      this.rebuildView();
      this.setNote(`watch ${sym}: ${err.code}: ${err.message}`);
    }
  }

  saveWatched() {
    try {
      localStorage.setItem(WATCH_KEY, JSON.stringify(this.watched));
    } catch {
      /* private mode */
    }
  }

  // The symbol the side panels show: a click on its row. They listen for
  // "fastfeed:select" on the document.
  select(sym) {
    if (sym === this.selected) return;
    this.selected = sym;
    this.layoutDirty = true;
    this.schedule();
    // `delay`: "delayed 15 min" when this token sees it delayed, else ""
    const delay = this.delayed.has(sym) ? this.delayText : "";
    document.dispatchEvent(new CustomEvent("fastfeed:select", { detail: { sym, delay } }));
  }

  // -- status bar -------------------------------------------------------------

  setBar(key, value) {
    if (this.bar[key] === value) return;
    this.bar[key] = value;
    this.barDirty = true;
    this.schedule();
  }

  setNote(text) {
    this.setBar("note", text);
  }

  // -- painting ---------------------------------------------------------------

  schedule() {
    if (!this.raf) this.raf = requestAnimationFrame(this.paint);
  }

  makeRow() {
    const tr = document.createElement("tr");
    const cells = {};
    for (const c of COLS) {
      const td = document.createElement("td");
      td.dataset.f = c;
      if (c === "star") {
        td.className = "st";
        const b = document.createElement("button");
        b.className = "star";
        b.type = "button";
        b.setAttribute("aria-pressed", "false");
        b.title = "watch";
        b.textContent = "☆";
        td.appendChild(b);
        cells.star = { el: b, text: "☆", cls: "" };
      } else {
        if (c === "sym") td.className = "sym";
        cells[c] = { el: td, text: "", cls: td.className };
      }
      tr.appendChild(td);
    }
    return { tr, cells, sym: null, pinned: false, flashUntil: 0 };
  }

  ensurePool() {
    const h = this.viewport.clientHeight || 600;
    const want = Math.ceil(h / ROW_H) + 2 * OVERSCAN;
    if (this.pool.length === want) return;
    while (this.pool.length < want) {
      const r = this.makeRow();
      this.pool.push(r);
      this.tbody.appendChild(r.tr);
    }
    while (this.pool.length > want) this.pool.pop().tr.remove();
    this.layoutDirty = true;
  }

  setText(cell, text) {
    if (cell.text !== text) {
      cell.text = text;
      // Rewrite the one text node in place: no node churn, no subtree swap.
      const node = cell.el.firstChild;
      if (node && node.nodeType === 3) node.data = text;
      else cell.el.textContent = text;
      this.stats.cellWrites++;
    }
  }

  setClass(cell, cls) {
    if (cell.cls !== cls) {
      cell.cls = cls;
      cell.el.className = cls;
    }
  }

  renderRow(r, sym, now) {
    const c = r.cells;
    if (r.sym !== sym) {
      r.sym = sym;
      if (sym == null) {
        r.tr.hidden = true;
        r.tr.removeAttribute("data-sym");
        return;
      }
      r.tr.hidden = false;
      r.tr.dataset.sym = sym;
      this.setText(c.sym, sym);
    }
    // the symbol the side panel shows, which is also the ladder's when it is open
    const selected = sym === this.selected || sym === this.ladder.sym;
    if (r.selected !== selected) {
      r.selected = selected;
      r.tr.classList.toggle("selected", selected);
    }
    const late = this.delayed.has(sym);
    if (r.late !== late) {
      r.late = late;
      r.tr.classList.toggle("delayed", late);
      c.sym.el.dataset.delay = late ? this.delayText : "";
      c.sym.el.title = late ? this.delayText : "";
    }
    const pinned = this.isWatched(sym);
    if (r.pinned !== pinned) {
      r.pinned = pinned;
      r.tr.classList.toggle("pinned", pinned);
      c.star.el.setAttribute("aria-pressed", String(pinned));
      c.star.el.title = pinned ? "unwatch" : "watch";
      this.setText(c.star, pinned ? "★" : "☆");
    }
    const row = this.client.rows.get(sym);
    const m = this.meta.get(sym);
    if (!row || !m || !hasData(row)) {
      for (const f of ["bid", "ask", "last", "change", "spread", "volume", "time"]) {
        this.setText(c[f], "–");
        this.setClass(c[f], "");
      }
      return;
    }
    const bid = row[F.BID];
    const ask = row[F.ASK];
    const last = row[F.LAST];
    const dp = (m.dp = Math.max(m.dp, decimals(bid), decimals(ask), decimals(last)));
    this.setText(c.bid, fmt(bid, dp));
    this.setText(c.ask, fmt(ask, dp));
    this.setText(c.last, fmt(last, dp));
    let flashUntil = 0;
    const names = ["bid", "ask", "last"];
    for (let i = 0; i < 3; i++) {
      const until = m.at[i] + FLASH_MS;
      let cls = "";
      if (until > now) {
        cls = m.dir[i] > 0 ? "up" : "dn";
        if (until > flashUntil) flashUntil = until;
      }
      this.setClass(c[names[i]], cls);
    }
    r.flashUntil = flashUntil;
    if (m.first != null && last != null) {
      const ch = last - m.first;
      const pct = m.first ? (ch / m.first) * 100 : 0;
      const sign = ch > 0 ? "+" : "";
      this.setText(c.change, `${sign}${fmt(ch, dp)} ${sign}${pct.toFixed(2)}%`);
      this.setClass(c.change, ch > 0 ? "pos" : ch < 0 ? "neg" : "");
    } else {
      this.setText(c.change, "–");
    }
    this.setText(c.spread, bid != null && ask != null ? fmt(ask - bid, dp) : "–");
    this.setText(c.volume, fmt(row[F.VOLUME], 0));
    this.setText(c.time, fmtTime(row[F.TS]));
  }

  // Adapt the number of rows written per frame to what the machine keeps up
  // with: a late frame shrinks the budget, on-time frames grow it back. Rows
  // left over stay dirty and go first next frame, so nothing is lost, only
  // delayed by a frame or two.
  adapt(ts) {
    const gap = ts - this.lastPaintTs;
    this.lastPaintTs = ts;
    if (!this.chained) return; // not asked for the very next frame: a gap says nothing
    const max = this.pool.length;
    if (gap > 25 && gap < 250) this.budget = Math.max(MIN_ROWS, Math.floor(this.budget * 0.6));
    else if (gap <= 20) this.budget = Math.min(max, this.budget + 2);
    if (this.budget > max) this.budget = max;
  }

  paint(ts) {
    this.raf = 0;
    const t0 = performance.now();
    const now = t0;
    this.adapt(ts);
    this.ensurePool();
    const view = this.view;
    if (this.layoutDirty) {
      this.layoutDirty = false;
      const total = view.length;
      const height = total * ROW_H;
      if (this.sizerHeight !== height) {
        this.sizerHeight = height;
        this.sizer.style.height = `${height}px`;
      }
      const top = this.viewport.scrollTop;
      const first = Math.max(0, Math.min(Math.floor(top / ROW_H) - OVERSCAN, total - this.pool.length));
      if (first !== this.first || this.translated === undefined) {
        this.first = Math.max(0, first);
        this.translated = this.first * ROW_H;
        this.table.style.transform = `translateY(${this.translated}px)`;
      }
      const isEmpty = total === 0 && this.all.length > 0;
      if (this.empty.hidden === isEmpty) this.empty.hidden = !isEmpty;
      for (let i = 0; i < this.pool.length; i++) {
        const sym = view[this.first + i];
        this.renderRow(this.pool[i], sym === undefined ? null : sym, now);
      }
      this.dirty.clear();
      // Pool rows actually on screen (the rest is overscan for fast scrolls).
      this.visLo = Math.max(0, Math.floor(top / ROW_H) - this.first);
      this.visHi = Math.min(this.pool.length, Math.ceil((top + this.viewport.clientHeight) / ROW_H) - this.first);
    } else {
      this.paintChanges(now);
    }
    for (const r of this.pool) {
      if (r.flashUntil) {
        this.schedule();
        break;
      }
    }
    const lad = this.ladder;
    if (lad.sym && (lad.dirty || (lad.nextOff && lad.nextOff <= now))) lad.paint(now);
    else if (lad.sym && lad.nextOff) this.schedule();
    if (this.barDirty) this.paintBar();
    this.chained = this.raf !== 0;
    const ms = performance.now() - t0;
    const s = this.stats;
    s.paints++;
    s.paintMs += ms;
    if (ms > s.maxPaintMs) s.maxPaintMs = ms;
  }

  // Visible rows whose data changed (pinned rows first), within the budget.
  paintChanges(now) {
    const dirty = this.dirty;
    const pool = this.pool;
    const lo = this.visLo;
    const hi = this.visHi;
    if (hi <= lo) return;
    let budget = this.budget;
    const pinnedEnd = Math.min(hi, lo + Math.max(0, this.pinnedCount - this.first - lo));
    const visit = (r) => {
      if (r.sym == null) return;
      if (dirty.has(r.sym) || (r.flashUntil && r.flashUntil <= now)) {
        this.renderRow(r, r.sym, now);
        dirty.delete(r.sym);
        budget--;
      }
    };
    for (let k = lo; k < pinnedEnd; k++) visit(pool[k]);
    // the rest round-robin, so a tight budget still reaches every row
    const m = hi - pinnedEnd;
    const start = m > 0 ? this.rr % m : 0;
    let i = 0;
    for (; i < m && budget > 0; i++) visit(pool[pinnedEnd + ((start + i) % m)]);
    this.rr = start + i;
    if (i === m) dirty.clear(); // every visible change is on screen; the rest is off screen
    else this.schedule();
  }

  paintBar() {
    this.barDirty = false;
    const b = this.bar;
    const put = (id, text) => {
      const el = $(id);
      if (el && text !== undefined && el.textContent !== text) el.textContent = text;
    };
    put("rate", b.rate);
    put("latency", b.latency);
    put("count", b.count);
    put("note", b.note);
    const st = $("status");
    if (b.state !== undefined && st.dataset.state !== b.state) {
      st.dataset.state = b.state;
      document.body.dataset.state = b.state;
    }
    put("status", b.stateText);
    const fd = $("feed");
    if (b.feed !== undefined && fd.dataset.feed !== b.feed) {
      fd.dataset.feed = b.feed;
      document.body.dataset.feed = b.feed;
    }
    const stale = String(Boolean(b.stale));
    if (fd.dataset.stale !== stale) {
      fd.dataset.stale = stale;
      document.body.dataset.stale = stale;
    }
    put("feed", b.feedText);
  }
}

// ---- the depth ladder ----------------------------------------------------------

// The book of one instrument, 10 levels a side as on an IDX broker screen:
// bids on the left (orders, volume, price), asks on the right. The cells are
// made once; a paint writes only cells whose text changed, flashes a level
// whose volume changed or that came into view, and scales each volume bar
// against the largest volume shown.
class Ladder {
  constructor(board) {
    this.board = board;
    this.sym = null;
    this.dirty = false;
    this.nextOff = 0;        // when the next flash goes off (0: none on): repainted then, not every frame
    this.el = $("ladder");
    this.symEl = $("ladder-sym");
    this.info = { el: $("ladder-info"), text: "", cls: "" };
    this.rows = [];
    this.stats = { paints: 0, cellWrites: 0 };
    const tbody = $("depth");
    for (let k = 0; k < DEPTH_ROWS; k++) {
      const tr = document.createElement("tr");
      tr.dataset.k = String(k);
      const cells = {};
      for (const f of DEPTH_COLS) {
        const td = document.createElement("td");
        td.dataset.f = f;
        let textEl = td;
        let bar = null;
        if (f.endsWith("_volume")) {
          bar = document.createElement("span");
          bar.className = "bar";
          textEl = document.createElement("span");
          textEl.className = "v";
          td.append(bar, textEl);
        }
        cells[f] = { el: textEl, td, bar, text: "", cls: "", scale: -1 };
        tr.appendChild(td);
      }
      tbody.appendChild(tr);
      // what each side of this row shows ([price, volume]), and its flash:
      // until when, which way, and whether the price itself is new
      this.rows.push({ tr, cells, shown: [null, null], until: [0, 0], dir: [0, 0], moved: [false, false] });
    }
  }

  /** Open the ladder on `sym` (its book is subscribed), or close it (null). */
  async open(sym) {
    const client = this.board.client;
    const prev = this.sym;
    if (prev === sym) return;
    this.sym = sym;
    this.dirty = true;
    for (const r of this.rows) {
      r.shown = [null, null];
      r.until = [0, 0];
    }
    this.el.hidden = sym == null;
    this.el.dataset.sym = sym || "";
    this.symEl.textContent = sym || "";
    this.symEl.dataset.delay = sym && this.board.delayed.has(sym) ? this.board.delayText : "";
    this.board.layoutDirty = true; // the selected row's marker
    this.board.schedule();
    try {
      if (prev) await client.unsubscribe([prev], [BOOK_CHANNEL]);
      if (sym) await client.subscribe([sym], [BOOK_CHANNEL]);
    } catch (err) {
      if (err.code !== "not_connected" && err.code !== "closed") this.board.setNote(`depth ${sym}: ${err.code}: ${err.message}`);
    }
  }

  changed(sym) {
    if (sym !== this.sym) return;
    this.dirty = true;
    this.board.schedule();
  }

  write(cell, text) {
    if (cell.text !== text) {
      cell.text = text;
      const node = cell.el.firstChild;
      if (node && node.nodeType === 3) node.data = text;
      else cell.el.textContent = text;
      this.stats.cellWrites++;
    }
  }

  cls(cell, cls) {
    if (cell.cls !== cls) {
      cell.cls = cls;
      cell.td.className = cls;
    }
  }

  paint(now) {
    this.dirty = false;
    this.stats.paints++;
    const book = this.board.client.books.get(this.sym);
    const bids = book ? book.bids : [];
    const asks = book ? book.asks : [];
    let max = 0;
    for (let k = 0; k < DEPTH_ROWS; k++) {
      if (k < bids.length && bids[k][1] > max) max = bids[k][1];
      if (k < asks.length && asks[k][1] > max) max = asks[k][1];
    }
    let dp = 0;
    for (const side of [bids, asks]) for (let k = 0; k < side.length && k < DEPTH_ROWS; k++) dp = Math.max(dp, decimals(side[k][0]));
    let nextOff = 0;
    for (let k = 0; k < DEPTH_ROWS; k++) {
      const r = this.rows[k];
      for (let s = 0; s < 2; s++) {
        const lv = (s === 0 ? bids : asks)[k];
        const pre = s === 0 ? "bid" : "ask";
        const c = r.cells;
        const shown = r.shown[s];
        if (lv) {
          // a new price in this row, or a new volume at the same price: flash
          if (shown && (shown[0] !== lv[0] || shown[1] !== lv[1])) {
            r.until[s] = now + FLASH_MS;
            r.moved[s] = shown[0] !== lv[0];
            r.dir[s] = r.moved[s] || lv[1] > shown[1] ? 1 : -1;
          }
          if (!shown || shown[0] !== lv[0] || shown[1] !== lv[1]) r.shown[s] = [lv[0], lv[1]];
          this.write(c[pre], fmt(lv[0], dp));
          this.write(c[`${pre}_volume`], fmt(lv[1], 0));
          this.write(c[`${pre}_orders`], lv[2] ? fmt(lv[2], 0) : "");
        } else {
          r.shown[s] = null;
          r.until[s] = 0;
          this.write(c[pre], "");
          this.write(c[`${pre}_volume`], "");
          this.write(c[`${pre}_orders`], "");
        }
        const vc = c[`${pre}_volume`];
        const scale = lv && max ? Math.round((lv[1] / max) * 1000) / 1000 : 0;
        if (vc.scale !== scale) {
          vc.scale = scale;
          vc.bar.style.transform = `scaleX(${scale})`;
        }
        const on = r.until[s] > now;
        const cls = on ? (r.dir[s] > 0 ? "up" : "dn") : "";
        this.cls(vc, cls);
        this.cls(c[pre], on && r.moved[s] ? cls : "");
        if (on && (!nextOff || r.until[s] < nextOff)) nextOff = r.until[s];
      }
    }
    this.nextOff = nextOff;
    if (nextOff) this.board.schedule();
    let info = "no book yet";
    if (book) {
      const spread = bids.length && asks.length ? ` · spread ${fmt(asks[0][0] - bids[0][0], dp)}` : "";
      info = book.stale ? `seq ${book.seq} · stale: waiting for a full book` : `seq ${book.seq}${spread}`;
    }
    this.write(this.info, info);
    const stale = String(Boolean(book && book.stale));
    if (this.el.dataset.stale !== stale) this.el.dataset.stale = stale;
  }
}

// ---- wiring ------------------------------------------------------------------

function median(a) {
  if (!a.length) return NaN;
  a.sort((x, y) => x - y);
  return a[a.length >> 1];
}

function start() {
  const url = defaultUrl(location);
  const client = new FastfeedClient(url, {
    token: params.get("token") || "",
    // A board left open all day should come back even after a policy close
    // (a laptop that slept past the stall limit), just not in a hurry.
    retryClientErrors: true,
    heartbeatMs: Number(params.get("heartbeat_ms")) || 5000,
  });
  const board = new Board(client);
  window.fastfeed = { client, board }; // for the console, tests and benches
  $("url").textContent = url.replace(/([?&]token=)[^&]+/, "$1…");

  const win = board.rateWindow;

  const updateStatus = () => {
    const st = client.state;
    board.setBar("state", st);
    let text = "connecting…";
    if (st === "open") text = "● live";
    else if (st === "reconnecting") {
      const s = Math.max(0, (client.reconnectAt - performance.now()) / 1000);
      text = s >= 0.95 ? `reconnecting in ${s.toFixed(0)} s` : "reconnecting…";
    } else if (st === "idle") text = "offline";
    board.setBar("stateText", text);
    board.setBar("feed", client.feed);
    board.setBar("stale", client.stale && st === "open");
    let feedText = client.feed === "up" ? "feed up" : client.feed === "down" ? "feed down" : "feed ?";
    if (client.stale && st === "open") {
      feedText = `stale ${((performance.now() - client.lastMessageAt) / 1000).toFixed(0)} s`;
    }
    board.setBar("feedText", feedText);
  };

  client.on("connecting", updateStatus);
  client.on("close", (e) => {
    updateStatus();
    if (e.code === 1008) board.setNote("closed by server (policy)");
    else if (e.code === 1013) board.setNote("gateway has no data yet, retrying");
    else if (e.code === 1012) board.setNote("server restarting, reconnecting");
  });
  client.on("stale", updateStatus);
  client.on("status", (m) => {
    updateStatus();
    if (m.delay_line === "filling") {
      board.setNote(`delayed data: this server holds ${m.past_s} of ${m.delay} s of past; ` +
        "symbols that traded since have no delayed price yet");
    } else if ("feed" in m || m.delay_line === "full") {
      board.setNote(m.feed === "down" ? "upstream feed down: prices may be stale" : "");
    }
  });
  // A delayed token: a badge in the bar, and per symbol when it mixes real time and delayed.
  let mixed = false;
  const showDelay = (delay, syms, rows) => {
    const text = delay % 60 === 0 ? `delayed ${delay / 60} min` : `delayed ${delay} s`;
    board.delayText = text;
    for (const s of syms) board.delayed.add(s);
    if (board.delayed.has(MARKET)) window.fastfeed.side?.setMarketDelay(text);
    mixed = mixed || rows.some((r) => !board.delayed.has(r[F.SYM]));
    const pill = $("delay");
    pill.hidden = board.delayed.size === 0;
    pill.textContent = mixed ? `${text} (some real time)` : text;
    document.body.dataset.delayMix = String(mixed);
    for (const r of board.pool) r.late = undefined; // repaint the markers
    board.layoutDirty = true;
    board.schedule();
  };
  client.on("open", async () => {
    updateStatus();
    board.setNote("");
    try {
      const symbols = await client.list();
      // the limit counts (symbol, channel) pairs: leave the ladder and the side panel theirs
      const max = client.opts.maxSubscriptions - LADDER_PAIRS - (window.fastfeed.side?.reserve || 0);
      const take = symbols.slice().sort().slice(0, max);
      board.setSymbols(take);
      if (symbols.length > max) {
        board.setNote(`showing ${max} of ${symbols.length} instruments (subscription limit)`);
      }
      // Starred symbols first, so they can be watched straight away.
      const wanted = board.watched.filter((s) => take.includes(s));
      const res = await client.subscribe([...wanted, ...take]);
      const pinned = wanted.filter((s) => client.subscribed.has(s) && !client.watched.has(s));
      if (pinned.length) await client.watch(pinned);
      if (res.errors.length) board.setNote(`subscribe: ${res.errors[0].code}: ${res.errors[0].message}`);
    } catch (err) {
      if (err.code !== "closed") board.setNote(`${err.code || "error"}: ${err.message}`);
    }
  });
  client.on("snapshot", (m) => {
    if (m.delay) showDelay(m.delay, m.delayed || [], m.rows);
    board.onRows(m.rows);
  });
  client.on("book", (e) => board.ladder.changed(e.sym));
  client.on("bookstatus", (e) => board.ladder.changed(e.sym));
  client.on("update", (m) => {
    const rows = m.rows;
    board.onRows(rows);
    win.rows += rows.length;
    win.msgs += 1;
    const nowMs = client.serverNowMs();
    if (m.t) win.lat.push(nowMs - m.t / 1e6);
    // Tick age on a sample of rows is enough for a median.
    for (let i = 0; i < rows.length && i < 8; i++) win.age.push(nowMs - rows[i][F.TS] / 1e6);
  });
  client.on("error", (m) => {
    // a refused market-wide tape is the side panel's to say (it falls back)
    if (m.symbols?.length === 1 && m.symbols[0] === MARKET) return;
    if (m.code && m.code !== "socket" && m.code !== "closed") board.setNote(`${m.code}: ${m.message || ""}`);
  });

  setInterval(() => {
    board.setBar("rate", `${win.rows.toLocaleString("en-US")}`);
    const lat = median(win.lat);
    const age = median(win.age);
    board.setBar(
      "latency",
      Number.isNaN(lat) ? "–" : `${lat.toFixed(1)} ms · age ${Number.isNaN(age) ? "–" : age.toFixed(1)} ms`,
    );
    win.rows = win.msgs = 0;
    win.lat = [];
    win.age = [];
    updateStatus();
  }, 1000);

  // -- controls ----------------------------------------------------------------
  const search = $("search");
  search.value = params.get("q") || "";
  board.filter = search.value.trim().toUpperCase();
  search.addEventListener("input", () => board.setFilter(search.value));
  document.addEventListener("keydown", (e) => {
    if (e.key === "/" && document.activeElement !== search) {
      e.preventDefault();
      search.focus();
      search.select();
    } else if (e.key === "Escape" && document.activeElement === search) {
      search.value = "";
      board.setFilter("");
    } else if (e.key === "Escape" && board.ladder.sym) {
      board.ladder.open(null);
    }
  });

  const frameSel = $("frame-ms");
  const fromUrl = params.get("frame_ms");
  if (fromUrl) {
    if (![...frameSel.options].some((o) => o.value === fromUrl)) frameSel.add(new Option(`${fromUrl} ms`, fromUrl));
    frameSel.value = fromUrl;
    client.frameMs = Number(fromUrl);
  }
  frameSel.addEventListener("change", () => {
    client.configure(Number(frameSel.value)).catch((err) => {
      if (err.code !== "not_connected") board.setNote(`configure: ${err.code}: ${err.message}`);
    });
  });

  board.tbody.addEventListener("click", (e) => {
    const btn = e.target.closest(".star");
    const sym = e.target.closest("tr")?.dataset.sym;
    if (!sym) return;
    if (btn) board.toggleWatch(sym);
    else {
      // the side panel follows the click; the ladder opens on it, or closes
      // when it was already open on it
      board.select(sym);
      board.ladder.open(board.ladder.sym === sym ? null : sym);
    }
  });
  $("ladder-close").addEventListener("click", () => board.ladder.open(null));

  const side = mountTradesPanel(client, params);
  if (side) {
    window.fastfeed.side = side;
    document.addEventListener("fastfeed:select", (e) => side.select(e.detail.sym, e.detail.delay));
    // nothing chosen (no ?sym=): the first instrument the board lists
    client.on("snapshot", () => {
      if (!board.selected && board.all.length) board.select(board.all[0]);
    });
  }

  board.viewport.addEventListener(
    "scroll",
    () => {
      board.layoutDirty = true;
      board.schedule();
    },
    { passive: true },
  );
  new ResizeObserver(() => {
    board.layoutDirty = true;
    board.schedule();
  }).observe(board.viewport);

  updateStatus();
  board.rebuildView();
  client.connect();
}

start();
