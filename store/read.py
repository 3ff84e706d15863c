"""Read helpers for dashboards, notebooks and the autoscaler: through the collector while it runs, else the file.

Every query the project runs against the store lives here, as a method with ``?`` parameters: callers
never paste values into SQL (a run id with a quote in it is data, not syntax), and a schema change is
one file to review. Summaries are computed in SQL so a dashboard refreshing every second stays cheap.
The collector returns at most its row cap (100,000 by default); a result it had to cut is an error here,
not a silently partial frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import duckdb
import httpx
import orjson
import pandas as pd

from store.auth import cluster_token

Param = str | int | float | bool | None


class Reader:
    def __init__(self, collector_url: str | None = None, db_path: str | Path | None = None, *,
                 token: str | None = None):
        """``token``: the cluster token to send (default: the one this process's environment configures)."""
        if collector_url is None and db_path is None:
            raise ValueError("a Reader needs a collector URL (live) or a DuckDB path (finished workspace)")
        self.collector_url = collector_url.rstrip("/") if collector_url else None
        self.db_path = Path(db_path) if db_path else None
        if token is None and collector_url:
            token = cluster_token()
        self._headers = {"authorization": f"Bearer {token}"} if token else {}

    def sql(self, query: str, params: Sequence[Param] | None = None) -> pd.DataFrame:
        """Run a read-only query with DuckDB ``?`` parameters, on the collector (live) or the file."""
        args = list(params or ())
        if self.collector_url is not None:
            resp = httpx.post(self.collector_url + "/query", content=orjson.dumps({"sql": query, "params": args}),
                              headers=self._headers, timeout=30.0)
            if resp.status_code != 200:
                raise ValueError(f"collector query failed ({resp.status_code}): {resp.text[:300]}")
            data = orjson.loads(resp.content)
            if data.get("truncated"):
                raise ValueError(f"collector cut the result at its row cap ({len(data['rows'])} rows): narrow the "
                                 "query, or read a snapshot or the finished workspace's file")
            return pd.DataFrame(data["rows"], columns=data["columns"])
        assert self.db_path is not None
        if not self.db_path.exists():
            raise FileNotFoundError(f"no workspace database at {self.db_path}")
        with duckdb.connect(str(self.db_path), read_only=True) as con:
            return con.execute(query, args).df()

    def runs(self) -> pd.DataFrame:
        """Every run the workspace holds, oldest first."""
        return self.sql("SELECT * FROM runs ORDER BY started_at, run_id")

    def requests(self, run_id: str | None = None, source: str = "client") -> pd.DataFrame:
        """One observer's rows (client, scheduler or sim), of one run or of all, in arrival order."""
        if run_id is None:
            return self.sql("SELECT * FROM requests WHERE source = ? ORDER BY arrival_ts", [source])
        return self.sql("SELECT * FROM requests WHERE source = ? AND run_id = ? ORDER BY arrival_ts",
                        [source, run_id])

    def latencies(self, source: str = "client") -> pd.DataFrame:
        """TTFT and E2E of every completed request with its run and policy: what the results CDFs plot."""
        return self.sql("SELECT run_id, policy, ttft, e2e FROM requests WHERE source = ? AND status = 'ok' "
                        "ORDER BY run_id, arrival_ts", [source])

    def recent_requests(self, source: str = "scheduler", limit: int = 5000) -> pd.DataFrame:
        """The newest ``limit`` requests one observer recorded, newest first (the live dashboard's window)."""
        return self.sql("SELECT * FROM requests WHERE source = ? ORDER BY arrival_ts DESC LIMIT ?",
                        [source, int(limit)])

    def recent_decisions(self, limit: int = 500) -> pd.DataFrame:
        """The newest ``limit`` routing decisions, newest first."""
        return self.sql("SELECT * FROM decisions ORDER BY ts DESC LIMIT ?", [int(limit)])

    def decision_outcomes(self, run_id: str, source: str = "sim") -> pd.DataFrame:
        """Each decision of a run next to what its request then measured (one observer, so a live run's
        client and scheduler rows do not double every decision): prediction error per instance."""
        return self.sql("""
            SELECT d.request_id, r.instance, d.predicted_ttft, d.predicted_e2e, r.ttft, r.e2e
            FROM decisions d JOIN requests r USING (run_id, request_id)
            WHERE d.run_id = ? AND r.source = ? ORDER BY d.ts""", [run_id, source])

    def instance_samples(self, since_ts: float | None = None) -> pd.DataFrame:
        """Side-car load samples, all or those after ``since_ts`` (epoch seconds), in time order."""
        if since_ts is None:
            return self.sql("SELECT * FROM instance_samples ORDER BY ts")
        return self.sql("SELECT * FROM instance_samples WHERE ts > ? ORDER BY ts", [float(since_ts)])

    def provisioning_events(self, run_id: str | None = None) -> pd.DataFrame:
        """Scale-out and drain decisions with their trigger signal, of one run or of all, in time order."""
        if run_id is None:
            return self.sql("SELECT * FROM provisioning ORDER BY ts")
        return self.sql("SELECT * FROM provisioning WHERE run_id = ? ORDER BY ts", [run_id])

    def decision_times_since(self, ts: float) -> pd.DataFrame:
        """Column ``ts`` of the decisions after ``ts``, ascending: the arrivals the autoscaler forecasts from."""
        return self.sql("SELECT ts FROM decisions WHERE ts > ? ORDER BY ts", [float(ts)])

    def first_tokens_since(self, ts: float) -> pd.DataFrame:
        """``first_token_ts`` and ``ttft`` of scheduler-observed requests whose first token came after ``ts``:
        the latency signal of the reactive autoscaler."""
        return self.sql("SELECT first_token_ts, ttft FROM requests WHERE source = 'scheduler' AND first_token_ts > ? "
                        "ORDER BY first_token_ts", [float(ts)])

    def summary(self, source: str = "client", run_suffix: str = "") -> pd.DataFrame:
        """Per run whose id ends with ``run_suffix``: completed and failed requests and TTFT/E2E percentiles
        (milliseconds). ``ends_with`` rather than LIKE, so ``_`` or ``%`` in a run id match only themselves."""
        return self.sql("""
            SELECT run_id, any_value(policy) AS policy,
                   count(*) FILTER (WHERE status = 'ok') AS completed,
                   count(*) FILTER (WHERE status <> 'ok') AS failed,
                   round(1000 * median(ttft), 1) AS p50_ttft_ms,
                   round(1000 * quantile_cont(ttft, 0.99), 1) AS p99_ttft_ms,
                   round(1000 * median(e2e), 1) AS p50_e2e_ms,
                   round(1000 * quantile_cont(e2e, 0.99), 1) AS p99_e2e_ms,
                   round(1000 * median(tpot), 2) AS p50_tpot_ms
            FROM requests WHERE source = ? AND ends_with(run_id, ?)
            GROUP BY run_id ORDER BY min(arrival_ts)""", [source, run_suffix])

    def rank_accuracy(self, run_id: str | None = None) -> pd.DataFrame:
        """Per run (or for one), from the counterfactual audit: how often the chosen instance was the best one
        (within 2% + 10 ms, so that equally idle instances tie), how much later the request finished than on
        the best instance, and how well predicted E2E ranks the candidates."""
        return self.sql("""
            WITH a AS (SELECT *, min(oracle_ttft) OVER w AS best_ttft, min(oracle_e2e) OVER w AS best_e2e,
                              rank() OVER (PARTITION BY run_id, request_id ORDER BY predicted_e2e) AS predicted_rank,
                              rank() OVER (PARTITION BY run_id, request_id ORDER BY oracle_e2e) AS oracle_rank
                       FROM counterfactuals WHERE ? IS NULL OR run_id = ?
                       WINDOW w AS (PARTITION BY run_id, request_id))
            SELECT run_id, count(*) FILTER (WHERE chosen) AS audited_decisions,
                   avg(CASE WHEN oracle_ttft <= 1.02 * best_ttft + 0.01 THEN 1 ELSE 0 END) FILTER (WHERE chosen)
                       AS top1_ttft,
                   avg(CASE WHEN oracle_e2e <= 1.02 * best_e2e + 0.01 THEN 1 ELSE 0 END) FILTER (WHERE chosen)
                       AS top1_e2e,
                   avg(oracle_e2e - best_e2e) FILTER (WHERE chosen) AS mean_regret_e2e_s,
                   corr(predicted_rank, oracle_rank) AS rank_correlation_e2e
            FROM a GROUP BY run_id ORDER BY run_id""", [run_id, run_id])
