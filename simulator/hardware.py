"""GPU and model specifications, and the KV-cache arithmetic vLLM does at start-up.

The numbers are public datasheet values (dense bf16, no sparsity). They feed the roofline timing model
and the KV-block count, so that the simulator needs no data file to produce plausible engines.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_flops: float  # peak dense FLOP/s
    hbm_bandwidth: float  # bytes/s
    memory_bytes: float
    interconnect_bandwidth: float  # bytes/s per direction between GPUs of one node (NVLink or PCIe)


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
