"""Routing policies behind one protocol; the same objects route offline and in the live scheduler.

A policy sees candidates, never engines. It says which candidates it wants predictions for
(``shortlist``: power-of-k asks k, not N) and which prediction it reads (``prediction_target``); the
caller (``block.routing.Router``, driven by the offline simulator or the live scheduler) resolves those
predictions, then the policy ``choose``s. Load signals already count requests dispatched to a candidate
but not yet visible in its state.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from block.predictor.core import Prediction
from block.protocol import LoadSignals
from simulator.workload import Request


@dataclass
class Candidate:
    """An instance as a policy sees it: load signals, plus the predictions the caller resolved for it."""

    name: str
    signals: LoadSignals
    dispatched: int = 0  # sent here but not yet visible in the instance's state
    predictions: dict[str, Prediction | None] = field(default_factory=dict)

    def prediction(self, target: str) -> Prediction | None:
        """What-if latency here; None when the predictor was not asked or missed its time budget."""
        return self.predictions.get(target)


class Policy:
    name = "policy"
    prediction_target: str | None = None  # the prediction this policy reads; None: load signals only
    uses_length_estimates = False  # whether predictions may see the length estimator's guess

    def shortlist(self, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        """The candidates the policy will choose among, and the only ones a caller asks to predict."""
        return candidates

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        raise NotImplementedError


def _argmin(candidates: Sequence[Candidate], key: Callable[[Candidate], float]) -> str:
    """Lowest key; ties go to the earliest candidate, which callers list in a stable order."""
    best, best_v = candidates[0], key(candidates[0])
    for c in candidates[1:]:
        v = key(c)
        if v < best_v:
            best, best_v = c, v
    return best.name


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        c = candidates[self._next % len(candidates)]
        self._next += 1
        return c.name


class RandomChoice(Policy):
    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        return self._rng.choice(list(candidates)).name


class LeastRequests(Policy):
    """Fewest requests in the instance, running + waiting + dispatched-not-yet-visible."""

    name = "least_requests"

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        return _argmin(candidates, lambda c: c.signals.running + c.signals.waiting)


class LeastTokens(Policy):
    """Least unfinished work in tokens (prefill to compute plus expected decode)."""

    name = "least_tokens"

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        return _argmin(candidates, lambda c: c.signals.unfinished_tokens)


class Llumnix(Policy):
    """Llumnix's freeness: KV blocks left after the queued prefills, per running request."""

    name = "llumnix"

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        def unfreeness(c: Candidate) -> float:
            s = c.signals
            return -(s.free_blocks - s.queued_prefill_blocks) / (s.running + 1)

        return _argmin(candidates, unfreeness)


class Infaas(Policy):
    """INFaaS-style load: free KV blocks per running request (waiting work is not looked at)."""

    name = "infaas"

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        return _argmin(candidates, lambda c: -c.signals.free_blocks / (c.signals.running + 1))


class Block(Policy):
    """Send the request where its predicted latency is lowest.

    Candidates whose predictor did not answer in time are skipped; when none answered, the decision
    falls back to least_requests on live signals.
    """

    def __init__(self, target: str = "e2e", use_length_estimates: bool = False, name: str = "block"):
        self.target = target
        self.prediction_target = target
        self.uses_length_estimates = use_length_estimates
        self.name = name
        self._fallback = LeastRequests()

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        best, best_v = None, math.inf
        for c in candidates:
            p = c.prediction(self.target)
            if p is None:
                continue
            v = p.value(self.target)
            if v < best_v:
                best, best_v = c, v
        if best is None:
            return self._fallback.choose(request, candidates)
        return best.name


class PowerOfK(Policy):
    """Shortlist k random candidates, then apply the inner policy: k predictions instead of N."""

    def __init__(self, inner: Policy, k: int, seed: int = 0):
        if k < 1:
            raise ValueError(f"power_of_k needs k >= 1, got {k}")
        self.inner = inner
        self.k = k
        self.name = f"{inner.name}@{k}"
        self.uses_length_estimates = inner.uses_length_estimates
        self.prediction_target = inner.prediction_target
        self._rng = random.Random(seed)

    def shortlist(self, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        if self.k >= len(candidates):
            return candidates
        picked = sorted(self._rng.sample(range(len(candidates)), self.k))
        return [candidates[i] for i in picked]

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        return self.inner.choose(request, candidates)


POLICIES: dict[str, Callable[[int], Policy]] = {
    "round_robin": lambda seed: RoundRobin(),
    "random": lambda seed: RandomChoice(seed),
    "least_requests": lambda seed: LeastRequests(),
    "least_tokens": lambda seed: LeastTokens(),
    "llumnix": lambda seed: Llumnix(),
    "infaas": lambda seed: Infaas(),
    "block": lambda seed: Block("e2e", False, "block"),
    "block_ttft": lambda seed: Block("ttft", False, "block_ttft"),
    "block_star": lambda seed: Block("e2e", True, "block_star"),
}

HEURISTICS = ("round_robin", "random", "least_requests", "least_tokens", "llumnix", "infaas")


def make_policy(name: str, *, seed: int = 0, power_of_k: int | None = None,
                num_instances: int | None = None) -> Policy:
    """A policy by name, optionally wrapped in power-of-k; names look like ``block`` or ``block@2``."""
    base, _, k_text = name.partition("@")
    if base not in POLICIES:
        raise ValueError(f"unknown policy {base!r}; valid policies: {', '.join(POLICIES)}")
    if k_text:
        if power_of_k is not None:
            raise ValueError(f"policy {name!r} already names k; do not also pass power_of_k")
        try:
            power_of_k = int(k_text)
        except ValueError as exc:
            raise ValueError(f"policy {name!r}: k after '@' must be an integer") from exc
    policy = POLICIES[base](seed)
    if power_of_k is None:
        return policy
    if num_instances is not None and power_of_k > num_instances:
        raise ValueError(f"power_of_k k={power_of_k} is larger than the cluster ({num_instances} instances)")
    return PowerOfK(policy, power_of_k, seed)
