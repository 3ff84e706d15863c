"""One instance's scheduler as vLLM runs it, fast enough to be a predictor's inner loop.

Per iteration: decode requests first (one token each), then running requests still in prefill (chunks
within the token budget), then waiting requests FCFS while the batch has seats (max_num_seqs), budget
and KV blocks above the admission watermark for the request's whole sequence so far (vLLM's
``scheduler_reserve_full_isl``; ``EngineConfig.reserve_full_isl=False`` checks the first chunk only).
Paged KV blocks of ``block_size`` tokens are allocated as tokens are computed; when a decode cannot get a
block, the most recently admitted request is preempted and later recomputed from scratch. No new request is
admitted in an iteration that preempted.

Decode requests are kept *lazily*: a request in the decode set stores ``offset = computed - D`` where D
counts iterations, so an iteration does not touch each request. Block boundaries are counted per residue
of ``offset mod block_size`` and completions sit in a heap keyed by the iteration that finishes them.
This makes a run of k decode-only iterations O(block_size) instead of O(k * batch), and it gives exactly
the same per-request timestamps as stepping (tested), because the jump stops before any iteration where
something else could happen: an arrival, a completion, an admission, or a block allocation that fails.

Automatic prefix caching follows vLLM v1. A request may carry the chained hashes of its full blocks
(``Request.block_hashes``; prompt blocks, and for multi-turn work the blocks of its own answer). When it is
admitted, the longest run of leading blocks found in the cache is reused (at most up to its last token,
which is always recomputed for its logits) and skips prefill. Prompt blocks are registered as their
prefill completes; every full block with a known hash stays cached when its request finishes or is
preempted. Cached blocks are reference counted; the unreferenced ones are free for allocation and are
evicted least recently freed first (a request's tail blocks before its head). Hits and queried prompt
tokens are counted like vLLM's ``prefix_cache_hits``/``prefix_cache_queries``. The decode fast path is
unchanged: a decode-only run only takes free blocks (evicting cached ones) and can only lower the head
of the queue's hits, so an admission blocked at the start of a run stays blocked through it.

The cache has the semantics of vLLM's per-block hash table but is kept as a radix tree of *runs* (``_Run``):
consecutive blocks of one chain that share a state (held by n running requests, unreferenced with an LRU
generation, or evicted but kept because cached blocks continue it). Hashes are chained, as vLLM's are and
every workload builder here makes them: equal hashes at a depth mean equal prefixes, so a run matches a
request up to a point found by bisection, and a request's held blocks are a path of whole runs. Every
operation costs per run, not per block: a 7k-token prompt is two or three runs, not 450 dictionary
updates. Unreferenced blocks are evicted by (generation, deeper first), exactly the order in which the
per-block LRU would evict them; snapshots carry the tree (``CachedRun``), so forks restore it per run.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from simulator.timing import TimingModel, decode_run_time, decode_steps_starting_before
from simulator.workload import Request, validate_lengths

Phase = Literal["waiting", "running", "preempted"]
_PHASES = ("waiting", "running", "preempted")


@dataclass(frozen=True)
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    chunked_prefill: bool = True
    watermark: float = 0.01
    max_model_len: int = 4096
    prefix_caching: bool = True
    # vLLM's scheduler_reserve_full_isl (on by default in vllm 0.32's scheduler): a waiting request is
    # admitted only when its whole sequence so far fits in free blocks, not just its first chunk. Off is the
    # rule of earlier releases, kept for comparison: chunked prefill over-admits and later preempts.
    reserve_full_isl: bool = True

    def __post_init__(self) -> None:
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"EngineConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}), as vLLM requires, so every running request can decode each step"
            )
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_model_len ({self.max_model_len}) or long prompts could never be scheduled"
            )
        if not 0 <= self.watermark < 1:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")

    @property
    def watermark_blocks(self) -> int:
        return int(self.watermark * self.num_blocks)


@dataclass
class RequestState:
    """One request as an engine adapter reports it; JSON-able."""

    id: int
    arrival: float
    prompt_tokens: int
    computed_tokens: int
    generated_tokens: int
    phase: Phase
    allocated_blocks: int
    predicted_output_tokens: int | None = None
    first_token_time: float | None = None
    first_scheduled_time: float | None = None
    preemptions: int = 0
    block_hashes: tuple[int, ...] | None = None  # chained hashes of the request's full blocks, when known
    cached_blocks: int = 0  # leading blocks it holds as shared prefix-cache entries


@dataclass
class CachedRun:
    """One run of the prefix-cache tree in a snapshot: consecutive blocks of one chain in one state.

    A run with ``refs`` > 0 is held by that many running requests; one with ``evict`` >= 0 is unreferenced
    and evictable (lower generations first, deeper blocks first within one); a run with neither was
    evicted and is kept only because cached runs continue it. Runs are named by their first hash, which
    chained hashes make unique in the tree, so an unchanged run is the same object in successive snapshots.
    """

    parent: int | None  # first hash of the run this one continues (listed before it); None: starts at block 0
    hashes: tuple[int, ...]
    refs: int = 0
    evict: int = -1

    @property
    def size(self) -> int:
        return len(self.hashes)


@dataclass
class InstanceState:
    """Everything a predictor needs to fork an instance: config, clock, requests in scheduler order.

    ``requests`` lists running requests in admission order (preemption takes from the end), then the
    waiting queue front to back.
    """

    config: EngineConfig
    clock: float
    requests: list[RequestState] = field(default_factory=list)
    total_preemptions: int = 0
    cached: list[CachedRun] = field(default_factory=list)  # the prefix-cache tree, parents before children

    def used_blocks(self) -> int:
        """KV blocks in use: each request's own blocks, plus every held prefix block once."""
        own = sum(r.allocated_blocks - r.cached_blocks for r in self.requests)
        return own + sum(run.size for run in self.cached if run.refs)

    def evictable_blocks(self) -> int:
        """Unreferenced cached blocks: free for allocation, and hits until they are evicted."""
        return sum(run.size for run in self.cached if run.evict >= 0)

    def _check_cache(self) -> None:
        """The tree is well formed and its reference counts are the running requests' held prefixes."""
        holders = [0] * len(self.cached)
        index: dict[int, int] = {}
        for i, run in enumerate(self.cached):
            where = f"InstanceState cached[{i}]"
            if not run.hashes or run.refs < 0 or run.evict < -1 or (run.parent is not None and run.parent not in index):
                raise ValueError(f"{where}: needs hashes, refs >= 0, evict >= -1 and a parent listed before it")
            if run.refs and run.evict >= 0:
                raise ValueError(f"{where}: a held run cannot also be evictable")
            if run.hashes[0] in index:
                raise ValueError(f"{where}: starts with the same hash as cached[{index[run.hashes[0]]}]")
            index[run.hashes[0]] = i
        for r in self.requests:
            depth, parent = 0, None
            while depth < r.cached_blocks and r.block_hashes:
                i = index.get(r.block_hashes[depth], -1)
                run = self.cached[i] if i >= 0 else CachedRun(None, ())
                if run.parent != parent or not run.size or depth + run.size > r.cached_blocks or \
                        r.block_hashes[depth: depth + run.size] != run.hashes:
                    raise ValueError(f"InstanceState request {r.id}: its {r.cached_blocks} cached blocks are not "
                                     "whole runs of the cache tree")
                holders[i] += 1
                depth, parent = depth + run.size, run.hashes[0]
        for i, run in enumerate(self.cached):
            if holders[i] != run.refs:
                raise ValueError(f"InstanceState cached[{i}]: refs {run.refs} but {holders[i]} requests hold it")

    def validate(self) -> None:
        cfg = self.config
        used = 0
        running = 0
        seen: set[int] = set()
        for r in self.requests:
            where = f"InstanceState request {r.id}"
            if r.id in seen:
                raise ValueError(f"{where}: duplicate id")
            seen.add(r.id)
            if r.phase not in _PHASES:
                raise ValueError(f"{where}: phase {r.phase!r} is not one of {_PHASES}")
            for name in ("prompt_tokens", "computed_tokens", "generated_tokens", "allocated_blocks"):
                if getattr(r, name) < 0:
                    raise ValueError(f"{where}: {name} is negative ({getattr(r, name)})")
            if r.prompt_tokens < 1:
                raise ValueError(f"{where}: prompt_tokens must be >= 1")
            if r.computed_tokens > r.prompt_tokens + r.generated_tokens:
                raise ValueError(
                    f"{where}: computed_tokens {r.computed_tokens} > prompt + generated "
                    f"{r.prompt_tokens + r.generated_tokens}"
                )
            if r.phase != "running" and r.computed_tokens:
                raise ValueError(f"{where}: a {r.phase} request holds computed tokens (no prefix cache)")
            need = -(-r.computed_tokens // cfg.block_size)
            if r.allocated_blocks < need:
                raise ValueError(f"{where}: {r.computed_tokens} computed tokens need {need} blocks, "
                                 f"{r.allocated_blocks} allocated")
            if r.cached_blocks and (r.block_hashes is None or r.cached_blocks > min(len(r.block_hashes), need)):
                raise ValueError(f"{where}: holds {r.cached_blocks} cached blocks but has "
                                 f"{len(r.block_hashes or [])} block hashes and {need} computed blocks")
            running += r.phase == "running"
        self._check_cache()
        used, cached = self.used_blocks(), self.evictable_blocks()
        if used + cached > cfg.num_blocks:
            raise ValueError(f"InstanceState: {used} blocks allocated and {cached} cached, but the "
                             f"instance has {cfg.num_blocks}")
        if running > cfg.max_num_seqs:
            raise ValueError(f"InstanceState: {running} running requests exceed max_num_seqs {cfg.max_num_seqs}")

    def with_cached(self, cached: list[CachedRun]) -> InstanceState:
        """This state over another prefix cache: a live scheduler knows its side-car's cache as a block set
        and forks with the candidate's own hit only (``dataclasses.replace`` took 1.8 us a call, this 0.4 us)."""
        return InstanceState(self.config, self.clock, self.requests, self.total_preemptions, cached)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> InstanceState:
        try:
            state = cls(
                EngineConfig(**data["config"]),
                float(data["clock"]),
                [_request_state_from_dict(r) for r in data.get("requests", [])],
                int(data.get("total_preemptions", 0)),
                [CachedRun(**{**run, "hashes": tuple(run["hashes"])}) for run in data.get("cached", [])],
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an InstanceState: {exc}") from exc
        state.validate()
        return state

    @classmethod
    def from_json(cls, text: str) -> InstanceState:
        return cls.from_dict(json.loads(text))


def _request_state_from_dict(data: dict) -> RequestState:
    hashes = data.get("block_hashes")
    return RequestState(**{**data, "block_hashes": None if hashes is None else tuple(hashes)})


class _Run:
    """Blocks at depths [lo, hi) of one chain, all in one state, in the engine's prefix-cache tree.

    ``chain[d - base]`` is the hash at depth d: a run made in the engine shares its request's hash tuple
    (base 0), one restored from a snapshot owns its slice (base lo). Children are keyed by their first hash.
    ``refs`` > 0: held by that many running requests; ``evict`` >= 0: unreferenced and evictable, the LRU
    generation; neither: evicted, kept while cached runs continue it.
    """

    __slots__ = ("base", "chain", "children", "evict", "export", "export_key", "hi", "lo", "parent", "refs", "uid")

    def __init__(self, chain: tuple[int, ...], base: int, lo: int, hi: int, parent: _Run | None, refs: int,
                 evict: int, uid: int):
        self.chain = chain
        self.base = base
        self.lo = lo
        self.hi = hi
        self.parent = parent
        self.children: dict[int, _Run] = {}
        self.refs = refs
        self.evict = evict
        self.uid = uid
        self.export: CachedRun | None = None  # its last snapshot form, and what that form showed
        self.export_key = (0, 0, 0, 0, 0)


def _match_end(run: _Run, chain: tuple[int, ...], lo: int, stop: int) -> int:
    """The largest e in (lo, stop] with ``chain`` equal to the run at every depth below e, given it is equal
    at ``lo``. Chained hashes make equality prefix-closed, so it is found by bisection."""
    c, base = run.chain, run.base
    if c is chain or c[stop - 1 - base] == chain[stop - 1]:
        return stop
    good, bad = lo, stop - 1
    while bad - good > 1:
        mid = (good + bad) // 2
        if c[mid - base] == chain[mid]:
            good = mid
        else:
            bad = mid
    return good + 1


class Seq:
    """A request inside the engine. ``target`` is the output length the engine runs it to: the truth
    in the world, an estimate in a predictor's fork."""

    __slots__ = (
        "arrival",
        "computed",
        "finish_time",
        "first_scheduled",
        "first_token",
        "generated",
        "hashes",
        "held",
        "hit_blocks",
        "id",
        "in_decode",
        "node",
        "offset",
        "predicted",
        "preempted",
        "preemptions",
        "prompt",
        "target",
        "version",
    )

    def __init__(self, rid: int, arrival: float, prompt: int, target: int, predicted: int | None = None,
                 hashes: tuple[int, ...] = ()):
        self.id = rid
        self.hashes = hashes  # chained hashes of full blocks (prompt, then answer when known)
        self.held = 0  # leading blocks held as shared prefix-cache entries
        self.hit_blocks = 0  # leading blocks it found cached when first scheduled (its prefix hit)
        self.node: _Run | None = None  # the deepest run it holds (its held blocks are the path to it)
        self.arrival = arrival
        self.prompt = prompt
        self.target = target
        self.predicted = predicted
        self.generated = 0
        self.computed = 0
        self.first_token: float | None = None
        self.first_scheduled: float | None = None
        self.finish_time: float | None = None
        self.preemptions = 0
        self.preempted = False
        self.in_decode = False
        self.offset = 0
        self.version = 0


class Engine:
    """A single vLLM-like instance. Deterministic given its seed."""

    def __init__(
        self,
        config: EngineConfig,
        timing: TimingModel,
        *,
        noise: float = 0.0,
        seed: int = 0,
        fast_path: bool = True,
        name: str = "instance-0",
    ):
        self.config = config
        self.timing = timing
        self.noise = noise
        self.fast_path = fast_path
        self.name = name
        self._rng = random.Random(seed) if noise else None  # seeding costs ~10 us a fork; predictors use none
        self.now = 0.0
        self.steps = 0  # D: iterations executed
        self.free_blocks = config.num_blocks
        self.waiting: deque[Seq] = deque()
        self.running: dict[int, Seq] = {}
        self.prefilling: list[Seq] = []
        self._residues = [0] * config.block_size
        self._num_decode = 0
        self._offset_sum = 0  # sum over decode set of (offset + 1)
        self._finish_heap: list[tuple[int, int, int, Seq]] = []
        self.finished: list[Seq] = []
        self.total_preemptions = 0
        self.step_log: list[tuple[tuple[tuple[int, int], ...], int, int, float]] | None = None
        self._coeffs_n = -1
        self._coeffs = (0.0, 0.0)
        self._attn_coeff = timing.decode_attention_coeff()
        self._bs = config.block_size
        self._budget = config.max_num_batched_tokens
        self._max_seqs = config.max_num_seqs
        self._chunked = config.chunked_prefill
        self._watermark = config.watermark_blocks
        self._caching = config.prefix_caching
        self._reserve_full = config.reserve_full_isl
        self._max_len = config.max_model_len
        self._root = _Run((), 0, 0, 0, None, 0, -1, 0)
        self._uids = 1
        # evictable runs by (generation, -hi): popping the smallest evicts blocks in the per-block LRU order;
        # entries whose run has changed since are skipped
        self._heap: list[tuple[int, int, int, _Run]] = []
        self._lru_blocks = 0  # unreferenced cached blocks (also counted free)
        self._generation = 0
        self._cache_version = 0
        self._hit_memo: tuple[Seq | None, int, int, int] = (None, -1, 0, 0)
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- requests in and out ---------------------------------------------------------------------
    def add_request(self, request: Request, target: int | None = None, arrival: float | None = None,
                    prompt_only: bool = False) -> Seq:
        """Queue a request. ``target`` overrides the output length the engine will generate and ``arrival`` its
        arrival; ``prompt_only`` keeps only the hashes of its prompt's blocks (a predictor cannot hash an answer
        not yet written). A predictor queues every pending request of every fork: overriding here spares it
        building a Request per queued request, which cost more than the fork's simulation."""
        out = request.output_tokens if target is None else target
        if request.prompt_tokens < 1 or out < 1 or request.prompt_tokens + out > self.config.max_model_len:
            validate_lengths(request.prompt_tokens, out, where=f"{self.name}: request {request.id}",
                             max_context=self.config.max_model_len)  # raises, naming the request
        # (the guard repeats validate_lengths' conditions: formatting the name on every call, or a lazy-name
        # lambda, cost 0.2 us a queued request, 5-9% of a prediction with 16 pending)
        hashes = request.block_hashes[: request.prompt_tokens // self._bs] if prompt_only else request.block_hashes
        full = (request.prompt_tokens + out) // self._bs
        if len(hashes) > full:
            raise ValueError(f"{self.name}: request {request.id} has {len(hashes)} block hashes but "
                             f"{request.prompt_tokens} + {out} tokens fill only {full} blocks of {self._bs}")
        at = request.arrival if arrival is None else arrival
        seq = Seq(request.id, at, request.prompt_tokens, out, request.predicted_output_tokens,
                  hashes if self._caching else ())
        self._check_fits(seq)
        if not self.has_work():
            self.now = max(self.now, at)
        self.waiting.append(seq)
        return seq

    def add_estimated(self, request: Request, default_target: int, arrival: float) -> Seq:
        """Queue a request as a predictor may see it: running to its estimated length, else to
        ``default_target`` (the prior's), within the context, never to its true length; and with the hashes
        of its prompt's full blocks only (an answer not yet written has none)."""
        p = request.predicted_output_tokens
        length = p if p is not None and p >= 1 else default_target
        return self.add_request(request, max(1, min(length, self.config.max_model_len - request.prompt_tokens)),
                                arrival, prompt_only=True)

    def add_all_estimated(self, requests: Sequence[Request], default_target: int, arrival: float) -> None:
        """``add_estimated`` for each of ``requests`` in order, in one call: a live scheduler forks with ~9
        dispatches its side-car has not shown yet, and queueing them one interpreted call at a time was a
        fifth of a prediction's profile."""
        for r in requests:
            self.add_estimated(r, default_target, arrival)

    def _check_fits(self, seq: Seq) -> None:
        need = -(-(seq.prompt + seq.target) // self.config.block_size)
        if need > self.config.num_blocks - self.config.watermark_blocks:
            raise ValueError(
                f"{self.name}: request {seq.id} needs {need} KV blocks but the instance has "
                f"{self.config.num_blocks} (watermark {self.config.watermark_blocks}); it can never run"
            )

    def has_work(self) -> bool:
        return bool(self.running) or bool(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- decode-set bookkeeping ------------------------------------------------------------------
    def _enter_decode(self, s: Seq) -> None:
        bs = self.config.block_size
        s.in_decode = True
        s.offset = s.computed - self.steps
        self._residues[s.offset % bs] += 1
        self._offset_sum += s.offset + 1
        self._num_decode += 1
        s.version += 1
        finish_step = self.steps + s.target - s.generated - 1
        heapq.heappush(self._finish_heap, (finish_step, s.id, s.version, s))

    def _leave_decode(self, s: Seq) -> None:
        """Materialise a decode request's counters and take it out of the lazy set."""
        s.computed = s.offset + self.steps
        s.generated = s.computed - s.prompt + 1
        self._residues[s.offset % self.config.block_size] -= 1
        self._offset_sum -= s.offset + 1
        self._num_decode -= 1
        s.in_decode = False
        s.version += 1

    def _blocks_of(self, tokens: int) -> int:
        return -(-tokens // self.config.block_size)

    # ---- prefix cache ----------------------------------------------------------------------------
    def _new_run(self, chain: tuple[int, ...], lo: int, hi: int, parent: _Run, refs: int, evict: int) -> _Run:
        run = _Run(chain, 0, lo, hi, parent, refs, evict, self._uids)
        self._uids += 1
        parent.children[chain[lo]] = run
        if evict >= 0:
            heapq.heappush(self._heap, (evict, -hi, run.uid, run))
        return run

    def _split(self, run: _Run, at: int) -> _Run:
        """Cut ``run`` at depth ``at``; returns the new upper part [lo, at), ``run`` keeps [at, hi), its
        children, its holders' pointers and its heap entry. Both parts keep the state."""
        upper = _Run(run.chain, run.base, run.lo, at, run.parent, run.refs, run.evict, self._uids)
        self._uids += 1
        parent = run.parent
        assert parent is not None
        parent.children[run.chain[run.lo - run.base]] = upper
        upper.children[run.chain[at - run.base]] = run
        run.lo = at
        run.parent = upper
        if upper.evict >= 0:
            heapq.heappush(self._heap, (upper.evict, -at, upper.uid, upper))
        return upper

    def _prune(self, run: _Run) -> None:
        """Drop an evicted run that nothing continues, and evicted ancestors left without children."""
        parent = run.parent
        while parent is not None and not run.children and not run.refs and run.evict < 0:
            del parent.children[run.chain[run.lo - run.base]]
            run, parent = parent, parent.parent

    def _evict_excess(self) -> None:
        """Free blocks were taken: evict cached blocks until the cached ones fit in what is free."""
        excess = self._lru_blocks - self.free_blocks
        heap = self._heap
        while excess > 0:
            evict, neg_hi, _, run = heapq.heappop(heap)
            if run.evict != evict or run.hi != -neg_hi:
                continue  # stale entry
            k = min(excess, run.hi - run.lo)
            if k == run.hi - run.lo:
                run.evict = -1
                self._prune(run)
            elif run.children:  # the evicted tail stays in the tree, for the cached runs that continue it
                self._split(run, run.hi - k)
                run.evict = -1
            else:
                run.hi -= k
                heapq.heappush(heap, (evict, -run.hi, run.uid, run))
            self._lru_blocks -= k
            excess -= k
        self._cache_version += 1

    def _release(self, s: Seq) -> None:
        """Give back a leaving request's blocks: its full blocks with known hashes stay cached (deeper ones
        to be evicted first), shared ones it still holds are released, the rest become free."""
        freed = self._blocks_of(s.computed) - s.held
        if s.hashes:
            generation = self._generation
            self._generation += 1
            full = min(len(s.hashes), s.computed // self._bs)
            if full > s.held:
                self._cache_own(s, full, generation)
            run = s.node
            while run is not None and run.parent is not None:
                run.refs -= 1
                if not run.refs:
                    run.evict = generation
                    heapq.heappush(self._heap, (generation, -run.hi, run.uid, run))
                    size = run.hi - run.lo
                    self._lru_blocks += size
                    freed += size
                run = run.parent
            self._cache_version += 1
        s.held = 0
        s.node = None
        self.free_blocks += freed

    def _cache_own(self, s: Seq, full: int, generation: int) -> None:
        """Blocks [held, full) that ``s`` computed but does not hold (its answer's) join the cache unless an
        identical block is cached already (that one keeps its place)."""
        chain = s.hashes
        node = s.node if s.node is not None else self._root
        depth = s.held
        while depth < full:
            child = node.children.get(chain[depth])
            if child is None:
                self._new_run(chain, depth, full, node, 0, generation)
                self._lru_blocks += full - depth
                return
            m = _match_end(child, chain, depth, min(child.hi, full))
            evicted = not child.refs and child.evict < 0
            if m < child.hi and (m < full or evicted):
                child = self._split(child, m)
            if evicted:
                child.evict = generation
                heapq.heappush(self._heap, (generation, -m, child.uid, child))
                self._lru_blocks += m - depth
            node, depth = child, m

    def _hits(self, s: Seq) -> tuple[int, int]:
        """(leading blocks of ``s`` found in the cache, how many of those are unreferenced), capped so the
        last token is always computed. Memoised per cache version: admission checks ask often."""
        memo = self._hit_memo
        if memo[0] is s and memo[1] == self._cache_version:
            return memo[2], memo[3]
        chain = s.hashes
        cap = min(len(chain), (s.prompt + s.generated - 1) // self._bs)
        node = self._root
        hits = free_hits = 0
        while hits < cap:
            child = node.children.get(chain[hits])
            if child is None or (not child.refs and child.evict < 0):
                break
            m = _match_end(child, chain, hits, min(child.hi, cap))
            if not child.refs:
                free_hits += m - hits
            hits = m
            if m < child.hi:
                break
            node = child
        self._hit_memo = (s, self._cache_version, hits, free_hits)
        return hits, free_hits

    def _take_hits(self, s: Seq, hits: int) -> None:
        """``s`` holds its first ``hits`` blocks (found by ``_hits`` at this cache version)."""
        chain = s.hashes
        node = self._root
        depth = 0
        while depth < hits:
            child = node.children[chain[depth]]
            if child.hi > hits:
                child = self._split(child, hits)
            if child.refs:
                child.refs += 1
            else:
                size = child.hi - depth
                child.evict = -1
                child.refs = 1
                self._lru_blocks -= size
                self.free_blocks -= size
            node, depth = child, child.hi
        if hits:
            self._cache_version += 1
            s.node = node
        s.held = hits
        s.computed = hits * self._bs

    def _register(self, s: Seq) -> None:
        """Prompt blocks whose prefill just completed join the cache (or adopt an identical cached one)."""
        chain = s.hashes
        end = min(len(chain), s.computed // self._bs, s.prompt // self._bs)
        depth = s.held
        if depth >= end:
            return
        node = s.node if s.node is not None else self._root
        while depth < end:
            child = node.children.get(chain[depth])
            if child is None:
                if node.refs == 1 and not node.children and node.chain is chain and node.parent is not None:
                    node.hi = end  # only s holds its leaf: the new blocks extend it
                else:
                    node = self._new_run(chain, depth, end, node, 1, -1)
                break
            m = _match_end(child, chain, depth, min(child.hi, end))
            if m < child.hi:
                child = self._split(child, m)
            if child.refs:
                child.refs += 1
                self.free_blocks += m - depth  # ours were duplicates of blocks in use: share those
            elif child.evict >= 0:
                child.evict = -1  # adopt the cached copies (free blocks used), free ours (as many back)
                child.refs = 1
                self._lru_blocks -= m - depth
            else:
                child.refs = 1  # evicted copies: ours take their place
            node, depth = child, m
        s.node = node
        s.held = end
        self._cache_version += 1

    @property
    def _refs(self) -> dict[int, int]:
        """Per-block view of the held blocks: hash -> running requests holding it (for tests and debugging)."""
        out: dict[int, int] = {}
        for run in self._runs():
            if run.refs:
                for d in range(run.lo, run.hi):
                    out[run.chain[d - run.base]] = run.refs
        return out

    @property
    def _lru(self) -> list[int]:
        """Per-block view of the evictable blocks, next to evict first (for tests and debugging)."""
        runs = sorted((r for r in self._runs() if r.evict >= 0), key=lambda r: (r.evict, -r.hi))
        return [r.chain[d - r.base] for r in runs for d in range(r.hi - 1, r.lo - 1, -1)]

    def _runs(self) -> list[_Run]:
        """Every run of the tree, parents before children."""
        out: list[_Run] = []
        frontier = list(self._root.children.values())
        while frontier:
            out.extend(frontier)
            frontier = [c for r in frontier for c in r.children.values()]
        return out

    def _preempt_last(self) -> Seq:
        victim = self.running.pop(next(reversed(self.running)))
        if victim.in_decode:
            self._leave_decode(victim)
        else:
            self.prefilling.remove(victim)
        self._release(victim)
        victim.computed = 0
        victim.preempted = True
        victim.preemptions += 1
        self.total_preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def _finish(self, s: Seq) -> None:
        self.running.pop(s.id, None)
        self._release(s)
        s.finish_time = self.now
        self.finished.append(s)

    # ---- one iteration ---------------------------------------------------------------------------
    def _noise_factor(self, steps: int) -> float:
        if self._rng is None:
            return 1.0
        if steps == 1:
            return 1.0 + self.noise * (2.0 * self._rng.random() - 1.0)
        # the mean of k uniform(+-noise) factors: same mean, variance shrunk by k
        return max(0.0, 1.0 + self._rng.gauss(0.0, self.noise / math.sqrt(3.0 * steps)))

    def _decode_coeffs(self, n: int) -> tuple[float, float]:
        if n != self._coeffs_n:
            self._coeffs_n = n
            self._coeffs = self.timing.decode_coeffs(n)
        return self._coeffs

    def _admission_blocked(self, budget: int) -> bool:
        """Would the head of the waiting queue be refused this iteration (and stay refused while only
        decodes run, since those only consume blocks)?"""
        if len(self.running) >= self._max_seqs or budget <= 0:
            return True
        head = self.waiting[0]
        hits, free_hits = self._hits(head) if head.hashes else (0, 0)
        remaining = head.prompt + head.generated - hits * self._bs
        if remaining > budget and not self._chunked:
            return True
        if self._reserve_full:
            total = head.prompt + head.generated
            end = total if total < self._max_len else self._max_len
        else:
            end = hits * self._bs + (remaining if remaining < budget else budget)
        return self.free_blocks - free_hits + (-end // self._bs) + hits < self._watermark

    def _step_time(self, prefill: tuple[tuple[int, int], ...], n_dec: int, context_sum: int) -> float:
        tokens = n_dec
        for c, _ in prefill:
            tokens += c
        t = self.timing.cached_fixed_time(tokens, n_dec + len(prefill)) + self._attn_coeff * context_sum
        attention = self.timing.prefill_attention_time
        for c, o in prefill:
            t += attention(c, o)
        return t

    def step(self) -> None:
        bs = self._bs
        d = self.steps
        residue = (-d) % bs
        need = self._residues[residue] if self._num_decode else 0
        preempted = False
        while need > self.free_blocks:
            self._preempt_last()
            preempted = True
            need = self._residues[residue] if self._num_decode else 0
        self.free_blocks -= need
        if self._lru_blocks > self.free_blocks:
            self._evict_excess()
        n_dec = self._num_decode
        budget = self._budget - n_dec
        chunks: list[tuple[Seq, int]] = []
        running = self.running
        for s in list(self.prefilling):
            if budget <= 0:
                break
            chunk = min(s.prompt + s.generated - s.computed, budget)
            extra = -(-(s.computed + chunk) // bs) + (-s.computed // bs)  # ceil(after) - ceil(before)
            while extra > self.free_blocks and s.id in running:
                self._preempt_last()
                preempted = True
            if s.id not in running:
                break
            self.free_blocks -= extra
            if self._lru_blocks > self.free_blocks:
                self._evict_excess()
            chunks.append((s, chunk))
            budget -= chunk
        if not preempted:
            waiting = self.waiting
            while waiting and not self._admission_blocked(budget):
                s = waiting.popleft()
                if s.hashes:
                    hits = self._hits(s)[0]
                    self._take_hits(s, hits)
                    if s.first_scheduled is None:
                        self.prefix_query_tokens += s.prompt
                        self.prefix_hit_tokens += hits * bs
                        s.hit_blocks = hits
                elif s.first_scheduled is None:
                    self.prefix_query_tokens += s.prompt
                chunk = s.prompt + s.generated - s.computed
                if chunk > budget:
                    chunk = budget
                self.free_blocks -= -(-(s.computed + chunk) // bs) - s.held
                if self._lru_blocks > self.free_blocks:
                    self._evict_excess()
                running[s.id] = s
                self.prefilling.append(s)
                if s.first_scheduled is None:
                    s.first_scheduled = self.now
                chunks.append((s, chunk))
                budget -= chunk
        if not n_dec and not chunks:
            if preempted:  # everything running was preempted; the next iteration re-admits
                return
            raise RuntimeError(f"{self.name}: scheduler made no progress with {len(self.waiting)} waiting")
        context_sum = self._offset_sum + n_dec * d
        if chunks:
            prefill = tuple((c, s.computed) for s, c in chunks)
            dt = self._step_time(prefill, n_dec, context_sum)
        else:
            prefill = ()
            a, b = self._decode_coeffs(n_dec)
            dt = a + b * context_sum
        if self.noise:
            dt *= self._noise_factor(1)
        if self.step_log is not None:
            self.step_log.append((prefill, n_dec, context_sum, dt))
        self.now += dt
        self.steps = d + 1
        if self._finish_heap and self._finish_heap[0][0] <= d:
            self._pop_finished()
        for s, c in chunks:
            s.computed += c
            if s.hashes and s.held < len(s.hashes):
                self._register(s)
            if s.computed == s.prompt + s.generated:
                self.prefilling.remove(s)
                s.generated += 1
                if s.first_token is None:
                    s.first_token = self.now
                if s.generated >= s.target:
                    self._finish(s)
                else:
                    self._enter_decode(s)

    def _pop_finished(self) -> None:
        heap = self._finish_heap
        last = self.steps - 1
        while heap and heap[0][0] <= last:
            _, _, version, s = heapq.heappop(heap)
            if version != s.version or not s.in_decode:
                continue
            self._leave_decode(s)
            self._finish(s)

    def _clean_heap_top(self) -> int:
        heap = self._finish_heap
        while heap and (heap[0][2] != heap[0][3].version or not heap[0][3].in_decode):
            heapq.heappop(heap)
        return heap[0][0]

    def _decode_run_length(self, until: float) -> int:
        """How many decode-only iterations can run before anything else could happen."""
        if self.prefilling or not self._num_decode:
            return 0
        n = self._num_decode
        if self.waiting and not self._admission_blocked(self._budget - n):
            return 0
        k = self._clean_heap_top() - self.steps + 1
        # block allocations: n per block_size iterations, the residues say which iteration
        bs = self.config.block_size
        cycles, spare = divmod(self.free_blocks, n)
        j, d = 0, self.steps + cycles * bs
        while j < bs:
            need = self._residues[(-(d + j)) % bs]
            if need > spare:
                break
            spare -= need
            j += 1
        k = min(k, cycles * bs + j)
        if k < 2:
            return k
        a, b = self._decode_coeffs(n)
        s0 = self._offset_sum + n * self.steps
        if until != math.inf:
            k = min(k, decode_steps_starting_before(a, b, n, s0, until - self.now))
        return k

    def _blocks_for_run(self, k: int) -> int:
        bs = self.config.block_size
        cycles, rest = divmod(k, bs)
        d = self.steps
        return cycles * self._num_decode + sum(self._residues[(-(d + j)) % bs] for j in range(rest))

    def _jump(self, k: int) -> None:
        n = self._num_decode
        a, b = self._decode_coeffs(n)
        s0 = self._offset_sum + n * self.steps
        self.free_blocks -= self._blocks_for_run(k)
        if self._lru_blocks > self.free_blocks:
            self._evict_excess()
        self.now += decode_run_time(a, b, n, s0, k) * self._noise_factor(k)
        self.steps += k
        self._pop_finished()

    def advance_once(self, until: float = math.inf) -> None:
        """One iteration, or one jump over decode-only iterations that start before ``until``."""
        if self.fast_path:
            k = self._decode_run_length(until)
            if k >= 2:
                self._jump(k)
                return
        self.step()

    def run_for(self, seq: Seq, *, first_token_only: bool, limit: float) -> int:
        """Run until ``seq`` finishes (or gets its first token), or the clock passes ``limit``.

        Returns the fewest free KV blocks seen on the way. This is the predictor's inner loop, kept
        here so it runs at engine speed.
        """
        min_free = self.free_blocks
        while self.running or self.waiting:
            if seq.finish_time is not None or (first_token_only and seq.first_token is not None):
                break
            if self.now >= limit:
                break
            self.advance_once(limit)
            if self.free_blocks < min_free:
                min_free = self.free_blocks
        return min_free

    def advance(self, until: float = math.inf) -> None:
        """Run every iteration that starts before ``until``."""
        while (self.running or self.waiting) and self.now < until:
            self.advance_once(until)

    def generated_of(self, s: Seq) -> int:
        """Tokens ``s`` has generated so far (decode requests are tracked lazily)."""
        return s.offset + self.steps - s.prompt + 1 if s.in_decode else s.generated

    def abort(self, s: Seq) -> bool:
        """Drop a request (client went away), freeing its blocks. False if it was not here."""
        if s in self.waiting:
            self.waiting.remove(s)
            return True
        if self.running.get(s.id) is not s:
            return False
        if s.in_decode:
            self._leave_decode(s)
        else:
            self.prefilling.remove(s)
        del self.running[s.id]
        self._release(s)
        return True

    # ---- state export / import -------------------------------------------------------------------
    def _materialise(self, s: Seq) -> tuple[int, int]:
        if s.in_decode:
            computed = s.offset + self.steps
            return computed, computed - s.prompt + 1
        return s.computed, s.generated

    def snapshot(self) -> InstanceState:
        reqs = []
        for s in self.running.values():
            computed, generated = self._materialise(s)
            reqs.append(self._request_state(s, "running", computed, generated))
        for s in self.waiting:
            reqs.append(self._request_state(s, "preempted" if s.preempted else "waiting", 0, s.generated))
        return InstanceState(self.config, self.now, reqs, self.total_preemptions,
                             [self._export(run) for run in self._runs()])

    def _export(self, run: _Run) -> CachedRun:
        """The run as a snapshot shows it; the previous export when nothing it shows has changed."""
        parent = run.parent
        assert parent is not None
        key = (run.lo, run.hi, run.refs, run.evict, parent.lo if parent.parent is not None else -1)
        out = run.export
        if out is None or key != run.export_key:
            first = parent.chain[parent.lo - parent.base] if parent.parent is not None else None
            out = CachedRun(first, run.chain[run.lo - run.base: run.hi - run.base], run.refs, run.evict)
            run.export, run.export_key = out, key
        return out

    def _request_state(self, s: Seq, phase: Phase, computed: int, generated: int) -> RequestState:
        # positional: the dataclass __init__ is interpreted, and keywords cost twice as much per snapshot
        return RequestState(s.id, s.arrival, s.prompt, computed, generated, phase, self._blocks_of(computed),
                            s.predicted, s.first_token, s.first_scheduled, s.preemptions, s.hashes or None, s.held)

    def fork(self) -> Engine:
        """A noise-free copy of this engine as it is now, running every request to its own target.

        For counterfactuals: in the world, "what if this request had come here" with true lengths and
        true timing, the reference an honest prediction is judged against. Never give it to a predictor.
        """
        targets = {s.id: s.target for s in self.running.values()}
        targets.update({s.id: s.target for s in self.waiting})
        return Engine.restore(self.snapshot(), self.timing, targets, fast_path=self.fast_path, name=self.name)

    @classmethod
    def restore(cls, state: InstanceState, timing: TimingModel, targets: dict[int, int] | None = None,
                **kwargs) -> Engine:
        """Rebuild an engine from a state. ``targets`` gives each request's output length to run to;
        without it the request's predicted length is used."""
        eng = cls(state.config, timing, **kwargs)
        eng.now = state.clock
        eng.total_preemptions = state.total_preemptions
        # held runs by the hash of their last block (chained hashes: unique), where held prefixes end
        ends: dict[int, _Run] = {}
        used = eng._restore_cache(state.cached, ends) if eng._caching else 0
        for r in state.requests:
            target = (targets or {}).get(r.id, r.predicted_output_tokens)
            if target is None:
                raise ValueError(f"request {r.id}: no output length to simulate (no target, no prediction)")
            hashes = tuple(r.block_hashes) if r.block_hashes and eng._caching else ()  # no copy of a tuple
            s = Seq(r.id, r.arrival, r.prompt_tokens, max(target, r.generated_tokens + 1),
                    r.predicted_output_tokens, hashes)
            s.generated, s.computed = r.generated_tokens, r.computed_tokens
            s.first_token, s.first_scheduled = r.first_token_time, r.first_scheduled_time
            s.preemptions, s.preempted = r.preemptions, r.phase == "preempted"
            if hashes and r.cached_blocks:
                s.held = r.cached_blocks
                node = ends.get(hashes[s.held - 1]) if s.held <= len(hashes) else None
                if node is None or node.hi != s.held:
                    raise ValueError(f"request {r.id}: its {s.held} cached blocks do not end where a held run of "
                                     "the cache does")
                s.node = node
            used += eng._blocks_of(r.computed_tokens) - s.held
            if r.phase == "running":
                eng.running[s.id] = s
                if s.computed == s.prompt + s.generated - 1 and s.generated > 0:
                    eng._enter_decode(s)
                else:
                    eng.prefilling.append(s)
            else:
                eng.waiting.append(s)
        eng.free_blocks = state.config.num_blocks - used
        return eng

    def _restore_cache(self, cached: Sequence[CachedRun], ends: dict[int, _Run]) -> int:
        """Rebuild the tree from a snapshot's runs, filling ``ends`` (held runs by their last hash); returns
        the blocks the held runs use."""
        runs: dict[int, _Run] = {}
        held = 0
        for c in cached:
            parent = runs[c.parent] if c.parent is not None else self._root
            run = _Run(tuple(c.hashes), parent.hi, parent.hi, parent.hi + len(c.hashes), parent, c.refs, c.evict,
                       self._uids)
            self._uids += 1
            parent.children[c.hashes[0]] = run
            runs[c.hashes[0]] = run
            if c.evict >= 0:
                self._heap.append((c.evict, -run.hi, run.uid, run))
                self._lru_blocks += len(c.hashes)
                self._generation = max(self._generation, c.evict + 1)
            if c.refs:
                held += len(c.hashes)
                ends[c.hashes[-1]] = run
        heapq.heapify(self._heap)
        return held
