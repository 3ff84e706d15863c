"""One instance's scheduler as vLLM runs it, fast enough to be a predictor's inner loop.

Per iteration: decode requests first (one token each), then running requests still in prefill (chunks
within the token budget), then waiting requests FCFS while the batch has seats (max_num_seqs), budget
and KV blocks above the admission watermark. Paged KV blocks of ``block_size`` tokens are allocated as
tokens are computed; when a decode cannot get a block, the most recently admitted request is preempted
and later recomputed from scratch. No new request is admitted in an iteration that preempted.

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
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import OrderedDict, deque
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
    block_hashes: list[int] | None = None  # chained hashes of the request's full blocks, when known
    cached_blocks: int = 0  # leading blocks it holds as shared prefix-cache entries


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
    cached: list[int] = field(default_factory=list)  # unreferenced cached block hashes, next to evict first

    def used_blocks(self) -> int:
        """KV blocks in use: each request's own blocks, plus every shared prefix block once."""
        shared: set[int] = set()
        used = 0
        for r in self.requests:
            used += r.allocated_blocks - r.cached_blocks
            if r.cached_blocks and r.block_hashes:
                shared.update(r.block_hashes[: r.cached_blocks])
        return used + len(shared)

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
        used = self.used_blocks()
        if used + len(self.cached) > cfg.num_blocks:
            raise ValueError(f"InstanceState: {used} blocks allocated and {len(self.cached)} cached, but the "
                             f"instance has {cfg.num_blocks}")
        if running > cfg.max_num_seqs:
            raise ValueError(f"InstanceState: {running} running requests exceed max_num_seqs {cfg.max_num_seqs}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> InstanceState:
        try:
            state = cls(
                EngineConfig(**data["config"]),
                float(data["clock"]),
                [RequestState(**r) for r in data.get("requests", [])],
                int(data.get("total_preemptions", 0)),
                [int(h) for h in data.get("cached", [])],
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not an InstanceState: {exc}") from exc
        state.validate()
        return state

    @classmethod
    def from_json(cls, text: str) -> InstanceState:
        return cls.from_dict(json.loads(text))


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
        "id",
        "in_decode",
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
        self._rng = random.Random(seed)
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
        self._refs: dict[int, int] = {}  # cached block hash -> running requests holding it
        # unreferenced cached hashes (also counted free), next to evict first; an OrderedDict because a plain
        # dict emptied from the front makes every next(iter()) scan the deleted slots
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._cache_version = 0
        self._hit_memo: tuple[Seq | None, int, int, int] = (None, -1, 0, 0)
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- requests in and out ---------------------------------------------------------------------
    def add_request(self, request: Request, target: int | None = None) -> Seq:
        """Queue a request. ``target`` overrides the output length the engine will generate."""
        out = request.output_tokens if target is None else target
        validate_lengths(request.prompt_tokens, out, where=f"{self.name}: request {request.id}",
                         max_context=self.config.max_model_len)
        full = (request.prompt_tokens + out) // self._bs
        if len(request.block_hashes) > full:
            raise ValueError(f"{self.name}: request {request.id} has {len(request.block_hashes)} block hashes but "
                             f"{request.prompt_tokens} + {out} tokens fill only {full} blocks of {self._bs}")
        seq = Seq(request.id, request.arrival, request.prompt_tokens, out, request.predicted_output_tokens,
                  request.block_hashes if self._caching else ())
        self._check_fits(seq)
        if not self.has_work():
            self.now = max(self.now, request.arrival)
        self.waiting.append(seq)
        return seq

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
    def _evict_excess(self) -> None:
        """Free blocks were taken: evict cached hashes until the cached ones fit in what is free."""
        lru = self._lru
        while len(lru) > self.free_blocks:
            lru.popitem(last=False)
            self._cache_version += 1

    def _release(self, s: Seq) -> None:
        """Give back a leaving request's blocks: its full blocks with known hashes stay cached (tail ones
        to be evicted first), shared ones it still holds are released, the rest become free."""
        blocks = self._blocks_of(s.computed)
        freed = blocks - s.held
        if s.hashes:
            refs, lru = self._refs, self._lru
            for i in range(min(len(s.hashes), s.computed // self._bs) - 1, -1, -1):
                h = s.hashes[i]
                if i < s.held:
                    n = refs[h] - 1
                    if n:
                        refs[h] = n
                        continue
                    del refs[h]
                    freed += 1
                elif h in refs or h in lru:
                    continue  # another request cached this block first; ours is a duplicate, freed
                lru[h] = None
            self._cache_version += 1
        s.held = 0
        self.free_blocks += freed

    def _hits(self, s: Seq) -> tuple[int, int]:
        """(leading blocks of ``s`` found in the cache, how many of those are unreferenced), capped so the
        last token is always computed. Memoised per cache version: admission checks ask often."""
        memo = self._hit_memo
        if memo[0] is s and memo[1] == self._cache_version:
            return memo[2], memo[3]
        hits = free_hits = 0
        cap = min(len(s.hashes), (s.prompt + s.generated - 1) // self._bs)
        refs, lru = self._refs, self._lru
        while hits < cap:
            h = s.hashes[hits]
            if h in lru:
                free_hits += 1
            elif h not in refs:
                break
            hits += 1
        self._hit_memo = (s, self._cache_version, hits, free_hits)
        return hits, free_hits

    def _take_hits(self, s: Seq, hits: int) -> None:
        refs, lru = self._refs, self._lru
        for h in s.hashes[:hits]:
            if h in lru:
                del lru[h]
                self.free_blocks -= 1
                refs[h] = 1
            else:
                refs[h] += 1
        if hits:
            self._cache_version += 1
        s.held = hits
        s.computed = hits * self._bs

    def _register(self, s: Seq) -> None:
        """Prompt blocks whose prefill just completed join the cache (or adopt an identical cached one)."""
        end = min(len(s.hashes), s.computed // self._bs, s.prompt // self._bs)
        if s.held >= end:
            return
        refs, lru = self._refs, self._lru
        for i in range(s.held, end):
            h = s.hashes[i]
            if h in refs:
                refs[h] += 1
                self.free_blocks += 1  # ours was a duplicate of a block in use: share that one
            elif h in lru:
                del lru[h]
                refs[h] = 1  # adopt the cached copy (one free block used), free ours (one back)
            else:
                refs[h] = 1
        s.held = end
        self._cache_version += 1

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
        if not self.noise:
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
        chunk = remaining if remaining < budget else budget
        return self.free_blocks - free_hits + (-(hits * self._bs + chunk) // self._bs) + hits < self._watermark

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
        if self._lru:
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
            if self._lru:
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
                elif s.first_scheduled is None:
                    self.prefix_query_tokens += s.prompt
                chunk = s.prompt + s.generated - s.computed
                if chunk > budget:
                    chunk = budget
                self.free_blocks -= -(-(s.computed + chunk) // bs) - s.held
                if self._lru:
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
        if self._lru:
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
        return InstanceState(self.config, self.now, reqs, self.total_preemptions, list(self._lru))

    def _request_state(self, s: Seq, phase: Phase, computed: int, generated: int) -> RequestState:
        return RequestState(
            id=s.id, arrival=s.arrival, prompt_tokens=s.prompt, computed_tokens=computed,
            generated_tokens=generated, phase=phase, allocated_blocks=self._blocks_of(computed),
            predicted_output_tokens=s.predicted, first_token_time=s.first_token,
            first_scheduled_time=s.first_scheduled, preemptions=s.preemptions,
            block_hashes=list(s.hashes) if s.hashes else None, cached_blocks=s.held,
        )

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
        used = 0
        for r in state.requests:
            target = (targets or {}).get(r.id, r.predicted_output_tokens)
            if target is None:
                raise ValueError(f"request {r.id}: no output length to simulate (no target, no prediction)")
            hashes = tuple(r.block_hashes) if r.block_hashes and eng._caching else ()
            s = Seq(r.id, r.arrival, r.prompt_tokens, max(target, r.generated_tokens + 1),
                    r.predicted_output_tokens, hashes)
            s.generated, s.computed = r.generated_tokens, r.computed_tokens
            s.first_token, s.first_scheduled = r.first_token_time, r.first_scheduled_time
            s.preemptions, s.preempted = r.preemptions, r.phase == "preempted"
            s.held = r.cached_blocks if hashes else 0
            for h in hashes[: s.held]:
                eng._refs[h] = eng._refs.get(h, 0) + 1
            used += eng._blocks_of(r.computed_tokens) - s.held
            if r.phase == "running":
                eng.running[s.id] = s
                if s.computed == s.prompt + s.generated - 1 and s.generated > 0:
                    eng._enter_decode(s)
                else:
                    eng.prefilling.append(s)
            else:
                eng.waiting.append(s)
        eng.free_blocks = state.config.num_blocks - used - len(eng._refs)
        if eng._caching:
            eng._lru = OrderedDict((h, None) for h in state.cached if h not in eng._refs)
        return eng
