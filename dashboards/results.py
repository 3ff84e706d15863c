"""Compare finished runs: ``panel serve dashboards/results.py --args --db WORKSPACE.duckdb
[--capacity results/policy_study/capacity.csv] [--latency results/policy_study/latency.csv]``.

TTFT and E2E CDFs per run from the store; policy x QPS curves and capacity bars from the offline
study's CSV files when given.
"""

from __future__ import annotations

import argparse
import sys

import holoviews as hv
import pandas as pd
import panel as pn

from dashboards import plots
from store.read import Reader

pn.extension(sizing_mode="stretch_width")


def build(reader: Reader, capacity_csv: str | None, latency_csv: str | None) -> pn.template.BaseTemplate:
    reqs = reader.sql("SELECT run_id, policy, ttft, e2e FROM requests WHERE source = 'client' AND status = 'ok'")
    summary = reader.summary()
    cdfs = []
    for metric in ("ttft", "e2e"):
        curves = [plots.cdf(g[metric], str(run)) for run, g in reqs.groupby("run_id")] or [hv.Curve([])]
        cdfs.append(pn.pane.HoloViews(hv.Overlay(curves).opts(title=f"{metric.upper()} CDF per run",
                                                               legend_position="bottom_right")))
    main = [pn.pane.DataFrame(summary, index=False), pn.Row(*cdfs)]
    if latency_csv:
        lat = pd.read_csv(latency_csv).groupby(["policy", "qps"], as_index=False)[["p99_ttft", "p99_e2e"]].mean()
        for metric in ("p99_ttft", "p99_e2e"):
            curves = [hv.Curve((g["qps"], g[metric]), "QPS", f"{metric} (s)", label=name)
                      for name, g in lat.groupby("policy")]
            main.append(pn.pane.HoloViews(hv.Overlay(curves).opts(title=f"{metric} by policy", logy=True)))
    if capacity_csv:
        cap = pd.read_csv(capacity_csv).groupby(["policy", "slo_s"], as_index=False)["capacity_qps"].mean()
        bars = hv.Bars(cap, ["policy", "slo_s"], "capacity_qps").opts(title="Capacity (QPS at P99 TTFT SLO)",
                                                                      height=320, responsive=True)
        main.append(pn.pane.HoloViews(bars))
    return pn.template.FastListTemplate(title="Block Workbench: results", main=main)


p = argparse.ArgumentParser(prog="dashboards/results.py")
p.add_argument("--db")
p.add_argument("--collector-url")
p.add_argument("--capacity")
p.add_argument("--latency")
args = p.parse_args(sys.argv[1:])
if args.db is None and args.collector_url is None:
    raise SystemExit("dashboards/results.py: pass --db FILE or --collector-url URL")
build(Reader(collector_url=args.collector_url, db_path=args.db), args.capacity, args.latency).servable()
