"""Offline results into the workspace store, so notebooks and dashboards read every run the same way."""

from __future__ import annotations

import pandas as pd

from block.offline import ClusterSpec, Honesty, Study
from store.collector import Store

# What limits a routing choice, timing or lengths: honest Block (E2E and TTFT targets), the best simple
# heuristic, and Block with the world's timing or true lengths (oracles, labelled as such).
AUDITED_RUNS: dict[str, tuple[str, Honesty]] = {
    "block": ("block", Honesty()),
    "block (oracle timing)": ("block", Honesty(oracle_timing=True)),
    "block_ttft": ("block_ttft", Honesty()),
    "least_requests": ("least_requests", Honesty()),
    "block_star (oracle lengths)": ("block_star", Honesty(oracle_lengths=True)),
}


def save_offline_run(store: Store, run_id: str, policy: str, records: pd.DataFrame,
                     decisions: pd.DataFrame | None = None, audit: pd.DataFrame | None = None) -> int:
    """Simulated per-request records (simulator.metrics.records_frame) as ``requests`` rows, source 'sim'.

    Simulated times are seconds from the start of the run; they are stored as they are. ``audit`` (a
    RunResult's counterfactual audit) goes to ``counterfactuals``.
    """
    rows = [{"run_id": run_id, "request_id": str(r.request_id), "source": "sim", "instance": r.instance,
             "policy": policy, "arrival_ts": r.arrival, "first_token_ts": r.first_token, "finish_ts": r.finish,
             "prompt_tokens": int(r.prompt_tokens), "output_tokens": int(r.output_tokens), "ttft": r.ttft,
             "e2e": r.e2e, "tpot": None if pd.isna(r.tpot) else r.tpot, "status": "ok", "error": "",
             "retries": 0} for r in records.itertuples()]
    store.insert("requests", rows)
    store.insert("runs", [{"run_id": run_id, "started_at": 0.0, "label": "offline", "policy": policy,
                           "config": ""}])
    if decisions is not None and not decisions.empty:
        store.insert("decisions", [{"run_id": run_id, "request_id": str(d.request_id), "ts": d.time,
                                    "policy": policy, "chosen": d.instance, "decision_ms": None, "fallback": False,
                                    "predicted_ttft": d.predicted_ttft, "predicted_e2e": d.predicted_e2e,
                                    "candidates": ""} for d in decisions.itertuples()])
    if audit is not None and not audit.empty:
        store.insert("counterfactuals", [{**row, "run_id": run_id, "request_id": str(row["request_id"])}
                                         for row in audit.to_dict("records")])
    return len(rows)


def run_audited(store: Store, spec: ClusterSpec, requests: int, audit_every: int, qps: float,
                seed: int = 0) -> None:
    """Every AUDITED_RUNS entry on the same Poisson workload, saved with its counterfactual audit."""
    for run_id, (policy, honesty) in AUDITED_RUNS.items():
        result = Study(spec, "synthetic", requests, honesty, audit_every=audit_every).run(policy, qps, seed)
        save_offline_run(store, run_id, policy, result.records, result.decisions, result.audit)
