"""Compare finished runs: ``panel serve dashboards/results.py --args --db WORKSPACE.duckdb [--runs RUNS_DIR]
[--capacity CAPACITY.csv] [--latency COMPARE.csv]``.

TTFT and E2E CDFs per run from the store; the sweeps the store holds (``block sweep``), as P99 TTFT against QPS
per policy and setting with their cells in a table; run folders (``<workspace>/runs``: offline runs and sweep
cells, workbench.experiments) as a table and CDFs of the runs picked; capacity bars from the file
``block capacity --csv`` writes and P99-by-QPS curves from the file ``block compare --csv`` writes. The CSV
files are read by the column names those commands write; a file without them gets a message on the page naming
what is missing, not a blank page.
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
from workbench.experiments import open_run, run_folders

pn.extension(sizing_mode="stretch_width")

# The columns each plot reads, as the CLI writes them (block.offline.capacity_table and compare).
CAPACITY_COLUMNS = ("policy", "slo_ttft_p99_s", "capacity_qps")
LATENCY_COLUMNS = ("policy", "qps", "p99_ttft", "p99_e2e")
# A sweep's axes besides QPS and seed: those that vary within a sweep name its curves.
SWEEP_AXES = ("policy", "workload", "preset", "instances", "max_num_seqs", "max_num_batched_tokens", "mode")
SWEEP_TABLE_COLUMNS = ("policy", "workload", "preset", "max_num_seqs", "max_num_batched_tokens", "mode", "qps",
                       "seed", "completed", "p50_ttft", "p99_ttft", "p99_e2e", "goodput", "gave_up", "wall_s", "cell")
SWEEP_METRICS = {"p99_ttft": "P99 TTFT (s)", "p99_e2e": "P99 E2E (s)", "goodput": "goodput (requests/s)"}
MAX_RUN_CDFS = 8  # CDFs of more runs than this are unreadable; the picker starts with the first few
PLOT_OPTS = {"responsive": True, "height": 320}


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


def _stretch(obj: hv.Element | hv.Overlay) -> pn.pane.HoloViews:
    """A plot that takes the width it is given (a HoloViews pane is otherwise a fixed, narrow figure)."""
    return pn.pane.HoloViews(obj, sizing_mode="stretch_width")


def capacity_pane(path: str | Path) -> pn.viewable.Viewable:
    """Capacity at each P99 TTFT SLO per policy, averaged over rows of the same policy and SLO."""
    cap = read_csv(path, CAPACITY_COLUMNS, "block capacity --csv")
    if isinstance(cap, str):
        return pn.pane.Alert(cap, alert_type="danger")
    cap = cap.assign(series=_series(cap), slo=cap["slo_ttft_p99_s"].astype(str) + " s")
    mean = cap.groupby(["series", "slo"], as_index=False, sort=False)["capacity_qps"].mean()
    bars = hv.Bars(mean, [("series", "policy"), ("slo", "P99 TTFT SLO")], ("capacity_qps", "capacity (QPS)"))
    return _stretch(bars.opts(title="Capacity (QPS at P99 TTFT SLO)", xrotation=30, tools=["hover"], **PLOT_OPTS))


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
        panes.append(_stretch(hv.Overlay(curves).opts(title=f"{metric} by policy", logy=True, **PLOT_OPTS)))
    return panes


def cdf_row(frames: dict[str, pd.DataFrame], where: str) -> pn.Row:
    """TTFT and E2E CDFs side by side, one curve per named frame (with ``ttft`` and ``e2e`` columns, seconds)."""
    cdfs = []
    for metric in ("ttft", "e2e"):
        curves = [plots.cdf(df[metric].astype(float), name) for name, df in frames.items()] or [hv.Curve([])]
        cdfs.append(_stretch(hv.Overlay(curves).opts(title=f"{metric.upper()} CDF per {where}", xlabel=f"{metric} (s)",
                                                     legend_position="bottom_right", shared_axes=False,
                                                     **PLOT_OPTS)))
    return pn.Row(*cdfs, sizing_mode="stretch_width")


def _has_sweeps(reader: Reader) -> bool:
    """Whether the database has the ``sweep_cells`` table (workspaces from before sweeps lack it)."""
    found = reader.sql("SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'sweep_cells'")
    return bool(found["n"].iloc[0])


def sweep_curves(cells: pd.DataFrame, metric: str = "p99_ttft") -> hv.Overlay:
    """``metric`` against QPS, one curve per combination of the axes that vary in the sweep, mean over seeds.
    Cells that gave up (certain to miss their bound) have no finite P99 and are left out of the curve."""
    axes = [a for a in SWEEP_AXES if cells[a].nunique() > 1] or ["policy"]
    finite = cells[~cells["gave_up"].astype(bool)].dropna(subset=[metric])
    label = finite[axes].astype(str).agg(" ".join, axis=1) if not finite.empty else pd.Series(dtype=str)
    mean = finite.assign(series=label).groupby(["series", "qps"], as_index=False)[metric].mean()
    unit = SWEEP_METRICS.get(metric, metric)
    curves = [hv.Curve((g["qps"], g[metric]), "QPS", unit, label=name).opts(tools=["hover"])
              for name, g in mean.groupby("series")] or [hv.Curve([], "QPS", unit)]
    return hv.Overlay(curves).opts(title=f"{metric} against QPS ({', '.join(axes)})", legend_position="right",
                                   **PLOT_OPTS)


def sweep_section(reader: Reader) -> list[pn.viewable.Viewable]:
    """The sweeps the store holds: a picker, the picked sweep's curves and its cells. Nothing without sweeps."""
    if not _has_sweeps(reader):
        return []
    cells = reader.sweep_cells()
    if cells.empty:
        return []
    names = list(dict.fromkeys(cells["run_id"]))
    pick = pn.widgets.Select(label="sweep", options=names, value=names[-1])

    def view(sweep: str) -> pn.Column:
        mine = cells[cells["run_id"] == sweep]
        metrics = ["p99_ttft", *(["goodput"] if mine["goodput"].notna().any() else [])]
        table = mine[list(SWEEP_TABLE_COLUMNS)].sort_values(["policy", "qps", "seed"])
        return pn.Column(*(_stretch(sweep_curves(mine, m)) for m in metrics),
                         pn.pane.DataFrame(table, index=False, max_rows=200, sizing_mode="stretch_width"),
                         sizing_mode="stretch_width")

    return [pn.pane.Markdown(f"## Sweeps ({len(names)})"), pick, pn.bind(view, pick)]


def runs_section(root: str | Path) -> list[pn.viewable.Viewable]:
    """Run folders under ``root``: their configs and summaries in a table, and CDFs of the runs picked."""
    try:
        table = run_folders(root)
    except (FileNotFoundError, ValueError) as exc:
        return [pn.pane.Alert(f"cannot open the run folders: {exc}", alert_type="danger")]
    if table.empty:
        return [pn.pane.Alert(f"no finished run folders under {root}", alert_type="warning")]
    base = Path(root)
    names = [str(Path(f).relative_to(base)) for f in table["folder"]]
    pick = pn.widgets.MultiChoice(label="runs to plot", options=names, value=names[:MAX_RUN_CDFS])

    def view(picked: list[str]) -> pn.Row:
        return cdf_row({name: open_run(base / name).requests for name in picked[:MAX_RUN_CDFS * 2]}, "run folder")

    shown = [c for c in ("folder", "run_id", "sweep", "policy", "qps", "seed", "mode", "completed", "p50_ttft",
                         "p99_ttft", "p99_e2e", "gave_up") if c in table.columns]
    return [pn.pane.Markdown(f"## Run folders ({len(names)}, {root})"),
            pn.pane.DataFrame(table[shown].assign(folder=names), index=False, max_rows=200,
                              sizing_mode="stretch_width"), pick, pn.bind(view, pick)]


def build(reader: Reader | None, capacity_csv: str | None, latency_csv: str | None,
          runs_dir: str | None = None) -> pn.template.BaseTemplate:
    main: list[pn.viewable.Viewable] = []
    if reader is not None:
        reqs = reader.latencies(source="client")
        if not reqs.empty:  # live runs (an offline-only workspace has none: its runs are folders and sweeps)
            main += [pn.pane.DataFrame(reader.summary(), index=False, sizing_mode="stretch_width"),
                     cdf_row({str(run): g for run, g in reqs.groupby("run_id")}, "run")]
        main += sweep_section(reader)
    if runs_dir:
        main += runs_section(runs_dir)
    if latency_csv:
        main += latency_panes(latency_csv)
    if capacity_csv:
        main.append(capacity_pane(capacity_csv))
    return pn.template.FastListTemplate(title="Block Workbench: results", main=main)


if __name__.startswith("bokeh"):  # run by `panel serve`; importing the module (tests) builds nothing
    p = argparse.ArgumentParser(prog="dashboards/results.py")
    p.add_argument("--db")
    p.add_argument("--collector-url")
    p.add_argument("--runs", help="a folder of run folders (<workspace>/runs, or one sweep's)")
    p.add_argument("--capacity", help="the CSV `block capacity --csv` writes")
    p.add_argument("--latency", help="the CSV `block compare --csv` writes")
    args = p.parse_args(sys.argv[1:])
    if args.db is None and args.collector_url is None and args.runs is None:
        raise SystemExit("dashboards/results.py: pass --db FILE, --collector-url URL or --runs DIR")
    reader = Reader(collector_url=args.collector_url, db_path=args.db) if args.db or args.collector_url else None
    build(reader, args.capacity, args.latency, args.runs).servable()
