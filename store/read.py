"""Read helpers for dashboards and notebooks: through the collector while it runs, else the file.

Summaries are computed in SQL so a dashboard refreshing every second stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import httpx
import orjson
import pandas as pd


class Reader:
    def __init__(self, collector_url: str | None = None, db_path: str | Path | None = None):
        if collector_url is None and db_path is None:
            raise ValueError("a Reader needs a collector URL (live) or a DuckDB path (finished workspace)")
        self.collector_url = collector_url.rstrip("/") if collector_url else None
        self.db_path = Path(db_path) if db_path else None

    def sql(self, query: str) -> pd.DataFrame:
        if self.collector_url is not None:
            resp = httpx.post(self.collector_url + "/query", content=orjson.dumps({"sql": query}), timeout=30.0)
            if resp.status_code != 200:
                raise ValueError(f"collector query failed ({resp.status_code}): {resp.text[:300]}")
            data = orjson.loads(resp.content)
            return pd.DataFrame(data["rows"], columns=data["columns"])
        assert self.db_path is not None
        if not self.db_path.exists():
            raise FileNotFoundError(f"no workspace database at {self.db_path}")
        with duckdb.connect(str(self.db_path), read_only=True) as con:
            return con.execute(query).df()

    def requests(self, run_id: str | None = None, source: str = "client") -> pd.DataFrame:
        where = f"source = '{source}'" + (f" AND run_id = '{run_id}'" if run_id else "")
        return self.sql(f"SELECT * FROM requests WHERE {where} ORDER BY arrival_ts")

    def summary(self, source: str = "client", run_suffix: str = "") -> pd.DataFrame:
        """Per run: completed and failed requests and TTFT/E2E percentiles (milliseconds)."""
        return self.sql(f"""
            SELECT run_id, any_value(policy) AS policy,
                   count(*) FILTER (WHERE status = 'ok') AS completed,
                   count(*) FILTER (WHERE status <> 'ok') AS failed,
                   round(1000 * median(ttft), 1) AS p50_ttft_ms,
                   round(1000 * quantile_cont(ttft, 0.99), 1) AS p99_ttft_ms,
                   round(1000 * median(e2e), 1) AS p50_e2e_ms,
                   round(1000 * quantile_cont(e2e, 0.99), 1) AS p99_e2e_ms,
                   round(1000 * median(tpot), 2) AS p50_tpot_ms
            FROM requests WHERE source = '{source}' AND run_id LIKE '%{run_suffix}'
            GROUP BY run_id ORDER BY min(arrival_ts)""")

    def rank_accuracy(self) -> pd.DataFrame:
        """Per run, from the counterfactual audit: how often the chosen instance was the best one (within
        2% + 10 ms, so that equally idle instances tie), how much later the request finished than on the
        best instance, and how well predicted E2E ranks the candidates."""
        return self.sql("""
            WITH a AS (SELECT *, min(oracle_ttft) OVER w AS best_ttft, min(oracle_e2e) OVER w AS best_e2e,
                              rank() OVER (PARTITION BY run_id, request_id ORDER BY predicted_e2e) AS predicted_rank,
                              rank() OVER (PARTITION BY run_id, request_id ORDER BY oracle_e2e) AS oracle_rank
                       FROM counterfactuals WINDOW w AS (PARTITION BY run_id, request_id))
            SELECT run_id, count(*) FILTER (WHERE chosen) AS audited_decisions,
                   avg(CASE WHEN oracle_ttft <= 1.02 * best_ttft + 0.01 THEN 1 ELSE 0 END) FILTER (WHERE chosen)
                       AS top1_ttft,
                   avg(CASE WHEN oracle_e2e <= 1.02 * best_e2e + 0.01 THEN 1 ELSE 0 END) FILTER (WHERE chosen)
                       AS top1_e2e,
                   avg(oracle_e2e - best_e2e) FILTER (WHERE chosen) AS mean_regret_e2e_s,
                   corr(predicted_rank, oracle_rank) AS rank_correlation_e2e
            FROM a GROUP BY run_id ORDER BY run_id""")
