"""Prefix caching end to end: Block against the cache-aware routers it must beat. Prints tables and a RESULT line.

Cluster: Qwen2-7B (32k context) on A100-40G instances with vLLM V1's A100 serving defaults (256 seats,
2,048-token chunks) and the KV cache sized from GPU memory like vLLM: 24,564 blocks (393k tokens) per
instance, about a fifth of the b2b-saas prompts' 1.8M distinct tokens, so no instance holds every group and
where a group goes matters. Prefix caching is on.
Scenarios come from published shapes; none is tuned for Block:
- shared_prefix: llm-d's b2b-saas (150 groups x 5 questions; 6k-token system prompt, 1.2k question, 1k
  answer; Poisson arrivals). --quick halves the groups with the instances (same cache-to-working-set ratio).
- chat: multi-turn sessions, the ``ChatShape`` defaults (6 turns; 200-token system prompt, 150-token user
  messages, 300-token answers, 10 s think time). Sessions start at rate/6 per second for a fixed time, so
  a run ramps up over the first ~50 s (a session's length); each turn's prompt is the history, and its
  answer is cached for the next turn.
- mooncake: the Mooncake (FAST'25) synthetic trace with its hash ids and its own arrivals, time-scaled to
  the rate; prompts clipped to the 32k context (16% are longer). Its prefixes recur far apart: even
  one LRU cache as large as the whole cluster's would hit about 6% of the first 2,000 requests' tokens.
  Skipped, and said so, without BLOCK_DATA_DIR.
Capacity: the highest rate whose P99 TTFT meets the scenario's SLO, bracketed then bisected, per seed. Seeds
vary arrivals and the world's noise (mooncake replays one trace: only the noise). The predictor is honest
(Honesty defaults: +-10% world step noise, timing calibrated on a warm-up run, 20 ms stale states, a
length prior from other traffic). Peers read the prefix source they ship with: the exact KV-event view
(Dynamo) or their router's approximate index (llm-d, SGLang, AIBrix, Preble). dynamo_s16 has one tuned
parameter (s = 16) and is labelled so. Hit rate, goodput (requests/s meeting the SLO) and P99 TTFT are
those of each policy's run at its own capacity.
Full: 8 instances (chat: 4), 3,000 b2b-saas requests, 60 s of chat session starts, the whole Mooncake trace
(3,993 requests), 3 seeds, a 3% search tolerance. --quick (CI size, a smoke test: its chat runs end before
sessions reach a steady state): 4 instances (chat: 2), 500 requests / 10 s / 600 requests, 1 seed, a 10%
search tolerance, of the load heuristics only the two strongest (least_requests, least_tokens) and of
Block's variants block_ttft and block_prefix.
Block's variants: block (least predicted E2E), block_ttft (least predicted TTFT) and block_prefix (least
predicted TTFT plus the prefill a choice recomputes that another instance is predicted to hit).
A study too long for one sitting runs in parts (``--scenarios``, ``--seeds``, ``--policies``: each part saves
its own CSV in --out) and ``--merge`` runs nothing and reports over every part saved there.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from simulator_speed import prefix_heavy_speed  # a sibling script: benchmarks/ is on sys.path

from block.offline import ClusterSpec, Scenario, Study
from block.policies import HEURISTICS, PEERS, TUNED
from simulator.data import data_dir
from simulator.metrics import percentile, summarize
from simulator.workload import SharedPrefixShape
from workbench.scenarios import PREFIX_MODEL, chat, mooncake, shared_prefix

MODEL = PREFIX_MODEL
BLOCK_VARIANTS = ("block", "block_ttft", "block_prefix")
QUICK_HEURISTICS = ("least_requests", "least_tokens")
QUICK_BLOCK_VARIANTS = ("block_ttft", "block_prefix")  # block (E2E) is the slowest to run and never the best here


@dataclass(frozen=True)
class Setting:
    """One scenario's size and SLO; the capacity search starts at ``guess`` QPS per instance. Chat is
    sized in seconds of session starts (its request count grows with the rate), the others in requests."""

    name: str
    instances: int
    requests: int
    slo_ttft_s: float
    guess: float
    duration_s: float = 0.0


def settings(quick: bool) -> list[Setting]:
    """SLOs of a few times the scenario's unloaded P99 TTFT: 2 s for 7.2k-token prompts (0.6 s unloaded),
    1 s for chat turns of up to 2.5k tokens (0.1-0.2 s), 10 s for Mooncake's prompts of up to 32k tokens
    (3.8 s). Chat is light per request, so its runs hold many requests: it gets half the instances."""
    n = 4 if quick else 8
    out = [Setting("shared_prefix", n, 500 if quick else 3000, 2.0, 2.5),
           Setting("chat", n // 2, 0, 1.0, 8.0, duration_s=10.0 if quick else 60.0)]
    if data_dir() is not None:
        out.append(Setting("mooncake", n, 600 if quick else 3993, 10.0, 0.8))
    return out


def shared_prefix_scenario(setting: Setting, quick: bool) -> Scenario:
    return shared_prefix(75 if quick else SharedPrefixShape().groups, requests=setting.requests)


def chat_scenario(setting: Setting, quick: bool) -> Scenario:
    return chat(setting.duration_s)


def mooncake_scenario(setting: Setting, quick: bool) -> Scenario:
    return mooncake(setting.requests)


SCENARIOS: dict[str, Callable[[Setting, bool], Scenario]] = {
    "shared_prefix": shared_prefix_scenario, "chat": chat_scenario, "mooncake": mooncake_scenario}


@functools.cache
def study_for(setting: Setting, quick: bool) -> Study:
    """One study per scenario and process: building a scenario reads and hashes its trace."""
    spec = ClusterSpec("A100-40G", MODEL, setting.instances, 256, 2048)
    return Study(spec, requests=setting.requests, scenario=SCENARIOS[setting.name](setting, quick))


def search(ok: Callable[[float], bool], start: float, rel_tol: float, step: float = 1.5) -> float:
    """The highest rate that passes: bracket from ``start`` by factors of ``step``, then bisect until the
    bracket is within ``rel_tol``. 0 when even start / step**8 fails; start * step**8 when that passes."""
    lo = hi = start
    if ok(start):
        for _ in range(8):
            hi = lo * step
            if not ok(hi):
                break
            lo = hi
        else:
            return lo
    else:
        for _ in range(8):
            lo /= step
            if ok(lo):
                break
        else:
            return 0.0
        hi = lo * step
    while (hi - lo) / lo > rel_tol:
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _capacity(job: tuple[Setting, str, int, bool]) -> dict:
    """One policy's capacity in one scenario at one seed, with its run at that capacity."""
    setting, policy, seed, quick = job
    t0 = time.perf_counter()
    study = study_for(setting, quick)
    runs: dict[float, dict] = {}
    tried = []

    def ok(qps: float) -> bool:
        tried.append(qps)
        result = study.run(policy, qps, seed, give_up_ttft=setting.slo_ttft_s)
        if result.gave_up:
            return False
        s = summarize(result.records, slo_ttft=setting.slo_ttft_s)
        runs[qps] = {"p99_ttft": percentile(result.records["ttft"], 99), "goodput": s["goodput"],
                     "hit_rate": result.summary["prefix_hit_rate"], "preemptions": s["preemptions"]}
        return runs[qps]["p99_ttft"] <= setting.slo_ttft_s

    cap = search(ok, setting.guess * setting.instances, 0.1 if quick else 0.03)
    at = runs.get(cap, dict.fromkeys(("p99_ttft", "goodput", "hit_rate", "preemptions"), math.nan))
    return {"scenario": setting.name, "policy": policy, "seed": seed, "capacity_qps": cap, **at, "runs": len(tried),
            "wall_s": time.perf_counter() - t0}


def _kind(policy: str) -> str:
    if policy in BLOCK_VARIANTS:
        return "block"
    return "tuned peer" if policy in TUNED else "peer" if policy in PEERS else "heuristic"


def _report(caps: pd.DataFrame, scenario_settings: list[Setting]) -> pd.DataFrame:
    """Print each scenario's capacity table; return Block's best variant against the best peer per scenario."""
    rows = []
    for s in scenario_settings:
        mine = caps[caps.scenario == s.name]
        if mine.empty:
            continue
        table = mine.groupby("policy", sort=False)[["capacity_qps", "p99_ttft", "hit_rate", "goodput"]].mean()
        table.insert(1, "capacity_std", mine.groupby("policy", sort=False)["capacity_qps"].std(ddof=0))
        table.insert(2, "seeds", mine.groupby("policy", sort=False)["seed"].nunique())
        table["kind"] = [_kind(p) for p in table.index]
        table = table.sort_values("capacity_qps", ascending=False)
        size = f"{s.duration_s:g} s of sessions" if s.duration_s else f"{s.requests} requests"
        print(f"\n{s.name}: {s.instances} x A100-40G {MODEL}, {size} per run, SLO P99 TTFT <= "
              f"{s.slo_ttft_s:g} s; capacity in QPS; p99_ttft, hit_rate, goodput of the run at that capacity")
        print(table.round(3).to_string())
        peers = table.loc[[p for p in PEERS if p in table.index], "capacity_qps"]
        blocks = table.loc[[p for p in BLOCK_VARIANTS if p in table.index], "capacity_qps"]
        if peers.empty or blocks.empty:
            continue
        best_peer, best_block = peers.idxmax(), blocks.idxmax()
        gain = (blocks[best_block] / peers[best_peer] - 1) * 100 if peers[best_peer] > 0 else math.inf
        rows.append({"scenario": s.name, "best_peer": best_peer, "peer_capacity": peers[best_peer],
                     "best_block": best_block, "block_capacity": blocks[best_block], "gain_pct": gain,
                     "hit_rate_block": table.loc[best_block, "hit_rate"],
                     "hit_rate_peer": table.loc[best_peer, "hit_rate"]})
    columns = ["scenario", "best_peer", "peer_capacity", "best_block", "block_capacity", "gain_pct",
               "hit_rate_block", "hit_rate_peer"]
    return pd.DataFrame(rows, columns=columns).set_index("scenario")


def _merged(folder: str, quick: bool) -> pd.DataFrame:
    """Every capacity piece saved in ``folder`` for this size, the newest row per (scenario, policy, seed)."""
    prefix = "capacity_quick_" if quick else "capacity_full_"
    pieces = sorted(Path(folder).glob(f"{prefix}*.csv"), key=lambda f: f.stat().st_mtime)
    if not pieces:
        raise SystemExit(f"--merge: no {prefix}*.csv in {folder}")
    caps = pd.concat([pd.read_csv(f) for f in pieces], ignore_index=True)
    return caps.drop_duplicates(["scenario", "policy", "seed"], keep="last")


def _run(scenario_settings: list[Setting], policies: list[str], seeds: tuple[int, ...], quick: bool,
         t0: float) -> pd.DataFrame:
    """Every capacity search of this part, on all cores."""
    jobs = [(s, p, seed, quick) for s in scenario_settings for p in policies for seed in seeds]
    jobs.sort(key=lambda j: j[1] not in BLOCK_VARIANTS)  # the longest first, for an even spread over workers
    done = []
    with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        for row in pool.map(_capacity, jobs):
            done.append(row)
            print(f"[{len(done)}/{len(jobs)} {time.time() - t0:.0f} s] {row['scenario']} {row['policy']} seed "
                  f"{row['seed']}: {row['capacity_qps']:.2f} QPS", file=sys.stderr, flush=True)
    return pd.DataFrame(done)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI size: 4 instances, 1 seed, short runs")
    parser.add_argument("--out", default="results/prefix_study", help="folder for the CSV files")
    parser.add_argument("--scenarios", default="", help="comma-separated subset of the scenarios (default: all)")
    parser.add_argument("--seeds", default="", help="comma-separated seeds (default: 0 with --quick, else 0,1,2)")
    parser.add_argument("--policies", default="", help="comma-separated subset of the policies (default: all)")
    parser.add_argument("--merge", action="store_true",
                        help="run nothing: report over every part saved in --out for this size")
    args = parser.parse_args()
    t0 = time.time()
    quick = args.quick
    seeds = tuple(int(x) for x in args.seeds.split(",")) if args.seeds else (0,) if quick else (0, 1, 2)
    available = settings(quick)
    wanted = args.scenarios.split(",") if args.scenarios else [s.name for s in available]
    unknown = sorted(set(wanted) - {s.name for s in available})
    if unknown:
        raise SystemExit(f"--scenarios: unknown or unavailable {unknown}; available: {[s.name for s in available]}")
    scenario_settings = [s for s in available if s.name in wanted]
    policies = [*(QUICK_HEURISTICS if quick else HEURISTICS), *PEERS,
                *(QUICK_BLOCK_VARIANTS if quick else BLOCK_VARIANTS)]
    if args.policies:
        unknown = sorted(set(args.policies.split(",")) - set(policies))
        if unknown:
            raise SystemExit(f"--policies: unknown {unknown}; this study runs {policies}")
        policies = [p for p in policies if p in args.policies.split(",")]
    if args.merge:
        caps = _merged(args.out, quick)
        scenario_settings = [s for s in available if s.name in set(caps.scenario)]
        out = args.out
    else:
        caps = _run(scenario_settings, policies, seeds, quick, t0)
        os.makedirs(args.out, exist_ok=True)
        part = f"{'-'.join(wanted)}_seeds{'-'.join(map(str, seeds))}" + (
            f"_{args.policies.replace(',', '-')}" if args.policies else "")
        out = os.path.join(args.out, f"capacity_{'quick' if quick else 'full'}_{part}.csv")
        caps.to_csv(out, index=False)
    speed, _ = prefix_heavy_speed()

    print(__doc__.split("\n\n")[0])
    print(f"mode honest; seeds {sorted(set(caps.seed))}; {len(caps)} capacity searches, {caps['runs'].sum()} "
          f"simulated runs{' (merged from the pieces in ' + args.out + ')' if args.merge else ''}")
    if data_dir() is None:
        print("mooncake: skipped (BLOCK_DATA_DIR is not set and the trace is not embedded)")
    summary = _report(caps, scenario_settings)
    if summary.empty:
        print(f"\nno scenario here has both a peer and a Block variant: a part of the study, saved in {out}; "
              "--merge reports once the other parts are saved")
        return
    print("\nBlock's best honest variant against the best peer (peers include the tuned dynamo_s16)")
    print(summary.round(3).to_string())
    best = str(summary["gain_pct"].idxmax())
    worst = float(summary["gain_pct"].min())
    b = summary.loc[best]
    met = b["gain_pct"] >= 15 and worst >= -2
    print(f"\ntargets (gain >= +15% in one scenario, worst gain >= -2%): {'met' if met else 'NOT met'}: "
          f"best {b['gain_pct']:+.1f}% ({best}), worst {worst:+.1f}% "
          f"({summary['gain_pct'].idxmin()}); simulator speed {speed:,.0f} simulated requests/s on the b2b-saas "
          f"shape (target 50,000); wall {time.time() - t0:.0f} s; capacities in {out}")
    print(f"RESULT best_scenario={best} best_peer={b['best_peer']} block_capacity={b['block_capacity']:.2f} "
          f"peer_capacity={b['peer_capacity']:.2f} gain_pct={b['gain_pct']:.1f} worst_gain_pct={worst:.1f} "
          f"hit_rate_block={b['hit_rate_block']:.3f} sim_requests_per_s={speed:.0f}")


if __name__ == "__main__":
    main()
