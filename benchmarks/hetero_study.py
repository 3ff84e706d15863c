"""Offline study on a heterogeneous fleet (issue 13). Prints tables and a RESULT line.

The ``hetero`` fleet: 4 x A100-80G (batch cap 128) + 8 x A30 (cap 48, 1052 KV blocks), chunk 512,
Llama-2-7B; AlpacaEval lengths of Llama-2-7b-chat (embedded synthetic lengths without BLOCK_DATA_DIR),
Poisson arrivals. Honest mode: +-10% step noise in the world; every instance has its own predictor,
calibrated on its own warm-up step times, 20 ms stale states, a length prior only.

1. Capacity: the highest QPS whose P99 TTFT <= 3 s, by bisection per seed, for every policy: the naive
   heuristics, the capacity-normalised ones (least tokens / R_peak as llm-d estimates, Dynamo-style
   load/weight, weighted round robin, least requests / R_peak) and Block's variants.
2. Latency, Block's P50 E2E against least_requests': on ``hetero`` at the best heuristic's capacity and
   at least_requests' own capacity, and on the mixed-TP fleet (Llama-2-13B on 2 x TP2 + 4 x TP1 A100-40G)
   at 2.7 QPS per instance (~0.9 of its least_requests knee, measured at ~3).
3. Goodput with mixed SLO classes (30% tight: TTFT <= 0.25 s and TPOT <= 30 ms; 70% standard: TTFT <= 2 s
   and TPOT <= 50 ms): the highest QPS at which >= 90% of requests meet their own SLOs (DistServe's
   goodput criterion) for the two best heuristics and Block's SLO-aware variants, and goodput
   (SLO-meeting requests/s) at the best heuristic's goodput capacity, rejections counted.

--quick (under a minute and a half on 2 cores): half the fleet, 900 requests, one seed, fewer policies.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from block.offline import Honesty, Study, attainment_capacity
from block.policies import CAPACITY_NORMALISED, HEURISTICS
from simulator.data import data_dir
from simulator.fleet import FLEETS, Fleet, SloClass
from simulator.metrics import capacity

BLOCK_FAMILY = ("block", "block_impact")  # the other herding ideas, measured apart: Block's docstring
SLO_POLICIES = ("block_slo", "block_slo_reject")
SLO_CLASSES = (SloClass("tight", 0.25, 0.030, 0.3), SloClass("standard", 2.0, 0.050, 0.7))
SLO_TTFT = 3.0
GOAL = 0.9


MIXED_TP_QPS_PER_INSTANCE = 2.7


@dataclasses.dataclass(frozen=True)
class Setting:
    fleet: Fleet
    requests: int
    seeds: tuple[int, ...]
    heuristics: tuple[str, ...]
    blocks: tuple[str, ...]
    goodput_heuristics: int  # how many of the best heuristics (by capacity) get a goodput search
    rel_tol: float
    per_instance_qps: float  # brackets the knee: lo/hi = 0.55/1.45 x this x instances


def _half(fleet: Fleet) -> Fleet:
    groups = tuple(dataclasses.replace(g, count=max(1, g.count // 2)) for g in fleet.groups)
    return Fleet(groups, f"{fleet.name}/2")


def setting(quick: bool) -> Setting:
    if quick:
        return Setting(_half(FLEETS["hetero"]), 900, (0,), ("least_requests", "least_tokens_cap"),
                       ("block_impact",), 1, 0.12, 6.5)
    return Setting(FLEETS["hetero"], 1500, (0, 1, 2), (*HEURISTICS, *CAPACITY_NORMALISED), BLOCK_FAMILY, 2,
                   0.06, 6.5)


def _study(fleet: Fleet, requests: int, slos: bool = False) -> Study:
    lengths = "alpaca" if data_dir() is not None else "synthetic"
    return Study(fleet, lengths, requests, Honesty(), slo_classes=SLO_CLASSES if slos else ())


def _ttft_capacity(job: tuple) -> dict:
    policy, seed, fleet, requests, lo, hi, rel_tol = job
    study = _study(fleet, requests)

    def run(qps: float, s: int) -> pd.DataFrame:
        r = study.run(policy, qps, s, give_up_ttft=SLO_TTFT)
        return pd.DataFrame({"ttft": [2 * SLO_TTFT]}) if r.gave_up else r.records  # gave up: certain to miss

    cap = capacity(run, SLO_TTFT, lo=lo, hi=hi, seeds=(seed,), rel_tol=rel_tol)
    return {"policy": policy, "seed": seed, "capacity_qps": cap["capacity"]}


def _goodput_capacity(job: tuple) -> dict:
    policy, seed, fleet, requests, lo, hi, rel_tol = job
    cap = attainment_capacity(_study(fleet, requests, slos=True), policy, GOAL, lo=lo, hi=hi, seeds=(seed,),
                              rel_tol=rel_tol)
    return {"policy": policy, "seed": seed, "goodput_capacity_qps": cap["capacity"]}


def _point(job: tuple) -> dict:
    policy, seed, fleet, requests, qps, slos = job
    s = _study(fleet, requests, slos).run(policy, qps, seed).summary
    return {"fleet": fleet.name, "policy": policy, "qps": round(qps, 2), "seed": seed,
            **{k: s[k] for k in ("p50_ttft", "p99_ttft", "p50_e2e", "p99_e2e", "goodput", "slo_attainment",
                                 "rejected")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="results/hetero_study", help="folder for the CSV files")
    args = parser.parse_args()
    t0 = time.time()
    st = setting(args.quick)
    fleet, n = st.fleet, st.fleet.instances
    lo, hi = 0.55 * st.per_instance_qps * n, 1.45 * st.per_instance_qps * n
    heuristics = st.heuristics
    policies = (*heuristics, *st.blocks)
    workers = max(1, min(2, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers) as pool:
        caps = pd.DataFrame(list(pool.map(_ttft_capacity, [
            (p, seed, fleet, st.requests, lo, hi, st.rel_tol) for p in policies for seed in st.seeds])))
        by_policy = caps.groupby("policy", sort=False)["capacity_qps"]
        mean_cap = by_policy.mean()
        best_h = mean_cap[list(heuristics)].idxmax()
        h_cap = mean_cap[best_h]
        lr_cap = mean_cap["least_requests"]
        mixed = FLEETS["mixed_tp"] if not args.quick else _half(FLEETS["mixed_tp"])
        mixed_qps = MIXED_TP_QPS_PER_INSTANCE * mixed.instances
        point_jobs = [(p, seed, fleet, st.requests, h_cap, False) for p in policies for seed in st.seeds]
        point_jobs += [(p, seed, dataclasses.replace(fleet, name=f"{fleet.name}@least_requests"), st.requests,
                        lr_cap, False) for p in ("least_requests", *st.blocks) for seed in st.seeds]
        point_jobs += [(p, seed, mixed, st.requests, mixed_qps, False)
                       for p in ("least_requests", "least_tokens_cap", *st.blocks) for seed in st.seeds]
        points = pd.DataFrame(list(pool.map(_point, point_jobs)))
        # Block's best variant: the highest capacity; a tie (the bisection's grid is shared) goes to the lower
        # P50 E2E at the heuristic's capacity
        at_h = points[points["fleet"] == fleet.name].groupby("policy")["p50_e2e"].mean()
        best_b = min(st.blocks, key=lambda b: (-round(mean_cap[b], 6), at_h[b]))
        b_cap = mean_cap[best_b]
        top = [p for p in mean_cap[list(heuristics)].sort_values(ascending=False).index][:st.goodput_heuristics]
        goodput_policies = (*top, "block_impact", "block_slo")
        gcaps = pd.DataFrame(list(pool.map(_goodput_capacity, [
            (p, seed, fleet, st.requests, 0.5 * lo, hi, st.rel_tol) for p in goodput_policies for seed in st.seeds])))
        g_mean = gcaps.groupby("policy", sort=False)["goodput_capacity_qps"].mean()
        best_gh = g_mean[top].idxmax()
        gpoints = pd.DataFrame(list(pool.map(_point, [
            (p, seed, fleet, st.requests, g_mean[best_gh], True)
            for p in (*goodput_policies, *SLO_POLICIES[1:]) for seed in st.seeds])))

    print(f"{fleet.describe()}; {_study(fleet, st.requests).lengths} lengths; {st.requests} requests/run; "
          f"seeds {st.seeds}; mode honest (per-instance predictors, each calibrated on its own warm-up)")
    print(f"\nCapacity: highest QPS with P99 TTFT <= {SLO_TTFT:g} s (per-seed bisection, rel tol {st.rel_tol})")
    print(by_policy.agg(["mean", "std", "min", "max"]).round(2).to_string())
    print(f"(0 = P99 TTFT above the SLO already at the bracket's low end, {lo:.1f} QPS; {hi:.1f} = at or above "
          "its high end)")
    print(f"\nLatency (seconds, mean over seeds): {fleet.name} at {h_cap:.1f} QPS ({best_h}'s capacity), "
          f"at {lr_cap:.1f} QPS (least_requests' capacity); {mixed.name} at {mixed_qps:.1f} QPS")
    cols = ["p50_ttft", "p99_ttft", "p50_e2e", "p99_e2e"]
    lat = points.groupby(["fleet", "policy"], sort=False)[cols].mean()
    print(lat.round(3).to_string())
    classes = ", ".join(f"{c.name} {c.share:.0%} (TTFT<={c.ttft_s}s, TPOT<={c.tpot_s}s)" for c in SLO_CLASSES)
    print(f"\nGoodput: SLO classes {classes}")
    print(f"goodput capacity = highest QPS with >= {GOAL:.0%} of requests within their SLOs (rejected = missed)")
    gtab = gcaps.groupby("policy", sort=False)["goodput_capacity_qps"].agg(["mean", "std"])
    at = gpoints.groupby("policy", sort=False)[["goodput", "slo_attainment", "rejected"]].mean()
    print(gtab.join(at.add_suffix(f"@{g_mean[best_gh]:.1f}qps"), how="outer").round(3).to_string())

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    caps.to_csv(out / f"capacity{suffix}.csv", index=False)
    points.to_csv(out / f"latency{suffix}.csv", index=False)
    gcaps.to_csv(out / f"goodput_capacity{suffix}.csv", index=False)
    gpoints.to_csv(out / f"goodput{suffix}.csv", index=False)

    p50 = lat["p50_e2e"]
    print("\nP50 E2E vs least_requests (negative is better): " + "; ".join(
        f"{f} {b} {(p50[(f, b)] / p50[(f, 'least_requests')] - 1) * 100:+.1f}%"
        for f in p50.index.get_level_values(0).unique() for b in st.blocks))
    y = (p50[(fleet.name, best_b)] / p50[(fleet.name, "least_requests")] - 1) * 100
    gain = (b_cap / h_cap - 1) * 100
    best_gb = g_mean[["block_impact", "block_slo"]].idxmax()
    g_gain = (g_mean[best_gb] / g_mean[best_gh] - 1) * 100 if g_mean[best_gh] > 0 else math.inf
    print(f"best heuristic {best_h} {h_cap:.2f} QPS; best Block variant {best_b} {b_cap:.2f} QPS; gain "
          f"{gain:+.1f}% (target +15%); goodput capacity {best_gb} {g_mean[best_gb]:.2f} vs {best_gh} "
          f"{g_mean[best_gh]:.2f} QPS ({g_gain:+.1f}%, target +15%); wall {time.time() - t0:.0f} s")
    print(f"RESULT best_heuristic={best_h} heuristic_capacity={h_cap:.2f} block_capacity={b_cap:.2f} "
          f"capacity_gain_pct={gain:.1f} e2e_p50_vs_least_requests_pct={y:.1f} goodput_gain_pct={g_gain:.1f}")


if __name__ == "__main__":
    main()
