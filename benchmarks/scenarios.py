"""Where prediction pays: the scenario x policy matrix of capacity at a P99 TTFT SLO, and goodput. Prints tables
and a RESULT line.

The suite (``workbench/scenarios.py`` says how each scenario is built and searched): the null case (12 x A30,
Poisson AlpacaEval), a heterogeneous fleet, llm-d's shared-prefix shape, multi-turn chat, the Azure code trace's
bursty arrivals, long arXiv prompts and the Mooncake trace, each against every alternative at its defaults.
The cells run as one resumable sweep in ``--workspace`` (its DuckDB and run folders): a rerun, after a crash or
Ctrl-C, runs only the missing cells; ``--ray-address`` runs them on Ray. Without ``--ray-address``, two cells
are run again on a local Ray instance and must give exactly the pool's numbers (``ray_ok``).
Full: 3 seeds, a 5% search tolerance, every policy on the first seed, then Block's rows and the three leading
alternatives on the other two (``--confirm-top``), 30 s of arrivals per run (60 s for the traces).
--quick (a smoke test of every path, not a verdict): 1 seed, a 20% tolerance, 10 s runs, half-size
shared-prefix cluster, 200 Mooncake requests, 7 policies and the oracle row.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from store.collector import Store
from workbench.cli import _ints, _number  # the CLI's one-line argument checks
from workbench.scenarios import capacity_table, default_workspace, ray_agrees, study, sweep_name, verdicts

WON_PCT = 10.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size: 1 seed, short runs, fewer policies")
    parser.add_argument("--workspace", type=Path,
                        help="folder of block.duckdb and runs/ (default: results/scenarios, -quick for --quick)")
    parser.add_argument("--scenarios", default="", help="comma-separated subset (default: every available one)")
    parser.add_argument("--seeds", type=_ints, default="0,1,2", help="comma-separated seeds of the full run")
    parser.add_argument("--confirm-top", type=_number(int, 0), default=3,
                        help="seeds after the first search Block and this many leading alternatives; 0: every one")
    parser.add_argument("--workers", type=_number(int, 1), help="local pool size (default: CPU count)")
    parser.add_argument("--ray-address", help="run the cells on Ray: auto, ray://host:port, or local")
    args = parser.parse_args()
    t0 = time.time()
    workspace = args.workspace or default_workspace(args.quick)
    workspace.mkdir(parents=True, exist_ok=True)
    store = Store(workspace / "block.duckdb")
    try:
        scenarios, run, left_out = study(
            args.quick, store, seeds=args.seeds,
            only=[x for x in args.scenarios.split(",") if x], confirm_top=args.confirm_top or None,
            workers=args.workers, ray_address=args.ray_address)
        if args.ray_address:
            ray_ok, ray_line = True, f"every cell ran on Ray at {args.ray_address}"
        else:
            ray_ok, ray_line = ray_agrees(scenarios, run, store, sweep_name(args.quick))
    finally:
        store.close()
    caps, goodput = run.capacities, run.goodput
    seeds = sorted(int(x) for x in caps.seed.unique())
    print(__doc__.split("\n\n")[0].replace("\n", " "))
    print(f"seeds {seeds}; {len(caps)} capacity searches, {run.cells} cells in sweep {sweep_name(args.quick)!r} "
          f"of {workspace / 'block.duckdb'}")
    for why in left_out:
        print(f"left out: {why}")
    for s in scenarios:
        print(f"\n{s.name}: {s.describe()}")
        print("capacity in QPS over seeds (count: seeds searched); goodput = requests/s within the SLO at 1.25 x "
              "the best alternative's capacity")
        print(capacity_table(run, s.name).round(2).to_string())
    v = verdicts(caps, goodput)
    print("\nBlock's best honest variant against the best alternative (gain of the means; min/max over seeds)")
    print(v.round(2).to_string())
    won = int((v["gain_pct"] >= WON_PCT).sum())
    worst = float(v["gain_pct"].min()) if len(v) else math.nan
    print(f"\n{ray_line}")
    print(f"targets (won >= 2 scenarios by >= {WON_PCT:g}%, worst gain >= -2%): won {won} "
          f"({', '.join(v.index[v.gain_pct >= WON_PCT]) or 'none'}), worst {worst:+.1f}% ({v.gain_pct.idxmin()}); "
          f"wall {time.time() - t0:.0f} s")
    print(f"RESULT scenarios={len(v)} won={won} worst_gain_pct={worst:.1f} cells={run.cells} "
          f"ray_ok={str(ray_ok).lower()}")


if __name__ == "__main__":
    main()
