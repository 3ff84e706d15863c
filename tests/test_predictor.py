import dataclasses
import math

import pytest

from block.predictor import Predictor
from simulator.engine import CachedRun, Engine, EngineConfig, InstanceState, RequestState
from simulator.hardware import get_gpu, get_model
from simulator.timing import Roofline
from simulator.workload import LengthPrior, Request

TIMING = Roofline(get_gpu("A30"), get_model("Llama-2-7B"))
CFG = EngineConfig(num_blocks=1052, max_num_seqs=48, max_num_batched_tokens=512)


def test_prediction_on_an_empty_instance_equals_the_engine():
    pred = Predictor(TIMING, LengthPrior([200] * 10))
    p = pred.predict(InstanceState(CFG, 5.0), Request(1, 5.0, 300, 9999, predicted_output_tokens=200))
    eng = Engine(CFG, TIMING)
    eng.add_request(Request(1, 5.0, 300, 200))
    eng.advance()
    s = eng.finished[0]
    assert p.ttft == pytest.approx(s.first_token - 5.0, rel=1e-12)
    assert p.e2e == pytest.approx(s.finish_time - 5.0, rel=1e-12)
    assert not p.horizon_hit and p.queueing == pytest.approx(0.0)


def test_the_predictor_never_reads_true_lengths():
    pred = Predictor(TIMING, LengthPrior([100] * 10))
    short = pred.predict(InstanceState(CFG, 0.0), Request(1, 0.0, 100, 5))
    long = pred.predict(InstanceState(CFG, 0.0), Request(1, 0.0, 100, 3000))
    assert short.e2e == long.e2e  # both use the prior's 100 tokens


def test_busier_instances_predict_later_first_tokens():
    pred = Predictor(TIMING, LengthPrior.embedded())
    idle = InstanceState(CFG, 0.0)
    busy = InstanceState(CFG, 0.0, [RequestState(i, 0.0, 500, 0, 0, "waiting", 0) for i in range(60)])
    cand = Request(99, 0.0, 200, 1)
    assert pred.predict(busy, cand, target="ttft").ttft > 10 * pred.predict(idle, cand, target="ttft").ttft
    ttft_only = pred.predict(busy, cand, target="ttft")
    assert math.isnan(ttft_only.e2e)


def test_requests_past_their_estimate_get_a_conditional_remainder():
    prior = LengthPrior(list(range(1, 1001)))
    assert prior.remaining(0) == pytest.approx(500, abs=2)
    assert prior.remaining(900) == pytest.approx(50, abs=2)  # median of 901..1000, minus 900
    assert prior.remaining(5000) >= 1
    pred = Predictor(TIMING, prior)
    state = InstanceState(CFG, 0.0, [RequestState(1, 0.0, 100, 100 + 399, 400, "running", 32,
                                                  predicted_output_tokens=300)])
    targets = pred._targets(state)
    assert targets[1] > 400  # not "done now": it already outlived the estimate
    with pytest.raises(ValueError, match="positive"):
        LengthPrior([])


def test_a_predictor_reused_across_states_predicts_as_a_fresh_one():
    """A predictor keeps the newest state's fork targets (a scheduler forks one state at every decision);
    another state, or a new prior, must not run on them."""
    cand = Request(100, 0.0, 300, 1)
    reused = Predictor(TIMING, LengthPrior([50] * 5))
    for n in (20, 5, 20):
        state = InstanceState(CFG, 0.0, [RequestState(i, 0.0, 200, 209, 10, "running", 14) for i in range(n)])
        fresh = Predictor(TIMING, LengthPrior([50] * 5)).predict(state, cand).e2e
        assert reused.predict(state, cand).e2e == reused.predict(state, cand).e2e == fresh
    reused.prior = LengthPrior([900] * 5)
    assert reused.predict(state, cand).e2e == Predictor(TIMING, reused.prior).predict(state, cand).e2e > fresh


def test_horizon_caps_the_work_and_says_so():
    pred = Predictor(TIMING, LengthPrior([2000] * 5), horizon_s=1.0)
    p = pred.predict(InstanceState(CFG, 0.0), Request(1, 0.0, 100, 1))
    assert p.horizon_hit and p.e2e == pytest.approx(1.0, abs=0.2)


def test_dispatched_but_invisible_requests_count():
    pred = Predictor(TIMING, LengthPrior([300] * 5))
    state = InstanceState(CFG, 0.0)
    cand = Request(100, 0.0, 200, 1)
    alone = pred.predict(state, cand)
    behind = pred.predict(state, cand, extra=[Request(i, 0.0, 2000, 1) for i in range(3)])
    assert behind.ttft > alone.ttft


def test_added_delay_is_reported_when_asked():
    pred = Predictor(TIMING, LengthPrior([300] * 5))
    running = [RequestState(i, 0.0, 200, 200 + 9, 10, "running", 14) for i in range(20)]
    p = pred.predict(InstanceState(CFG, 0.0, running), Request(100, 0.0, 1500, 1), with_impact=True)
    assert p.added_delay > 0
    assert math.isnan(pred.predict(InstanceState(CFG, 0.0), Request(100, 0.0, 10, 1)).added_delay)


def test_a_prediction_in_wall_seconds_scales_its_durations_and_keeps_every_other_field():
    pred = Predictor(TIMING, LengthPrior.embedded())
    busy = InstanceState(CFG, 0.0, [RequestState(i, 0.0, 300, 0, 0, "waiting", 0) for i in range(8)])
    p = pred.predict(busy, Request(99, 0.0, 200, 1), now=0.5, instance="i0", with_impact=True)
    wall = p.in_wall_seconds(50.0)
    durations = {"ttft", "e2e", "queueing", "added_delay", "state_age"}
    for f in dataclasses.fields(p):
        if f.name in durations:
            assert getattr(wall, f.name) == pytest.approx(getattr(p, f.name) / 50.0, rel=1e-12), f.name
        else:
            assert getattr(wall, f.name) == getattr(p, f.name), f.name
    assert p.in_wall_seconds(1.0) is p


def test_predictions_on_idle_instances_are_remembered_exactly_and_forgotten_on_a_refit():
    """An idle fork is predicted once per candidate shape; the answers match a fresh predictor's."""
    shared = Predictor(TIMING, LengthPrior.embedded())
    chain = tuple(range(1000, 1040))
    cases = []
    for clock, now in ((0.0, 0.0), (3.0, 3.5), (7.25, 9.0)):
        for prompt, estimate, hit in ((200, None, 0), (200, 40, 0), (640, None, 12), (640, None, 40), (17, 3, 1)):
            cached = [CachedRun(None, chain[:hit], 0, 0)] if hit else []
            state = InstanceState(CFG, clock).with_cached(cached)
            cand = Request(-1, now, prompt, 1, estimate, block_hashes=chain[: prompt // 16])
            for target, impact in (("e2e", False), ("ttft", False), ("e2e", True)):
                cases.append((state, cand, now, target, impact))
    busy = InstanceState(CFG, 1.0, [RequestState(0, 0.5, 300, 300, 20, "running", 21)])
    cases.append((busy, Request(-1, 1.2, 200, 1), 1.2, "e2e", False))  # not idle: predicted afresh
    forks = []
    simulate = shared.fork
    shared.fork = lambda state: forks.append(state) or simulate(state)
    for _ in range(2):  # the second pass answers from memory
        forks.clear()
        for state, cand, now, target, impact in cases:
            got = shared.predict(state, cand, target=target, now=now, instance="i3", with_impact=impact)
            want = Predictor(TIMING, LengthPrior.embedded()).predict(state, cand, target=target, now=now,
                                                                     instance="i3", with_impact=impact)
            assert got.instance == want.instance
            for f in dataclasses.fields(want):
                if f.name not in ("compute_ms", "instance"):
                    assert getattr(got, f.name) == pytest.approx(getattr(want, f.name), rel=1e-9, nan_ok=True), f.name
    assert forks == [busy]  # only the busy instance was simulated again
    state, cand, now, target, impact = cases[0]
    before = shared.predict(state, cand, now=now)
    shared.timing = Roofline(get_gpu("A30"), get_model("Llama-2-13B"))  # what a side-car's refit does
    after = shared.predict(state, cand, now=now)
    fresh = Predictor(shared.timing, LengthPrior.embedded())
    assert after.e2e == pytest.approx(fresh.predict(state, cand, now=now).e2e)
    assert after.e2e > before.e2e


def test_unknown_target_is_rejected():
    pred = Predictor(TIMING, LengthPrior([300]))
    with pytest.raises(ValueError, match="unknown prediction target"):
        pred.predict(InstanceState(CFG, 0.0), Request(1, 0.0, 10, 1), target="tpot")


def test_state_age_is_reported():
    pred = Predictor(TIMING, LengthPrior([300]))
    p = pred.predict(InstanceState(CFG, 1.0), Request(1, 1.02, 10, 1), now=1.02)
    assert p.state_age == pytest.approx(0.02)


def test_steps_that_cannot_identify_the_timing_model_are_refitted_every_refit_every_samples_not_every_poll(
        monkeypatch):
    """Decode-only steps (or one prompt length only, as in a benchmark of identical prompts) leave the model
    unidentified: the calibration keeps its roofline and, after a few early retries, tries again after
    ``refit_every`` more samples. It once retried on every poll, refitting its whole window four times a
    second."""
    import random

    import block.predictor.calibration as calibration
    from simulator.timing import Calibrated, StepSample

    fits = []
    real = calibration.build_predictor
    monkeypatch.setattr(calibration, "build_predictor", lambda *a, **kw: fits.append(1) or real(*a, **kw))
    online = calibration.OnlineCalibration(real(LengthPrior([100] * 10), TIMING), refit_every=200)
    truth = Calibrated(0.004, 2e-5, 1e-5, 3e-8, 4e-10)
    rng = random.Random(0)

    def steps(k: int, prefill: bool) -> list[StepSample]:
        out = []
        for _ in range(k):
            pre = ((rng.randint(16, 512), 0),) if prefill and rng.random() < 0.3 else ()
            n = rng.randint(1, 32)
            ctx = n * rng.randint(50, 900)
            out.append(StepSample(pre, n, ctx, truth.step_time(pre, n, ctx)))
        return out

    for _ in range(100):  # 1000 decode-only steps in polls of 10
        online.add(steps(10, prefill=False))
    assert online.fits == 0 and online.predictor.label.startswith("timing=roofline(uncalibrated)")
    assert 2 <= len(fits) <= 1 + calibration.EARLY_RETRIES + 1000 // 200
    tried = len(fits)
    for _ in range(20):  # 200 steps with prefills of several lengths: the next attempt fits
        online.add(steps(10, prefill=True))
    assert len(fits) == tried + 1 and online.fits == 1
    assert online.predictor.label.startswith("timing=calibrated(")


def test_a_first_fit_that_came_too_early_is_retried_once_the_next_requests_bring_their_prefills():
    """The first attempt can come before later requests' prompts were prefilled (they arrived a little late):
    the next attempt comes MIN_SAMPLES steps later, not refit_every."""
    import random

    import block.predictor.calibration as calibration
    from simulator.timing import Calibrated, StepSample

    online = calibration.OnlineCalibration(calibration.build_predictor(LengthPrior([100] * 10), TIMING),
                                           refit_every=500)
    truth = Calibrated(0.004, 2e-5, 1e-5, 3e-8, 4e-10)
    rng = random.Random(1)

    def step(prefill: bool) -> StepSample:
        pre = ((rng.randint(16, 512), 0),) if prefill else ()
        n = rng.randint(1, 32)
        ctx = n * rng.randint(50, 900)
        return StepSample(pre, n, ctx, truth.step_time(pre, n, ctx))

    online.add([step(prefill=i == 0) for i in range(70)])  # one request so far: one prefill, then decodes
    assert online.tried and online.fits == 0
    online.add([step(prefill=i % 4 == 0) for i in range(calibration.MIN_SAMPLES)])  # the others arrive
    assert online.fits == 1 and online.predictor.label.startswith("timing=calibrated(")
