// The board's side panel: the running trade and a candlestick chart.
//
// The tape shows the selected symbol's trades or, when chosen (`?tape=market`
// or the selector), the market-wide ones (the `trades` channel's "*",
// subscribed only while shown; a gateway or token that refuses it sends the
// panel back to the symbol's), newest on top, green for buyer-aggressed prints and red
// for seller-aggressed ones, sizes in IDX lots. The chart draws the selected
// symbol's bars (`bars:<interval>`, interval chosen in the panel) on a
// canvas, the forming bar included and redrawn as it changes.
//
// As on the board, messages only mark things dirty; the DOM and the canvas
// are written in one requestAnimationFrame callback, the tape's rows only
// where their text changed. `?side=off` leaves the panel out.

import { B, INTERVAL_MS, INTERVALS, MARKET, T } from "./fastfeed.js";

const TAPE_ROW_H = 20;   // px, matches .tape-row in trades-panel.css
const CANDLE_W = 7;      // px per bar, gap included
const LOT = 100;         // shares per IDX lot

const pad2 = (n) => (n < 10 ? "0" : "") + n;
const tzOffsetMs = new Date().getTimezoneOffset() * 60000;
function hms(tsNs) {
  const ms = Math.floor(tsNs / 1e6) - tzOffsetMs;
  const d = ((ms % 86400000) + 86400000) % 86400000;
  return `${pad2(Math.floor(d / 3600000))}:${pad2(Math.floor(d / 60000) % 60)}:${pad2(Math.floor(d / 1000) % 60)}`;
}
const nf = new Intl.NumberFormat("en-US", { maximumFractionDigits: 4 });
const fmt = (v) => nf.format(v);

function el(tag, attrs = {}, text = "") {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text) e.textContent = text;
  return e;
}

export class TradesPanel {
  constructor(client, root, { sym = null, interval = "1m", scope = "symbol" } = {}) {
    this.client = client;
    this.sym = sym;               // the selected symbol (chart, and the tape's "selected" scope)
    this.interval = interval;
    this.scope = scope;           // "market" | "symbol"
    this.tapeDirty = true;
    this.chartDirty = true;
    this.raf = 0;
    this.rows = [];               // pooled tape rows: {el, cells, key}
    this.drawn = null;            // what the chart last drew (for tests and benches)
    // Whether the gateway serves the version 1.1 channels: learnt from the
    // first snapshot that answers with a "trades" or "bars" section. Until
    // then nothing is sent that a version 1 gateway would take for a quote
    // request (an unsubscribe) or refuse (the symbol "*").
    this.channels = false;
    // Whether the gateway serves the market-wide tape ("*" on trades): a
    // refusal (an older gateway, or a token that does not see every symbol)
    // leaves the selected symbol's tape, and "*" is not asked for again.
    this.marketServed = true;
    // "delayed 15 min" when this token gets the market-wide tape delayed (the
    // tape mixes every symbol: delayed whole unless the token's rt is "*")
    this.marketDelay = "";
    // (symbol, channel) pairs it may hold (the market tape, the selected
    // symbol's trades and bars), left free by the grid under the limit
    this.reserve = 4;
    this.stats = { paints: 0, paintMs: 0, maxPaintMs: 0, tapeWrites: 0 };
    this.paint = this.paint.bind(this);
    this.build(root);

    client.on("trades", ({ sym }) => {
      if (sym === this.tapeKey()) this.dirty("tape");
    });
    client.on("lost", ({ sym }) => {
      if (sym === this.tapeKey()) this.dirty("tape");
    });
    client.on("bars", ({ sym, interval: iv }) => {
      if (sym === this.sym && iv === this.interval) this.dirty("chart");
    });
    client.on("open", () => this.subscribeAll());
    client.on("snapshot", (m) => {
      if (this.channels || !("trades" in m || "bars" in m)) return;
      this.channels = true;
      if (this.scope === "market") this.subscribeMarket();
    });
    // Sizes come from the observer, never read in a paint: a read after the
    // grid's writes in the same frame would force a layout of the page.
    this.tapeH = 0;
    this.chartW = 0;
    this.chartH = 0;
    const ro = new ResizeObserver((entries) => {
      for (const e of entries) {
        const box = e.contentRect;
        if (e.target === this.tapeEl) this.tapeH = box.height;
        else if (e.target === this.canvas) {
          this.chartW = box.width;
          this.chartH = box.height;
        }
      }
      this.tapeDirty = this.chartDirty = true;
      this.schedule();
    });
    ro.observe(this.tapeEl);
    ro.observe(this.canvas);
  }

  // -- structure ------------------------------------------------------------

  build(root) {
    const tape = el("section", { class: "tape-panel" });
    const th = el("header");
    this.titleEl = el("b", { id: "tape-title", "data-testid": "tape-title" }, "Running trade");
    th.append(this.titleEl);
    this.scopeSel = el("select", { id: "tape-scope", "data-testid": "tape-scope", "aria-label": "tape" });
    this.scopeSel.append(new Option("selected", "symbol"), new Option("market", "market"));
    this.scopeSel.value = this.scope;
    this.scopeSel.addEventListener("change", () => this.setScope(this.scopeSel.value));
    this.lostEl = el("span", { class: "lost", "data-testid": "tape-lost" });
    th.append(this.scopeSel, this.lostEl);
    const head = el("div", { class: "tape-row tape-head" });
    for (const c of ["time", "sym", "price", "lot"]) head.append(el("span", { class: `c-${c}` }, c));
    this.tapeEl = el("div", { id: "tape", "data-testid": "tape" });
    tape.append(th, head, this.tapeEl);

    const chart = el("section", { class: "chart-panel" });
    const ch = el("header");
    this.symEl = el("b", { id: "chart-sym", "data-testid": "chart-sym" }, "–");
    this.ivSel = el("select", { id: "chart-interval", "data-testid": "chart-interval", "aria-label": "bar interval" });
    for (const iv of INTERVALS) this.ivSel.append(new Option(iv, iv));
    this.ivSel.value = this.interval;
    this.ivSel.addEventListener("change", () => this.setInterval(this.ivSel.value));
    this.ohlcEl = el("span", { class: "ohlc", "data-testid": "chart-ohlc" });
    ch.append(this.symEl, this.ivSel, this.ohlcEl);
    this.canvas = el("canvas", { id: "chart", "data-testid": "chart" });
    chart.append(ch, this.canvas);
    root.append(tape, chart);
  }

  tapeKey() {
    return this.scope === "market" && this.marketServed ? MARKET : this.sym;
  }

  /** `delay` ("delayed 15 min", or "") marks the market-wide tape as served delayed. */
  setMarketDelay(delay) {
    this.marketDelay = delay;
    this.markDelay();
  }

  // the tape's title carries the delay of what it shows (shown where a token mixes)
  markDelay() {
    this.titleEl.dataset.delay = this.tapeKey() === MARKET ? this.marketDelay : this.symEl.dataset.delay || "";
  }

  // -- subscriptions --------------------------------------------------------

  subscribeAll() {
    const c = this.client;
    const jobs = [];
    if (this.channels && this.scope === "market") jobs.push(this.subscribeMarket());
    if (this.sym) {
      jobs.push(c.subscribe([this.sym], ["trades", `bars:${this.interval}`]).then((r) => this.refused(r)));
    }
    return Promise.all(jobs).catch(() => {});
  }

  // The market-wide tape; refused (the client then forgets it), the panel
  // shows the selected symbol's tape instead and says why.
  async subscribeMarket() {
    if (!this.marketServed) return;
    const res = await this.client.subscribe([MARKET], ["trades"]).catch(() => null);
    if (!res || !(res.errors.length || res.forbidden.length || res.unknown.length)) return;
    if (res.errors.some((e) => e.code === "closed" || e.code === "not_connected")) return;
    this.marketServed = false;
    const opt = this.scopeSel.querySelector('option[value="market"]');
    if (opt) {
      opt.disabled = true;
      opt.textContent = "market (not served)";
    }
    if (this.scope === "market") this.setScope("symbol");
  }

  /** Show `sym`; `delay` ("delayed 15 min", or "") marks a symbol this token sees delayed. */
  async select(sym, delay = "") {
    if (!sym || sym === this.sym) return;
    const old = this.sym;
    this.sym = sym;
    this.symEl.textContent = sym;
    this.symEl.dataset.delay = delay;
    this.markDelay();
    this.tapeDirty = this.chartDirty = true;
    this.schedule();
    const c = this.client;
    if (old && this.channels) c.unsubscribe([old], ["trades", `bars:${this.interval}`]).catch(() => {});
    this.refused(await c.subscribe([sym], ["trades", `bars:${this.interval}`]).catch(() => null));
  }

  // A gateway that does not serve these channels says "unknown channel": the
  // client has forgotten the channels of a request refused whole (no request
  // again on every reconnect); say so once.
  refused(res) {
    const err = res?.errors?.find((e) => /unknown channel/.test(e.message || ""));
    if (!err) return;
    this.unsupported = true;
    this.symEl.textContent = "this gateway serves no trades or bars";
  }

  async setInterval(iv) {
    if (iv === this.interval) return;
    const old = this.interval;
    this.interval = iv;
    this.ivSel.value = iv;
    this.dirty("chart");
    if (!this.sym) return;
    const c = this.client;
    if (this.channels) c.unsubscribe([this.sym], [`bars:${old}`]).catch(() => {});
    await c.subscribe([this.sym], [`bars:${iv}`]).catch(() => {});
  }

  setScope(scope) {
    if (scope === "market" && !this.marketServed) scope = "symbol";
    this.scope = scope;
    this.scopeSel.value = scope;
    this.markDelay();
    if (scope === "market" && this.channels) this.subscribeMarket();
    // the market's tape is the busiest stream there is: not kept when not shown
    else if (scope !== "market" && this.client.wanted.has(MARKET)) {
      this.client.unsubscribe([MARKET], ["trades"]).catch(() => {});
    }
    this.dirty("tape");
  }

  // -- painting -------------------------------------------------------------

  dirty(what) {
    if (what === "tape") this.tapeDirty = true;
    else this.chartDirty = true;
    this.schedule();
  }

  schedule() {
    if (!this.raf) this.raf = requestAnimationFrame(this.paint);
  }

  paint() {
    this.raf = 0;
    const t0 = performance.now();
    if (this.tapeDirty) {
      this.tapeDirty = false;
      this.paintTape();
    }
    if (this.chartDirty) {
      this.chartDirty = false;
      this.paintChart();
    }
    const ms = performance.now() - t0;
    const s = this.stats;
    s.paints++;
    s.paintMs += ms;
    if (ms > s.maxPaintMs) s.maxPaintMs = ms;
  }

  ensureRows() {
    const want = Math.max(1, Math.floor((this.tapeH || 400) / TAPE_ROW_H));
    while (this.rows.length < want) {
      const row = el("div", { class: "tape-row" });
      const cells = {};
      for (const c of ["time", "sym", "price", "lot"]) {
        const span = el("span", { class: `c-${c}` });
        span.append(document.createTextNode(""));
        row.append(span);
        cells[c] = span.firstChild;
      }
      row.hidden = true;
      this.tapeEl.append(row);
      this.rows.push({ el: row, cells, key: "" });
    }
    while (this.rows.length > want) this.rows.pop().el.remove();
  }

  paintTape() {
    this.ensureRows();
    const key = this.tapeKey();
    const tape = (key && this.client.trades.get(key)) || [];
    const market = key === MARKET;
    const lost = (key && this.client.tradesLost.get(key)) || 0;
    const lostText = lost ? `${lost.toLocaleString("en-US")} lost` : "";
    if (this.lostEl.textContent !== lostText) this.lostEl.textContent = lostText;
    const rows = this.rows;
    for (let i = 0; i < rows.length; i++) {
      const r = rows[i];
      const t = tape[tape.length - 1 - i];
      if (!t) {
        if (!r.el.hidden) {
          r.el.hidden = true;
          r.key = "";
        }
        continue;
      }
      // market trades carry their symbol in front
      const sym = market ? t[0] : key;
      const o = market ? 1 : 0;
      const k = `${sym} ${t[o + T.TSEQ]}`;
      if (r.key === k) continue;
      r.key = k;
      r.el.hidden = false;
      const side = t[o + T.SIDE];
      r.el.dataset.sym = sym;
      r.el.dataset.tseq = t[o + T.TSEQ];
      r.el.dataset.side = side;
      r.el.className = side === "b" ? "tape-row buy" : side === "s" ? "tape-row sell" : "tape-row";
      r.cells.time.data = hms(t[o + T.TS]);
      r.cells.sym.data = sym;
      r.cells.price.data = fmt(t[o + T.PRICE]);
      r.cells.lot.data = fmt(t[o + T.SIZE] / LOT);
      this.stats.tapeWrites++;
    }
  }

  paintChart() {
    const cv = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.floor(this.chartW * dpr));
    const h = Math.max(1, Math.floor(this.chartH * dpr));
    if (cv.width !== w || cv.height !== h) {
      cv.width = w;
      cv.height = h;
    }
    const g = cv.getContext("2d");
    g.clearRect(0, 0, w, h);
    const all = this.sym ? this.client.getBars(this.sym, this.interval) : [];
    const axisW = Math.round(56 * dpr);
    const cw = CANDLE_W * dpr;
    const fit = Math.max(1, Math.floor((w - axisW) / cw));
    const bars = all.slice(-fit);
    this.drawn = { sym: this.sym, interval: this.interval, bars, candles: [], dpr };
    if (!bars.length) {
      if (this.ohlcEl.textContent) this.ohlcEl.textContent = "";
      g.fillStyle = "#7d8590";
      g.font = `${12 * dpr}px system-ui, sans-serif`;
      g.fillText(this.sym ? "no trades yet" : "select a symbol", 8 * dpr, 20 * dpr);
      return;
    }
    let lo = Infinity;
    let hi = -Infinity;
    for (const b of bars) {
      if (b[B.LOW] < lo) lo = b[B.LOW];
      if (b[B.HIGH] > hi) hi = b[B.HIGH];
    }
    if (hi === lo) {
      hi += 1;
      lo -= 1;
    }
    const top = 8 * dpr;
    const bottom = h - 18 * dpr;
    const y = (p) => top + ((hi - p) / (hi - lo)) * (bottom - top);
    // price axis: high, low, last close
    g.fillStyle = "#7d8590";
    g.font = `${10 * dpr}px system-ui, sans-serif`;
    g.textAlign = "left";
    const axisX = w - axisW + 4 * dpr;
    g.fillText(fmt(hi), axisX, y(hi) + 4 * dpr);
    g.fillText(fmt(lo), axisX, y(lo));
    g.fillText(hms(bars[0][B.START]), 2 * dpr, h - 4 * dpr);
    const last = bars[bars.length - 1];
    const ivMs = INTERVAL_MS[this.interval];
    const forming = last[B.START] / 1e6 + ivMs > this.client.serverNowMs();
    for (let i = 0; i < bars.length; i++) {
      const b = bars[i];
      const x = Math.round(i * cw + cw / 2);
      const up = b[B.CLOSE] >= b[B.OPEN];
      const color = up ? "#3fb950" : "#f85149";
      g.strokeStyle = color;
      g.fillStyle = color;
      g.lineWidth = Math.max(1, Math.round(dpr));
      g.beginPath();
      g.moveTo(x + 0.5, Math.round(y(b[B.HIGH])));
      g.lineTo(x + 0.5, Math.round(y(b[B.LOW])));
      g.stroke();
      const yo = y(b[B.OPEN]);
      const yc = y(b[B.CLOSE]);
      const bodyTop = Math.round(Math.min(yo, yc));
      const bodyH = Math.max(Math.round(dpr), Math.round(Math.abs(yc - yo)));
      const bw = Math.max(1, Math.round(cw - 2 * dpr));
      const bx = Math.round(x - bw / 2);
      if (i === bars.length - 1 && forming) {
        g.globalAlpha = 0.6; // the live bar: still forming
        g.fillRect(bx, bodyTop, bw, bodyH);
        g.globalAlpha = 1;
        g.strokeRect(bx + 0.5, bodyTop + 0.5, bw - 1, Math.max(1, bodyH - 1));
      } else {
        g.fillRect(bx, bodyTop, bw, bodyH);
      }
      this.drawn.candles.push({ x, bodyTop, bodyH, bx, bw, up });
    }
    // the last close, as a line across
    g.strokeStyle = "rgba(201, 209, 217, 0.35)";
    g.setLineDash([3 * dpr, 3 * dpr]);
    g.beginPath();
    g.moveTo(0, Math.round(y(last[B.CLOSE])) + 0.5);
    g.lineTo(w - axisW, Math.round(y(last[B.CLOSE])) + 0.5);
    g.stroke();
    g.setLineDash([]);
    g.fillStyle = "#c9d1d9";
    g.fillText(fmt(last[B.CLOSE]), axisX, y(last[B.CLOSE]) + 4 * dpr);
    this.drawn.forming = forming;
    const text = `O ${fmt(last[B.OPEN])} H ${fmt(last[B.HIGH])} L ${fmt(last[B.LOW])} C ${fmt(last[B.CLOSE])} V ${fmt(last[B.VOLUME] / LOT)}`;
    if (this.ohlcEl.textContent !== text) this.ohlcEl.textContent = text;
  }
}

/** Mount the panel beside the board (unless ?side=off); returns it, or null. */
export function mountTradesPanel(client, params) {
  if (params.get("side") === "off") return null;
  const css = el("link", { rel: "stylesheet", href: "trades-panel.css" });
  document.head.append(css);
  const aside = el("aside", { id: "side", "data-testid": "side" });
  document.body.append(aside);
  document.body.classList.add("has-side");
  // below the header bar, whatever its height (it wraps on narrow screens)
  const bar = document.getElementById("bar");
  const place = () => {
    document.body.style.setProperty("--side-top", `${bar ? bar.getBoundingClientRect().bottom : 0}px`);
  };
  place();
  if (bar) new ResizeObserver(place).observe(bar);
  const iv = params.get("interval");
  const panel = new TradesPanel(client, aside, {
    sym: params.get("sym") || null,
    interval: INTERVALS.includes(iv) ? iv : "1m",
    scope: params.get("tape") === "market" ? "market" : "symbol",
  });
  if (panel.sym) panel.symEl.textContent = panel.sym;
  return panel;
}
