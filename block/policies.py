"""Routing policies behind one protocol; the same objects route offline and in the live scheduler.

A policy sees candidates, never engines. It says which candidates it wants predictions for
(``shortlist``: power-of-k asks k, not N) and which prediction it reads (``prediction_target``); the
caller (``block.routing.Router``, driven by the offline simulator or the live scheduler) resolves those
predictions, then the policy ``choose``s. Load signals already count requests dispatched to a candidate
but not yet visible in its state.

Cache-aware policies say which prefix knowledge they read (``prefix_source``): ``exact`` (the instance's
cache as KV events show it) or ``approximate`` (the router's own index of what it sent where); the caller
fills each candidate's matched blocks from that source (block.prefix_index). The peers' rules and default
parameters are the published ones; each docstring names its source.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from block.predictor.core import Prediction
from block.protocol import LoadSignals
from simulator.workload import Request

PREFIX_SOURCES = ("exact", "approximate")


@dataclass
class Candidate:
    """An instance as a policy sees it: load signals, the request's prefix match here (from the policy's
    ``prefix_source``), plus the predictions the caller resolved for it."""

    name: str
    signals: LoadSignals
    dispatched: int = 0  # sent here but not yet visible in the instance's state
    predictions: dict[str, Prediction | None] = field(default_factory=dict)
    matched_blocks: int = 0  # leading full prompt blocks of the request cached here
    prompt_blocks: int = 0  # full blocks of the request's prompt
    tree_blocks: int = 0  # blocks the source knows cached here (SGLang's tree size)
    prefix_source: str = ""  # exact | approximate | "" (not asked)
    capacity: float = 1.0  # peak tokens/s, R_peak = B / T(B) from the instance's own timing (1.0: unknown)

    def prediction(self, target: str) -> Prediction | None:
        """What-if latency here; None when the predictor was not asked or missed its time budget."""
        return self.predictions.get(target)

    @property
    def prefix_ratio(self) -> float:
        """Matched over total prompt blocks: llm-d's prefix score, SGLang's and AIBrix's match ratio."""
        return self.matched_blocks / self.prompt_blocks if self.prompt_blocks else 0.0


class Policy:
    name = "policy"
    prediction_target: str | None = None  # the prediction this policy reads; None: load signals only
    uses_length_estimates = False  # whether predictions may see the length estimator's guess
    prefix_source: str | None = None  # the prefix knowledge it reads: exact, approximate or none
    wants_impact = False  # whether predictions must include the delay the request inflicts (added_delay)

    def shortlist(self, candidates: Sequence[Candidate]) -> Sequence[Candidate]:
        """The candidates the policy will choose among, and the only ones a caller asks to predict."""
        return candidates

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        raise NotImplementedError


class Rejected(Exception):
    """A policy refuses the request: no instance is predicted to meet its SLO (early rejection, Mooncake's
    admission control). Live, the scheduler answers 429 with ``Retry-After``; offline it is counted."""

    def __init__(self, reason: str, retry_after_s: float = 1.0):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


def _lowest(candidates: Sequence[Candidate], key: Callable[[Candidate], float]) -> Candidate:
    """Lowest key; ties go to the earliest candidate, which callers list in a stable order."""
    best, best_v = candidates[0], key(candidates[0])
    for c in candidates[1:]:
        v = key(c)
        if v < best_v:
            best, best_v = c, v
    return best


def _argmin(candidates: Sequence[Candidate], key: Callable[[Candidate], float]) -> str:
    return _lowest(candidates, key).name


def _argmin_random_tie(candidates: Sequence[Candidate], key: Callable[[Candidate], float],
                       rng: random.Random) -> str:
    """Lowest key, a random one among ties: GIE's max-score picker (``max_score_picker.go``) picks at
    random among the highest scores, so a cold cluster is not filled from its first pod."""
    values = [key(c) for c in candidates]
    low = min(values)
    return rng.choice([c for c, v in zip(candidates, values, strict=True) if v == low]).name


def _load(c: Candidate) -> int:
    """Requests at the instance, running + waiting + dispatched-not-yet-visible: a router's own count."""
    return c.signals.running + c.signals.waiting


def _kv_usage(s: LoadSignals) -> float:
    return 1.0 - s.free_blocks / s.total_blocks if s.total_blocks else 0.0


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

    With ``impact_weight`` w > 0 the score is the request's own predicted E2E plus w times the delay its
    admission is predicted to add to the requests already at the instance (``Prediction.added_delay``,
    dispatched-not-visible ones included): the marginal cost to everyone, not only to the newcomer. Plain
    E2E herds onto the fastest instances of a heterogeneous fleet (issue 13: least_requests won P50 E2E).
    Measured on ``hetero`` (3 seeds, 1500 requests; P50 E2E vs least_requests at 55 / 70 QPS): plain E2E
    +11.2% / +1.1%; plain with fresh states (no staleness) +10.5% / +0.2%, so the unseen dispatches are
    not the cause; TTFT target +6.6% / −0.2%; w = 0.5 +2.7% / −3.8%; w = 1 −0.8% / −7.2%; w = 2 −4.8% /
    −9.8% (P99 E2E 1-2% worse than w = 1). ``block_impact`` keeps w = 1: the total latency added to the
    system, not a tuned weight.

    Candidates whose predictor did not answer in time are skipped; when none answered, the decision
    falls back to least_requests on live signals.
    """

    def __init__(self, target: str = "e2e", use_length_estimates: bool = False, name: str = "block",
                 impact_weight: float = 0.0):
        self.target = target
        self.prediction_target = target
        self.uses_length_estimates = use_length_estimates
        self.name = name
        self.impact_weight = impact_weight
        self.wants_impact = impact_weight > 0
        self._fallback = LeastRequests()

    def score(self, p: Prediction) -> float:
        v = p.value(self.target)
        if self.wants_impact and not math.isnan(p.added_delay):
            v += self.impact_weight * p.added_delay
        return v

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        best, best_v = None, math.inf
        for c in candidates:
            p = c.prediction(self.target)
            if p is None:
                continue
            v = self.score(p)
            if v < best_v:
                best, best_v = c, v
        if best is None:
            return self._fallback.choose(request, candidates)
        return best.name


def slo_headroom(request: Request, p: Prediction) -> float:
    """The smallest relative headroom of the request's SLOs on this prediction: (SLO − predicted) / SLO
    of TTFT and of TPOT; negative when one is predicted to be missed, +inf when the request has none."""
    heads = [math.inf]
    if request.slo_ttft_s is not None:
        heads.append((request.slo_ttft_s - p.ttft) / request.slo_ttft_s)
    if request.slo_tpot_s is not None and not math.isnan(p.e2e):
        heads.append((request.slo_tpot_s - p.tpot) / request.slo_tpot_s)
    return min(heads)


class SloBestFit(Policy):
    """Best fit on predicted SLO headroom: the instance with the least positive headroom that still meets
    the request's SLOs, which keeps the fast, lightly loaded instances free for tight requests.

    Source: llm-d's latency scorer with SLO headers (``scheduling/scorer/latency/README.md``, peers.md §1):
    best-fit on headroom = SLO − prediction; here on both TTFT and TPOT, relative to each SLO (the smaller
    counts). An instance fits when its headroom is at least ``margin``: a what-if fork sees no request
    arriving after this one, so under load its TPOT (the batch keeps growing) is a lower bound, and a
    best fit at zero headroom lands just past the SLO (half the ``hetero`` fleet at 15 QPS, the study's SLO
    classes: with margin 0 the tight requests placed on A30s met their SLO 33% of the time and 89.8% of all
    requests met theirs; with 0.2, 79% and 98.5%). A request without SLOs goes where
    ``inner`` puts it. When no instance fits: with ``reject``, ``Rejected`` (Mooncake's early rejection,
    arXiv 2407.00079 §6); without, the instance with the most headroom.
    """

    prediction_target = "e2e"

    def __init__(self, inner: Block, reject: bool = False, name: str = "block_slo", margin: float = 0.2):
        self.inner = inner
        self.reject = reject
        self.name = name
        self.margin = margin
        self.wants_impact = inner.wants_impact

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        if request.slo_ttft_s is None and request.slo_tpot_s is None:
            return self.inner.choose(request, candidates)
        heads = {c.name: slo_headroom(request, p) for c in candidates if (p := c.prediction("e2e")) is not None}
        if not heads:
            return self.inner.choose(request, candidates)
        fits = {n: h for n, h in heads.items() if h >= self.margin}
        if fits:
            return min(fits, key=fits.__getitem__)
        if self.reject:
            raise Rejected(f"no instance is predicted to meet the SLO (best headroom {max(heads.values()):.2f})")
        return max(heads, key=heads.__getitem__)


# ---- capacity-normalised heuristics: the fair baselines on a heterogeneous fleet ----------------------
class LeastTokensPerCapacity(Policy):
    """Least unfinished tokens divided by the instance's peak token throughput: seconds of work queued.

    Source: llm-d's capacity estimate for heterogeneous pools, estTTFT = in-flight tokens / R_peak with
    R_peak = B / T(B) per GPU type (``peakPrefillThroughput``; peers.md §7 "fairness requirement");
    ``Candidate.capacity`` carries R_peak from the instance's own calibrated timing.
    """

    name = "least_tokens_cap"

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        return _argmin(candidates, lambda c: (c.signals.unfinished_tokens + request.prompt_tokens) / c.capacity)


class LeastRequestsPerCapacity(Policy):
    """Fewest requests per unit of capacity: least_requests with each instance weighted by R_peak."""

    name = "least_requests_cap"

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        return _argmin(candidates, lambda c: (_load(c) + 1) / c.capacity)


class DynamoWeighted(Policy):
    """Dynamo's KV-router load with worker weights: (prefill blocks + this prompt's blocks + active decode
    blocks) / weight, weight = the instance's R_peak.

    Source: ai-dynamo ``docs/components/router/router-concepts.md`` (the load cost, peers.md §3) and the
    load/(n·weight) normalisation peers.md §7 names for heterogeneous pools; no prefix credit (s·overlap
    is for cache-aware runs; this study's prompts share nothing).
    """

    name = "dynamo_weighted"

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        def cost(c: Candidate) -> float:
            prompt = -(-request.prompt_tokens // 16)
            return (c.signals.prefill_blocks + prompt + c.signals.decode_blocks) / c.capacity

        return _argmin(candidates, cost)


class WeightedRoundRobin(Policy):
    """Smooth weighted round robin with weights = capacity: each instance gets a share of requests in
    proportion to its R_peak, interleaved.

    Source: nginx's smooth weighted round robin (``ngx_http_upstream_round_robin.c``,
    ``ngx_http_upstream_get_peer``): add each weight to its current value, pick the largest, subtract the
    total from the pick; Envoy and most L7 balancers weight endpoints the same way.
    """

    name = "weighted_rr"

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        total = sum(c.capacity for c in candidates)
        for c in candidates:
            self._current[c.name] = self._current.get(c.name, 0.0) + c.capacity
        pick = max(candidates, key=lambda c: self._current[c.name])
        self._current[pick.name] -= total
        return pick.name


# ---- the peers: cache-aware routers with their published rules and defaults -------------------------
class LlmdBlend(Policy):
    """llm-d's legacy default: the highest 2·queue + 2·kv-cache + 3·prefix score.

    Source: llm-d-inference-scheduler ``config/charts/epplib/templates/_config.yaml`` (weights 2-2-3, GIE PR
    #1827); scorers per GIE: queue = (maxQ − q)/(maxQ − minQ) over the candidates (1 when all equal) on the
    waiting queue, kv-cache = 1 − KV usage, prefix = matched / total prompt blocks from the approximate index;
    max-score picker (ties: one at random).
    """

    name = "llmd_blend"
    prefix_source = "approximate"
    weights = (2.0, 2.0, 3.0)  # queue, kv-cache, prefix

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        low = min(c.signals.waiting for c in candidates)
        high = max(c.signals.waiting for c in candidates)
        wq, wkv, wp = self.weights

        def minus_score(c: Candidate) -> float:
            queue = 1.0 if high == low else (high - c.signals.waiting) / (high - low)
            return -(wq * queue + wkv * (1.0 - _kv_usage(c.signals)) + wp * c.prefix_ratio)

        return _argmin_random_tie(candidates, minus_score, self._rng)


class LlmdSticky(Policy):
    """llm-d's current default, "sticky until saturated": prefix affinity until it costs too much TTFT.

    Source: llm-d-router ``scheduling/filter/prefixcacheaffinity/README.md`` and the sticky blog (peers.md
    §1): keep candidates with prefix score >= 0.8; drop that filter when the best warm one's estimated TTFT
    exceeds the best cold one's by more than 18 s, estTTFT = in-flight uncached prompt tokens / 15,928 tok/s
    (``peakPrefillThroughput`` default); then token-load lookahead: the least in-flight uncached prompt
    tokens plus this prompt's uncached tokens, prompt·(1 − prefix score) (``inflightload/README.md``);
    max-score picker (ties: one at random).
    """

    name = "llmd_sticky"
    prefix_source = "approximate"
    affinity = 0.8
    max_gap_s = 18.0
    peak_prefill_tokens_per_s = 15_928.0

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        warm = [c for c in candidates if c.prefix_ratio >= self.affinity]
        cold = [c for c in candidates if c.prefix_ratio < self.affinity]
        pool: Sequence[Candidate] = warm or candidates
        if warm and cold:
            gap = (min(c.signals.prefill_tokens for c in warm)
                   - min(c.signals.prefill_tokens for c in cold)) / self.peak_prefill_tokens_per_s
            if gap > self.max_gap_s:
                pool = candidates
        return _argmin_random_tie(
            pool, lambda c: c.signals.prefill_tokens + request.prompt_tokens * (1.0 - c.prefix_ratio), self._rng)


class DynamoKv(Policy):
    """Dynamo's KV router: the least s·max(P + prompt − overlap, 0) + D, in KV blocks.

    Source: ai-dynamo ``docs/components/router/router-concepts.md`` (peers.md §3): P = prefill blocks still
    to compute at the worker, prompt = the request's blocks, overlap = its blocks cached there as KV events
    show (exact), D = active (decode) blocks; defaults s (``overlap_score_weight``) = 1, temperature 0
    (deterministic argmin). ``dynamo_s16`` is one tuned s = 16, labelled tuned: Dynamo's simulated sweep
    found s ≈ 16–32 best.
    """

    prefix_source = "exact"

    def __init__(self, overlap_weight: float = 1.0, name: str = "dynamo"):
        self.overlap_weight = overlap_weight
        self.name = name

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        def cost(c: Candidate) -> float:
            prefill = max(c.signals.prefill_blocks + c.prompt_blocks - c.matched_blocks, 0)
            return self.overlap_weight * prefill + c.signals.decode_blocks

        return _argmin(candidates, cost)


class SglangCacheAware(Policy):
    """SGLang's router ``cache_aware``: balance when load is skewed, else follow the longest cached match.

    Source: SGLang model gateway (SMG) routing docs, https://lightseek.org/smg/concepts/routing/cache-aware
    (peers.md §7): if max − min load > 64 and max > 1.5·min → the least loaded; else if the best match
    ratio > 0.3 → that worker; else the worker with the smallest tree. Load is the router's in-flight
    request count; the tree is its approximate index.
    """

    name = "sglang"
    prefix_source = "approximate"
    balance_abs = 64
    balance_rel = 1.5
    cache_threshold = 0.3

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        loads = [_load(c) for c in candidates]
        if max(loads) - min(loads) > self.balance_abs and max(loads) > self.balance_rel * min(loads):
            return _argmin(candidates, _load)
        best = _lowest(candidates, lambda c: -c.prefix_ratio)
        if best.prefix_ratio > self.cache_threshold:
            return best.name
        return _argmin(candidates, lambda c: c.tree_blocks)


class AibrixPrefixCache(Policy):
    """AIBrix's ``prefix-cache`` router: load imbalance first, then the best match among unloaded pods.

    Source: AIBrix ``docs/source/features/gateway-plugins.rst`` (peers.md §7): if max − min running > 8
    → the least running; else pods with a match sorted by (match % desc, running asc), the first with
    running <= mean + std of running; else least-request. Matches from its approximate index.
    """

    name = "aibrix"
    prefix_source = "approximate"
    imbalance = 8

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        running = [c.signals.running for c in candidates]
        if max(running) - min(running) > self.imbalance:
            return _argmin(candidates, lambda c: c.signals.running)
        mean = sum(running) / len(running)
        limit = mean + math.sqrt(sum((r - mean) ** 2 for r in running) / len(running))
        matched = [c for c in candidates if c.matched_blocks]
        for c in sorted(matched, key=lambda c: (-c.prefix_ratio, c.signals.running)):
            if c.signals.running <= limit:
                return c.name
        return _argmin(candidates, _load)


class Preble(Policy):
    """Preble's E2 as AIBrix implements it: exploit a long match, else explore by cost.

    Source: AIBrix ``pkg/plugins/gateway/algorithms/prefix_cache_preble.go`` (peers.md §7; Preble, arXiv
    2407.00023): if the match ratio > 0.5 → among the instances with the longest match, the least loaded;
    else the least prefill cost (miss rate × prefill time) + decode cost. Its defaults: prefill time from
    its V100 linear model (0.271 ms per token, / 0.9), decode cost = 45 tokens × 0.15 s per request. AIBrix
    sums these over a 3-minute window of routed requests; here over requests in flight (the state's
    uncached prefill, and its request count), plus this request's own missed prefill.
    """

    name = "preble"
    prefix_source = "approximate"
    threshold = 0.5
    prefill_s_per_token = 0.27106428e-3 / 0.9
    decode_cost_s = 45 * 0.15

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        longest = max(c.matched_blocks for c in candidates)
        if max(c.prefix_ratio for c in candidates) > self.threshold:
            return _argmin([c for c in candidates if c.matched_blocks == longest], _load)

        def cost(c: Candidate) -> float:
            missed = request.prompt_tokens * (1.0 - c.prefix_ratio)
            return (c.signals.prefill_tokens + missed) * self.prefill_s_per_token + _load(c) * self.decode_cost_s

        return _argmin(candidates, cost)


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
        self.prefix_source = inner.prefix_source
        self.wants_impact = inner.wants_impact
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
    "block_impact": lambda seed: Block("e2e", False, "block_impact", impact_weight=1.0),
    "block_slo": lambda seed: SloBestFit(Block("e2e", False, "block_impact", impact_weight=1.0)),
    "block_slo_reject": lambda seed: SloBestFit(Block("e2e", False, "block_impact", impact_weight=1.0), True,
                                                "block_slo_reject"),
    "least_tokens_cap": lambda seed: LeastTokensPerCapacity(),
    "least_requests_cap": lambda seed: LeastRequestsPerCapacity(),
    "dynamo_weighted": lambda seed: DynamoWeighted(),
    "weighted_rr": lambda seed: WeightedRoundRobin(),
    "llmd_blend": lambda seed: LlmdBlend(seed),
    "llmd_sticky": lambda seed: LlmdSticky(seed),
    "dynamo": lambda seed: DynamoKv(1.0, "dynamo"),
    "dynamo_s16": lambda seed: DynamoKv(16.0, "dynamo_s16"),
    "sglang": lambda seed: SglangCacheAware(),
    "aibrix": lambda seed: AibrixPrefixCache(),
    "preble": lambda seed: Preble(),
    "block_prefix": lambda seed: BlockPrefix(),
}

HEURISTICS = ("round_robin", "random", "least_requests", "least_tokens", "llumnix", "infaas")
PEERS = ("llmd_blend", "llmd_sticky", "dynamo", "dynamo_s16", "sglang", "aibrix", "preble")
CAPACITY_NORMALISED = ("least_tokens_cap", "least_requests_cap", "dynamo_weighted", "weighted_rr")
TUNED = ("dynamo_s16",)  # a peer with a parameter tuned away from its published default


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


class BlockPrefix(Policy):
    """Block with the locality a cache miss costs: the least predicted TTFT plus the prefill it recomputes.

    Plain block_ttft minimises the newcomer's own TTFT, so it moves a group or a session away from the
    instance that caches its prefix whenever another is briefly faster, even though the recompute costs that
    instance's other requests about as many seconds again (and the copy takes KV blocks from them). This
    charges a choice that share too: the part of the candidate's predicted prefill time (first scheduled to
    first token) spent on prompt tokens another candidate is predicted to hit, ``Prediction.hit_tokens``,
    which is the cache as it will be when the request is scheduled there (prefixes of requests dispatched
    ahead count once computed, evictions by then count too). No parameter; when every candidate hits the
    same, it is block_ttft.
    """

    name = "block_prefix"
    prediction_target = "ttft"

    def __init__(self) -> None:
        self._fallback = LeastRequests()

    def choose(self, request: Request, candidates: Sequence[Candidate]) -> str:
        answered = {c.name: p for c in candidates if (p := c.prediction("ttft")) is not None}
        if not answered:
            return self._fallback.choose(request, candidates)
        best_hit = max(p.hit_tokens for p in answered.values())

        def cost(c: Candidate) -> float:
            p = answered[c.name]
            missed = request.prompt_tokens - p.hit_tokens
            recomputed = (best_hit - p.hit_tokens) / missed * (p.ttft - p.queueing) if missed > 0 else 0.0
            return p.ttft + recomputed

        return _argmin([c for c in candidates if c.name in answered], cost)

