"""What-if prediction: fork an instance from its state, add the candidate, run the scheduler forward.

The predictor sees only what a side-car next to a live engine can know: the InstanceState (prompt
lengths, tokens generated so far, predicted lengths when the length estimator gave one), its own
calibrated timing model, and a prior over response lengths. It never reads true output lengths.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from simulator.engine import Engine, InstanceState
from simulator.timing import TimingModel
from simulator.workload import LengthPrior, Request

TARGETS = ("e2e", "ttft")


@dataclass
class Prediction:
    instance: str
    ttft: float  # seconds from the candidate's arrival to its first token
    e2e: float  # seconds from arrival to last token (nan when only TTFT was asked)
    queueing: float  # arrival to first scheduled iteration
    added_delay: float  # total extra seconds inflicted on requests already there (nan unless asked)
    kv_pressure: float  # peak fraction of KV blocks in use on the way
    preemptions: int  # preemptions the fork ran into
    state_age: float  # how old the state was when the prediction was made
    horizon_hit: bool  # True when the fork stopped at the horizon: latencies are lower bounds
    compute_ms: float = 0.0
    output_tokens: int = 0  # the response length the prediction assumed (estimate or prior median)
    # prompt tokens the candidate finds cached when the fork first schedules it: its prefix hit here as the
    # cache will be then (prefixes of requests queued ahead count once computed, evicted blocks do not)
    hit_tokens: int = 0

    @property
    def tpot(self) -> float:
        """Predicted seconds per output token after the first (what a TPOT SLO bounds)."""
        return (self.e2e - self.ttft) / max(1, self.output_tokens - 1)

    def value(self, target: str) -> float:
        if target not in TARGETS:
            raise ValueError(f"unknown prediction target {target!r}; choose one of {TARGETS}")
        return self.e2e if target == "e2e" else self.ttft

    def to_dict(self) -> dict:
        return asdict(self)

    def in_wall_seconds(self, time_scale: float) -> Prediction:
        """This prediction for an engine emulated ``time_scale`` times faster than real time, in real seconds.
        (A scheduler converts every mirrored prediction: the constructor costs a third of ``replace``.)"""
        if time_scale == 1.0:
            return self
        return self._derived(time_scale, self.instance, self.state_age / time_scale, self.compute_ms)

    def _derived(self, time_scale: float, instance: str, state_age: float, compute_ms: float) -> Prediction:
        """This prediction's durations over ``time_scale``, for another instance, state age and compute time."""
        s = time_scale
        return Prediction(instance=instance, ttft=self.ttft / s, e2e=self.e2e / s, queueing=self.queueing / s,
                          added_delay=self.added_delay / s, kv_pressure=self.kv_pressure,
                          preemptions=self.preemptions, state_age=state_age, horizon_hit=self.horizon_hit,
                          compute_ms=compute_ms, output_tokens=self.output_tokens, hit_tokens=self.hit_tokens)


@dataclass
class Predictor:
    """Library form of Block's predictor; the side-car service wraps exactly this."""

    timing: TimingModel
    prior: LengthPrior
    horizon_s: float = 300.0
    fast_path: bool = True
    label: str = "unlabelled"  # what this predictor knows (block.predictor.calibration builds the label)
    _last_targets: tuple[list, LengthPrior, dict[int, int]] | None = field(default=None, init=False, repr=False,
                                                                            compare=False)
    _on_idle: tuple[TimingModel, LengthPrior, dict[tuple, Prediction]] | None = field(
        default=None, init=False, repr=False, compare=False)

    def _targets(self, state: InstanceState) -> dict[int, int]:
        """The output length each of the state's requests runs to in a fork. A scheduler forks one state many
        times (every decision until its side-car's next message; StateView.predict may copy the state but
        keeps its request list), and these were 60% of a fork's cost: the newest list's are kept (states
        are built afresh, never edited in place, and the kept reference stops a new list reusing its id)."""
        last = self._last_targets
        if last is not None and last[0] is state.requests and last[1] is self.prior:
            return last[2]
        out = {}
        max_len = state.config.max_model_len
        for r in state.requests:
            p = r.generated_tokens + self.prior.expected_remaining(r.generated_tokens, r.predicted_output_tokens)
            out[r.id] = max(r.generated_tokens + 1, min(p, max_len - r.prompt_tokens))
        self._last_targets = (state.requests, self.prior, out)
        return out

    def _idle_key(self, state: InstanceState, candidate: Request, now: float, target: str,
                  with_impact: bool) -> tuple | None:
        """What a prediction on an idle instance depends on, or None when the instance is not idle.

        A fork with no request in it and at most one cached prefix run (a live mirror's fork holds only the
        candidate's own hit) starts the candidate at ``now`` whatever the clock says, so its latencies, KV
        pressure and impact are the same for every such state with the same configuration and candidate
        shape. At light load most decisions find idle instances, each of which was simulated afresh."""
        if state.requests or len(state.cached) > 1 or now < state.clock:
            return None
        cache: tuple = ()
        if state.cached:
            run, matched = state.cached[0], 0
            for own, cached in zip(candidate.block_hashes, run.hashes, strict=False):
                if own != cached:
                    break
                matched += 1
            cache = (run.parent, len(run.hashes), run.refs, run.evict, matched)
        return (state.config, candidate.prompt_tokens, candidate.predicted_output_tokens,
                len(candidate.block_hashes), cache, target, with_impact)

    def _idle_memo(self) -> dict[tuple, Prediction]:
        """Idle-fork predictions of this timing model and prior (a side-car's refit swaps its timing model)."""
        memo = self._on_idle
        if memo is None or memo[0] is not self.timing or memo[1] is not self.prior or len(memo[2]) > 4096:
            memo = self._on_idle = (self.timing, self.prior, {})
        return memo[2]

    def fork(self, state: InstanceState) -> Engine:
        return Engine.restore(state, self.timing, self._targets(state), fast_path=self.fast_path)

    def predict(
        self,
        state: InstanceState,
        candidate: Request,
        *,
        target: str = "e2e",
        now: float | None = None,
        instance: str = "",
        with_impact: bool = False,
        extra: Sequence[Request] = (),
        timed_extra: Sequence[Request] = (),
    ) -> Prediction:
        """Predict the candidate's latency on this instance.

        ``extra`` are requests already dispatched here but not yet visible in ``state``; they are queued
        ahead of the candidate so concurrent decisions do not all see an empty instance. ``timed_extra``
        are hypothetical future arrivals (their own arrival times, e.g. a load forecast); with them the
        candidate arrives at its own ``arrival`` and latencies are measured from there.
        """
        if target not in TARGETS:
            raise ValueError(f"unknown prediction target {target!r}; choose one of {TARGETS}")
        t0 = time.perf_counter()
        now = state.clock if now is None else now
        idle = self._idle_key(state, candidate, now, target, with_impact) if not (extra or timed_extra) else None
        memo = self._idle_memo() if idle is not None else None
        if memo is not None and (known := memo.get(idle)) is not None:
            return known._derived(1.0, instance, now - state.clock, (time.perf_counter() - t0) * 1e3)
        eng = self.fork(state)
        arrival = now  # the fork may be mid-iteration past it: the candidate then waits, as it would
        median = self.prior.median  # what a request without an estimate runs to (Engine.add_estimated)
        eng.add_all_estimated(extra, median, arrival)
        for r in sorted(timed_extra, key=lambda r: r.arrival):
            eng.advance(r.arrival)
            eng.add_estimated(r, median, max(r.arrival, arrival))
        if timed_extra:
            arrival = max(arrival, candidate.arrival)
        eng.advance(arrival)
        cand = eng.add_estimated(candidate, median, arrival)
        ttft_only = target == "ttft"
        min_free = eng.run_for(cand, first_token_only=ttft_only, limit=arrival + self.horizon_s)
        hit = cand.finish_time is None and not (ttft_only and cand.first_token is not None)
        first = cand.first_token if cand.first_token is not None else eng.now
        finish = cand.finish_time if cand.finish_time is not None else eng.now
        sched = cand.first_scheduled if cand.first_scheduled is not None else eng.now
        added = float("nan")
        if with_impact:
            added = self._added_delay(state, eng, arrival, extra)
        pred = Prediction(
            instance=instance,
            ttft=first - arrival,
            e2e=float("nan") if ttft_only and cand.finish_time is None else finish - arrival,
            queueing=sched - arrival,
            added_delay=added,
            kv_pressure=1.0 - min_free / eng.config.num_blocks,
            preemptions=eng.total_preemptions - state.total_preemptions,
            state_age=max(0.0, now - state.clock),
            horizon_hit=hit,
            compute_ms=(time.perf_counter() - t0) * 1e3,
            output_tokens=cand.target,
            hit_tokens=cand.hit_blocks * state.config.block_size,
        )
        if memo is not None:
            memo[idle] = pred
        return pred

    def _added_delay(self, state: InstanceState, with_cand: Engine, arrival: float,
                     extra: Sequence[Request]) -> float:
        """Total delay the candidate adds to the requests already there, up to when its fork stopped
        (requests still unfinished then count as finishing then, so this is a lower bound)."""
        base = self.fork(state)
        base.add_all_estimated(extra, self.prior.median, arrival)
        end = with_cand.now
        base.advance(end)
        before = {s.id: s.finish_time for s in base.finished}
        after = {s.id: s.finish_time for s in with_cand.finished}
        return float(sum(after.get(i, end) - t for i, t in before.items()))

