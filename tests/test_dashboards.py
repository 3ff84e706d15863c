"""Dashboards in real headless Chromium: the page loads, plots render, values change as a run streams in."""

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from block.engines.settings import EngineSettings
from simulator.workload import Request
from workbench.cli import main as block_cli
from workbench.cluster import free_port
from workbench.loadgen import run_load
from workbench.local import LocalCluster

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("BLOCK_TEST_ARTIFACTS", ROOT / "results" / "test-artifacts"))

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing (apt-get install chromium)")


@contextlib.contextmanager
def panel_serve(script: str, args: list[str]):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "panel", "serve", str(ROOT / script), "--port", str(port),
                             "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}", "--args",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/{Path(script).stem}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"panel serve did not come up: {proc.stdout.read().decode()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def browser():
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])
    return pw, b


def completed_value(page) -> int:
    text = page.locator("text=requests completed").first.locator("xpath=..").inner_text()
    digits = "".join(ch for ch in text.split("requests completed")[-1] if ch.isdigit())
    return int(digits or 0)


def test_live_dashboard_updates_while_a_run_streams_in(tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    engine = EngineSettings(time_scale=10.0)
    with LocalCluster(tmp_path / "ws", instances=2, policy="block", engine=engine) as cluster, \
            panel_serve("dashboards/live.py", ["--collector-url", cluster.collector_url]) as url:
        arr = np.cumsum(np.random.default_rng(0).exponential(1 / 8.0, 100))
        reqs = [Request(i, float(a), 60, 40) for i, a in enumerate(arr)]
        load = threading.Thread(target=lambda: asyncio.run(run_load(cluster.scheduler_url, reqs, "Llama-2-7B")))
        pw, b = browser()
        try:
            page = b.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("canvas", timeout=30000)
            first = completed_value(page)
            load.start()
            deadline = time.monotonic() + 30
            later = first
            while later == first and time.monotonic() < deadline:
                time.sleep(1.0)
                later = completed_value(page)
            time.sleep(3.0)  # let a few refreshes render the plots for the screenshot
            page.screenshot(path=str(ARTIFACTS / "live_dashboard.png"), full_page=True)
            assert page.locator("canvas").count() >= 3
            assert later > first, "the completed-requests value never changed"
        finally:
            b.close()
            pw.stop()
            if load.is_alive() or load.ident is not None:
                load.join()


def test_results_dashboard_renders_finished_runs(tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with LocalCluster(tmp_path / "ws", instances=1, policy="least_requests",
                      engine=EngineSettings(time_scale=20.0)) as cluster:
        from block.events import EventSink

        async def go():
            sink = EventSink(cluster.collector_url, "run-a")
            await sink.start()
            await run_load(cluster.scheduler_url, [Request(i, i * 0.05, 40, 20) for i in range(30)], "Llama-2-7B",
                           sink=sink, policy="least_requests")
            await sink.stop()

        asyncio.run(go())
        db = cluster.workspace / "block.duckdb"
    copy = tmp_path / "finished.duckdb"
    shutil.copy(db, copy)
    cli = ["--preset", "demo", "--requests", "40", "--policies", "round_robin,least_requests", "--seeds", "0"]
    capacity, latency = tmp_path / "capacity.csv", tmp_path / "compare.csv"
    assert block_cli(["capacity", *cli, "--slo", "3", "--lo", "1", "--hi", "8", "--csv", str(capacity)]) == 0
    assert block_cli(["compare", *cli, "--qps", "2,4", "--csv", str(latency)]) == 0
    with panel_serve("dashboards/results.py", ["--db", str(copy), "--capacity", str(capacity),
                                               "--latency", str(latency)]) as url:
        pw, b = browser()
        try:
            page = b.new_page(viewport={"width": 1400, "height": 900})
            page.goto(url)
            page.wait_for_selector("canvas", timeout=30000)
            assert page.locator("text=run-a").count() >= 1
            assert page.locator("text=lacks the columns").count() == 0
            figures = page.locator(".bk-Figure")  # one per plot: two CDFs, P99 TTFT and E2E by QPS, capacity
            deadline = time.monotonic() + 30
            while figures.count() < 5 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert figures.count() == 5
            page.screenshot(path=str(ARTIFACTS / "results_dashboard.png"), full_page=True)
        finally:
            b.close()
            pw.stop()
