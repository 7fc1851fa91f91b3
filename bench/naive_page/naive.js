// The baseline the frame-budget bench compares the board against: the page
// most people write first. Every row of every message is written to the DOM
// the moment the message arrives; all instruments are real table rows.
const params = new URLSearchParams(location.search);
const ws = new WebSocket(params.get("ws"), ["fastfeed.v1.json"]);
const tbody = document.getElementById("rows");
const rows = new Map(); // sym -> {tr, first, last}
const stats = { messages: 0, rows: 0 };
window.naive = { rows, stats };

function fmt(v) {
  return v == null ? "–" : v.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
}

function render(r) {
  const [sym, , ts, bid, ask, last, , , , volume] = r;
  let e = rows.get(sym);
  if (!e) {
    const tr = document.createElement("tr");
    tr.innerHTML = "<td></td><td></td><td></td><td></td><td></td><td></td><td></td><td></td>";
    tbody.appendChild(tr);
    e = { tr, first: last, last };
    rows.set(sym, e);
  }
  const c = e.tr.children;
  c[0].textContent = sym;
  c[1].textContent = fmt(bid);
  c[2].textContent = fmt(ask);
  c[3].textContent = fmt(last);
  c[3].className = last > e.last ? "up" : last < e.last ? "dn" : "";
  c[4].textContent = fmt(last - e.first);
  c[5].textContent = fmt(ask - bid);
  c[6].textContent = volume.toLocaleString("en-US");
  c[7].textContent = new Date(ts / 1e6).toLocaleTimeString();
  e.last = last;
}

ws.onopen = () => ws.send(JSON.stringify({ op: "list", id: "list" }));
ws.onmessage = (ev) => {
  const m = JSON.parse(ev.data);
  stats.messages++;
  if (m.type === "list") {
    const syms = m.symbols.slice().sort().slice(0, 5000);
    for (let i = 0; i < syms.length; i += 500) {
      ws.send(JSON.stringify({ op: "subscribe", symbols: syms.slice(i, i + 500) }));
    }
  } else if (m.type === "snapshot" || m.type === "update") {
    for (const r of m.rows) render(r);
    stats.rows += m.rows.length;
  }
};
