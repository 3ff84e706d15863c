"""One way to build a predictor, offline and live, and the online calibration of its timing model.

A predictor may only know what a deployment can measure: step times its engine reported (then the timing
model is fitted on them), or else the roofline of its GPU and model (labelled uncalibrated). The offline
studies feed the factory step samples from a noisy warm-up run of the world, the side-car feeds it the
step times its engine reports as they arrive; the result and its honesty label are the same kind of thing
in both bodies, and the label travels with every prediction and decision row.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

import numpy as np

from block.predictor.core import Predictor
from simulator.timing import Calibrated, StepSample, TimingModel
from simulator.workload import LengthPrior

MIN_SAMPLES = 50  # fewer step times than this do not pin down a five-coefficient model


def fit_error_pct(model: TimingModel, samples: Sequence[StepSample]) -> float:
    """Mean absolute percentage error of a timing model on step samples (in-sample fit quality)."""
    measured = np.array([s.seconds for s in samples])
    fitted = np.array([model.step_time(s.prefill, s.num_decode, s.decode_context_sum) for s in samples])
    ok = measured > 0
    return float(np.mean(np.abs(fitted[ok] - measured[ok]) / measured[ok]) * 100) if ok.any() else float("nan")


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


class OnlineCalibration:
    """Refits a live predictor's timing model from the step times its engine reports.

    The first fit happens once ``MIN_SAMPLES`` steps arrived; afterwards every ``refit_every`` new steps,
    on the most recent ``window`` (an engine's speed drifts with its load mix, and old samples should
    fade). Until then the predictor keeps its uncalibrated roofline and says so.
    """

    def __init__(self, predictor: Predictor, *, window: int = 3000, refit_every: int = 500):
        self.predictor = predictor
        self.samples: deque[StepSample] = deque(maxlen=window)
        self.refit_every = refit_every
        self.since_fit = 0
        self.fits = 0
        self.error_pct: float | None = None
        self.source = "none"  # where step times come from; "none" when the engine reports none

    def add(self, samples: Iterable[StepSample]) -> None:
        new = list(samples)
        self.samples.extend(new)
        self.since_fit += len(new)
        due = self.since_fit >= self.refit_every if self.fits else len(self.samples) >= MIN_SAMPLES
        if due:
            self._refit()

    def _refit(self) -> None:
        prior = self.predictor.prior
        data = list(self.samples)
        fitted = build_predictor(prior, self.predictor.timing, samples=data)
        self.predictor.timing, self.predictor.label = fitted.timing, fitted.label
        self.error_pct = fit_error_pct(fitted.timing, data[-500:])
        self.fits += 1
        self.since_fit = 0

    def status(self) -> dict:
        return {"label": self.predictor.label, "source": self.source, "samples": len(self.samples),
                "fits": self.fits, "fit_error_pct": self.error_pct}
