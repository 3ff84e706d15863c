"""HoloViews plots and the small aggregations behind them, shared by the dashboards and the notebooks.

Pure functions of DataFrames: the live dashboard feeds their inputs through HoloViews streams, the notebooks
call them on what a study wrote to the store. Every time axis is the wall clock (``to_time``), so plots of
different tables line up; an idle stretch is a gap (NaN), never a line drawn across it.

BokehJS and Panel's stylesheets are inline (``inline=True``, ``pn.config.inline``): a notebook's saved output
and a served page render with no network, never from cdn.bokeh.org or cdn.holoviz.org.
"""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
import panel as pn
from bokeh.models import UIElement
from panel.io.notebook import patch_inline_stylesheets
from panel.viewable import Viewable


def _inline_stylesheets(_viewable: Viewable, root: object) -> None:
    """Panel inlines its CDN stylesheets only for what it displays itself; HoloViews renders a notebook
    figure past that step, so this hook does it for every render. A served page's stylesheets are local
    URLs, which it leaves alone."""
    for model in root.select({"type": UIElement}):  # type: ignore[attr-defined]
        patch_inline_stylesheets(model)


pn.config.inline = True
Viewable._preprocessing_hooks.append(_inline_stylesheets)
hv.extension("bokeh", logo=False, inline=True)

HEIGHT = 280
OPTS = {"responsive": True, "height": HEIGHT, "tools": ["hover"], "show_grid": True}
TIME = hv.Dimension("time", label="time (UTC)")
LEGEND = {"legend_position": "right"}  # outside the frame: a legend never covers the data


def to_time(seconds: pd.Series | np.ndarray) -> pd.Series:
    """Epoch seconds as wall-clock timestamps (UTC, naive), the one x axis of every live plot."""
    return pd.Series(pd.to_datetime(np.asarray(seconds, dtype=float), unit="s"))


# ---- aggregations -------------------------------------------------------------------------------------------

def bucket_stats(requests: pd.DataFrame, decisions: pd.DataFrame, start: float, end: float,
                 width: float = 1.0) -> pd.DataFrame:
    """Per bucket ``[start + k*width, start + (k+1)*width)`` up to ``end``: completed requests/s, output
    tokens/s, failed requests/s, fallback decisions/s (any predictor missing) and TTFT/E2E percentiles.

    Every bucket is present, empty ones with zero rates and NaN latencies, so a throughput curve drops to
    zero in an idle stretch and a latency curve breaks instead of bridging it. ``requests`` has columns
    t, status, output_tokens, ttft, e2e; ``decisions`` has t, fallback.
    """
    n = max(0, round((end - start) / width))  # counted, not np.arange'd: epoch floats have no 1e-9 to spare
    edges = start + width * np.arange(n + 1)

    def idx(t: pd.Series) -> np.ndarray:
        return np.floor((t.to_numpy(dtype=float) - start) / width).astype(int)

    ok = requests[requests["status"] == "ok"] if len(requests) else requests
    failed = requests[requests["status"] != "ok"] if len(requests) else requests
    fallbacks = decisions[decisions["fallback"] != "none"] if len(decisions) else decisions
    out = pd.DataFrame({"time": to_time(edges[:-1])})
    for name, frame, weight in (("requests_s", ok, None), ("tokens_s", ok, "output_tokens"),
                                ("failures_s", failed, None), ("fallbacks_s", fallbacks, None)):
        i = idx(frame["t"]) if len(frame) else np.array([], dtype=int)
        keep = (i >= 0) & (i < n)
        w = frame[weight].to_numpy(dtype=float)[keep] if weight and len(frame) else None
        out[name] = np.bincount(i[keep], weights=w, minlength=n)[:n] / width
    i = idx(ok["t"]) if len(ok) else np.array([], dtype=int)
    keep = (i >= 0) & (i < n)
    groups = ok[keep].groupby(i[keep]) if len(ok) else None
    for metric in ("ttft", "e2e"):
        for q in (50, 99):
            col = np.full(n, np.nan)
            if groups is not None:
                s = groups[metric].quantile(q / 100)
                col[s.index.to_numpy()] = s.to_numpy()
            out[f"p{q}_{metric}"] = col
    return out


def mape(predicted: np.ndarray, realised: np.ndarray) -> float:
    """Mean absolute percentage error of predictions (NaN without data); realised values near 0 are skipped."""
    p, r = np.asarray(predicted, dtype=float), np.asarray(realised, dtype=float)
    keep = np.isfinite(p) & np.isfinite(r) & (r > 1e-3)
    return float(np.mean(np.abs(p[keep] - r[keep]) / r[keep])) if keep.any() else float("nan")


def rank_accuracy(predicted: np.ndarray, realised: np.ndarray, max_pairs_of: int = 400) -> float:
    """Of two requests, how often the one predicted to take longer did take longer: the fraction of
    concordant pairs (ties skipped) among the last ``max_pairs_of`` requests. 0.5 is a coin, 1 a perfect
    ordering, whatever the predictions' scale: what a router that compares predictions needs."""
    p, r = np.asarray(predicted, dtype=float), np.asarray(realised, dtype=float)
    keep = np.isfinite(p) & np.isfinite(r)
    p, r = p[keep][-max_pairs_of:], r[keep][-max_pairs_of:]
    dp, dr = np.sign(p[:, None] - p[None, :]), np.sign(r[:, None] - r[None, :])
    both = (dp != 0) & (dr != 0)
    return float((dp == dr)[both].mean()) if both.any() else float("nan")


def with_gaps(frame: pd.DataFrame, by: str, gap_s: float) -> pd.DataFrame:
    """Rows of ``frame`` (columns ``t`` and ``by``) with a NaN row inserted per series wherever it was silent
    for more than ``gap_s``: a line plot then breaks there instead of joining the two sides."""
    if frame.empty:
        return frame
    frame = frame.sort_values([by, "t"])
    breaks = (frame["t"].diff() > gap_s) & (frame[by] == frame[by].shift())
    if not breaks.any():
        return frame.sort_values("t")
    holes = frame[breaks].copy()
    holes["t"] -= gap_s / 2
    value_columns = [c for c in frame.columns if c not in (by, "t")]
    holes[value_columns] = np.nan
    return pd.concat([frame, holes]).sort_values("t")


# ---- plots (notebooks and the results dashboard) -------------------------------------------------------------

def load_bars(samples: pd.DataFrame) -> hv.Bars:
    """Latest running and waiting requests per instance, stacked."""
    if samples.empty:
        return hv.Bars([], ["instance", "kind"], "requests").opts(title="Load per instance", **OPTS)
    last = samples.sort_values("ts").groupby("instance").tail(1)
    rows = [(r.instance, k, getattr(r, k)) for r in last.itertuples() for k in ("running", "waiting")]
    return hv.Bars(rows, ["instance", "kind"], "requests").opts(title="Load per instance", stacked=True, **OPTS)


def provisioning_timeline(events: pd.DataFrame, name: str = "Provisioning") -> hv.Layout:
    """Instances over time (a step line), and under it the trigger signal against its threshold, each on an
    axis labelled with what it counts; the two share the time axis (seconds since the first event)."""
    if events.empty:
        return hv.Layout([hv.Curve([], "seconds", "instances").opts(title=f"{name}: no events", **OPTS)])
    e = events.sort_values("ts")
    t = (e["ts"] - e["ts"].min()).to_numpy()
    signal = str(e["signal"].iloc[0]) if "signal" in e and e["signal"].nunique() == 1 else "signal"
    seconds = hv.Dimension("seconds", label="seconds since the first event")
    instances = hv.Curve((t, e["instances"]), seconds, "instances", label="instances").opts(
        interpolation="steps-post", title=f"{name}: instances", color="black", **OPTS)
    value = hv.Dimension("value", label=signal)
    trigger = (hv.Scatter((t, e["value"]), seconds, value, label=f"{signal} at the decision").opts(size=6)
               * hv.Curve((t, e["threshold"]), seconds, value, label="threshold").opts(line_dash="dashed"))
    return (instances + trigger.opts(title=f"{name}: {signal} against its threshold", **OPTS, **LEGEND)).cols(1)


def predicted_vs_true(predicted: pd.Series, realised: pd.Series, what: str = "E2E (s)",
                      title: str = "") -> hv.Overlay:
    """Each prediction against what was measured, with the y = x line a perfect predictor sits on; the title
    carries the MAPE and the rank accuracy (see ``mape`` and ``rank_accuracy``)."""
    p, r = np.asarray(predicted, dtype=float), np.asarray(realised, dtype=float)
    top = float(np.nanmax(np.concatenate([p, r, [1e-3]]))) if len(p) else 1.0
    score = f"MAPE {mape(p, r):.0%}, rank accuracy {rank_accuracy(p, r):.0%}" if len(p) else "no data"
    return (hv.Scatter((p, r), f"predicted {what}", f"measured {what}").opts(size=4, alpha=0.5)
            * hv.Curve(([0, top], [0, top]), f"predicted {what}", f"measured {what}", label="y = x").opts(
                color="grey", line_dash="dashed")).opts(title=f"{title}{': ' if title else ''}{score}", **OPTS)


def heatmap(frame: pd.DataFrame, x: str, y: str, value: str, title: str, *,
            diverging: float | None = None) -> hv.HeatMap:
    """A grid of ``value`` over two axes, with the numbers written in the cells. ``diverging``: a signed value
    (a gain) on a red-blue scale centred on zero and saturating at +-``diverging``, so that a loss never looks
    like a small win and one collapse does not wash out every other colour."""
    colours = ({"cmap": "RdBu", "clim": (-diverging, diverging)} if diverging is not None
               else {"cmap": "viridis"})
    grid = hv.HeatMap(frame, [x, y], value).opts(title=title, colorbar=True, **colours, **OPTS)
    return grid * hv.Labels(grid).opts(text_color="black" if diverging is not None else "white",
                                       text_font_size="10pt")


def cdf(values: pd.Series, label: str) -> hv.Curve:
    v = np.sort(values.dropna().to_numpy())
    return hv.Curve((v, np.arange(1, len(v) + 1) / max(1, len(v))), "seconds", "fraction", label=label)
