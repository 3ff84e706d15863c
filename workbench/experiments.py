"""Offline results into the workspace store and into run folders, so notebooks and dashboards read every run
the same way.

A run folder (``<workspace>/runs/<run>/``) holds one offline run the way Vidur writes its output: what was run
(``config.json``), what every request measured (``requests.parquet``, simulator.metrics columns), what the routing
decided (``decisions.parquet``, when kept) and the headline numbers (``summary.json``). It is self-contained: it can
be copied, archived or compared without the workspace's database. ``summary.json`` is written last, so a folder
without it is an unfinished write and is not opened.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson
import pandas as pd

from block.offline import ClusterSpec, Honesty, Study
from simulator.metrics import summarize
from store.collector import Store
from store.schema import CounterfactualRow, DecisionRow, RequestRow, Row, RunRow

RUN_FILES = ("config.json", "requests.parquet", "summary.json")  # decisions.parquet is optional

# What limits a routing choice, timing or lengths: honest Block (E2E and TTFT targets), the best simple
# heuristic, and Block with the world's timing or true lengths (oracles, labelled as such).
AUDITED_RUNS: dict[str, tuple[str, Honesty]] = {
    "block": ("block", Honesty()),
    "block (oracle timing)": ("block", Honesty(oracle_timing=True)),
    "block_ttft": ("block_ttft", Honesty()),
    "least_requests": ("least_requests", Honesty()),
    "block_star (oracle lengths)": ("block_star", Honesty(oracle_lengths=True)),
}


def run_folder_name(run_id: str) -> str:
    """A file-system-safe folder name for a run id: the id itself when it is plain, else its plain characters
    and a hash of the id, so two ids never share a folder (``a/b`` and ``a_b`` differ)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id).strip("._") or "run"
    if slug == run_id:
        return slug
    return f"{slug[:80]}-{hashlib.sha256(run_id.encode()).hexdigest()[:8]}"


def _json_bytes(obj: Mapping) -> bytes:
    """JSON a reader anywhere can parse: numpy numbers as numbers, NaN and infinity as null."""
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_run_folder(folder: str | Path, config: Mapping, records: pd.DataFrame, summary: Mapping,
                     decisions: pd.DataFrame | None = None) -> Path:
    """One run as a folder: config.json, requests.parquet, decisions.parquet (if given), summary.json last.

    Each file is written to a temporary name and renamed, and the summary goes last, so a crash mid-write
    leaves a folder that ``open_run`` refuses rather than one that silently holds half a run.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").unlink(missing_ok=True)  # rewriting: the folder is unfinished until the end
    _write_atomic(folder / "config.json", lambda p: p.write_bytes(_json_bytes(config)))
    _write_atomic(folder / "requests.parquet", lambda p: records.to_parquet(p, index=False))
    if decisions is not None and not decisions.empty:
        _write_atomic(folder / "decisions.parquet", lambda p: decisions.to_parquet(p, index=False))
    _write_atomic(folder / "summary.json", lambda p: p.write_bytes(_json_bytes(summary)))
    return folder


@dataclass
class RunFolder:
    """One run folder, opened: its config and summary, and its per-request records (and decisions, if kept)."""

    path: Path
    config: dict
    summary: dict
    requests: pd.DataFrame
    decisions: pd.DataFrame | None


def open_run(folder: str | Path) -> RunFolder:
    """A run folder written by ``write_run_folder`` (a finished offline run or a sweep cell)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no run folder at {folder}")
    missing = [name for name in RUN_FILES if not (folder / name).exists()]
    if missing:
        raise ValueError(f"{folder} is not a finished run folder: it lacks {', '.join(missing)}")
    config, summary = (_read_json(folder / name) for name in ("config.json", "summary.json"))
    decisions = folder / "decisions.parquet"
    return RunFolder(folder, config, summary, pd.read_parquet(folder / "requests.parquet"),
                     pd.read_parquet(decisions) if decisions.exists() else None)


def _read_json(path: Path) -> dict:
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def run_folders(root: str | Path) -> pd.DataFrame:
    """Every finished run folder under ``root`` (a workspace's ``runs`` folder, or one sweep's), one row each:
    ``folder``, then the config's scalar fields, then the summary's (``summary.`` prefixed where a name is in
    both). Reads only the JSON files, so listing thousands of sweep cells stays cheap; ``open_run`` a folder
    for its requests."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no runs folder at {root}")
    rows = []
    for summary_path in sorted(root.rglob("summary.json")):
        folder = summary_path.parent
        if not (folder / "config.json").exists():
            continue
        config, summary = _read_json(folder / "config.json"), _read_json(summary_path)
        row: dict = {"folder": str(folder)}
        row |= {k: v for k, v in config.items() if not isinstance(v, dict | list)}
        row |= {(f"summary.{k}" if k in row else k): v for k, v in summary.items() if not isinstance(v, dict | list)}
        rows.append(row)
    return pd.DataFrame(rows)


def study_config(study: Study, policy: str, qps: float, seed: int) -> dict:
    """What one ``Study.run`` ran, as JSON-able data: cluster, workload, what the predictor knew."""
    return {"policy": policy, "qps": qps, "seed": seed, "spec": dataclasses.asdict(study.spec),
            "lengths": study.lengths, "requests": study.requests, "replay": study.replay,
            "power_of_k": study.power_of_k, "honesty": dataclasses.asdict(study.honesty),
            "mode": study.honesty.label}


def save_offline_run(store: Store, run_id: str, policy: str, records: pd.DataFrame,
                     decisions: pd.DataFrame | None = None, audit: pd.DataFrame | None = None, *,
                     config: Mapping | None = None, folder: str | Path | None = None) -> int:
    """Simulated per-request records (simulator.metrics.records_frame) as ``requests`` rows, source 'sim', and
    the run as a run folder (``folder``, default ``<workspace>/runs/<run id>``).

    Simulated times are seconds from the start of the run; they are stored as they are. ``decisions`` (a
    RunResult's frame of DecisionRow fields) goes to ``decisions`` and ``audit`` (its counterfactual audit)
    to ``counterfactuals``, so an offline run fills the same tables, with the same columns, as a live one.
    ``config`` (e.g. ``study_config``) is kept in the run's row and its folder. Everything is written to the
    store in one checked batch: a malformed record leaves the store as it was, and writes no folder.
    """
    config = {"run_id": run_id, "policy": policy, **(config or {})}
    requests = [RequestRow(run_id=run_id, request_id=str(r.request_id), source="sim", instance=r.instance,
                           policy=policy, arrival_ts=float(r.arrival), first_token_ts=float(r.first_token),
                           finish_ts=float(r.finish), prompt_tokens=int(r.prompt_tokens),
                           output_tokens=int(r.output_tokens), ttft=float(r.ttft), e2e=float(r.e2e),
                           tpot=None if pd.isna(r.tpot) else float(r.tpot)) for r in records.itertuples()]
    rows: list[Row] = [RunRow(run_id=run_id, started_at=0.0, label="offline", policy=policy,
                              config=_json_bytes(config).decode()), *requests]
    if decisions is not None and not decisions.empty:
        rows += [DecisionRow(**{**rec, "run_id": run_id, "request_id": str(rec["request_id"])})
                 for rec in decisions.to_dict("records")]
    if audit is not None and not audit.empty:
        rows += [CounterfactualRow(**{**rec, "run_id": run_id, "request_id": str(rec["request_id"])})
                 for rec in audit.to_dict("records")]
    store.insert_rows(rows)
    summary = summarize(records) if not records.empty else {"completed": 0}
    write_run_folder(folder or store.path.parent / "runs" / run_folder_name(run_id), config, records, summary,
                     decisions)
    return len(requests)


def run_audited(store: Store, spec: ClusterSpec, requests: int, audit_every: int, qps: float,
                seed: int = 0) -> None:
    """Every AUDITED_RUNS entry on the same Poisson workload, saved with its counterfactual audit."""
    for run_id, (policy, honesty) in AUDITED_RUNS.items():
        study = Study(spec, "synthetic", requests, honesty, audit_every=audit_every)
        result = study.run(policy, qps, seed)
        save_offline_run(store, run_id, policy, result.records, result.decisions, result.audit,
                         config=study_config(study, policy, qps, seed) | {"audit_every": audit_every})
