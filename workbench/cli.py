"""The ``block`` command line: offline simulation and studies, and the live local cluster."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
from tqdm import tqdm

from block.engines.settings import EngineSettings
from block.events import EventSink
from block.offline import (
    PRESETS,
    ClusterSpec,
    Honesty,
    Study,
    capacity_table,
    compare,
    get_preset,
    run_policy,
)
from block.policies import HEURISTICS, POLICIES
from block.predictor import build_predictor
from block.provisioner import Provisioner, ProvisionerConfig
from simulator.workload import LengthPrior, lengths_source, poisson_workload, trace_workload
from workbench.autoscale import LiveAutoscaler
from workbench.loadgen import run_load
from workbench.loadgen import summarize as summarize_load
from workbench.local import LocalCluster


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _spec(args: argparse.Namespace) -> ClusterSpec:
    spec = get_preset(args.preset)
    overrides = {k: v for k, v in (("instances", args.instances), ("gpu", args.gpu), ("model", args.model),
                                   ("max_num_seqs", args.max_num_seqs),
                                   ("max_num_batched_tokens", args.max_num_batched_tokens)) if v is not None}
    if overrides:
        spec = ClusterSpec(**{**spec.__dict__, **overrides, "num_blocks": None if (
            "gpu" in overrides or "model" in overrides) else spec.num_blocks})
    spec.engine_config()  # fail early on impossible configurations
    return spec


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="demo", help=f"cluster preset: {', '.join(PRESETS)}")
    p.add_argument("--instances", type=int)
    p.add_argument("--gpu")
    p.add_argument("--model")
    p.add_argument("--max-num-seqs", type=int)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--lengths", default="synthetic",
                   help="synthetic (embedded), alpaca, or a trace name/path (needs BLOCK_DATA_DIR)")
    p.add_argument("--replay", action="store_true", help="replay the trace's arrivals, time-scaled to --qps")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--noise", type=float, default=0.10, help="world step-time noise (+-)")
    p.add_argument("--staleness", type=float, default=0.02, help="predictor state age in seconds")
    p.add_argument("--oracle-timing", action="store_true", help="predictor uses the world's timing (oracle)")
    p.add_argument("--oracle-lengths", action="store_true", help="block_star gets true lengths (oracle)")
    p.add_argument("--power-of-k", type=int)


def _study(args: argparse.Namespace) -> Study:
    honesty = Honesty(args.noise, args.staleness, args.oracle_timing, args.oracle_lengths)
    return Study(_spec(args), args.lengths, args.requests, honesty, args.replay, args.power_of_k)


def _write(df: pd.DataFrame, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False)
        print(f"wrote {path}")


def cmd_simulate(args: argparse.Namespace) -> int:
    study = _study(args)
    spec = study.spec
    cfg = spec.engine_config()
    print(f"{spec.instances} x {spec.gpu} {spec.model}: {cfg.num_blocks} KV blocks, batch cap {cfg.max_num_seqs}, "
          f"chunk {cfg.max_num_batched_tokens}; policy {args.policy}; {args.requests} requests at {args.qps} QPS "
          f"({args.lengths} lengths, {study.honesty.label})")
    with tqdm(total=args.requests, desc="simulating", unit="req", disable=not sys.stderr.isatty()) as bar:
        def tick(i: int) -> None:
            bar.update(i - bar.n)

        result = run_policy(spec, args.policy, study.workload(args.qps, args.seed), prior=study.prior,
                            calibration_trace=study.trace, honesty=study.honesty, seed=args.seed,
                            power_of_k=args.power_of_k, progress=tick)
        bar.update(args.requests - bar.n)
    rec = result.records
    per_instance = rec.groupby("instance").agg(requests=("request_id", "count"),
                                               p50_ttft_s=("ttft", "median"),
                                               p99_ttft_s=("ttft", lambda s: s.quantile(0.99)),
                                               p50_e2e_s=("e2e", "median"), preemptions=("preemptions", "sum"))
    print(per_instance.round(3).to_string())
    s = result.summary
    rows = [(m, s[f"mean_{m}"], s[f"p50_{m}"], s[f"p90_{m}"], s[f"p99_{m}"]) for m in ("ttft", "tpot", "e2e",
                                                                                      "queueing")]
    table = pd.DataFrame(rows, columns=["metric (s)", "mean", "p50", "p90", "p99"]).set_index("metric (s)")
    print(table.round(4).to_string())
    print(f"completed {s['completed']} requests in {s['duration_s']:.1f} simulated s: "
          f"{s['request_throughput']:.2f} req/s, {s['output_throughput']:.0f} output tok/s, "
          f"{s['preemptions']} preemptions")
    _write(rec, args.csv)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    study = _study(args)
    policies = args.policies.split(",")
    total = len(policies) * len(args.qps) * len(args.seeds)
    with tqdm(total=total, desc="compare", disable=not sys.stderr.isatty()) as bar:
        df = compare(study, policies, args.qps, args.seeds, progress=lambda _: bar.update(1))
    agg = df.groupby(["qps", "policy"], sort=False)[["p50_ttft", "p99_ttft", "p50_e2e", "p99_e2e"]].mean()
    print(agg.round(3).to_string())
    _write(df, args.csv)
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    study = _study(args)
    policies = args.policies.split(",")
    with tqdm(total=len(policies) * len(args.slo), desc="capacity", disable=not sys.stderr.isatty()) as bar:
        df = capacity_table(study, policies, args.slo, args.seeds, args.lo, args.hi,
                            progress=lambda _: bar.update(1))
    print(df.drop(columns=["per_seed"]).round(3).to_string(index=False))
    _write(df, args.csv)
    return 0


def _live_workload(args: argparse.Namespace) -> list:
    """Requests for a live run: embedded or named lengths, Poisson or the trace's own arrivals."""
    trace, _ = lengths_source(args.lengths, args.seed)
    if args.max_output:
        trace = dataclasses.replace(trace, output_tokens=np.minimum(trace.output_tokens, args.max_output))
    if args.replay:
        return trace_workload(trace, args.requests, args.qps)
    return poisson_workload(trace, args.requests, args.qps, args.seed)


def cmd_up(args: argparse.Namespace) -> int:
    cluster = LocalCluster(Path(args.workspace), instances=args.instances, policy=args.policy,
                           engine=EngineSettings.from_args(args), restart=not args.no_restart)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    cluster.start()
    autoscaler = None
    try:
        if args.autoscale:
            autoscaler = _autoscaler(cluster, args)
            autoscaler.start()
            print(f"autoscaling ({args.autoscale}): {args.min_instances}..{args.max_instances} instances, "
                  f"TTFT SLO {args.slo_ttft}s; decisions go to the provisioning table")
        print(f"scheduler  {cluster.scheduler_url}  (OpenAI API; admin token in {cluster.admin_token_file})")
        print(f"collector  {cluster.collector_url}  (DuckDB {Path(args.workspace) / 'block.duckdb'})")
        for name, url in cluster.urls().items():
            if name not in ("scheduler", "collector"):
                print(f"{name:22} {url}")
        print("Ctrl-C stops the cluster", flush=True)
        stop.wait()
    finally:
        if autoscaler is not None:
            autoscaler.stop()
        cluster.stop()
        print("stopped all services")
    return 0


def _autoscaler(cluster: LocalCluster, args: argparse.Namespace) -> LiveAutoscaler:
    """The predictive or reactive controller on a live cluster; times in emulated-GPU seconds."""
    config = ProvisionerConfig(mode=args.autoscale, slo_ttft=args.slo_ttft, min_instances=args.min_instances,
                               max_instances=args.max_instances, cold_start=args.cold_start)
    predictor = build_predictor(LengthPrior.embedded(), EngineSettings.from_args(args).timing())
    return LiveAutoscaler(cluster, Provisioner(config, predictor))


def _print_summary(summary: dict) -> None:
    rows = [(k, v) for k, v in summary.items()]
    print(pd.DataFrame(rows, columns=["metric", "value"]).to_string(index=False))


def cmd_bench(args: argparse.Namespace) -> int:
    requests = _live_workload(args)

    async def go():
        sink = EventSink(args.collector_url, args.run_id)
        await sink.start()
        try:
            with tqdm(total=len(requests), desc="bench", unit="req", disable=not sys.stderr.isatty()) as bar:
                return await run_load(args.url, requests, args.model, sink=sink, policy=args.label,
                                      progress=lambda n: bar.update(n - bar.n))
        finally:
            await sink.stop()

    _print_summary(summarize_load(asyncio.run(go())))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The live demo: a 4-instance local cluster, one trace replayed per policy, results from DuckDB."""
    requests = _live_workload(args)
    workspace = Path(args.workspace)
    cluster = LocalCluster(workspace, instances=args.instances, policy=args.policies.split(",")[0],
                           engine=EngineSettings.from_args(args))
    print(f"starting {args.instances} emulated {args.gpu} instances ({args.model}, x{args.time_scale} speed), "
          f"side-cars, scheduler and collector on 127.0.0.1 ...", flush=True)
    with cluster:
        for policy in args.policies.split(","):
            cluster.set_policy(policy)

            async def go(policy=policy):
                sink = EventSink(cluster.collector_url, f"demo-{policy}-{cluster.run_id}")
                await sink.start()
                try:
                    return await run_load(cluster.scheduler_url, requests, args.model, sink=sink, policy=policy)
                finally:
                    await sink.stop()

            t0 = time.monotonic()
            records = asyncio.run(go())
            print(f"{policy:15} {len(records)} requests at {args.qps} QPS in {time.monotonic() - t0:.1f} s", flush=True)
        time.sleep(0.5)
        summary = cluster.reader().summary(run_suffix=cluster.run_id)
    print(f"\nPer-policy results read back from {workspace / 'block.duckdb'} (client-side, milliseconds):")
    print(summary.to_string(index=False))
    return 0


def cmd_length_train(args: argparse.Namespace) -> int:
    from block.length.data import load_alpaca
    from block.length.estimator import model_file, train
    from block.length.models import Encoder

    out = Path(args.out) if args.out else model_file(args.served_model)
    data = load_alpaca()
    if args.subset:
        data = data.subset(np.random.default_rng(0).permutation(len(data))[: args.subset])
    meta = train(data, args.served_model, Encoder(args.cache), out)
    cv = meta["cv"]
    print(f"wrote {out}: {meta['served_model']} on {meta['trained_on']} prompts, 5-fold CV MAE {cv['mae']:.1f}, "
          f"Acc@100 {cv['acc100']:.1%}")
    return 0


def cmd_length_eval(args: argparse.Namespace) -> int:
    from block.length.data import MODELS, load_alpaca
    from block.length.estimator import quality_table
    from block.length.models import Encoder

    table = quality_table(load_alpaca(), Encoder(args.cache), k=args.folds,
                          models=tuple(args.models.split(",")) if args.models else MODELS)
    print(table.round(3).to_string(index=False))
    _write(table, args.csv)
    return 0


def cmd_length_tag(args: argparse.Namespace) -> int:
    """Add predicted_output_tokens to a JSON-lines trace whose records carry a prompt text."""
    from block.length.estimator import LengthEstimator

    est = LengthEstimator.load(args.model_file)
    src, dst = Path(args.trace), Path(args.out)
    records = []
    with src.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
                prompt = rec[args.prompt_field]
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{src}:{line_no}: needs a JSON object with a {args.prompt_field!r} field "
                                 f"({exc})") from exc
            records.append((rec, prompt))
    estimates = est.predict_detailed([p for _, p in records])
    with dst.open("wb") as out:
        for (rec, _), e in zip(records, estimates, strict=True):
            rec |= {"predicted_output_tokens": e.tokens, "predicted_low": e.low, "predicted_high": e.high,
                    "prompt_truncated": e.truncated}
            out.write(orjson.dumps(rec) + b"\n")
    print(f"wrote {len(records)} records with predicted lengths ({est.served_model}) to {dst}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="block", description="Block Workbench: predictive LLM load balancing")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate one policy on a cluster and print a summary")
    _add_cluster_args(p)
    p.add_argument("--policy", default="block", help=f"one of {', '.join(POLICIES)} (suffix @k for power-of-k)")
    p.add_argument("--qps", type=float, default=6.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", help="write per-request records here")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("compare", help="policies x QPS x seeds: P50/P99 TTFT and E2E")
    _add_cluster_args(p)
    p.add_argument("--policies", default=",".join([*HEURISTICS, "block", "block_ttft"]))
    p.add_argument("--qps", type=_floats, default=[4.0, 6.0, 8.0])
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--csv")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("capacity", help="highest QPS meeting a P99 TTFT SLO, per policy")
    _add_cluster_args(p)
    p.add_argument("--policies", default=",".join([*HEURISTICS, "block", "block_ttft"]))
    p.add_argument("--slo", type=_floats, default=[3.0, 10.0], help="P99 TTFT SLOs in seconds")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    p.add_argument("--lo", type=float, default=1.0)
    p.add_argument("--hi", type=float, default=64.0)
    p.add_argument("--csv")
    p.set_defaults(func=cmd_capacity)

    def live_args(p: argparse.ArgumentParser, qps: float, requests: int) -> None:
        p.add_argument("--lengths", default="synthetic", help="synthetic (embedded), alpaca, or a trace name/path")
        p.add_argument("--replay", action="store_true", help="replay the trace's arrivals, time-scaled to --qps")
        p.add_argument("--qps", type=float, default=qps)
        p.add_argument("--requests", type=int, default=requests)
        p.add_argument("--max-output", type=int, help="clip response lengths (keeps live runs short)")
        p.add_argument("--seed", type=int, default=0)

    def cluster_args(p: argparse.ArgumentParser) -> None:
        """A local emulated cluster: its workspace, size and engine flags (EngineSettings' defaults)."""
        p.add_argument("--workspace", default="workspace", help="folder for the DuckDB file and service logs")
        p.add_argument("--instances", type=int, default=4)
        EngineSettings.add_args(p)

    p = sub.add_parser("up", help="start a local emulated cluster (Ctrl-C stops it)")
    cluster_args(p)
    p.add_argument("--policy", default="block")
    p.add_argument("--autoscale", choices=("predictive", "reactive"), help="run the provisioning controller")
    p.add_argument("--min-instances", type=int, default=1)
    p.add_argument("--max-instances", type=int, default=8)
    p.add_argument("--slo-ttft", type=float, default=3.0, help="TTFT SLO in emulated-GPU seconds")
    p.add_argument("--cold-start", type=float, default=60.0, help="emulated seconds for a new instance")
    p.add_argument("--no-restart", action="store_true",
                   help="leave a crashed service down (default: restart it with back-off, recorded in service_events)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("bench", help="open-loop load against an OpenAI-compatible URL")
    p.add_argument("--url", required=True)
    live_args(p, 4.0, 200)
    p.add_argument("--model", default=EngineSettings.model, help="model id sent to --url")
    p.add_argument("--collector-url")
    p.add_argument("--run-id", default="bench")
    p.add_argument("--label", help="policy label stored with the results")
    p.set_defaults(func=cmd_bench)

    length = sub.add_parser("length", help="response-length estimator: train, eval, tag")
    lsub = length.add_subparsers(dest="length_command", required=True)
    p = lsub.add_parser("train", help="fit the MiniLM estimator for one served model on AlpacaEval")
    p.add_argument("--served-model", default="llama-2-7b-chat-hf")
    p.add_argument("--out", help="model file (default models/length-<served-model>.npz)")
    p.add_argument("--subset", type=int, help="train on this many prompts (CI-sized runs)")
    p.add_argument("--cache", default="results/length/minilm-embeddings.npz", help="embedding cache file")
    p.set_defaults(func=cmd_length_train)
    p = lsub.add_parser("eval", help="k-fold quality table for every estimator and served model")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--models", help="comma-separated served models (default: all)")
    p.add_argument("--cache", default="results/length/minilm-embeddings.npz")
    p.add_argument("--csv")
    p.set_defaults(func=cmd_length_eval)
    p = lsub.add_parser("tag", help="write predicted lengths into a JSON-lines trace")
    p.add_argument("--model-file", required=True)
    p.add_argument("--trace", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prompt-field", default="prompt")
    p.set_defaults(func=cmd_length_tag)

    p = sub.add_parser("demo", help="live demo: local cluster, one replay per policy, summary from DuckDB")
    cluster_args(p)
    live_args(p, 10.0, 300)
    p.add_argument("--policies", default="round_robin,least_requests,block")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError, ImportError) as exc:
        print(f"block {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
