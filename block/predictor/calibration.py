"""One way to build a predictor, offline and live, and the online calibration of its timing model.

A predictor may only know what a deployment can measure: step times its engine reported (then the timing
model is fitted on them), or else the roofline of its GPU and model (labelled uncalibrated). The offline
studies feed the factory step samples from a noisy warm-up run of the world, the side-car feeds it the
step times it can observe as they arrive; the result and its honesty label are the same kind of thing
in both bodies, and the label travels with every prediction and decision row.

A live engine shows its step times in one of two ways. The emulator reports them exactly (``/steps``).
A real vLLM reports none, but every engine streams each request's tokens at the end of the iteration
that produced them, and the side-car proxies those streams: ``StreamSteps`` rebuilds iterations from the
token timestamps (the tokens of one iteration arrive together; the gap between two bursts is the second
iteration's duration) and keeps only the bursts whose batch it can name exactly. That one path runs for
every engine, so the same code calibrates against the emulator and against vLLM; on the emulator it is
also checked against the exact step times (``stream_error_pct``). vLLM's own inter-token-latency
histogram is compared with the gaps the side-car saw (``itl_gap_pct``): a side-car whose stream view
lags its engine says so.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from block.predictor.core import Predictor
from simulator.engine import EngineConfig
from simulator.timing import Calibrated, StepSample, TimingModel
from simulator.workload import LengthPrior

MIN_SAMPLES = 50  # fewer step times than this do not pin down a five-coefficient model
HOLDOUT_EVERY = 5  # every fifth sample is kept out of the fit and scores it
EARLY_RETRIES = 5  # failed first fits retried after MIN_SAMPLES more steps, before falling back to refit_every
MAX_TRACKED = 1024  # requests whose last token time a stream view remembers


def fit_error_pct(model: TimingModel, samples: Sequence[StepSample]) -> float:
    """Mean absolute percentage error of a timing model on step samples."""
    measured = np.array([s.seconds for s in samples])
    fitted = np.array([model.step_time(s.prefill, s.num_decode, s.decode_context_sum) for s in samples])
    ok = measured > 0
    return float(np.mean(np.abs(fitted[ok] - measured[ok]) / measured[ok]) * 100) if ok.any() else float("nan")


def without_outliers(samples: Sequence[StepSample], cut: float = 4.0) -> list[StepSample]:
    """The samples a first fit explains to within ``cut`` robust deviations of relative error.

    Observed step times have outliers a linear model must not chase: an iteration stretched by a
    stalled proxy, or one holding a prefill chunk no token showed. One least-squares fit, then the
    samples whose relative residual is beyond ``cut`` median absolute deviations are dropped.
    """
    if len(samples) < MIN_SAMPLES:
        return list(samples)
    first = Calibrated.fit(samples)
    rel = np.array([first.step_time(s.prefill, s.num_decode, s.decode_context_sum) / s.seconds - 1
                    for s in samples])
    dev = np.abs(rel - np.median(rel))
    mad = float(np.median(dev)) or 1e-9
    limit = max(cut * 1.4826 * mad, float(np.sort(dev)[MIN_SAMPLES - 1]))  # never fewer than a fit needs
    return [s for s, d in zip(samples, dev, strict=True) if d <= limit]


def coefficients(model: TimingModel) -> dict[str, float] | None:
    """A fitted model's coefficients (what /state shows, and what rebuilds it elsewhere); None for others."""
    if not isinstance(model, Calibrated):
        return None
    return {k: getattr(model, k) for k in ("intercept", "per_token", "per_seq", "per_decode_context",
                                           "per_prefill_pair")}


def timing_label(kind: str, samples: int = 0) -> str:
    return f"timing=calibrated({samples} steps)" if kind == "calibrated" else f"timing={kind}"


def build_predictor(prior: LengthPrior, uncalibrated: TimingModel, *, samples: Sequence[StepSample] = (),
                    oracle: TimingModel | None = None) -> Predictor:
    """The predictor every body uses. ``oracle`` (the world's own timing) exists for upper bounds only."""
    if oracle is not None:
        timing, label = oracle, timing_label("oracle")
    elif len(samples) >= MIN_SAMPLES:
        timing, label = Calibrated.fit(samples), timing_label("calibrated", len(samples))
    else:
        timing, label = uncalibrated, timing_label("roofline(uncalibrated)")
    return Predictor(timing, prior, label=f"{label} lengths=prior({prior.name})")


@dataclass
class _Burst:
    """The tokens of one engine iteration as they reached the proxy."""

    start: float
    last: float
    decodes: dict[int, int] = field(default_factory=dict)  # request -> context it attended (prompt + generated)
    firsts: dict[int, tuple[int, float]] = field(default_factory=dict)  # request -> (prompt, its arrival)
    coalesced: bool = False  # a chunk carried several tokens: iterations ran together, the burst is unusable
    begin: float | None = None  # when its iteration began: the burst before it
    tokens: int = 0  # tokens the burst shows the iteration computed
    blocks: int = 0  # KV blocks the requests it shows hold
    dirty: bool = False  # the iteration may hold a prefill chunk that no token shows
    sample: StepSample | None = None

    @property
    def members(self) -> set[int]:
        return self.decodes.keys() | self.firsts.keys()


class StreamSteps:
    """Engine iterations rebuilt from the token timestamps of the requests a proxy relays.

    An iteration's tokens leave the engine together, so tokens closer than ``gap`` (a quarter of a
    typical iteration, or 2 ms before one is known) form one burst, and the time between bursts k-1 and
    k is iteration k. Its batch is known from the burst: requests with their first token finished their
    prefill there, requests that had a token in burst k-1 decoded one. What no token shows is a prefill
    chunk of a prompt that finishes later, or the recompute of a preempted request (it reappears without
    a token in the burst before). Either can only sit in an iteration that began after that request
    arrived (a preempted one: at any time), within the few iterations one prompt can span, and that had
    a seat, token budget and the KV blocks for the chunk left besides what its visible requests hold;
    those iterations, and the one where the prompt ends, are not sampled. A burst becomes a
    ``StepSample`` once no later burst can drop it, if it has continuing decodes and its prompts fit
    the budget next to them.
    """

    def __init__(self, *, window: int = 64):
        self.gap = 0.002  # tokens closer than this are one burst (a quarter of a typical iteration)
        self._recent: deque[float] = deque(maxlen=window)
        self._bursts: deque[_Burst] = deque()  # closed, not yet final (a later burst may still drop them)
        self._cur: _Burst | None = None
        self.gap_sum = 0.0  # every per-request token gap seen, to compare with the engine's ITL histogram
        self.gap_count = 0
        self._last_token: dict[int, float] = {}

    def token(self, t: float, rid: int, prompt_tokens: int, generated_before: int, n: int, arrival: float,
              config: EngineConfig) -> list[StepSample]:
        """``n`` tokens of request ``rid`` (arrived at ``arrival``) reached the proxy at ``t``, same clock;
        returns the samples that became final."""
        out: list[StepSample] = []
        cur = self._cur
        if cur is None or rid in cur.members or t - cur.last > self.gap:
            if cur is not None:
                out = self._close(cur, config)
            cur = self._cur = _Burst(t, t)
        cur.last = t
        cur.coalesced |= n != 1
        if generated_before == 0:
            cur.firsts[rid] = (prompt_tokens, arrival)
        else:
            cur.decodes[rid] = prompt_tokens + generated_before
            if rid in self._last_token:
                self.gap_sum += t - self._last_token[rid]
                self.gap_count += 1
        self._last_token[rid] = t
        if len(self._last_token) > 4 * MAX_TRACKED:  # ended requests are never announced: drop the oldest
            keep = sorted(self._last_token.items(), key=lambda kv: kv[1])[-MAX_TRACKED:]
            self._last_token = dict(keep)
        return out

    def _close(self, burst: _Burst, config: EngineConfig) -> list[StepSample]:
        budget = config.max_num_batched_tokens
        span = 1 + config.max_model_len // max(1, budget - config.max_num_seqs)  # iterations one prompt spans
        prev = self._bursts[-1] if self._bursts else None
        burst.begin = prev.start if prev is not None else None
        members = prev.members if prev is not None else set()
        resumed = {r: ctx for r, ctx in burst.decodes.items() if r not in members}
        decodes = len(burst.decodes) - len(resumed)
        prompts = [p for p, _ in burst.firsts.values()]
        burst.tokens = decodes + sum(prompts) + sum(resumed.values())
        bs = config.block_size
        burst.blocks = sum(-(-(ctx + 1) // bs) for ctx in burst.decodes.values()) + sum(-(-p // bs) for p in prompts)
        late = [(p, a) for p, a in burst.firsts.values()] + [(ctx, -np.inf) for ctx in resumed.values()]
        hidden = burst.tokens > budget  # a prompt that ended here had chunks before
        for b in list(self._bursts)[-span:]:
            if b.begin is None or b.tokens >= budget or len(b.members) >= config.max_num_seqs:
                continue
            free = config.num_blocks - b.blocks
            if any(a < b.begin and -(-min(p, budget - b.tokens) // bs) <= free for p, a in late):
                b.dirty = hidden = True
        if prev is not None and not hidden and not resumed and decodes and not burst.coalesced and not prev.coalesced:
            burst.sample = StepSample(tuple((p, 0) for p in prompts), decodes, sum(burst.decodes.values()),
                                      burst.start - prev.start)
        self._bursts.append(burst)
        out = []
        while len(self._bursts) > span + 1:
            old = self._bursts.popleft()
            if old.sample is not None and not old.dirty:
                self._recent.append(old.sample.seconds)
                out.append(old.sample)
        if out:
            self.gap = max(0.0005, 0.25 * float(np.median(self._recent)))
        return out


class OnlineCalibration:
    """Refits a live predictor's timing model from the step times its engine shows.

    The first fit happens once ``MIN_SAMPLES`` steps besides the held-out ones arrived (the first
    ``EARLY_RETRIES`` failed attempts are retried every ``MIN_SAMPLES`` steps); afterwards every
    ``refit_every`` new steps, on the most recent ``window`` (an engine's speed drifts with its load mix,
    and old samples should fade). Every fifth sample is held out and scores the fit (``fit_error_pct``);
    samples rebuilt from streams lose their outliers before fitting (``without_outliers``). A fit waits
    until the samples identify the model (prefill iterations of their own, ``Calibrated.fit``); until the
    first fit the predictor keeps its uncalibrated roofline and says so.

    Step times come from the engine's ``/steps`` where it has one (``add``), else from the proxied
    token streams (``observe_token``, after ``use_streams``); the streams are watched in both cases.
    """

    def __init__(self, predictor: Predictor, *, window: int = 3000, refit_every: int = 500):
        self.predictor = predictor
        self.samples: deque[StepSample] = deque(maxlen=window)
        self.refit_every = refit_every
        self.since_fit = 0
        self.fits = 0
        self.attempts = 0  # fits attempted, failed ones included: after one, the next waits for more samples
        self.error_pct: float | None = None
        self.stream_error_pct: float | None = None  # the fit scored on the iterations the streams show
        self.source = "none"  # where step times come from
        self.stream = StreamSteps()
        self.stream_samples: deque[StepSample] = deque(maxlen=window)
        self._from_streams = False
        self._itl_base: tuple[float, float] | None = None
        self.engine_itl_s: float | None = None

    @property
    def tried(self) -> bool:
        return self.attempts > 0

    def use_streams(self) -> None:
        """The engine reports no step times (vLLM): fit on what the proxied streams show."""
        self._from_streams = True
        self.source = "proxied token streams"

    def add(self, samples: Iterable[StepSample]) -> None:
        new = list(samples)
        self.samples.extend(new)
        self.since_fit += len(new)
        first = MIN_SAMPLES * HOLDOUT_EVERY // (HOLDOUT_EVERY - 1) + 1  # MIN_SAMPLES besides the held-out ones
        # until a fit succeeds, the first failed ones are retried every MIN_SAMPLES steps: requests that arrive
        # after the first attempt bring the prefill iterations it lacked (waiting refit_every steps for them
        # left a side-car on its roofline for a whole burst); steps that never identify the model (one prompt
        # length) then cost a fit every refit_every steps, as before
        if not self.tried:
            due = len(self.samples) >= first
        else:
            early = not self.fits and self.attempts <= EARLY_RETRIES
            due = self.since_fit >= (MIN_SAMPLES if early else self.refit_every)
        if due:
            self._refit()

    def observe_token(self, t: float, rid: int, prompt_tokens: int, generated_before: int, n: int, arrival: float,
                      config: EngineConfig) -> None:
        """A streamed chunk the side-car relayed (see ``StreamSteps.token``)."""
        new = self.stream.token(t, rid, prompt_tokens, generated_before, n, arrival, config)
        self.stream_samples.extend(new)
        if self._from_streams and new:
            self.add(new)

    def observe_metrics(self, metrics: dict[str, float]) -> None:
        """The engine's own inter-token latency (vLLM's histogram), to compare with the streamed gaps."""
        total = metrics.get("vllm:inter_token_latency_seconds_sum")
        count = metrics.get("vllm:inter_token_latency_seconds_count")
        if total is None or count is None:
            return
        if self._itl_base is None:
            self._itl_base = (total, count)
        d_sum, d_count = total - self._itl_base[0], count - self._itl_base[1]
        self.engine_itl_s = d_sum / d_count if d_count > 0 else None

    def _refit(self) -> None:
        """Fit on the samples so far; samples that do not identify the model yet (one prompt length only, too
        few prefills) leave the predictor as it is until more arrive (``add`` says how many). Retrying on every poll
        instead refitted the whole window four times a second and took 13% of a loaded side-car's CPU."""
        self.since_fit = 0
        self.attempts += 1
        prior = self.predictor.prior
        data = list(self.samples)
        held = data[::HOLDOUT_EVERY]
        train = [s for i, s in enumerate(data) if i % HOLDOUT_EVERY]
        try:
            if self._from_streams:  # an engine's own /steps have no stalls to trim, and trimming them dropped
                train = without_outliers(train)  # the few prefill iterations a decode-heavy fit calls outliers
            fitted = build_predictor(prior, self.predictor.timing, samples=train)
        except ValueError:
            return
        self.predictor.timing, self.predictor.label = fitted.timing, fitted.label
        self.error_pct = fit_error_pct(fitted.timing, held[-500:])
        if self.stream_samples:  # on the emulator: how well what the streams show agrees with its /steps fit
            self.stream_error_pct = fit_error_pct(fitted.timing, list(self.stream_samples)[-500:])
        self.fits += 1

    def status(self) -> dict:
        stream = self.stream
        stream_itl = stream.gap_sum / stream.gap_count if stream.gap_count else None
        itl_gap = None
        if stream_itl and self.engine_itl_s:
            itl_gap = (stream_itl - self.engine_itl_s) / self.engine_itl_s * 100
        return {"label": self.predictor.label, "source": self.source, "samples": len(self.samples),
                "fits": self.fits, "fit_error_pct": self.error_pct, "stream_samples": len(self.stream_samples),
                "stream_error_pct": self.stream_error_pct, "stream_itl_s": stream_itl,
                "engine_itl_s": self.engine_itl_s,
                "itl_gap_pct": itl_gap, "coefficients": coefficients(self.predictor.timing)}
