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
from dataclasses import dataclass

import orjson

from block.policies import Candidate, Policy
from block.predictor.core import Prediction
from simulator.workload import Request
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


class Router:
    def __init__(self, policy: Policy):
        self.policy = policy

    def plan(self, request: Request, candidates: Sequence[Candidate]) -> RoutingPlan:
        started = time.perf_counter()
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
