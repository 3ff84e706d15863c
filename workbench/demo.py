"""What ``make demo`` shows: predictive routing live on this machine, where it costs nothing and where it pays.

Two scenes, each an emulated cluster on loopback replaying one workload once per policy, read back from
DuckDB:

1. **Light load** on a homogeneous cluster (``make demo``: 4 A30s at 7.5 QPS in real time). Every policy is
   fast here; the question is whether predicting costs anything. The verdict compares block's P50 TTFT with
   the best heuristic's (the target: within 10%). A speed-up (``--time-scale``) multiplies the tokens every
   hop relays per second; on a small machine that measures CPU contention, not routing.
2. **A heterogeneous cluster near its knee** (1 A100-80G next to 3 A30s, in real time: at a speed-up the
   emulators would need more CPU than a small machine has near the knee). The rate is where the best
   capacity-normalised heuristic's P99 TTFT reaches the SLO in the offline simulator (90% of that
   capacity), so the live run sits where routing decides. The verdict names the policy with the lowest
   P99 TTFT and P50 E2E, and says plainly when a block policy did not win.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from block.engines.settings import EngineSettings
from block.events import EventSink
from block.offline import Study, capacity_table
from simulator.fleet import Fleet, InstanceGroup
from simulator.workload import Request, Trace, lengths_source, poisson_workload
from workbench.loadgen import run_load
from workbench.local import LocalCluster

DEMO_FLEET = Fleet((InstanceGroup("A100-80G", "Llama-2-7B", 1, max_num_seqs=128),
                    InstanceGroup("A30", "Llama-2-7B", 3, max_num_seqs=48, num_blocks=1052)), "demo_hetero")
HETERO_POLICIES = ("round_robin", "least_requests", "least_tokens_cap", "block", "block_impact")
KNEE_SLO_S = 3.0  # P99 TTFT, emulated seconds: the heterogeneous study's SLO


@dataclass
class Scene:
    slug: str
    title: str
    engines: list[EngineSettings]
    requests: list[Request]
    qps: float  # wall-clock requests per second
    policies: Sequence[str]


def fleet_engines(fleet: Fleet, time_scale: float) -> list[EngineSettings]:
    """One emulated engine per instance of the fleet, each with its own GPU, caps and KV size."""
    out = []
    for _, g in fleet.members():
        if g.tensor_parallel != 1:
            raise ValueError(f"{g.label}: the emulator runs one GPU per instance; tensor parallel {g.tensor_parallel} "
                             "can be simulated offline (block simulate --cluster) but not emulated live")
        out.append(EngineSettings(gpu=g.gpu, model=g.model, num_blocks=g.num_blocks, max_num_seqs=g.max_num_seqs,
                                  max_num_batched_tokens=g.max_num_batched_tokens, time_scale=time_scale))
    return out


def lengths(max_output: int) -> Trace:
    """The embedded lengths, answers capped at ``max_output`` (what the demo replays, live and offline)."""
    trace, _ = lengths_source("synthetic", 0)
    return dataclasses.replace(trace, output_tokens=np.minimum(trace.output_tokens, max_output))


def knee_qps(fleet: Fleet, policy: str, requests: int, max_output: int, seed: int = 0) -> float:
    """The offline capacity of ``policy`` on the fleet at P99 TTFT <= KNEE_SLO_S (emulated requests/s)."""
    study = Study(fleet, "synthetic", requests)
    study.trace = lengths(max_output)
    table = capacity_table(study, [policy], [KNEE_SLO_S], [seed], lo=0.5, hi=200.0, rel_tol=0.05)
    return float(table["capacity_qps"].iloc[0])


def play(scene: Scene, workspace: Path, say: Callable[[str], None]) -> pd.DataFrame:
    """Replay the scene's workload once per policy on one cluster; the per-policy summary from DuckDB."""
    with LocalCluster(workspace / scene.slug, instances=scene.engines, policy=scene.policies[0]) as cluster:
        for policy in scene.policies:
            cluster.set_policy(policy)

            async def go(policy: str = policy) -> None:
                sink = EventSink(cluster.collector_url, f"demo-{scene.slug}-{policy}-{cluster.run_id}")
                await sink.start()
                try:
                    await run_load(cluster.scheduler_url, scene.requests, scene.engines[0].model, sink=sink,
                                   policy=policy)
                finally:
                    await sink.stop()

            t0 = time.monotonic()
            asyncio.run(go())
            say(f"  {policy:18} {len(scene.requests)} requests at {scene.qps:.1f} QPS in {time.monotonic() - t0:.1f} s")
        time.sleep(0.5)
        return cluster.reader().summary(run_suffix=cluster.run_id)


def _is_block(policy: str) -> bool:
    return re.match(r"^block(_|@|$)", policy) is not None


def light_verdict(frame: pd.DataFrame) -> str:
    """Block's P50 TTFT against the best heuristic's at light load (the target: within 10%)."""
    blocks, others = frame[frame["policy"].map(_is_block)], frame[~frame["policy"].map(_is_block)]
    if blocks.empty or others.empty:
        return "light load: nothing to compare (run block and at least one heuristic)"
    best = others.loc[others["p50_ttft_ms"].idxmin()]
    ours = blocks.loc[blocks["p50_ttft_ms"].idxmin()]
    gap = (ours["p50_ttft_ms"] - best["p50_ttft_ms"]) / best["p50_ttft_ms"] * 100
    within = "within" if gap <= 10 else "NOT within"
    return (f"light load: {ours['policy']} P50 TTFT {ours['p50_ttft_ms']:.1f} ms vs {best['policy']} "
            f"{best['p50_ttft_ms']:.1f} ms ({gap:+.1f}%, {within} 10%): predicting costs "
            f"{'about nothing' if gap <= 10 else 'more than a heuristic'} here")


def knee_verdict(frame: pd.DataFrame) -> str:
    """Which policy won near the knee, on P99 TTFT and P50 E2E, against the best of the other family (block
    policies against heuristics); says so when no block policy won."""
    ok = frame[frame["failed"] == 0] if (frame["failed"] == 0).any() else frame
    lines = []
    for metric in ("p99_ttft_ms", "p50_e2e_ms"):
        win = ok.loc[ok[metric].idxmin()]
        rivals = ok[ok["policy"].map(_is_block) != _is_block(win["policy"])]
        line = f"near the knee, {metric}: {win['policy']} won ({win[metric]:.0f} ms"
        if not rivals.empty:
            best = rivals.loc[rivals[metric].idxmin()]
            line += f", {(best[metric] - win[metric]) / best[metric] * 100:.1f}% under {best['policy']}'s " \
                    f"{best[metric]:.0f} ms"
        line += ")"
        if not _is_block(win["policy"]):
            line += "; block did not win here"
        lines.append(line)
    return "\n".join(lines)


def run(workspace: Path, *, light_engine: EngineSettings, instances: int, light: Sequence[Request], qps: float,
        max_output: int, policies: Sequence[str], seed: int = 0, heavy: bool = True,
        say: Callable[[str], None] = print) -> list[pd.DataFrame]:
    """Both scenes (``light``: the first scene's requests), printing progress, tables and verdicts; the two
    summaries."""
    scenes = [Scene("light", f"1. light load: {instances} x {light_engine.gpu} at {qps:g} QPS "
                             f"(x{light_engine.time_scale:g} speed)", [light_engine] * instances, list(light), qps,
                    policies)]
    if heavy:
        trace = lengths(max_output)
        n = min(len(light), 300)
        say(f"\nfinding the knee of {DEMO_FLEET.describe()} offline (P99 TTFT <= {KNEE_SLO_S:g} s) ...")
        rate = 0.9 * knee_qps(DEMO_FLEET, "least_tokens_cap", n, max_output, seed)
        scenes.append(Scene("hetero", f"2. heterogeneous near its knee: {DEMO_FLEET.describe()}, {rate:.1f} QPS "
                                      "in real time (90% of least_tokens_cap's offline capacity)",
                            fleet_engines(DEMO_FLEET, 1.0), poisson_workload(trace, n, rate, seed + 1), rate,
                            HETERO_POLICIES))
    out = []
    for scene in scenes:
        say(f"\n{scene.title}")
        frame = play(scene, workspace, say)
        say(f"\nresults read back from {workspace / scene.slug / 'block.duckdb'} (client-side, milliseconds):")
        say(frame.drop(columns=["run_id"]).to_string(index=False))
        say(light_verdict(frame) if scene.slug == "light" else knee_verdict(frame))
        out.append(frame)
    return out

