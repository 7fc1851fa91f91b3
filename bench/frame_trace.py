"""What the board's frames cost, from Chromium's own trace: the board with and
without the depth ladder open, against the same gateway.

`bench/frame_budget.py` says whether frames are late; this says what the
page spends on them, as CPU time (the trace's thread time, `tdur`), which a
loaded machine inflates far less than wall time: on a shared 2-core machine
the renderer can be runnable and still wait for a core most of each frame.
For each page it prints, over the same window:

- frames per second (the renderer's BeginMainFrame);
- CPU ms per second on the renderer's main thread, its compositor thread,
  the raster workers and the display compositor (viz), and their sum;
- main-thread CPU per frame by phase: rAF callbacks (the board's and the
  ladder's paint), message handlers, style, layout, pre-paint, paint,
  layerize, commit, hover hit tests;
- main-thread tasks over 50 ms (the page's long tasks), with their median
  wall and CPU time: a long task with little CPU waited for a core;
- layout: the median number of layout objects each layout walked (the
  subtrees of its layout roots) and of those that needed it.

The pointer rests on the ladder's row in both pages, as in frame_budget.

    python -m bench.frame_trace                 # 8 s of trace per page
    python -m bench.frame_trace --seconds 20 --json

Needs what frame_budget needs (Chromium, Playwright for Python).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench.frame_budget import LADDER_OPEN, LADDER_SYM, READY, gateway
from tests.fixtures import CHROMIUM, CHROMIUM_ARGS

CATEGORIES = ["devtools.timeline", "disabled-by-default-devtools.timeline",
              "disabled-by-default-devtools.timeline.frame", "blink", "cc", "v8"]
# top-level task events, by thread: their thread time is the thread's CPU time
TASKS = {"ThreadControllerImpl::RunTask", "RunTask", "RasterizerTaskImpl::RunOnWorkerThread"}
THREADS = {"main": "CrRendererMain", "compositor": "Compositor",
           "raster": "ThreadPoolForegroundWorker", "viz": "VizCompositorThread"}
PHASES = {"raf": "FireAnimationFrame", "handlers": "FunctionCall", "style": "UpdateLayoutTree",
          "layout": "Layout", "prepaint": "PrePaint", "paint": "Paint", "layerize": "Layerize",
          "commit": "Commit", "hover": "EventHandler::handleMouseMoveEvent"}
FRAME = "ProxyMain::BeginMainFrame"


def analyse(events: list[dict]) -> dict:
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    frames = [e["ts"] for e in events if e.get("ph") == "X" and e.get("name") == FRAME]
    if len(frames) < 2:
        raise SystemExit("the trace holds no frames")
    lo, hi = min(frames), max(frames)
    secs = (hi - lo) / 1e6
    cpu: collections.Counter = collections.Counter()
    phase: collections.Counter = collections.Counter()
    walked, dirty = [], []
    long_wall, long_cpu = [], []  # main-thread tasks over 50 ms of wall time
    for e in events:
        if e.get("ph") != "X" or not lo <= e["ts"] <= hi:
            continue
        thread = names.get((e["pid"], e["tid"]), "")
        if e["name"] in TASKS:
            for k, t in THREADS.items():
                if thread.startswith(t):
                    cpu[k] += e.get("tdur", 0)
        if thread == THREADS["main"] and e["name"] in TASKS and e["dur"] > 50_000:
            long_wall.append(e["dur"] / 1000)
            long_cpu.append(e.get("tdur", 0) / 1000)
        if thread == THREADS["main"]:
            for k, n in PHASES.items():
                if e["name"] == n:
                    phase[k] += e.get("tdur", 0)
            if e["name"] == "Layout" and "beginData" in e.get("args", {}):
                walked.append(e["args"]["beginData"].get("totalObjects", 0))
                dirty.append(e["args"]["beginData"].get("dirtyObjects", 0))
    n = len(frames)
    out = {"seconds": round(secs, 2), "fps": round(n / secs, 1)}
    for k in THREADS:
        out[f"cpu_{k}_ms_per_s"] = round(cpu[k] / 1000 / secs, 1)
    out["cpu_ms_per_s"] = round(sum(cpu.values()) / 1000 / secs, 1)
    out["main_cpu_ms_per_frame"] = round(cpu["main"] / 1000 / n, 2)
    for k in PHASES:
        out[f"{k}_ms_per_frame"] = round(phase[k] / 1000 / n, 2)
    out["long_tasks"] = len(long_wall)
    out["long_task_wall_ms_p50"] = round(statistics.median(long_wall), 1) if long_wall else 0
    out["long_task_cpu_ms_p50"] = round(statistics.median(long_cpu), 1) if long_cpu else 0
    out["layout_objects_walked_p50"] = statistics.median(walked) if walked else 0
    out["layout_objects_dirty_p50"] = statistics.median(dirty) if dirty else 0
    return out


def trace_page(browser, base: str, name: str, args: argparse.Namespace) -> dict:
    page = browser.new_page(viewport={"width": args.width, "height": args.height})
    try:
        # the grid and the ladder alone, as frame_budget's board (the side panel off)
        page.goto(base + "/?side=off")
        want = int(args.simulate * 0.95) if not args.url else 1
        page.wait_for_function(READY["board"], arg=want, timeout=60_000, polling=200)
        row = f'#rows tr[data-sym="{LADDER_SYM}"] [data-f="last"]'
        page.hover(row)
        if name == "ladder":
            page.click(row)
            page.wait_for_function(LADDER_OPEN, arg=LADDER_SYM, timeout=60_000, polling=200)
        page.wait_for_timeout(args.warmup * 1000)
        with tempfile.TemporaryDirectory(prefix="fastfeed-trace-") as d:
            path = Path(d) / "trace.json"
            browser.start_tracing(page=page, path=str(path), categories=CATEGORIES)
            page.wait_for_timeout(args.seconds * 1000)
            browser.stop_tracing()
            raw = json.loads(path.read_text())
        return {"page": name, **analyse(raw["traceEvents"] if isinstance(raw, dict) else raw)}
    finally:
        page.close()


ROWS = [("fps", "frames per second"), ("cpu_ms_per_s", "CPU ms/s, all four threads"),
        ("cpu_main_ms_per_s", "  main thread"), ("cpu_compositor_ms_per_s", "  compositor"),
        ("cpu_raster_ms_per_s", "  raster workers"), ("cpu_viz_ms_per_s", "  display compositor"),
        ("main_cpu_ms_per_frame", "main-thread CPU ms per frame")] + [
        (f"{k}_ms_per_frame", f"  {k}") for k in PHASES] + [
        ("long_tasks", "main-thread tasks over 50 ms"),
        ("long_task_wall_ms_p50", "  their wall time, median ms"),
        ("long_task_cpu_ms_p50", "  their CPU time, median ms"),
        ("layout_objects_walked_p50", "layout objects walked per layout (median)"),
        ("layout_objects_dirty_p50", "layout objects needing layout (median)")]


def markdown(res: list[dict], args: argparse.Namespace) -> str:
    src = args.url or f"fastfeed serve --simulate {args.simulate} --rate {args.rate:g}"
    head = (f"Frame cost: headless Chromium {args.width}x{args.height}, {src}, "
            f"{args.seconds:g} s of trace per page, thread CPU time\n\n")
    lines = ["| | " + " | ".join(r["page"] for r in res) + " |",
             "| --- |" + " ---: |" * len(res)]
    for k, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(f"{r[k]:g}" for r in res) + " |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="trace time per page (default 8)")
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--simulate", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=10000.0)
    ap.add_argument("--url", default="", help="use this running gateway (http://host:port)")
    ap.add_argument("--chromium", default=CHROMIUM)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=800)
    ap.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = ap.parse_args(argv)
    if not Path(args.chromium).exists():
        raise SystemExit(
            f"no Chromium at {args.chromium} (apt-get install chromium, or --chromium PATH)")
    from playwright.sync_api import sync_playwright

    with gateway(args) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS,
                                    headless=True)
        try:
            res = [trace_page(browser, base, name, args) for name in ("board", "ladder")]
        finally:
            browser.close()
    print(json.dumps(res, indent=2) if args.json else markdown(res, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
