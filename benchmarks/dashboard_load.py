"""The live dashboard under load, as its user sees it (issue 17). Prints a table and a RESULT line.

A local emulated cluster (``workbench.local.LocalCluster``) takes Poisson load through its scheduler while
``panel serve dashboards/live.py`` (on 127.0.0.1) is open in headless Chromium (Playwright). Every
request the page makes to anything but 127.0.0.1 is blocked and counted, so the page must render with no
network at all. Measured:

- first_paint_s: from navigation until every plot of the page has drawn its canvas;
- server_cpu_pct: CPU of the ``panel serve`` process per open tab (% of one core) while it refreshes every
  second, over the watched window (from WARMUP_S after first paint: the steady cost, not the page's build);
- rss_growth_mb: the server's resident memory at the end minus at first paint; the run ends with the tab
  closed and the server unwatched for a while, which is where a leak used to show;
- tracebacks: tracebacks in the server's log (a chained one counts once) plus uncaught errors in the page;
- offline_ok: nothing outside 127.0.0.1 was requested, every plot rendered and the completed-requests
  figure rose during the run.

The full run watches for 5 minutes (4 watched, 1 unwatched); --quick for 25 s (20 + 5), which says
nothing about slow leaks and says so in its table. Chromium and the cluster share the machine with the
server, so first paint includes CPU contention.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil

from block.engines.settings import EngineSettings
from simulator.workload import Request, poisson_arrivals
from workbench.cluster import free_port
from workbench.loadgen import run_load
from workbench.local import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
PLOTS = 7  # figures of the live page: load, predicted vs realised, and five time plots
LOCAL_HOSTS = {"127.0.0.1"}
WARMUP_S = 5.0  # after first paint, before the CPU window opens


@dataclass
class Page:
    """What the browser saw."""

    blocked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


@contextlib.contextmanager
def panel_serve(collector_url: str, log: Path, period_ms: int):
    """``panel serve dashboards/live.py`` on a free loopback port; yields (process, page URL)."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "panel", "serve", str(ROOT / "dashboards" / "live.py"), "--port", str(port),
             "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}", "--num-procs", "1",
             "--args", "--collector-url", collector_url, "--period-ms", str(period_ms)],
            stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/live"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=5).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"dashboard_load: panel serve did not come up; its log:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_tracebacks(log: str) -> int:
    """Tracebacks the server logged, a chained one ("During handling of the above exception ...") once."""
    chained = log.count("During handling of the above exception") + log.count("The above exception was the direct")
    return log.count("Traceback (most recent call last)") - chained


def completed(page) -> int:
    """The "requests completed" figure as the page shows it."""
    text = page.locator("text=requests completed").first.locator("xpath=..").inner_text()
    digits = "".join(ch for ch in text.split("requests completed")[-1] if ch.isdigit())
    return int(digits or 0)


def guard(page, seen: Page) -> None:
    """Abort every request not to 127.0.0.1 (and remember it); collect uncaught page errors."""
    def route(r):
        if urlsplit(r.request.url).hostname in LOCAL_HOSTS or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            seen.blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("pageerror", lambda exc: seen.errors.append(str(exc)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a CI-sized window (25 s instead of 5 min)")
    p.add_argument("--watch", type=float, help="seconds the tab stays open after first paint (default 240; quick 20)")
    p.add_argument("--unwatched", type=float, help="seconds the server then runs with no tab (default 60; quick 5)")
    p.add_argument("--qps", type=float, default=8.0, help="request rate of the load (default: %(default)s)")
    p.add_argument("--instances", type=int, help="emulated instances (default 4; quick 2)")
    p.add_argument("--period-ms", type=int, default=1000, help="dashboard refresh period (default: %(default)s)")
    p.add_argument("--screenshot", type=Path, help="save a full-page screenshot here at the end of the window")
    p.add_argument("--server-log", type=Path, help="keep the panel server's log here")
    args = p.parse_args(argv)
    watch = args.watch if args.watch is not None else (20.0 if args.quick else 240.0)
    unwatched = args.unwatched if args.unwatched is not None else (5.0 if args.quick else 60.0)
    instances = args.instances or (2 if args.quick else 4)
    if watch <= 0 or unwatched < 0 or args.qps <= 0 or instances < 1:
        raise SystemExit("dashboard_load: --watch, --qps and --instances must be positive, --unwatched >= 0")
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"dashboard_load: {CHROMIUM} missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    n = int(args.qps * (watch + 15))
    arrivals = poisson_arrivals(n, args.qps, np.random.default_rng(0))
    reqs = [Request(i, float(a), 64, 48) for i, a in enumerate(arrivals)]
    seen = Page()
    with tempfile.TemporaryDirectory(prefix="dashboard-load-") as tmp, \
            LocalCluster(Path(tmp) / "ws", instances=instances, policy="block",
                         engine=EngineSettings(time_scale=4.0)) as cluster, \
            panel_serve(cluster.collector_url, Path(tmp) / "panel.log", args.period_ms) as (proc, url):
        server = psutil.Process(proc.pid)
        load = threading.Thread(target=lambda: asyncio.run(run_load(cluster.scheduler_url, reqs, "Llama-2-7B")),
                                daemon=True)
        load.start()
        time.sleep(3.0)  # requests are flowing when the tab opens
        pw = sync_playwright().start()
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            guard(page, seen)
            t0 = time.monotonic()
            page.goto(url)
            figures = page.locator(".bk-Figure")  # inside Bokeh's shadow roots, which locators pierce
            while figures.count() < PLOTS:
                if time.monotonic() - t0 > 120:
                    raise SystemExit(f"dashboard_load: {figures.count()} of {PLOTS} plots after 120 s; server log:\n"
                                     + (Path(tmp) / "panel.log").read_text(errors="replace")[-3000:])
                time.sleep(0.05)
            first_paint = time.monotonic() - t0
            rss0, shown0 = server.memory_info().rss, completed(page)
            time.sleep(WARMUP_S)  # the first read of the window's history and the first renders are one-off
            cpu0, w0 = server.cpu_times(), time.monotonic()
            time.sleep(watch)
            cpu1, w1 = server.cpu_times(), time.monotonic()
            rss_watched = server.memory_info().rss
            shown1 = completed(page)
            drawn = figures.count()
            if args.screenshot:
                page.screenshot(path=str(args.screenshot), full_page=True)
            page.close()
        finally:
            browser.close()
            pw.stop()
        time.sleep(unwatched)
        rss1 = server.memory_info().rss
        cpu_pct = 100 * ((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)) / (w1 - w0)
        log = (Path(tmp) / "panel.log").read_text(errors="replace")
        if args.server_log:
            args.server_log.write_text(log)
    tracebacks = server_tracebacks(log) + len(seen.errors)
    offline_ok = not seen.blocked and drawn >= PLOTS and shown1 > shown0
    growth = (rss1 - rss0) / 2**20
    rows = [
        ("window", f"{'QUICK (CI-sized): ' if args.quick else ''}{watch:g} s watched + {unwatched:g} s unwatched"
                   f"{' — too short to show a slow leak' if args.quick else ''}"),
        ("load", f"{args.qps:g} req/s on {instances} emulated instances, policy block"),
        ("first paint (all plots drawn)", f"{first_paint:.2f} s (target <= 3)"),
        ("server CPU per open tab", f"{cpu_pct:.1f} % of a core at {args.period_ms} ms refresh (target <= 15)"),
        ("server RSS", f"{rss0 / 2**20:.0f} MB at first paint, {rss_watched / 2**20:.0f} MB when the tab closed, "
                       f"{rss1 / 2**20:.0f} MB at the end (target growth <= 50 MB)"),
        ("requests completed on the page", f"{shown0} at first paint -> {shown1}"),
        ("figures drawn", f"{drawn} (expected {PLOTS})"),
        ("requests blocked (not 127.0.0.1)", f"{len(seen.blocked)} {seen.blocked[:3]}"),
        ("tracebacks in the server log / page errors", f"{server_tracebacks(log)} / {len(seen.errors)} "
                                                        f"{seen.errors[:2]}"),
    ]
    if "Traceback" in log:  # the first one's end: what broke and where
        rows.append(("first traceback", " | ".join(log[log.index("Traceback"):].splitlines()[-8:])[:1500]))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"RESULT first_paint_s={first_paint:.2f} server_cpu_pct={cpu_pct:.1f} rss_growth_mb={growth:.1f} "
          f"tracebacks={tracebacks} offline_ok={str(offline_ok).lower()}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
