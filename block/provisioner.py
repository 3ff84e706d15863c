"""Auto-provisioning: add instances before the load arrives, remove them when it has gone.

One controller decides offline (inside the simulator's cluster loop) and online (driving a live
cluster); each side only builds an ``Observation`` and carries out the decisions.

- ``reactive`` (Block's baseline): scale out when the measured P99 TTFT of the last ``window`` seconds is
  over the SLO; by the time it is, the queue is already long, and a new instance needs ``cold_start``.
- ``predictive``: forecast the arrival rate ``cold_start`` seconds ahead (level + trend), replay that
  load into every instance's predictor fork, and scale out if a typical request arriving when a new
  instance could be ready would miss ``high`` x SLO. Scale in when the forecast load on one instance
  fewer still keeps it under ``low`` x SLO.

Both have cooldowns and hysteresis (separate out/in thresholds and a hold time before scaling in), never
go beyond [min, max], never start more while an instance is still starting, and drain (never kill) the
instance whose in-flight work is predicted to finish soonest.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from block.predictor.core import Predictor
from simulator.engine import InstanceState
from simulator.workload import LengthPrior, Request

MODES = ("fixed", "reactive", "predictive")


@dataclass(frozen=True)
class ProvisionerConfig:
    mode: str = "predictive"
    slo_ttft: float = 3.0
    min_instances: int = 1
    max_instances: int = 16
    cold_start: float = 60.0
    period: float = 5.0
    cooldown_out: float = 20.0
    cooldown_in: float = 60.0
    high: float = 0.5  # scale out when the forecast tail TTFT exceeds high x SLO (reactive: the SLO itself)
    low: float = 0.25  # scale in while the forecast with fewer instances stays below low x SLO
    hold_in: float = 60.0  # the low signal must persist this long before scaling in
    window: float = 30.0  # measurement window (the arrival trend looks back four of them)
    typical_prompt: int = 200  # prompt tokens of forecast requests (output lengths come from the prior)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown provisioning mode {self.mode!r}; choose one of {MODES}")
        if self.slo_ttft <= 0:
            raise ValueError(f"the TTFT SLO must be > 0 seconds, got {self.slo_ttft}")
        if self.min_instances < 1:
            raise ValueError(f"min_instances must be >= 1, got {self.min_instances}")
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances ({self.min_instances}) > max_instances ({self.max_instances})")
        if not 0 < self.low < self.high:
            raise ValueError(f"need 0 < low ({self.low}) < high ({self.high}) for hysteresis")
        if self.period <= 0 or self.cold_start < 0:
            raise ValueError("period must be > 0 and cold_start >= 0")


@dataclass
class InstanceView:
    name: str
    state: InstanceState | None  # None when its predictor did not answer
    ready: bool = True
    draining: bool = False


@dataclass
class Observation:
    now: float
    instances: list[InstanceView]
    arrivals: Sequence[float]  # arrival times seen by the router (at least the last ``window`` seconds)
    ttfts: Sequence[tuple[float, float]]  # (first-token time, TTFT) of recent requests


@dataclass
class Decision:
    time: float
    action: str  # add | drain | hold
    instance: str | None
    reason: str
    signal: str
    value: float
    threshold: float
    instances: int


@dataclass
class Provisioner:
    config: ProvisionerConfig
    predictor: Predictor | None = None
    last_out: float = -math.inf
    last_in: float = -math.inf
    low_since: float | None = None
    decisions: list[Decision] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.config.mode == "predictive" and self.predictor is None:
            raise ValueError("predictive provisioning needs a predictor")

    @property
    def period(self) -> float:
        return self.config.period

    # ---- signals --------------------------------------------------------------------------------
    def arrival_rate(self, obs: Observation) -> tuple[float, float]:
        """(current rate, trend per second): the rate over the last window, and a least-squares slope of
        10-second counts over four windows, kept only when it exceeds Poisson noise (a noisy slope times
        a 60-second cold start would otherwise add instances for nothing)."""
        w = self.config.window
        t = np.asarray(obs.arrivals)
        rate = np.count_nonzero(t > obs.now - w) / w
        span, step = 4 * w, 10.0
        edges = np.arange(obs.now - span, obs.now + 1e-9, step)
        if t.size == 0 or t[0] > obs.now - span or len(edges) < 4:
            return rate, 0.0
        counts = np.histogram(t, bins=edges)[0] / step
        mid = (edges[:-1] + edges[1:]) / 2 - obs.now
        slope = float(np.polyfit(mid, counts, 1)[0])
        noise = math.sqrt(max(rate, 1e-9) / step) / math.sqrt(len(counts)) / (span / 2)
        return rate, slope if abs(slope) > 2 * noise else 0.0

    def measured_p99(self, obs: Observation) -> float:
        recent = [v for t, v in obs.ttfts if t > obs.now - self.config.window]
        return float(np.percentile(recent, 99)) if recent else 0.0

    def forecast_ttft(self, obs: Observation, states: list[InstanceState], rate: float,
                      horizon_factor: float = 1.0) -> float:
        """Predicted TTFT of a request arriving ``cold_start`` (times ``horizon_factor``) from now, if
        ``rate`` req/s keep arriving, spread evenly over these instance states.

        Each instance's fork receives a Poisson stream with lengths drawn from the predictor's prior (an
        even stream of average requests would hide the bursts and long answers that make the P99), and
        the worst instance is the signal: the SLO is about the tail.
        """
        assert self.predictor is not None
        cfg = self.config
        horizon = max(cfg.cold_start, cfg.period) * horizon_factor
        per = rate / max(1, len(states))
        rng = random.Random(int(obs.now * 1000))
        values = []
        for state in states:
            start = max(obs.now, state.clock)
            load, t = [], start
            while per > 0:
                t += rng.expovariate(per)
                if t >= start + horizon:
                    break
                out = self.predictor.prior.sample(rng)
                load.append(Request(-1 - len(load), t, cfg.typical_prompt, out, out))
            cand = Request(-10**9, start + horizon, cfg.typical_prompt, self.predictor.prior.median)
            values.append(self.predictor.predict(state, cand, target="ttft", now=start, timed_extra=load).ttft)
        return max(values) if values else math.inf

    def needed(self, obs: Observation, ready: list[InstanceState], starting: int, rate: float) -> tuple[int, float]:
        """Fewest instances (ready + starting + new, empty ones) whose forecast stays under high x SLO, and
        the forecast with the instances there are now."""
        cfg = self.config
        empty = InstanceState(ready[0].config, obs.now)
        now_value = self.forecast_ttft(obs, ready + [empty] * starting, rate)
        n = len(ready) + starting
        value = now_value
        while value > cfg.high * cfg.slo_ttft and n < cfg.max_instances:
            n += 1
            value = self.forecast_ttft(obs, ready + [empty] * (n - len(ready)), rate)
        return n, now_value

    # ---- decision -------------------------------------------------------------------------------
    def decide(self, obs: Observation) -> list[Decision]:
        cfg = self.config
        live = [i for i in obs.instances if not i.draining]
        starting = [i for i in live if not i.ready]
        ready = [i for i in live if i.ready]
        n = len(live)
        out: list[Decision] = []

        def record(action: str, name: str | None, reason: str, signal: str, value: float, thr: float) -> None:
            d = Decision(obs.now, action, name, reason, signal, value, thr, n)
            self.decisions.append(d)
            if action != "hold":
                out.append(d)

        if cfg.mode == "fixed":
            return out
        if n < cfg.min_instances and not starting:
            record("add", None, f"below min_instances {cfg.min_instances}", "instances", n, cfg.min_instances)
            self.last_out = obs.now
            return out
        states = [i.state for i in ready if i.state is not None]
        if cfg.mode == "reactive":
            # Block's reactive baseline: one more instance per cooldown while the measured P99 is over
            value = scale_in_value = self.measured_p99(obs)
            signal, hi, lo = "measured_p99_ttft", cfg.slo_ttft, cfg.low * cfg.slo_ttft
            want, spare = n + 1, 1
        else:
            rate, trend = self.arrival_rate(obs)
            ahead = max(rate, rate + trend * cfg.cold_start)
            if not states:
                return out
            want, value = self.needed(obs, states, len(starting), ahead)
            signal, hi, lo = "predicted_ttft_at_cold_start", cfg.high * cfg.slo_ttft, cfg.low * cfg.slo_ttft
            # scale in only if fewer instances stay fast over a longer horizon (overload builds up slowly)
            scale_in_value, spare = math.inf, 0
            while len(states) - spare > cfg.min_instances:
                v = self.forecast_ttft(obs, states[: len(states) - spare - 1], ahead, 2.0)
                if v >= cfg.low * cfg.slo_ttft:
                    break
                scale_in_value, spare = v, spare + 1
        if value > hi:
            self.low_since = None
            # draining instances still hold a GPU until their work is done: they count against the maximum
            occupied = len(obs.instances)
            add = min(want - n, cfg.max_instances - occupied)
            if add <= 0:
                record("hold", None, f"at max_instances {cfg.max_instances} ({occupied - n} draining)"
                       if occupied >= cfg.max_instances else f"{len(starting)} instance(s) starting cover it",
                       signal, value, hi)
            elif obs.now - self.last_out < cfg.cooldown_out:
                record("hold", None, "scale-out cooldown", signal, value, hi)
            else:
                for _ in range(add):
                    record("add", None, f"{signal} {value:.2f}s > {hi:.2f}s: want {want} instances", signal,
                           value, hi)
                self.last_out = obs.now
            return out
        if scale_in_value < lo and len(ready) > cfg.min_instances and not starting:
            self.low_since = obs.now if self.low_since is None else self.low_since
            if obs.now - self.low_since < cfg.hold_in:
                record("hold", None, "low, holding before scale-in", signal, scale_in_value, lo)
            elif obs.now - max(self.last_in, self.last_out) < cfg.cooldown_in:
                record("hold", None, "scale-in cooldown", signal, scale_in_value, lo)
            else:
                for victim in self._soonest_done(ready)[:spare]:
                    record("drain", victim, f"{signal} with {spare} fewer {scale_in_value:.2f}s < {lo:.2f}s",
                           signal, scale_in_value, lo)
                self.last_in = obs.now
                self.low_since = None
        else:
            self.low_since = None
        return out

    def _soonest_done(self, ready: list[InstanceView]) -> list[str]:
        """Instances by how soon their in-flight work is predicted to finish (fewest remaining tokens)."""
        prior = self.predictor.prior if self.predictor else LengthPrior.embedded()

        def remaining(inst: InstanceView) -> float:
            if inst.state is None:
                return math.inf
            return sum(prior.expected_remaining(r.generated_tokens, r.predicted_output_tokens)
                       + r.prompt_tokens + r.generated_tokens - r.computed_tokens for r in inst.state.requests)

        return [i.name for i in sorted(ready, key=remaining)]
