"""Live dashboard of a running workspace: ``panel serve dashboards/live.py --args --collector-url URL``.

Reads the store through the collector once a second: per-instance load and KV usage, latency
percentiles over time, recent routing decisions (predicted vs realised), and provisioning events.
"""

from __future__ import annotations

import argparse
import sys
import time

import holoviews as hv
import panel as pn

from dashboards import plots
from store.read import Reader

pn.extension(sizing_mode="stretch_width")

WINDOW_S = 300.0  # seconds of instance samples on the load and KV plots


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dashboards/live.py")
    p.add_argument("--collector-url", help="a running workspace's collector")
    p.add_argument("--db", help="or a workspace's DuckDB file (when no collector holds it)")
    p.add_argument("--period-ms", type=int, default=1000)
    return p.parse_args(sys.argv[1:])


def build(reader: Reader, period_ms: int = 1000) -> pn.template.BaseTemplate:
    completed = pn.indicators.Number(name="requests completed", value=0, format="{value}")
    p99 = pn.indicators.Number(name="P99 TTFT (ms)", value=0, format="{value:.0f}")
    panes = {k: pn.pane.HoloViews(hv.Curve([]), sizing_mode="stretch_width") for k in
             ("load", "kv", "latency", "decisions", "provisioning")}

    def update() -> None:
        samples = reader.instance_samples(since_ts=time.time() - WINDOW_S)
        reqs = reader.recent_requests(source="scheduler", limit=5000)
        decisions = reader.recent_decisions(limit=500)
        events = reader.provisioning_events()
        ok = reqs[reqs["status"] == "ok"] if not reqs.empty else reqs
        completed.value = len(ok)
        p99.value = float(ok["ttft"].quantile(0.99) * 1e3) if len(ok) else 0.0
        panes["load"].object = plots.load_bars(samples)
        panes["kv"].object = plots.kv_curves(samples)
        panes["latency"].object = plots.latency_over_time(reqs)
        panes["decisions"].object = plots.predicted_vs_realised(decisions, reqs)
        panes["provisioning"].object = plots.provisioning_timeline(events)

    update()
    pn.state.add_periodic_callback(update, period=period_ms)
    return pn.template.FastListTemplate(title="Block Workbench: live", main=[
        pn.Row(completed, p99), pn.Row(panes["load"], panes["kv"]), pn.Row(panes["latency"], panes["decisions"]),
        panes["provisioning"]])


if __name__.startswith("bokeh"):  # run by `panel serve`; importing the module (tests) builds nothing
    args = _args()
    if args.collector_url is None and args.db is None:
        raise SystemExit("dashboards/live.py: pass --collector-url URL (live) or --db FILE")
    build(Reader(collector_url=args.collector_url, db_path=args.db), args.period_ms).servable()
