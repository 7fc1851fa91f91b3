"""Results of a bench run: results.json, results.md and PNG plots."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from bench import hist


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {}
    for name, cmd in (("node", ["node", "--version"]),
                      ("bun", [str(Path(__file__).parent / "node_modules/.bin/bun"), "--version"])):
        try:
            versions[name] = subprocess.run(cmd, capture_output=True, text=True,
                                            timeout=10).stdout.strip()
        except OSError:
            versions[name] = None
    for mod in ("websockets", "picows", "uvloop", "fastfeed"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = None
    return {"cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "versions": versions}


def strip(obj: Any) -> Any:
    """Results without histograms (for the console)."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in ("hist", "whist")}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def pct(v: Any) -> str:
    return "-" if v is None else f"{v:.1%}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _ratio(a: Any, b: Any) -> str:
    try:
        return f"{a / b:.2f}x" if a and b else "-"
    except TypeError:
        return "-"


def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# bench results ({res['mode']}, {res['started']})", "",
             f"Machine: {m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}, Python {m['python']}; "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".",
             f"Command: `{res['command']}`. Server pinned to CPU {res['pins']['server']}, "
             f"load client and publisher to CPU {res['pins']['load']}. "
             f"Figures are medians of {res['repeats']} run(s); latency is tick source time → "
             "client receive time; server CPU is in cores (1.0 = one core busy); \"its core busy\" "
             "is the server's pinned CPU busy with anything (server, other processes, "
             "interrupts): near 1.0 with a lower server CPU means the server shared its core.",
             ""]
    for name, why in res.get("skipped", {}).items():
        lines.append(f"- {name} skipped: {why}")
    sc = res["scenarios"]
    ref = "fastfeed"

    def rowsof(name: str) -> list[tuple[str, dict]]:
        return [(s, r) for s, r in sc.get(name, {}).items()]

    def per_frame(r: dict) -> str:
        u, k = r.get("server_user_us_per_frame"), r.get("server_kernel_us_per_frame")
        return "-" if u is None or k is None else f"{u:.2g} + {k:.2g}"

    def problem(r: dict) -> str | None:
        return r.get("skipped") or r.get("error")

    if "capacity" in sc:
        p = res["params"]["capacity"]
        lines += ["", f"## Capacity ({p['rate']:,} ticks/s, 50 of 500 instruments per client, "
                  f"pass: p99 ≤ {p['p99_ms']} ms and every client converged)", ""]
        rows = []
        for s, r in rowsof("capacity"):
            if problem(r):
                rows.append([s, problem(r)] + [""] * 8)
                continue
            best = next((c for c in r.get("curve", []) if c["clients"] == r["capacity"]), {})
            rows.append([s, f(r["capacity"]), f(r.get("first_fail")), f(best.get("p99_ms")),
                         f"{f(best.get('server_cpu'))} / {f(best.get('server_core_busy'))}",
                         f(best.get("updates_per_s")),
                         f(best.get("frames_per_s")), per_frame(best),
                         f(best.get("load_cpu_max")),
                         _ratio(sc["capacity"].get(ref, {}).get("capacity"), r["capacity"])])
        lines.append(_table(["server", "clients (largest passing)", "first failing",
                             "p99 ms at best", "server CPU / its core busy", "updates/s",
                             "frames/s", "server µs/frame user + kernel",
                             "load client CPU (max proc)", "fastfeed ÷ this"], rows))
    for name, title in (("throughput", "Throughput"), ("watched", "Watched latency")):
        if name not in sc:
            continue
        p = res["params"][name]
        extra = ""
        if name == "watched":
            extra = f", {p['watch_clients']} clients watching {p['watch']}"
        lines += ["", f"## {title} ({p['clients']:,} clients x 50 instruments, "
                  f"{p['rate']:,} ticks/s{extra})", ""]
        rows = []
        for s, r in rowsof(name):
            if problem(r):
                rows.append([s, problem(r)] + [""] * 13)
                continue
            watched = "/".join(f(r[k]) for k in ("watched_p50_ms", "watched_p99_ms",
                                                   "watched_p999_ms"))
            per_update = (r["bytes_per_s"] / r["updates_per_s"]
                          if r.get("bytes_per_s") and r["updates_per_s"] else None)
            rows.append([s, f(r["updates_per_s"]), f(r["frames_per_s"]), f(r["rows_per_frame"]),
                         f(per_update), f(r["p50_ms"]), f(r["p99_ms"]), f(r["p999_ms"]), watched,
                         f"{f(r['server_cpu'])} / {f(r.get('server_core_busy'))}",
                         per_frame(r), f(r["server_rss_mb"]), pct(r["converged_share"]),
                         f(r["load_cpu_max"])])
        lines.append(_table(["server", "updates/s", "frames/s", "rows/frame",
                             "bytes/update", "p50 ms", "p99 ms",
                             "p99.9 ms", "watched p50/p99/p99.9 ms", "server CPU / its core busy",
                             "server µs/frame user + kernel", "RSS MB",
                             "converged", "load client CPU"], rows))
    if "ingest" in sc:
        p = res["params"]["ingest"]
        lines += ["", f"## Ingest ({p['ticks']:,} ticks in JSON arrays of {p['batch']:,}, "
                  "one publisher connection)", ""]
        rows = []
        for s, r in rowsof("ingest"):
            if problem(r):
                rows.append([s, problem(r), "", "", "", ""])
                continue
            rows.append([s, f(r["json_ticks_per_s"]), f(r["json_server_cpu"]),
                         f(r["binary_ticks_per_s"]), f(r["redis_ticks_per_s"]),
                         f(r.get("cluster_ticks_per_s"))])
        lines.append(_table(["server", "JSON ticks/s applied", "server CPU", "binary ticks/s",
                             "via Redis ticks/s", "via 3-master Redis Cluster ticks/s"], rows))
    if "spike" in sc:
        p = res["params"]["spike"]
        lines += ["", f"## Spike ({p['clients']:,} clients, base {p['rate']:,} ticks/s, "
                  f"{p['secs']} s phases; p50 / p99 ms, server CPU)", ""]
        rows, head = [], None
        for s, r in rowsof("spike"):
            if problem(r):
                rows.append([s, problem(r)])
                continue
            names = list(r["phases"])
            head = head or ["server", *names, "converged"]
            cells = []
            for n in names:
                ph = r["phases"][n]
                cells.append(f"{f(ph['p50_ms'])} / {f(ph['p99_ms'])} ({f(ph['server_cpu'], 2)})")
            rows.append([s, *cells, pct(r["converged_share"])])
        lines.append(_table(head or ["server", "result"], rows))
    if "idle" in sc:
        lines += ["", f"## Idle connections ({res['params']['idle']['connections']:,})", ""]
        rows = []
        for s, r in rowsof("idle"):
            if problem(r):
                rows.append([s, problem(r), "", ""])
                continue
            b = r["bytes_per_conn"]
            rows.append([s, f(r["connected"]), f(b / 1024 if b is not None else None),
                         f(r["rss_after_mb"])])
        lines.append(_table(["server", "connected", "KiB per connection", "RSS MB"], rows))
    if "workers" in sc:
        lines += ["", "## Workers (throughput load per worker, through Redis)", ""]
        rows = []
        for s, r in rowsof("workers"):
            if problem(r):
                rows.append([s, problem(r), "", "", "", "", "", ""])
                continue
            for run in r["runs"]:
                lay = run["layout"]
                where = ("shared" if lay == "shared" else
                         f"workers {lay['server']}, load {lay['load']}, Redis {lay['redis']}")
                rows.append([s, run["bus"], f(run["workers"]), f(run["clients"]),
                             f(run["updates_per_s"]), f(run["speedup"]), f(run["p99_ms"]),
                             where])
        lines.append(_table(["server", "bus", "workers", "clients", "updates/s",
                             "vs 1 worker", "p99 ms", "cores"], rows))

    def per_change(r: dict) -> float | None:
        # server CPU per change delivered: the work done, less exposed to a
        # shared core than latency is
        cpu, n = r.get("server_cpu"), r.get("changes_per_s")
        return cpu / n * 1e6 if cpu and n else None

    if "book" in sc:
        p = res["params"]["book"]
        lines += ["", f"## Order books ({p['clients']:,} clients x {p['books']} of "
                  f"{p['instruments']} books, {p['rate']:,} level changes/s skewed to the top; "
                  "latency is change send time → client receive time of the entry or message "
                  "holding it; converged: every book's seq and checksum equal the source's)", ""]
        rows = []
        for s, r in rowsof("book"):
            if problem(r):
                rows.append([s, problem(r)] + [""] * 12)
                continue
            base = sc["book"].get(ref, {})
            # entries older than the send-time ring are not timed: then the
            # p99 is a lower bound
            low = "≥ " if r.get("untimed") else ""
            rows.append([s, f(r["changes_per_s"]), f(r["frames_per_s"]), f(r["levels_per_s"]),
                         f(r["bytes_per_s"] / 1e6), f(r["p50_ms"]),
                         low + f(r["p99_ms"]),
                         f"{f(r['converged'])} / {f(r['clients'])}",
                         f"{f(r['server_cpu'])} / {f(r.get('server_core_busy'))}",
                         f(per_change(r)), f(r["load_cpu_max"]),
                         low + _ratio(r["p99_ms"], base.get("p99_ms")),
                         _ratio(r["server_cpu"], base.get("server_cpu"))])
        lines.append(_table(["server", "changes/s delivered", "messages/s", "levels/s sent",
                             "MB/s", "p50 ms", "p99 ms", "converged clients",
                             "server CPU / its core busy", "server µs per change",
                             "load client CPU",
                             "p99: this ÷ fastfeed", "server CPU: this ÷ fastfeed"], rows))
    if "trades" in sc:
        p = res["params"]["trades"]
        lines += ["", f"## Trades ({p['clients']:,} clients x {p['subs']} of "
                  f"{p['instruments']} instruments' trades, rates {p['rates']} trades/s, "
                  "up to the first with loss; latency is trade send time → client receive "
                  "time; complete: every tseq sequence without a gap and at the source's "
                  "last tseq; lost: trades missing in gaps)", ""]
        rows = []
        for s, r in rowsof("trades"):
            if problem(r):
                rows.append([s, problem(r)] + [""] * 12)
                continue
            base_l = sc["trades"].get(ref, {}).get("ladder", {})
            for rate, x in r.get("ladder", {}).items():
                base = base_l.get(rate, {})
                rows.append([s, f(int(rate)), f(x["trades_per_s"]), f(x["frames_per_s"]),
                             f(x["p50_ms"]), f(x["p99_ms"]),
                             f"{f(x['complete'])} / {f(x['clients'])}",
                             f"{f(x['lost'])} ({f(x['gw_lost'])})", f(x["behind_trades"]),
                             f"{f(x['server_cpu'])} / {f(x.get('server_core_busy'))}",
                             f(x["server_us_per_trade"]),
                             f(x["load_cpu_max"]) + (" (the limit)" if x.get("loader_bound")
                                                     else ""),
                             _ratio(x["trades_per_s"], base.get("trades_per_s")),
                             _ratio(x["p99_ms"], base.get("p99_ms"))])
        lines.append(_table(["server", "trades/s sent", "trades/s delivered", "messages/s",
                             "p50 ms", "p99 ms", "complete clients",
                             "lost (gateway-reported)", "not received by the end",
                             "server CPU / its core busy", "server µs per trade delivered",
                             "load client CPU", "delivered: this ÷ fastfeed",
                             "p99: this ÷ fastfeed"], rows))
        last = f"none up to {p['rates'][-1]:,}/s"
        firsts = [f"{s}: {f(r.get('first_loss_rate')) if r.get('first_loss_rate') else last}"
                  for s, r in rowsof("trades") if not problem(r)]
        lines += ["", "First rate with loss: " + ", ".join(firsts)]
    lines.append("")
    return "\n".join(lines)


def plots(res: dict[str, Any], out: Path) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    sc = res["scenarios"]
    if sc.get("capacity"):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for s, r in sc["capacity"].items():
            curve = r.get("curve") or []
            if not curve:
                continue
            xs = [c["clients"] for c in curve]
            ys = [c["p99_ms"] or float("nan") for c in curve]
            ax.plot(xs, ys, marker="o", label=f"{s} (capacity {r['capacity']:,})")
            bad = [(c["clients"], c["p99_ms"]) for c in curve if not c["pass"] and c["p99_ms"]]
            if bad:
                ax.scatter(*zip(*bad, strict=True), marker="x", color="black", zorder=5)
        lim = res["params"]["capacity"]["p99_ms"]
        ax.axhline(lim, color="grey", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients (50 of 500 instruments each)")
        ax.set_ylabel("p99 tick→client latency, ms")
        ax.set_title(f"Capacity at {res['params']['capacity']['rate']:,} ticks/s, one core "
                     "(x: failed)")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "capacity.png", dpi=110)
        plt.close(fig)
        made.append("capacity.png")
    panels = []
    for name, key, title in (("throughput", "hist", "throughput"),
                             ("watched", "whist", "watched updates"),
                             ("capacity", "hist", "capacity, at each server's largest pass")):
        data = {s: r.get(key) for s, r in sc.get(name, {}).items() if r.get(key)}
        if data:
            panels.append((title, data))
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
        for ax, (title, data) in zip(axes[0], panels, strict=True):
            for s, h in data.items():
                h = {int(k): v for k, v in h.items()}
                xs, ys = hist.cdf(h)
                ax.step(xs, ys, where="post", label=s)
            ax.set_xscale("log")
            ax.set_xlabel("tick→client latency, ms")
            ax.set_ylabel("share of updates")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "latency_cdf.png", dpi=110)
        plt.close(fig)
        made.append("latency_cdf.png")
    return made


def write(res: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    made = plots(res, out)
    md = markdown(res) + "".join(f"\n![{p}]({p})\n" for p in made)
    (out / "results.md").write_text(md)
