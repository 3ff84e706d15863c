"""The collector under abuse, with real parts: DuckDB files, uvicorn on loopback, a collector process.

Hostile queries are refused and change nothing; a runaway query is interrupted at the time limit while
ingest and /health keep answering; results are capped; a resent batch adds nothing to any table; a batch
that cannot be written whole writes nothing; bodies and snapshot names are bounded; with a cluster token
configured, nothing but /health answers without it.
"""

from __future__ import annotations

import asyncio
import copy
import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import pyarrow.parquet as pq
import pytest

from block.events import EventSink, split_batch
from store.auth import TOKEN_ENV, TOKEN_FILE_ENV
from store.collector import MAX_BODY_BYTES, Store, StoreError, build_app
from store.collector import main as collector_main
from store.read import Reader
from store.schema import (
    TABLES,
    CounterfactualRow,
    DecisionRow,
    InstanceSampleRow,
    ProvisioningRow,
    RequestRow,
    Row,
    RunRow,
    ServiceEventRow,
    SweepCellRow,
)
from tests.servers import serve
from workbench.cluster import free_port

REPO = Path(__file__).resolve().parents[1]
RUNAWAY = "SELECT count(*) FROM range(1000000000000)"  # 10^12 rows: hours of work


def every_table(i: int) -> list[Row]:
    """One row for each table of the contract, all of run ``run-<i>``."""
    run, t = f"run-{i}", 1000.0 + i
    rows: list[Row] = [
        RunRow(run_id=run, started_at=t, label="live", policy="block"),
        RequestRow(run_id=run, request_id=f"r{i}", source="scheduler", instance="i0", policy="block", arrival_ts=t,
                   first_token_ts=t + 0.1, finish_ts=t + 1.0, prompt_tokens=10, output_tokens=5, ttft=0.1, e2e=1.0),
        DecisionRow(run_id=run, request_id=f"r{i}", ts=t, policy="block", chosen="i0", decision_ms=0.5, target="e2e",
                    considered=2, asked=2, fallback="none", predictor="live", predicted_ttft=0.1, predicted_e2e=1.0,
                    candidates="[]"),
        CounterfactualRow(run_id=run, request_id=f"r{i}", instance="i0", chosen=True, predicted_ttft=0.1,
                          predicted_e2e=1.0, oracle_ttft=0.1, oracle_e2e=1.0),
        InstanceSampleRow(run_id=run, ts=t, instance="i0", running=1, waiting=0, kv_usage=0.1, preemptions=0,
                          tracked=1),
        ProvisioningRow(run_id=run, ts=t, action="add", instance="i1", reason="forecast", signal="qps", value=9.0,
                        threshold=8.0, status="ok", instances=2),
        ServiceEventRow(run_id=run, ts=t, service="collector", host="localhost", event="started"),
        SweepCellRow(run_id=run, cell=f"c{i}", policy="block", workload="synthetic", preset="demo", instances=4,
                     max_num_seqs=64, max_num_batched_tokens=512, qps=4.0, seed=0, mode="honest", config="{}",
                     gave_up=False, completed=10, p50_ttft=0.1, p99_ttft=0.2, p50_e2e=1.0, p99_e2e=2.0, goodput=None,
                     request_throughput=4.0, preemptions=0, wall_s=0.5, finished_at=t),
    ]
    assert [r.TABLE for r in rows] == list(TABLES)
    return rows


def batch_of(rows: list[Row]) -> dict[str, list[dict]]:
    batch: dict[str, list[dict]] = {}
    for row in rows:
        batch.setdefault(row.TABLE, []).append(row.to_dict())
    return batch


def counts(url: str) -> dict[str, int]:
    sql = "SELECT " + ", ".join(f"(SELECT count(*) FROM {table}) AS {table}" for table in TABLES)
    return Reader(collector_url=url).sql(sql).iloc[0].to_dict()


def emit_all(url: str, run_id: str, rows: list[Row], **sink_options: float) -> EventSink:
    async def go() -> EventSink:
        sink = EventSink(url, run_id, interval=0.05, **sink_options)  # type: ignore[arg-type]
        await sink.start()
        for row in rows:
            sink.emit(row)
        await sink.stop()
        return sink

    return asyncio.run(go())


def post_query(url: str, sql: str, params: list | None = None, **kwargs: float) -> httpx.Response:
    return httpx.post(url + "/query", content=orjson.dumps({"sql": sql, "params": params or []}), **kwargs)


# (query, a fragment of the collector's reason); {out} is a folder outside the workspace holding file.csv
HOSTILE_QUERIES = [
    ("SELECT * FROM read_text('/etc/passwd')", "file system operations are disabled"),
    ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
    ("SELECT * FROM read_csv('{out}/file.csv')", "file system operations are disabled"),
    ("SELECT * FROM glob('/root/*')", "file system operations are disabled"),
    ("SELECT * FROM read_parquet('{out}/*.parquet')", "file system operations are disabled"),
    ("SELECT * FROM read_text('http://127.0.0.1:9/secret')", "file system operations are disabled"),
    ("SELECT * FROM '{out}/file.csv'", "file system operations are disabled"),
    ("SELECT * FROM 'file.csv'", "file system operations are disabled"),
    ("SELECT 1; COPY (SELECT 1) TO '{out}/copied.csv'", "exactly one statement, got 2"),
    ("SELECT 1; SELECT 2", "exactly one statement, got 2"),
    ("COPY (SELECT 1) TO '{out}/copied.csv'", "of type COPY"),
    ("COPY requests TO '{out}/requests.parquet' (FORMAT PARQUET)", "of type COPY"),
    ("EXPORT DATABASE '{out}/export'", "of type EXPORT"),
    ("DROP TABLE requests", "of type DROP"),
    ("DELETE FROM requests", "of type DELETE"),
    ("UPDATE requests SET status = 'forged'", "of type UPDATE"),
    ("INSERT INTO runs (run_id, started_at, label, policy) VALUES ('forged', 0, 'x', 'y')", "of type INSERT"),
    ("CREATE TABLE forged (a INTEGER)", "of type CREATE"),
    ("CREATE TABLE forged AS SELECT * FROM requests", "of type CREATE"),
    ("ATTACH '{out}/other.duckdb' AS other", "of type ATTACH"),
    ("DETACH ws", "of type DETACH"),
    ("SET threads = 1", "of type SET"),
    ("SET enable_external_access = true", "of type SET"),
    ("RESET threads", "of type SET"),
    ("INSTALL httpfs", "of type LOAD"),
    ("LOAD httpfs", "of type LOAD"),
    ("PRAGMA version", "of type PRAGMA"),
    ("PRAGMA enable_profiling", "of type PRAGMA"),
    ("CALL pragma_version()", "of type CALL"),
    ("CHECKPOINT", "of type CALL"),
    ("BEGIN TRANSACTION", "of type TRANSACTION"),
    ("VACUUM", "of type VACUUM"),
    ("WITH gone AS (DELETE FROM requests RETURNING *) SELECT count(*) FROM gone", "read-only mode"),
    ("SELECT * FROM query('DROP TABLE requests')", "single SELECT statement"),
    ("", "exactly one statement, got 0"),
    ("-- only a comment", "exactly one statement, got 0"),
    ("SELEC 1", "query does not parse"),
]

STATE = ("SELECT " + ", ".join(f"(SELECT count(*) FROM {table}) AS {table}" for table in TABLES)
         + ", (SELECT count(*) FROM requests WHERE status = 'forged') AS forged"
         + ", (SELECT list(table_name ORDER BY table_name) FROM information_schema.tables) AS tables"
         + ", (SELECT list(database_name ORDER BY database_name) FROM duckdb_databases()) AS databases"
         + ", current_setting('threads') AS threads"
         + ", current_setting('enable_external_access') AS external_access")


@pytest.fixture(scope="module")
def hostile_target(tmp_path_factory: pytest.TempPathFactory):
    """A collector holding one row per table, and a folder outside its workspace a query might reach."""
    workspace, outside = tmp_path_factory.mktemp("ws"), tmp_path_factory.mktemp("outside")
    (outside / "file.csv").write_text("a,b\n1,2\n")
    store = Store(workspace / "ws.duckdb")
    store.insert_rows(every_table(0))
    with serve(build_app(store)) as url:
        yield url, outside, post_query(url, STATE).json()


@pytest.mark.parametrize(("sql", "reason"), HOSTILE_QUERIES, ids=[q for q, _ in HOSTILE_QUERIES])
def test_a_hostile_query_is_refused_and_changes_nothing(hostile_target, sql, reason):
    url, outside, before = hostile_target
    resp = post_query(url, sql.format(out=outside))
    assert resp.status_code == 400, resp.text
    assert reason in resp.json()["error"]["message"]
    assert post_query(url, STATE).json() == before
    assert sorted(p.name for p in outside.iterdir()) == ["file.csv"]


def test_a_runaway_query_is_interrupted_while_ingest_and_health_answer(tmp_path):
    limit_s = 2.0
    store = Store(tmp_path / "ws.duckdb", query_timeout_s=limit_s)
    outcome: dict[str, object] = {}

    def runaway(url: str) -> None:
        start = time.monotonic()
        outcome["response"] = post_query(url, RUNAWAY, timeout=30.0)
        outcome["took"] = time.monotonic() - start

    with serve(build_app(store)) as url:
        thread = threading.Thread(target=runaway, args=(url,))
        thread.start()
        deadline = time.monotonic() + 5.0
        while not store.running:
            assert time.monotonic() < deadline, "the runaway query never started"
            time.sleep(0.01)
        posted, slowest = 0, 0.0
        with httpx.Client(timeout=5.0) as client:
            while thread.is_alive():
                start = time.monotonic()
                health = client.get(url + "/health")
                sample = InstanceSampleRow(run_id="ingest", ts=float(posted), instance="i0", running=1, waiting=0,
                                           kv_usage=0.1, preemptions=0, tracked=1)
                ingest = client.post(url + "/events", content=orjson.dumps({"instance_samples": [sample.to_dict()]}))
                slowest = max(slowest, time.monotonic() - start)
                assert (health.status_code, ingest.status_code) == (200, 200)
                posted += 1
                time.sleep(0.05)
        thread.join()
        resp = outcome["response"]
        assert isinstance(resp, httpx.Response) and resp.status_code == 504
        assert "interrupted after 2 s, the collector's time limit" in resp.json()["error"]["message"]
        assert limit_s <= outcome["took"] < limit_s + 2.0  # type: ignore[operator]
        assert posted >= 10 and slowest < limit_s / 2  # each ingest and probe answered while the query ran
        assert counts(url)["instance_samples"] == posted
        assert post_query(url, "SELECT 42 AS answer").json()["rows"] == [[42]]  # the collector is fine after


def test_a_query_whose_client_left_stops_and_extra_queries_are_turned_away(tmp_path):
    store = Store(tmp_path / "ws.duckdb", query_timeout_s=60.0)
    with serve(build_app(store, max_queries=1)) as url:
        left: list[Exception] = []

        def impatient() -> None:
            try:
                post_query(url, RUNAWAY, timeout=1.5)
            except httpx.TimeoutException as exc:
                left.append(exc)

        thread = threading.Thread(target=impatient)
        thread.start()
        deadline = time.monotonic() + 5.0
        while not store.running:
            assert time.monotonic() < deadline, "the runaway query never started"
            time.sleep(0.01)
        busy = post_query(url, "SELECT 1", timeout=5.0)
        assert busy.status_code == 503 and "already running 1 queries" in busy.json()["error"]["message"]
        thread.join()
        assert left, "the client should have given up after 1.5 s"
        deadline = time.monotonic() + 5.0  # far below the 60 s limit: the query stops because its client left
        while store.running:
            assert time.monotonic() < deadline, "the abandoned query is still running"
            time.sleep(0.05)
        assert post_query(url, "SELECT 1 AS one").json()["rows"] == [[1]]


def test_results_are_capped_and_say_so(tmp_path):
    with serve(build_app(Store(tmp_path / "ws.duckdb", max_rows=1000))) as url:
        capped = post_query(url, "SELECT range AS i FROM range(?)", [5000]).json()
        assert (len(capped["rows"]), capped["rows"][-1], capped["truncated"]) == (1000, [999], True)
        whole = post_query(url, "SELECT range AS i FROM range(?)", [1000]).json()
        assert (len(whole["rows"]), whole["truncated"]) == (1000, False)
        with pytest.raises(ValueError, match=r"cut the result at its row cap \(1000 rows\)"):
            Reader(collector_url=url).sql("SELECT range FROM range(2000)")


def test_a_resent_batch_adds_nothing_to_any_table(tmp_path):
    rows = every_table(1)
    body = orjson.dumps(batch_of(rows))
    with serve(build_app(Store(tmp_path / "ws.duckdb"))) as url:
        first, again = httpx.post(url + "/events", content=body), httpx.post(url + "/events", content=body)
        assert first.json()["inserted"] == dict.fromkeys(TABLES, 1)
        assert again.json()["inserted"] == dict.fromkeys(TABLES, 0)
        sink = emit_all(url, "run-1", rows)  # the same rows through a sink: their event ids are known
        assert (sink.sent, sink.rejected) == (len(rows), 0)
        assert counts(url) == dict.fromkeys(TABLES, 1)
        resp = httpx.post(url + "/events", content=orjson.dumps({"decisions": [
            {k: v for k, v in rows[2].to_dict().items() if k != "event_id"}]}))
        assert resp.status_code == 400 and "missing columns ['event_id']" in resp.json()["error"]["message"]


def test_a_batch_half_new_half_resent_gains_only_its_new_rows(tmp_path):
    """The fast path (a plain INSERT) meets the resent half's keys, rolls back and writes with the conflict
    check: every table gains exactly its new rows, and none is written twice."""
    old, new = every_table(1), every_table(2)
    store = Store(tmp_path / "ws.duckdb")
    assert store.insert_batch(batch_of(old)) == dict.fromkeys(TABLES, 1)
    mixed = {table: batch_of(old)[table] + batch_of(new)[table] for table in TABLES}
    assert store.insert_batch(mixed) == dict.fromkeys(TABLES, 1)
    assert {t: store.query(f"SELECT count(*) AS n FROM {t}").rows[0][0] for t in TABLES} == dict.fromkeys(TABLES, 2)


def test_nan_is_stored_as_null_and_a_value_past_its_column_type_is_a_named_error(tmp_path):
    store = Store(tmp_path / "ws.duckdb")
    row = every_table(1)[1].to_dict()
    store.insert_batch({"requests": [{**row, "ttft": float("nan")}]})
    assert store.query("SELECT ttft IS NULL FROM requests").rows == [(True,)]
    with pytest.raises(StoreError, match="table requests: column prompt_tokens holds a value its type"):
        store.insert_batch({"requests": [{**row, "request_id": "r-huge", "prompt_tokens": 2**70}]})
    assert store.query("SELECT count(*) FROM requests").rows == [(1,)]


def test_a_batch_resent_after_a_timeout_is_written_once(tmp_path):
    store = Store(tmp_path / "ws.duckdb")
    rows = every_table(2)

    async def go(url: str) -> EventSink:
        sink = EventSink(url, "run-2", interval=3600.0, timeout=0.5)
        await sink.start()
        for row in rows:
            sink.emit(row)
        with store._lock:  # the writer is busy: the batch waits past the sink's timeout, then is written
            await sink.flush()
        assert (sink.sent, sink.rejected) == (0, 0)  # kept for the next flush
        deadline = time.monotonic() + 5.0
        while sum(counts(url).values()) < len(rows):
            assert time.monotonic() < deadline, "the timed-out batch was never written"
            await asyncio.sleep(0.05)
        await sink.stop()  # flushes the kept rows again
        return sink

    with serve(build_app(store)) as url:
        sink = asyncio.run(go(url))
        assert (sink.sent, sink.rejected) == (len(rows), 0)
        assert counts(url) == dict.fromkeys(TABLES, 1)


def test_a_batch_that_cannot_be_written_whole_writes_nothing(tmp_path):
    batch = batch_of(every_table(3))
    with serve(build_app(Store(tmp_path / "ws.duckdb"))) as url:
        bad_row = copy.deepcopy(batch)
        bad_row["service_events"][0]["ts"] = "yesterday"
        resp = httpx.post(url + "/events", content=orjson.dumps(bad_row))
        assert resp.status_code == 400
        assert "table service_events: row 0: ts must be float, got str 'yesterday'" in resp.json()["error"]["message"]
        # within the contract (an int) but not within the column (INTEGER is 32 bits): DuckDB refuses it after
        # five tables were written in the same transaction, which is rolled back
        too_wide = copy.deepcopy(batch)
        too_wide["provisioning"][0]["instances"] = 2**40
        resp = httpx.post(url + "/events", content=orjson.dumps(too_wide))
        assert resp.status_code == 400
        message = resp.json()["error"]["message"]
        assert message.startswith("table provisioning: the batch could not be written, nothing was")
        assert "INT32" in message
        assert counts(url) == dict.fromkeys(TABLES, 0)
        assert httpx.post(url + "/events", content=orjson.dumps(batch)).json()["inserted"] == dict.fromkeys(TABLES, 1)


def test_a_backlog_is_sent_in_batches_under_the_size_limit(tmp_path):
    rows = [ServiceEventRow(ts=float(i), service="s", host="h", event="started", detail="x" * 100) for i in range(60)]
    head, rest = split_batch(batch_of(rows), 2000)
    assert 0 < len(orjson.dumps(head)) <= 2000 and len(head["service_events"]) + len(rest["service_events"]) == 60
    alone, _ = split_batch(batch_of(rows), 10)  # one row over the limit still goes (and is refused, reported)
    assert len(alone["service_events"]) == 1
    with serve(build_app(Store(tmp_path / "ws.duckdb"), max_body_bytes=2000)) as url:
        sink = emit_all(url, "run-4", rows, max_batch_bytes=2000)
        assert (sink.sent, sink.rejected) == (60, 0)
        assert counts(url)["service_events"] == 60


def test_an_oversize_body_is_refused_naming_the_limit(tmp_path):
    oversize = b" " * (MAX_BODY_BYTES + 1)
    with serve(build_app(Store(tmp_path / "ws.duckdb"))) as url:
        for path in ("/events", "/query", "/snapshot"):
            resp = httpx.post(url + path, content=oversize)
            assert resp.status_code == 413, path
            assert "over the collector's limit of 8388608 bytes (8 MiB)" in resp.json()["error"]["message"]
        chunked = httpx.post(url + "/events", content=iter([b" " * 2**20] * 9))  # no Content-Length to trust
        assert chunked.status_code == 413
        assert httpx.get(url + "/health").status_code == 200


def test_snapshots_go_only_under_the_workspace(tmp_path):
    workspace = tmp_path / "ws"
    store = Store(workspace / "ws.duckdb")
    store.insert_rows(every_table(5))
    bad_names = ["../x", "/etc", "a'b", "..", "a..b", "", ".hidden", "x/y", "a" * 65, "with space", "x\n", 7, None]
    with serve(build_app(store)) as url:
        for name in bad_names:
            resp = httpx.post(url + "/snapshot", content=orjson.dumps({"name": name}))
            assert resp.status_code == 400, name
            assert "a snapshot name is 1-64 letters" in resp.json()["error"]["message"]
        assert not (workspace / "snapshots").exists() and not (workspace / "x").exists()
        resp = httpx.post(url + "/snapshot", content=orjson.dumps({"name": "run-5.final"}))
        assert resp.status_code == 200, resp.text
    folder = workspace / "snapshots" / "run-5.final"
    assert resp.json()["files"] == [str(folder / f"{table}.parquet") for table in TABLES]
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{table}.parquet" for table in TABLES)
    for table, spec in TABLES.items():
        written = pq.read_table(folder / f"{table}.parquet")
        assert (written.num_rows, written.column_names) == (1, spec.names)


def test_with_a_cluster_token_the_collector_answers_only_to_it(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv(TOKEN_FILE_ENV, raising=False)
    db = tmp_path / "ws.duckdb"
    with pytest.raises(ValueError, match=r"refusing to listen on 0\.0\.0\.0 without a cluster token"):
        collector_main(["--db", str(db), "--host", "0.0.0.0", "--port", str(free_port())])
    assert not db.exists()

    token, port = secrets.token_hex(16), free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "store.collector", "--db", str(db), "--port", str(port)],
                            cwd=REPO, env={**os.environ, TOKEN_ENV: token})
    try:
        deadline = time.monotonic() + 60.0
        while True:
            assert proc.poll() is None, "the collector exited"
            assert time.monotonic() < deadline, "the collector did not start"
            try:
                if httpx.get(url + "/health").status_code == 200:  # /health needs no token
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        row = every_table(6)[0]
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": token}):
            for path, body in (("/events", batch_of([row])), ("/query", {"sql": "SELECT 1"}),
                               ("/snapshot", {"name": "s"})):
                resp = httpx.post(url + path, content=orjson.dumps(body), headers=headers)
                assert resp.status_code == 401, (path, headers)
        with pytest.raises(ValueError, match=r"collector query failed \(401\)"):
            Reader(collector_url=url).sql("SELECT 1")
        monkeypatch.setenv(TOKEN_ENV, token)  # what the services of the cluster have
        sink = emit_all(url, "run-6", [row])
        assert (sink.sent, sink.rejected) == (1, 0)
        assert Reader(collector_url=url).runs()["run_id"].tolist() == ["run-6"]
        resp = httpx.post(url + "/snapshot", content=orjson.dumps({"name": "s"}),
                          headers={"authorization": f"Bearer {token}"})
        assert resp.status_code == 200 and (tmp_path / "snapshots" / "s" / "runs.parquet").exists()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_journalled_sink_killed_before_it_flushed_loses_nothing(tmp_path):
    """Rows emitted by a process that dies before its next flush are in its journal; the next process with
    that journal sends them, and the collector keeps one copy of each."""
    store = Store(tmp_path / "ws.duckdb")
    with serve(build_app(store)) as url:
        dead = EventSink(url, "j", journal=tmp_path / "journal")
        rows = [InstanceSampleRow(ts=float(i), instance="a", running=1, waiting=0, kv_usage=0.1, preemptions=0,
                                  tracked=1) for i in range(5)]
        for row in rows:
            dead.emit(row)  # never flushed: as if SIGKILLed right after answering
        again = EventSink(url, "j", journal=tmp_path / "journal")

        async def restart():
            await again.start()
            again.emit(rows[0])  # a duplicate of a journalled row: still one copy
            await again.stop()

        asyncio.run(restart())
        got = Reader(collector_url=url).sql("SELECT ts FROM instance_samples ORDER BY ts")
        assert got["ts"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
        assert all(p.stat().st_size == 0 for p in (tmp_path / "journal").glob("*.jsonl"))  # answered: gone
