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
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections import deque
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
            used += r.allocated_blocks
            running += r.phase == "running"
        if used > cfg.num_blocks:
            raise ValueError(f"InstanceState: {used} blocks allocated but the instance has {cfg.num_blocks}")
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

    def __init__(self, rid: int, arrival: float, prompt: int, target: int, predicted: int | None = None):
        self.id = rid
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

    # ---- requests in and out ---------------------------------------------------------------------
    def add_request(self, request: Request, target: int | None = None) -> Seq:
        """Queue a request. ``target`` overrides the output length the engine will generate."""
        out = request.output_tokens if target is None else target
        validate_lengths(request.prompt_tokens, out, where=f"{self.name}: request {request.id}",
                         max_context=self.config.max_model_len)
        seq = Seq(request.id, request.arrival, request.prompt_tokens, out, request.predicted_output_tokens)
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

    def _preempt_last(self) -> Seq:
        victim = self.running.pop(next(reversed(self.running)))
        if victim.in_decode:
            self._leave_decode(victim)
        else:
            self.prefilling.remove(victim)
        self.free_blocks += self._blocks_of(victim.computed)
        victim.computed = 0
        victim.preempted = True
        victim.preemptions += 1
        self.total_preemptions += 1
        self.waiting.appendleft(victim)
        return victim

    def _finish(self, s: Seq) -> None:
        self.running.pop(s.id, None)
        self.free_blocks += self._blocks_of(s.computed)
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
        remaining = head.prompt + head.generated
        if remaining > budget and not self._chunked:
            return True
        chunk = remaining if remaining < budget else budget
        return self.free_blocks + (-chunk // self._bs) < self._watermark

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
            chunks.append((s, chunk))
            budget -= chunk
        if not preempted:
            waiting = self.waiting
            while waiting and not self._admission_blocked(budget):
                s = waiting.popleft()
                chunk = s.prompt + s.generated
                if chunk > budget:
                    chunk = budget
                self.free_blocks -= -(-chunk // bs)
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
        self.free_blocks += self._blocks_of(s.computed)
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
        return InstanceState(self.config, self.now, reqs, self.total_preemptions)

    def _request_state(self, s: Seq, phase: Phase, computed: int, generated: int) -> RequestState:
        return RequestState(
            id=s.id, arrival=s.arrival, prompt_tokens=s.prompt, computed_tokens=computed,
            generated_tokens=generated, phase=phase, allocated_blocks=self._blocks_of(computed),
            predicted_output_tokens=s.predicted, first_token_time=s.first_token,
            first_scheduled_time=s.first_scheduled, preemptions=s.preemptions,
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
            s = Seq(r.id, r.arrival, r.prompt_tokens, max(target, r.generated_tokens + 1),
                    r.predicted_output_tokens)
            s.generated, s.computed = r.generated_tokens, r.computed_tokens
            s.first_token, s.first_scheduled = r.first_token_time, r.first_scheduled_time
            s.preemptions, s.preempted = r.preemptions, r.phase == "preempted"
            used += eng._blocks_of(r.computed_tokens)
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
