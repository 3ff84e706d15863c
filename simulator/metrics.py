"""Per-request records and the summaries every study reports (names follow ``vllm bench serve``).

Offline records have TTFT, TPOT, E2E and queueing delay per request; the per-token inter-token
latencies are not kept (the engine jumps over decode runs), so ITL percentiles come from live runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd

COLUMNS = ("request_id", "instance", "arrival", "first_scheduled", "first_token", "finish",
           "prompt_tokens", "output_tokens", "preemptions")


def records_frame(finished: Iterable[tuple[str, object]]) -> pd.DataFrame:
    """One row per finished request, with latency columns in seconds."""
    cols: dict[str, list] = {c: [] for c in COLUMNS}
    for name, s in finished:
        cols["request_id"].append(s.id)
        cols["instance"].append(name)
        cols["arrival"].append(s.arrival)
        cols["first_scheduled"].append(s.first_scheduled)
        cols["first_token"].append(s.first_token)
        cols["finish"].append(s.finish_time)
        cols["prompt_tokens"].append(s.prompt)
        cols["output_tokens"].append(s.target)
        cols["preemptions"].append(s.preemptions)
    df = pd.DataFrame(cols)
    df["ttft"] = df["first_token"] - df["arrival"]
    df["e2e"] = df["finish"] - df["arrival"]
    df["queueing"] = df["first_scheduled"] - df["arrival"]
    decode = (df["output_tokens"] - 1).where(df["output_tokens"] > 1)
    df["tpot"] = (df["finish"] - df["first_token"]) / decode
    return df.sort_values("request_id", ignore_index=True)


def percentile(values: Sequence[float] | pd.Series, q: float) -> float:
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(np.percentile(arr, q)) if arr.size else float("nan")


def summarize(df: pd.DataFrame, *, slo_ttft: float | None = None, slo_e2e: float | None = None) -> dict:
    """Headline numbers of one run: percentiles of each latency, throughput and goodput."""
    if df.empty:
        raise ValueError("no finished requests to summarise")
    duration = float(df["finish"].max() - df["arrival"].min())
    out: dict[str, float] = {
        "completed": len(df),
        "duration_s": duration,
        "request_throughput": len(df) / duration if duration > 0 else float("nan"),
        "output_throughput": float(df["output_tokens"].sum()) / duration if duration > 0 else float("nan"),
        "preemptions": int(df["preemptions"].sum()),
    }
    for metric in ("ttft", "tpot", "e2e", "queueing"):
        out[f"mean_{metric}"] = float(df[metric].mean())
        for q in (50, 90, 99):
            out[f"p{q}_{metric}"] = percentile(df[metric], q)
    if slo_ttft is not None or slo_e2e is not None:
        ok = np.ones(len(df), dtype=bool)
        if slo_ttft is not None:
            ok &= df["ttft"].to_numpy() <= slo_ttft
        if slo_e2e is not None:
            ok &= df["e2e"].to_numpy() <= slo_e2e
        out["goodput"] = float(ok.sum()) / duration if duration > 0 else float("nan")
        out["slo_attainment"] = float(ok.mean())
    return out


def capacity(
    run: Callable[[float, int], pd.DataFrame],
    slo: float,
    *,
    metric: str = "ttft",
    q: float = 99,
    lo: float = 0.5,
    hi: float = 64.0,
    seeds: Sequence[int] = (0, 1, 2),
    rel_tol: float = 0.02,
) -> dict:
    """Highest QPS whose P``q`` of ``metric`` meets ``slo``, by bisection, per seed.

    Each seed is searched separately so the spread across seeds is reported rather than hidden.
    """
    if slo <= 0:
        raise ValueError(f"SLO must be > 0, got {slo}")
    return highest_passing(lambda qps, seed: percentile(run(qps, seed)[metric], q) <= slo, lo=lo, hi=hi,
                           seeds=seeds, rel_tol=rel_tol)


def highest_passing(ok: Callable[[float, int], bool], *, lo: float, hi: float, seeds: Sequence[int],
                    rel_tol: float) -> dict:
    """Per seed, the highest QPS in [lo, hi] at which ``ok(qps, seed)`` holds, by bisection (0 when even
    ``lo`` fails, ``hi`` when it holds there); their mean, spread and the per-seed values."""
    per_seed = []
    for seed in seeds:
        a, b = lo, hi
        if not ok(a, seed):
            per_seed.append(0.0)
            continue
        if ok(b, seed):
            per_seed.append(b)
            continue
        while (b - a) / a > rel_tol:
            mid = (a + b) / 2
            a, b = (mid, b) if ok(mid, seed) else (a, mid)
        per_seed.append(a)
    arr = np.asarray(per_seed)
    return {"capacity": float(arr.mean()), "capacity_std": float(arr.std()), "per_seed": per_seed}
