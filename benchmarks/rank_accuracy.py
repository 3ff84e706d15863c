"""Rank accuracy of routing choices against counterfactuals (notebook 02 at full size). Prints a table.

Every 10th decision of each run in workbench.experiments.AUDITED_RUNS is audited: each candidate's world
engine is forked at the decision time and runs the request with true lengths and timing, nothing
arriving after it. --quick: 6 instances, 600 requests, every 5th decision.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import pandas as pd

from block.offline import get_preset
from store.collector import Store
from store.read import Reader
from workbench.experiments import run_audited


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    spec = get_preset("paper")
    instances, requests, every = (6, 600, 5) if args.quick else (spec.instances, 3000, 10)
    spec = dataclasses.replace(spec, instances=instances)
    qps = 2.6 * instances
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "audit.duckdb"
        store = Store(db)
        t0 = time.perf_counter()
        run_audited(store, spec, requests, every, qps)
        store.close()
        table = Reader(db_path=db).rank_accuracy()
    pd.set_option("display.width", 160)
    print(f"Rank accuracy, {spec.gpu} x{instances}, {requests} requests at {qps:.1f} QPS, every {every}th decision "
          f"audited ({time.perf_counter() - t0:.1f} s)")
    print(table.round(3).to_string(index=False))
    by_run = table.set_index("run_id")
    print(f"RESULT block_top1_ttft={by_run.loc['block', 'top1_ttft']:.3f} "
          f"block_ttft_top1_ttft={by_run.loc['block_ttft', 'top1_ttft']:.3f} "
          f"block_top1_e2e={by_run.loc['block', 'top1_e2e']:.3f} "
          f"least_requests_top1_e2e={by_run.loc['least_requests', 'top1_e2e']:.3f}")


if __name__ == "__main__":
    main()
