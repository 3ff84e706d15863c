"""Offline results into the workspace store, so notebooks and dashboards read every run the same way."""

from __future__ import annotations

import pandas as pd

from block.offline import ClusterSpec, Honesty, Study
from store.collector import Store
from store.schema import CounterfactualRow, DecisionRow, RequestRow, Row, RunRow

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

    Simulated times are seconds from the start of the run; they are stored as they are. ``decisions`` (a
    RunResult's frame of DecisionRow fields) goes to ``decisions`` and ``audit`` (its counterfactual audit)
    to ``counterfactuals``, so an offline run fills the same tables, with the same columns, as a live one.
    Everything is written in one checked batch: a malformed record leaves the store as it was.
    """
    requests = [RequestRow(run_id=run_id, request_id=str(r.request_id), source="sim", instance=r.instance,
                           policy=policy, arrival_ts=float(r.arrival), first_token_ts=float(r.first_token),
                           finish_ts=float(r.finish), prompt_tokens=int(r.prompt_tokens),
                           output_tokens=int(r.output_tokens), ttft=float(r.ttft), e2e=float(r.e2e),
                           tpot=None if pd.isna(r.tpot) else float(r.tpot)) for r in records.itertuples()]
    rows: list[Row] = [RunRow(run_id=run_id, started_at=0.0, label="offline", policy=policy), *requests]
    if decisions is not None and not decisions.empty:
        rows += [DecisionRow(**{**rec, "run_id": run_id, "request_id": str(rec["request_id"])})
                 for rec in decisions.to_dict("records")]
    if audit is not None and not audit.empty:
        rows += [CounterfactualRow(**{**rec, "run_id": run_id, "request_id": str(rec["request_id"])})
                 for rec in audit.to_dict("records")]
    store.insert_rows(rows)
    return len(requests)


def run_audited(store: Store, spec: ClusterSpec, requests: int, audit_every: int, qps: float,
                seed: int = 0) -> None:
    """Every AUDITED_RUNS entry on the same Poisson workload, saved with its counterfactual audit."""
    for run_id, (policy, honesty) in AUDITED_RUNS.items():
        result = Study(spec, "synthetic", requests, honesty, audit_every=audit_every).run(policy, qps, seed)
        save_offline_run(store, run_id, policy, result.records, result.decisions, result.audit)
