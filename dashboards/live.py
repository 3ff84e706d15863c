"""Live dashboard of a running workspace: ``panel serve dashboards/live.py --args --collector-url URL``.

Why it is built this way: a dashboard that re-runs its queries and rebuilds every plot each second costs a
core per tab and grows without bound. Here each open tab

- reads only what is new: ``Reader.tail`` per table since the last time it saw, as Arrow from the
  collector, in a worker thread so the server's event loop never waits on SQL; rows reach the store in
  batches, so it asks again from ``LAG_S`` before its last time and drops the rows it has seen;
- appends to HoloViews streams (``Buffer`` bounded to the window, ``Pipe`` for the latest-load bars): the
  browser receives the new points, the plots are never rebuilt; points are batched per plot for a few
  ticks (``FLUSH_EVERY``), so a tab costs a few percent of a core;
- aggregates a time bucket once it is ``LAG_S`` old (complete), so rates do not jump as late rows land;
  idle buckets are zeros or gaps, never a line drawn across them;
- plots everything on one wall-clock axis (UTC), and stops its callback when the tab closes, so an
  unwatched server does no work at all.
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

import holoviews as hv
import httpx
import numpy as np
import pandas as pd
import panel as pn
from holoviews.streams import Buffer, Pipe
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
# Every how many ticks new points go to each plot: a HoloViews update costs milliseconds per plot, so the
# figures refresh every few seconds while the numbers above them change every tick (a bucket's stats are
# complete only once per BUCKET_S anyway).
# (every, offset): the plots are flushed on different ticks, so no tick does all the work.
FLUSH_EVERY = {"stats": (1, 0), "events": (1, 0), "samples": (5, 1), "outcomes": (5, 2), "load": (5, 3)}


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


STATS = dict(time="datetime64[ns]", requests_s="float64", tokens_s="float64", failures_s="float64",
             fallbacks_s="float64", p50_ttft="float64", p99_ttft="float64", p50_e2e="float64", p99_e2e="float64",
             instances="float64")
SAMPLES = dict(time="datetime64[ns]", instance="object", running="float64", waiting="float64", kv_usage="float64")
OUTCOMES = dict(time="datetime64[ns]", predicted_e2e="float64", e2e="float64", policy="object")
EVENTS = dict(time="datetime64[ns]", instances="float64", action="object", signal="object", value="float64",
              threshold="float64")


@dataclass
class Update:
    """What one poll found, computed off the event loop; applied to the streams on it."""

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
    """One browser tab's dashboard: its widgets, streams and incremental readers."""

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
        self.streams = {
            "stats": Buffer(_empty(**STATS), length=int(WINDOW_S / BUCKET_S), index=False),
            "samples": Buffer(_empty(**SAMPLES), length=MAX_SAMPLES, index=False),
            "outcomes": Buffer(_empty(**OUTCOMES), length=MAX_OUTCOMES, index=False),
            "events": Buffer(_empty(**EVENTS), length=1000, index=False),
        }
        self.load = Pipe(data=pd.DataFrame({"instance": [], "kind": [], "requests": []}))
        self.run.param.watch(self._select, "value")
        self.policy.param.watch(self._select, "value")
        self.reset()

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
        self.applied = 0
        self.unsent: dict[str, list[pd.DataFrame]] = {name: [] for name in FLUSH_EVERY}
        for stream in self.streams.values():
            stream.clear()
        self.load.send(pd.DataFrame({"instance": [], "kind": [], "requests": []}))

    def _select(self, _event: object) -> None:
        """A poll may be running in a worker thread: its result is dropped, and the next tick starts over."""
        self.generation += 1
        self.stale = True

    def _filters(self) -> tuple[str | None, str | None]:
        return (None if self.run.value == ALL else self.run.value), (None if self.policy.value == ALL
                                                                       else self.policy.value)

    # ---- one poll, off the event loop ------------------------------------------------------------------------

    def poll(self, generation: int, run_id: str | None, policy: str | None, with_runs: bool) -> Update:
        """Read what is new and turn it into stream updates (pure pandas; touches no widget)."""
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
            stats["instances"] = self._instances(self.pending["samples"], len(stats))
            for name, frame in self.pending.items():
                self.pending[name] = frame[frame["t"] >= upto] if len(frame) else frame
            self.settled = upto

        latest = samples.sort_values("t").groupby("instance").tail(1) if len(samples) else samples
        load = pd.DataFrame([(r.instance, kind, float(getattr(r, kind) or 0)) for r in latest.itertuples()
                             for kind in ("running", "waiting")], columns=["instance", "kind", "requests"])
        return Update(
            generation=generation, stats=stats,
            samples=self._frame(samples, SAMPLES, instance="instance", running="running", waiting="waiting",
                                kv_usage="kv_usage"),
            latest_load=load,
            outcomes=self._frame(outcomes, OUTCOMES, predicted_e2e="predicted_e2e", e2e="e2e", policy="policy"),
            events=self._frame(events, EVENTS, instances="instances", action="action", signal="signal",
                               value="value", threshold="threshold"),
            completed=self.totals["completed"], failed=self.totals["failed"], fallbacks=self.totals["fallbacks"],
            runs=runs)

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
        """The stream's columns from a tail read: ``time`` from ``t``, the others renamed as given."""
        if df.empty:
            return _empty(**dtypes)
        out = pd.DataFrame({"time": plots.to_time(df["t"]).to_numpy()})
        for name, source in columns.items():
            out[name] = df[source].to_numpy()
        return out.astype(dtypes)

    # ---- applying an update, on the event loop ----------------------------------------------------------------

    def apply(self, u: Update) -> None:
        if u.generation != self.generation or self.closed:
            return  # the selection changed while this poll ran
        for name, frame in (("stats", u.stats), ("samples", u.samples), ("outcomes", u.outcomes),
                            ("events", u.events), ("load", u.latest_load)):
            if len(frame):
                self.unsent[name].append(frame)
        flushed = set()
        for name, (every, offset) in FLUSH_EVERY.items():
            frames = self.unsent[name]
            if frames and (self.applied == 0 or self.applied % every == offset):
                flushed.add(name)
                if name == "load":
                    self.load.send(frames[-1])  # the latest sample of each instance is all the bars show
                else:
                    self.streams[name].send(pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0])
                self.unsent[name] = []
        self.applied += 1
        self.completed.value, self.failed.value, self.fallbacks.value = u.completed, u.failed, u.fallbacks
        ttft = self.recent_ttft["ttft"].dropna()
        self.p99.value = float(ttft.quantile(0.99) * 1e3) if len(ttft) else 0.0
        seen = self.streams["outcomes"].data
        if "outcomes" in flushed:
            self.mape.value = 100 * np.nan_to_num(plots.mape(seen["predicted_e2e"], seen["e2e"]))
            self.rank.value = 100 * np.nan_to_num(plots.rank_accuracy(seen["predicted_e2e"], seen["e2e"]))
        if u.runs is not None:
            self._options(u.runs)
        self._hints()
        self.status.object = (f"Store: `{self.reader.collector_url or self.reader.db_path}` · updated "
                              f"{time.strftime('%H:%M:%S', time.gmtime())} UTC · window {WINDOW_S / 60:.0f} min, "
                              f"{BUCKET_S:g} s buckets drawn once {LAG_S:g} s old")

    def _options(self, runs: pd.DataFrame) -> None:
        run_ids = [ALL, *reversed(runs["run_id"].drop_duplicates().tolist())]
        policies = [ALL, *sorted(runs["policy"].dropna().unique().tolist())]
        if run_ids != self.run.options:
            self.run.options = run_ids
        if policies != self.policy.options:
            self.policy.options = policies

    def _hints(self) -> None:
        missing = []
        if not len(self.streams["samples"].data):
            missing.append("no side-car samples in the last 5 minutes: is the cluster up, and does this collector "
                           "belong to it?")
        if not self.totals["completed"] + self.totals["failed"]:
            missing.append("no requests yet: send some, e.g. `block bench --url <scheduler URL>`; throughput and "
                           "latency appear as they complete")
        if not len(self.streams["outcomes"].data):
            missing.append("no predicted-vs-realised points yet: they need a predictive policy (block, block_ttft) "
                           "and completed requests")
        if not len(self.streams["events"].data):
            missing.append("no provisioning events: the instance count comes from the side-cars' samples "
                           "(markers appear when an autoscaler acts)")
        text = "**Waiting for data:**\n\n" + "\n".join(f"- {m}" for m in missing) if missing else ""
        if text != self.hint.object:
            self.hint.object, self.hint.visible = text, bool(missing)

    async def tick(self) -> None:
        """Poll in a worker thread, then update the streams; one poll at a time, none after the tab closed."""
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

    def plots(self) -> tuple[hv.Layout, hv.DynamicMap, hv.DynamicMap]:
        """The time plots (one layout, so their wall-clock axes are linked), the load bars, predictions."""
        opts = {**plots.OPTS, "height": 240}

        def curve(stream: Buffer, column: str, label: str, **style: object) -> hv.DynamicMap:
            return hv.DynamicMap(partial(hv.Curve, kdims=[plots.TIME], vdims=[column], label=label),
                                 streams=[stream]).opts(**style)

        stats = self.streams["stats"]
        rate = hv.Dimension("requests_s", label="requests/s")
        requests = (curve(stats, "requests_s", "completed")
                    * curve(stats, "failures_s", "failed", color="red")
                    * curve(stats, "fallbacks_s", "fallback decisions", color="orange")).opts(
            title="Request throughput", ylabel=rate.label, **opts, **plots.LEGEND)
        tokens = curve(stats, "tokens_s", "output tokens/s").opts(title="Token throughput", ylabel="output tokens/s",
                                                                  **opts)
        latency = (curve(stats, "p50_ttft", "P50 TTFT") * curve(stats, "p99_ttft", "P99 TTFT")
                   * curve(stats, "p50_e2e", "P50 E2E", line_dash="dashed")
                   * curve(stats, "p99_e2e", "P99 E2E", line_dash="dashed")).opts(
            title="Latency per bucket", ylabel="seconds", **opts, **plots.LEGEND)
        kv = hv.DynamicMap(partial(hv.Scatter, kdims=[plots.TIME], vdims=["kv_usage", "instance"]),
                           streams=[self.streams["samples"]]).opts(
            color="instance", cmap="Category10", size=3, ylim=(0, 1.05), title="KV-cache usage per instance",
            ylabel="KV usage", **opts, **plots.LEGEND)
        fleet = (curve(stats, "instances", "reporting", interpolation="steps-post", color="black")
                 * hv.DynamicMap(partial(hv.Scatter, kdims=[plots.TIME], vdims=["instances", "action", "signal",
                                                                              "value", "threshold"],
                                         label="provisioning"),
                                 streams=[self.streams["events"]]).opts(size=8, color="purple", marker="triangle")
                 ).opts(title="Instances", ylabel="instances", **opts, **plots.LEGEND)
        timeline = (requests + tokens + latency + kv + fleet).cols(1).opts(shared_axes=True)
        load = hv.DynamicMap(_load_bars, streams=[self.load]).opts(title="Load per instance (latest sample)", **opts)
        outcome = hv.DynamicMap(partial(hv.Scatter, kdims=["predicted_e2e"], vdims=["e2e", "policy"]),
                                streams=[self.streams["outcomes"]]).opts(size=4, alpha=0.5)
        diagonal = hv.DynamicMap(_diagonal, streams=[self.streams["outcomes"]]).opts(color="grey", line_dash="dashed")
        predicted = (outcome * diagonal).opts(title="Predicted vs realised E2E (dashed: y = x)",
                                              xlabel="predicted E2E (s)", ylabel="realised E2E (s)", **opts)
        return timeline, load, predicted

    def page(self) -> pn.Column:
        timeline, load, predicted = self.plots()
        stretch = {"sizing_mode": "stretch_width"}
        return pn.Column(
            pn.pane.Markdown("## Block Workbench: live", **stretch),
            pn.Row(self.run, self.policy, self.status, **stretch),
            pn.FlexBox(self.completed, self.failed, self.p99, self.fallbacks, self.mape, self.rank, **stretch),
            self.hint,
            pn.Row(pn.pane.HoloViews(load, **stretch), pn.pane.HoloViews(predicted, **stretch), **stretch),
            pn.pane.HoloViews(timeline, **stretch),
            **stretch)


def _diagonal(data: pd.DataFrame) -> hv.Curve:
    """y = x from 0 to the largest value shown: the axes always hold both the points and the line a perfect
    predictor's points would sit on, however far off the predictions are."""
    top = float(np.nanmax(data[["predicted_e2e", "e2e"]].to_numpy())) if len(data) else 1.0
    return hv.Curve(([0.0, top], [0.0, top]), "predicted_e2e", "e2e", label="y = x")


def _load_bars(data: pd.DataFrame) -> hv.Bars:
    """Running and waiting requests per instance, stacked (HoloViews cannot stack no bars at all)."""
    return hv.Bars(data, ["instance", "kind"], "requests").opts(stacked=len(data) > 0)


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
