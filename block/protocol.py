"""Everything that crosses a process boundary between scheduler, side-cars and engines.

Header names, the token count every hop agrees on, the load signals a side-car publishes and the
``/predict`` exchange. Each message has ``from_dict`` that validates what arrived and raises
``ProtocolError`` naming the field, so a malformed reply is refused at the edge instead of surfacing as a
KeyError deep inside a poll loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

from block.predictor.core import TARGETS, Prediction
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
    """Live signals every heuristic needs; computed from an InstanceState plus not-yet-visible work."""

    running: int
    waiting: int
    free_blocks: int
    total_blocks: int
    unfinished_tokens: int  # prefill still to compute + decode still expected (estimated lengths)
    queued_prefill_blocks: int  # KV blocks the waiting queue will claim when admitted

    @classmethod
    def from_state(cls, state: InstanceState, prior: LengthPrior, pending: Sequence[Request] = ()) -> LoadSignals:
        bs = state.config.block_size
        running = waiting = used = tokens = queued = 0
        for r in state.requests:
            used += r.allocated_blocks
            left = prior.expected_remaining(r.generated_tokens, r.predicted_output_tokens)
            tokens += r.prompt_tokens + r.generated_tokens - r.computed_tokens + left
            if r.phase == "running":
                running += 1
            else:
                waiting += 1
                queued += -(-(r.prompt_tokens + r.generated_tokens) // bs)
        base = cls(running, waiting, state.config.num_blocks - used, state.config.num_blocks, tokens, queued)
        return base.plus(pending, prior, bs)

    @classmethod
    def from_dict(cls, d: object, where: str = "signals") -> LoadSignals:
        if not isinstance(d, dict):
            raise ProtocolError(f"{where} must be an object, got {type(d).__name__}", where)
        values = {f.name: _int(d, f.name, where, high=1 << 40) for f in fields(cls)}
        return cls(**values)  # type: ignore[arg-type]

    def plus(self, pending: Sequence[Request], prior: LengthPrior, block_size: int = 16) -> LoadSignals:
        """These signals with requests dispatched here that the instance does not show yet."""
        if not pending:
            return self
        tokens = queued = 0
        for r in pending:
            queued += -(-r.prompt_tokens // block_size)
            p = r.predicted_output_tokens
            tokens += r.prompt_tokens + (p if p is not None else prior.median)
        return LoadSignals(self.running, self.waiting + len(pending), self.free_blocks, self.total_blocks,
                           self.unfinished_tokens + tokens, self.queued_prefill_blocks + queued)


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
