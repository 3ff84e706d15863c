"""Requests, arrival processes, length sources and trace readers.

Readers validate as they go and name the file and line of the first bad record, because a silently
skipped row changes the load an experiment claims to have run.
"""

from __future__ import annotations

import bisect
import csv
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from statistics import NormalDist

import numpy as np

from simulator.data import data_path


@dataclass(slots=True)
class Request:
    id: int
    arrival: float
    prompt_tokens: int
    output_tokens: int  # the truth: only the world (or an oracle) may read it
    predicted_output_tokens: int | None = None
    prompt: str | None = None
    block_hashes: tuple[int, ...] = ()  # chained hashes of its full KV blocks (prompt, then answer if known)

    def __post_init__(self) -> None:
        validate_lengths(self.prompt_tokens, self.output_tokens, where=f"request {self.id}")


def validate_lengths(prompt_tokens: int, output_tokens: int, *, where: str, max_context: int | None = None):
    if prompt_tokens < 1:
        raise ValueError(f"{where}: prompt must have at least 1 token, got {prompt_tokens}")
    if output_tokens < 1:
        raise ValueError(f"{where}: output must have at least 1 token, got {output_tokens}")
    if max_context is not None and prompt_tokens + output_tokens > max_context:
        raise ValueError(
            f"{where}: {prompt_tokens} prompt + {output_tokens} output tokens exceed the model context "
            f"of {max_context}; clip the workload (clip_to_context) or pick a longer-context model"
        )


@dataclass
class Trace:
    """Token lengths and, for timed traces, arrival times in seconds from the first request."""

    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    arrivals: np.ndarray | None = None
    source: str = "synthetic"
    prompts: list[str] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.prompt_tokens)

    @property
    def qps(self) -> float:
        if self.arrivals is None or len(self.arrivals) < 2:
            raise ValueError(f"{self.source}: trace has no arrival times")
        return (len(self.arrivals) - 1) / (self.arrivals[-1] - self.arrivals[0])

    def head(self, n: int) -> Trace:
        arr = None if self.arrivals is None else self.arrivals[:n]
        prompts = None if self.prompts is None else self.prompts[:n]
        return replace(self, prompt_tokens=self.prompt_tokens[:n], output_tokens=self.output_tokens[:n],
                       arrivals=arr, prompts=prompts)

    def scaled_to_qps(self, qps: float) -> Trace:
        """Compress or stretch time so the mean rate is ``qps``, keeping the burst shape."""
        if qps <= 0:
            raise ValueError(f"target QPS must be > 0, got {qps}")
        rate = self.qps  # raises for untimed traces
        assert self.arrivals is not None
        return replace(self, arrivals=(self.arrivals - self.arrivals[0]) * (rate / qps))

    def clipped(self, max_context: int) -> Trace:
        """Clip prompts (keeping room for at least one output token), then outputs, to the context."""
        prompt = np.minimum(self.prompt_tokens, max_context - 1)
        out = np.minimum(self.output_tokens, max_context - prompt)
        return replace(self, prompt_tokens=prompt, output_tokens=out)

    def requests(self, arrivals: np.ndarray | None = None) -> list[Request]:
        times = self.arrivals if arrivals is None else arrivals
        if times is None:
            raise ValueError(f"{self.source}: no arrival times; pass arrivals (e.g. poisson_arrivals)")
        n = min(len(times), len(self))
        prompts = self.prompts
        return [
            Request(i, float(times[i]), int(self.prompt_tokens[i]), int(self.output_tokens[i]),
                    prompt=None if prompts is None else prompts[i])
            for i in range(n)
        ]


def poisson_arrivals(n: int, qps: float, rng: np.random.Generator) -> np.ndarray:
    return gamma_arrivals(n, qps, 1.0, rng)


def rate_arrivals(rate: Callable[[float], float], duration: float, max_rate: float,
                  rng: np.random.Generator) -> np.ndarray:
    """A Poisson process whose rate follows ``rate(t)`` (<= max_rate), by thinning: ramps and steps."""
    if max_rate <= 0:
        raise ValueError(f"max_rate must be > 0, got {max_rate}")
    times = np.cumsum(rng.exponential(1.0 / max_rate, size=int(max_rate * duration * 1.2) + 16))
    while times[-1] < duration:
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / max_rate, size=len(times)))])
    times = times[times < duration]
    rates = np.array([rate(t) for t in times])
    if rates.size and (rates.max() > max_rate or rates.min() < 0):
        raise ValueError(f"rate(t) must stay within [0, max_rate={max_rate}], got [{rates.min()}, {rates.max()}]")
    return times[rng.random(len(times)) < rates / max_rate]


def gamma_arrivals(n: int, qps: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Arrivals with gamma inter-arrival gaps: cv=1 is Poisson, cv>1 bursty, cv<1 smoother."""
    if qps <= 0:
        raise ValueError(f"QPS must be > 0, got {qps}")
    if cv <= 0:
        raise ValueError(f"burstiness CV must be > 0, got {cv}")
    shape = 1.0 / (cv * cv)
    gaps = rng.gamma(shape, 1.0 / (qps * shape), size=n)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def synthetic_lengths(n: int, rng: np.random.Generator, max_context: int = 4096) -> Trace:
    """Embedded default lengths, shaped like Llama-2-7b-chat on AlpacaEval (output median ~317)."""
    prompt = np.clip(rng.lognormal(np.log(160), 0.5, n), 16, 2048).astype(np.int64)
    out = np.clip(rng.lognormal(np.log(317), 0.55, n), 1, 2048).astype(np.int64)
    return Trace(prompt, out, source="embedded-lognormal").clipped(max_context)


def _check(path: Path, line: int, prompt: int, output: int) -> None:
    validate_lengths(prompt, output, where=f"{path}:{line}")


def _finish(path: Path, prompts: list[int], outputs: list[int], times: list[float] | None) -> Trace:
    if not prompts:
        raise ValueError(f"{path}: trace is empty")
    arr = None
    if times is not None:
        arr = np.asarray(times, dtype=float)
        if np.any(np.diff(arr) < 0):
            bad = int(np.argmax(np.diff(arr) < 0)) + 3
            raise ValueError(f"{path}:{bad}: arrival time goes backwards")
        arr = arr - arr[0]
    return Trace(np.asarray(prompts, dtype=np.int64), np.asarray(outputs, dtype=np.int64), arr,
                 source=str(path))


def _rows(path: Path, required: tuple[str, ...]):
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}:1: missing columns {missing}; header is {reader.fieldnames}")
        yield from enumerate(reader, start=2)


def read_splitwise_csv(path: str | Path) -> Trace:
    """Vidur's ``arrived_at,num_prefill_tokens,num_decode_tokens`` (arrival optional: length-only)."""
    path = Path(path)
    prompts, outputs, times = [], [], []
    with path.open(newline="") as f:
        timed = "arrived_at" in (csv.DictReader(f).fieldnames or [])
    for line, row in _rows(path, ("num_prefill_tokens", "num_decode_tokens")):
        try:
            p, o = int(float(row["num_prefill_tokens"])), int(float(row["num_decode_tokens"]))
            if timed:
                times.append(float(row["arrived_at"]))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{line}: bad value ({exc})") from exc
        _check(path, line, p, o)
        prompts.append(p)
        outputs.append(o)
    return _finish(path, prompts, outputs, times if timed else None)


def read_azure_csv(path: str | Path) -> Trace:
    """The original Azure LLM inference trace: ``TIMESTAMP,ContextTokens,GeneratedTokens``."""
    path = Path(path)
    prompts, outputs, times = [], [], []
    for line, row in _rows(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
        try:
            stamp = row["TIMESTAMP"].strip()
            head, _, frac = stamp.partition(".")
            t = datetime.strptime(head, "%Y-%m-%d %H:%M:%S").timestamp() + float("0." + (frac or "0"))
            p, o = int(row["ContextTokens"]), int(row["GeneratedTokens"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{line}: bad value ({exc})") from exc
        _check(path, line, p, o)
        prompts.append(p)
        outputs.append(o)
        times.append(t)
    return _finish(path, prompts, outputs, times)


def read_mooncake_jsonl(path: str | Path) -> Trace:
    """Mooncake (FAST'25) JSON lines: ``timestamp`` in ms, ``input_length``, ``output_length``."""
    path = Path(path)
    prompts, outputs, times = [], [], []
    with path.open() as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
                p, o, t = int(rec["input_length"]), int(rec["output_length"]), float(rec["timestamp"]) / 1e3
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: not a Mooncake record ({exc})") from exc
            _check(path, line, p, o)
            prompts.append(p)
            outputs.append(o)
            times.append(t)
    return _finish(path, prompts, outputs, times)


def read_alpaca_lengths(path: str | Path, model: str = "llama-2-7b-chat-hf") -> Trace:
    """AlpacaEval prompt (chat template) and response token counts of one model."""
    path = Path(path)
    col = f"out_tokens_llama2tok__{model}"
    prompts, outputs = [], []
    for line, row in _rows(path, ("prompt_tokens_llama2_chat_template", col)):
        try:
            p, o = int(row["prompt_tokens_llama2_chat_template"]), int(row[col])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{line}: bad value ({exc})") from exc
        _check(path, line, p, o)
        prompts.append(p)
        outputs.append(o)
    return _finish(path, prompts, outputs, None)


def read_trace(path: str | Path) -> Trace:
    """Pick the reader from the file's extension and header."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"trace file {path} does not exist")
    if path.suffix == ".jsonl":
        return read_mooncake_jsonl(path)
    with path.open(newline="") as f:
        header = f.readline()
    if "TIMESTAMP" in header:
        return read_azure_csv(path)
    if "num_prefill_tokens" in header:
        return read_splitwise_csv(path)
    if "prompt_tokens_llama2_chat_template" in header:
        return read_alpaca_lengths(path)
    raise ValueError(f"{path}:1: unrecognised trace header {header.strip()!r}")


NAMED_TRACES = {
    "splitwise_conv": "traces/vidur/splitwise_conv.csv",
    "splitwise_code": "traces/vidur/splitwise_code.csv",
    "arxiv": "traces/vidur/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
    "azure_conv": "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
    "mooncake": "traces/mooncake_fast25/synthetic_trace.jsonl",
    "alpaca": "alpaca_eval/response_lengths_llama2tok.csv",
}


def load_named_trace(name: str) -> Trace:
    """A trace by short name from BLOCK_DATA_DIR, or a path."""
    if name in NAMED_TRACES:
        return read_trace(data_path(NAMED_TRACES[name]))
    if Path(name).exists():
        return read_trace(name)
    raise ValueError(f"unknown trace {name!r}: give a file path or one of {sorted(NAMED_TRACES)}")


class LengthPrior:
    """Distribution of response lengths for one served model, for requests nobody estimated.

    A request that has already produced g tokens gets the *conditional* median of L given L > g, so a
    long answer still running is expected to go on for a while, instead of "any moment now".
    """

    def __init__(self, lengths: Sequence[int] | np.ndarray, name: str = "prior"):
        arr = np.sort(np.asarray(lengths, dtype=np.int64))
        if arr.size == 0 or arr[0] < 1:
            raise ValueError(f"{name}: a length prior needs positive lengths")
        self.name = name
        self._sorted = arr.tolist()
        self.median = int(np.median(arr))
        self.mean = round(float(arr.mean()))

    @classmethod
    def embedded(cls) -> LengthPrior:
        """Shaped like Llama-2-7b-chat on AlpacaEval (median ~317, long right tail); no data needed."""
        q = (np.arange(2000) + 0.5) / 2000
        z = np.array([NormalDist().inv_cdf(x) for x in q])
        return cls(np.clip(np.exp(np.log(317) + 0.55 * z), 1, 4096).astype(np.int64), "embedded")

    def expected_remaining(self, generated: int, predicted: int | None) -> int:
        """Tokens still to come for a request: its estimate while it has not outlived it, else the
        conditional remainder. One definition for forks, load signals and provisioning."""
        if predicted is not None and predicted > generated:
            return predicted - generated
        return self.remaining(generated)

    def sample(self, rng: random.Random) -> int:
        return self._sorted[rng.randrange(len(self._sorted))]

    def remaining(self, generated: int) -> int:
        """Median further tokens of a request that has generated ``generated`` so far (>= 1)."""
        s = self._sorted
        i = bisect.bisect_right(s, generated)
        if i >= len(s):
            return max(1, generated // 4)  # beyond anything seen: assume a modest tail
        return max(1, s[(i + len(s) - 1) // 2] - generated)


def lengths_source(name: str, seed: int) -> tuple[Trace, LengthPrior]:
    """Lengths to sample from and a prior fitted on a disjoint half (what past traffic would show)."""
    if name == "synthetic":
        trace = synthetic_lengths(4000, np.random.default_rng(seed + 10_000))
        prior_lengths = synthetic_lengths(4000, np.random.default_rng(seed + 20_000)).output_tokens
        return trace, LengthPrior(prior_lengths, "synthetic")
    trace = load_named_trace(name).clipped(4096)
    order = np.random.default_rng(12345).permutation(len(trace))
    half = order[: len(order) // 2]
    return trace, LengthPrior(trace.output_tokens[half], f"{name}-half")


def poisson_workload(trace: Trace, n: int, qps: float, seed: int) -> list[Request]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(trace), size=n)
    arrivals = poisson_arrivals(n, qps, rng)
    prompts = trace.prompts
    return [Request(i, float(arrivals[i]), int(trace.prompt_tokens[j]), int(trace.output_tokens[j]),
                    prompt=None if prompts is None else prompts[j]) for i, j in enumerate(idx)]


def trace_workload(trace: Trace, n: int, qps: float) -> list[Request]:
    """Replay the first n requests of a timed trace, time-scaled to ``qps`` (burst shape kept)."""
    return trace.head(n).clipped(4096).scaled_to_qps(qps).requests()
