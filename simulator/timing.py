"""Step-time models: how long one engine iteration takes.

Every model splits an iteration into a part that depends only on the batch shape (linear layers,
LM head, tensor-parallel all-reduce, CPU overhead), a decode-attention part linear in the summed decode
context, and a prefill-attention part per chunk. That split is what lets the engine jump over k
decode-only iterations in O(1): with n decode requests whose contexts grow by one token per step,
step j costs ``A(n) + B * (S0 + j * n)`` and the sum over k steps is an arithmetic series.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from simulator.data import data_path
from simulator.hardware import GPU, Model

PrefillChunk = tuple[int, int]  # (tokens in this chunk, tokens of the same request already computed)


@dataclass
class TimingModel:
    """Base class; subclasses provide the three cost terms."""

    _fixed_cache: dict[tuple[int, int], float] = field(default_factory=dict, init=False, repr=False,
                                                       compare=False)

    def fixed_time(self, num_tokens: int, num_seqs: int) -> float:
        raise NotImplementedError

    def decode_attention_coeff(self) -> float:
        raise NotImplementedError

    def prefill_attention_time(self, chunk: int, offset: int) -> float:
        raise NotImplementedError

    def step_time(self, prefill: Sequence[PrefillChunk], num_decode: int, decode_context_sum: int) -> float:
        num_tokens = num_decode + sum(c for c, _ in prefill)
        if num_tokens == 0:
            return 0.0
        t = self.fixed_time(num_tokens, num_decode + len(prefill))
        t += self.decode_attention_coeff() * decode_context_sum
        for chunk, offset in prefill:
            t += self.prefill_attention_time(chunk, offset)
        return t

    def decode_coeffs(self, num_decode: int) -> tuple[float, float]:
        """(A, B) with decode-only step time = A + B * summed context."""
        return self.cached_fixed_time(num_decode, num_decode), self.decode_attention_coeff()

    def cached_fixed_time(self, num_tokens: int, num_seqs: int) -> float:
        """Memoised ``fixed_time``: the batch shapes of one instance repeat endlessly, and every
        predictor fork of that instance shares this cache."""
        cache = self._fixed_cache
        key = (num_tokens, num_seqs)
        t = cache.get(key)
        if t is None:
            t = cache[key] = self.fixed_time(num_tokens, num_seqs)
        return t


def decode_run_time(a: float, b: float, n: int, s0: int, k: int) -> float:
    """Total time of k decode-only steps starting at summed context s0 (grows by n per step)."""
    return k * a + b * (k * s0 + n * k * (k - 1) / 2)


def decode_steps_starting_before(a: float, b: float, n: int, s0: int, budget: float) -> int:
    """Number of consecutive decode steps whose *start* lies strictly before ``budget`` seconds."""
    if budget <= 0:
        return 0
    # step m (0-based) starts at decode_run_time(m); find the largest m with that < budget.
    qa, qb = b * n / 2, a + b * s0 - b * n / 2
    if qa > 0:
        m = int((-qb + math.sqrt(qb * qb + 4 * qa * budget)) / (2 * qa))
    else:
        m = int(budget / qb) if qb > 0 else 1 << 40
    while m > 0 and decode_run_time(a, b, n, s0, m) >= budget:
        m -= 1
    while decode_run_time(a, b, n, s0, m + 1) < budget:
        m += 1
    return m + 1


@dataclass
class Roofline(TimingModel):
    """FLOPs and bytes of every layer against the GPU's ceilings; the embedded default.

    Efficiency factors were set so that Llama-2-7B on an A100 matches Vidur's measured per-layer times
    (about 69% of HBM bandwidth for weight-bound decode, 66% of peak FLOP/s at 4k tokens).
    """

    gpu: GPU
    model: Model
    tensor_parallel: int = 1
    compute_efficiency: float = 0.66
    memory_efficiency: float = 0.69
    attention_compute_efficiency: float = 0.45
    attention_memory_efficiency: float = 0.6
    overhead_s: float = -1.0  # per-iteration host overhead; negative: the GPU profile's step_overhead_s
    allreduce_latency_s: float = 12e-6

    def __post_init__(self) -> None:
        m, tp = self.model, self.tensor_parallel
        if self.overhead_s < 0:
            self.overhead_s = self.gpu.step_overhead_s
        self._pair_s = 4 * m.num_layers * m.num_heads * m.head_dim / tp / (
            self.gpu.bf16_flops * self.attention_compute_efficiency)
        self._kv_token_s = m.kv_bytes_per_token / tp / (self.gpu.hbm_bandwidth * self.attention_memory_efficiency)

    def linear_time(self, params: float, tokens: int) -> float:
        tp = self.tensor_parallel
        compute = 2 * params * tokens / tp / (self.gpu.bf16_flops * self.compute_efficiency)
        memory = params * self.model.dtype_bytes / tp / (self.gpu.hbm_bandwidth * self.memory_efficiency)
        return max(compute, memory)

    def allreduce_time(self, num_bytes: float) -> float:
        tp = self.tensor_parallel
        if tp == 1:
            return 0.0
        return self.allreduce_latency_s + 2 * (tp - 1) / tp * num_bytes / self.gpu.interconnect_bandwidth

    def fixed_time(self, num_tokens: int, num_seqs: int) -> float:
        m = self.model
        t = self.overhead_s + m.num_layers * self.linear_time(m.layer_params, num_tokens)
        t += self.linear_time(m.vocab * m.hidden, num_seqs) + self.gpu.seq_overhead_s * num_seqs
        t += 2 * m.num_layers * self.allreduce_time(num_tokens * m.hidden * m.dtype_bytes)
        return t

    def decode_attention_coeff(self) -> float:
        """Per token of context: read its K and V (memory) or do its QK and AV products (compute)."""
        return max(self._kv_token_s, self._pair_s)

    def prefill_attention_time(self, chunk: int, offset: int) -> float:
        compute = (chunk * offset + chunk * (chunk + 1) / 2) * self._pair_s
        memory = (offset + chunk) * self._kv_token_s
        return compute if compute > memory else memory


_LAYER_OPS = (
    "input_layernorm",
    "attn_pre_proj",
    "attn_rope",
    "attn_post_proj",
    "post_attention_layernorm",
    "mlp_up_proj",
    "mlp_act",
    "mlp_down_proj",
    "add",
)

_PROFILE_DIRS = {"A100-80G": "a100", "A100-40G": "a100", "H100": "h100"}
_PROFILE_MODELS = {
    "Llama-2-7B": "meta-llama/Llama-2-7b-hf",
    "Llama-2-70B": "meta-llama/Llama-2-70b-hf",
    "Llama-3-8B": "meta-llama/Meta-Llama-3-8B",
}


def _read_profile(path: Path, tensor_parallel: int, num_layers: int) -> tuple[np.ndarray, np.ndarray]:
    """Non-attention milliseconds of one iteration (all layers + embedding) against num_tokens."""
    by_tokens: dict[int, list[float]] = {}
    with path.open(newline="") as f:
        for line_no, row in enumerate(csv.DictReader(f), start=2):
            try:
                if int(row["num_tensor_parallel_workers"]) != tensor_parallel:
                    continue
                tokens = int(row["num_tokens"])
                layer_ms = sum(float(row[f"time_stats.{op}.median"]) for op in _LAYER_OPS)
                step_ms = num_layers * layer_ms + float(row["time_stats.emb.median"])
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}:{line_no}: not a Vidur mlp.csv row ({exc})") from exc
            by_tokens.setdefault(tokens, []).append(step_ms)
    if not by_tokens:
        raise ValueError(f"{path}: no rows for tensor_parallel={tensor_parallel}")
    ordered = sorted(by_tokens)
    return np.array(ordered, dtype=float), np.array([float(np.mean(by_tokens[t])) for t in ordered])


def _read_allreduce(path: Path, tensor_parallel: int) -> tuple[np.ndarray, np.ndarray]:
    rows: dict[int, list[float]] = {}
    with path.open(newline="") as f:
        for line_no, row in enumerate(csv.DictReader(f), start=2):
            try:
                if int(row["num_workers"]) != tensor_parallel:
                    continue
                rows.setdefault(int(row["size"]), []).append(float(row["time_stats.all_reduce.median"]))
            except (KeyError, ValueError) as exc:
                raise ValueError(f"{path}:{line_no}: not a Vidur all_reduce.csv row ({exc})") from exc
    if not rows:
        raise ValueError(f"{path}: no all-reduce rows for {tensor_parallel} workers")
    sizes = np.array(sorted(rows), dtype=float)
    return sizes, np.array([float(np.median(rows[int(s)])) for s in sizes])


@dataclass
class Profiled(TimingModel):
    """Linear layers from Vidur's measured ``mlp.csv``; attention from the roofline term.

    Vidur's attention profiles are not available here, so attention is the roofline attention cost
    multiplied by ``attention_scale`` (1.0 unless calibrated against measured step times). The LM head is
    not in ``mlp.csv`` either and also comes from the roofline.
    """

    roofline: Roofline
    tokens: np.ndarray
    linear_ms: np.ndarray
    allreduce_sizes: np.ndarray | None = None
    allreduce_ms: np.ndarray | None = None
    attention_scale: float = 1.0
    overhead_s: float = 0.0015

    @classmethod
    def from_vidur(cls, gpu: GPU, model: Model, tensor_parallel: int = 1, **kwargs) -> Profiled:
        if gpu.name not in _PROFILE_DIRS or model.name not in _PROFILE_MODELS:
            raise ValueError(
                f"no Vidur profile for {model.name} on {gpu.name}; profiles exist for "
                f"GPUs {sorted(_PROFILE_DIRS)} and models {sorted(_PROFILE_MODELS)}"
            )
        rel = f"profiling/compute/{_PROFILE_DIRS[gpu.name]}/{_PROFILE_MODELS[model.name]}/mlp.csv"
        tokens, ms = _read_profile(data_path(rel), tensor_parallel, model.num_layers)
        sizes = ar_ms = None
        if tensor_parallel > 1:
            net = f"profiling/network/{_PROFILE_DIRS[gpu.name]}_pairwise_nvlink/all_reduce.csv"
            sizes, ar_ms = _read_allreduce(data_path(net), tensor_parallel)
        roof = Roofline(gpu, model, tensor_parallel)
        return cls(roof, tokens, ms, sizes, ar_ms, **kwargs)

    def fixed_time(self, num_tokens: int, num_seqs: int) -> float:
        m = self.roofline.model
        linear_s = float(np.interp(num_tokens, self.tokens, self.linear_ms)) / 1e3
        if num_tokens > self.tokens[-1]:  # beyond the profile: compute-bound, scale linearly
            linear_s *= num_tokens / self.tokens[-1]
        t = self.overhead_s + linear_s + self.roofline.linear_time(m.vocab * m.hidden, num_seqs)
        if self.allreduce_sizes is not None and self.allreduce_ms is not None:
            size = num_tokens * m.hidden * m.dtype_bytes
            t += 2 * m.num_layers * float(np.interp(size, self.allreduce_sizes, self.allreduce_ms)) / 1e3
        return t

    def decode_attention_coeff(self) -> float:
        return self.attention_scale * self.roofline.decode_attention_coeff()

    def prefill_attention_time(self, chunk: int, offset: int) -> float:
        return self.attention_scale * self.roofline.prefill_attention_time(chunk, offset)


@dataclass
class StepSample:
    """One measured iteration, as an engine's metrics or a step log can report it."""

    prefill: Sequence[PrefillChunk]
    num_decode: int
    decode_context_sum: int
    seconds: float


MIN_PREFILL_SAMPLES = 3  # iterations with a prefill chunk before the prefill terms are fitted, not guessed


@dataclass
class Calibrated(TimingModel):
    """A linear model fitted online from measured step times; what a live predictor can know.

    Features: constant, batched tokens, sequences, decode context, prefill attention pairs. The predictor
    in offline studies uses this, fitted on samples of the world's (noisy) step times, never the world's
    own model.
    """

    intercept: float
    per_token: float
    per_seq: float
    per_decode_context: float
    per_prefill_pair: float

    @staticmethod
    def _features(s: StepSample) -> list[float]:
        tokens = s.num_decode + sum(c for c, _ in s.prefill)
        pairs = sum(c * o + c * (c + 1) / 2 for c, o in s.prefill)
        return [1.0, tokens, s.num_decode + len(s.prefill), s.decode_context_sum, pairs]

    @classmethod
    def fit(cls, samples: Sequence[StepSample]) -> Calibrated:
        if len(samples) < 5:
            raise ValueError(f"need at least 5 step samples to calibrate, got {len(samples)}")
        x = np.array([cls._features(s) for s in samples])
        y = np.array([s.seconds for s in samples])
        prefills = sum(1 for s in samples if s.prefill)
        rank = int(np.linalg.matrix_rank(x))
        if rank < x.shape[1] or prefills < MIN_PREFILL_SAMPLES:
            # decode-only iterations carry as many tokens as sequences: least squares would split their cost
            # between the two terms at will and a prefill chunk would then be predicted tens of times off
            raise ValueError(f"{len(samples)} step samples ({prefills} with a prefill chunk) do not identify the "
                             f"timing model (rank {rank} of {x.shape[1]}; need {MIN_PREFILL_SAMPLES} prefill steps)")
        active = list(range(x.shape[1]))
        while True:  # non-negative least squares by dropping negative coefficients
            coef, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
            negative = [a for a, c in zip(active, coef, strict=True) if c < 0 and a != 0]
            if not negative:
                break
            active = [a for a in active if a not in negative]
        full = [0.0] * x.shape[1]
        for a, c in zip(active, coef, strict=True):
            full[a] = max(float(c), 0.0)
        return cls(*full)

    def fixed_time(self, num_tokens: int, num_seqs: int) -> float:
        return self.intercept + self.per_token * num_tokens + self.per_seq * num_seqs

    def decode_attention_coeff(self) -> float:
        return self.per_decode_context

    def prefill_attention_time(self, chunk: int, offset: int) -> float:
        return self.per_prefill_pair * (chunk * offset + chunk * (chunk + 1) / 2)
