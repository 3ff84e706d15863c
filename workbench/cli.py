"""The ``block`` command line: offline simulation and studies, and the live local cluster."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import math
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

import httpx
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
from block.policies import HEURISTICS, POLICIES, make_policy
from block.predictor import build_predictor
from block.provisioner import Provisioner, ProvisionerConfig
from simulator.fleet import FLEETS, Fleet, parse_fleet
from simulator.workload import LengthPrior, Request, Trace, gamma_arrivals, lengths_source, trace_workload
from store.auth import is_loopback
from workbench import demo
from workbench.autoscale import LiveAutoscaler
from workbench.loadgen import GOODPUT_METRICS, PERCENTILE_METRICS, ClientRecord, first_failure, run_load
from workbench.loadgen import summarize as summarize_load
from workbench.local import LocalCluster
from workbench.sweep import add_parser as add_sweep_parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, unless the help already says it (EngineSettings' flags, and
    options whose "no value" default needs words rather than ``None``)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _number(kind: Callable[[str], float], low: float, inclusive: bool = True) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` at least (or above) ``low``, refused in one line otherwise."""
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if math.isnan(value) or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


_count = _number(int, 1)  # requests, instances, seeds' count: at least one
_positive = _number(float, 0.0, inclusive=False)
_nonneg = _number(float, 0.0)


def _finite_positive(text: str) -> float:
    value = _positive(text)
    if math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def _floats(text: str) -> list[float]:
    """Comma-separated positive numbers (QPS values, SLOs)."""
    values = [_finite_positive(x) for x in text.split(",") if x.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    """Comma-separated integers (seeds)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return values


def _lengths(text: str) -> str:
    """A lengths source: a name, or a trace file (a folder or a missing file is refused here, in one line)."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a trace file (.csv or .jsonl) or a name")
    return text


def _goodput(text: str) -> tuple[str, float]:
    """One ``KEY:VALUE`` goodput SLO of ``vllm bench serve``: ttft, tpot or e2el, in milliseconds."""
    key, sep, value = text.partition(":")
    if not sep or key not in GOODPUT_METRICS:
        raise argparse.ArgumentTypeError(f"expected KEY:MILLISECONDS with KEY one of {', '.join(GOODPUT_METRICS)}, "
                                         f"got {text!r}")
    return key, _nonneg(value)


def _metric_names(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or any(n not in PERCENTILE_METRICS for n in names):
        raise argparse.ArgumentTypeError(f"expected comma-separated names from {', '.join(PERCENTILE_METRICS)}, "
                                         f"got {text!r}")
    return names


def _percentiles(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not 0 < v < 100 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated percentiles in (0, 100), got {text!r}")
    return values


def _check_trace_size(trace: Trace, requests: int, name: str) -> None:
    """--replay replays the trace's first --num-prompts requests; a shorter trace would silently run fewer."""
    if len(trace) < requests:
        raise ValueError(f"--replay: trace {name!r} has {len(trace)} requests, fewer than the {requests} asked "
                         "(--requests/--num-prompts); ask for at most that many, or drop --replay")


def _spec(args: argparse.Namespace) -> ClusterSpec | Fleet:
    if args.cluster:  # a heterogeneous fleet: validated as a whole, one clear error before anything runs
        caps = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                                  ("max_num_batched_tokens", args.max_num_batched_tokens)) if v is not None}
        return parse_fleet(args.cluster, model=args.model or "Llama-2-7B", **caps)
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
    p.add_argument("--preset", default="demo", choices=list(PRESETS), help="cluster preset")
    p.add_argument("--cluster", help=f"a heterogeneous fleet instead of --preset: {', '.join(FLEETS)} or "
                   "COUNTxGPU[:tpN],... (e.g. 4xA100-80G,8xA30); --model and the batch caps apply to every group")
    p.add_argument("--instances", type=_count, help="instances (default: the preset's)")
    p.add_argument("--gpu", help="GPU spec, e.g. A30, A100-80GB (default: the preset's)")
    p.add_argument("--model", help="model spec, e.g. Llama-2-7B (default: the preset's)")
    p.add_argument("--max-num-seqs", type=_count, help="most requests in a running batch (default: the preset's)")
    p.add_argument("--max-num-batched-tokens", type=_count,
                   help="token budget of one iteration (default: the preset's)")
    p.add_argument("--lengths", "--dataset-path", dest="lengths", type=_lengths, default="synthetic", metavar="PATH",
                   help="synthetic (embedded), alpaca, or a trace name/path (needs BLOCK_DATA_DIR)")
    p.add_argument("--replay", action="store_true",
                   help="replay the trace's arrivals, time-scaled to --qps (default: Poisson arrivals)")
    p.add_argument("--requests", "--num-prompts", dest="requests", type=_count, default=2000, metavar="N",
                   help="requests per run")
    p.add_argument("--noise", type=_nonneg, default=0.10, help="world step-time noise (+-)")
    p.add_argument("--staleness", type=_nonneg, default=0.02, help="predictor state age in seconds")
    p.add_argument("--oracle-timing", action="store_true", help="predictor uses the world's timing (oracle)")
    p.add_argument("--oracle-lengths", action="store_true", help="block_star gets true lengths (oracle)")
    p.add_argument("--power-of-k", type=_count, help="route among k sampled instances (default: all)")


def _study(args: argparse.Namespace) -> Study:
    honesty = Honesty(args.noise, args.staleness, args.oracle_timing, args.oracle_lengths)
    study = Study(_spec(args), args.lengths, args.requests, honesty, args.replay, args.power_of_k)
    if args.replay:
        _check_trace_size(study.trace, args.requests, args.lengths)
    return study


def _check_policies(names: Sequence[str], instances: int, power_of_k: int | None = None) -> None:
    """Every policy name resolves (and its k fits the cluster) before anything runs or starts."""
    for name in names:
        make_policy(name, power_of_k=power_of_k, num_instances=instances)


def _write(df: pd.DataFrame, path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(path, index=False)
        print(f"wrote {path}")


def cmd_simulate(args: argparse.Namespace) -> int:
    study = _study(args)
    spec = study.spec
    _check_policies([args.policy], spec.instances, args.power_of_k)
    print(f"{spec.describe()}; policy {args.policy}; {args.requests} requests at {args.qps} QPS "
          f"({args.lengths} lengths, {study.honesty.label})")
    with tqdm(total=args.requests, desc="simulating", unit="req", disable=not sys.stderr.isatty()) as bar:
        def tick(i: int) -> None:
            bar.update(i - bar.n)

        result = run_policy(spec, args.policy, study.workload(args.qps, args.seed), prior=study.prior,
                            calibration_trace=study.trace, honesty=study.honesty, seed=args.seed,
                            power_of_k=args.power_of_k, progress=tick)
        bar.update(args.requests - bar.n)
    rec = result.records
    per_instance = rec.groupby(["group", "instance"]).agg(requests=("request_id", "count"),
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
    _check_policies(policies, study.spec.instances, args.power_of_k)
    total = len(policies) * len(args.qps) * len(args.seeds)
    with tqdm(total=total, desc="compare", disable=not sys.stderr.isatty()) as bar:
        df = compare(study, policies, args.qps, args.seeds, progress=lambda _: bar.update(1))
    agg = df.groupby(["qps", "policy"], sort=False)[["p50_ttft", "p99_ttft", "p50_e2e", "p99_e2e"]].mean()
    print(agg.round(3).to_string())
    _write(df, args.csv)
    return 0


def cmd_capacity(args: argparse.Namespace) -> int:
    if args.lo >= args.hi:
        raise ValueError(f"--lo {args.lo:g} must be below --hi {args.hi:g}")
    study = _study(args)
    policies = args.policies.split(",")
    _check_policies(policies, study.spec.instances, args.power_of_k)
    with tqdm(total=len(policies) * len(args.slo), desc="capacity", disable=not sys.stderr.isatty()) as bar:
        df = capacity_table(study, policies, args.slo, args.seeds, args.lo, args.hi,
                            progress=lambda _: bar.update(1))
    print(df.drop(columns=["per_seed"]).round(3).to_string(index=False))
    for note in _bound_notes(df, args.lo, args.hi):
        print(note)
    _write(df, args.csv)
    return 0


def _bound_notes(df: pd.DataFrame, lo: float, hi: float) -> list[str]:
    """The searches that ended on a bound of [lo, hi], where the capacity is a limit, not a measurement:
    the bisection returns ``hi`` when even ``hi`` meets the SLO, and 0 when not even ``lo`` does."""
    notes = []
    for row in df.itertuples():
        at_hi = sum(c >= hi for c in row.per_seed)
        at_lo = sum(c == 0.0 for c in row.per_seed)
        where = f"{row.policy} at SLO {row.slo_ttft_p99_s:g} s"
        if at_hi:
            notes.append(f"note: {where} met the SLO at the search's upper bound in {at_hi} of {len(row.per_seed)} "
                         f"seeds: capacity >= --hi {hi:g} QPS there; raise --hi to measure it")
        if at_lo:
            notes.append(f"note: {where} missed the SLO at the search's lower bound in {at_lo} of "
                         f"{len(row.per_seed)} seeds (reported as 0): capacity < --lo {lo:g} QPS there; "
                         "lower --lo to measure it")
    return notes


def _live_workload(args: argparse.Namespace) -> list[Request]:
    """Requests for a live run: embedded or named lengths, with gamma arrivals at --request-rate of shape
    --burstiness (1: Poisson, as ``vllm bench serve``), or the trace's own arrivals with --replay."""
    trace, _ = lengths_source(args.lengths, args.seed)
    if args.max_output:
        trace = dataclasses.replace(trace, output_tokens=np.minimum(trace.output_tokens, args.max_output))
    if args.replay:
        _check_trace_size(trace, args.requests, args.lengths)
        return trace_workload(trace, args.requests, args.qps)
    rng = np.random.default_rng(args.seed)
    idx = rng.integers(0, len(trace), size=args.requests)
    if math.isinf(args.qps):  # every request at once
        arrivals = np.zeros(args.requests)
    else:  # vLLM's burstiness is the gamma shape k; the coefficient of variation is 1/sqrt(k)
        arrivals = gamma_arrivals(args.requests, args.qps, 1.0 / math.sqrt(args.burstiness), rng)
    return [trace.request(i, int(j), float(arrivals[i])) for i, j in enumerate(idx)]


def _check_cluster_args(args: argparse.Namespace, policies: Sequence[str]) -> EngineSettings:
    """What ``up`` and ``demo`` would otherwise find out only after starting processes (or never: with no
    instances, the cluster waits for a scheduler that cannot become healthy)."""
    engine = EngineSettings.from_args(args)
    engine.engine_config()  # an unknown GPU or model, or a KV cache too small for one sequence
    _check_policies(policies, args.instances)
    return engine


def _check_front_door(host: str, port: int | None) -> None:
    """``up --host/--port``: the scheduler's address, checked before anything starts. A local cluster's
    health checks reach services on loopback, so the scheduler listens on a loopback address or on every
    interface; the port must be free now."""
    if not (is_loopback(host) or host in ("0.0.0.0", "::")):
        raise ValueError(f"--host {host}: a local cluster's scheduler listens on a loopback address or on every "
                         "interface (0.0.0.0 or ::)")
    if port is None:
        return
    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port} must be in 1..65535")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})") from None


def cmd_up(args: argparse.Namespace) -> int:
    engine = _check_cluster_args(args, [args.policy])
    _check_front_door(args.host, args.port)
    if args.autoscale and not args.min_instances <= args.instances <= args.max_instances:
        raise ValueError(f"--instances {args.instances} must lie in --min-instances {args.min_instances} .. "
                         f"--max-instances {args.max_instances} when autoscaling")
    instances: int | list[EngineSettings] = args.instances
    if args.cluster:  # a heterogeneous cluster: each emulator and its side-car on its own group's GPU
        if args.autoscale:
            raise ValueError("--cluster and --autoscale: the autoscaler adds instances of one kind; use --instances")
        instances = demo.fleet_engines(parse_fleet(args.cluster, model=args.model), args.time_scale)
        _check_policies([args.policy], len(instances))
    cluster = LocalCluster(Path(args.workspace), instances=instances, policy=args.policy, engine=engine,
                           restart=not args.no_restart)
    _open_front_door(cluster, args.host, args.port)
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
        print(f"scheduler  {cluster.scheduler_url}  (OpenAI API, listening on {args.host}; admin token in "
              f"{cluster.admin_token_file})")
        print(f"collector  {cluster.collector_url}  (DuckDB {Path(args.workspace) / 'block.duckdb'})")
        for name, url in cluster.urls().items():
            if name not in ("scheduler", "collector"):
                print(f"{name:22} {url}")
        print(f"service logs in {Path(args.workspace).resolve() / 'logs'}; Ctrl-C stops the cluster", flush=True)
        stop.wait()
    finally:
        if autoscaler is not None:
            autoscaler.stop()
        cluster.stop()
        print("stopped all services")
    return 0


def _open_front_door(cluster: LocalCluster, host: str, port: int | None) -> None:
    """Put the scheduler on ``host:port`` before the cluster starts. Its last ``--host`` wins over the loopback
    one the driver gives every local service; off loopback every service demands the cluster token."""
    scheduler = cluster.driver.spec.scheduler
    if port is not None:
        scheduler.port = port
    if host != "127.0.0.1":
        scheduler.flags += ["--host", host]
        cluster.driver.require_token = None if is_loopback(host) else True


def _autoscaler(cluster: LocalCluster, args: argparse.Namespace) -> LiveAutoscaler:
    """The predictive or reactive controller on a live cluster; times in emulated-GPU seconds."""
    config = ProvisionerConfig(mode=args.autoscale, slo_ttft=args.slo_ttft, min_instances=args.min_instances,
                               max_instances=args.max_instances, cold_start=args.cold_start)
    predictor = build_predictor(LengthPrior.embedded(), EngineSettings.from_args(args).timing())
    return LiveAutoscaler(cluster, Provisioner(config, predictor))


def _print_summary(summary: dict) -> None:
    rows = [(k, v) for k, v in summary.items()]
    print(pd.DataFrame(rows, columns=["metric", "value"]).to_string(index=False))


def _check_target(base_url: str, endpoint: str) -> None:
    """The URL requests go to, or a one-line error for a base URL that cannot be right: no scheme or host,
    or a path that already ends in the endpoint's /v1 (``--base-url`` is the server's root, as in vLLM)."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--base-url {base_url!r} needs an http:// or https:// scheme and a host, "
                         "e.g. http://127.0.0.1:8000")
    try:
        parts.port  # noqa: B018 - a malformed port raises here
    except ValueError as exc:
        raise ValueError(f"--base-url {base_url!r}: {exc}") from None
    if not endpoint.startswith("/"):
        raise ValueError(f"--endpoint {endpoint!r} must start with '/', e.g. /v1/completions")
    path = parts.path.rstrip("/")
    if path.endswith("/v1") and endpoint.startswith("/v1/"):
        raise ValueError(f"--base-url {base_url!r} ends in /v1 and --endpoint {endpoint} starts with it: requests "
                         f"would go to {path}{endpoint}; give the server's root, "
                         f"{base_url.rstrip('/').removesuffix('/v1')}")


def _preflight(base_url: str, model: str) -> None:
    """Ask the server for its models before any load: a dead port or an unknown model is named now, once,
    instead of as every request's failure. A server without /v1/models is left to the requests."""
    url = base_url.rstrip("/") + "/v1/models"
    try:
        resp = httpx.get(url, timeout=5.0)
    except httpx.HTTPError as exc:
        raise ConnectionError(f"cannot reach {base_url}: {type(exc).__name__}: {exc}") from None
    if resp.status_code != 200:
        return
    try:
        served = [m["id"] for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        return
    if served and model not in served:
        raise ValueError(f"model {model!r} is not served at {base_url} (it serves {', '.join(served)}); "
                         "pass one of those as --model")


def _result_file(args: argparse.Namespace) -> Path:
    """``vllm bench serve``'s file name: backend, rate, concurrency, model and time."""
    if args.result_filename:
        return Path(args.result_dir) / args.result_filename
    conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(args.result_dir) / f"block-{args.qps:g}qps{conc}-{args.model.split('/')[-1]}-{stamp}.json"


def _save_result(args: argparse.Namespace, summary: dict, records: Sequence[ClientRecord]) -> Path:
    path = _result_file(args)
    result = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "backend": "openai", "base_url": args.base_url,
              "endpoint": args.endpoint, "model_id": args.model, "num_prompts": args.requests,
              "request_rate": args.qps, "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
              "label": args.label, **summary,
              "input_lens": [r.prompt_tokens for r in records], "output_lens": [r.output_tokens for r in records],
              "ttfts": [r.ttft for r in records], "itls": [r.itls for r in records],
              "errors": [r.error for r in records]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return path


def cmd_bench(args: argparse.Namespace) -> int:
    _check_target(args.base_url, args.endpoint)
    requests = _live_workload(args)
    _preflight(args.base_url, args.model)

    async def go() -> list[ClientRecord]:
        sink = EventSink(args.collector_url, args.run_id)
        await sink.start()
        try:
            with tqdm(total=len(requests), desc="bench", unit="req", disable=not sys.stderr.isatty()) as bar:
                return await run_load(args.base_url, requests, args.model, sink=sink, policy=args.label,
                                      progress=lambda n: bar.update(n - bar.n), endpoint=args.endpoint,
                                      max_concurrency=args.max_concurrency)
        finally:
            await sink.stop()

    records = asyncio.run(go())
    summary = summarize_load(records, args.percentile_metrics, args.metric_percentiles,
                             dict(args.goodput) if args.goodput else None)
    _print_summary(summary)
    if args.save_result:
        print(f"wrote {_save_result(args, summary, records)}")
    failed = first_failure(records)
    if failed is not None:
        n = sum(r.status != "ok" for r in records)
        print(f"block bench: error: {n} of {len(records)} requests failed; the first: {failed.error}",
              file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The live demo (workbench.demo): light load on a local cluster, then a heterogeneous one near its knee,
    every policy replaying the same workload, results and verdicts from DuckDB."""
    engine = _check_cluster_args(args, args.policies.split(","))
    print(f"emulated {args.gpu} instances ({args.model}), side-cars, scheduler and collector on 127.0.0.1; "
          f"each scene replays its workload once per policy", flush=True)
    demo.run(Path(args.workspace), light_engine=engine, instances=args.instances, light=_live_workload(args),
             qps=args.qps, max_output=args.max_output or 512, policies=args.policies.split(","), seed=args.seed,
             heavy=not args.light_only, say=lambda line: print(line, flush=True))
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


def _version() -> str:
    try:
        return importlib.metadata.version("block-workbench")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="block", description="Block Workbench: predictive LLM load balancing",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)

    all_policies = ",".join([*HEURISTICS, "block", "block_ttft"])
    p = command(sub, "simulate", "simulate one policy on a cluster and print a summary")
    _add_cluster_args(p)
    p.add_argument("--policy", default="block", help=f"one of {', '.join(POLICIES)} (suffix @k for power-of-k)")
    p.add_argument("--qps", "--request-rate", dest="qps", type=_finite_positive, default=6.0, metavar="RATE",
                   help="Poisson arrival rate, requests per second")
    p.add_argument("--seed", type=int, default=0, help="workload and noise seed")
    p.add_argument("--csv", help="write per-request records here (default: not written)")
    p.set_defaults(func=cmd_simulate)

    p = command(sub, "compare", "policies x QPS x seeds: P50/P99 TTFT and E2E")
    _add_cluster_args(p)
    p.add_argument("--policies", default=all_policies, help="comma-separated policies")
    p.add_argument("--qps", type=_floats, default="4,6,8", help="comma-separated arrival rates")
    p.add_argument("--seeds", type=_ints, default="0,1,2", help="comma-separated seeds")
    p.add_argument("--csv", help="write one row per policy, QPS and seed here (default: not written)")
    p.set_defaults(func=cmd_compare)

    p = command(sub, "capacity", "highest QPS meeting a P99 TTFT SLO, per policy (bisection in [--lo, --hi])")
    _add_cluster_args(p)
    p.add_argument("--policies", default=all_policies, help="comma-separated policies")
    p.add_argument("--slo", type=_floats, default="3,10", help="comma-separated P99 TTFT SLOs in seconds")
    p.add_argument("--seeds", type=_ints, default="0,1,2", help="comma-separated seeds, each searched separately")
    p.add_argument("--lo", type=_finite_positive, default=1.0, help="lowest QPS searched")
    p.add_argument("--hi", type=_finite_positive, default=64.0, help="highest QPS searched")
    p.add_argument("--csv", help="write the capacity table here (default: not written)")
    p.set_defaults(func=cmd_capacity)
    add_sweep_parser(sub)
    sub.choices["sweep"].formatter_class = _HelpFormatter

    def live_args(p: argparse.ArgumentParser, qps: float, requests: int) -> None:
        """The workload of a live run, under ``vllm bench serve``'s names and the workbench's older ones."""
        p.add_argument("--dataset-path", "--lengths", dest="lengths", type=_lengths, default="synthetic",
                       metavar="PATH", help="lengths: synthetic (embedded), alpaca, or a trace name/path")
        p.add_argument("--replay", action="store_true",
                       help="replay the trace's arrivals, time-scaled to --request-rate (default: gamma arrivals)")
        p.add_argument("--request-rate", "--qps", dest="qps", type=_positive, default=qps, metavar="RATE",
                       help="requests per second; inf sends them all at once")
        p.add_argument("--burstiness", type=_finite_positive, default=1.0,
                       help="gamma shape of the inter-arrival times: 1 is Poisson, below 1 burstier")
        p.add_argument("--num-prompts", "--requests", dest="requests", type=_count, default=requests, metavar="N",
                       help="requests to send")
        p.add_argument("--max-output", type=_count, help="clip response lengths (default: not clipped)")
        p.add_argument("--seed", type=int, default=0, help="workload seed")

    def cluster_args(p: argparse.ArgumentParser) -> None:
        """A local emulated cluster: its workspace, size and engine flags (EngineSettings' defaults)."""
        p.add_argument("--workspace", default="workspace", help="folder for the DuckDB file and service logs")
        p.add_argument("--instances", type=_count, default=4, help="emulated instances")
        EngineSettings.add_args(p)

    p = command(sub, "up", "start a local emulated cluster (Ctrl-C stops it)")
    cluster_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="where the scheduler (the OpenAI API) listens: loopback, or 0.0.0.0/:: for every interface "
                        "(then every service demands the cluster token)")
    p.add_argument("--port", type=int, help="the scheduler's port (default: a free one)")
    p.add_argument("--cluster", help=f"a heterogeneous cluster instead of --instances x --gpu: COUNTxGPU,... "
                                     f"(e.g. 1xA100-80G,3xA30) or a preset ({', '.join(FLEETS)})")
    p.add_argument("--policy", default="block", help=f"one of {', '.join(POLICIES)} (suffix @k for power-of-k)")
    p.add_argument("--autoscale", choices=("predictive", "reactive"),
                   help="run the provisioning controller (default: off)")
    p.add_argument("--min-instances", type=_count, default=1, help="autoscaling floor")
    p.add_argument("--max-instances", type=_count, default=8, help="autoscaling ceiling")
    p.add_argument("--slo-ttft", type=_finite_positive, default=3.0, help="TTFT SLO in emulated-GPU seconds")
    p.add_argument("--cold-start", type=_nonneg, default=60.0, help="emulated seconds for a new instance")
    p.add_argument("--no-restart", action="store_true",
                   help="leave a crashed service down (default: restart it with back-off, recorded in service_events)")
    p.set_defaults(func=cmd_up)

    p = command(sub, "bench", "open-loop load against an OpenAI-compatible server (vllm bench serve's options)")
    p.add_argument("--base-url", "--url", dest="base_url", default="http://127.0.0.1:8000", metavar="URL",
                   help="the server's root URL, without /v1")
    p.add_argument("--endpoint", default="/v1/completions", help="API path: /v1/completions or /v1/chat/completions")
    live_args(p, 4.0, 200)
    p.add_argument("--max-concurrency", type=_count, help="most requests in flight (default: no cap)")
    p.add_argument("--model", default=EngineSettings.model, help="model id sent to the server")
    p.add_argument("--percentile-metrics", type=_metric_names, default=",".join(PERCENTILE_METRICS),
                   help="comma-separated metrics to report percentiles of")
    p.add_argument("--metric-percentiles", type=_percentiles, default="99", help="comma-separated percentiles")
    p.add_argument("--goodput", type=_goodput, nargs="+", metavar="KEY:MS",
                   help=f"SLOs for goodput, e.g. ttft:500 tpot:50 (keys {', '.join(GOODPUT_METRICS)}; "
                        "default: no goodput)")
    p.add_argument("--save-result", action="store_true", help="write the summary and per-request results as JSON")
    p.add_argument("--result-dir", default=".", help="folder for --save-result")
    p.add_argument("--result-filename",
                   help="file name for --save-result (default: block-<rate>qps-<model>-<time>.json)")
    p.add_argument("--collector-url", help="also store client-side rows in this collector (default: none)")
    p.add_argument("--run-id", default="bench", help="run id of the stored rows")
    p.add_argument("--label", help="policy label stored with the results (default: none)")
    p.set_defaults(func=cmd_bench)

    length = command(sub, "length", "response-length estimator: train, eval, tag")
    lsub = length.add_subparsers(dest="length_command", required=True, metavar="COMMAND")
    p = command(lsub, "train", "fit the MiniLM estimator for one served model on AlpacaEval")
    p.add_argument("--served-model", default="llama-2-7b-chat-hf", help="served model whose lengths are learnt")
    p.add_argument("--out", help="model file (default: models/length-<served-model>.npz)")
    p.add_argument("--subset", type=_count, help="train on this many prompts, for CI-sized runs (default: all)")
    p.add_argument("--cache", default="results/length/minilm-embeddings.npz", help="embedding cache file")
    p.set_defaults(func=cmd_length_train)
    p = command(lsub, "eval", "k-fold quality table for every estimator and served model")
    p.add_argument("--folds", type=_number(int, 2), default=5, help="cross-validation folds")
    p.add_argument("--models", help="comma-separated served models (default: all)")
    p.add_argument("--cache", default="results/length/minilm-embeddings.npz", help="embedding cache file")
    p.add_argument("--csv", help="write the table here (default: not written)")
    p.set_defaults(func=cmd_length_eval)
    p = command(lsub, "tag", "write predicted lengths into a JSON-lines trace")
    p.add_argument("--model-file", required=True, help="estimator file from block length train")
    p.add_argument("--trace", required=True, help="JSON-lines trace with a prompt per record")
    p.add_argument("--out", required=True, help="JSON-lines file to write")
    p.add_argument("--prompt-field", default="prompt", help="the records' prompt field")
    p.set_defaults(func=cmd_length_tag)

    p = command(sub, "demo", "live demo: local cluster, one replay per policy, summary from DuckDB")
    cluster_args(p)
    live_args(p, 10.0, 300)
    p.add_argument("--policies", default="round_robin,least_requests,block", help="comma-separated policies")
    p.add_argument("--light-only", action="store_true",
                   help="skip the second scene (a heterogeneous cluster near its knee)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 1 the run failed (requests failed, a service would not start), 2 bad input,
    130 interrupted. Every error is one line naming what was wrong; argparse's own exits are returned."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a value argparse refused (its message is printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, IsADirectoryError, ImportError, KeyError) as exc:
        print(f"block {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"block {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"block {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """An exception as one line. A service that died while starting comes with its log's tail, a traceback
    whose last line says why: that line is kept, the rest stays in the log file."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


if __name__ == "__main__":
    sys.exit(main())
