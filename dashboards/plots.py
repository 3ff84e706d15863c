"""HoloViews plots from store tables: pure functions of DataFrames, shared by the dashboards and notebooks."""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd

hv.extension("bokeh", logo=False)

_OPTS = {"responsive": True, "height": 260, "tools": ["hover"]}


def load_bars(samples: pd.DataFrame) -> hv.Bars:
    """Latest running and waiting requests per instance."""
    if samples.empty:
        return hv.Bars([], ["instance", "kind"], "requests").opts(title="Load per instance", **_OPTS)
    last = samples.sort_values("ts").groupby("instance").tail(1)
    rows = [(r.instance, k, getattr(r, k)) for r in last.itertuples() for k in ("running", "waiting")]
    return hv.Bars(rows, ["instance", "kind"], "requests").opts(title="Load per instance", stacked=True, **_OPTS)


def kv_curves(samples: pd.DataFrame) -> hv.Overlay:
    """KV-cache usage over time, one curve per instance."""
    curves = [hv.Curve((g["ts"] - samples["ts"].min(), g["kv_usage"]), "seconds", "KV usage", label=str(name))
              for name, g in samples.sort_values("ts").groupby("instance")] if not samples.empty else [
        hv.Curve([], "seconds", "KV usage")]
    return hv.Overlay(curves).opts(title="KV-cache usage", legend_position="right")


def latency_over_time(requests: pd.DataFrame, bucket: float = 5.0) -> hv.Overlay:
    """P50 and P99 of TTFT and E2E per time bucket (seconds)."""
    ok = requests[requests["status"] == "ok"] if not requests.empty else requests
    if ok.empty:
        return hv.Overlay([hv.Curve([], "seconds", "latency (s)")]).opts(title="Latency")
    ok = ok.astype({"arrival_ts": float, "finish_ts": float, "ttft": float, "e2e": float})
    t0 = ok["arrival_ts"].min()
    b = ((ok["finish_ts"] - t0) // bucket) * bucket
    curves = []
    for metric in ("ttft", "e2e"):
        for q in (50, 99):
            s = ok.groupby(b)[metric].quantile(q / 100)
            curves.append(hv.Curve((s.index.to_numpy(), s.to_numpy()), "seconds", "latency (s)",
                                   label=f"P{q} {metric.upper()}"))
    return hv.Overlay(curves).opts(title="Latency over time", legend_position="right")


def predicted_vs_realised(decisions: pd.DataFrame, requests: pd.DataFrame) -> hv.Scatter:
    """Predicted E2E of the chosen instance against the E2E the scheduler measured."""
    if decisions.empty or requests.empty:
        return hv.Scatter([], "predicted E2E (s)", "realised E2E (s)").opts(title="Predictions", **_OPTS)
    j = decisions.merge(requests[["request_id", "e2e"]], on="request_id").dropna(subset=["predicted_e2e", "e2e"])
    return hv.Scatter((j["predicted_e2e"], j["e2e"]), "predicted E2E (s)", "realised E2E (s)").opts(
        title="Routing decisions: predicted vs realised", size=4, **_OPTS)


def provisioning_timeline(events: pd.DataFrame) -> hv.Overlay:
    """Instances over time with the trigger signal against its threshold."""
    if events.empty:
        return hv.Overlay([hv.Curve([], "seconds", "instances")]).opts(title="Provisioning")
    e = events.sort_values("ts")
    t = e["ts"] - e["ts"].min()
    return hv.Overlay([hv.Curve((t, e["instances"]), "seconds", "instances", label="instances").opts(
        interpolation="steps-post"), hv.Scatter((t, e["value"]), "seconds", "instances", label="signal"),
        hv.Curve((t, e["threshold"]), "seconds", "instances", label="threshold")]).opts(title="Provisioning")


def cdf(values: pd.Series, label: str) -> hv.Curve:
    v = np.sort(values.dropna().to_numpy())
    return hv.Curve((v, np.arange(1, len(v) + 1) / max(1, len(v))), "seconds", "fraction", label=label)
