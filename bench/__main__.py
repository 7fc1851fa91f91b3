"""fastfeed against the gateways desks use today, in one run.

    python -m bench                          every scenario, every server
    python -m bench --quick                  CI smoke (< 2 min), fastfeed only by default
    python -m bench --scenarios capacity,throughput --servers bun,node_ws --repeats 3

Prints a markdown table (or JSON with --json) and writes results.json,
results.md and PNG plots to --out (default bench/results/<stamp>/).
See bench/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.runner import (
    ALL_SERVERS,
    BENCH,
    Load,
    Pins,
    RedisCluster,
    RedisServer,
    Skip,
    idle_run,
    ingest_run,
    load_run,
    log,
    server_command,
)

SCENARIOS = ("capacity", "throughput", "watched", "ingest", "spike", "idle", "workers", "book",
             "trades")

# full / quick parameters of every scenario
PARAMS: dict[str, dict[str, dict[str, Any]]] = {
    "capacity": {
        "full": {"steps": [100, 200, 400, 700, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000],
                 "rate": 10_000, "warmup": 2, "measure": 5, "refine": 2, "p99_ms": 50.0},
        "quick": {"steps": [50, 200], "rate": 10_000, "warmup": 1, "measure": 2, "refine": 0,
                  "p99_ms": 50.0},
    },
    "throughput": {
        "full": {"clients": 1000, "rate": 100_000, "warmup": 2, "measure": 5},
        "quick": {"clients": 100, "rate": 20_000, "warmup": 1, "measure": 2},
    },
    "watched": {
        "full": {"clients": 1000, "watch_clients": 100, "watch": 5, "rate": 10_000,
                 "warmup": 2, "measure": 5},
        "quick": {"clients": 100, "watch_clients": 10, "watch": 5, "rate": 10_000,
                  "warmup": 1, "measure": 2},
    },
    "ingest": {
        "full": {"ticks": 500_000, "batch": 1000},
        "quick": {"ticks": 50_000, "batch": 1000},
    },
    "spike": {
        "full": {"clients": 300, "rate": 10_000, "secs": 10, "multipliers": [3, 10]},
        "quick": {"clients": 50, "rate": 5_000, "secs": 2, "multipliers": [3]},
    },
    "idle": {
        "full": {"connections": 10_000},
        "quick": {"connections": 500},
    },
    # counts: worker processes per run; clients: per worker (the load grows
    # with the workers, so linear scaling keeps updates/s per worker flat);
    # load_cpus_per_worker: cores for the load clients and the publisher;
    # cluster: each count again through a 3-master Redis Cluster
    "workers": {
        "full": {"counts": [1, 2], "clients": 1000, "rate": 100_000, "warmup": 2, "measure": 5,
                 "load_cpus_per_worker": 1, "cluster": True},
        # quick: one Redis only (the ingest scenario's quick run covers the cluster bus)
        "quick": {"counts": [1, 2], "clients": 100, "rate": 20_000, "warmup": 1, "measure": 1,
                  "load_cpus_per_worker": 1, "cluster": False},
    },
    # rate: level changes/s over `instruments` books; each client holds `books`
    "book": {
        "full": {"clients": 1000, "books": 20, "instruments": 500, "rate": 50_000,
                 "warmup": 2, "measure": 5},
        "quick": {"clients": 50, "books": 20, "instruments": 500, "rate": 5_000,
                  "warmup": 1, "measure": 1},
    },
    # rates: trades/s over `instruments`, a ladder tried in order up to the
    # first rate where a client's tseq sequence has a gap; each client on
    # `subs` instruments' trades
    "trades": {
        "full": {"clients": 1000, "subs": 50, "instruments": 500, "rates": [20_000],
                 "warmup": 2, "measure": 5},
        "quick": {"clients": 50, "subs": 50, "instruments": 500, "rates": [2_000],
                  "warmup": 1, "measure": 1},
    },
}


def passes(res: dict[str, Any], limit_ms: float) -> tuple[bool, str]:
    m = res["phases"]["measure"]
    why = []
    if res["connected"] < res["clients"] or res["snapshots"] < res["clients"]:
        why.append(f"{res['connected']} connected")
    if m["p99_ms"] is None or m["p99_ms"] > limit_ms:
        why.append(f"p99 {fmt(m['p99_ms'])} ms")
    if res["converged"] < res["clients"]:
        why.append(f"{res['clients'] - res['converged']} clients behind")
    if res["disconnected"]:
        why.append(f"{res['disconnected']} disconnected")
    return not why, ", ".join(why)


def fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))


# ------------------------------------------------------------------ scenarios

def sc_capacity(server: str, p: dict, pins: Pins, extra: list[str]) -> dict[str, Any]:
    curve = []

    def step(n: int) -> bool:
        res = load_run(server, Load(clients=n, phases=[("warmup", p["warmup"], p["rate"]),
                                                       ("measure", p["measure"], p["rate"])]),
                       pins, extra, progress=f"  capacity {server} {n}")
        ok, why = passes(res, p["p99_ms"])
        m = res["phases"]["measure"]
        curve.append({"clients": n, "pass": ok, "why": why, **_brief(res, m)})
        log(f"  capacity {server} {n:>6} clients: p99 {fmt(m['p99_ms'])} ms, "
            f"converged {res['converged_share']:.1%}, server cpu {fmt(m['server_cpu'])}"
            f" (its core busy {fmt(m['server_core_busy'])})"
            + (f", delayed clients p50 {fmt(m['delayed_p50_ms'])} ms" if "delayed_p50_ms" in m
               else "")
            + f" -> {'pass' if ok else 'FAIL (' + why + ')'}")
        return ok

    best, worst = 0, None
    for n in p["steps"]:
        if step(n):
            best = n
        else:
            worst = n
            break
    for _ in range(p["refine"]):
        if worst is None or worst - best <= max(20, best // 10):
            break
        mid = (best + worst) // 2
        if step(mid):
            best = mid
        else:
            worst = mid
    curve.sort(key=lambda r: r["clients"])
    return {"capacity": best, "first_fail": worst, "curve": curve,
            "hist": _LAST_HISTS.get((server, best))}


_LAST_HISTS: dict[tuple[str, int], dict] = {}


def _brief(res: dict[str, Any], m: dict[str, Any]) -> dict[str, Any]:
    _LAST_HISTS[(res["server"], res["clients"])] = m["hist"]
    keep = ("p50_ms", "p99_ms", "p999_ms", "max_ms", "updates_per_s", "frames_per_s", "bytes_per_s",
            "rows_per_frame", "server_cpu", "server_core_busy", "server_rss_mb", "load_cpu_max",
            "load_cpu_total", "server_user_us_per_frame", "server_kernel_us_per_frame")
    late = {k: m[k] for k in ("delayed_p50_ms", "delayed_p99_ms", "delayed_updates_per_s")
            if k in m}  # fastfeed_delayed: its delayed clients, apart
    return {**{k: m[k] for k in keep}, **late, "converged_share": res["converged_share"],
            "disconnected": res["disconnected"]}


def _plain(server: str, p: dict, pins: Pins, extra: list[str], name: str,
           **load_kw: Any) -> dict[str, Any]:
    res = load_run(server, Load(clients=p["clients"],
                                phases=[("warmup", p["warmup"], p["rate"]),
                                        ("measure", p["measure"], p["rate"])], **load_kw),
                   pins, extra, progress=f"  {name} {server}")
    m = res["phases"]["measure"]
    out = _brief(res, m)
    out.update(clients=p["clients"], rate=p["rate"], hist=m["hist"],
               watched_p50_ms=m["watched_p50_ms"], watched_p99_ms=m["watched_p99_ms"],
               watched_p999_ms=m["watched_p999_ms"], watched_updates=m["watched_updates"],
               ticks_sent=res["ticks_sent"], ingest_errors=res["ingest_errors"])
    log(f"  {name} {server}: {fmt(m['updates_per_s'])} updates/s, "
        f"{fmt(m['frames_per_s'])} frames/s,"
        f" p50/p99/p999 {fmt(m['p50_ms'])}/{fmt(m['p99_ms'])}/{fmt(m['p999_ms'])} ms"
        + (f", watched p99 {fmt(m['watched_p99_ms'])} ms" if m["watched_updates"] else "")
        + f", converged {res['converged_share']:.1%}, server cpu {fmt(m['server_cpu'])}"
        f" (its core busy {fmt(m['server_core_busy'])})")
    return out


def sc_throughput(server, p, pins, extra):
    return _plain(server, p, pins, extra, "throughput")


def sc_watched(server, p, pins, extra):
    return _plain(server, p, pins, extra, "watched", watch_clients=p["watch_clients"],
                  watch=p["watch"])


def _same_as_fastfeed(server):
    if server in ("fastfeed_bin", "fastfeed_compact"):
        raise Skip("the binary subprotocols change only update frames: see fastfeed")
    if server == "fastfeed_delayed":
        raise Skip("delayed clients change only what is sent to them: see capacity")


def sc_ingest(server, p, pins, extra):
    _same_as_fastfeed(server)
    out: dict[str, Any] = {}
    res = ingest_run(server, p["ticks"], p["batch"], pins, extra=extra)
    out["json_ticks_per_s"] = res["rate"]
    out["json_server_cpu"] = res["server_cpu"]
    out["json_errors"] = res["errors"]
    out["json_first_error"] = res.get("first_error", "")
    if res["errors"]:
        log(f"  ingest {server}: {res['errors']} error replies: {res.get('first_error', '')}")
    log(f"  ingest {server}: JSON {fmt(res['rate'])} ticks/s applied "
        f"({res['ticks']} ticks in {res['seconds']:.2f} s, server cpu {fmt(res['server_cpu'])})")
    out["binary_ticks_per_s"] = out["redis_ticks_per_s"] = out["cluster_ticks_per_s"] = None
    if server != "fastfeed":
        return out   # the peers take JSON only, and only fastfeed has a Redis bus here
    # binary is applied much faster: send more so the window is measurable
    res = ingest_run(server, p["ticks"] * p.get("binary_factor", 4), p["batch"], pins,
                     extra=extra, fmt="binary")
    out["binary_ticks_per_s"] = res["rate"]
    out["binary_errors"] = res["errors"]
    log(f"  ingest {server}: binary {fmt(res['rate'])} ticks/s applied "
        f"(server cpu {fmt(res['server_cpu'])})")
    try:
        with RedisServer(pins.load) as redis:
            res = ingest_run(server, p["ticks"], p["batch"], pins,
                             extra=[*extra, "--redis", redis.url])
        out["redis_ticks_per_s"] = res["rate"]
        log(f"  ingest {server}: JSON through Redis {fmt(res['rate'])} ticks/s applied")
    except Skip as exc:
        log(f"  ingest {server}: Redis skipped: {exc}")
    try:
        with RedisCluster(pins.load) as cluster:
            res = ingest_run(server, p["ticks"], p["batch"], pins,
                             extra=[*extra, "--redis", cluster.url])
        out["cluster_ticks_per_s"] = res["rate"]
        log(f"  ingest {server}: JSON through a 3-master Redis Cluster {fmt(res['rate'])} "
            "ticks/s applied")
    except Skip as exc:
        log(f"  ingest {server}: Redis Cluster skipped: {exc}")
    return out


def sc_spike(server, p, pins, extra):
    r = p["rate"]
    phases = [("warmup", 2, r), ("before", p["secs"], r)]
    for m in p["multipliers"]:
        phases += [(f"spike_{m}x", p["secs"], r * m), (f"after_{m}x", p["secs"], r)]
    res = load_run(server, Load(clients=p["clients"], phases=phases), pins, extra,
                   progress=f"  spike {server}")
    out = {"clients": p["clients"], "rate": r, "converged_share": res["converged_share"],
           "phases": {}}
    for name, ph in res["phases"].items():
        if name == "warmup":
            continue
        out["phases"][name] = {k: ph[k] for k in ("rate", "p50_ms", "p99_ms", "p999_ms", "max_ms",
                                                  "updates_per_s", "frames_per_s", "server_cpu")}
        log(f"  spike {server} {name:>9} ({fmt(ph['rate'])} ticks/s): p50/p99 "
            f"{fmt(ph['p50_ms'])}/{fmt(ph['p99_ms'])} ms, server cpu {fmt(ph['server_cpu'])}")
    return out


def sc_idle(server, p, pins, extra):
    _same_as_fastfeed(server)
    res = idle_run(server, p["connections"], pins, extra, progress=f"  idle {server}")
    log(f"  idle {server}: {res['connected']} connections, "
        f"{fmt(res['bytes_per_conn'] / 1024 if res['bytes_per_conn'] else None)} KiB each")
    return res


def workers_layout(count: int, masters: int, load_per_worker: float,
                   cpus: list[int]) -> tuple[Pins, str | None] | None:
    """Cores of their own for `count` workers, the load (clients and
    publisher) and Redis (one core per master): (pins, Redis cores), or None
    when the machine has too few and every process shares every core."""
    load = max(1, math.ceil(count * load_per_worker))
    if count + load + masters > len(cpus):
        return None

    def cores(xs: list[int]) -> str:
        return ",".join(map(str, xs))

    return (Pins(cores(cpus[:count]), cores(cpus[count:count + load])),
            cores(cpus[count + load:count + load + masters]))


def sc_workers(server, p, pins, extra):
    if server != "fastfeed":
        raise Skip("the workers scenario is fastfeed's own (peers run one process)")
    # Workers share ticks only through Redis, so every run goes through it.
    # Each count gets `clients` clients per worker and, where the machine has
    # the cores, workers, load and Redis on cores of their own; `--workers N`
    # pins each worker to one of the cores the server is given.
    cpus = sorted(os.sched_getaffinity(0))
    out: dict[str, Any] = {"cpus": len(cpus), "runs": []}
    buses = [("redis", 1)] + ([("cluster", 3)] if p.get("cluster", True) else [])
    for bus, masters in buses:
        base = None
        for count in p["counts"]:
            lay = None if pins.server is None else workers_layout(
                count, masters, p["load_cpus_per_worker"], cpus)
            run_pins, redis_cpus = lay if lay else (Pins(None, None), None)
            name = f"workers={count} {bus}"
            q = {**p, "clients": p["clients"] * count}
            store = RedisServer(redis_cpus) if bus == "redis" else RedisCluster(redis_cpus)
            with store as redis:
                r = _plain(server, q, run_pins,
                           [*extra, "--workers", str(count), "--redis", redis.url], name)
            r.update(bus=bus, workers=count,
                     layout={"server": run_pins.server, "load": run_pins.load,
                             "redis": redis_cpus} if lay else "shared")
            if base is None:
                base = r["updates_per_s"] or None
            r["speedup"] = r["updates_per_s"] / base if base else None
            r["efficiency"] = r["speedup"] / count if r["speedup"] else None
            out["runs"].append(r)
    return out


def sc_book(server, p, pins, extra):
    if server in ("fastfeed_bin", "fastfeed_compact", "fastfeed_delayed"):
        raise Skip("books go as JSON for every subprotocol, and what the delay line costs "
                   "is measured by the capacity scenario: see fastfeed")
    res = load_run(server, Load(clients=p["clients"], subs=p["books"],
                                instruments=p["instruments"], kind="book",
                                phases=[("warmup", p["warmup"], p["rate"]),
                                        ("measure", p["measure"], p["rate"])]),
                   pins, extra, progress=f"  book {server}")
    m = res["phases"]["measure"]
    out = _brief(res, m)
    keep = ("changes_per_s", "levels_per_s", "bytes_per_s", "untimed")
    out.update({k: m[k] for k in keep}, clients=p["clients"], books=p["books"], rate=p["rate"],
               converged=res["converged"], behind_books=res["behind_rows"], hist=m["hist"],
               ticks_sent=res["ticks_sent"], ingest_errors=res["ingest_errors"],
               ingest_first_error=res["ingest_first_error"])
    log(f"  book {server}: {fmt(m['changes_per_s'])} changes/s delivered in "
        f"{fmt(m['frames_per_s'])} msgs/s, {fmt(m['bytes_per_s'] / 1e6)} MB/s, p50/p99 "
        f"{fmt(m['p50_ms'])}/{fmt(m['p99_ms'])} ms, converged {res['converged']}/{p['clients']}"
        f", server cpu {fmt(m['server_cpu'])} (its core busy {fmt(m['server_core_busy'])})"
        + (f", {m['untimed']} entries older than the ring (not timed)" if m["untimed"] else "")
        + (f", {res['ingest_errors']} ingest errors: {res['ingest_first_error']}"
           if res["ingest_errors"] else ""))
    return out


def _trades_at(server, p, rate, pins, extra):
    res = load_run(server, Load(clients=p["clients"], subs=p["subs"],
                                instruments=p["instruments"], kind="trades",
                                phases=[("warmup", p["warmup"], rate),
                                        ("measure", p["measure"], rate)]),
                   pins, extra, progress=f"  trades {server} {rate:,}/s")
    m = res["phases"]["measure"]
    out = _brief(res, m)
    delivered = m["updates_per_s"]
    out.update(rate=rate, trades_per_s=delivered, hist=m["hist"],
               complete=res["converged"], clients=p["clients"], gapped=res["gapped"],
               lost=res["lost"], gw_lost=res["gw_lost"], behind_trades=res["behind_trades"],
               ticks_sent=res["ticks_sent"], ingest_errors=res["ingest_errors"],
               ingest_first_error=res["ingest_first_error"],
               # server CPU per trade delivered to a client (one message per
               # trade for a peer; fastfeed batches a frame's trades)
               server_us_per_trade=(m["server_cpu"] / delivered * 1e6
                                    if m["server_cpu"] and delivered else None),
               loader_bound=bool(m["load_cpu_max"] and m["load_cpu_max"] > 0.9))
    log(f"  trades {server} {rate:,}/s: {fmt(delivered)} trades/s delivered in "
        f"{fmt(m['frames_per_s'])} msgs/s, p50/p99 {fmt(m['p50_ms'])}/{fmt(m['p99_ms'])} ms, "
        f"complete {res['converged']}/{p['clients']}, lost {res['lost']}"
        f" (gateway-reported {res['gw_lost']}), not received by the end {res['behind_trades']}, "
        f"server cpu {fmt(m['server_cpu'])} (its core busy {fmt(m['server_core_busy'])}), "
        f"load client cpu {fmt(m['load_cpu_max'])}"
        + (" -- the load client was the limit" if out["loader_bound"] else "")
        + (f", {res['ingest_errors']} ingest errors: {res['ingest_first_error']}"
           if res["ingest_errors"] else ""))
    return out


def sc_trades(server, p, pins, extra):
    if server in ("fastfeed_bin", "fastfeed_compact", "fastfeed_delayed"):
        raise Skip("trades go as JSON for every subprotocol, and what the delay line costs "
                   "is measured by the capacity scenario: see fastfeed")
    ladder: dict[str, Any] = {}
    first_loss = None
    for rate in p["rates"]:
        r = _trades_at(server, p, rate, pins, extra)
        ladder[str(rate)] = r
        if r["lost"] or r["gapped"]:
            first_loss = rate
            break
    # the figures of the ladder's first rate, then every rate's
    out = dict(ladder[str(p["rates"][0])])
    out.update(ladder=ladder, first_loss_rate=first_loss)
    return out


RUNNERS = {"capacity": sc_capacity, "throughput": sc_throughput, "watched": sc_watched,
           "ingest": sc_ingest, "spike": sc_spike, "idle": sc_idle, "workers": sc_workers,
           "book": sc_book, "trades": sc_trades}


# ------------------------------------------------------------------- repeats

def median_of(runs: list[Any]) -> Any:
    """Element-wise median of repeated results (first run's value for the
    rest: histograms, curves, strings)."""
    first = runs[0]
    if len(runs) == 1:
        return first
    if isinstance(first, dict) and "curve" in first:
        # a capacity result is the median run's, whole: its first failing
        # count, curve and histogram belong to the capacity it reports
        ranked = sorted((r for r in runs if isinstance(r, dict) and "capacity" in r),
                        key=lambda r: r["capacity"])
        if ranked:
            return {**ranked[(len(ranked) - 1) // 2], "curves": [r.get("curve") for r in runs]}
    if isinstance(first, list) and all(isinstance(r, list) and len(r) == len(first)
                                       for r in runs):
        return [median_of([r[i] for r in runs]) for i in range(len(first))]
    if isinstance(first, dict):
        out = {}
        for k, v in first.items():
            vals = [r.get(k) for r in runs if isinstance(r, dict)]
            if k in ("hist", "whist", "curve"):
                out[k] = v
            else:
                out[k] = median_of(vals)
        return out
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        return first
    nums = [r for r in runs if isinstance(r, (int, float)) and not isinstance(r, bool)]
    return statistics.median(nums) if nums else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default=None,
                    help=f"comma-separated, of {','.join(ALL_SERVERS)} "
                         "(default: all; with --quick: fastfeed)")
    ap.add_argument("--scenarios", default=None,
                    help=f"comma-separated, of {','.join(SCENARIOS)} (default: all)")
    ap.add_argument("--quick", action="store_true", help="small, short runs (CI smoke, < 2 min)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per scenario; medians reported")
    ap.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    ap.add_argument("--out", default=None, help="results folder (default bench/results/<stamp>/)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server and load to CPUs")
    ap.add_argument("--server-cpu", default="0", help="CPU list for the server (taskset -c)")
    ap.add_argument("--load-cpu", default="1", help="CPU list for the load client and publisher")
    ap.add_argument("--fastfeed-args", default="", help="extra flags for `fastfeed serve`")
    ap.add_argument("--set", action="append", default=[], metavar="SCENARIO.KEY=VALUE",
                    help="override a scenario parameter, e.g. capacity.steps=[100,200]")
    a = ap.parse_args(argv)

    mode = "quick" if a.quick else "full"
    servers = (a.servers or ("fastfeed" if a.quick else ",".join(ALL_SERVERS))).split(",")
    scenarios = (a.scenarios or ",".join(SCENARIOS)).split(",")
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error(f"unknown scenario {s!r}")
    params = {s: dict(PARAMS[s][mode]) for s in scenarios}
    for item in a.set:
        key, _, val = item.partition("=")
        sc, _, k = key.partition(".")
        if sc not in params:
            ap.error(f"--set {item}: scenario {sc!r} is not selected")
        params[sc][k] = json.loads(val)
    pins = Pins(None, None) if a.no_pin else Pins(a.server_cpu, a.load_cpu)
    extra = a.fastfeed_args.split()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = Path(a.out) if a.out else BENCH / "results" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)

    available = []
    skipped: dict[str, str] = {}
    for s in servers:
        try:
            server_command(s, 0)
            available.append(s)
        except Skip as exc:
            skipped[s] = str(exc)
            log(f"skip {s}: {exc}")

    results: dict[str, Any] = {
        "machine": report.machine(), "mode": mode, "repeats": a.repeats,
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "started": stamp, "pins": {"server": pins.server, "load": pins.load},
        "params": params, "skipped": skipped, "scenarios": {},
    }
    t_all = time.monotonic()
    for sc in scenarios:
        results["scenarios"][sc] = {}
        for server in available:
            runs = []
            for rep in range(a.repeats):
                t0 = time.monotonic()
                log(f"[{sc}] {server} (run {rep + 1}/{a.repeats})")
                try:
                    runs.append(RUNNERS[sc](server, params[sc], pins,
                                            extra if server.startswith("fastfeed") else []))
                except Skip as exc:
                    log(f"  skip: {exc}")
                    runs = [{"skipped": str(exc)}]
                    break
                except Exception as exc:  # one failure must not end the run
                    log(f"  error: {exc!r}")
                    runs.append({"error": repr(exc)[:500]})
                log(f"  ({time.monotonic() - t0:.0f} s)")
            good = [r for r in runs if "error" not in r] or runs
            results["scenarios"][sc][server] = median_of(good)
        # write as we go: a long run that dies keeps what it measured
        report.write(results, out_dir)
    results["seconds"] = round(time.monotonic() - t_all, 1)
    report.write(results, out_dir)
    log(f"results in {os.path.relpath(out_dir)} ({results['seconds']:.0f} s)")
    if a.json:
        print(json.dumps(report.strip(results), indent=1))
    else:
        print(report.markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
