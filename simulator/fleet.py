"""Cluster descriptions made of instance groups: which GPUs, how many, with which engine settings.

Real fleets mix GPU generations, tensor-parallel degrees and batch settings, so a cluster is a tuple of
``InstanceGroup``s, each with its own engine configuration and its own timing model. A homogeneous cluster
is a fleet of one group. Every description is validated once, before anything starts: an unknown GPU or
model, a group of 0 instances or a KV cache that cannot hold one request at the model's full context is
one clear error naming the group.

Three spellings build the same thing: presets by name (``FLEETS``), the compact form of the CLI
(``4xA100-80G,8xA30``, optionally ``2xA100-40G:tp2``) and a dict (the cluster file's ``fleet`` section).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np

from simulator.engine import EngineConfig
from simulator.hardware import get_gpu, get_model, num_kv_blocks
from simulator.timing import Roofline, TimingModel
from simulator.workload import Request

BLOCK_SIZE = 16  # tokens per KV block, the engine's default


@dataclass(frozen=True)
class InstanceGroup:
    """``count`` identical instances: one GPU type, one model, one tensor-parallel degree and batch caps."""

    gpu: str
    model: str
    count: int
    tensor_parallel: int = 1
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    num_blocks: int | None = None  # None: size the KV cache from GPU memory like vLLM
    chunked_prefill: bool = True

    @property
    def label(self) -> str:
        """The GPU, with the TP degree when it is not 1 (``A100-40G:tp2``): what a report groups by."""
        name = get_gpu(self.gpu).name
        return f"{name}:tp{self.tensor_parallel}" if self.tensor_parallel != 1 else name

    def validate(self, where: str = "group") -> None:
        """Raise one ValueError naming ``where`` and the field when this group cannot run."""
        try:
            gpu, model = get_gpu(self.gpu), get_model(self.model)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        for name in ("count", "tensor_parallel", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{where}.{name} must be an integer >= 1, got {value!r}")
        if self.num_blocks is not None and (not isinstance(self.num_blocks, int) or self.num_blocks < 1):
            raise ValueError(f"{where}.num_blocks must be an integer >= 1 or absent, got {self.num_blocks!r}")
        try:
            blocks = self.num_blocks or num_kv_blocks(gpu, model, tensor_parallel=self.tensor_parallel)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if blocks * BLOCK_SIZE < model.max_context:
            raise ValueError(
                f"{where}: {blocks} KV blocks hold {blocks * BLOCK_SIZE} tokens, less than one request at "
                f"{model.name}'s full context of {model.max_context}; give it more KV blocks, GPUs or memory")

    def engine_config(self) -> EngineConfig:
        gpu, model = get_gpu(self.gpu), get_model(self.model)
        blocks = self.num_blocks or num_kv_blocks(gpu, model, tensor_parallel=self.tensor_parallel)
        return EngineConfig(num_blocks=blocks, max_num_seqs=self.max_num_seqs,
                            max_num_batched_tokens=self.max_num_batched_tokens,
                            chunked_prefill=self.chunked_prefill, max_model_len=model.max_context)

    def world_timing(self) -> Roofline:
        """The roofline of this group's GPU and model: the simulated world's truth (predictors fit their own)."""
        return Roofline(get_gpu(self.gpu), get_model(self.model), self.tensor_parallel)


@dataclass(frozen=True)
class Fleet:
    """The instances of one cluster, group by group; instance ``i`` is ``instance-i`` in group order."""

    groups: tuple[InstanceGroup, ...]
    name: str = ""

    def __post_init__(self) -> None:
        where = f"cluster {self.name!r}" if self.name else "cluster"
        if not self.groups:
            raise ValueError(f"{where} has no instance groups")
        for i, g in enumerate(self.groups):
            g.validate(f"{where} group {i} ({g.count}x{g.gpu})")
        models = {get_model(g.model).name for g in self.groups}
        if len(models) > 1:
            raise ValueError(f"{where}: every group must serve the same model (a request may go to any "
                             f"instance), got {sorted(models)}")

    @property
    def instances(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def model(self) -> str:
        return get_model(self.groups[0].model).name

    @property
    def homogeneous(self) -> bool:
        return len(self.groups) == 1

    def members(self) -> list[tuple[str, InstanceGroup]]:
        """(instance name, its group) for every instance, in group order."""
        out: list[tuple[str, InstanceGroup]] = []
        for g in self.groups:
            out += [(f"instance-{len(out) + k}", g) for k in range(g.count)]
        return out

    def describe(self) -> str:
        parts = " + ".join(f"{g.count} x {g.label} (cap {g.max_num_seqs}, chunk {g.max_num_batched_tokens}, "
                           f"{g.engine_config().num_blocks} blocks)" for g in self.groups)
        return f"{parts}; {self.model}"

    def to_dict(self) -> dict:
        return {"name": self.name, "model": self.model,
                "groups": [{f.name: getattr(g, f.name) for f in fields(g) if f.name != "model"}
                           for g in self.groups]}

    @classmethod
    def from_dict(cls, data: object, where: str = "fleet") -> Fleet:
        """The file form: ``{"model": ..., "groups": [{"gpu": ..., "count": ..., ...}]}``; a group may name
        its own ``model``. Unknown keys are refused with their path."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a mapping with 'groups', got {type(data).__name__}")
        unknown = set(data) - {"name", "model", "groups"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: name, model, groups")
        raw = data.get("groups")
        if not isinstance(raw, list) or not raw:
            raise ValueError(f"{where}.groups must be a non-empty list")
        allowed = {f.name for f in fields(InstanceGroup)}
        groups = []
        for i, g in enumerate(raw):
            if not isinstance(g, dict):
                raise ValueError(f"{where}.groups[{i}] must be a mapping")
            bad = set(g) - allowed
            if bad:
                raise ValueError(f"{where}.groups[{i}]: unknown keys {sorted(bad)}; allowed: {sorted(allowed)}")
            merged = {"model": data.get("model"), **g}
            missing = [k for k in ("gpu", "model", "count") if merged.get(k) is None]
            if missing:
                raise ValueError(f"{where}.groups[{i}] needs {', '.join(missing)}")
            groups.append(InstanceGroup(**merged))
        return cls(tuple(groups), str(data.get("name", "")))


_COMPACT = re.compile(r"^\s*(\d+)\s*[xX]\s*([A-Za-z0-9.\-]+?)(?::tp(\d+))?\s*$")


def parse_fleet(text: str, *, model: str = "Llama-2-7B", max_num_seqs: int = 128,
                max_num_batched_tokens: int = 512) -> Fleet:
    """The compact CLI form, ``4xA100-80G,8xA30`` or ``2xA100-40G:tp2,4xA100-40G``; every group serves
    ``model`` with the given batch caps. A preset name is accepted too."""
    if text in FLEETS:
        return FLEETS[text]
    groups = []
    for i, part in enumerate(text.split(",")):
        m = _COMPACT.match(part)
        if m is None:
            raise ValueError(f"--cluster part {i + 1} {part.strip()!r} is not COUNTxGPU[:tpN] "
                             f"(e.g. 4xA100-80G,8xA30) nor a preset ({', '.join(FLEETS)})")
        groups.append(InstanceGroup(m.group(2), model, int(m.group(1)), int(m.group(3) or 1), max_num_seqs,
                                    max_num_batched_tokens))
    return Fleet(tuple(groups), text.strip())


FLEETS: dict[str, Fleet] = {
    # Two GPU generations: 4 x A100-80G (Vidur's batch cap 128) next to Block's paper A30s (cap 48,
    # 1052 blocks); both chunk 512, Llama-2-7B. An A100-80G decodes ~2.2x faster and holds ~7x the KV.
    "hetero": Fleet((InstanceGroup("A100-80G", "Llama-2-7B", 4, max_num_seqs=128),
                     InstanceGroup("A30", "Llama-2-7B", 8, max_num_seqs=48, num_blocks=1052)), "hetero"),
    # One GPU type, two tensor-parallel degrees: Llama-2-13B on 2 x (2 x A100-40G) and 4 x 1 x A100-40G.
    "mixed_tp": Fleet((InstanceGroup("A100-40G", "Llama-2-13B", 2, tensor_parallel=2, max_num_seqs=128),
                       InstanceGroup("A100-40G", "Llama-2-13B", 4, max_num_seqs=48)), "mixed_tp"),
}


def peak_token_throughput(timing: TimingModel, config: EngineConfig) -> float:
    """Tokens per second of a full prefill batch, R_peak = B / T(B) with B = max_num_batched_tokens: how
    llm-d estimates a pod's peak throughput per GPU type (peers.md §7). Fed the timing model a predictor
    calibrated, it is what a deployment can know of an instance's capacity."""
    b = config.max_num_batched_tokens
    return b / timing.step_time([(b, 0)], 0, 0)


@dataclass(frozen=True)
class SloClass:
    """A named latency objective a request may carry (the cluster file's classes; live, the headers
    ``x-slo-ttft-ms`` / ``x-slo-tpot-ms`` set the same two numbers), with its share of the traffic."""

    name: str
    ttft_s: float | None
    tpot_s: float | None
    share: float = 1.0

    def __post_init__(self) -> None:
        for key in ("ttft_s", "tpot_s"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ValueError(f"SLO class {self.name!r}: {key} must be > 0 seconds or absent, got {v!r}")
        if not self.share > 0:
            raise ValueError(f"SLO class {self.name!r}: share must be > 0, got {self.share!r}")


def assign_slos(requests: Sequence[Request], classes: Sequence[SloClass], seed: int) -> list[Request]:
    """Each request with the SLOs of a class drawn by share (deterministic in ``seed``)."""
    if not classes:
        return list(requests)
    shares = np.array([c.share for c in classes], dtype=float)
    picks = np.random.default_rng(seed + 4242).choice(len(classes), size=len(requests), p=shares / shares.sum())
    return [dataclasses.replace(r, slo_ttft_s=classes[k].ttft_s, slo_tpot_s=classes[k].tpot_s)
            for r, k in zip(requests, picks, strict=True)]
