"""Routing policies behind one protocol; the same objects route offline and in the live scheduler.

A policy sees candidates, never engines: each candidate carries cheap load signals (which already count
requests dispatched to it but not yet visible in its state) and, on demand, a what-if Prediction. The
offline harness (``block.offline``) and the live scheduler each implement ``Candidate``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from block.predictor.core import LengthPrior, Prediction
from simulator.engine import InstanceState
from simulator.workload import Request


@dataclass
class LoadSignals:
    """Live signals every heuristic needs; computed from an InstanceState plus not-yet-visible work."""

    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    unfinished_tokens: int  # prefill still to compute + decode still expected (estimated lengths)
    queued_prefill_blocks: int  # KV blocks the waiting queue will claim when admitted

    @classmethod
    def from_state(cls, state: InstanceState, prior: LengthPrior, pending: Sequence[Request] = ()) -> LoadSignals:
        bs = state.config.block_size
        running = waiting = used = tokens = queued = 0
        for r in state.requests:
            used += r.allocated_blocks
            left = prior.expected_remaining(r.generated_tokens, r.predicted_output_tokens)
            tokens += r.prompt_tokens + r.generated_tokens - r.computed_tokens + left
            if r.phase == "running":
                running += 1
            else:
                waiting += 1
                queued += -(-(r.prompt_tokens + r.generated_tokens) // bs)
        base = cls(running, waiting, state.config.num_blocks - used, state.config.num_blocks, tokens, queued)
        return base.plus(pending, prior, bs)

    def plus(self, pending: Sequence[Request], prior: LengthPrior, block_size: int = 16) -> LoadSignals:
        """These signals with requests dispatched here that the instance does not show yet."""
        if not pending:
            return self
        tokens = queued = 0
        for r in pending:
            queued += -(-r.prompt_tokens // block_size)
            p = r.predicted_output_tokens
            tokens += r.prompt_tokens + (p if p is not None else prior.median)
        return LoadSignals(self.running, self.waiting + len(pending), self.free_blocks, self.total_blocks,
                           self.unfinished_tokens + tokens, self.queued_prefill_blocks + queued)


class Candidate(Protocol):
    name: str
    signals: LoadSignals
    dispatched: int  # sent here but not yet visible in the instance's state

    def prediction(self, request: Request, target: str) -> Prediction | None:
        """What-if latency of ``request`` here; None when the predictor missed its time budget."""
        ...


class Policy:
    name = "policy"
    uses_predictions = False
    uses_length_estimates = False
    prediction_target: str | None = None  # what a caller should prefetch predictions for

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

    uses_predictions = True

    def __init__(self, target: str = "e2e", use_length_estimates: bool = False, name: str = "block"):
        self.target = target
        self.prediction_target = target
        self.uses_length_estimates = use_length_estimates
        self.name = name
        self._fallback = LeastRequests()
        self.fallbacks = 0

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        if not self.uses_length_estimates and request.predicted_output_tokens is not None:
            request = Request(request.id, request.arrival, request.prompt_tokens, request.output_tokens,
                              None, request.prompt)
        best, best_v = None, math.inf
        for c in candidates:
            p = c.prediction(request, self.target)
            if p is None:
                continue
            v = p.value(self.target)
            if v < best_v:
                best, best_v = c, v
        if best is None:
            self.fallbacks += 1
            return self._fallback.choose(request, candidates)
        return best.name


class PowerOfK(Policy):
    """Ask only k random candidates, then apply the inner policy: k predictions instead of N."""

    def __init__(self, inner: Policy, k: int, seed: int = 0):
        if k < 1:
            raise ValueError(f"power_of_k needs k >= 1, got {k}")
        self.inner = inner
        self.k = k
        self.name = f"{inner.name}@{k}"
        self.uses_predictions = inner.uses_predictions
        self.uses_length_estimates = inner.uses_length_estimates
        self.prediction_target = inner.prediction_target
        self._rng = random.Random(seed)

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        if self.k >= len(candidates):
            return self.inner.choose(request, candidates)
        picked = sorted(self._rng.sample(range(len(candidates)), self.k))
        return self.inner.choose(request, [candidates[i] for i in picked])


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
