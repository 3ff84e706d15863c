"""Offline results into the workspace store, so notebooks and dashboards read every run the same way."""

from __future__ import annotations

import pandas as pd

from store.collector import Store


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
