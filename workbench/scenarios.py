"""Where prediction pays: the scenario suite. Every scenario the project studies, sized and with its SLO, and the
capacity search that runs them as cells of one resumable sweep (local pool or Ray).

A scenario is a cluster, a workload and a P99 TTFT SLO of a few times its unloaded P99 TTFT. None is tuned for
Block: they come from published shapes and traces. Capacity is the highest rate whose run meets the SLO, found
per (scenario, policy, what the predictor knew, seed) by a search that asks for its rates round by round: three
rates around the scenario's guess, then widening while all pass or all fail, then geometric bisection until the
bracket is within the tolerance. Each round is one ``run_cells`` call under the suite's sweep name, so every
cell lands in the workspace's DuckDB (``sweep_cells``) and run folder as it finishes; a rerun replays the
searches from the stored cells and runs only what is missing. After the searches, the best alternative, Block's
best honest variant and the oracle row run once more at 1.25 x the best alternative's capacity (no early stop)
for their goodput there: requests per second that met the SLO when the best alternative is overloaded by a
quarter. (Overloaded runs are the dearest cells; the other rows' goodput would not change a verdict.)

"Alternatives" are every policy that is not Block's: the load heuristics, the cache-aware peers at their
published defaults (and ``dynamo_s16``, labelled tuned), and the capacity-normalised baselines where the cluster
is heterogeneous (on one GPU type they are their base rule). Block's honest variants predict with what a live
side-car knows; ``block_star`` reads per-request length estimates: honest where an estimator exists (MiniLM,
out-of-fold, on AlpacaEval prompts), and in every scenario with the true lengths as a labelled oracle row.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from block.offline import Scenario, as_fleet
from block.policies import CAPACITY_NORMALISED, HEURISTICS, PEERS, TUNED
from simulator.data import data_dir
from simulator.hardware import get_model
from simulator.workload import (
    ChatShape,
    LengthPrior,
    Request,
    SharedPrefixShape,
    Trace,
    chat_workload,
    load_named_trace,
    shared_prefix_workload,
)
from store.collector import Store
from workbench.sweep import Cell, LengthEstimator, LocalPool, SweepReport, run_cells

PREFIX_MODEL = "Qwen2-7B"  # the qwen-a100 preset's model: the prefix scenarios' contexts are cut to its 32k
BLOCK_HONEST = ("block", "block_ttft", "block_prefix", "block_impact")
STAR = "block_star"
ESTIMATOR_LABEL = "minilm-out-of-fold"
GOODPUT_LOAD = 1.25  # x the best alternative's capacity


def _trace_of(requests: list[Request], source: str) -> Trace:
    """Lengths of other traffic of the same kind, for the predictor's warm-up run."""
    return Trace(np.array([r.prompt_tokens for r in requests]), np.array([r.output_tokens for r in requests]),
                 source=source)


def shared_prefix(groups: int, duration_s: float = 0.0, requests: int = 0) -> Scenario:
    """llm-d's b2b-saas shape (6k-token system prompt per group, 1.2k-token question, 1k-token answer), Poisson
    arrivals: ``requests`` of them, or as many as arrive in ``duration_s``."""
    shape = SharedPrefixShape(groups=groups)

    def build(qps: float, seed: int) -> list[Request]:
        return shared_prefix_workload(shape, requests or max(1, round(qps * duration_s)), qps, seed)

    other = shared_prefix_workload(shape, 2000, 5.0, 10_000)
    return Scenario("shared_prefix", build, LengthPrior([r.output_tokens for r in other], "b2b-saas"),
                    _trace_of(other, "shared_prefix-calibration"))


def chat(duration_s: float) -> Scenario:
    """Multi-turn sessions (``ChatShape`` defaults) starting at rate/turns per second for ``duration_s``; each
    turn's prompt is the history and its answer is cached for the next turn."""
    shape = ChatShape()
    max_context = get_model(PREFIX_MODEL).max_context

    def build(qps: float, seed: int) -> list[Request]:
        sessions = max(1, round(qps * duration_s / shape.turns))
        return chat_workload(shape, sessions, qps / shape.turns, seed, max_context=max_context)

    other = chat_workload(shape, 400, 1.0, 10_000, max_context=max_context)
    return Scenario("chat", build, LengthPrior([r.output_tokens for r in other], "chat"),
                    _trace_of(other, "chat-calibration"))


def mooncake(requests: int) -> Scenario:
    """The Mooncake (FAST'25) synthetic trace's first ``requests``, with its hash ids and its own arrivals
    time-scaled to the rate; prompts clipped to the 32k context. The prior is a disjoint half of the trace."""
    trace = load_named_trace("mooncake").clipped(get_model(PREFIX_MODEL).max_context)
    head = trace.head(requests)

    def build(qps: float, seed: int) -> list[Request]:
        return head.scaled_to_qps(qps).requests()

    half = np.random.default_rng(12345).permutation(len(trace))[: len(trace) // 2]  # as lengths_source does
    return Scenario("mooncake", build, LengthPrior(trace.output_tokens[half], "mooncake-half"),
                    Trace(trace.prompt_tokens[half], trace.output_tokens[half], source="mooncake-calibration"))


@dataclass(frozen=True)
class SuiteScenario:
    """One row of the matrix. ``workload`` is a lengths source (Poisson over its lengths, or its own arrivals
    with ``replay``) or, with ``factory``, the name the sweep knows the scenario factory by."""

    name: str
    why: str  # what the scenario stands for, one line
    preset: str
    workload: str
    slo_ttft: float
    guess: float  # QPS where the search starts
    duration_s: float = 0.0  # a lengths source's runs last this long at any rate (a factory sizes its own)
    instances: int | None = None
    replay: bool = False
    factory: Callable[[], Scenario] | None = None
    estimator: bool = False  # AlpacaEval prompts: block_star can read the MiniLM estimator's guesses
    heterogeneous: bool = False

    def cell(self, policy: str, qps: float, seed: int, mode: str, give_up: bool) -> Cell:
        estimator = ESTIMATOR_LABEL if policy == STAR and mode == "honest" else ""
        qps = round_rate(qps)
        requests = max(100, round(qps * self.duration_s)) if self.factory is None else 0
        return Cell(policy, qps, seed, self.workload, self.preset, self.instances, None, None, requests, self.replay,
                    mode, self.slo_ttft, None, self.slo_ttft if give_up else None, estimator)

    def describe(self) -> str:
        fleet = as_fleet(self.cell("least_requests", 1.0, 0, "honest", give_up=False).spec())
        return f"{fleet.describe()}; {self.why}; SLO P99 TTFT <= {self.slo_ttft:g} s"


def suite(quick: bool) -> tuple[list[SuiteScenario], list[str]]:
    """The scenarios this machine can run at this size, and why any others are left out. Without
    BLOCK_DATA_DIR the null case runs on embedded synthetic lengths and the trace scenarios are left out. Each
    guess is where the search starts (near the heuristics' capacity); it moves no result, only the cells spent."""
    data = data_dir() is not None
    lengths = "alpaca" if data else "synthetic"
    seconds = 10.0 if quick else 30.0
    groups, prefix_instances = (75, 4) if quick else (150, 8)
    out = [
        SuiteScenario("null_alpaca", "Poisson arrivals over AlpacaEval lengths: the null case", "paper", lengths,
                      3.0, 38.0 if quick else 56.0, seconds, 6 if quick else None, estimator=data and not quick),
        SuiteScenario("hetero", "two GPU generations, Poisson over AlpacaEval lengths", "hetero", lengths, 3.0,
                      115.0 if quick else 90.0, seconds, estimator=data and not quick, heterogeneous=True),
        SuiteScenario("shared_prefix", f"llm-d's b2b-saas: {groups} groups sharing 6k-token system prompts",
                      "qwen-a100", f"shared_prefix/{groups}g-{seconds:g}s", 2.0, 3.0 * prefix_instances, 0,
                      prefix_instances, factory=functools.partial(shared_prefix, groups, seconds)),
        SuiteScenario("multi_turn", "chat sessions whose history is each next turn's prefix", "qwen-a100",
                      f"chat/{seconds:g}s", 1.0, 140.0 if quick else 90.0, 0, 2,
                      factory=functools.partial(chat, seconds)),
    ]
    left_out = []
    if data:
        mooncake_requests = 200 if quick else 1000
        out += [
            SuiteScenario("bursty_code", "the Azure code trace's own bursty arrivals, time-scaled", "paper",
                          "splitwise_code", 3.0, 7.5 if quick else 11.0, 2 * seconds, 6 if quick else None,
                          replay=True),
            SuiteScenario("long_prompts", "arXiv summarisation: long prompts, short answers", "vidur", "arxiv",
                          5.0, 14.0 if quick else 12.0, 2 * seconds),
            SuiteScenario("mooncake", "Mooncake's trace with its prefix hashes and arrivals", "qwen-a100",
                          f"mooncake/{mooncake_requests}", 10.0, 3.5, 0, 4,
                          factory=functools.partial(mooncake, mooncake_requests)),
        ]
    else:
        left_out.append("bursty_code, long_prompts, mooncake: their traces need BLOCK_DATA_DIR")
    return out, left_out


def policies_for(scenario: SuiteScenario, quick: bool) -> list[tuple[str, str]]:
    """(policy, mode) rows of one scenario. Quick keeps the strongest heuristic, three peers and Block's
    two main variants, so that it stays a smoke test of every path and not a verdict."""
    if quick:
        alternatives = ["least_requests", "llmd_blend", "sglang", "dynamo"]
        if scenario.heterogeneous:
            alternatives.append("least_tokens_cap")
        return [(p, "honest") for p in (*alternatives, "block", "block_prefix")] + [(STAR, "oracle-lengths")]
    alternatives = [*HEURISTICS, *PEERS, *(CAPACITY_NORMALISED if scenario.heterogeneous else ())]
    rows = [(p, "honest") for p in (*alternatives, *BLOCK_HONEST)]
    if scenario.estimator:
        rows.append((STAR, "honest"))
    return [*rows, (STAR, "oracle-lengths")]


def kind(policy: str, mode: str) -> str:
    if policy in BLOCK_HONEST or policy == STAR:
        return "block (oracle lengths)" if mode != "honest" else "block"
    if policy in TUNED:
        return "tuned peer"
    if policy in PEERS:
        return "peer"
    return "capacity-normalised" if policy in CAPACITY_NORMALISED else "heuristic"


def round_rate(qps: float) -> float:
    """Four significant digits: a rate reached twice by different arithmetic is the same cell."""
    return float(f"{qps:.4g}")


def next_rates(tried: Mapping[float, bool], guess: float, rel_tol: float, step: float = math.sqrt(2),
               widen: int = 5) -> list[float]:
    """The rates a search needs next, given the rates it tried and whether each passed; [] when it is done.
    Starts at guess / step, guess, guess * step; widens by ``step`` up to ``widen`` times while every rate
    passes (or fails); then bisects (geometrically) the bracket between the highest pass below the lowest
    failure and that failure until it is within ``rel_tol``."""
    if not tried:
        return [round_rate(guess / step), round_rate(guess), round_rate(guess * step)]
    passed = [q for q, ok in tried.items() if ok]
    failed = [q for q, ok in tried.items() if not ok]
    if not failed:
        top = max(passed)
        return [round_rate(top * step)] if top < guess * step ** (widen + 1) * 0.999 else []
    low_fail = min(failed)
    below = [q for q in passed if q < low_fail]
    if not below:
        return [round_rate(low_fail / step)] if low_fail > guess / step ** (widen + 1) * 1.001 else []
    lo = max(below)
    if low_fail / lo <= 1 + rel_tol:
        return []
    mid = round_rate(math.sqrt(lo * low_fail))
    return [] if mid in tried else [mid]


def capacity_of(tried: Mapping[float, bool]) -> float:
    """The highest passing rate below the lowest failing one (0 when the lowest rate tried failed)."""
    failed = [q for q, ok in tried.items() if not ok]
    limit = min(failed) if failed else math.inf
    return max((q for q, ok in tried.items() if ok and q < limit), default=0.0)


def passed(row: Mapping) -> bool:
    return not row["gave_up"] and row["p99_ttft"] is not None and row["p99_ttft"] <= row["slo_ttft"]


@dataclass
class SuiteRun:
    """The searches' results read back from the store: one row per (scenario, policy, mode, seed)."""

    capacities: pd.DataFrame
    goodput: pd.DataFrame
    cells: int
    reports: list[SweepReport]


def alpaca_estimator() -> LengthEstimator | None:
    """Out-of-fold MiniLM estimates of every AlpacaEval prompt, when the length extra and the data exist."""
    if data_dir() is None:
        return None
    try:
        from block.length.data import load_alpaca
        from block.length.estimator import out_of_fold_estimator
        from block.length.models import Encoder

        encoder = Encoder("results/length/minilm-embeddings.npz")
    except ImportError:
        return None
    return out_of_fold_estimator(load_alpaca(), "llama-2-7b-chat-hf", encoder)


def run_suite(scenarios: Sequence[SuiteScenario], rows: Mapping[str, Sequence[tuple[str, str]]],
              seeds: Sequence[int], store: Store, sweep: str, *, rel_tol: float, confirm_top: int | None = None,
              estimator: LengthEstimator | None = None, workers: int | None = None, ray_address: str | None = None,
              pool: LocalPool | None = None, progress: bool = False,
              log: Callable[[str], None] = print) -> SuiteRun:
    """Every search of the suite, round by round, then the goodput round; each round runs only missing cells
    (on ``pool`` when given, so that its workers keep the scenarios they built).

    The first seed searches every row. With ``confirm_top``, the other seeds search only Block's rows and the
    ``confirm_top`` alternatives with the highest first-seed capacity per scenario, ties included (a screen: an
    alternative that far behind on the first seed cannot be the best one, and the matrix costs half); without
    it, every row runs every seed."""
    factories = {s.workload: s.factory for s in scenarios if s.factory is not None}
    config = {"suite": [s.name for s in scenarios], "seeds": list(seeds), "rel_tol": rel_tol,
              "confirm_top": confirm_top}
    reports: list[SweepReport] = []
    done = _results(store, sweep)

    def round_of(cells: list[Cell], what: str) -> dict[str, dict]:
        report = run_cells(cells, store, sweep, scenarios=factories, length_estimator=estimator, config=config,
                           workers=workers, ray_address=ray_address, pool=pool, progress=progress)
        reports.append(report)
        if report.failed:
            cell, why = report.failed[0]
            raise RuntimeError(f"{what}: {report.line}; the first failure: {cell.policy} at {cell.qps:g} QPS on "
                               f"{cell.workload}: {why}")
        if report.interrupted:
            raise RuntimeError(f"{what}: {report.line}")
        if report.ran:
            log(f"{what}: {report.line}")
        return _results(store, sweep)

    def search(starts: Mapping[tuple, Callable[[Mapping[float, bool]], list[float]]],
               phase: str) -> dict[tuple, dict[float, bool]]:
        """Each key's search, driven by its own ``next_rates``, all advancing together round by round."""
        nonlocal done
        tried: dict[tuple, dict[float, bool]] = {k: {} for k in starts}
        pending = {k: rates({}) for k, rates in starts.items()}
        for rnd in itertools.count(1):
            wanted: list[Cell] = []
            for key in starts:  # fold what is stored into each search until it needs a rate that is not
                s, p, m, seed = key
                while pending[key]:
                    cells = [s.cell(p, q, seed, m, give_up=True) for q in pending[key]]
                    missing = [c for c in cells if c.key not in done]
                    if missing:
                        wanted += missing
                        break
                    tried[key].update((c.qps, passed(done[c.key])) for c in cells)
                    pending[key] = starts[key](tried[key])
            if not wanted:
                return tried
            done = round_of(wanted, f"{phase} search round {rnd} ({len(wanted)} cells)")
        raise AssertionError("unreachable")

    first, rest = seeds[0], seeds[1:]
    tried = search({(s, p, m, first): functools.partial(next_rates, guess=s.guess, rel_tol=rel_tol)
                    for s in scenarios for p, m in rows[s.name]}, f"seed {first}")
    if rest:
        # the other seeds start at the first seed's capacity with a step of twice the tolerance: a seed moves a
        # capacity by a few percent, so most of these searches bracket it at once and bisect once
        caps = _capacities(tried)
        confirmed = {s.name: _confirmed(s.name, rows[s.name], caps, confirm_top) for s in scenarios}
        tried |= search({(s, p, m, seed): functools.partial(
                            next_rates, guess=capacity_of(tried[(s, p, m, first)]) or s.guess, rel_tol=rel_tol,
                            step=1 + 2 * rel_tol, widen=12)
                         for s in scenarios for p, m in confirmed[s.name] for seed in rest}, f"seeds {list(rest)}")
    caps = _capacities(tried)
    goodput_cells = {}
    for s in scenarios:  # the verdict's two rows and the oracle row, at 1.25 x the best alternative's capacity
        mine = caps[caps.scenario == s.name]
        peer, peer_capacity = best_alternative(mine)
        wanted_rows = {(peer, "honest"), (best_block(mine)[0], "honest"), (STAR, "oracle-lengths")}
        goodput_cells |= {(s.name, p, m, seed): s.cell(p, GOODPUT_LOAD * peer_capacity, seed, m, give_up=False)
                          for (t, p, m, seed) in tried if t is s and (p, m) in wanted_rows and peer_capacity > 0}
    done = round_of([c for c in goodput_cells.values() if c.key not in done], "goodput round")
    goodput = pd.DataFrame([{"scenario": k[0], "policy": k[1], "mode": k[2], "seed": k[3], "qps": c.qps,
                             "goodput": done[c.key]["goodput"], "p99_ttft": done[c.key]["p99_ttft"]}
                            for k, c in goodput_cells.items()],
                           columns=["scenario", "policy", "mode", "seed", "qps", "goodput", "p99_ttft"])
    return SuiteRun(caps, goodput, len(done), reports)


def _capacities(tried: Mapping[tuple, Mapping[float, bool]]) -> pd.DataFrame:
    return pd.DataFrame([{"scenario": s.name, "policy": p, "mode": m, "seed": int(seed), "kind": kind(p, m),
                          "capacity_qps": capacity_of(t), "rates_tried": len(t)}
                         for (s, p, m, seed), t in tried.items()])


def _confirmed(scenario: str, rows: Sequence[tuple[str, str]], caps: pd.DataFrame,
               top: int | None) -> list[tuple[str, str]]:
    """The rows every seed searches: all of them, or Block's and the ``top`` alternatives of the first seed, with
    every alternative tied with the last of them (a search's rates are a grid, so ties are common, and which of
    a tie would go on must not be an accident of order)."""
    if top is None:
        return list(rows)
    mine = caps[(caps.scenario == scenario) & ~caps["kind"].str.startswith("block")]
    ranked = mine["capacity_qps"].sort_values(ascending=False)
    cut = ranked.iloc[min(top, len(ranked)) - 1] if len(ranked) else math.inf
    leaders = set(mine.loc[mine["capacity_qps"] >= cut, "policy"])
    return [(p, m) for p, m in rows if kind(p, m).startswith("block") or p in leaders]


def _results(store: Store, sweep: str) -> dict[str, dict]:
    """Each stored cell of the sweep, with the SLO it was judged on."""
    frame = store.query("SELECT cell, gave_up, p99_ttft, goodput, json_extract(config, '$.slo_ttft')::DOUBLE "
                        "AS slo_ttft FROM sweep_cells WHERE run_id = ?", [sweep]).frame()
    frame = frame.astype(object).where(frame.notna(), None)
    return {row["cell"]: row for row in frame.to_dict("records")}


def best_alternative(caps: pd.DataFrame) -> tuple[str, float]:
    """The alternative (not Block) with the highest mean capacity over seeds, among those that ran every seed
    (a screened-out alternative's one seed is not a mean to compare)."""
    alt = caps[~caps["kind"].str.startswith("block")].groupby("policy")["capacity_qps"].agg(["mean", "count"])
    alt = alt[alt["count"] == alt["count"].max()]["mean"]
    return (str(alt.idxmax()), float(alt.max())) if len(alt) else ("", 0.0)


def best_block(caps: pd.DataFrame) -> tuple[str, float]:
    """Block's honest variant with the highest mean capacity over seeds."""
    honest = caps[caps["kind"] == "block"].groupby("policy")["capacity_qps"].mean()
    return (str(honest.idxmax()), float(honest.max())) if len(honest) else ("", 0.0)


def verdicts(caps: pd.DataFrame, goodput: pd.DataFrame) -> pd.DataFrame:
    """Per scenario: the best alternative, Block's best honest variant, the gain (of the means over seeds) with
    its per-seed spread, the oracle-lengths row's gain, and both goodputs at the goodput load."""
    rows = []
    for name, mine in caps.groupby("scenario", sort=False):
        peer, peer_cap = best_alternative(mine)
        best, block_capacity = best_block(mine)
        oracle = mine[mine["kind"] == "block (oracle lengths)"]["capacity_qps"].mean()
        per_seed = (mine[mine.policy == best].set_index("seed")["capacity_qps"]
                    / mine[(mine.policy == peer) & (mine["mode"] == "honest")].set_index("seed")["capacity_qps"]
                    - 1) * 100
        g = goodput[goodput.scenario == name].groupby(["policy", "mode"])["goodput"].mean()
        rows.append({"scenario": name, "best_alternative": peer, "alternative_qps": peer_cap, "best_block": best,
                     "block_qps": block_capacity, "gain_pct": _gain(block_capacity, peer_cap),
                     "gain_min_pct": per_seed.min(), "gain_max_pct": per_seed.max(),
                     "oracle_lengths_gain_pct": _gain(oracle, peer_cap),
                     "goodput_block": g.get((best, "honest"), math.nan),
                     "goodput_alternative": g.get((peer, "honest"), math.nan)})
    return pd.DataFrame(rows).set_index("scenario")


def capacity_table(run: SuiteRun, scenario: str) -> pd.DataFrame:
    """One scenario's rows, best first: capacity over seeds (mean, spread, how many seeds searched) and
    goodput at the goodput load."""
    mine = run.capacities[run.capacities.scenario == scenario]
    table = mine.groupby(["policy", "mode", "kind"], sort=False)["capacity_qps"].agg(
        ["mean", "std", "min", "max", "count"])
    g = run.goodput[run.goodput.scenario == scenario]
    column = f"goodput@{g.qps.iloc[0]:g}qps" if len(g) else "goodput"
    table[column] = (g.groupby(["policy", "mode"], sort=False)["goodput"].mean()
                     .reindex(table.index.droplevel(2)).to_numpy())
    return table.sort_values("mean", ascending=False)


def gain_matrix(caps: pd.DataFrame) -> pd.DataFrame:
    """Every row's mean capacity against its scenario's best alternative, in percent (scenario, row, gain):
    the heatmap of where prediction pays."""
    out = []
    for name, mine in caps.groupby("scenario", sort=False):
        _, base = best_alternative(mine)
        means = mine.groupby(["policy", "mode"], sort=False)["capacity_qps"].mean()
        out += [{"scenario": name, "row": p if m == "honest" else f"{p} ({m})", "gain_pct": round(_gain(v, base), 1)}
                for (p, m), v in means.items()]
    return pd.DataFrame(out)


def default_workspace(quick: bool) -> Path:
    """The project's results/ folder for the suite: the benchmark and notebook 07 share it, so either one
    resumes (or just reads) what the other ran."""
    return Path(__file__).resolve().parents[1] / "results" / ("scenarios-quick" if quick else "scenarios")


def _gain(value: float, base: float) -> float:
    return (value / base - 1) * 100 if base > 0 else math.nan


def sweep_name(quick: bool) -> str:
    return "scenarios-quick" if quick else "scenarios-full"


def study(quick: bool, store: Store, *, seeds: Sequence[int] | None = None, only: Sequence[str] = (),
          confirm_top: int | None = 3, workers: int | None = None, ray_address: str | None = None,
          progress: bool = False, log: Callable[[str], None] = print
          ) -> tuple[list[SuiteScenario], SuiteRun, list[str]]:
    """The suite at its size (quick: one seed, a 20% search tolerance; full: three seeds, 5%, the later seeds
    for Block and the first seed's ``confirm_top`` alternatives, None for all), run or resumed in ``store``; the
    scenarios, their results and what was left out. ``only`` runs a subset of the scenarios."""
    scenarios, left_out = suite(quick)
    if only:
        unknown = sorted(set(only) - {s.name for s in scenarios})
        if unknown:
            raise ValueError(f"unknown or unavailable scenarios {unknown}; available: {[s.name for s in scenarios]}")
        scenarios = [s for s in scenarios if s.name in only]
    rows = {s.name: policies_for(s, quick) for s in scenarios}
    estimator = None
    if any((STAR, "honest") in r for r in rows.values()):
        estimator = alpaca_estimator()
        if estimator is None:
            left_out.append("block_star honest: no MiniLM estimator here (the length extra is not installed)")
            rows = {k: [r for r in v if r != (STAR, "honest")] for k, v in rows.items()}
    with contextlib.ExitStack() as stack:
        pool = None if ray_address else stack.enter_context(LocalPool(workers or os.cpu_count() or 1))
        run = run_suite(scenarios, rows, (0,) if quick else tuple(seeds or (0, 1, 2)), store, sweep_name(quick),
                        rel_tol=0.2 if quick else 0.05, confirm_top=confirm_top, estimator=estimator,
                        workers=workers, ray_address=ray_address, pool=pool, progress=progress, log=log)
    return scenarios, run, left_out


def ray_agrees(scenarios: Sequence[SuiteScenario], run: SuiteRun, store: Store, sweep: str) -> tuple[bool, str]:
    """Two of the suite's goodput cells run again as Ray tasks on a local Ray instance: the sweep's other
    engine must give exactly the numbers the process pool stored."""
    try:
        import ray
    except ImportError:
        return False, "ray is not installed (pip install 'block-workbench[ray]')"
    first = scenarios[0]
    picked = run.goodput[(run.goodput.scenario == first.name) & (run.goodput["mode"] == "honest")].head(2)
    cells = [first.cell(r.policy, r.qps, r.seed, r.mode, give_up=False) for r in picked.itertuples()]
    if not cells:  # nothing compared is not agreement
        return False, f"ray: {first.name} has no goodput cell to run again (no alternative passed its SLO)"
    factories = {first.workload: first.factory} if first.factory else {}
    stored = _results(store, sweep)
    with tempfile.TemporaryDirectory() as tmp:
        check = Store(Path(tmp) / "ray-check.duckdb")
        try:
            report = run_cells(cells, check, "ray-check", scenarios=factories, ray_address="local", workers=2,
                               progress=False)
            again = _results(check, "ray-check")
        finally:
            check.close()
            ray.shutdown()
    if report.failed:
        return False, f"ray: {report.failed[0][1]}"
    same = all(again[c.key]["p99_ttft"] == stored[c.key]["p99_ttft"] for c in cells)
    what = ", ".join(f"{c.policy}@{c.qps:g}" for c in cells)
    return same, f"ray ran {what} of {first.name}: {'the same' if same else 'DIFFERENT'} P99 TTFT as the pool"
