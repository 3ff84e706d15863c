"""What the collector spends writing event batches (store.collector.Store). Prints a table and a RESULT line.

Every service posts its rows every 0.25 s (block.events.EventSink), so a live cluster hands the collector
a few small batches per service per second; what a small batch costs, not how many rows a big one
carries, is what keeps the collector (the single DuckDB writer) busy on a small machine. Measured here, on
a real DuckDB file:

- small: batches of three requests rows (a service's flush under light load): CPU ms per batch;
- resent: the same batches posted again (a sink whose answer timed out): CPU ms per batch, each written
  with the conflict check after the plain insert met its keys;
- bulk: batches of 2,000 rows of requests, decisions and samples (a backlog after an outage): rows/s.

CPU is this process's user + system time, so DuckDB's worker threads count. --quick: fewer batches.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import pandas as pd

from store.collector import Store
from store.schema import DecisionRow, InstanceSampleRow, RequestRow


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def request(run: str, i: int) -> dict:
    return RequestRow(run_id=run, request_id=f"r{i}", source="scheduler", instance="i0", policy="block",
                      arrival_ts=1000.0 + i, first_token_ts=1000.1 + i, finish_ts=1001.0 + i, prompt_tokens=100,
                      output_tokens=50, ttft=0.1, e2e=1.0, status="ok").to_dict()


def decision(run: str, i: int) -> dict:
    return DecisionRow(run_id=run, request_id=f"r{i}", ts=1000.0 + i, policy="block", chosen="i0",
                       decision_ms=0.5, target="e2e", considered=4, asked=4, fallback="none", predictor="live",
                       predicted_ttft=0.1, predicted_e2e=1.0, candidates="[]").to_dict()


def sample(run: str, i: int) -> dict:
    return InstanceSampleRow(run_id=run, ts=1000.0 + i, instance=f"i{i % 4}", running=3, waiting=1,
                             kv_usage=0.4, preemptions=0, tracked=4).to_dict()


def per_batch_ms(store: Store, batches: list[dict[str, list[dict]]]) -> float:
    start = cpu_s()
    for batch in batches:
        store.insert_batch(batch)
    return (cpu_s() - start) / len(batches) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer batches (a few seconds)")
    args = p.parse_args(argv)
    small_n, bulk_n = (100, 2) if args.quick else (1000, 10)
    with tempfile.TemporaryDirectory(prefix="store-ingest-") as tmp:
        store = Store(Path(tmp) / "block.duckdb")
        per_batch_ms(store, [{"requests": [request("warm", 3 * k + j) for j in range(3)]} for k in range(20)])
        small = [{"requests": [request("small", 3 * k + j) for j in range(3)]} for k in range(small_n)]
        small_ms = per_batch_ms(store, small)
        resent_ms = per_batch_ms(store, small[: max(1, small_n // 4)])
        bulk = [{"requests": [request(f"bulk{k}", i) for i in range(2000)],
                 "decisions": [decision(f"bulk{k}", i) for i in range(2000)],
                 "instance_samples": [sample(f"bulk{k}", i) for i in range(2000)]} for k in range(bulk_n)]
        start, wall = cpu_s(), time.perf_counter()
        for batch in bulk:
            store.insert_batch(batch)
        bulk_cpu, bulk_wall = cpu_s() - start, time.perf_counter() - wall
        rows = bulk_n * 6000
        counted = store.query("SELECT count(*) FROM requests").rows[0][0]
    expected = 20 * 3 + small_n * 3 + bulk_n * 2000
    print(pd.DataFrame([
        {"case": f"small batch (3 rows) x {small_n}", "cpu_ms_per_batch": small_ms, "rows_per_s": float("nan")},
        {"case": f"resent small batch x {max(1, small_n // 4)}", "cpu_ms_per_batch": resent_ms,
         "rows_per_s": float("nan")},
        {"case": f"bulk batch (6,000 rows in 3 tables) x {bulk_n}", "cpu_ms_per_batch": bulk_cpu / bulk_n * 1e3,
         "rows_per_s": rows / bulk_wall},
    ]).round(2).to_string(index=False))
    if counted != expected:
        print(f"store_ingest: requests holds {counted} rows, expected {expected} (a resend was written twice?)")
        return 1
    print(f"RESULT small_batch_cpu_ms={small_ms:.2f} resent_batch_cpu_ms={resent_ms:.2f} "
          f"bulk_rows_per_s={rows / bulk_wall:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
