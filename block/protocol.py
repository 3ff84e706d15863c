"""Everything that crosses a process boundary between scheduler, side-cars and engines.

Header names, the token count every hop agrees on, the load signals a side-car publishes and the
``/predict`` exchange. Each message has ``from_dict`` that validates what arrived and raises
``ProtocolError`` naming the field, so a malformed reply is refused at the edge instead of surfacing as a
KeyError deep inside a poll loop.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields

from block.predictor.core import TARGETS, Prediction
from block.prefix_index import ExactPrefixView, prompt_hashes
from simulator.engine import InstanceState
from simulator.workload import LengthPrior, Request

PREDICTED_TOKENS_HEADER = "x-block-predicted-tokens"  # the scheduler's length estimate, for the side-car
INSTANCE_HEADER = "x-block-instance"  # which instance served a response
REQUEST_ID_HEADER = "x-request-id"
MAX_TOKENS = 1 << 20  # no request, prompt or estimate is longer than this


class ProtocolError(ValueError):
    """A message that does not follow the protocol; ``field`` names what was wrong."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def approx_tokens(text: str) -> int:
    """Token count without a tokenizer: ~4 characters per token (OpenAI's rule of thumb).

    Every hop uses this same function, so the emulator, the side-car and the scheduler agree; a real
    engine's exact count arrives in ``usage`` at the end of a request.
    """
    return max(1, math.ceil(len(text.encode("utf-8", "replace")) / 4))


def _int(d: dict, key: str, where: str, *, low: int = 0, high: int = MAX_TOKENS, optional: bool = False) -> int | None:
    value = d.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"{where}.{key} must be an integer in [{low}, {high}], got {value!r}", key)
    return value


def parse_predicted_tokens(header: str | None) -> int | None:
    """The length-estimate header, or None when absent or not a sane positive integer."""
    if not header or not header.isdigit() or len(header) > 7:
        return None
    value = int(header)
    return value if 1 <= value <= MAX_TOKENS else None


@dataclass
class LoadSignals:
    """Live signals every heuristic needs; computed from an InstanceState plus not-yet-visible work.

    The prefix-cache fields default to 0 so that a side-car which does not send them still parses; they are
    what the cache-aware peers read (llm-d's in-flight uncached tokens, Dynamo's prefill and active blocks,
    SGLang's tree size).
    """

    running: int
    waiting: int
    free_blocks: int  # unreferenced cached blocks count as free, as in vLLM's KV usage
    total_blocks: int
    unfinished_tokens: int  # prefill still to compute + decode still expected (estimated lengths)
    queued_prefill_blocks: int  # KV blocks the waiting queue will claim when admitted
    prefill_tokens: int = 0  # prompt tokens still to compute before their first token, cache hits excluded
    prefill_blocks: int = 0  # the same per request in KV blocks (Dynamo's active prefill blocks)
    decode_blocks: int = 0  # KV blocks held by running requests, a shared prefix block once (Dynamo's active)
    cached_blocks: int = 0  # blocks in the instance's prefix cache, held or evictable

    @classmethod
    def from_state(cls, state: InstanceState, prior: LengthPrior, pending: Sequence[Request] = (),
                   cache: ExactPrefixView | None = None) -> LoadSignals:
        """Signals of a state; waiting and pending requests count only what their cache hits leave to
        prefill (``cache``: a view of this state, built here when not given)."""
        bs = state.config.block_size
        cache = cache if cache is not None else ExactPrefixView(state)
        running = waiting = tokens = queued = prefill = prefill_blocks = 0
        for r in state.requests:
            left = prior.expected_remaining(r.generated_tokens, r.predicted_output_tokens)
            todo = r.prompt_tokens + r.generated_tokens - r.computed_tokens
            tokens += todo + left
            if r.phase == "running":
                running += 1
            else:
                waiting += 1
                queued += -(-(r.prompt_tokens + r.generated_tokens) // bs)
                if r.block_hashes:
                    cap = (r.prompt_tokens + r.generated_tokens - 1) // bs
                    todo -= cache.match(r.block_hashes[:cap]) * bs
            if r.first_token_time is None:
                prefill += todo
                prefill_blocks += -(-todo // bs)
        used = state.used_blocks()
        base = cls(running, waiting, state.config.num_blocks - used, state.config.num_blocks, tokens, queued,
                   prefill, prefill_blocks, used, cache.size)
        matched = [cache.match(prompt_hashes(r, bs)) for r in pending]
        return base.plus(pending, prior, bs, matched)

    @classmethod
    def from_dict(cls, d: object, where: str = "signals") -> LoadSignals:
        if not isinstance(d, dict):
            raise ProtocolError(f"{where} must be an object, got {type(d).__name__}", where)
        values = {f.name: _int(d, f.name, where, high=1 << 40, optional=f.default is not MISSING)
                  for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if v is not None})  # type: ignore[arg-type]

    def plus(self, pending: Sequence[Request], prior: LengthPrior, block_size: int = 16,
             matched: Sequence[int] | None = None) -> LoadSignals:
        """These signals with requests dispatched here that the instance does not show yet; ``matched``:
        the leading prompt blocks each finds cached here (none assumed when not given)."""
        if not pending:
            return self
        tokens = queued = prefill = prefill_blocks = 0
        for i, r in enumerate(pending):
            queued += -(-r.prompt_tokens // block_size)
            p = r.predicted_output_tokens
            tokens += r.prompt_tokens + (p if p is not None else prior.median)
            hits = min(matched[i], (r.prompt_tokens - 1) // block_size) if matched is not None else 0
            todo = r.prompt_tokens - hits * block_size
            prefill += todo
            prefill_blocks += -(-todo // block_size)
        return dataclasses.replace(self, waiting=self.waiting + len(pending),
                                   unfinished_tokens=self.unfinished_tokens + tokens,
                                   queued_prefill_blocks=self.queued_prefill_blocks + queued,
                                   prefill_tokens=self.prefill_tokens + prefill,
                                   prefill_blocks=self.prefill_blocks + prefill_blocks)


@dataclass
class PredictCandidate:
    prompt_tokens: int
    predicted_output_tokens: int | None = None


@dataclass
class PredictRequest:
    """``POST /predict``: what-if latencies of hypothetical requests on the side-car's instance."""

    target: str
    candidates: list[PredictCandidate]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_request(cls, request: Request, target: str) -> PredictRequest:
        return cls(target, [PredictCandidate(request.prompt_tokens, request.predicted_output_tokens)])

    @classmethod
    def from_dict(cls, d: object, max_model_len: int) -> PredictRequest:
        if not isinstance(d, dict):
            raise ProtocolError("predict body must be an object with 'candidates'")
        target = d.get("target", "e2e")
        if target not in TARGETS:
            raise ProtocolError(f"unknown target {target!r}; choose one of {TARGETS}", "target")
        raw = d.get("candidates")
        if not isinstance(raw, list) or not raw:
            raise ProtocolError("'candidates' must be a non-empty list", "candidates")
        out = []
        for i, c in enumerate(raw):
            where = f"candidates[{i}]"
            if not isinstance(c, dict):
                raise ProtocolError(f"{where} must be an object", "candidates")
            p = _int(c, "prompt_tokens", where, low=1, high=max_model_len - 1)
            est = _int(c, "predicted_output_tokens", where, low=1, optional=True)
            out.append(PredictCandidate(p, est))  # type: ignore[arg-type]
        return cls(target, out)


@dataclass
class PredictResponse:
    instance: str
    predictions: list[Prediction]
    signals: LoadSignals
    engine_ok: bool
    predictor: str  # what the side-car's predictor knows (its honesty label)

    def to_dict(self) -> dict:
        return {"instance": self.instance, "predictions": [p.to_dict() for p in self.predictions],
                "signals": asdict(self.signals), "engine_ok": self.engine_ok, "predictor": self.predictor}

    @classmethod
    def from_dict(cls, d: object) -> PredictResponse:
        if not isinstance(d, dict):
            raise ProtocolError("a predict reply must be an object")
        raw = d.get("predictions")
        if not isinstance(raw, list) or not raw:
            raise ProtocolError("'predictions' must be a non-empty list", "predictions")
        names = {f.name for f in fields(Prediction)}
        preds = []
        for i, p in enumerate(raw):
            if not isinstance(p, dict) or not names >= set(p) or not {"ttft", "e2e"} <= set(p):
                raise ProtocolError(f"predictions[{i}] is not a Prediction", "predictions")
            try:
                preds.append(Prediction(**p))
            except TypeError as exc:
                raise ProtocolError(f"predictions[{i}]: {exc}", "predictions") from exc
        return cls(str(d.get("instance", "")), preds, LoadSignals.from_dict(d.get("signals")),
                   bool(d.get("engine_ok", True)), str(d.get("predictor", "")))


@dataclass
class SideCarStatus:
    """The brief ``GET /state?requests=0`` reply a scheduler polls: signals, engine health, predictor."""

    instance: str
    signals: LoadSignals
    engine_ok: bool
    engine_error: str = ""
    predictor: str = ""
    engine: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: object) -> SideCarStatus:
        if not isinstance(d, dict):
            raise ProtocolError("a side-car /state reply must be an object")
        engine = d.get("engine") or {}
        if not isinstance(engine, dict):
            raise ProtocolError("'engine' must be an object", "engine")
        predictor = d.get("predictor") or {}
        label = predictor.get("label", "") if isinstance(predictor, dict) else ""
        return cls(str(d.get("instance", "")), LoadSignals.from_dict(d.get("signals")), engine.get("ok") is not False,
                   str(engine.get("error") or ""), str(label), engine)
