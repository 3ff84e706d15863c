"""Everything that crosses a process boundary between scheduler, side-cars and engines.

Header names, the token count every hop agrees on, the load signals a side-car publishes and the
``/predict`` exchange. Each message has ``from_dict`` that validates what arrived and raises
``ProtocolError`` naming the field, so a malformed reply is refused at the edge instead of surfacing as a
KeyError deep inside a poll loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields

from block.predictor.core import TARGETS, Prediction, Predictor
from block.prefix_index import ExactPrefixView, prompt_hashes
from simulator.engine import CachedRun, EngineConfig, InstanceState, RequestState
from simulator.hardware import get_gpu, get_model
from simulator.timing import Calibrated, Roofline, TimingModel
from simulator.workload import LengthPrior, Request

PREDICTED_TOKENS_HEADER = "x-block-predicted-tokens"  # the scheduler's length estimate, for the side-car
INSTANCE_HEADER = "x-block-instance"  # which instance served a response
REQUEST_ID_HEADER = "x-request-id"
BLOCK_REQUEST_ID_HEADER = "x-block-request-id"  # the scheduler's own id of a request, on every hop and answer
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


BYTES_PER_TOKEN = 4  # approx_tokens' rule, so a KV block of 16 tokens is 64 bytes of prompt text


def text_block_hashes(text: str, block_size: int = 16) -> tuple[int, ...]:
    """Chained hashes of a prompt's full KV blocks, computed from its text the same way at every hop.

    With no tokenizer on the path a block is ``block_size`` approximate tokens, 4 bytes each; each hash
    covers its block and every block before it (as vLLM's block hashes do), so two prompts share their first
    k hashes exactly when their first k blocks of bytes are equal. The hash is keyed BLAKE2b, stable across
    processes (Python's own ``hash`` of bytes is salted per process)."""
    data = text.encode("utf-8", "replace")
    step = block_size * BYTES_PER_TOKEN
    full = approx_tokens(text) // block_size
    out: list[int] = []
    h = b"\0" * 8
    for i in range(full):
        h = hashlib.blake2b(data[i * step:(i + 1) * step], digest_size=8, key=h).digest()
        out.append(int.from_bytes(h, "big") >> 1)
    return tuple(out)


def _int(d: dict, key: str, where: str, *, low: int = 0, high: int = MAX_TOKENS, optional: bool = False) -> int | None:
    value = d.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ProtocolError(f"{where}.{key} must be an integer in [{low}, {high}], got {value!r}", key)
    return value


SLO_TTFT_HEADER = "x-slo-ttft-ms"  # the client's time-to-first-token objective, milliseconds
SLO_TPOT_HEADER = "x-slo-tpot-ms"  # the client's time-per-output-token objective, milliseconds
MAX_SLO_MS = 3_600_000  # an hour: anything longer is not a latency objective


def parse_slo_headers(headers: Mapping[str, str]) -> tuple[float | None, float | None]:
    """The request's SLOs in seconds (TTFT, TPOT) from ``x-slo-ttft-ms`` / ``x-slo-tpot-ms``; None where
    absent. A present header that is not a number in (0, 1 h] is a ProtocolError naming it (a 400)."""
    out: list[float | None] = []
    for name in (SLO_TTFT_HEADER, SLO_TPOT_HEADER):
        raw = headers.get(name)
        if raw is None or raw.strip() == "":
            out.append(None)
            continue
        try:
            ms = float(raw)
        except ValueError:
            raise ProtocolError(f"header {name} must be milliseconds as a number, got {raw[:40]!r}", name) from None
        if not 0 < ms <= MAX_SLO_MS:
            raise ProtocolError(f"header {name} must be in (0, {MAX_SLO_MS}] ms, got {raw[:40]!r}", name)
        out.append(ms / 1e3)
    return out[0], out[1]


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
    block_hashes: list[int] = field(default_factory=list)  # its prompt's full blocks (text_block_hashes)


@dataclass
class PredictRequest:
    """``POST /predict``: what-if latencies of hypothetical requests on the side-car's instance."""

    target: str
    candidates: list[PredictCandidate]
    with_impact: bool = False  # also the delay each candidate adds to the requests already there

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_request(cls, request: Request, target: str, with_impact: bool = False,
                    block_size: int = 16) -> PredictRequest:
        hashes = list(prompt_hashes(request, block_size))
        return cls(target, [PredictCandidate(request.prompt_tokens, request.predicted_output_tokens, hashes)],
                   with_impact)

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
            hashes = c.get("block_hashes", [])
            if not isinstance(hashes, list) or len(hashes) > p or not all(
                    isinstance(h, int) and not isinstance(h, bool) and 0 <= h < 1 << 64 for h in hashes):
                raise ProtocolError(f"{where}.block_hashes must be a list of at most prompt_tokens block hashes "
                                    "(integers in [0, 2^64))", "block_hashes")
            out.append(PredictCandidate(p, est, hashes))  # type: ignore[arg-type]
        impact = d.get("with_impact", False)
        if not isinstance(impact, bool):
            raise ProtocolError(f"'with_impact' must be true or false, got {impact!r}", "with_impact")
        return cls(target, out, impact)


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


# ---- the state stream: a side-car's state mirrored in every scheduler -------------------------------------
# ``GET /state/stream`` on a side-car is newline-delimited JSON: a ``model`` message (how the side-car predicts:
# its timing model, length prior and label) on connect and after every refit, then a ``state`` message after
# every change of its instance's state (at most every few ms, at least every heartbeat). A scheduler rebuilds
# the side-car's Predictor from the first and predicts in-process on the second, so asking "where should
# this go?" costs no network round trip; the side-car stays the source of truth.

def timing_spec(model: TimingModel) -> dict:
    """A timing model as data, enough to rebuild the same model in another process."""
    if isinstance(model, Calibrated):
        return {"kind": "calibrated", **{f.name: getattr(model, f.name) for f in fields(Calibrated) if f.init}}
    if isinstance(model, Roofline):
        scalars = {f.name: getattr(model, f.name) for f in fields(Roofline)
                   if f.init and f.name not in ("gpu", "model")}
        return {"kind": "roofline", "gpu": model.gpu.name, "model": model.model.name, **scalars}
    raise ValueError(f"a {type(model).__name__} timing model cannot be sent to a scheduler")


def timing_from_spec(d: object, where: str = "timing") -> TimingModel:
    if not isinstance(d, dict):
        raise ProtocolError(f"{where} must be an object", where)
    kind = d.get("kind")
    values = {k: v for k, v in d.items() if k != "kind"}
    try:
        if kind == "calibrated":
            return Calibrated(**{k: float(v) for k, v in values.items()})
        if kind == "roofline":
            gpu, model = get_gpu(str(values.pop("gpu", ""))), get_model(str(values.pop("model", "")))
            return Roofline(gpu, model, **values)
    except (TypeError, ValueError, KeyError) as exc:
        raise ProtocolError(f"{where}: {exc}", where) from exc
    raise ProtocolError(f"{where}.kind must be 'calibrated' or 'roofline', got {kind!r}", where)


def model_message(predictor: Predictor, time_scale: float) -> dict:
    """How a side-car predicts, for schedulers that predict on its behalf."""
    prior = predictor.prior
    return {"kind": "model", "label": predictor.label, "timing": timing_spec(predictor.timing),
            "prior": {"name": prior.name, "lengths": prior.lengths}, "horizon_s": predictor.horizon_s,
            "fast_path": predictor.fast_path, "time_scale": time_scale}


@dataclass
class MirroredModel:
    predictor: Predictor
    time_scale: float

    @classmethod
    def from_dict(cls, d: dict) -> MirroredModel:
        prior = d.get("prior")
        if not isinstance(prior, dict) or not isinstance(prior.get("lengths"), list) or not prior["lengths"]:
            raise ProtocolError("model.prior must be an object with a non-empty 'lengths' list", "prior")
        scale, horizon = d.get("time_scale"), d.get("horizon_s")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in (scale, horizon)):
            raise ProtocolError(f"model.time_scale and model.horizon_s must be > 0, got {scale!r} and {horizon!r}",
                                "time_scale")
        try:
            lengths = LengthPrior(prior["lengths"], str(prior.get("name", "prior")))
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"model.prior: {exc}", "prior") from exc
        predictor = Predictor(timing_from_spec(d.get("timing")), lengths, horizon_s=float(horizon),  # type: ignore[arg-type]
                              fast_path=bool(d.get("fast_path", True)), label=str(d.get("label", "")))
        return cls(predictor, float(scale))  # type: ignore[arg-type]


_REQUEST_FIELDS = tuple(f.name for f in fields(RequestState))


def state_to_dict(state: InstanceState) -> dict:
    """An InstanceState as plain JSON data, each request a list in ``RequestState`` field order (compact, and
    the engine's compiled dataclasses cannot be handed to orjson directly)."""
    return {"config": asdict(state.config), "clock": state.clock, "total_preemptions": state.total_preemptions,
            "requests": [[getattr(r, k) for k in _REQUEST_FIELDS] for r in state.requests],
            "cached": cached_runs_to_list(state.cached)}


def cached_runs_to_list(runs: Sequence[CachedRun]) -> list[list]:
    return [[c.parent, c.hashes, c.refs, c.evict] for c in runs]


def cached_runs_from_list(raw: object, where: str = "cached") -> list[CachedRun]:
    if not isinstance(raw, list):
        raise ProtocolError(f"{where} must be a list of [parent, hashes, refs, evict]", where)
    try:
        return [CachedRun(parent, tuple(hashes), refs, evict) for parent, hashes, refs, evict in raw]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{where}: not a list of cache runs: {exc!r}", where) from exc


def state_from_dict(raw: object, where: str = "state") -> InstanceState:
    if not isinstance(raw, dict):
        raise ProtocolError(f"{where} must be an object", where)
    try:
        reqs = []
        for r in raw.get("requests", []):
            values = dict(zip(_REQUEST_FIELDS, r, strict=True))
            if values["block_hashes"] is not None:
                values["block_hashes"] = tuple(values["block_hashes"])
            reqs.append(RequestState(**values))
        cached = cached_runs_from_list(raw.get("cached", []), f"{where}.cached")
        return InstanceState(EngineConfig(**raw["config"]), float(raw["clock"]), reqs,
                             int(raw.get("total_preemptions", 0)), cached)
    except (TypeError, ValueError, KeyError) as exc:
        raise ProtocolError(f"{where}: not an instance state: {exc!r}", where) from exc


@dataclass
class MirroredState:
    """One ``state`` message: the instance as its side-car tracks it, and which scheduler request ids that
    covers (``seen``: the ids it tracks now and those finished in the last seconds), so a scheduler stops
    counting its own dispatches exactly when the side-car shows them, even when it reads only the newest
    message. ``seen`` is a set built once per message: every decision on this state looks its dispatches up."""

    seq: int
    state: InstanceState
    seen: frozenset[str]
    engine_ok: bool
    engine_error: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> MirroredState:
        state = state_from_dict(d.get("state"), "state message: state")
        rids, done = d.get("rids", []), d.get("done", [])
        if not isinstance(rids, list) or not isinstance(done, list):
            raise ProtocolError("state message: 'rids' and 'done' must be lists", "rids")
        seq = _int(d, "seq", "state message", high=1 << 62)
        return cls(seq, state, frozenset(str(r) for r in itertools.chain(rids, done)),
                   d.get("engine_ok") is not False, str(d.get("engine_error") or ""))
