"""Compare finished runs: ``panel serve dashboards/results.py --args --db WORKSPACE.duckdb
[--capacity CAPACITY.csv] [--latency COMPARE.csv]``.

TTFT and E2E CDFs per run from the store; capacity bars from the file ``block capacity --csv`` writes
and P99-by-QPS curves from the file ``block compare --csv`` writes. The CSV files are read by the
column names those commands write; a file without them gets a message on the page naming what is
missing, not a blank page.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import holoviews as hv
import pandas as pd
import panel as pn

from dashboards import plots
from store.read import Reader

pn.extension(sizing_mode="stretch_width")

# The columns each plot reads, as the CLI writes them (block.offline.capacity_table and compare).
CAPACITY_COLUMNS = ("policy", "slo_ttft_p99_s", "capacity_qps")
LATENCY_COLUMNS = ("policy", "qps", "p99_ttft", "p99_e2e")


def read_csv(path: str | Path, needed: tuple[str, ...], producer: str) -> pd.DataFrame | str:
    """The file as a frame, or a message saying why it cannot be plotted (shown on the page)."""
    try:
        df = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        return f"cannot read {path}: {exc}"
    missing = [c for c in needed if c not in df.columns]
    if missing:
        return (f"{path} lacks the columns {missing} that `{producer}` writes; its columns are "
                f"{list(df.columns)}")
    return df


def _series(df: pd.DataFrame) -> pd.Series:
    """Policy names, with the honesty mode appended when the file mixes modes (honest vs oracle runs)."""
    if "mode" in df.columns and df["mode"].nunique() > 1:
        return df["policy"].astype(str) + " (" + df["mode"].astype(str) + ")"
    return df["policy"].astype(str)


def capacity_pane(path: str | Path) -> pn.viewable.Viewable:
    """Capacity at each P99 TTFT SLO per policy, averaged over rows of the same policy and SLO."""
    cap = read_csv(path, CAPACITY_COLUMNS, "block capacity --csv")
    if isinstance(cap, str):
        return pn.pane.Alert(cap, alert_type="danger")
    cap = cap.assign(series=_series(cap), slo=cap["slo_ttft_p99_s"].astype(str) + " s")
    mean = cap.groupby(["series", "slo"], as_index=False, sort=False)["capacity_qps"].mean()
    bars = hv.Bars(mean, [("series", "policy"), ("slo", "P99 TTFT SLO")], ("capacity_qps", "capacity (QPS)"))
    return pn.pane.HoloViews(bars.opts(title="Capacity (QPS at P99 TTFT SLO)", height=320, responsive=True,
                                       xrotation=30, tools=["hover"]))


def latency_panes(path: str | Path) -> list[pn.viewable.Viewable]:
    """P99 TTFT and E2E against QPS per policy, averaged over seeds."""
    lat = read_csv(path, LATENCY_COLUMNS, "block compare --csv")
    if isinstance(lat, str):
        return [pn.pane.Alert(lat, alert_type="danger")]
    lat = lat.assign(series=_series(lat))
    mean = lat.groupby(["series", "qps"], as_index=False)[["p99_ttft", "p99_e2e"]].mean()
    panes: list[pn.viewable.Viewable] = []
    for metric in ("p99_ttft", "p99_e2e"):
        curves = [hv.Curve((g["qps"], g[metric]), "QPS", f"{metric} (s)", label=name)
                  for name, g in mean.groupby("series")]
        panes.append(pn.pane.HoloViews(hv.Overlay(curves).opts(title=f"{metric} by policy", logy=True)))
    return panes


def build(reader: Reader, capacity_csv: str | None, latency_csv: str | None) -> pn.template.BaseTemplate:
    reqs = reader.latencies(source="client")
    summary = reader.summary()
    cdfs = []
    for metric in ("ttft", "e2e"):
        curves = [plots.cdf(g[metric].astype(float), str(run)) for run, g in reqs.groupby("run_id")] or [
            hv.Curve([])]
        cdfs.append(pn.pane.HoloViews(hv.Overlay(curves).opts(title=f"{metric.upper()} CDF per run",
                                                               legend_position="bottom_right")))
    main: list[pn.viewable.Viewable] = [pn.pane.DataFrame(summary, index=False), pn.Row(*cdfs)]
    if latency_csv:
        main += latency_panes(latency_csv)
    if capacity_csv:
        main.append(capacity_pane(capacity_csv))
    return pn.template.FastListTemplate(title="Block Workbench: results", main=main)


if __name__.startswith("bokeh"):  # run by `panel serve`; importing the module (tests) builds nothing
    p = argparse.ArgumentParser(prog="dashboards/results.py")
    p.add_argument("--db")
    p.add_argument("--collector-url")
    p.add_argument("--capacity", help="the CSV `block capacity --csv` writes")
    p.add_argument("--latency", help="the CSV `block compare --csv` writes")
    args = p.parse_args(sys.argv[1:])
    if args.db is None and args.collector_url is None:
        raise SystemExit("dashboards/results.py: pass --db FILE or --collector-url URL")
    build(Reader(collector_url=args.collector_url, db_path=args.db), args.capacity, args.latency).servable()
