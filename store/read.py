"""Read helpers for dashboards, notebooks and the autoscaler: through the collector while it runs, else the file.

Every query the project runs against the store lives here, as a method with ``?`` parameters: callers
never paste values into SQL (a run id with a quote in it is data, not syntax), and a schema change is
one file to review. Summaries are computed in SQL so a dashboard refreshing every second stays cheap.
Live results come from the collector as Arrow IPC (typed columns, no row-by-row JSON), so a live frame
has the dtypes a frame read from the file has. The collector returns at most its row cap (100,000 by
default); a result it had to cut is an error here, not a silently partial frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb
import httpx
import orjson
import pandas as pd
import pyarrow as pa

from store.auth import cluster_token
from store.collector import TRUNCATED_HEADER

Param = str | int | float | bool | None



@dataclass(frozen=True)
class _Tail:
    """What the live dashboard tails of one table: its time column (a row's "when" on the wall clock), the
    columns it plots and the rows it wants. SQL text from here only, never from a caller."""

    source: str
    ts: str
    columns: str
    where: str = "TRUE"
    prefix: str = ""  # the qualifier of run_id and policy in a join
    has_policy: bool = True


_TAILS: dict[str, _Tail] = {
    "requests": _Tail("requests", "coalesce(finish_ts, arrival_ts)", "request_id, policy, instance, status, "
                      "error, arrival_ts, finish_ts, ttft, e2e, output_tokens", "source = 'scheduler'"),
    "decisions": _Tail("decisions", "ts", "event_id, request_id, ts, policy, chosen, fallback, predictor, "
                       "predicted_e2e"),
    "instance_samples": _Tail("instance_samples", "ts", "event_id, ts, instance, running, waiting, kv_usage",
                              has_policy=False),
    "provisioning": _Tail("provisioning", "ts", "event_id, ts, action, instance, signal, value, threshold, "
                          "instances", has_policy=False),
    "outcomes": _Tail("decisions d JOIN requests r USING (run_id, request_id)", "r.finish_ts",
                      "request_id, d.policy, d.ts, r.finish_ts, d.predicted_e2e, r.e2e",
                      "r.source = 'scheduler' AND r.status = 'ok' AND d.predicted_e2e IS NOT NULL", "d."),
    # requests with their routing decision, in one read: what the live dashboard polls every second
    "routed": _Tail("requests r LEFT JOIN decisions d USING (run_id, request_id)",
                    "coalesce(r.finish_ts, r.arrival_ts)",
                    "request_id, r.policy, r.instance, r.status, r.ttft, r.e2e, r.output_tokens, d.fallback, "
                    "d.predicted_e2e", "r.source = 'scheduler'", "r."),
}
TAIL_TABLES = tuple(_TAILS)


def _plain(table: pa.Table) -> pd.DataFrame:
    """Arrow to pandas with DECIMAL (avg, round, sum of integers) as float64, as DuckDB's own ``df()`` gives."""
    decimal = [i for i, f in enumerate(table.schema) if pa.types.is_decimal(f.type)]
    for i in decimal:
        table = table.set_column(i, table.schema.field(i).name, table.column(i).cast(pa.float64()))
    return table.to_pandas()


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
        self._client: httpx.Client | None = None  # made on first use: one pooled connection, not one per query

    def close(self) -> None:
        """Close the pooled connection to the collector (a Reader used once may skip this)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    def sql(self, query: str, params: Sequence[Param] | None = None) -> pd.DataFrame:
        """Run a read-only query with DuckDB ``?`` parameters, on the collector (live) or the file."""
        return _plain(self.arrow(query, params))

    def arrow(self, query: str, params: Sequence[Param] | None = None) -> pa.Table:
        """As ``sql``, as an Arrow table: the collector's IPC stream as it came, or the file's result."""
        args = list(params or ())
        if self.collector_url is not None:
            if self._client is None:
                self._client = httpx.Client(headers=self._headers, timeout=30.0)
            resp = self._client.post(self.collector_url + "/query",
                                     content=orjson.dumps({"sql": query, "params": args, "format": "arrow"}))
            if resp.status_code != 200:
                raise ValueError(f"collector query failed ({resp.status_code}): {resp.text[:300]}")
            table = pa.ipc.open_stream(resp.content).read_all()
            if resp.headers.get(TRUNCATED_HEADER) == "true":
                raise ValueError(f"collector cut the result at its row cap ({table.num_rows} rows): narrow the "
                                 "query, or read a snapshot or the finished workspace's file")
            return table
        assert self.db_path is not None
        if not self.db_path.exists():
            raise FileNotFoundError(f"no workspace database at {self.db_path}")
        with duckdb.connect(str(self.db_path), read_only=True) as con:
            return con.sql(query, params=args).to_arrow_table()

    def tail(self, table: str, since: float, *, run_id: str | None = None, policy: str | None = None,
             limit: int = 5000) -> pd.DataFrame:
        """Rows of ``table`` (one of TAIL_TABLES) whose time column is after ``since`` (epoch seconds), oldest
        first, at most ``limit``, of one run and policy or of all: the live dashboard's incremental read.

        ``outcomes`` are routing decisions joined to what the scheduler then measured (predicted vs realised
        E2E), timed by the request's finish; ``routed`` are the scheduler's requests with their decision's
        fallback and predicted E2E (NULL where none), timed as ``requests``. Rows reach the store in batches,
        so a caller asks again from a little before its last time and drops the rows it has already seen."""
        if table not in _TAILS:
            raise ValueError(f"tail: unknown table {table!r}; one of {', '.join(_TAILS)}")
        t = _TAILS[table]
        where = f"{t.ts} > ? AND {t.where} AND (? IS NULL OR {t.prefix}run_id = ?)"
        params: list[Param] = [float(since), run_id, run_id]
        if t.has_policy:
            where, params = where + f" AND (? IS NULL OR {t.prefix}policy = ?)", [*params, policy, policy]
        return self.sql(f"SELECT {t.ts} AS t, {t.columns} FROM {t.source} WHERE {where} ORDER BY t LIMIT ?",
                        [*params, int(limit)])

    def live_runs(self) -> pd.DataFrame:
        """Runs and policies that routed requests, newest last: the live dashboard's selector."""
        return self.sql("SELECT run_id, policy, count(*) AS decisions, max(ts) AS last_ts FROM decisions "
                        "GROUP BY run_id, policy ORDER BY last_ts")

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

    def sweep_cells(self, sweep: str | None = None) -> pd.DataFrame:
        """The finished cells of one sweep (``run_id`` is the sweep's name) or of all, in the order they finished."""
        return self.sql("SELECT * FROM sweep_cells WHERE ? IS NULL OR run_id = ? ORDER BY run_id, finished_at",
                        [sweep, sweep])
