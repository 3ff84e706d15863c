"""The engine flags, declared once: what an emulated instance is, for its engine and its side-car alike.

An emulated engine and the side-car in front of it must agree on the GPU, the model and the scheduler
limits, or the side-car predicts for an engine that is not there. Every place that starts, configures or
parses one (the emulator's and the side-car's ``main``, the cluster driver, the ``block up``/``demo``
commands) goes through this one dataclass, so there is one set of defaults: vLLM's for an A30 serving
Llama-2-7B, with the KV cache sized from GPU memory as vLLM sizes it (1052 blocks there).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass

from simulator.engine import EngineConfig
from simulator.hardware import get_gpu, get_model, num_kv_blocks
from simulator.timing import Roofline

_HELP = {
    "gpu": "GPU spec (simulator.hardware)",
    "model": "model spec (simulator.hardware)",
    "num_blocks": "KV cache blocks (default: sized from GPU memory, as vLLM does)",
    "max_num_seqs": "most requests in the running batch",
    "max_num_batched_tokens": "token budget of one iteration (chunked prefill)",
    "max_model_len": "longest prompt + output (default: the model's context)",
    "time_scale": "emulated GPU speed-up over real time (emulator and side-car)",
    "noise": "per-iteration step-time noise, +- fraction (emulator only)",
}


@dataclass(frozen=True)
class EngineSettings:
    gpu: str = "A30"
    model: str = "Llama-2-7B"
    num_blocks: int | None = None  # None: sized from GPU memory; 0 is refused by EngineConfig, not "default"
    max_num_seqs: int = 48
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # None: the model's context
    time_scale: float = 1.0  # an emulator emulates its GPU in real time unless told otherwise
    noise: float = 0.05

    def __post_init__(self) -> None:
        if not self.time_scale > 0:  # written so that NaN fails too
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
        if not self.noise >= 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        """Add every engine flag to ``parser``, with these defaults (shown in --help)."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = next(t for t in (*typing.get_args(hints[f.name]), hints[f.name]) if t is not type(None))
            shown = "" if f.default is None else f" (default: {f.default})"
            parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                                help=_HELP[f.name] + shown)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> EngineSettings:
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    @classmethod
    def parse(cls, flags: list[str]) -> tuple[EngineSettings, list[str]]:
        """Engine settings from a flag list (a cluster file's ``flags``), and the flags that are not engine
        settings (an emulator's ``--seed``), in order. A malformed value is a ValueError naming the flag."""
        parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
        cls.add_args(parser)
        try:
            args, rest = parser.parse_known_args(flags)
        except argparse.ArgumentError as exc:
            raise ValueError(f"bad engine flag: {exc}") from exc
        return cls.from_args(args), rest

    def argv(self) -> list[str]:
        """These settings as flags: what the emulator and its side-car both receive."""
        out: list[str] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out += ["--" + f.name.replace("_", "-"), str(value)]
        return out

    def engine_config(self) -> EngineConfig:
        gpu, model = get_gpu(self.gpu), get_model(self.model)
        blocks = num_kv_blocks(gpu, model) if self.num_blocks is None else self.num_blocks
        max_len = model.max_context if self.max_model_len is None else self.max_model_len
        config = EngineConfig(num_blocks=blocks, max_num_seqs=self.max_num_seqs,
                              max_num_batched_tokens=self.max_num_batched_tokens, max_model_len=max_len)
        if max_len == 1:  # a cluster that would start and then refuse every request
            raise ValueError("max_model_len must be >= 2 (a prompt token and a generated one), got 1")
        if max_len > model.max_context:  # vLLM refuses a length past the model's context too
            raise ValueError(f"max_model_len {max_len} is longer than {model.name}'s context "
                             f"({model.max_context} tokens)")
        return config

    def timing(self) -> Roofline:
        """The roofline step-time model of this GPU and model: the emulator's world and the side-car's
        predictor start from the same one."""
        return Roofline(get_gpu(self.gpu), get_model(self.model))
