"""Live dashboard of a running workspace: ``panel serve dashboards/live.py --args --collector-url URL``.

Why it is built this way: a dashboard that re-runs its queries and rebuilds every plot each second costs a
core per tab and grows without bound. Here each open tab

- reads only what is new: ``Reader.tail`` per table since the last time it saw, as Arrow from the
  collector, in a worker thread so the server's event loop never waits on SQL; rows reach the store in
  batches, so it asks again from ``LAG_S`` before its last time and drops the rows it has seen;
- appends to Bokeh ``ColumnDataSource``s (``stream`` with a rollover bounded to the window): the browser
  receives only the new points and the figures are built once per tab. The page was HoloViews
  ``DynamicMap``s over ``Buffer`` streams until they were measured (``benchmarks/dashboard_load.py``):
  building the seven figures through HoloViews took 1-2 s of every tab's first paint and each update
  re-ran its element pipeline, so a tab cost 18-20 % of a core; plain Bokeh figures build in
  milliseconds and a stream is one small message;
- aggregates a time bucket once it is ``LAG_S`` old (complete), so rates do not jump as late rows land;
  idle buckets are zeros or gaps (NaN breaks a line), never a line drawn across them;
- plots everything on one wall-clock axis (UTC, shared by the time plots), and stops its callback when the
  tab closes, so an unwatched server does no work at all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial

import httpx
import numpy as np
import pandas as pd
import panel as pn
from bokeh.models import (
    ColumnDataSource,
    DataRange1d,
    DatetimeAxis,
    DatetimeTicker,
    DatetimeTickFormatter,
    FactorRange,
    Grid,
    HoverTool,
    Legend,
    LegendItem,
    Line,
    Scatter,
    Step,
)
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError

from dashboards import plots
from store.read import Reader

pn.extension(sizing_mode="stretch_width", notifications=False)

WINDOW_S = 300.0  # what the plots keep: the last five minutes
BUCKET_S = 5.0  # rates and percentiles per bucket
LAG_S = 3.0  # a bucket is drawn once this old; rows arriving later still count in the totals
ALL = "(all)"
MAX_OUTCOMES = 2000  # predicted-vs-realised points kept; MAPE and rank accuracy over the last 400
MAX_SAMPLES = 40_000  # side-car samples kept (16 instances x 4 Hz x 5 min); a Buffer drops the oldest
READ_LIMIT = 20_000  # rows one tail read returns at most; a backlog is read over several ticks
HEIGHT = 240
TOOLS = "pan,box_zoom,reset,save"


@dataclass
class Tail:
    """One table read incrementally: its high-water time and the keys seen within ``LAG_S`` of it."""

    table: str
    key: str
    since: float
    seen: dict[str, float] = field(default_factory=dict)

    def read(self, reader: Reader, run_id: str | None, policy: str | None) -> pd.DataFrame:
        df = reader.tail(self.table, self.since - LAG_S, run_id=run_id, policy=policy, limit=READ_LIMIT)
        if df.empty:
            return df
        df = df[~df[self.key].isin(list(self.seen))]
        self.seen.update(zip(df[self.key], df["t"], strict=True))
        if len(df):
            self.since = max(self.since, float(df["t"].max()))
        cutoff = self.since - LAG_S
        self.seen = {k: t for k, t in self.seen.items() if t > cutoff}
        return df


def _empty(**dtypes: str) -> pd.DataFrame:
    return pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in dtypes.items()})


# The columns of each plot's source; ``time`` is milliseconds since the epoch (UTC), Bokeh's datetime unit.
STATS = dict(time="float64", requests_s="float64", tokens_s="float64", failures_s="float64",
             fallbacks_s="float64", p50_ttft="float64", p99_ttft="float64", p50_e2e="float64", p99_e2e="float64",
             instances="float64")
SAMPLES = dict(time="float64", instance="object", running="float64", waiting="float64", kv_usage="float64",
               color="object")
OUTCOMES = dict(time="float64", predicted_e2e="float64", e2e="float64", policy="object")
EVENTS = dict(time="float64", instances="float64", action="object", signal="object", value="float64",
              threshold="float64")
LOAD = dict(instance="object", running="float64", waiting="float64")
# What each streamed source keeps: its rows roll over beyond this.
ROLLOVER = {"stats": int(WINDOW_S / BUCKET_S), "samples": MAX_SAMPLES, "outcomes": MAX_OUTCOMES, "events": 1000}
COLUMNS = {"stats": STATS, "samples": SAMPLES, "outcomes": OUTCOMES, "events": EVENTS, "load": LOAD}


def _ms(seconds: pd.Series | np.ndarray) -> np.ndarray:
    return np.asarray(seconds, dtype=float) * 1e3


def _columns(frame: pd.DataFrame, dtypes: dict[str, str]) -> dict[str, np.ndarray]:
    """A source's data: one numpy array per column, so ``stream`` appends arrays (sent as binary buffers)."""
    return {name: frame[name].to_numpy(dtype=dtype) if len(frame) else np.array([], dtype=dtype)
            for name, dtype in dtypes.items()}


@dataclass
class Update:
    """What one poll found, computed off the event loop; applied to the sources on it."""

    generation: int
    stats: pd.DataFrame
    samples: pd.DataFrame
    latest_load: pd.DataFrame
    outcomes: pd.DataFrame
    events: pd.DataFrame
    completed: int
    failed: int
    fallbacks: int
    runs: pd.DataFrame | None


class LiveView:
    """One browser tab's dashboard: its widgets, figures' data sources and incremental readers."""

    def __init__(self, reader: Reader, period_ms: int = 1000):
        self.reader = reader
        self.period_ms = period_ms
        self.generation = 0
        self.stale = False  # the selection changed: start over before the next poll
        self.busy = False
        self.closed = False
        self.ticks = 0
        self.run = pn.widgets.Select(label="run", options=[ALL], value=ALL, width=260, sizing_mode=None)
        self.policy = pn.widgets.Select(label="policy", options=[ALL], value=ALL, width=200, sizing_mode=None)
        self.status = pn.pane.Markdown("connecting to the store ...", sizing_mode="stretch_width")
        number = partial(pn.indicators.Number, font_size="28pt", title_size="11pt", sizing_mode="fixed", width=170,
                         height=80)
        self.completed = number(label="requests completed", value=0, format="{value}")
        self.failed = number(label="requests failed", value=0, format="{value}")
        self.p99 = number(label="P99 TTFT (ms)", value=0, format="{value:.0f}")
        self.fallbacks = number(label="fallback decisions", value=0, format="{value}")
        self.mape = number(label="E2E MAPE (%)", value=0, format="{value:.0f}")
        self.rank = number(label="E2E rank accuracy (%)", value=0, format="{value:.0f}")
        self.hint = pn.pane.Alert("", alert_type="info", visible=False, sizing_mode="stretch_width")
        self.sources = {name: ColumnDataSource() for name in COLUMNS}  # filled (emptied) by reset()
        self.diagonal = ColumnDataSource()
        self.load_range = FactorRange()  # the instances the load bars show
        self.colors: dict[str, str] = {}  # an instance keeps its colour for the tab's life
        self.run.param.watch(self._select, "value")
        self.policy.param.watch(self._select, "value")
        self.reset()

    def frame(self, name: str) -> pd.DataFrame:
        """What a plot holds now, as a frame."""
        return pd.DataFrame(self.sources[name].data)

    def rows(self, name: str) -> int:
        return len(self.sources[name].data["time" if name != "load" else "instance"])

    # ---- state ------------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Start over (at first, and when the run or policy changes): the window's history is read again."""
        self.stale = False
        start = time.time() - WINDOW_S
        self.tails = {name: Tail(name, key, start) for name, key in (
            ("routed", "request_id"), ("instance_samples", "event_id"), ("provisioning", "event_id"))}
        self.settled = math.floor(start / BUCKET_S) * BUCKET_S
        self.pending = {"requests": pd.DataFrame(), "decisions": pd.DataFrame(), "samples": pd.DataFrame()}
        self.totals = {"completed": 0, "failed": 0, "fallbacks": 0}
        self.recent_ttft = pd.DataFrame({"t": [], "ttft": []})
        with pn.io.unlocked():
            for name, dtypes in COLUMNS.items():
                self.sources[name].data = _columns(_empty(**dtypes), dtypes)
            self.diagonal.data = {"x": [0.0, 1.0], "y": [0.0, 1.0]}
            self.load_range.factors = []

    def _select(self, _event: object) -> None:
        """A poll may be running in a worker thread: its result is dropped, and the next tick starts over."""
        self.generation += 1
        self.stale = True

    def _filters(self) -> tuple[str | None, str | None]:
        return (None if self.run.value == ALL else self.run.value), (None if self.policy.value == ALL
                                                                       else self.policy.value)

    # ---- one poll, off the event loop ------------------------------------------------------------------------

    def poll(self, generation: int, run_id: str | None, policy: str | None, with_runs: bool) -> Update:
        """Read what is new and turn it into source updates (pure pandas; touches no widget)."""
        now = time.time()
        reqs = self.tails["routed"].read(self.reader, run_id, policy)  # with their decisions: one query
        samples = self.tails["instance_samples"].read(self.reader, run_id, None)
        decs = reqs.loc[reqs["fallback"].notna(), ["t", "fallback"]] if len(reqs) else reqs
        outcomes = reqs[(reqs["status"] == "ok") & reqs["predicted_e2e"].notna()] if len(reqs) else reqs
        events = self.tails["provisioning"].read(self.reader, run_id, None) if with_runs else _empty(**EVENTS)
        runs = self.reader.live_runs() if with_runs else None

        ok = reqs[reqs["status"] == "ok"] if len(reqs) else reqs
        self.totals["completed"] += len(ok)
        self.totals["failed"] += len(reqs) - len(ok)
        self.totals["fallbacks"] += int((decs["fallback"] != "none").sum()) if len(decs) else 0
        if len(ok):
            self.recent_ttft = pd.concat([self.recent_ttft, ok[["t", "ttft"]]], ignore_index=True)
        self.recent_ttft = self.recent_ttft[self.recent_ttft["t"] > now - WINDOW_S]

        for name, new in (("requests", reqs[["t", "status", "output_tokens", "ttft", "e2e"]] if len(reqs) else reqs),
                          ("decisions", decs[["t", "fallback"]] if len(decs) else decs),
                          ("samples", samples[["t", "instance"]] if len(samples) else samples)):
            if len(new):
                late = new["t"] < self.settled
                self.pending[name] = pd.concat([self.pending[name], new[~late]], ignore_index=True)
        upto = self.settled + math.floor((now - LAG_S - self.settled) / BUCKET_S) * BUCKET_S
        stats = _empty(**STATS)
        if upto > self.settled:
            stats = plots.bucket_stats(self.pending["requests"], self.pending["decisions"], self.settled, upto,
                                       BUCKET_S)
            stats["time"] = _ms(self.settled + BUCKET_S * np.arange(len(stats)))
            stats["instances"] = self._instances(self.pending["samples"], len(stats))
            for name, frame in self.pending.items():
                self.pending[name] = frame[frame["t"] >= upto] if len(frame) else frame
            self.settled = upto

        latest = samples.sort_values("t").groupby("instance").tail(1) if len(samples) else samples
        load = pd.DataFrame({"instance": latest["instance"].to_numpy(),
                             "running": latest["running"].fillna(0).to_numpy(dtype=float),
                             "waiting": latest["waiting"].fillna(0).to_numpy(dtype=float)}) if len(latest) \
            else _empty(**LOAD)
        if len(samples):
            samples = samples.assign(color=[self._color(i) for i in samples["instance"]])
        return Update(
            generation=generation, stats=stats,
            samples=self._frame(samples, SAMPLES, instance="instance", running="running", waiting="waiting",
                                kv_usage="kv_usage", color="color"),
            latest_load=load,
            outcomes=self._frame(outcomes, OUTCOMES, predicted_e2e="predicted_e2e", e2e="e2e", policy="policy"),
            events=self._frame(events, EVENTS, instances="instances", action="action", signal="signal",
                               value="value", threshold="threshold"),
            completed=self.totals["completed"], failed=self.totals["failed"], fallbacks=self.totals["fallbacks"],
            runs=runs)

    def _color(self, instance: str) -> str:
        return self.colors.setdefault(instance, Category10_10[len(self.colors) % len(Category10_10)])

    def _instances(self, samples: pd.DataFrame, buckets: int) -> np.ndarray:
        """Instances that reported a sample in each bucket: the fleet size as the side-cars saw it."""
        if samples.empty:
            return np.full(buckets, np.nan)
        i = np.floor((samples["t"].to_numpy(dtype=float) - self.settled) / BUCKET_S).astype(int)
        keep = (i >= 0) & (i < buckets)
        counts = pd.Series(samples["instance"].to_numpy()[keep]).groupby(i[keep]).nunique()
        out = np.full(buckets, np.nan)
        out[counts.index.to_numpy()] = counts.to_numpy()
        return out

    @staticmethod
    def _frame(df: pd.DataFrame, dtypes: dict[str, str], **columns: str) -> pd.DataFrame:
        """The source's columns from a tail read: ``time`` from ``t``, the others renamed as given."""
        if df.empty:
            return _empty(**dtypes)
        out = pd.DataFrame({"time": _ms(df["t"])})
        for name, source in columns.items():
            out[name] = df[source].to_numpy()
        return out.astype(dtypes)

    # ---- applying an update, on the event loop ----------------------------------------------------------------

    def apply(self, u: Update) -> None:
        if u.generation != self.generation or self.closed:
            return  # the selection changed while this poll ran
        # Bokeh models changed outside Panel's own parameters reach the browser only as Panel dispatches them
        # (``unlocked``); the widgets below are Panel's and must stay out of it (their visibility got lost).
        with pn.io.unlocked():
            for name, frame in (("stats", u.stats), ("samples", u.samples), ("outcomes", u.outcomes),
                                ("events", u.events)):
                if len(frame):
                    self.sources[name].stream(_columns(frame, COLUMNS[name]), rollover=ROLLOVER[name])
            if len(u.latest_load):
                self._load(u.latest_load)
            seen = self.sources["outcomes"].data
            if len(u.outcomes):  # y = x spans the points, however far off they are
                top = float(np.nanmax(np.concatenate([seen["predicted_e2e"], seen["e2e"], [1e-3]])))
                if top != self.diagonal.data["x"][1]:
                    self.diagonal.data = {"x": [0.0, top], "y": [0.0, top]}
        self.completed.value, self.failed.value, self.fallbacks.value = u.completed, u.failed, u.fallbacks
        ttft = self.recent_ttft["ttft"].dropna()
        self.p99.value = float(ttft.quantile(0.99) * 1e3) if len(ttft) else 0.0
        if len(u.outcomes):
            self.mape.value = 100 * np.nan_to_num(plots.mape(seen["predicted_e2e"], seen["e2e"]))
            self.rank.value = 100 * np.nan_to_num(plots.rank_accuracy(seen["predicted_e2e"], seen["e2e"]))
        if u.runs is not None:
            self._options(u.runs)
        self._hints()
        self.status.object = (f"Store: `{self.reader.collector_url or self.reader.db_path}` · updated "
                              f"{time.strftime('%H:%M:%S', time.gmtime())} UTC · window {WINDOW_S / 60:.0f} min, "
                              f"{BUCKET_S:g} s buckets drawn once {LAG_S:g} s old")

    def _load(self, latest: pd.DataFrame) -> None:
        """The bars of the instances just sampled; one not sampled this tick keeps its last bar."""
        known = self.frame("load")
        load = pd.concat([known[~known["instance"].isin(latest["instance"])], latest]).sort_values("instance")
        self.sources["load"].data = _columns(load, LOAD)
        factors = load["instance"].tolist()
        if factors != list(self.load_range.factors):
            self.load_range.factors = factors

    def _options(self, runs: pd.DataFrame) -> None:
        run_ids = [ALL, *reversed(runs["run_id"].drop_duplicates().tolist())]
        policies = [ALL, *sorted(runs["policy"].dropna().unique().tolist())]
        if run_ids != self.run.options:
            self.run.options = run_ids
        if policies != self.policy.options:
            self.policy.options = policies

    def _hints(self) -> None:
        missing = []
        if not self.rows("samples"):
            missing.append("no side-car samples in the last 5 minutes: is the cluster up, and does this collector "
                           "belong to it?")
        if not self.totals["completed"] + self.totals["failed"]:
            missing.append("no requests yet: send some, e.g. `block bench --url <scheduler URL>`; throughput and "
                           "latency appear as they complete")
        if not self.rows("outcomes"):
            missing.append("no predicted-vs-realised points yet: they need a predictive policy (block, block_ttft) "
                           "and completed requests")
        if not self.rows("events"):
            missing.append("no provisioning events: the instance count comes from the side-cars' samples "
                           "(markers appear when an autoscaler acts)")
        text = "**Waiting for data:**\n\n" + "\n".join(f"- {m}" for m in missing) if missing else ""
        if text != self.hint.object:
            self.hint.object, self.hint.visible = text, bool(missing)

    async def tick(self) -> None:
        """Poll in a worker thread, then update the sources; one poll at a time, none after the tab closed."""
        if self.busy or self.closed:
            return
        self.busy = True
        try:
            if self.stale:
                self.reset()
            run_id, policy = self._filters()
            with_runs = self.ticks % 5 == 0
            self.ticks += 1
            update = await asyncio.to_thread(self.poll, self.generation, run_id, policy, with_runs)
            self.apply(update)
        except (httpx.HTTPError, OSError, ValueError) as exc:  # the collector went away or refused: say so
            if not self.closed:
                what = "refused the read" if isinstance(exc, ValueError) else "unreachable"
                self.status.object = f"**Store {what}**, retrying every {self.period_ms / 1000:g} s: {exc}"[:400]
        finally:
            self.busy = False

    def close(self) -> None:
        self.closed = True
        self.reader.close()

    # ---- the page ---------------------------------------------------------------------------------------------

    def figures(self) -> tuple[list, object, object]:
        """The time plots (one shared wall-clock range), the load bars, and predicted vs realised."""
        stats, samples = self.sources["stats"], self.sources["samples"]
        # One range, ticker and formatter for every time plot: one wall-clock axis, and a page of a third fewer
        # models (each datetime axis brings a dozen tickers; a tab's first paint waits on building them all).
        shared_time, ticker = DataRange1d(), DatetimeTicker()
        formatter = DatetimeTickFormatter(seconds="%H:%M:%S", minsec="%H:%M:%S", minutes="%H:%M", hourmin="%H:%M",
                                          hours="%H:%M")
        when = ("time", "@time{%H:%M:%S}")

        def timeplot(title: str, ylabel: str, tooltips: list[tuple[str, str]]):
            fig = figure(title=title, x_axis_type=None, x_range=shared_time, height=HEIGHT,
                         sizing_mode="stretch_width", tools=TOOLS, y_axis_label=ylabel,
                         min_border_left=70)  # the same frame width in every time plot: their x axes line up
            fig.add_layout(DatetimeAxis(ticker=ticker, formatter=formatter, axis_label="time (UTC)"), "below")
            fig.add_layout(Grid(dimension=0, ticker=ticker))
            fig.add_tools(HoverTool(tooltips=[when, *tooltips], formatters={"@time": "datetime"}, mode="vline"))
            return fig

        def draw(fig, source: ColumnDataSource, glyph):
            """A renderer whose selection and muted looks BokehJS derives (``auto``): three models fewer each."""
            return fig.add_glyph(source, glyph)

        def legend(fig, items: list, where: str = "above") -> None:
            """Outside the frame (above a time plot, so every frame is as wide): it never covers the data."""
            fig.add_layout(Legend(items=items, click_policy="hide", location="top_right", margin=0, padding=2,
                                  label_height=12, glyph_height=12, label_text_font_size="9pt", border_line_alpha=0,
                                  orientation="horizontal" if where == "above" else "vertical"), where)

        requests = timeplot("Request throughput", "requests/s", [("completed/s", "@requests_s{0.0}"),
                                                                 ("failed/s", "@failures_s{0.0}"),
                                                                 ("fallbacks/s", "@fallbacks_s{0.0}")])
        legend(requests, [(label, [draw(requests, stats, Line(x="time", y=column, line_color=color, line_width=2))])
                          for label, column, color in (("completed", "requests_s", Category10_10[0]),
                                                       ("failed", "failures_s", "red"),
                                                       ("fallback decisions", "fallbacks_s", "orange"))])
        tokens = timeplot("Token throughput", "output tokens/s", [("tokens/s", "@tokens_s{0}")])
        legend(tokens, [("output tokens/s", [draw(tokens, stats, Line(x="time", y="tokens_s", line_width=2,
                                                                       line_color=Category10_10[0]))])])
        latency = timeplot("Latency per bucket", "seconds", [("P50 TTFT", "@p50_ttft{0.000}"),
                                                            ("P99 TTFT", "@p99_ttft{0.000}"),
                                                            ("P50 E2E", "@p50_e2e{0.00}"),
                                                            ("P99 E2E", "@p99_e2e{0.00}")])
        legend(latency, [(label, [draw(latency, stats, Line(x="time", y=column, line_color=Category10_10[i],
                                                            line_width=2, line_dash="dashed" if "e2e" in column
                                                            else "solid"))])
                         for i, (label, column) in enumerate((("P50 TTFT", "p50_ttft"), ("P99 TTFT", "p99_ttft"),
                                                              ("P50 E2E", "p50_e2e"), ("P99 E2E", "p99_e2e")))])
        kv = timeplot("KV-cache usage per instance", "KV usage", [("instance", "@instance"),
                                                                  ("KV usage", "@kv_usage{0.00}")])
        kv.y_range.start, kv.y_range.end = 0, 1.05
        dots = draw(kv, samples, Scatter(x="time", y="kv_usage", fill_color="color", line_color="color", size=3))
        legend(kv, [LegendItem(label={"field": "instance"}, renderers=[dots])])
        fleet = timeplot("Instances", "instances", [("reporting", "@instances"), ("action", "@action"),
                                                    ("signal", "@signal @value vs @threshold")])
        legend(fleet, [("reporting", [draw(fleet, stats, Step(x="time", y="instances", mode="after",
                                                              line_color="black", line_width=2))]),
                       ("provisioning", [draw(fleet, self.sources["events"],
                                              Scatter(x="time", y="instances", marker="triangle", size=10,
                                                      fill_color="purple", line_color="purple"))])])

        load = figure(title="Load per instance (latest sample)", x_range=self.load_range, height=HEIGHT,
                      sizing_mode="stretch_width", tools="save", y_axis_label="requests",
                      tooltips=[("instance", "@instance"), ("running", "@running"), ("waiting", "@waiting")])
        bars = load.vbar_stack(["running", "waiting"], x="instance", source=self.sources["load"], width=0.8,
                               color=[Category10_10[0], Category10_10[1]])
        legend(load, [("running", [bars[0]]), ("waiting", [bars[1]])], "right")
        predicted = figure(title="Predicted vs realised E2E (dashed: y = x)", height=HEIGHT,
                           sizing_mode="stretch_width", tools=TOOLS, x_axis_label="predicted E2E (s)",
                           y_axis_label="realised E2E (s)",
                           tooltips=[("predicted", "@predicted_e2e{0.00} s"), ("realised", "@e2e{0.00} s"),
                                     ("policy", "@policy")])
        draw(predicted, self.sources["outcomes"], Scatter(x="predicted_e2e", y="e2e", size=4, fill_alpha=0.5,
                                                          fill_color=Category10_10[0], line_alpha=0.5))
        draw(predicted, self.diagonal, Line(x="x", y="y", line_color="grey", line_dash="dashed"))
        return [requests, tokens, latency, kv, fleet], load, predicted

    def page(self) -> pn.Column:
        timeline, load, predicted = self.figures()
        stretch = {"sizing_mode": "stretch_width"}
        return pn.Column(
            pn.pane.Markdown("## Block Workbench: live", **stretch),
            pn.Row(self.run, self.policy, self.status, **stretch),
            pn.FlexBox(self.completed, self.failed, self.p99, self.fallbacks, self.mape, self.rank, **stretch),
            self.hint,
            pn.Row(pn.pane.Bokeh(load, **stretch), pn.pane.Bokeh(predicted, **stretch), **stretch),
            *(pn.pane.Bokeh(fig, **stretch) for fig in timeline),
            **stretch)


def _closed_tabs_are_not_errors(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """A tab that closes while the server writes an update to it leaves Tornado's write task failed with
    WebSocketClosedError, which asyncio would log as a traceback nobody can act on; every other error is
    still logged."""
    if not isinstance(context.get("exception"), WebSocketClosedError | StreamClosedError):
        loop.default_exception_handler(context)


def build(reader: Reader, period_ms: int = 1000) -> pn.Column:
    """The page of one session; its polling starts once the page is shown and stops when the tab closes."""
    with contextlib.suppress(RuntimeError):  # no running loop: not served, nothing to quieten
        asyncio.get_running_loop().set_exception_handler(_closed_tabs_are_not_errors)
    view = LiveView(reader, period_ms)
    page = view.page()

    def start() -> None:
        callback = pn.state.add_periodic_callback(view.tick, period=period_ms)

        def stop(_context: object) -> None:
            callback.stop()
            view.close()

        pn.state.on_session_destroyed(stop)
        pn.state.execute(view.tick)

    pn.state.onload(start)
    return page


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dashboards/live.py")
    p.add_argument("--collector-url", help="a running workspace's collector")
    p.add_argument("--db", help="or a workspace's DuckDB file (when no collector holds it)")
    p.add_argument("--period-ms", type=int, default=1000, help="refresh period (default: %(default)s)")
    return p.parse_args(sys.argv[1:])


if __name__.startswith("bokeh"):  # run by `panel serve`; importing the module (tests) builds nothing
    args = _args()
    if args.collector_url is None and args.db is None:
        raise SystemExit("dashboards/live.py: pass --collector-url URL (live) or --db FILE")
    build(Reader(collector_url=args.collector_url, db_path=args.db), args.period_ms).servable(
        title="Block Workbench: live")
