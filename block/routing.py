"""The routing seam: one decision procedure for both bodies, the offline simulator and the live scheduler.

A decision has three steps. ``Router.plan`` asks the policy which candidates it will look at
(``shortlist``) and which prediction it reads, and hides the length estimate from the predictors unless
the policy may use it. The caller then resolves the predictions for the shortlisted candidates only:
synchronously offline (``Router.route``), concurrently within a time budget live. ``Router.decide`` lets
the policy choose and returns one ``RoutingDecision``, which becomes the same ``decisions`` row offline
and live. The caller owns only the I/O; what is asked, what counts as a fallback and what is recorded are
decided here, once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson

from block.policies import Candidate, Policy
from block.predictor.core import Prediction, Predictor
from block.prefix_index import ApproximatePrefixIndex, BlockSet, ExactPrefixView, prompt_hashes
from block.protocol import LoadSignals
from simulator.engine import CachedRun, InstanceState
from simulator.workload import LengthPrior, Request
from store.schema import DecisionRow

FALLBACKS = ("none", "partial", "all")


class NoCandidates(RuntimeError):
    """No instance can take the request; the message says why each one cannot."""


@dataclass
class RoutingPlan:
    request: Request  # as the predictors may see it
    target: str | None  # the prediction to resolve, or None when the policy reads load signals only
    considered: Sequence[Candidate]
    shortlist: Sequence[Candidate]
    started: float  # perf_counter() when planning began


@dataclass
class RoutingDecision:
    request_id: str
    ts: float
    policy: str
    choice: str
    target: str | None
    considered: int
    candidates: Sequence[Candidate]  # the shortlist, with the predictions that arrived
    fallback: str  # none | partial | all
    decision_s: float
    predictor: str  # what the predictors knew (their honesty labels)

    @property
    def chosen_prediction(self) -> Prediction | None:
        if self.target is None:
            return None
        return next((c.prediction(self.target) for c in self.candidates if c.name == self.choice), None)

    @property
    def asked(self) -> int:
        return len(self.candidates) if self.target is not None else 0

    def row(self, run_id: str = "") -> DecisionRow:
        chosen = self.chosen_prediction
        rows = []
        for c in self.candidates:
            p = c.prediction(self.target) if self.target else None
            rows.append({"instance": c.name, "running": c.signals.running, "waiting": c.signals.waiting,
                         "free_blocks": c.signals.free_blocks, "predicted_ttft": p.ttft if p else None,
                         "predicted_e2e": p.e2e if p else None})
        return DecisionRow(run_id=run_id, request_id=self.request_id, ts=self.ts, policy=self.policy,
                           chosen=self.choice, decision_ms=self.decision_s * 1e3, target=self.target,
                           considered=self.considered, asked=self.asked, fallback=self.fallback,
                           predictor=self.predictor, predicted_ttft=chosen.ttft if chosen else None,
                           predicted_e2e=chosen.e2e if chosen else None, candidates=orjson.dumps(rows).decode())


PredictFn = Callable[[Candidate, Request, str], Prediction | None]


@dataclass
class StateView:
    """What a router knows of one instance: a state (polled by the offline router, streamed by the side-car
    to a live scheduler's mirror) with a view of its prefix cache, plus the requests this router sent there
    that the state does not show yet. Both bodies build candidates and predictions here, so they cannot
    drift apart."""

    seen_at: float  # when the state was taken, on the router's clock
    state: InstanceState
    cache: ExactPrefixView | BlockSet  # offline: the state's own cache tree; live: the mirrored block set
    pending: list[Request] = field(default_factory=list)
    _base: tuple[LengthPrior, LoadSignals] | None = field(default=None, init=False, repr=False)

    @classmethod
    def of(cls, state: InstanceState, seen_at: float) -> StateView:
        return cls(seen_at, state, ExactPrefixView(state))

    def candidate(self, name: str, prompt: tuple[int, ...], prior: LengthPrior, source: str | None,
                  index: ApproximatePrefixIndex | None = None) -> Candidate:
        """The instance as a policy sees it; ``source``: the prefix knowledge the policy reads (exact: this
        state's cache; approximate: the router's own ``index``; None: none)."""
        signals = self.signals(prior)
        if source == "exact":
            matched, tree = self.cache.match(prompt), self.cache.size
        elif source == "approximate" and index is not None:
            matched, tree = index.match(name, prompt), index.size(name)
        else:
            return Candidate(name, signals, len(self.pending))
        return Candidate(name, signals, len(self.pending), matched_blocks=matched, prompt_blocks=len(prompt),
                         tree_blocks=tree, prefix_source=source)

    def signals(self, prior: LengthPrior) -> LoadSignals:
        """The state's load signals plus the unseen dispatches; the state's own part is computed once per state
        (a router decides many times on one state)."""
        if self._base is None or self._base[0] is not prior:
            self._base = (prior, LoadSignals.from_state(self.state, prior, (), self.cache))
        bs = self.state.config.block_size
        return self._base[1].plus(self.pending, prior, bs, [self.cache.match(prompt_hashes(r, bs))
                                                            for r in self.pending])

    def predict(self, predictor: Predictor, name: str, request: Request, target: str, now: float,
                with_impact: bool = False) -> Prediction:
        """The what-if on this instance at ``now`` (on the state's clock), the unseen dispatches queued first;
        ``with_impact``: also the delay it adds to the requests there (policies that ask, ``wants_impact``).
        Live, the cache arrives as a block set rather than the engine's tree: the fork gets the candidate's
        own hit as one cached (evictable) run."""
        state = self.state
        if isinstance(self.cache, BlockSet):
            hit = self.cache.match(prompt_hashes(request, state.config.block_size))
            if hit:
                state = state.with_cached([CachedRun(None, tuple(request.block_hashes[:hit]), 0, 0)])
        return predictor.predict(state, request, target=target, now=now, instance=name, extra=self.pending,
                                 with_impact=with_impact)


class Router:
    def __init__(self, policy: Policy):
        self.policy = policy

    def plan(self, request: Request, candidates: Sequence[Candidate], started: float | None = None) -> RoutingPlan:
        """``started``: perf_counter() when the caller began building the candidates, so that a decision's
        time (and its budget) includes that work."""
        started = time.perf_counter() if started is None else started
        if not candidates:
            raise NoCandidates("no instance available to serve the request")
        policy = self.policy
        seen = request
        if not policy.uses_length_estimates and request.predicted_output_tokens is not None:
            seen = dataclasses.replace(request, predicted_output_tokens=None)
        return RoutingPlan(seen, policy.prediction_target, candidates, list(policy.shortlist(candidates)), started)

    def decide(self, plan: RoutingPlan, *, request_id: str, ts: float, predictor: str = "") -> RoutingDecision:
        """Let the policy choose among the shortlist with the predictions the caller resolved."""
        fallback = "none"
        if plan.target is not None:
            missing = sum(c.prediction(plan.target) is None for c in plan.shortlist)
            fallback = "all" if missing == len(plan.shortlist) else "partial" if missing else "none"
        choice = self.policy.choose(plan.request, plan.shortlist)
        return RoutingDecision(request_id, ts, self.policy.name, choice, plan.target, len(plan.considered),
                               plan.shortlist, fallback, time.perf_counter() - plan.started, predictor)

    def route(self, request: Request, candidates: Sequence[Candidate], predict: PredictFn, *, request_id: str,
              ts: float, predictor: str = "") -> RoutingDecision:
        """The whole decision with predictions resolved synchronously (the offline body)."""
        plan = self.plan(request, candidates)
        if plan.target is not None:
            for c in plan.shortlist:
                c.predictions[plan.target] = predict(c, plan.request, plan.target)
        return self.decide(plan, request_id=request_id, ts=ts, predictor=predictor)
