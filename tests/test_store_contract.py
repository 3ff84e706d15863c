"""The store contract end to end with real parts: row dataclasses -> EventSink -> collector (uvicorn on
loopback) -> DuckDB file -> Reader, parameterised queries with hostile values, offline runs, and the
results dashboard opening the files the CLI writes."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path

import duckdb
import holoviews as hv
import httpx
import orjson
import panel as pn
import pytest

from block.events import EventSink
from block.offline import PRESETS, Honesty, Study
from store.collector import Store, StoreError, build_app
from store.read import Reader
from store.schema import (
    ROWS,
    TABLES,
    DecisionRow,
    InstanceSampleRow,
    ProvisioningRow,
    RequestRow,
    RunRow,
    create_all,
)
from tests.servers import serve
from workbench.cli import main as block_cli
from workbench.experiments import save_offline_run

HOSTILE = "o'brien'); DROP TABLE requests; --"


def request_row(request_id: str, *, run_id: str = "", source: str = "client", t: float = 1000.0) -> RequestRow:
    return RequestRow(run_id=run_id, request_id=request_id, source=source, instance="i0", policy="block",
                      arrival_ts=t, first_token_ts=t + 0.1, finish_ts=t + 1.0, prompt_tokens=10, output_tokens=5,
                      ttft=0.1, e2e=1.0, tpot=0.2)


def decision_row(request_id: str, ts: float) -> DecisionRow:
    return DecisionRow(request_id=request_id, ts=ts, policy="block", chosen="i0", decision_ms=0.5, target="e2e",
                       considered=2, asked=2, fallback="partial", predictor="live", predicted_ttft=0.09,
                       predicted_e2e=0.9, candidates="[]")


def emit_all(url: str, run_id: str, rows: list) -> EventSink:
    async def go() -> EventSink:
        sink = EventSink(url, run_id, interval=0.05)
        await sink.start()
        for row in rows:
            sink.emit(row)
        await sink.stop()
        return sink

    return asyncio.run(go())


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.TABLE)
def test_each_table_is_generated_from_its_row(row, tmp_path):
    fields = [f.name for f in dataclasses.fields(row)]
    assert TABLES[row.TABLE].names == fields
    with duckdb.connect(str(tmp_path / "schema.duckdb")) as con:
        create_all(con)
        ddl = con.execute(f"DESCRIBE {row.TABLE}").df()
    assert list(ddl["column_name"]) == fields
    assert dict(zip(ddl["column_name"], ddl["column_type"], strict=True)) == dict(TABLES[row.TABLE].columns)
    assert {c for c, key in zip(ddl["column_name"], ddl["key"], strict=True) if key == "PRI"} == set(row.PRIMARY_KEY)


def test_event_sink_collector_reader_round_trip(tmp_path):
    db = tmp_path / "ws.duckdb"
    now = time.time()
    rows = [
        RunRow(started_at=now, label="live", policy="block"),
        request_row("r1", t=now - 5), request_row("r1", source="scheduler", t=now - 5),
        request_row("r2", source="scheduler", t=now - 1),
        decision_row("r1", now - 5), decision_row("r2", now - 1),
        InstanceSampleRow(ts=now - 400, instance="i0", running=1, waiting=0, kv_usage=0.1, preemptions=0, tracked=1),
        InstanceSampleRow(ts=now - 2, instance="i0", running=3, waiting=2, kv_usage=0.5, preemptions=None, tracked=5),
        ProvisioningRow(ts=now - 3, action="add", instance="i1", reason="forecast", signal="qps", value=9.0,
                        threshold=8.0, status="ok", instances=2),
        ProvisioningRow(run_id="other", ts=now - 4, action="drain", instance="i9", reason="idle", signal="qps",
                        value=1.0, threshold=2.0, status="ok", instances=1),
    ]
    with serve(build_app(Store(db))) as url:
        sink = emit_all(url, "run-a", rows)
        assert (sink.sent, sink.rejected, sink.dropped) == (len(rows), 0, 0)
        live = Reader(collector_url=url)
        seen_live = {
            "runs": live.runs(), "client": live.requests("run-a"), "recent": live.recent_requests(limit=1),
            "decisions": live.recent_decisions(limit=10), "samples": live.instance_samples(since_ts=now - 300),
            "events": live.provisioning_events("run-a"), "times": live.decision_times_since(now - 3),
            "firsts": live.first_tokens_since(now - 3)}
    finished = Reader(db_path=db)  # the collector has closed the file: the same answers from it
    seen_file = {
        "runs": finished.runs(), "client": finished.requests("run-a"), "recent": finished.recent_requests(limit=1),
        "decisions": finished.recent_decisions(limit=10), "samples": finished.instance_samples(since_ts=now - 300),
        "events": finished.provisioning_events("run-a"), "times": finished.decision_times_since(now - 3),
        "firsts": finished.first_tokens_since(now - 3)}
    for seen in (seen_live, seen_file):
        assert list(seen["runs"]["run_id"]) == ["run-a"]
        assert list(seen["client"]["request_id"]) == ["r1"] and list(seen["client"]["source"]) == ["client"]
        assert list(seen["recent"]["request_id"]) == ["r2"]  # newest scheduler row first
        decisions = seen["decisions"]
        assert list(decisions["request_id"]) == ["r2", "r1"]
        assert decisions.iloc[0][["target", "considered", "asked", "fallback", "predictor"]].tolist() == [
            "e2e", 2, 2, "partial", "live"]
        assert list(seen["samples"]["running"]) == [3] and seen["samples"]["preemptions"].isna().all()
        assert list(seen["events"]["action"]) == ["add"]
        assert list(seen["times"].columns) == ["ts"] and seen["times"]["ts"].tolist() == pytest.approx([now - 1])
        assert seen["firsts"]["first_token_ts"].tolist() == pytest.approx([now - 0.9])
        assert seen["firsts"]["ttft"].tolist() == pytest.approx([0.1])
    assert set(finished.provisioning_events()["run_id"]) == {"run-a", "other"}


def test_a_row_that_breaks_the_contract_is_rejected_whole_and_not_retried(tmp_path):
    db = tmp_path / "ws.duckdb"
    bad = dataclasses.replace(request_row("r-bad"), prompt_tokens="many")  # dataclasses do not check types
    with serve(build_app(Store(db))) as url:
        sink = emit_all(url, "run-a", [request_row("r-good"), bad, decision_row("r-good", 1.0)])
        assert (sink.sent, sink.rejected) == (0, 3)
        sink = emit_all(url, "run-a", [request_row("r-later")])  # a rejected batch does not block later rows
        assert sink.sent == 1
        resp = httpx.post(url + "/events", content=orjson.dumps({"decisions": [{"run_id": "x", "fallback": False}]}))
        assert resp.status_code == 400
        message = resp.json()["error"]["message"]
        assert "missing columns" in message and "fallback must be str, got bool" in message
        reader = Reader(collector_url=url)
        assert reader.sql("SELECT request_id FROM requests")["request_id"].tolist() == ["r-later"]
        assert reader.sql("SELECT count(*) AS n FROM decisions")["n"].tolist() == [0]


def test_store_insert_names_what_was_wrong(tmp_path):
    store = Store(tmp_path / "ws.duckdb")
    try:
        with pytest.raises(StoreError, match=r"unknown table 'request'"):
            store.insert("request", [{}])
        with pytest.raises(StoreError, match=r"table runs: row 0: unknown columns \['colour'\]"):
            store.insert("runs", [{"run_id": "a", "started_at": 0.0, "label": "x", "policy": "p", "colour": 1}])
        with pytest.raises(StoreError, match=r"row 1: missing columns \['label', 'policy'\]"):
            store.insert("runs", [{"run_id": "a", "started_at": 0.0, "label": "x", "policy": "p"},
                                  {"run_id": "b", "started_at": 0.0}])
        with pytest.raises(StoreError, match=r"run_id must not be null"):
            store.insert("runs", [{"run_id": None, "started_at": 0.0, "label": "x", "policy": "p"}])
        with pytest.raises(StoreError, match=r"insert_rows takes store.schema row dataclasses, got dict"):
            store.insert_rows([{"run_id": "a"}])  # type: ignore[list-item]
        assert store.insert_rows([RunRow(run_id="a", started_at=0.0, label="x", policy="p"),
                                  request_row("r1", run_id="a")]) == 2
        assert store.query("SELECT count(*) AS n FROM runs").frame()["n"].tolist() == [1]
    finally:
        store.close()


def test_parameterised_queries_take_hostile_values_as_data(tmp_path):
    db = tmp_path / "ws.duckdb"
    tricky = ["plain", HOSTILE, "a_b", "axb", "100%"]
    with serve(build_app(Store(db))) as url:
        for run_id in tricky:
            emit_all(url, run_id, [request_row("r1")])
        live = Reader(collector_url=url)
        assert live.requests(HOSTILE)["run_id"].tolist() == [HOSTILE]
        assert live.summary(run_suffix="_b")["run_id"].tolist() == ["a_b"]  # "_" is no wildcard
        assert live.summary(run_suffix="%")["run_id"].tolist() == ["100%"]
        assert live.summary(run_suffix="; --")["run_id"].tolist() == [HOSTILE]
        resp = httpx.post(url + "/query", content=orjson.dumps(
            {"sql": "SELECT count(*) AS n FROM requests WHERE run_id = ?", "params": [HOSTILE]}))
        assert resp.json()["rows"] == [[1]]
        resp = httpx.post(url + "/query", content=orjson.dumps({"sql": "SELECT ?", "params": [{"a": 1}]}))
        assert resp.status_code == 400 and "params must be a list of scalars" in resp.json()["error"]["message"]
        resp = httpx.post(url + "/query", content=orjson.dumps({"sql": "DROP TABLE requests"}))
        assert resp.status_code == 400 and "only SELECT" in resp.json()["error"]["message"]
    finished = Reader(db_path=db)
    assert finished.requests(HOSTILE)["run_id"].tolist() == [HOSTILE]
    assert sorted(finished.summary()["run_id"]) == sorted(tricky)  # nothing was dropped


def test_offline_run_fills_the_same_tables_as_a_live_one(tmp_path):
    result = Study(PRESETS["demo"], "synthetic", 60, Honesty(), audit_every=10).run("block", 4.0, 0)
    store = Store(tmp_path / "offline.duckdb")
    try:
        assert save_offline_run(store, HOSTILE, "block", result.records, result.decisions, result.audit) == 60
    finally:
        store.close()
    reader = Reader(db_path=tmp_path / "offline.duckdb")
    assert reader.runs()[["run_id", "label"]].values.tolist() == [[HOSTILE, "offline"]]
    assert reader.summary(source="sim")["completed"].tolist() == [60]
    decisions = reader.recent_decisions(limit=1000)
    assert len(decisions) == 60 and set(decisions["fallback"]) <= {"none", "partial", "all"}
    assert (decisions["target"] == "e2e").all() and (decisions["asked"] > 0).all()
    outcomes = reader.decision_outcomes(HOSTILE, source="sim")
    assert len(outcomes) == 60 and outcomes["e2e"].notna().all()
    accuracy = reader.rank_accuracy(HOSTILE)
    assert accuracy["audited_decisions"].tolist() == [6]


def _alerts(template: pn.template.BaseTemplate) -> list[str]:
    return [o.object for o in template.main.objects if isinstance(o, pn.pane.Alert)]


def test_results_dashboard_opens_what_the_cli_writes(tmp_path):
    from dashboards import results

    cli = ["--preset", "demo", "--requests", "40", "--policies", "round_robin,least_requests", "--seeds", "0"]
    capacity, latency = tmp_path / "capacity.csv", tmp_path / "compare.csv"
    assert block_cli(["capacity", *cli, "--slo", "3", "--lo", "1", "--hi", "8", "--csv", str(capacity)]) == 0
    assert block_cli(["compare", *cli, "--qps", "2,4", "--csv", str(latency)]) == 0
    store = Store(tmp_path / "ws.duckdb")
    store.insert_rows([request_row("r1", run_id="run-a"), request_row("r2", run_id="run-a", t=1001.0)])
    store.close()
    reader = Reader(db_path=tmp_path / "ws.duckdb")

    page = results.build(reader, str(capacity), str(latency))
    assert _alerts(page) == []
    plotted = [o.object for o in page.main.objects if isinstance(o, pn.pane.HoloViews)]
    assert any(isinstance(p, hv.Bars) for p in plotted)
    assert sum(isinstance(p, hv.Overlay) for p in plotted) == 2  # P99 TTFT and E2E against QPS

    old = tmp_path / "old_capacity.csv"
    old.write_text("policy,seed,slo_s,capacity_qps\nblock,0,3.0,9.5\n")
    page = results.build(reader, str(old), str(capacity))  # the wrong files: messages, not a blank page
    messages = _alerts(page)
    assert len(messages) == 2
    assert "lacks the columns ['slo_ttft_p99_s']" in messages[1] and "block capacity --csv" in messages[1]
    assert "lacks the columns ['qps', 'p99_ttft', 'p99_e2e']" in messages[0]
    assert "cannot read" in _alerts(results.build(reader, str(tmp_path / "missing.csv"), None))[0]


def test_reader_without_a_database_says_where_it_looked(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no workspace database"):
        Reader(db_path=tmp_path / "none.duckdb").runs()
