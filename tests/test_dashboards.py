"""Dashboards: the live one's incremental Arrow reads against a real collector, and both pages in real
headless Chromium with every request off 127.0.0.1 blocked: they load, plots render, values change as a run
streams in."""

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson
import pyarrow as pa
import pytest

from block.engines.settings import EngineSettings
from simulator.workload import Request
from store.collector import Store, build_app
from store.read import Reader
from store.schema import DecisionRow, InstanceSampleRow, ProvisioningRow, RequestRow
from workbench.cli import main as block_cli
from workbench.cluster import free_port
from workbench.loadgen import run_load
from workbench.local import LocalCluster

from .servers import serve

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("BLOCK_TEST_ARTIFACTS", ROOT / "results" / "test-artifacts"))

needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                    reason=f"{CHROMIUM} missing (apt-get install chromium)")


def rows(run: str, t0: float, n: int, *, policy: str = "block") -> list:
    """n completed requests of one run, one every 0.1 s from t0, with their decisions and side-car samples;
    every 10th failed, every 7th decided on a fallback, predictions (block only) 10 % high."""
    out: list = []
    predictive = policy == "block"
    for i in range(n):
        t, rid = t0 + 0.1 * i, f"{run}-r{i}"
        out += [RequestRow(run_id=run, request_id=rid, source="scheduler", instance=f"i{i % 2}", policy=policy,
                           arrival_ts=t - 1.0, first_token_ts=t - 0.8, finish_ts=t, prompt_tokens=10,
                           output_tokens=5, ttft=0.2, e2e=1.0 + 0.01 * i, status="error" if i % 10 == 0 else "ok"),
                DecisionRow(run_id=run, request_id=rid, ts=t - 1.0, policy=policy, chosen=f"i{i % 2}",
                            decision_ms=0.5, target="e2e", considered=2, asked=2,
                            fallback="partial" if i % 7 == 0 else "none", predictor="live",
                            predicted_ttft=0.1 if predictive else None,
                            predicted_e2e=1.1 * (1.0 + 0.01 * i) if predictive else None, candidates="[]"),
                InstanceSampleRow(run_id=run, ts=t, instance=f"i{i % 2}", running=3, waiting=1, kv_usage=0.25,
                                  preemptions=0, tracked=4)]
    return out


def test_collector_answers_arrow_under_the_same_rules(tmp_path):
    with serve(build_app(Store(tmp_path / "ws.duckdb", max_rows=1000))) as url:
        def query(sql: str, params: list, fmt: str = "arrow") -> httpx.Response:
            return httpx.post(url + "/query", content=orjson.dumps({"sql": sql, "params": params, "format": fmt}))

        whole = query("SELECT range AS i, ? AS s FROM range(?)", ["x", 10])
        assert whole.headers["content-type"] == "application/vnd.apache.arrow.stream"
        table = pa.ipc.open_stream(whole.content).read_all()
        assert (table.column_names, table.num_rows, whole.headers["x-block-truncated"]) == (["i", "s"], 10, "false")
        capped = query("SELECT range AS i FROM range(?)", [5000])
        assert (pa.ipc.open_stream(capped.content).read_all().num_rows, capped.headers["x-block-truncated"]) == (
            1000, "true")
        assert "only SELECT" in query("DELETE FROM requests", []).json()["error"]["message"]
        assert "exactly one statement" in query("SELECT 1; SELECT 2", []).json()["error"]["message"]
        bad = query("SELECT 1", [], fmt="csv")
        assert bad.status_code == 400 and 'format must be "json" or "arrow"' in bad.json()["error"]["message"]
        with pytest.raises(ValueError, match=r"cut the result at its row cap \(1000 rows\)"):
            Reader(collector_url=url).sql("SELECT range FROM range(2000)")


def test_tail_reads_only_rows_after_a_time_of_one_run_and_policy(tmp_path):
    now = time.time()
    store = Store(tmp_path / "ws.duckdb")
    store.insert_rows(rows("run-a", now - 20, 50) + rows("run-b", now - 20, 5, policy="least_requests"))
    with serve(build_app(store)) as url:
        reader = Reader(collector_url=url)
        try:
            recent = reader.tail("requests", now - 17.05)
            assert len(recent) == 20 + 0 and recent["t"].is_monotonic_increasing  # run-b ended at now - 19.6
            assert set(reader.tail("requests", 0, run_id="run-b")["policy"]) == {"least_requests"}
            assert reader.tail("decisions", 0, policy="block")["policy"].unique().tolist() == ["block"]
            outcomes = reader.tail("outcomes", 0, run_id="run-a")
            assert len(outcomes) == 45 and (outcomes["predicted_e2e"] > outcomes["e2e"]).all()  # failed excluded
            assert len(reader.tail("instance_samples", now - 1.05, limit=3)) == 0
            assert len(reader.tail("instance_samples", 0, limit=3)) == 3
            with pytest.raises(ValueError, match="unknown table 'runs'"):
                reader.tail("runs", 0)
            assert list(reader.live_runs()["run_id"]) == ["run-b", "run-a"]
        finally:
            reader.close()


def settle(view) -> None:
    """One tick's poll and update, with the run list read (a tab reads it every fifth tick)."""
    view.apply(view.poll(view.generation, None, None, True))


def test_live_view_appends_only_what_is_new(tmp_path):
    from dashboards.live import ALL, BUCKET_S, WINDOW_S, LiveView

    now = time.time()
    store = Store(tmp_path / "ws.duckdb")
    with serve(build_app(store)) as url:
        empty = LiveView(Reader(collector_url=url))
        settle(empty)
        assert empty.hint.visible and "no requests yet" in empty.hint.object
        assert empty.rows("stats") >= WINDOW_S / BUCKET_S - 2  # the window's buckets, empty ones too
        assert empty.frame("stats")["requests_s"].eq(0).all()
        empty.close()

        run_a = rows("run-a", now - 60, 100)
        store.insert_rows(run_a)
        view = LiveView(Reader(collector_url=url))
        try:
            settle(view)
            assert (view.completed.value, view.failed.value, view.fallbacks.value) == (90, 10, 15)
            assert view.rows("outcomes") == 90 and view.rows("samples") == 100
            load = view.frame("load")  # each instance's latest sample, bars in a stable order
            assert load.to_dict("list") == {"instance": ["i0", "i1"], "running": [3, 3], "waiting": [1, 1]}
            assert list(view.load_range.factors) == ["i0", "i1"]
            assert view.diagonal.data["x"][1] == pytest.approx(1.1 * 1.99)  # y = x reaches the largest point
            assert view.frame("samples").groupby("instance")["color"].nunique().eq(1).all()  # one colour each
            assert view.mape.value == pytest.approx(10, abs=0.5)  # every prediction 10 % high
            assert view.rank.value == pytest.approx(100)  # and in the right order
            assert view.run.options == [ALL, "run-a"] and "no requests yet" not in view.hint.object
            stats = view.frame("stats")
            assert stats["requests_s"].sum() * BUCKET_S == pytest.approx(90)  # every request in one bucket
            assert stats["time"].is_monotonic_increasing and stats["time"].is_unique

            store.insert_rows(run_a)  # the same rows again (a resent batch): nothing new
            store.insert_rows(rows("run-b", now - 5, 10, policy="least_requests"))
            store.insert_rows([ProvisioningRow(run_id="run-b", ts=now - 4, action="add", instance="i2",
                                               reason="slo", signal="ttft", value=4.0, threshold=3.0, status="ok",
                                               instances=3)])
            settle(view)
            assert view.completed.value == 90 + 9 and view.rows("samples") == 110
            assert view.rows("events") == 1
            assert view.run.options == [ALL, "run-b", "run-a"] and view.policy.options == [
                ALL, "block", "least_requests"]

            view.run.value = "run-b"  # a new selection starts over, from that run's rows only
            asyncio.run(view.tick())
            assert view.completed.value == 9 and view.rows("outcomes") == 0  # no predictions
            assert "no predicted-vs-realised points" in view.hint.object
        finally:
            view.close()


def test_live_view_says_when_the_store_is_unreachable():
    from dashboards.live import LiveView

    view = LiveView(Reader(collector_url=f"http://127.0.0.1:{free_port()}"))
    asyncio.run(view.tick())
    assert view.status.object.startswith("**Store unreachable**") and not view.busy
    view.close()


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
    """Headless Chromium; pages from it go through ``offline`` so nothing leaves 127.0.0.1."""
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])
    return pw, b


def offline(page) -> list[str]:
    """Abort every request of ``page`` not to 127.0.0.1; the list of what was blocked."""
    blocked: list[str] = []

    def route(r):
        if urlsplit(r.request.url).hostname == "127.0.0.1" or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            blocked.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    return blocked


def completed_value(page) -> int:
    text = page.locator("text=requests completed").first.locator("xpath=..").inner_text()
    digits = "".join(ch for ch in text.split("requests completed")[-1] if ch.isdigit())
    return int(digits or 0)


@needs_chromium
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
            blocked = offline(page)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            page.wait_for_selector("canvas", timeout=30000)
            page.wait_for_selector("text=Waiting for data", timeout=30000)  # nothing sent yet: the page says so
            first = completed_value(page)
            load.start()
            deadline = time.monotonic() + 30
            later = first
            while later == first and time.monotonic() < deadline:
                time.sleep(1.0)
                later = completed_value(page)
            time.sleep(3.0)  # let a few refreshes render the plots for the screenshot
            page.screenshot(path=str(ARTIFACTS / "live_dashboard.png"), full_page=True)
            assert page.locator(".bk-Figure").count() == 7  # load, predictions, five time plots
            assert later > first, "the completed-requests value never changed"
            assert page.locator("text=E2E rank accuracy").count() == 1
            assert (blocked, errors) == ([], [])
        finally:
            b.close()
            pw.stop()
            if load.is_alive() or load.ident is not None:
                load.join()


@needs_chromium
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
