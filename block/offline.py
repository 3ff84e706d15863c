"""Offline policy experiments with an honest split between the world and the predictor.

The *world* is the simulated cluster: roofline step times with per-iteration noise and the true output
length of every request. The *predictor* sees what a live side-car could: instance states refreshed
every ``state_interval`` seconds (requests dispatched since then are known only to the router), a
timing model it calibrated from noisy step-time measurements of a warm-up run, and a length prior
taken from a disjoint half of the length data (or an estimator's guesses). Oracle modes that break
this split exist for upper bounds and are labelled "oracle" wherever they are reported.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from block.length.data import load_alpaca
from block.policies import PREFIX_SOURCES, Candidate, Policy, Rejected, make_policy
from block.predictor.calibration import build_predictor
from block.predictor.core import Prediction, Predictor
from block.prefix_index import ApproximatePrefixIndex, prompt_hashes
from block.provisioner import InstanceView, Observation, Provisioner, ProvisionerConfig
from block.routing import Router, RoutingDecision, StateView
from simulator.cluster import Cluster, ClusterView, Instance, ScaleAction
from simulator.engine import Engine, EngineConfig
from simulator.fleet import FLEETS, Fleet, InstanceGroup, SloClass, assign_slos, parse_fleet, peak_token_throughput
from simulator.metrics import capacity, highest_passing, records_frame, summarize
from simulator.timing import Roofline, StepSample, TimingModel
from simulator.workload import LengthPrior, Request, Trace, lengths_source, poisson_workload, trace_workload


@dataclass(frozen=True)
class ClusterSpec:
    gpu: str
    model: str
    instances: int
    max_num_seqs: int
    max_num_batched_tokens: int
    num_blocks: int | None = None  # None: size the KV cache from GPU memory like vLLM
    chunked_prefill: bool = True
    tensor_parallel: int = 1

    def group(self) -> InstanceGroup:
        """This homogeneous cluster's one instance group."""
        return InstanceGroup(self.gpu, self.model, self.instances, self.tensor_parallel, self.max_num_seqs,
                             self.max_num_batched_tokens, self.num_blocks, self.chunked_prefill)

    def engine_config(self) -> EngineConfig:
        return self.group().engine_config()

    def world_timing(self) -> Roofline:
        return self.group().world_timing()

    def describe(self) -> str:
        return self.fleet().describe()

    def fleet(self) -> Fleet:
        """This homogeneous cluster as a fleet of one group."""
        return Fleet((self.group(),))


def as_fleet(spec: ClusterSpec | Fleet) -> Fleet:
    return spec if isinstance(spec, Fleet) else spec.fleet()


PRESETS: dict[str, ClusterSpec] = {
    # Block's paper setting: 12 x A30, Llama-2-7B, batch cap 48, chunk 512, 1052 KV blocks.
    "paper": ClusterSpec("A30", "Llama-2-7B", 12, 48, 512, 1052),
    # Vidur's reference workload: 4 x A100, Llama-2-7B, chunk 512, batch cap 128.
    "vidur": ClusterSpec("A100-80G", "Llama-2-7B", 4, 128, 512),
    # The embedded default of `make demo`: small enough to run anywhere in seconds.
    "demo": ClusterSpec("A100-80G", "Llama-2-7B", 4, 64, 512),
    # The prefix-caching studies: Qwen2-7B (32k context) on A100-40G with vLLM V1's A100 serving defaults
    # (256 seats, 2,048-token chunks), the KV cache sized from GPU memory (24,564 blocks, 393k tokens).
    "qwen-a100": ClusterSpec("A100-40G", "Qwen2-7B", 8, 256, 2048),
}


def get_preset(name: str) -> ClusterSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def get_cluster(text: str, model: str = "Llama-2-7B") -> ClusterSpec | Fleet:
    """A homogeneous preset (``paper``), a fleet preset (``hetero``) or the compact form (``4xA100-80G,8xA30``)."""
    if text in PRESETS:
        return PRESETS[text]
    if text in FLEETS or "x" in text.lower():
        return parse_fleet(text, model=model)
    raise ValueError(f"unknown cluster {text!r}; presets: {', '.join([*PRESETS, *FLEETS])}, "
                     "or COUNTxGPU[:tpN],... (e.g. 4xA100-80G,8xA30)")


@dataclass
class Honesty:
    """How much the predictor knows. Defaults are the honest, realistic setting."""

    noise: float = 0.10  # world per-iteration step-time noise (+-)
    state_interval: float = 0.02  # predictor state staleness
    oracle_timing: bool = False  # predictor uses the world's own timing model
    oracle_lengths: bool = False  # requests carry their true length as the "estimate"

    @property
    def label(self) -> str:
        parts = [p for p, on in (("oracle-timing", self.oracle_timing), ("oracle-lengths", self.oracle_lengths))
                 if on]
        return "+".join(parts) if parts else "honest"


_WARMUP_CACHE: dict[tuple, list[StepSample]] = {}


def warmup_samples(spec: ClusterSpec | InstanceGroup, noise: float, trace: Trace, seed: int = 0) -> list[StepSample]:
    """Step times measured from a warm-up run of one world engine, as a deployment would collect them
    from its first minutes of engine metrics; the predictor's timing model is fitted on these. ``seed``
    tells instances apart: each is calibrated on its own warm-up."""
    key = (spec, noise, seed, trace.source, len(trace))
    if key in _WARMUP_CACHE:
        return _WARMUP_CACHE[key]
    eng = Engine(spec.engine_config(), spec.world_timing(), noise=noise, seed=seed + 777, fast_path=False)
    eng.step_log = []
    reqs = poisson_workload(trace, 400, 4.0, seed + 999)
    for r in reqs:
        eng.advance(r.arrival)
        eng.add_request(r)
    eng.advance()
    rng = np.random.default_rng(seed)
    log = eng.step_log
    pick = rng.choice(len(log), size=min(3000, len(log)), replace=False)
    samples = [StepSample(log[i][0], log[i][1], log[i][2], log[i][3]) for i in pick]
    _WARMUP_CACHE[key] = samples
    return samples


def _world_and_predictor(spec: ClusterSpec | InstanceGroup, honesty: Honesty, prior: LengthPrior,
                         calibration_trace: Trace, seed: int = 0) -> tuple[TimingModel, Predictor]:
    """The world's timing model, and the predictor that may only know a calibrated one (unless oracle)."""
    world = spec.world_timing()
    if honesty.oracle_timing:
        return world, build_predictor(prior, world, oracle=world)
    return world, build_predictor(prior, world, samples=warmup_samples(spec, honesty.noise, calibration_trace, seed))


def instance_predictors(fleet: Fleet, honesty: Honesty, prior: LengthPrior,
                        calibration_trace: Trace) -> dict[str, Predictor]:
    """One predictor per instance, each calibrated on its own instance's warm-up step times (through the
    one factory) and labelled with its GPU: a side-car knows its own engine, not its neighbours'."""
    out = {}
    for i, (name, group) in enumerate(fleet.members()):
        _, predictor = _world_and_predictor(group, honesty, prior, calibration_trace, seed=i)
        predictor.label = f"{predictor.label} gpu={group.label}"
        out[name] = predictor
    return out


def counterfactual(engine: Engine, request: Request, now: float, horizon: float) -> tuple[float, float]:
    """TTFT and E2E the request would have had on this world engine had it been sent there at ``now``
    and nothing arrived after it: true lengths, true (noise-free) timing. Audit only; no policy sees it."""
    fork = engine.fork()
    fork.advance(now)
    seq = fork.add_request(dataclasses.replace(request, arrival=now))
    fork.run_for(seq, first_token_only=False, limit=now + horizon)
    first = seq.first_token if seq.first_token is not None else fork.now
    finish = seq.finish_time if seq.finish_time is not None else fork.now
    return first - now, finish - now


class SimRouter:
    """The simulator's router callback: the shared ``Router`` over stale instance states.

    Each instance's state is refreshed every ``state_interval`` seconds; requests dispatched since are
    known only to this router (the same ``extra`` a live scheduler passes). Cache-aware policies get each
    candidate's prefix match from the source they declare: the polled state's cache (exact) or this
    router's own index of the prompts it sent (approximate). With ``audit_every`` = k, every k-th decision
    is audited after it is made: every candidate's honest prediction next to its counterfactual outcome, so
    rank accuracy of the choice can be measured. ``predictor`` is one per instance name (each side-car
    predicts its own engine) or one for all; a policy that rejects (``Rejected``) makes the call answer None.
    """

    def __init__(self, policy: Policy, predictor: Predictor | Mapping[str, Predictor], state_interval: float,
                 audit_every: int = 0):
        if policy.prefix_source not in (None, *PREFIX_SOURCES):
            raise ValueError(f"policy {policy.name!r}: unknown prefix source {policy.prefix_source!r}; "
                             f"choose one of {PREFIX_SOURCES}")
        self.router = Router(policy)
        self.predictors: Mapping[str, Predictor] = {} if isinstance(predictor, Predictor) else predictor
        self.predictor = predictor if isinstance(predictor, Predictor) else next(iter(predictor.values()))
        self.label = "; ".join(dict.fromkeys(p.label for p in self.predictors.values())) or self.predictor.label
        self._capacity: dict[str, float] = {}
        self.rejected: list[Request] = []
        self.state_interval = state_interval
        self.audit_every = audit_every
        self.index = ApproximatePrefixIndex()
        self._views: dict[str, StateView] = {}
        self.decisions: list[RoutingDecision] = []
        self.audit: list[dict] = []

    def _view(self, inst: Instance, now: float) -> StateView:
        view = self._views.get(inst.name)
        if view is None or now - view.seen_at >= self.state_interval:
            view = StateView.of(inst.engine.snapshot(), now)
            self._views[inst.name] = view
        return view

    def predictor_of(self, name: str) -> Predictor:
        return self.predictors.get(name, self.predictor)

    def _predict(self, view: StateView, name: str, request: Request, target: str, now: float) -> Prediction:
        return view.predict(self.predictor_of(name), name, request, target, now, self.router.policy.wants_impact)

    def capacity_of(self, name: str, config: EngineConfig) -> float:
        """R_peak of the instance from its own predictor's timing model: what its side-car can tell."""
        cap = self._capacity.get(name)
        if cap is None:
            cap = self._capacity[name] = peak_token_throughput(self.predictor_of(name).timing, config)
        return cap

    def _candidate(self, name: str, view: StateView, prompt: tuple[int, ...]) -> Candidate:
        c = view.candidate(name, prompt, self.predictor.prior, self.router.policy.prefix_source, self.index)
        c.capacity = self.capacity_of(name, view.state.config)
        return c

    def __call__(self, request: Request, instances: Sequence[Instance], now: float) -> str | None:
        views = {inst.name: self._view(inst, now) for inst in instances}
        block_size = instances[0].engine.config.block_size
        prompt = prompt_hashes(request, block_size)
        candidates = [self._candidate(name, view, prompt) for name, view in views.items()]
        try:
            decision = self.router.route(
                request, candidates, lambda c, req, target: self._predict(views[c.name], c.name, req, target, now),
                request_id=str(request.id), ts=now, predictor=self.label)
        except Rejected:
            self.rejected.append(request)
            return None
        self.decisions.append(decision)
        if self.audit_every and (len(self.decisions) - 1) % self.audit_every == 0:
            self._audit(request, instances, views, decision, now)
        chosen = views[decision.choice]
        chosen.pending.append(request)
        if self.router.policy.prefix_source == "approximate" and prompt:
            self.index.record(decision.choice, prompt, chosen.state.config.num_blocks)
        return decision.choice

    def _audit(self, request: Request, instances: Sequence[Instance], views: dict[str, StateView],
               decision: RoutingDecision, now: float) -> None:
        asked = {c.name: c.prediction("e2e") for c in decision.candidates}
        for inst in instances:
            pred = asked.get(inst.name) or self._predict(views[inst.name], inst.name, request, "e2e", now)
            ttft, e2e = counterfactual(inst.engine, request, now, self.predictor_of(inst.name).horizon_s)
            self.audit.append({"request_id": request.id, "instance": inst.name, "chosen": inst.name == decision.choice,
                               "predicted_ttft": pred.ttft, "predicted_e2e": pred.e2e,
                               "oracle_ttft": ttft, "oracle_e2e": e2e})

    def decisions_frame(self) -> pd.DataFrame:
        """The decisions as ``decisions`` table rows (run_id left for whoever stores them)."""
        return pd.DataFrame([d.row().to_dict() for d in self.decisions])

    @property
    def decision_seconds(self) -> float:
        return sum(d.decision_s for d in self.decisions)


@dataclass
class RunResult:
    records: pd.DataFrame
    decisions: pd.DataFrame
    summary: dict
    audit: pd.DataFrame = field(default_factory=pd.DataFrame)  # SimRouter's audit rows, if asked for
    gave_up: bool = False  # stopped early: certain to miss the ``give_up_ttft`` it was given at P99


class _MissedSlo(Exception):
    """Raised inside a run once its P99 TTFT is certain to exceed the bound it was given."""


class _TtftGuard:
    """A router wrapper that stops a run once more than 1% of its requests (plus one) have waited longer
    than ``bound`` for a first token: its P99 TTFT is then above ``bound`` whatever comes next. Capacity
    searches only need that verdict, and overloaded runs are the slowest to finish."""

    def __init__(self, router: SimRouter, bound: float, requests: int):
        self.router = router
        self.bound = bound
        self.allowed = requests // 100 + 1
        self.cluster: Cluster | None = None
        self._missed_finished = 0
        self._seen_finished = 0
        self._calls = 0

    def __call__(self, request: Request, instances: Sequence[Instance], now: float) -> str:
        self._calls += 1
        if self.cluster is not None and self._calls % 16 == 0:
            self._check(now)
        return self.router(request, instances, now)

    def _check(self, now: float) -> None:
        assert self.cluster is not None
        finished = self.cluster.result.finished
        for _, s in finished[self._seen_finished:]:
            self._missed_finished += s.first_token - s.arrival > self.bound
        self._seen_finished = len(finished)
        late = self._missed_finished
        for inst in self.cluster.instances:
            late += sum(now - s.arrival > self.bound for s in inst.engine.waiting if s.first_token is None)
            late += sum(now - s.arrival > self.bound for s in inst.engine.running.values() if s.first_token is None)
        if late > self.allowed:
            raise _MissedSlo


def slo_summary(records: pd.DataFrame, requests: Sequence[Request], rejected: Sequence[Request],
                duration: float) -> dict:
    """Goodput (requests per second that met their own SLOs, DistServe's definition) and attainment (the
    share of all requests that did, rejected ones counted as missed). Without SLOs every finished request
    counts as met."""
    by_id = {r.id: r for r in requests}
    met = 0
    for rid, ttft, tpot in zip(records["request_id"], records["ttft"], records["tpot"], strict=True):
        r = by_id[rid]
        met += ((r.slo_ttft_s is None or ttft <= r.slo_ttft_s)
                and (r.slo_tpot_s is None or not tpot > r.slo_tpot_s))  # tpot is nan for one-token answers
    total = len(records) + len(rejected)
    return {"goodput": met / duration if duration > 0 else float("nan"),
            "slo_attainment": met / total if total else float("nan"), "rejected": len(rejected)}


def run_policy(
    spec: ClusterSpec | Fleet,
    policy_name: str,
    requests: Sequence[Request],
    *,
    prior: LengthPrior,
    calibration_trace: Trace,
    honesty: Honesty | None = None,
    seed: int = 0,
    power_of_k: int | None = None,
    length_estimator: Callable[[Sequence[Request]], list[int]] | None = None,
    progress: Callable[[int], None] | None = None,
    audit_every: int = 0,
    give_up_ttft: float | None = None,
) -> RunResult:
    """Simulate one policy on one workload and return per-request records and a summary. With
    ``give_up_ttft`` the run stops as soon as its P99 TTFT is certain to exceed it (``gave_up``). Every
    instance runs its own group's engine and timing, and is predicted by its own predictor."""
    honesty = honesty or Honesty()
    fleet = as_fleet(spec)
    policy = make_policy(policy_name, seed=seed, power_of_k=power_of_k, num_instances=fleet.instances)
    reqs = list(requests)
    if policy.uses_length_estimates:
        if honesty.oracle_lengths:
            estimates = [r.output_tokens for r in reqs]
        elif length_estimator is not None:
            estimates = length_estimator(reqs)
        else:
            raise ValueError(f"policy {policy_name!r} needs length estimates: pass a length estimator "
                             "or use oracle lengths (labelled oracle)")
        reqs = [dataclasses.replace(r, predicted_output_tokens=int(e)) for r, e in zip(reqs, estimates, strict=True)]
    router = SimRouter(policy, instance_predictors(fleet, honesty, prior, calibration_trace), honesty.state_interval,
                       audit_every)
    members = fleet.members()
    engines = [Engine(group.engine_config(), group.world_timing(), noise=honesty.noise, seed=seed * 1000 + i,
                      name=name) for i, (name, group) in enumerate(members)]
    guard = _TtftGuard(router, give_up_ttft, len(reqs)) if give_up_ttft is not None else None
    cluster = Cluster(engines, guard or router)
    if guard is not None:
        guard.cluster = cluster
    try:
        result = cluster.run(reqs, progress=progress)
    except _MissedSlo:
        return RunResult(records_frame(cluster.result.finished), router.decisions_frame(),
                         {"completed": len(cluster.result.finished), "p99_ttft": math.inf}, gave_up=True)
    records = records_frame(result.finished)
    records["group"] = records["instance"].map({name: g.label for name, g in members})
    summary = summarize(records) if len(records) else {"completed": 0, "duration_s": 0.0}  # all rejected
    summary.update(slo_summary(records, reqs, router.rejected, summary["duration_s"]))
    summary["decision_ms_mean"] = router.decision_seconds / max(1, len(reqs)) * 1e3
    queried = sum(e.prefix_query_tokens for e in engines)
    summary["prefix_hit_rate"] = sum(e.prefix_hit_tokens for e in engines) / queried if queried else float("nan")
    return RunResult(records, router.decisions_frame(), summary, pd.DataFrame(router.audit))


@dataclass
class Scenario:
    """A workload that is not Poisson arrivals over a length trace: shared prefixes, chat sessions, a timed
    trace with its prefix hashes. ``build(qps, seed)`` makes the requests; ``prior`` and ``calibration``
    are what the predictor may know, taken from traffic other than the requests it is judged on."""

    name: str
    build: Callable[[float, int], list[Request]]
    prior: LengthPrior
    calibration: Trace  # lengths for the warm-up run the predictor's timing is fitted on


@dataclass
class Study:
    """One offline experiment set-up: cluster, lengths, arrivals and what the predictor may know."""

    spec: ClusterSpec | Fleet
    lengths: str = "synthetic"  # "synthetic" (embedded), "alpaca", or a timed trace name for replay
    requests: int = 2000
    honesty: Honesty = field(default_factory=Honesty)
    replay: bool = False  # replay the trace's own (time-scaled) arrivals instead of Poisson
    power_of_k: int | None = None
    length_estimator: Callable[[Sequence[Request]], list[int]] | None = None
    audit_every: int = 0  # audit every k-th routing decision against counterfactuals (0: none)
    scenario: Scenario | None = None  # when given, it builds the workload and says what the predictor knows
    slo_classes: tuple[SloClass, ...] = ()  # each request carries the SLOs of one, drawn by share

    def __post_init__(self) -> None:
        if self.scenario is not None:
            self.lengths = self.scenario.name
            self.trace, self.prior = self.scenario.calibration, self.scenario.prior
            return
        self.trace, self.prior = lengths_source(self.lengths, 0)
        if self.lengths == "alpaca":  # carry the prompt texts, for length estimators
            with contextlib.suppress(FileNotFoundError):
                self.trace.prompts = load_alpaca().prompts

    def workload(self, qps: float, seed: int) -> list[Request]:
        if self.scenario is not None:
            reqs = self.scenario.build(qps, seed)
        elif self.replay:
            reqs = trace_workload(self.trace, self.requests, qps)
        else:
            reqs = poisson_workload(self.trace, self.requests, qps, seed)
        return assign_slos(reqs, self.slo_classes, seed)

    def run(self, policy: str, qps: float, seed: int, give_up_ttft: float | None = None) -> RunResult:
        return run_policy(self.spec, policy, self.workload(qps, seed), prior=self.prior,
                          calibration_trace=self.trace, honesty=self.honesty, seed=seed,
                          power_of_k=self.power_of_k, length_estimator=self.length_estimator,
                          audit_every=self.audit_every, give_up_ttft=give_up_ttft)


def compare(study: Study, policies: Sequence[str], qps_values: Sequence[float], seeds: Sequence[int],
            progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Every policy at every QPS and seed: one row each with the headline latencies."""
    rows = []
    for qps in qps_values:
        for policy in policies:
            for seed in seeds:
                s = study.run(policy, qps, seed).summary
                rows.append({"policy": policy, "qps": qps, "seed": seed, "mode": study.honesty.label,
                             **{k: s[k] for k in ("p50_ttft", "p99_ttft", "p50_e2e", "p99_e2e", "preemptions",
                                                  "goodput", "slo_attainment", "rejected", "decision_ms_mean")}})
                if progress is not None:
                    progress(f"{policy} qps={qps} seed={seed}")
    return pd.DataFrame(rows)


def capacity_table(study: Study, policies: Sequence[str], slos: Sequence[float], seeds: Sequence[int],
                   lo: float, hi: float, rel_tol: float = 0.02,
                   progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Capacity (max QPS with P99 TTFT <= SLO) of each policy at each SLO, per seed and averaged."""
    rows = []
    for policy in policies:
        for slo in slos:
            cap = capacity(lambda qps, seed, policy=policy: study.run(policy, qps, seed).records, slo,
                           metric="ttft", q=99, lo=lo, hi=hi, seeds=seeds, rel_tol=rel_tol)
            rows.append({"policy": policy, "slo_ttft_p99_s": slo, "capacity_qps": cap["capacity"],
                         "capacity_std": cap["capacity_std"], "per_seed": cap["per_seed"],
                         "mode": study.honesty.label})
            if progress is not None:
                progress(f"{policy} slo={slo}s capacity={cap['capacity']:.2f}")
    return pd.DataFrame(rows)


def attainment_capacity(study: Study, policy: str, goal: float, *, lo: float, hi: float, seeds: Sequence[int],
                        rel_tol: float = 0.02) -> dict:
    """Goodput as a capacity criterion (DistServe): the highest QPS at which at least ``goal`` of the
    requests meet their own SLOs (rejected ones count as missed), by bisection per seed."""
    if not 0 < goal <= 1:
        raise ValueError(f"attainment goal must be in (0, 1], got {goal}")
    return highest_passing(lambda qps, seed: study.run(policy, qps, seed).summary["slo_attainment"] >= goal,
                           lo=lo, hi=hi, seeds=seeds, rel_tol=rel_tol)


class SimProvisioner:
    """The provisioning controller on the simulator's hook: the same Provisioner as online, fed from
    engine snapshots (predicted lengths only, never true ones) and the router's arrival log."""

    def __init__(self, provisioner: Provisioner):
        self.provisioner = provisioner
        self.period = provisioner.period

    def decide(self, now: float, view: ClusterView) -> list[ScaleAction]:
        window = self.provisioner.config.window
        instances, ttfts = [], []
        for inst in view.instances:
            ready = inst.is_ready(now)
            state = inst.engine.snapshot() if ready else None
            instances.append(InstanceView(inst.name, state, ready, inst.draining))
            if state is not None:
                ttfts += [(r.first_token_time, r.first_token_time - r.arrival) for r in state.requests
                          if r.first_token_time is not None and r.first_token_time > now - window]
        for _, s in reversed(view.finished):
            if s.finish_time < now - window:
                break
            if s.first_token is not None and s.first_token > now - window:
                ttfts.append((s.first_token, s.first_token - s.arrival))
        arrivals = view.arrivals[bisect.bisect_left(view.arrivals, now - window):]
        obs = Observation(now, instances, arrivals, ttfts)
        return [ScaleAction(d.action, d.instance, d.reason) for d in self.provisioner.decide(obs)]


def run_provisioning(spec: ClusterSpec, requests: Sequence[Request], config: ProvisionerConfig, *,
                     start_instances: int, prior: LengthPrior, calibration_trace: Trace, policy: str = "block",
                     honesty: Honesty | None = None, seed: int = 0) -> dict:
    """One provisioning mode on one workload: latency, SLO violations, cost and actions."""
    honesty = honesty or Honesty()
    cfg = spec.engine_config()
    world, predictor = _world_and_predictor(spec, honesty, prior, calibration_trace)
    router = SimRouter(make_policy(policy, seed=seed), predictor, honesty.state_interval)
    counter = iter(range(10**6))

    def factory(name: str) -> Engine:
        return Engine(cfg, world, noise=honesty.noise, seed=seed * 1000 + 500 + next(counter), name=name)

    engines = [factory(f"instance-{i}") for i in range(start_instances)]
    controller = Provisioner(config, predictor)
    cluster = Cluster(engines, router, provisioner=SimProvisioner(controller), engine_factory=factory,
                      cold_start=config.cold_start)
    result = cluster.run(list(requests))
    records = records_frame(result.finished)
    summary = summarize(records, slo_ttft=config.slo_ttft)
    actions = [e for e in result.provisioning if e.kind in ("add", "drain")]
    return {"mode": config.mode, "p99_ttft": summary["p99_ttft"], "p99_e2e": summary["p99_e2e"],
            "slo_violations": int((records["ttft"] > config.slo_ttft).sum()),
            "instance_seconds": result.instance_seconds, "scale_actions": len(actions),
            "peak_instances": _peak_instances(result.provisioning, start_instances),
            "events": result.provisioning, "decisions": controller.decisions}


def _peak_instances(events: Sequence, start: int) -> int:
    live = peak = start
    for e in sorted(events, key=lambda e: e.time):
        live += {"add": 1, "stop": -1}.get(e.kind, 0)
        peak = max(peak, live)
    return peak
