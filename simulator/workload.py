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
    slo_ttft_s: float | None = None  # the request's own latency objectives (x-slo-ttft-ms / a named class)
    slo_tpot_s: float | None = None

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
    block_hashes: list[tuple[int, ...]] | None = field(default=None, repr=False)  # per request, KV_BLOCK tokens

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
        hashes = None if self.block_hashes is None else self.block_hashes[:n]
        return replace(self, prompt_tokens=self.prompt_tokens[:n], output_tokens=self.output_tokens[:n],
                       arrivals=arr, prompts=prompts, block_hashes=hashes)

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
        hashes = None if self.block_hashes is None else [
            h[: int(p) // KV_BLOCK] for h, p in zip(self.block_hashes, prompt, strict=True)]
        return replace(self, prompt_tokens=prompt, output_tokens=out, block_hashes=hashes)

    def requests(self, arrivals: np.ndarray | None = None) -> list[Request]:
        times = self.arrivals if arrivals is None else arrivals
        if times is None:
            raise ValueError(f"{self.source}: no arrival times; pass arrivals (e.g. poisson_arrivals)")
        n = min(len(times), len(self))
        return [self.request(i, i, float(times[i])) for i in range(n)]

    def request(self, rid: int, j: int, arrival: float) -> Request:
        """Record ``j`` of the trace as request ``rid`` arriving at ``arrival``."""
        return Request(rid, arrival, int(self.prompt_tokens[j]), int(self.output_tokens[j]),
                       prompt=None if self.prompts is None else self.prompts[j],
                       block_hashes=() if self.block_hashes is None else self.block_hashes[j])


KV_BLOCK = 16  # tokens per KV block, vLLM's default: workload hashes are per block of this size
MOONCAKE_BLOCK = 512  # tokens per hash id in Mooncake's traces


def _mix(a: int, b: int) -> int:
    """A 63-bit hash of two integers (splitmix64 finaliser): deterministic across processes and runs."""
    x = (a * 0x9E3779B97F4A7C15 + b + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) >> 1


def segment_hashes(segments: Sequence[tuple[int, int]], block_size: int = KV_BLOCK) -> tuple[int, ...]:
    """Chained hashes of the full blocks of a token stream made of (content id, tokens) segments.

    Two streams get equal hashes for their first k blocks exactly when their first k blocks hold the same
    content at the same positions, as vLLM's chained block hashes do; a partial last block gets none.
    """
    out: list[int] = []
    h = filled = 0
    for content, length in segments:
        pos = 0
        while pos < length:
            take = min(length - pos, block_size - filled)
            h = _mix(_mix(h, content), pos * 65536 + take)
            filled += take
            pos += take
            if filled == block_size:
                out.append(h)
                filled = 0
    return tuple(out)


def segment_text(segments: Sequence[tuple[int, int]]) -> str:
    """A prompt text of exactly 4 bytes per token whose bytes repeat wherever the content does, so that
    the live services (which count ``ceil(bytes / 4)`` tokens and hash 64-byte blocks) see the same
    sharing the simulator does."""
    parts = []
    for content, length in segments:
        word = f"s{content:x}-"
        parts.append((word * (4 * length // len(word) + 1))[: 4 * length])
    return "".join(parts)


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


def mooncake_hashes(hash_ids: Sequence[int], input_length: int, unique: int) -> tuple[int, ...]:
    """Mooncake's one id per 512-token block as hashes of 16-token blocks. Equal ids mean an equal prefix,
    so each id's full 512 tokens are content shared with every request that has the id there; a partial
    last 512-token block is taken as unique to the request (``unique``), as its tail is."""
    segments = []
    for k, h in enumerate(hash_ids):
        length = min(MOONCAKE_BLOCK, input_length - k * MOONCAKE_BLOCK)
        segments.append((h if length == MOONCAKE_BLOCK else -1 - unique, length))
    return segment_hashes(segments)


def read_mooncake_jsonl(path: str | Path) -> Trace:
    """Mooncake (FAST'25) JSON lines: ``timestamp`` in ms, ``input_length``, ``output_length`` and, when
    present, ``hash_ids`` (prefix-cache block ids, one per 512 tokens)."""
    path = Path(path)
    prompts, outputs, times, hashes = [], [], [], []
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
            ids = rec.get("hash_ids", [])
            if not isinstance(ids, list) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0
                                                    for h in ids):
                raise ValueError(f"{path}:{line}: hash_ids must be a list of non-negative integers")
            if len(ids) > -(-p // MOONCAKE_BLOCK):
                raise ValueError(f"{path}:{line}: {len(ids)} hash_ids but input_length {p} fills only "
                                 f"{-(-p // MOONCAKE_BLOCK)} blocks of {MOONCAKE_BLOCK} tokens")
            prompts.append(p)
            outputs.append(o)
            times.append(t)
            hashes.append(mooncake_hashes(ids, p, line))
    trace = _finish(path, prompts, outputs, times)
    trace.block_hashes = hashes
    return trace


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
        self._remaining: dict[int, int] = {}  # remaining() by tokens generated: load signals ask per request

    @property
    def lengths(self) -> list[int]:
        """The sorted lengths, so that another process can rebuild this exact prior."""
        return list(self._sorted)

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
        known = self._remaining.get(generated)
        if known is not None:
            return known
        s = self._sorted
        i = bisect.bisect_right(s, generated)
        # beyond anything seen: assume a modest tail
        out = max(1, generated // 4) if i >= len(s) else max(1, s[(i + len(s) - 1) // 2] - generated)
        self._remaining[generated] = out
        return out


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
    return [trace.request(i, int(j), float(arrivals[i])) for i, j in enumerate(idx)]


def trace_workload(trace: Trace, n: int, qps: float) -> list[Request]:
    """Replay the first n requests of a timed trace, time-scaled to ``qps`` (burst shape kept)."""
    return trace.head(n).clipped(4096).scaled_to_qps(qps).requests()


@dataclass(frozen=True)
class SharedPrefixShape:
    """Groups of requests that share a system prompt, the shape of inference-perf's shared-prefix data
    and llm-d's b2b-saas benchmark (150 tenants, 6k-token system prompt, 1.2k-token question, 1k out)."""

    groups: int = 150
    system_tokens: int = 6000
    questions_per_group: int = 5
    question_tokens: int = 1200
    output_tokens: int = 1000

    def __post_init__(self) -> None:
        for name in ("groups", "questions_per_group", "question_tokens", "output_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"shared-prefix workload: {name} must be >= 1, got {getattr(self, name)}")
        if self.system_tokens < 0:
            raise ValueError(f"shared-prefix workload: system_tokens must be >= 0, got {self.system_tokens}")


def shared_prefix_workload(shape: SharedPrefixShape, n: int, qps: float, seed: int, *,
                           with_text: bool = False) -> list[Request]:
    """Poisson arrivals; each request asks one of its group's questions after the group's system prompt.
    ``with_text`` fills ``Request.prompt`` with bytes that repeat where the content does (live replay)."""
    rng = np.random.default_rng(seed)
    arrivals = poisson_arrivals(n, qps, rng)
    groups = rng.integers(0, shape.groups, size=n)
    questions = rng.integers(0, shape.questions_per_group, size=n)
    out = []
    for i in range(n):
        g, q = int(groups[i]), int(questions[i])
        segments = [(1 + g, shape.system_tokens), (1_000_000 + g * shape.questions_per_group + q,
                                                   shape.question_tokens)]
        out.append(Request(i, float(arrivals[i]), shape.system_tokens + shape.question_tokens, shape.output_tokens,
                           prompt=segment_text(segments) if with_text else None,
                           block_hashes=segment_hashes(segments)))
    return out


@dataclass(frozen=True)
class ChatShape:
    """Multi-turn chat sessions: every turn's prompt is the whole history plus a new user message."""

    turns: int = 6
    system_tokens: int = 200
    user_tokens: int = 150
    output_tokens: int = 300
    think_time_s: float = 10.0  # mean pause between a turn and the next one of the same session

    def __post_init__(self) -> None:
        if self.turns < 1 or self.user_tokens < 1 or self.output_tokens < 1 or self.system_tokens < 0:
            raise ValueError(f"chat workload: turns, user_tokens and output_tokens must be >= 1 and "
                             f"system_tokens >= 0, got {self}")
        if self.think_time_s < 0:
            raise ValueError(f"chat workload: think_time_s must be >= 0, got {self.think_time_s}")


def chat_workload(shape: ChatShape, sessions: int, session_rate: float, seed: int, *, max_context: int,
                  with_text: bool = False) -> list[Request]:
    """Sessions start as a Poisson process at ``session_rate``; turn k+1 of a session arrives an
    exponential think time after turn k did, so a session's turns stay in order under any time scaling.
    User messages and answers vary in length (lognormal around the shape's means); each request's block
    hashes cover its prompt and its own answer, so the next turn finds the answer's blocks cached, as
    vLLM caches them. A session ends early rather than outgrow ``max_context``. Ids follow arrival order."""
    rng = np.random.default_rng(seed)
    starts = poisson_arrivals(sessions, session_rate, rng)
    pending: list[tuple[float, int, int, list[tuple[int, int]], tuple[int, int]]] = []
    for s in range(sessions):
        t = float(starts[s])
        history: list[tuple[int, int]] = [(7, shape.system_tokens)] if shape.system_tokens else []
        for k in range(shape.turns):
            user = (10_000_000 + s * 1000 + 2 * k, max(1, int(rng.lognormal(np.log(shape.user_tokens), 0.5))))
            answer = (10_000_001 + s * 1000 + 2 * k, max(1, int(rng.lognormal(np.log(shape.output_tokens), 0.5))))
            prompt = [*history, user]
            if sum(n for _, n in prompt) + answer[1] > max_context:
                break
            pending.append((t, s, k, prompt, answer))
            history = [*prompt, answer]
            t += float(rng.exponential(shape.think_time_s))
    pending.sort(key=lambda x: (x[0], x[1], x[2]))
    out = []
    for i, (t, _, _, prompt, answer) in enumerate(pending):
        out.append(Request(i, t, sum(n for _, n in prompt), answer[1],
                           prompt=segment_text(prompt) if with_text else None,
                           block_hashes=segment_hashes([*prompt, answer])))
    return out
