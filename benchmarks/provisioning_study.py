"""Offline auto-provisioning study (issue: auto-provisioning). Prints a table and a RESULT line.

Paper instances (A30, Llama-2-7B, cap 48, chunk 512, 1052 blocks), block routing, 60 s cold start,
TTFT SLO 3 s, 2..12 instances. Workloads: a synthetic ramp (5 -> 18 -> 5 QPS) and, in the full run, the
bursty Azure code trace time-scaled to 12 QPS. Modes: a fixed cluster sized for the peak (7), Block's
reactive baseline (measured P99 over the SLO), and the predictive controller (forecast load replayed
into the predictors). Honest mode: the controller's predictor has calibrated timing and a length prior.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd

from block.offline import get_preset, run_provisioning
from block.provisioner import ProvisionerConfig
from simulator.data import data_dir
from simulator.workload import Request, lengths_source, rate_arrivals, trace_workload

FIXED_SIZE = 7


def ramp_rate(t: float) -> float:
    if t < 120:
        return 5.0
    if t < 420:
        return 5.0 + 13.0 * (t - 120) / 300
    if t < 620:
        return 18.0
    if t < 920:
        return 18.0 - 13.0 * (t - 620) / 300
    return 5.0


def ramp_workload(trace, seed: int = 0, duration: float = 1100.0) -> list[Request]:
    """A Poisson process with the ramp's rate, lengths drawn from the trace."""
    rng = np.random.default_rng(seed)
    arrivals = rate_arrivals(ramp_rate, duration, 30.0, rng)
    idx = rng.integers(0, len(trace), len(arrivals))
    return [Request(i, float(a), int(trace.prompt_tokens[j]), int(trace.output_tokens[j]))
            for i, (a, j) in enumerate(zip(arrivals, idx, strict=True))]


def run(job: tuple) -> dict:
    workload, mode = job
    lengths = "alpaca" if data_dir() is not None else "synthetic"
    trace, prior = lengths_source(lengths, 0)
    if workload == "ramp":
        reqs = ramp_workload(trace)
    else:
        code, _ = lengths_source("splitwise_code", 0)
        reqs = trace_workload(code, 8000, 12.0)
    cfg = ProvisionerConfig(mode=mode, slo_ttft=3.0, min_instances=2, max_instances=12, cold_start=60.0)
    start = FIXED_SIZE if mode == "fixed" else 2
    r = run_provisioning(get_preset("paper"), reqs, cfg, start_instances=start, prior=prior,
                         calibration_trace=trace)
    return {"workload": workload, "requests": len(reqs), **{k: v for k, v in r.items()
                                                             if k not in ("events", "decisions")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the ramp only (under a minute)")
    args = parser.parse_args()
    t0 = time.time()
    workloads = ["ramp"] if args.quick or data_dir() is None else ["ramp", "azure_code"]
    jobs = [(w, m) for w in workloads for m in ("fixed", "reactive", "predictive")]
    with ProcessPoolExecutor(2) as pool:
        df = pd.DataFrame(list(pool.map(run, jobs)))
    print(f"Auto-provisioning, TTFT SLO 3 s, cold start 60 s, fixed = {FIXED_SIZE} instances; violations = "
          "requests over the SLO")
    print(df.round(2).to_string(index=False))
    ramp = df[df.workload == "ramp"].set_index("mode")
    ratio = ramp.loc["predictive", "instance_seconds"] / ramp.loc["reactive", "instance_seconds"]
    p99 = (ramp.loc["predictive", "p99_ttft"] / ramp.loc["reactive", "p99_ttft"] - 1) * 100
    print(f"ramp: predictive vs reactive P99 TTFT {p99:+.0f}%, instance-seconds x{ratio:.2f}; "
          f"wall {time.time() - t0:.0f} s")
    print(f"RESULT violations_fixed={ramp.loc['fixed', 'slo_violations']} "
          f"violations_reactive={ramp.loc['reactive', 'slo_violations']} "
          f"violations_predictive={ramp.loc['predictive', 'slo_violations']} "
          f"cost_ratio_predictive_vs_reactive={ratio:.2f}")


if __name__ == "__main__":
    main()
